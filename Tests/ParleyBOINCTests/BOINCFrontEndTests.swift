import Crypto
import Foundation
import Hummingbird
import HummingbirdTesting
import Logging
import NIOCore
import Parley
import ParleyWork
import SwiftProtobuf
import Testing
@testable import ParleyWorkBOINC
import ParleyTestSupport

/// The front end in process, through its Hummingbird router (no sockets), on a SQLite store
/// in a temporary directory.
struct BOINCBench {
    let directory: String
    let store: SQLiteWorkStore
    let frontEnd: BOINCFrontEnd
    let workKey = WorkSigning.PrivateKey()
    let boincKey: BOINCSigning.PrivateKey

    static let base = "http://127.0.0.1:9/"

    init(trust: Bool = true, keyring: ParleyKeyring? = nil, configure: (inout BOINCFrontEnd.Configuration) -> Void = { _ in }) throws {
        self.directory = testScratchPath("parley-boinc-\(UUID().uuidString)")
        try FileManager.default.createDirectory(atPath: self.directory, withIntermediateDirectories: true)
        self.store = try SQLiteWorkStore(path: self.directory + "/work.sqlite")
        self.boincKey = try BOINCSigning.PrivateKey(text: String(decoding: try boincFixture("test_code_sign_private"), as: UTF8.self))
        var configuration = BOINCFrontEnd.Configuration(url: Self.base, key: self.boincKey, uploadDirectory: self.directory + "/uploads")
        if trust { configuration.trust = [self.workKey.publicKey] }
        configuration.keyring = keyring
        configure(&configuration)
        var logger = Logger(label: "boinc-test")
        logger.logLevel = .critical
        self.frontEnd = try BOINCFrontEnd(configuration: configuration, store: self.store, logger: logger)
    }

    func remove() { try? FileManager.default.removeItem(atPath: self.directory) }

    /// Submits a job signed with the work key (or `signer`); returns its id.
    @discardableResult
    func submit(_ spec: Parley_Work_V1_JobSpec, signer: WorkSigning.PrivateKey? = nil, maxAttempts: Int = 3) async throws -> UInt64 {
        let bytes: [UInt8] = try spec.serializedBytes()
        let signature = try (signer ?? self.workKey).sign(job: bytes)
        return try await self.store.submit([NewJob(spec: bytes, signature: signature, maxAttempts: maxAttempts, app: spec.app)], now: WorkService.now())[0]
    }

    func app() -> some ApplicationProtocol { Application(router: BOINCHTTP.router(self.frontEnd)) }

    /// The first result a work request of the default client gets.
    func firstResult(_ client: any TestClientProtocol) async throws -> BOINCName {
        let reply = try await client.post("/scheduler", schedulerRequest())
        return try #require(elements("name", in: reply.text).first { $0.hasSuffix("_r") }.flatMap(BOINCName.parse(result:)))
    }

    /// Uploads `text` as `file` with the grant the front end gives it; the HTTP status.
    func upload(_ file: String, _ text: String, _ client: any TestClientProtocol) async throws -> Int {
        try await client.post("/file_upload_handler", uploadRequest(file, data: Array(text.utf8), grant: self.frontEnd.grant.token(for: file))).status
    }

    /// Runs `body` with a test client of the router.
    func withClient<T: Sendable>(_ body: @Sendable (any TestClientProtocol) async throws -> T) async throws -> T {
        try await self.app().test(.router, body)
    }
}

/// A scheduler request as the client 7.20 writes it (the parts the front end reads).
func schedulerRequest(
    cpid: String = "abc123", authenticator: String = "anything", seconds: Double = 3456, instances: Double = 1, major: Int = 7,
    platform: String = "x86_64-pc-linux-gnu", holdsKey: Bool = false, results: [String] = []
) -> String {
    """
    <scheduler_request>
        <authenticator>\(authenticator)</authenticator>
        <hostid>0</hostid>
        <rpc_seqno>3</rpc_seqno>
        <core_client_major_version>\(major)</core_client_major_version>
        <core_client_minor_version>20</core_client_minor_version>
        <core_client_release>5</core_client_release>
        <work_req_seconds>\(seconds)</work_req_seconds>
        <cpu_req_secs>\(seconds)</cpu_req_secs>
        <cpu_req_instances>\(instances)</cpu_req_instances>
        <platform_name>\(platform)</platform_name>
    \(holdsKey ? "<code_sign_key>\n1024\n00\n.\n</code_sign_key>" : "")
    <host_info>
        <host_cpid>\(cpid)</host_cpid>
        <p_ncpus>2</p_ncpus>
    </host_info>
    \(results.joined(separator: "\n"))
    </scheduler_request>

    """
}

/// A reported result as the client writes it.
func reportedResult(_ name: String, exitStatus: Int = 0, state: Int = 5, stderr: String = "") -> String {
    """
    <result>
        <name>\(name)</name>
        <final_cpu_time>0.250000</final_cpu_time>
        <final_elapsed_time>1.500000</final_elapsed_time>
        <exit_status>\(exitStatus)</exit_status>
        <state>\(state)</state>
    <stderr_out>
    <core_client_version>7.20.5</core_client_version>
    <![CDATA[
    <stderr_txt>
    \(stderr)
    </stderr_txt>
    ]]>
    </stderr_out>
    </result>
    """
}

/// An upload request as the client writes it (client/file_xfer.cpp): the header left open,
/// then `<data>` and the bytes.
func uploadRequest(_ name: String, data: [UInt8], nbytes: Int? = nil, offset: Int = 0, md5: String? = nil, grant: String? = nil) -> [UInt8] {
    let header = """
        <data_server_request>
            <core_client_major_version>7</core_client_major_version>
            <core_client_minor_version>20</core_client_minor_version>
            <core_client_release>5</core_client_release>
        <file_upload>
        <file_info>
            <name>\(name)</name>
        \(grant.map { "<xml_signature>\n\($0)</xml_signature>" } ?? "")
            <max_nbytes>1048576</max_nbytes>
        </file_info>
        <nbytes>\(nbytes ?? data.count)</nbytes>
        <md5_cksum>\(md5 ?? BOINCSigning.md5Hex(data))</md5_cksum>
        <offset>\(offset)</offset>
        <data>

        """
    return Array(header.utf8) + data
}

func sizeRequest(_ name: String) -> String {
    "<data_server_request>\n    <core_client_major_version>7</core_client_major_version>\n<get_file_size>\(name)</get_file_size>\n</data_server_request>\n"
}

extension TestClientProtocol {
    func post(_ path: String, _ body: [UInt8]) async throws -> (status: Int, text: String) {
        try await self.execute(uri: path, method: .post, body: ByteBuffer(bytes: body)) { r in (r.status.code, String(buffer: r.body)) }
    }

    func post(_ path: String, _ body: String) async throws -> (status: Int, text: String) { try await self.post(path, Array(body.utf8)) }

    func get(_ path: String) async throws -> (status: Int, body: [UInt8]) {
        try await self.execute(uri: path, method: .get) { r in (r.status.code, Array(buffer: r.body)) }
    }
}

func echoSpec(outputs: [String] = ["out.txt"], inputs: [(String, [UInt8])] = [], app: String = "") -> Parley_Work_V1_JobSpec {
    var spec = Parley_Work_V1_JobSpec()
    spec.argv = ["echo hi > out.txt"]
    spec.shell = true
    spec.outputs = outputs
    spec.app = app
    spec.inputs = inputs.map { name, bytes in
        var input = Parley_Work_V1_InputFile()
        input.name = name
        input.content = Data(bytes)
        input.size = UInt64(bytes.count)
        input.sha256 = Data(SHA256.hash(data: bytes))
        return input
    }
    return spec
}

/// The text of every `<tag>` element in an XML reply (reads replies in tests only).
func elements(_ tag: String, in text: String) -> [String] {
    var found: [String] = []
    var rest = text[...]
    while let start = rest.range(of: "<\(tag)>"), let end = rest.range(of: "</\(tag)>", range: start.upperBound..<rest.endIndex) {
        found.append(String(rest[start.upperBound..<end.lowerBound]).trimmingCharacters(in: .whitespacesAndNewlines))
        rest = rest[end.upperBound...]
    }
    return found
}

@Suite struct BOINCFrontEndTests {
    @Test func masterPageListsTheSchedulersInOrder() async throws {
        let bench = try BOINCBench { $0.schedulerURLs = ["http://a.example/s1", "http://b.example/s2?x=1&y=2"] }
        defer { bench.remove() }
        let page = try await bench.withClient { try await $0.get("/") }
        let text = String(decoding: page.body, as: UTF8.self)
        #expect(page.status == 200)
        #expect(text.contains("<scheduler>http://a.example/s1</scheduler>\n<scheduler>http://b.example/s2?x=1&amp;y=2</scheduler>"))
        #expect(text.contains("<link rel=\"boinc_scheduler\" href=\"http://a.example/s1\">\n<link rel=\"boinc_scheduler\" href=\"http://b.example/s2?x=1&amp;y=2\">"))
    }

    @Test func handsOutAJobAndAcceptsItsReportExactlyOnce() async throws {
        let bench = try BOINCBench { $0.requestDelay = 12; $0.notices = ["Welcome"] }
        defer { bench.remove() }
        let input = Array("input bytes\n".utf8)
        let id = try await bench.submit(echoSpec(inputs: [("dir/in.txt", input)]))
        let publicKey = bench.boincKey.publicKey
        try await bench.withClient { client in
            let reply = try await client.post("/scheduler", schedulerRequest())
            #expect(reply.status == 200)
            #expect(reply.text.contains("<request_delay>12</request_delay>"))
            #expect(reply.text.contains("<message priority=\"notice\">Welcome</message>"))
            #expect(elements("code_sign_key", in: reply.text) == [publicKey.text.trimmingCharacters(in: .whitespacesAndNewlines)])
            let results = elements("name", in: reply.text).filter { $0.hasSuffix("_r") }
            #expect(results.count == 1)
            let first = try #require(results.first)
            let name = try #require(BOINCName.parse(result: first))
            #expect(name.jobID == id)
            // The program, as downloaded, is what its signature covers.
            let program = try await client.get("/download/" + name.program)
            #expect(program.status == 200)
            let signature = try #require(elements("file_signature", in: reply.text).first)
            #expect(publicKey.verify(file: program.body, signature: signature + "\n"))
            #expect(elements("md5_cksum", in: reply.text).first == BOINCSigning.md5Hex(program.body))
            #expect(try await client.get("/download/" + name.input(0)).body == input)
            // Its output and stdout come back, each with the grant the reply gave it.
            let grants = elements("xml_signature", in: reply.text)
            #expect(grants == [name.output(0), name.stdout].map(bench.frontEnd.grant.token(for:)))
            #expect(try await client.post("/file_upload_handler", uploadRequest(name.output(0), data: Array("result\n".utf8), grant: grants[0])).status == 200)
            #expect(try await client.post("/file_upload_handler", uploadRequest(name.stdout, data: Array("hi\n".utf8), grant: grants[1])).status == 200)
            let report = try await client.post("/scheduler", schedulerRequest(seconds: 0, holdsKey: true, results: [reportedResult(name.result, stderr: "a warning")]))
            #expect(report.status == 200)
            #expect(elements("result_ack", in: report.text).count == 1)
            #expect(!report.text.contains("<code_sign_key>"), "the key goes only to a client without one")
            let job = try #require(try await bench.store.job(id))
            #expect(job.record.state == .succeeded(leaseID: name.leaseID))
            let result = try Parley_Work_V1_ReportResult(serializedBytes: try #require(job.result))
            #expect(result.outputs.map(\.name) == ["out.txt"])
            #expect(result.outputs.first?.content == Data("result\n".utf8))
            #expect(result.stdoutTail == Data("hi\n".utf8))
            #expect(String(decoding: result.stderrTail, as: UTF8.self).contains("a warning"))
            #expect(result.worker == "boinc:abc123")
            #expect(result.cpuMs == 250 && result.wallMs == 1500)
            // Reported again (the ack was lost): acknowledged again, counted once.
            let again = try await client.post("/scheduler", schedulerRequest(seconds: 0, holdsKey: true, results: [reportedResult(name.result)]))
            #expect(elements("result_ack", in: again.text).count == 1)
            #expect(try await bench.store.counts()["succeeded"] == 1)
            #expect(try await bench.store.job(id)?.result == job.result)
        }
    }

    /// The cap on leases a worker holds ([R-19.2-4]) holds for a BOINC client too: asking
    /// again it gets nothing more, another client still gets work.
    @Test func aClientHoldsNoMoreResultsThanTheCap() async throws {
        let bench = try BOINCBench { $0.maxLeasesPerWorker = 2 }
        defer { bench.remove() }
        for _ in 0..<5 { try await bench.submit(echoSpec(inputs: [])) }
        try await bench.withClient { client in
            func results(_ cpid: String) async throws -> Int {
                let reply = try await client.post("/scheduler", schedulerRequest(cpid: cpid, seconds: 100_000, instances: 4))
                #expect(reply.status == 200)
                return elements("name", in: reply.text).filter { $0.hasSuffix("_r") }.count
            }
            let first = try await results("abc123"), again = try await results("abc123"), other = try await results("def456")
            #expect(first == 2 && again == 0 && other == 2, "\(first), \(again), \(other)")
        }
    }

    @Test func malformedHugeAndNestedRequestsAreRefusedAndChangeNothing() async throws {
        let bench = try BOINCBench { $0.maxRequestBytes = 64 << 10 }
        defer { bench.remove() }
        try await bench.submit(echoSpec())
        let cases: [(String, [UInt8], Int, String)] = [
            ("malformed", Array("<scheduler_request><platform_name>x</platform_name><host_info>".utf8), 400, "not well-formed"),
            ("not XML", Array("hello".utf8), 400, "is not a &lt;scheduler_request&gt;"),
            ("another document", Array("<data_server_request></data_server_request>".utf8), 400, "is not a &lt;scheduler_request&gt;"),
            ("empty", [], 400, "empty"),
            ("huge", Array(schedulerRequest().utf8) + [UInt8](repeating: 0x20, count: 70 << 10), 413, "limit"),
            ("nested without end", Array(("<scheduler_request>" + String(repeating: "<a>", count: 20_000)).utf8), 400, "nests"),
            ("bad number", Array(schedulerRequest().replacingOccurrences(of: "<work_req_seconds>3456.0", with: "<work_req_seconds>lots").utf8), 400, "work_req_seconds"),
            ("no platform", Array(schedulerRequest(platform: "").utf8), 400, "platform"),
            ("no host", Array(schedulerRequest(cpid: "").utf8), 400, "host"),
            ("odd host", Array(schedulerRequest(cpid: "a/b").utf8), 400, "host"),
        ]
        try await bench.withClient { client in
            for (what, body, status, words) in cases {
                let reply = try await client.post("/scheduler", body)
                #expect(reply.status == status, "\(what): \(reply.text)")
                #expect(reply.text.contains("<message priority=\"low\">") && reply.text.contains(words), "\(what): \(reply.text)")
            }
        }
        #expect(try await bench.store.counts() == ["queued": 1, "leased": 0, "succeeded": 0, "failed": 0])
    }

    /// One request takes at most 500 distinct results (and so many bytes of their uploads);
    /// the rest stay unacknowledged, for the client to report again; a name given twice
    /// counts once.
    @Test func aRequestOfThousandsOfResultsIsTakenInPart() async throws {
        let bench = try BOINCBench()
        defer { bench.remove() }
        try await bench.withClient { client in
            let names = (1...600).map { BOINCName(jobID: UInt64($0), leaseID: 1).result }
            let results = (names.prefix(10) + names).map { reportedResult($0) }
            let reply = try await client.post("/scheduler", schedulerRequest(seconds: 0, results: results))
            #expect(reply.status == 200, "\(reply.text)")
            let acks = elements("result_ack", in: reply.text).flatMap { elements("name", in: $0) }
            #expect(acks.count == 500, "\(acks.count) acknowledged")
            #expect(Set(acks) == Set(names.prefix(500)))
        }
    }

    /// Counted before XMLCoder builds its tree: more elements than a request of 10,000
    /// results has, and declarations (entities that expand), which no BOINC client sends.
    @Test func tooManyElementsAndDeclarationsAreRefusedBeforeParsing() async throws {
        let bench = try BOINCBench()
        defer { bench.remove() }
        let cases: [(String, [UInt8], Int, String)] = [
            ("too many elements", Array(("<scheduler_request>" + String(repeating: "<a/>", count: 200_001) + "</scheduler_request>").utf8), 413, "200002 elements"),
            ("entities", Array(("<!DOCTYPE s [<!ENTITY a \"aaaaaaaa\">]>" + schedulerRequest()).utf8), 400, "declares"),
        ]
        try await bench.withClient { client in
            for (what, body, status, words) in cases {
                let reply = try await client.post("/scheduler", body)
                #expect(reply.status == status, "\(what): \(reply.text)")
                #expect(reply.text.contains(words), "\(what): \(reply.text)")
            }
        }
    }

    @Test func reportsOfResultsNeverSentAreAcknowledgedAndStoreNothing() async throws {
        let bench = try BOINCBench()
        defer { bench.remove() }
        let id = try await bench.submit(echoSpec(outputs: []))
        try await bench.withClient { client in
            let reply = try await client.post("/scheduler", schedulerRequest(cpid: "hostA"))
            let name = try #require(elements("name", in: reply.text).first { $0.hasSuffix("_r") }.flatMap(BOINCName.parse(result:)))
            let others = [
                BOINCName(jobID: id, leaseID: name.leaseID).result,          // another host's
                BOINCName(jobID: id, leaseID: name.leaseID + 7).result,      // a lease never handed out
                BOINCName(jobID: id + 100, leaseID: name.leaseID).result,    // no such job
                "wu_3_0",                                                    // not this project's
            ]
            let report = try await client.post("/scheduler", schedulerRequest(cpid: "hostB", seconds: 0, results: others.map { reportedResult($0) }))
            #expect(report.status == 200)
            // Acknowledged (a real client would otherwise resend them forever), each refused.
            #expect(elements("result_ack", in: report.text).count == others.count)
            let messages = report.text.components(separatedBy: "<message priority=\"low\">").dropFirst()
            #expect(messages.count == others.count)
            #expect(messages.allSatisfy { $0.contains("refused") && $0.contains("nothing was stored") }, "\(report.text)")
            #expect(report.text.contains("belongs to worker boinc:hostA"))
            // The job is still hostA's, and hostA's own report counts.
            #expect(try await bench.store.counts()["leased"] == 1)
            let own = try await client.post("/scheduler", schedulerRequest(cpid: "hostA", seconds: 0, results: [reportedResult(name.result)]))
            #expect(elements("result_ack", in: own.text).count == 1)
            #expect(try await bench.store.job(id)?.record.state == .succeeded(leaseID: name.leaseID))
        }
    }

    @Test func uploadsOnlyOfFilesHandedOutAndWithinLimits() async throws {
        let bench = try BOINCBench { $0.maxUploadBytes = 1000 }
        defer { bench.remove() }
        try await bench.submit(echoSpec())
        try await bench.withClient { client in
            let name = try await bench.firstResult(client)
            let never = BOINCName(jobID: name.jobID, leaseID: name.leaseID + 1)
            let grant = bench.frontEnd.grant.token(for: name.output(0))
            func granted(_ file: String, _ data: [UInt8], nbytes: Int? = nil, md5: String? = nil) -> [UInt8] {
                uploadRequest(file, data: data, nbytes: nbytes, md5: md5, grant: bench.frontEnd.grant.token(for: file))
            }
            let refusals: [(String, [UInt8], Int)] = [
                ("no grant", uploadRequest(name.output(0), data: [1, 2, 3]), 403),
                ("another file's grant", uploadRequest(name.output(0), data: [1, 2, 3], grant: bench.frontEnd.grant.token(for: name.stdout)), 403),
                ("a forged grant", uploadRequest(name.output(0), data: [1, 2, 3], grant: String(repeating: "ab", count: 32)), 403),
                ("never handed out", granted(never.output(0), [1, 2, 3]), 403),
                ("no such job", granted(BOINCName(jobID: 99, leaseID: 1).output(0), [1]), 403),
                ("an output the spec lacks", granted(name.output(5), [1]), 403),
                ("the program", granted(name.program, [1]), 403),
                ("not ours", granted("wu_3_0_r0", [1]), 403),
                ("a path", granted("../../etc/passwd", [1]), 400),
                ("oversized", granted(name.output(0), [UInt8](repeating: 7, count: 1001)), 413),
                ("over the HTTP limit", granted(name.output(0), [UInt8](repeating: 7, count: 70_000)), 413),
                ("runs past nbytes", granted(name.output(0), [1, 2, 3], nbytes: 2), 413),
                ("wrong MD5", granted(name.output(0), [1, 2, 3], md5: String(repeating: "0", count: 32)), 400),
                ("not a request", Array("<scheduler_request/>".utf8), 400),
                ("no data", Array("<data_server_request><file_upload><file_info><name>x</name></file_info>".utf8), 400),
                ("malformed header", Array("<data_server_request><file_upload><name>".utf8) + Array("<data>\n".utf8), 400),
                ("nested", Array(("<data_server_request>" + String(repeating: "<a>", count: 10_000)).utf8), 400),
            ]
            for (what, body, status) in refusals {
                let r = try await client.post("/file_upload_handler", body)
                #expect(r.status == status, "\(what): \(r.text)")
                #expect(r.text.contains("<status>-1</status>") && r.text.contains("<message>"), "\(what): \(r.text)")
            }
            #expect(try await bench.frontEnd.uploads.size(name.output(0)) == 0)
            let kept = try FileManager.default.contentsOfDirectory(atPath: bench.directory + "/uploads")
            #expect(kept.isEmpty, "\(kept)")
            // An upload in two parts, resumed where get_file_size says.
            let bytes = Array("0123456789".utf8)
            #expect(try await client.post("/file_upload_handler", sizeRequest(name.output(0))).text.contains("<file_size>0</file_size>"))
            let first = Array(uploadRequest(name.output(0), data: bytes, grant: grant).dropLast(6))
            let partial = try await client.post("/file_upload_handler", first)
            #expect(partial.status == 200 && partial.text.contains("<status>1</status>") && partial.text.contains("4 of its 10 bytes came"),
                    "a body that ends before its file: kept, and a transient error: \(partial.text)")
            #expect(try await client.post("/file_upload_handler", sizeRequest(name.output(0))).text.contains("<file_size>4</file_size>"))
            #expect(try await client.post("/file_upload_handler", uploadRequest(name.output(0), data: Array(bytes[4...]), nbytes: 10, offset: 4, md5: BOINCSigning.md5Hex(bytes), grant: grant)).status == 200)
            #expect(try await bench.frontEnd.uploads.read(name.output(0), limit: 100) == bytes)
            // Whole now: other bytes do not replace it.
            #expect(try await client.post("/file_upload_handler", uploadRequest(name.output(0), data: Array("9876543210".utf8), grant: grant)).status == 409)
            // Downloads of what was never handed out.
            #expect(try await client.get("/download/" + never.program).status == 404)
            #expect(try await client.get("/download/nothing").status == 404)
            #expect(try await client.get("/download/" + name.output(0)).status == 404)
        }
    }

    /// A client that finishes after its lease expired and the job failed for it (its one
    /// attempt) still uploads and reports: the late success counts, as a native worker's does
    /// (LeaseRules.report). Once the job has succeeded, uploads for it are refused.
    @Test func aLateSuccessAfterTheLeaseExpiredIsKept() async throws {
        let bench = try BOINCBench()
        defer { bench.remove() }
        let id = try await bench.submit(echoSpec(), maxAttempts: 1)
        try await bench.withClient { client in
            let name = try await bench.firstResult(client)
            #expect(try await bench.store.expireLeases(now: WorkService.now() + 10 * 86_400 * 1_000_000_000) == 1)
            guard case .failed = try #require(try await bench.store.job(id)).record.state else {
                Issue.record("the job did not fail when its only lease expired")
                return
            }
            func upload(_ file: String, _ text: String) async throws -> Int { try await bench.upload(file, text, client) }
            #expect(try await upload(name.output(0), "late\n") == 200)
            #expect(try await upload(name.stdout, "hi\n") == 200)
            let report = try await client.post("/scheduler", schedulerRequest(seconds: 0, holdsKey: true, results: [reportedResult(name.result)]))
            #expect(elements("result_ack", in: report.text).count == 1)
            let job = try #require(try await bench.store.job(id))
            #expect(job.record.state == .succeeded(leaseID: name.leaseID))
            let result = try Parley_Work_V1_ReportResult(serializedBytes: try #require(job.result))
            #expect(result.outputs.first?.content == Data("late\n".utf8))
            #expect(try await upload(name.output(0) , "again\n") == 403, "the job has succeeded")
        }
    }

    /// Uploads no report can use go at the sweep: those of a lease whose job another lease
    /// completed, and any older than the retention (a client that never reports); a live
    /// lease's upload stays, and so does anything not named as this project's uploads are.
    @Test func uploadsNoReportCanUseAreSwept() async throws {
        let bench = try BOINCBench()
        defer { bench.remove() }
        let first = try await bench.submit(echoSpec(), maxAttempts: 2)
        let second = try await bench.submit(echoSpec(), maxAttempts: 2)
        try await bench.withClient { client in
            func upload(_ file: String) async throws -> Int { try await bench.upload(file, "out\n", client) }
            // Host A takes both jobs, uploads for both, and never reports.
            let a = try await client.post("/scheduler", schedulerRequest(cpid: "aaa", instances: 2))
            let leased = elements("name", in: a.text).filter { $0.hasSuffix("_r") }.compactMap(BOINCName.parse(result:))
            let oldOne = try #require(leased.first { $0.jobID == first })
            let kept = try #require(leased.first { $0.jobID == second })
            #expect(try await upload(oldOne.output(0)) == 200)
            #expect(try await upload(kept.output(0)) == 200)
            // Its leases expire; host B takes the first job again and completes it.
            #expect(try await bench.store.expireLeases(now: WorkService.now() + 10 * 86_400 * 1_000_000_000) == 2)
            let b = try await client.post("/scheduler", schedulerRequest(cpid: "bbb", instances: 2))
            let redo = try #require(elements("name", in: b.text).filter { $0.hasSuffix("_r") }.compactMap(BOINCName.parse(result:)).first { $0.jobID == first })
            #expect(try await upload(redo.output(0)) == 200)
            #expect(try await upload(redo.stdout) == 200)
            let report = try await client.post("/scheduler", schedulerRequest(cpid: "bbb", seconds: 0, holdsKey: true, results: [reportedResult(redo.result)]))
            #expect(elements("result_ack", in: report.text).count == 1)
            // Not this project's names: never touched (the directory may hold other things).
            _ = FileManager.default.createFile(atPath: bench.directory + "/uploads/not_ours", contents: Data("x".utf8))
            try FileManager.default.createDirectory(atPath: bench.directory + "/uploads/" + BOINCName(jobID: 99, leaseID: 1).output(0), withIntermediateDirectories: true)
            // The first job succeeded by another lease: swept. The second job's expired lease
            // may still report a late success: kept, until the retention.
            #expect(try await bench.frontEnd.sweepUploads() == 1)
            #expect(try await bench.frontEnd.uploads.size(oldOne.output(0)) == 0)
            #expect(try await bench.frontEnd.uploads.size(kept.output(0)) == 4)
            #expect(try await bench.frontEnd.sweepUploads(now: Date() + 8 * 86_400) == 1)
            let left = try FileManager.default.contentsOfDirectory(atPath: bench.directory + "/uploads").sorted()
            #expect(left == ["not_ours", BOINCName(jobID: 99, leaseID: 1).output(0)], "\(left)")
        }
    }

    @Test func aJobWhoseSignatureDoesNotVerifyIsNotHandedOut() async throws {
        let bench = try BOINCBench()
        defer { bench.remove() }
        let id = try await bench.submit(echoSpec(), signer: WorkSigning.PrivateKey(), maxAttempts: 1)
        let reply = try await bench.withClient { try await $0.post("/scheduler", schedulerRequest()) }
        #expect(!reply.text.contains("<result>"))
        let job = try #require(try await bench.store.job(id))
        guard case .failed(let reasons) = job.record.state else { Issue.record("job \(job.record.state)"); return }
        #expect(reasons.first?.contains("bad signature") == true, "\(reasons)")
    }

    @Test func jobsGoToClientsRunningTheirApplication() async throws {
        let bench = try BOINCBench { $0.apps = ["blender"] }
        defer { bench.remove() }
        let other = try await bench.submit(echoSpec(app: "windows_x86_64"))
        let mine = try await bench.submit(echoSpec(app: "x86_64-pc-linux-gnu"))
        let blender = try await bench.submit(echoSpec(app: "blender"))
        let reply = try await bench.withClient { try await $0.post("/scheduler", schedulerRequest(instances: 4)) }
        let handed = Set(elements("name", in: reply.text).compactMap(BOINCName.parse(result:)).map(\.jobID))
        #expect(handed == [mine, blender])
        #expect(try await bench.store.job(other)?.record.state == .queued)
        #expect(elements("app_name", in: reply.text).contains("blender"))
    }

    @Test func withAKeyringOnlyItsEntitiesGetWork() async throws {
        let entity = ParleyKeyring.Entity(name: "worker.boinc-1", key: Array(repeating: 7, count: 32), caps: ["work.worker"], created: Date())
        let revoked = ParleyKeyring.Entity(name: "worker.gone", key: Array(repeating: 9, count: 32), caps: ["work.worker"], created: Date(), revoked: true)
        let bench = try BOINCBench(keyring: ParleyKeyring(entities: [entity, revoked]))
        defer { bench.remove() }
        try await bench.submit(echoSpec())
        try await bench.withClient { client in
            for auth in ["", "nobody", revoked.key, String(entity.key.dropLast())] {
                let reply = try await client.post("/scheduler", schedulerRequest(authenticator: auth))
                #expect(reply.status == 200)
                #expect(reply.text.contains("<message priority=\"notice\">Invalid or missing account key"), "\(auth)")
                #expect(reply.text.contains("<request_delay>3600</request_delay>"))
                #expect(!reply.text.contains("<result>"))
            }
            #expect(try await bench.store.counts()["queued"] == 1)
            let reply = try await client.post("/scheduler", schedulerRequest(authenticator: entity.key))
            #expect(elements("name", in: reply.text).contains { $0.hasSuffix("_r") })
        }
        let leased = try #require(try await bench.store.job(1))
        guard case .leased(let lease) = leased.record.state else { Issue.record("\(leased.record.state)"); return }
        #expect(lease.worker == "boinc:worker.boinc-1:abc123")
    }

    @Test func anOldClientIsToldToUpgradeAndGetsNoWork() async throws {
        let bench = try BOINCBench()
        defer { bench.remove() }
        try await bench.submit(echoSpec())
        let reply = try await bench.withClient { try await $0.post("/scheduler", schedulerRequest(major: 6)) }
        #expect(reply.text.contains("<message priority=\"notice\">This project needs BOINC 7 or later"))
        #expect(!reply.text.contains("<result>"))
        #expect(try await bench.store.counts()["queued"] == 1)
    }

    @Test func aWindowsClientGetsNoShellPrograms() async throws {
        let bench = try BOINCBench()
        defer { bench.remove() }
        try await bench.submit(echoSpec())
        let reply = try await bench.withClient { try await $0.post("/scheduler", schedulerRequest(platform: "windows_x86_64")) }
        #expect(reply.text.contains("there is no work for platform windows_x86_64"))
        #expect(!reply.text.contains("<result>"))
        #expect(try await bench.store.counts()["queued"] == 1)
    }

    @Test func aFailedResultIsRecordedWithItsReason() async throws {
        let bench = try BOINCBench()
        defer { bench.remove() }
        let id = try await bench.submit(echoSpec(), maxAttempts: 1)
        try await bench.withClient { client in
            let name = try await bench.firstResult(client)
            let report = try await client.post("/scheduler", schedulerRequest(seconds: 0, results: [reportedResult(name.result, exitStatus: 3, state: 3, stderr: "it broke")]))
            #expect(elements("result_ack", in: report.text).count == 1)
        }
        let job = try #require(try await bench.store.job(id))
        guard case .failed(let reasons) = job.record.state else { Issue.record("\(job.record.state)"); return }
        #expect(reasons.first?.contains("exit status 3") == true && reasons.first?.contains("it broke") == true, "\(reasons)")
    }

    @Test func theProgramRunsTheJob() async throws {
        // The generated program, run here by sh in a directory laid out as a BOINC slot.
        let dir = testScratchPath("parley-boinc-slot-\(UUID().uuidString)")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var spec = echoSpec(outputs: ["sub/out.txt"], inputs: [("a/in.txt", Array("abc\n".utf8))])
        spec.argv = ["mkdir -p sub && cat a/in.txt > sub/out.txt && echo \"$GREETING it's\" && echo err >&2 && exit 3"]
        spec.env = ["GREETING": "hello", "PATH": "/usr/bin:/bin"]
        let program = BOINCJobs.script(jobID: 1, leaseID: 2, spec: spec, maxOutput: 5)
        _ = FileManager.default.createFile(atPath: dir + "/job.sh", contents: Data(program))
        _ = FileManager.default.createFile(atPath: dir + "/parley_in0", contents: Data("abc\n".utf8))
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["job.sh"]
        process.currentDirectoryURL = URL(fileURLWithPath: dir)
        process.standardError = FileHandle.nullDevice
        try process.run()
        process.waitUntilExit()
        #expect(process.terminationStatus == 3)
        #expect(FileManager.default.contents(atPath: dir + "/boinc_finish_called") == Data("3\n".utf8))
        #expect(FileManager.default.contents(atPath: dir + "/parley_out0") == Data("abc\n".utf8))
        #expect(FileManager.default.contents(atPath: dir + "/parley_stdout") == Data("t's\n".utf8.suffix(5)) || FileManager.default.contents(atPath: dir + "/parley_stdout") == Data(" it's\n".utf8.suffix(5)))
        // An input that does not match its signed SHA-256 stops the job before it runs.
        _ = FileManager.default.createFile(atPath: dir + "/parley_in0", contents: Data("abd\n".utf8))
        let again = Process()
        again.executableURL = URL(fileURLWithPath: "/bin/sh")
        again.arguments = ["job.sh"]
        again.currentDirectoryURL = URL(fileURLWithPath: dir)
        again.standardError = FileHandle.nullDevice
        try again.run()
        again.waitUntilExit()
        #expect(again.terminationStatus == 197)
    }
}

/// A job store that fails every call, as one whose database went away does.
struct FailingStore: WorkStore {
    struct Down: Error {}
    func submit(_ jobs: [NewJob], now: Int64) async throws -> [UInt64] { throw Down() }
    func claim(_ requests: [ClaimRequest], now: Int64, leaseDuration: Int64) async throws -> [[ClaimedJob]] { throw Down() }
    func report(_ reports: [ReportInput], now: Int64) async throws -> [ReportVerdict] { throw Down() }
    func expireLeases(now: Int64) async throws -> Int { throw Down() }
    func handBack(jobID: UInt64, leaseID: UInt64, worker: String) async throws { throw Down() }
    func renew(jobID: UInt64, leaseID: UInt64, worker: String, now: Int64, leaseDuration: Int64, longest: Int64?) async throws -> Lease { throw Down() }
    func counts() async throws -> [String: Int] { throw Down() }
    func job(_ id: UInt64) async throws -> (record: JobRecord, result: [UInt8]?)? { throw Down() }
    func spec(_ id: UInt64) async throws -> [UInt8]? { throw Down() }
    func appliedMigrations() async throws -> [String] { throw Down() }
}

@Suite struct BOINCStoreFailureTests {
    @Test func aFailingStoreGets503AndTheClientRetriesLater() async throws {
        let dir = testScratchPath("parley-boinc-down-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let key = try BOINCSigning.PrivateKey(text: String(decoding: try boincFixture("test_code_sign_private"), as: UTF8.self))
        var logger = Logger(label: "boinc-test")
        logger.logLevel = .critical
        let frontEnd = try BOINCFrontEnd(configuration: .init(url: BOINCBench.base, key: key, uploadDirectory: dir), store: FailingStore(), logger: logger)
        let name = BOINCName(jobID: 1, leaseID: 1)
        try await Application(router: BOINCHTTP.router(frontEnd)).test(.router) { client in
            let work = try await client.post("/scheduler", schedulerRequest())
            #expect(work.status == 503 && work.text.contains("the job store failed"), "\(work.text)")
            let report = try await client.post("/scheduler", schedulerRequest(seconds: 0, results: [reportedResult(name.result)]))
            #expect(report.status == 503 && !report.text.contains("<result_ack>"), "no ack: the client reports it again later")
            let upload = try await client.post("/file_upload_handler", uploadRequest(name.output(0), data: [1]))
            #expect(upload.status == 503 && upload.text.contains("<status>1</status>"), "a transient error: \(upload.text)")
            #expect(try await client.get("/download/" + name.program).status == 503)
            // What needs no store still works.
            #expect(try await client.get("/").status == 200)
            let config = try await client.get("/get_project_config.php")
            #expect(config.status == 200 && String(decoding: config.body, as: UTF8.self).contains("<master_url>\(BOINCBench.base)</master_url>"))
        }
    }
}

/// The HTTP layer's limits on what clients may hold: connections at once, a connection's
/// lifetime (a request trickled a byte at a time, each within the idle timeout), and request
/// bodies held in memory together.
@Suite struct BOINCHTTPLimitTests {
    typealias Socket = LoopbackSocket


    @Test func connectionsBeyondTheCapAndPastTheirLifetimeAreClosed() async throws {
        let bench = try BOINCBench {
            $0.maxConnections = 1
            $0.connectionLifetime = .seconds(1)
        }
        defer { bench.remove() }
        var quiet = Logger(label: "boinc-http")
        quiet.logLevel = .critical
        let (ports, continuation) = AsyncStream<Int>.makeStream()
        let app = BOINCHTTP.application(host: "127.0.0.1", port: 0, frontEnd: bench.frontEnd, logger: quiet, onRunning: { continuation.yield($0) })
        let server = Task { try await app.runService() }
        defer { server.cancel() }
        var iterator = ports.makeAsyncIterator()
        let port = try #require(await iterator.next())
        // An upload trickled: its connection closes at the end of its lifetime.
        let slow = try Socket(port: port)
        slow.send("POST /file_upload_handler HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n0123456789")
        try await Task.sleep(for: .milliseconds(200))
        // Beyond the cap (one connection): closed at once, unanswered.
        let second = try Socket(port: port)
        second.send("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        let started = ContinuousClock.now
        let refused = await onOwnThread { second.untilClosed() }
        #expect(refused.closed && refused.text.isEmpty, "\(refused)")
        let ended = await onOwnThread { slow.untilClosed() }
        #expect(ended.closed)
        #expect(ContinuousClock.now - started < .seconds(15), "closed at its lifetime (1 s), not the idle timeout")
        // Room again: a request is answered.
        let answered = try await self.firstAnswer(port: port)
        #expect(answered.hasPrefix("HTTP/1.1 200"), "\(answered)")
    }

    /// `GET /` from 127.0.0.1 until it is answered 200, at most 50 tries; the last answer.
    func firstAnswer(port: Int) async throws -> String {
        try await firstLoopbackAnswer(port: port, request: "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    }

    /// One peer cannot take every connection (nor, through them, the body budget): past
    /// `maxConnectionsPerPeer` its connections are closed as they are accepted, and another
    /// peer is still served. Before, only the total was capped: one host trickling bodies
    /// on 64 connections had every other client answered 503, or none answered at all.
    @Test func onePeerCannotTakeEveryConnection() async throws {
        let bench = try BOINCBench {
            $0.maxConnectionsPerPeer = 2
            $0.maxConnections = 100
        }
        defer { bench.remove() }
        let (port, server) = try await self.serve(bench)
        defer { server.cancel() }
        // Two bodies trickled from 127.0.0.1: its whole allowance.
        var held: [Socket] = []
        for _ in 0..<2 {
            let slow = try Socket(port: port)
            slow.send("POST /file_upload_handler HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n0123456789")
            held.append(slow)
        }
        try await Task.sleep(for: .milliseconds(200))
        let third = try Socket(port: port)
        third.send("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        let refused = await onOwnThread { third.untilClosed() }
        #expect(refused.closed && refused.text.isEmpty, "a third connection from one peer: \(refused)")
        let other = try Socket(port: port, from: "127.0.0.2")
        other.send("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        let served = await onOwnThread { other.untilClosed() }
        #expect(served.text.hasPrefix("HTTP/1.1 200"), "another peer: \(served)")
        // Room for the first peer again once one of its connections has gone.
        held.removeFirst()
        let answered = try await self.firstAnswer(port: port)
        #expect(answered.hasPrefix("HTTP/1.1 200"), "\(answered)")
        #expect(held.count == 1)
    }

    @Test func peersAreCountedByAddressAndByIPv6Prefix() throws {
        #expect(HTTPPeerCounts.key(try SocketAddress(ipAddress: "192.0.2.7", port: 1)) == "192.0.2.7")
        #expect(HTTPPeerCounts.key(try SocketAddress(ipAddress: "2001:db8:1:2:3:4:5:6", port: 1)) == "20010db800010002/64")
        #expect(HTTPPeerCounts.key(try SocketAddress(ipAddress: "2001:db8:1:2:ffff::1", port: 1)) == "20010db800010002/64")
        #expect(HTTPPeerCounts.key(try SocketAddress(ipAddress: "::ffff:192.0.2.7", port: 1)) == "192.0.2.7")
        let counts = HTTPPeerCounts(limit: 1)
        #expect(counts.take("a") && !counts.take("a") && counts.take("b"))
        counts.give("a")
        #expect(counts.take("a"))
    }

    /// Bodies held together past the budget: the request that would pass it gets 503 (an
    /// upload's transient status 1, which the client retries later); one within it is served.
    @Test func bodiesPastTheBudgetGet503() async throws {
        let bench = try BOINCBench { $0.maxBufferedBodyBytes = 1000 }
        defer { bench.remove() }
        let name = BOINCName(jobID: 1, leaseID: 1)
        try await bench.withClient { client in
            let big = try await client.post("/file_upload_handler", uploadRequest(name.output(0), data: [UInt8](repeating: 1, count: 2000)))
            #expect(big.status == 503 && big.text.contains("<status>1</status>"), "\(big.text)")
            let small = try await client.post("/file_upload_handler", uploadRequest(name.output(0), data: [1]))
            #expect(small.status == 403, "within the budget it is read (and refused: no lease): \(small.text)")
        }
    }

    /// Starts the front end's HTTP server on a free loopback port; its port and the task
    /// running it (cancel to stop).
    func serve(_ bench: BOINCBench) async throws -> (port: Int, server: Task<Void, any Error>) {
        var quiet = Logger(label: "boinc-http")
        quiet.logLevel = .critical
        let (ports, continuation) = AsyncStream<Int>.makeStream()
        let app = BOINCHTTP.application(host: "127.0.0.1", port: 0, frontEnd: bench.frontEnd, logger: quiet, onRunning: { continuation.yield($0) })
        let server = Task { try await app.runService() }
        var iterator = ports.makeAsyncIterator()
        guard let port = await iterator.next() else {
            server.cancel()
            throw CancellationError()
        }
        return (port, server)
    }

    /// An upload whose connection is lost part way keeps the bytes that came (they are
    /// written as they come), and the client resumes it where `<get_file_size>` says.
    @Test func anUploadCutPartWayKeepsItsBytesAndResumes() async throws {
        let bench = try BOINCBench()
        defer { bench.remove() }
        try await bench.submit(echoSpec())
        let name = try await bench.withClient { try await bench.firstResult($0) }
        let file = name.output(0)
        let grant = bench.frontEnd.grant.token(for: file)
        let bytes = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 9) }
        let (port, server) = try await self.serve(bench)
        defer { server.cancel() }
        let request = uploadRequest(file, data: Array(bytes[..<200_000]), nbytes: bytes.count, md5: BOINCSigning.md5Hex(bytes), grant: grant)
        let cut = try Socket(port: port)
        cut.send("POST /file_upload_handler HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: \(request.count + 100_000)\r\n\r\n")
        cut.send(request)
        try await Task.sleep(for: .milliseconds(100))
        shutdown(cut.fd, Int32(SHUT_RDWR))
        var kept: Int64 = -1
        for _ in 0..<200 {
            kept = try await bench.frontEnd.uploads.size(file)
            if kept == 200_000 { break }
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(kept == 200_000, "the bytes that came before the connection was lost are kept")
        let rest = uploadRequest(file, data: Array(bytes[200_000...]), nbytes: bytes.count, offset: 200_000, md5: BOINCSigning.md5Hex(bytes), grant: grant)
        let status = try await bench.withClient { try await $0.post("/file_upload_handler", rest).status }
        #expect(status == 200)
        #expect(try await bench.frontEnd.uploads.read(file, limit: 1 << 20) == bytes)
    }

    /// A body's bytes count against the budget as they arrive: a client that announces much
    /// and trickles holds only what it sent, so others are still served.
    @Test func aTrickledBodyHoldsOnlyWhatItSent() async throws {
        let bench = try BOINCBench { $0.maxBufferedBodyBytes = 2000 }
        defer { bench.remove() }
        let (port, server) = try await self.serve(bench)
        defer { server.cancel() }
        let slow = try Socket(port: port)
        slow.send("POST /scheduler HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1900\r\n\r\n<scheduler_request>")
        try await Task.sleep(for: .milliseconds(200))
        let body = schedulerRequest(seconds: 0)
        #expect(body.utf8.count < 1000)
        let other = try Socket(port: port)
        other.send("POST /scheduler HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n" + body)
        let answer = await onOwnThread { other.untilClosed() }
        #expect(answer.text.hasPrefix("HTTP/1.1 200"), "\(answer.text.prefix(300))")
        #expect(answer.text.contains("<scheduler_reply>"), "\(answer.text.prefix(300))")
    }

    /// An upload read in pieces: bytes past the budget end it with 503 keeping what was
    /// written (the client resumes); bytes past `<nbytes>` end it with 413 and cut off what
    /// this request wrote; a second upload of the file begun while one is under way takes
    /// it over (the first's next write is refused).
    @Test func anUploadReadInPieces() async throws {
        let bench = try BOINCBench {
            $0.uploadBatchBytes = 1000
            $0.maxUploadBytes = 100_000
        }
        defer { bench.remove() }
        try await bench.submit(echoSpec())
        let name = try await bench.withClient { try await bench.firstResult($0) }
        let file = name.output(0)
        let grant = bench.frontEnd.grant.token(for: file)
        let bytes = (0..<8000).map { UInt8(truncatingIfNeeded: $0 &* 13) }
        func pieces(offset: Int, _ sizes: [Int]) -> AsyncStream<ByteBuffer> {
            let (stream, continuation) = AsyncStream.makeStream(of: ByteBuffer.self)
            continuation.yield(ByteBuffer(bytes: uploadRequest(file, data: [], nbytes: bytes.count, offset: offset, md5: BOINCSigning.md5Hex(bytes), grant: grant)))
            var at = offset
            for size in sizes {
                continuation.yield(ByteBuffer(bytes: bytes[at..<min(at + size, bytes.count)] + (at + size > bytes.count ? [1, 2, 3] : [])))
                at += size
            }
            continuation.finish()
            return stream
        }
        // 800 bytes held (under a batch), then 800 more: past the budget of 1,200. What came
        // is kept.
        let small = HTTPAllowance(1200)
        let busy = await bench.frontEnd.upload(chunks: pieces(offset: 0, [800, 800, 800]), budget: small)
        #expect(busy.status == 503 && String(decoding: busy.body, as: UTF8.self).contains("<status>1</status>"))
        #expect(try await bench.frontEnd.uploads.size(file) == 800)
        #expect(small.take(1200), "all given back")
        // From 800: 5,000 written (batches of 1,000 or more), then bytes past <nbytes>: 413,
        // what this request wrote cut off again.
        let budget = HTTPAllowance(4000)
        let past = await bench.frontEnd.upload(chunks: pieces(offset: 800, [1000, 1000, 1500, 1500, 2300]), budget: budget)
        #expect(past.status == 413, "\(String(decoding: past.body, as: UTF8.self))")
        #expect(try await bench.frontEnd.uploads.size(file) == 800, "what this request wrote is cut off")
        // Two uploads of the file at once: the later one's begin takes it over.
        guard case .open(var first) = try await bench.frontEnd.uploads.begin(file, offset: 800, total: 8000, md5: BOINCSigning.md5Hex(bytes)),
              case .open(var second) = try await bench.frontEnd.uploads.begin(file, offset: 800, total: 8000, md5: BOINCSigning.md5Hex(bytes)) else {
            Issue.record("an upload could not begin")
            return
        }
        #expect(try await bench.frontEnd.uploads.append(&first, [9, 9, 9])?.status == 409)
        #expect(try await bench.frontEnd.uploads.append(&second, Array(bytes[800...])) == nil)
        #expect((try? await bench.frontEnd.uploads.finish(second).get()) != nil)
        #expect(try await bench.frontEnd.uploads.read(file, limit: 100_000) == bytes)
        #expect(budget.take(4000), "all given back")
    }
}
