import Crypto
import Foundation
import ParleyWork
import SwiftProtobuf
import Testing
import XMLCoder
@testable import ParleyWorkBOINC
import ParleyTestSupport

/// Files under Tests/ParleyBOINCTests/Fixtures: requests a real boinc 7.20.5 client sent, a
/// test key, and the research's example request.
func boincFixture(_ name: String, filePath: String = #filePath) throws -> [UInt8] {
    let path = URL(fileURLWithPath: filePath).deletingLastPathComponent().appendingPathComponent("Fixtures/" + name).path
    guard let data = FileManager.default.contents(atPath: path) else { throw BOINCTestFailure("no fixture \(path)") }
    return Array(data)
}

struct BOINCTestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

@Suite struct BOINCKeyTests {
    /// A signature computed once with /work/shared/research/boinc/boincsign.py (Python, big
    /// integers, independent of BoringSSL) over "#!/bin/sh\necho hello\n" with the test key.
    static let knownSignature = """
        531a003cbdaee280486afe3c82ba5493110047b5e8d3941c6606514be870951f
        2ce3d645ca2870670fd0af3c4161b282d54960431e9f9d75c660781cd93481d4
        d64dd147de12df7b5bc7861d0fdeb5f2a73fe09ba5bed3d67ae84336d86200d3
        b98695814710db3dd81137a9f8dcbba22fa7c46ad33139b8af16fc0ca325bec1
        .

        """
    static let program = Array("#!/bin/sh\necho hello\n".utf8)

    @Test func textFormatRoundTrips() throws {
        let text = String(decoding: try boincFixture("test_code_sign_private"), as: UTF8.self)
        let key = try BOINCSigning.PrivateKey(text: text)
        #expect(key.bits == 1024)
        #expect(key.text == text)
        let publicText = String(decoding: try boincFixture("test_code_sign_public"), as: UTF8.self)
        #expect(key.publicKey.text == publicText)
        #expect(try BOINCSigning.PublicKey(text: publicText) == key.publicKey)
        // 1024 bits, 22 lines of 32 bytes for the private body, 8 for the public, then ".".
        #expect(text.split(separator: "\n").count == 1 + 22 + 1)
        #expect(publicText.split(separator: "\n").count == 1 + 8 + 1)
    }

    @Test func signatureEqualsTheKnownVector() throws {
        let key = try BOINCSigning.PrivateKey(text: String(decoding: try boincFixture("test_code_sign_private"), as: UTF8.self))
        #expect(BOINCSigning.md5Hex(Self.program) == "d604a220708aa59433ba410986cd4ffa")
        #expect(try key.signature(ofFile: Self.program) == Self.knownSignature)
        #expect(key.publicKey.verify(file: Self.program, signature: Self.knownSignature))
        #expect(!key.publicKey.verify(file: Self.program + [0x0A], signature: Self.knownSignature))
    }

    @Test func newKeysSignAndOtherKeysDoNotVerify() throws {
        let a = try BOINCSigning.PrivateKey(), b = try BOINCSigning.PrivateKey()
        let signature = try a.signature(ofFile: Self.program)
        #expect(a.publicKey.verify(file: Self.program, signature: signature))
        #expect(!b.publicKey.verify(file: Self.program, signature: signature))
        #expect(try BOINCSigning.PrivateKey(text: a.text) == a)
    }

    @Test func keyFilesAreWrittenPrivateAndReadBack() throws {
        let dir = testScratchPath("parley-boinc-keys-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let key = try BOINCSigning.PrivateKey()
        try BOINCSigning.writeKeyPair(key, directory: dir)
        #expect(try BOINCSigning.readPrivateKey(dir + "/code_sign_private") == key)
        let mode = try FileManager.default.attributesOfItem(atPath: dir + "/code_sign_private")[.posixPermissions] as? NSNumber
        #expect(mode?.intValue == 0o600)
        #expect(throws: BOINCKeyError.self) { try BOINCSigning.writeKeyPair(key, directory: dir) }
        try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: dir + "/code_sign_private")
        #expect(throws: BOINCKeyError.self) { try BOINCSigning.readPrivateKey(dir + "/code_sign_private") }
    }

    @Test func malformedKeyTextIsRefused() {
        for text in ["", "1024\n", "2048\n00\n.\n", "1024\nzz\n.\n", "1024\n00\n.\n", "abc\n00\n.\n"] {
            #expect(throws: BOINCKeyError.self) { try BOINCSigning.PrivateKey(text: text) }
            #expect(throws: BOINCKeyError.self) { try BOINCSigning.PublicKey(text: text) }
        }
        #expect(BOINCKeyText.parseHex("abc") == nil)
        #expect(BOINCKeyText.parseHex("0a0b\n.") == [0x0A, 0x0B])
    }
}

@Suite struct BOINCXMLTests {
    @Test func parsesTheResearchExampleRequest() throws {
        let request = try BOINCScheduling.read(try boincFixture("sched_request_example.xml"), maxBytes: 1 << 20, maxDepth: 32).get()
        #expect(request.authenticator == "other_auth_xyz")
        #expect(request.platformName == "x86_64-pc-linux-gnu")
        #expect(request.hostInfo?.hostCpid == "93f16688a48d53cd65d23a42ff9efb8b")
        #expect(request.hostInfo?.pNcpus == 2)
        #expect(request.workReqSeconds == 3456)
        #expect(request.cpuReqInstances == 2)
        #expect(request.coreClientMajorVersion == 7 && request.coreClientMinorVersion == 20 && request.coreClientRelease == 5)
        #expect(request.codeSignKey == nil)
        #expect(request.results.isEmpty)
        #expect(request.secondsWanted == 3456)
    }

    @Test func parsesARealReport() throws {
        let request = try BOINCScheduling.read(try boincFixture("sched_request_report.xml"), maxBytes: 1 << 20, maxDepth: 32).get()
        #expect(request.codeSignKey?.hasPrefix("1024\n") == true)
        let result = try #require(request.results.first)
        #expect(request.results.count == 1)
        #expect(result.name == "parley_j2_l2_r")
        #expect(result.exitStatus == 0 && result.state == 5)
        #expect(String(decoding: BOINCJobs.stderr(of: result.stderrOut), as: UTF8.self) == "to-stderr\n\n")
        #expect(result.fileInfos.map(\.name) == ["parley_j2_l2_out0", "parley_j2_l2_stdout"])
        #expect(result.fileInfos.first?.nbytes == 9004)
        #expect(BOINCScheduling.succeeded(result))
        #expect(BOINCName.parse(result: result.name) == BOINCName(jobID: 2, leaseID: 2))
    }

    @Test func aBadSignatureReportSaysMinus120() throws {
        let request = try BOINCScheduling.read(try boincFixture("sched_request_report_bad_signature.xml"), maxBytes: 1 << 20, maxDepth: 32).get()
        let result = try #require(request.results.first)
        #expect(result.exitStatus == -186 && result.state == 1)
        #expect(!BOINCScheduling.succeeded(result))
        let why = BOINCScheduling.describeFailure(result)
        #expect(why.contains("-120"), "\(why)")
        #expect(why.contains("bad signature"), "\(why)")
        #expect(why.contains("parley_j3_l3.sh"), "\(why)")
    }

    @Test func replyEncodingIsWhatTheClientParses() throws {
        var reply = BOINCSchedulerReply(projectName: "P & Q")
        reply.requestDelay = 7
        reply.messages = [.init(priority: "notice", "hello <you>")]
        reply.resultAcks = ["parley_j1_l1_r"]
        var info = BOINCSchedulerReply.FileInfo(name: "f.sh")
        info.url = "http://h/download/f.sh"
        info.executable = true
        info.fileSignature = "00\n.\n"
        info.nbytes = 12
        reply.fileInfos = [info]
        reply.workunits = [.init(name: "wu", appName: "a", versionNum: 1, rscFpopsEst: 6e10, rscFpopsBound: 1e13, rscMemoryBound: 1e8, rscDiskBound: 1e9,
                                 fileRefs: [.init(fileName: "in", openName: "parley_in0", copyFile: true)])]
        let text = String(decoding: try reply.xml(), as: UTF8.self)
        #expect(text.hasPrefix("<scheduler_reply>"))
        #expect(!text.contains("<?xml"))
        #expect(!text.contains("/>"), "no empty element: BOINC's parser misreads `<tag />`")
        #expect(text.contains("<message priority=\"notice\">hello &lt;you&gt;</message>"))
        #expect(text.contains("<project_name>P &amp; Q</project_name>"))
        #expect(text.contains("<request_delay>7</request_delay>"))
        #expect(text.contains("<executable>1</executable>"))
        #expect(text.contains("<copy_file>1</copy_file>"))
        #expect(text.contains("<rsc_fpops_est>60000000000</rsc_fpops_est>"))
        #expect(text.contains("<result_ack>\n    <name>parley_j1_l1_r</name>\n  </result_ack>"))
        #expect(text.contains("<file_signature>\n00\n.\n</file_signature>"))
        // The nucleus comes first, acks last.
        let order = ["<scheduler_version>", "<project_name>", "<message", "<request_delay>", "<file_info>", "<workunit>", "<result_ack>"]
        let positions = order.map { text.range(of: $0)?.lowerBound }
        #expect(positions.allSatisfy { $0 != nil })
        #expect(positions.compactMap { $0 } == positions.compactMap { $0 }.sorted())
    }

    @Test func parsesARealUploadRequest() throws {
        // As the client sent it: the header left open, then "<data>\n" and the 3 bytes.
        let body = try boincFixture("upload_request.txt")
        let request = try BOINCUpload.read(body, maxHeaderBytes: 64 << 10).get()
        #expect(request.fileName == "parley_j1_l1_out0")
        guard case .data(let offset, let nbytes, let md5, let grant, let data) = request.kind else { Issue.record("\(request.kind)"); return }
        #expect(offset == 0 && nbytes == 3 && md5 == "764efa883dda1e11db47671c4a3bbd9e")
        // The capture was made with a placeholder in the reply's <xml_signature>: sent back as given.
        #expect(grant == "EXPERIMENT0123456789abcdef")
        #expect(data == Array("hi\n".utf8))
        let size = try BOINCUpload.read(Array(sizeRequest("parley_j1_l1_out0").utf8), maxHeaderBytes: 1 << 10).get()
        #expect(size == .init(fileName: "parley_j1_l1_out0", kind: .size))
    }

    @Test func uploadGrantsAreTiedToTheFileAndTheKey() throws {
        let key = try BOINCSigning.PrivateKey(text: String(decoding: try boincFixture("test_code_sign_private"), as: UTF8.self))
        let grant = BOINCUploadGrant(boincKey: key)
        let token = grant.token(for: "parley_j1_l2_out0")
        #expect(token.count == 64)
        #expect(grant.check(token, for: "parley_j1_l2_out0"))
        #expect(BOINCUploadGrant(boincKey: key).check(token, for: "parley_j1_l2_out0"), "the same key after a restart")
        #expect(!grant.check(token, for: "parley_j1_l3_out0"))
        #expect(!BOINCUploadGrant(boincKey: try BOINCSigning.PrivateKey()).check(token, for: "parley_j1_l2_out0"))
        #expect(!grant.check("", for: "parley_j1_l2_out0"))
        #expect(!grant.check(String(token.dropLast()), for: "parley_j1_l2_out0"))
    }

    @Test func namesMapBackToJobAndLease() {
        let name = BOINCName(jobID: 12, leaseID: 345)
        #expect(BOINCName.parse(result: name.result) == name)
        #expect(BOINCName.parse(file: name.program)?.1 == .program)
        #expect(BOINCName.parse(file: name.output(3)).map { $0.0 == name && $0.1 == .output(3) } == true)
        #expect(BOINCName.parse(file: name.input(0)).map { $0.0 == name && $0.1 == .input(0) } == true)
        #expect(BOINCName.parse(file: name.stdout)?.1 == .stdout)
        for bad in ["", "parley_j_l1_r", "parley_j1_l_r", "parley_j1_l2", "x_j1_l2_r", "parley_j1_l2_rr", "parley_j99999999999999999999999_l1_r", "parley_j-1_l2_r"] {
            #expect(BOINCName.parse(result: bad) == nil, "\(bad)")
        }
        #expect(BOINCName.parse(file: "parley_j1_l2_out") == nil)
        #expect(BOINCName.parse(file: "../etc/passwd") == nil)
    }

    @Test func depthGuard() {
        #expect(BOINCXMLText.depthExceeding(Array("<a><b><c/></b><!-- <x><y><z> --><![CDATA[<p><q>]]></a>".utf8), 2) == nil)
        #expect(BOINCXMLText.depthExceeding(Array("<a><b><c></c></b></a>".utf8), 2) == 3)
        #expect(BOINCXMLText.depthExceeding(Array(String(repeating: "<a>", count: 100_000).utf8), 32) == 33)
        let shape = BOINCXMLText.shape(Array("<?xml version='1.0'?><a><b/><!-- <c/> --><c x='<d>'></c></a>".utf8), depthLimit: 4)
        #expect(shape.depth == nil && shape.elements == 3 && !shape.declaration)
        #expect(BOINCXMLText.shape(Array("<!DOCTYPE a [<!ENTITY e 'x'>]><a>&e;</a>".utf8), depthLimit: 4).declaration)
        // End tags inside a processing instruction are its text (it ends at "?>"), and end
        // tags without start tags buy no depth: neither lets a deep document through.
        let hidden = "<a><?x " + String(repeating: "</a>", count: 100) + " ?>" + String(repeating: "<b>", count: 100) + "</a>"
        #expect(BOINCXMLText.depthExceeding(Array(hidden.utf8), 32) == 33)
        let unbalanced = "<a>" + String(repeating: "</x>", count: 100) + String(repeating: "<b>", count: 100)
        #expect(BOINCXMLText.depthExceeding(Array(unbalanced.utf8), 32) == 33)
        #expect(BOINCXMLText.shape(Array("<?x a>b ?><a/>".utf8), depthLimit: 4).elements == 1)
    }

    /// The scheduler request's own guard is before parsing: a request hiding a deep document
    /// in a processing instruction is refused (400), not parsed (XMLCoder's recursion would
    /// overflow the stack: a crash with 150,000 levels).
    @Test func aDeepDocumentHiddenByAProcessingInstructionIsRefused() throws {
        let depth = 150_000
        var body = "<scheduler_request><platform_name>x86_64-pc-linux-gnu</platform_name><host_cpid>0123</host_cpid><?x "
        body += String(repeating: "</a>", count: depth) + " ?>"
        body += String(repeating: "<b>", count: depth) + String(repeating: "</b>", count: depth) + "</scheduler_request>"
        let result = BOINCScheduling.read(Array(body.utf8), maxBytes: 4 << 20, maxDepth: 32)
        guard case .failure(let refusal) = result else {
            Issue.record("a request nested \(depth) deep was read")
            return
        }
        #expect(refusal.status == 400 && refusal.message.contains("deep"), "\(refusal)")
    }

    /// A quote in an end tag made the text guard read the rest as one quoted string, while
    /// the parser, which recovers from the error, reported every element inside: 18,000
    /// levels reached XMLCoder (found by a review). The parser's own depth now refuses it.
    @Test func aDeepDocumentHiddenByAQuoteInAnEndTagIsRefused() throws {
        let depth = 18_000
        var body = "<scheduler_request><platform_name>x86_64-pc-linux-gnu</platform_name><q></q '"
        body += String(repeating: "<b>", count: depth) + "'>" + String(repeating: "</b>", count: depth) + "</scheduler_request>"
        let result = BOINCScheduling.read(Array(body.utf8), maxBytes: 4 << 20, maxDepth: 32)
        guard case .failure(let refusal) = result else {
            Issue.record("a request nested \(depth) deep was read")
            return
        }
        #expect(refusal.status == 400 && refusal.message.contains("33 deep"), "\(refusal)")
        #expect(BOINCXMLText.shape(Array(body.utf8), depthLimit: 32).depth == nil, "the text guard alone does not see it")
        #expect(BOINCXMLText.parsedShape(Array("<a><b></b></a>".utf8), depthLimit: 2, elementLimit: 2) == .within)
        #expect(BOINCXMLText.parsedShape(Array("<a><b><c/></b></a>".utf8), depthLimit: 2, elementLimit: 9) == .tooDeep(3))
        #expect(BOINCXMLText.parsedShape(Array("<a><b/><c/></a>".utf8), depthLimit: 9, elementLimit: 2) == .tooMany(3))
    }

    /// The same quote hid a million elements from the text guard's count (XMLCoder built a
    /// tree of each, some hundred bytes apiece, for a 4 MB request; found by a review): the
    /// parser's own events are counted too.
    @Test func manyElementsHiddenByAQuoteInAnEndTagAreRefused() throws {
        var body = "<scheduler_request><platform_name>x86_64-pc-linux-gnu</platform_name><q></q '"
        body += String(repeating: "<a/>", count: 250_000) + "'></scheduler_request>"
        #expect(BOINCXMLText.shape(Array(body.utf8), depthLimit: 32).elements < 10, "the text guard alone does not see them")
        let result = BOINCScheduling.read(Array(body.utf8), maxBytes: 4 << 20, maxDepth: 32)
        guard case .failure(let refusal) = result else {
            Issue.record("a request with 250,000 hidden elements was read")
            return
        }
        #expect(refusal.status == 413 && refusal.message.contains("elements"), "\(refusal)")
    }

    /// max_output_bytes is what is kept of stdout and stderr (work.proto), not a limit on
    /// output files: the program keeps that much of stdout, the stdout file may be that
    /// large, the reported tails are cut to it; output files may be what a report carries.
    @Test func maxOutputBytesHoldsTheTailsNotTheOutputFiles() throws {
        var spec = echoSpec(outputs: ["big.bin"])
        spec.maxOutputBytes = 4096
        let program = String(decoding: BOINCJobs.script(jobID: 1, leaseID: 1, spec: spec, maxOutput: 1 << 20), as: UTF8.self)
        #expect(program.contains("tail -c 4096 "), "\(program)")
        spec.maxOutputBytes = 0
        #expect(String(decoding: BOINCJobs.script(jobID: 1, leaseID: 1, spec: spec, maxOutput: 1 << 20), as: UTF8.self).contains("tail -c 1048576 "))
        spec.maxOutputBytes = 4096
        let result = try XMLDecoder().decode(BOINCSchedulerRequest.ReportedResult.self, from: Data("""
            <result><name>parley_j1_l1_r</name><exit_status>0</exit_status><state>5</state>\
            <stderr_out><![CDATA[<stderr_txt>\(String(repeating: "e", count: 10_000))</stderr_txt>]]></stderr_out></result>
            """.utf8))
        func output(_ size: Int) -> Parley_Work_V1_OutputFile {
            var file = Parley_Work_V1_OutputFile()
            file.name = "big.bin"
            file.content = Data(repeating: 7, count: size)
            file.size = UInt64(size)
            file.sha256 = Data(SHA256.hash(data: file.content))
            return file
        }
        let name = BOINCName(jobID: 1, leaseID: 1)
        let big = BOINCScheduling.reportInput(result, name: name, worker: "w", spec: spec, outputs: [output(1 << 20)], stdout: Array(repeating: 1, count: 9000))
        #expect(big.report.outcome == .success, "a 1 MiB output of a job keeping 4 KiB of stdout")
        let report = try Parley_Work_V1_ReportResult(serializedBytes: big.result)
        #expect(report.stdoutTail.count == 4096 && report.stderrTail.count == 4096 && report.outputs.count == 1)
        // Two outputs of 16 MiB each: each within the client's max_nbytes, together over what
        // a report carries: an upload failure, not a result no one can fetch.
        spec.outputs = ["a", "b"]
        var a = output(WorkFiles.maxOutputBytes), b = a
        a.name = "a"
        b.name = "b"
        let over = BOINCScheduling.reportInput(result, name: name, worker: "w", spec: spec, outputs: [a, b], stdout: [])
        guard case .failure(let why) = over.report.outcome else {
            Issue.record("outputs of 32 MiB together were reported as a success")
            return
        }
        #expect(why.contains("together"), "\(why)")
    }

    /// A `<file_xfer_error>` in `<stderr_out>` (CDATA in the request, so not under its guard)
    /// is read when it is the client's small flat element, and left unread when nested deep
    /// (the same stack overflow) or large.
    @Test func aTransferErrorIsReadOnlyWhenSmallAndFlat() {
        let real = "<stderr_out><![CDATA[<file_xfer_error>\n  <file_name>parley_j1_l1_out0</file_name>\n  <error_code>-161 (not found)</error_code>\n</file_xfer_error>\n]]></stderr_out>"
        let read = BOINCScheduling.transferError(in: real)
        #expect(read?.fileName == "parley_j1_l1_out0" && read?.errorCode == "-161 (not found)", "\(String(describing: read))")
        let deep = "<file_xfer_error>" + String(repeating: "<b>", count: 400_000) + String(repeating: "</b>", count: 400_000) + "</file_xfer_error>"
        #expect(BOINCScheduling.transferError(in: deep) == nil)
        let large = "<file_xfer_error><error_message>" + String(repeating: "x", count: 70_000) + "</error_message></file_xfer_error>"
        #expect(BOINCScheduling.transferError(in: large) == nil)
    }
}
