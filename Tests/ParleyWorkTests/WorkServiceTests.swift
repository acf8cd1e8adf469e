import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Parley
import ParleyWire
@testable import ParleyWork
import SwiftProtobuf
import Testing
import ParleyTestSupport

/// A master in this process on a fresh SQLite store, trusting a fresh key, and a client
/// connected to it.
struct InProcessMaster {
    let store: SQLiteWorkStore
    let key: WorkSigning.PrivateKey
    let server: ParleyServer
    let task: Task<Void, any Error>
    let client: ParleyClient

    /// `entity`: the server takes method secret only, and the client authenticates as it.
    /// `wrap`: the store the service uses, around the SQLite store (tests inject failures).
    static func start(
        maxLeasesPerWorker: Int? = nil, entity: String? = nil, leaseDuration: Duration? = nil, wrap: (SQLiteWorkStore) -> any WorkStore = { $0 }
    ) async throws -> InProcessMaster {
        let dir = testScratchPath("work-service-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        var credentials: SecretCredentials?
        var keyring: ParleyKeyringSource?
        if let entity {
            let key = (0..<32).map { _ in UInt8.random(in: 0...255) }
            try ParleyKeyring(entities: [.init(name: entity, key: key, caps: ["*"], created: Date())]).save(path: dir + "/keyring")
            keyring = try ParleyKeyringSource(path: dir + "/keyring")
            credentials = SecretCredentials(entity: entity, key: key)
        }
        let store = try SQLiteWorkStore(path: dir + "/jobs.sqlite")
        let key = WorkSigning.PrivateKey()
        var router = ParleyRouter()
        var configuration = WorkService.Configuration(trust: key.publicKey)
        configuration.maxLeasesPerWorker = maxLeasesPerWorker
        if let leaseDuration { configuration.leaseDuration = leaseDuration }
        WorkService.register(on: &router, store: wrap(store), configuration: configuration)
        var quiet = Logger(label: "test")
        quiet.logLevel = .critical
        var serverConfiguration = ParleyServer.Configuration(listen: [])
        var clientConfiguration = ParleyClient.Configuration.defaults
        if let keyring, let credentials {
            serverConfiguration.authMethods = [AuthMethod.secret]
            serverConfiguration.keyring = keyring
            clientConfiguration.authMethods = [AuthMethod.secret]
            clientConfiguration.secret = credentials
        }
        let server = ParleyServer(configuration: serverConfiguration, router: router, logger: quiet)
        let task = Task { try await server.run() }
        _ = try await server.listeningAddresses
        let client = try await ParleyClient.connect(inProcessTo: server, configuration: clientConfiguration, logger: quiet)
        return InProcessMaster(store: store, key: key, server: server, task: task, client: client)
    }

    /// Signs `specs` with the project's key and submits them; returns their ids.
    @discardableResult
    func submit(_ specs: [Parley_Work_V1_JobSpec]) async throws -> [UInt64] {
        var submit = Parley_Work_V1_SubmitJobs()
        submit.jobs = try specs.map { try self.signed(try $0.serializedBytes()) }
        return try await self.client.request(submit, as: Parley_Work_V1_SubmitReply.self).jobIds
    }

    /// A job of these spec bytes (whatever they hold), signed with the project's key.
    func signed(_ spec: [UInt8]) throws -> Parley_Work_V1_SignedJob {
        var job = Parley_Work_V1_SignedJob()
        job.spec = Data(spec)
        job.signature = Data(try self.key.sign(job: spec))
        return job
    }

    /// A job running `argv`, estimated at `seconds` (0: no estimate).
    static func spec(_ argv: [String] = ["/bin/true"], estimatedSeconds seconds: UInt32 = 0) -> Parley_Work_V1_JobSpec {
        var spec = Parley_Work_V1_JobSpec()
        spec.argv = argv
        spec.estimatedSeconds = seconds
        return spec
    }

    /// Asks for one job as worker `w1`.
    func claimOne() async throws -> Parley_Work_V1_Assignment {
        var ask = Parley_Work_V1_RequestWork()
        ask.worker = "w1"
        ask.slots = 1
        return try #require(try await self.client.request(ask, as: Parley_Work_V1_WorkAssignments.self).assignments.first)
    }

    /// `w1`'s renewal of the lease of `assignment`.
    static func renewal(of assignment: Parley_Work_V1_Assignment) -> Parley_Work_V1_RenewLease {
        var renew = Parley_Work_V1_RenewLease()
        renew.worker = "w1"
        renew.jobID = assignment.jobID
        renew.leaseID = assignment.leaseID
        return renew
    }

    func stop() {
        self.client.close()
        self.server.shutDown()
        self.task.cancel()
    }
}

/// The master's handlers in process: what a misbehaving worker or submitter gets.
@Suite struct WorkServiceTests {
    /// [R-19.3-3] A worker that renews its lease for ever and never reports does not keep the job for
    /// ever: renewals end `max_wall_seconds` and two lease times after the lease was handed
    /// out (here 1 s and 2 x 10 s: a lease of 10 s, so that a renewal held up on a loaded
    /// machine does not find it expired: a fresh-clone CI run held one for seconds), and the
    /// lease then expires. Before, every renewal was granted.
    @Test func aWorkerRenewingForEverIsRefusedAfterTheJobsLongestTime() async throws {
        let master = try await InProcessMaster.start(leaseDuration: .seconds(10))
        defer { master.stop() }
        var spec = InProcessMaster.spec(["/bin/sleep", "1000"])
        spec.maxWallSeconds = 1
        let id = try #require(try await master.submit([spec]).first)
        let assignment = try await master.claimOne()
        #expect(assignment.jobID == id)
        let renew = InProcessMaster.renewal(of: assignment)
        let started = ContinuousClock.now
        var refusal: ParleyError?
        for _ in 0..<100 where refusal == nil {
            do {
                _ = try await master.client.request(renew, as: Parley_Work_V1_LeaseRenewed.self)
                try await Task.sleep(for: .milliseconds(250))
            } catch let error as ParleyError {
                refusal = error
            }
        }
        #expect(refusal?.code == .invalidArgument && refusal?.message.contains("longest time") == true, "\(String(describing: refusal))")
        // Refused once a renewal would take the lease past 21 s from its grant, about 11 s in.
        #expect(ContinuousClock.now - started >= .seconds(8), "renewed until near the longest time, not refused at once")
    }

    /// The renewal limit is worked out from the job's spec once per job, not at every
    /// renewal (a spec with inline inputs may be a frame's 16 MiB).
    @Test func aJobsSpecIsReadOnceForItsRenewals() async throws {
        let wrapped = NIOLockedValueBox<WrappedStore?>(nil)
        let master = try await InProcessMaster.start { base in
            let store = WrappedStore(base: base)
            wrapped.withLockedValue { $0 = store }
            return store
        }
        defer { master.stop() }
        let id = try #require(try await master.submit([InProcessMaster.spec()]).first)
        let assignment = try await master.claimOne()
        #expect(assignment.jobID == id)
        let store = try #require(wrapped.withLockedValue { $0 })
        let before = store.specReads.withLockedValue { $0 }
        let renew = InProcessMaster.renewal(of: assignment)
        for _ in 0..<5 { _ = try await master.client.request(renew, as: Parley_Work_V1_LeaseRenewed.self) }
        #expect(store.specReads.withLockedValue { $0 } - before == 1)
    }

    @Test func badReportsAndHandBacksAreRefusedWithAClearErrorAndStoreNothing() async throws {
        let master = try await InProcessMaster.start()
        defer { master.stop() }
        let (store, key, client) = (master.store, master.key, master.client)

        var spec = Parley_Work_V1_JobSpec()
        spec.argv = ["/bin/true"]
        var job = Parley_Work_V1_SignedJob()
        job.spec = try spec.serializedBytes()
        job.signature = Data(try key.sign(job: Array(job.spec)))
        var forged = job
        forged.signature = Data(try WorkSigning.PrivateKey().sign(job: Array(job.spec)))
        var submit = Parley_Work_V1_SubmitJobs()
        submit.jobs = [job, forged]
        let refused = await #expect(throws: ParleyError.self) { _ = try await client.request(submit, as: Parley_Work_V1_SubmitReply.self) }
        #expect(refused?.code == .permissionDenied && refused?.message.contains("job 1 of the batch is refused") == true, "\(String(describing: refused))")
        #expect(try await store.counts()["queued"] == 0, "nothing of the batch was stored")
        // A batch longer than a master checks on its event loop at once.
        submit.jobs = Array(repeating: job, count: WorkService.maxJobsPerSubmit + 1)
        let long = await #expect(throws: ParleyError.self) { _ = try await client.request(submit, as: Parley_Work_V1_SubmitReply.self) }
        #expect(long?.code == .invalidArgument && long?.message.contains("more than 1000") == true, "\(String(describing: long))")
        #expect(try await store.counts()["queued"] == 0)
        submit.jobs = [job]
        let id = try await client.request(submit, as: Parley_Work_V1_SubmitReply.self).jobIds[0]

        var ask = Parley_Work_V1_RequestWork()
        ask.worker = "w1"
        ask.slots = 1
        let assignment = try #require(try await client.request(ask, as: Parley_Work_V1_WorkAssignments.self).assignments.first)
        var report = Parley_Work_V1_ReportResult()
        report.worker = "w1"
        report.jobID = id
        report.leaseID = assignment.leaseID
        report.stdoutTail = Data(repeating: 0x41, count: WorkService.maxTail + 1)
        let tooBig = await #expect(throws: ParleyError.self) { _ = try await client.request(report, as: Parley_Work_V1_ReportAck.self) }
        #expect(tooBig?.code == .invalidArgument && tooBig?.message.contains("over the limit") == true)
        report.stdoutTail = Data("ok".utf8)
        var other = report
        other.worker = "w2"
        let wrongWorker = await #expect(throws: ParleyError.self) { _ = try await client.request(other, as: Parley_Work_V1_ReportAck.self) }
        #expect(wrongWorker?.message.contains("belongs to worker w1") == true)
        var back = Parley_Work_V1_HandBack()
        back.worker = "w2"
        back.jobID = id
        back.leaseID = assignment.leaseID
        let wrongHandBack = await #expect(throws: ParleyError.self) { _ = try await client.request(back, as: Parley_Work_V1_HandBackReply.self) }
        #expect(wrongHandBack?.message.contains("hand-back refused") == true)
        // Output files: a name out of the job's directory, or content that does not match
        // its SHA-256, is refused and nothing is stored.
        var escaping = Parley_Work_V1_OutputFile()
        escaping.name = "../../etc/cron.d/x"
        escaping.content = Data("x".utf8)
        escaping.size = 1
        escaping.sha256 = Data(WorkFiles.sha256(escaping.content))
        var tampered = escaping
        tampered.name = "out.txt"
        tampered.content = Data("y".utf8)
        var unasked = escaping
        unasked.name = ".ssh/authorized_keys"
        for bad in [escaping, tampered, unasked] {
            var withFile = report
            withFile.outputs = [bad]
            let refusedFile = await #expect(throws: ParleyError.self) { _ = try await client.request(withFile, as: Parley_Work_V1_ReportAck.self) }
            #expect(refusedFile?.code == .invalidArgument && refusedFile?.message.contains("nothing was stored") == true, "\(String(describing: refusedFile))")
        }
        #expect(try await store.job(id)?.result == nil, "nothing stored by the refused reports")
        #expect(try await client.request(report, as: Parley_Work_V1_ReportAck.self).verdict == .accepted)
        #expect(try await client.request(report, as: Parley_Work_V1_ReportAck.self).verdict == .alreadyAccepted)
    }

    /// A job whose files could leave its directory, or whose inline input does not match its
    /// signed SHA-256, is refused at submission and nothing of the batch is stored.
    /// [R-19.1-2]: a job naming a file that is not a plain relative path is refused, nothing stored.
    @Test func jobsWithBadFilesAreRefusedAtSubmission() async throws {
        let master = try await InProcessMaster.start()
        defer { master.stop() }
        let (store, key, client) = (master.store, master.key, master.client)
        func input(_ name: String, _ content: String, hashOf: String? = nil) -> Parley_Work_V1_InputFile {
            var f = Parley_Work_V1_InputFile()
            f.name = name
            f.content = Data(content.utf8)
            f.size = UInt64(content.utf8.count)
            f.sha256 = Data(WorkFiles.sha256(Data((hashOf ?? content).utf8)))
            return f
        }
        var cases: [(String, Parley_Work_V1_JobSpec)] = []
        for (why, name) in [("'..'", "../x"), ("absolute", "/etc/passwd"), ("'..'", "a/../../x"), ("part ''", "a//b"), ("NUL", "a\u{0}b")] {
            var spec = Parley_Work_V1_JobSpec()
            spec.argv = ["/bin/true"]
            spec.inputs = [input(name, "data")]
            cases.append((why, spec))
        }
        var tampered = Parley_Work_V1_JobSpec()
        tampered.argv = ["/bin/true"]
        tampered.inputs = [input("in.txt", "data", hashOf: "other")]
        cases.append(("SHA-256", tampered))
        var outward = Parley_Work_V1_JobSpec()
        outward.argv = ["/bin/true"]
        outward.outputs = ["../../.ssh/id_ed25519"]
        cases.append(("'..'", outward))
        var noSource = Parley_Work_V1_JobSpec()
        noSource.argv = ["/bin/true"]
        var remote = input("big.bin", "")
        remote.size = 10
        remote.url = "ftp://example/big.bin"
        noSource.inputs = [remote]
        cases.append(("http(s) URL", noSource))
        var twice = Parley_Work_V1_JobSpec()
        twice.argv = ["/bin/true"]
        twice.outputs = ["out", "out"]
        cases.append(("'out' is named twice", twice))
        var many = Parley_Work_V1_JobSpec()
        many.argv = ["/bin/true"]
        many.outputs = (0...100).map { "out\($0)" }
        cases.append(("101 outputs, over the limit of 100", many))
        var long = Parley_Work_V1_JobSpec()
        long.argv = ["/bin/true"]
        long.outputs = (0..<20).map { "\($0)" + String(repeating: "n", count: 1000) }
        cases.append(("output names take", long))
        var attempts = Parley_Work_V1_JobSpec()
        attempts.argv = ["/bin/true"]
        cases.append(("max_attempts 4294967295 is over the limit of 1000", attempts))
        for (why, spec) in cases {
            var job = Parley_Work_V1_SignedJob()
            job.spec = try spec.serializedBytes()
            job.signature = Data(try key.sign(job: Array(job.spec)))
            if why.hasPrefix("max_attempts") { job.maxAttempts = .max }
            var submit = Parley_Work_V1_SubmitJobs()
            submit.jobs = [job]
            let refused = await #expect(throws: ParleyError.self) { _ = try await client.request(submit, as: Parley_Work_V1_SubmitReply.self) }
            #expect(refused?.code == .invalidArgument && refused?.message.contains(why) == true && refused?.message.contains("nothing was stored") == true,
                    "\(why): \(String(describing: refused))")
        }
        #expect(try await store.counts()["queued"] == 0)
    }

    /// A failure's message is a reason kept in the job's record for good: its first 4 KiB
    /// are kept, not 16 MiB on every attempt.
    @Test func aFailuresLongMessageIsCut() async throws {
        let master = try await InProcessMaster.start()
        defer { master.stop() }
        var spec = Parley_Work_V1_JobSpec()
        spec.argv = ["/bin/false"]
        var job = Parley_Work_V1_SignedJob()
        job.spec = try spec.serializedBytes()
        job.signature = Data(try master.key.sign(job: Array(job.spec)))
        job.maxAttempts = 1
        var submit = Parley_Work_V1_SubmitJobs()
        submit.jobs = [job]
        let id = try await master.client.request(submit, as: Parley_Work_V1_SubmitReply.self).jobIds[0]
        var ask = Parley_Work_V1_RequestWork()
        ask.worker = "w1"
        ask.slots = 1
        let assignment = try #require(try await master.client.request(ask, as: Parley_Work_V1_WorkAssignments.self).assignments.first)
        var report = Parley_Work_V1_ReportResult()
        report.worker = "w1"
        report.jobID = id
        report.leaseID = assignment.leaseID
        report.errorKind = .compute
        report.message = String(repeating: "é", count: 500_000)
        #expect(try await master.client.request(report, as: Parley_Work_V1_ReportAck.self).verdict == .failed)
        let failures = try #require(try await master.store.job(id)).record.failures
        let reason = try #require(failures.first)
        #expect(failures.count == 1 && reason.utf8.count < 4200 && reason.hasSuffix("[cut]"), "\(reason.utf8.count) bytes")
    }

    /// [R-19.2-4] With a cap on the leases a worker holds, RequestWork again and again gets
    /// it no more than the cap (an empty answer, not an error); another worker still gets work.
    @Test func aWorkerAskingAgainAndAgainGetsNoMoreThanTheCap() async throws {
        let master = try await InProcessMaster.start(maxLeasesPerWorker: 3)
        defer { master.stop() }
        var submit = Parley_Work_V1_SubmitJobs()
        for _ in 0..<10 {
            var spec = Parley_Work_V1_JobSpec()
            spec.argv = ["/bin/true"]
            var job = Parley_Work_V1_SignedJob()
            job.spec = try spec.serializedBytes()
            job.signature = Data(try master.key.sign(job: Array(job.spec)))
            submit.jobs.append(job)
        }
        _ = try await master.client.request(submit, as: Parley_Work_V1_SubmitReply.self)
        var ask = Parley_Work_V1_RequestWork()
        ask.worker = "hoarder"
        ask.slots = 2
        var got: [Int] = []
        for _ in 0..<4 { got.append(try await master.client.request(ask, as: Parley_Work_V1_WorkAssignments.self).assignments.count) }
        #expect(got == [2, 1, 0, 0])
        ask.worker = "other"
        #expect(try await master.client.request(ask, as: Parley_Work_V1_WorkAssignments.self).assignments.count == 2)
        #expect(try await master.store.counts()["queued"] == 5)
    }

    /// [R-19.2-2] A request in seconds of work gets jobs until their estimates reach it (at
    /// least one); the jobs claimed beyond go back to the queue, their attempts not counted.
    @Test func aRequestInSecondsGetsJobsByTheirEstimates() async throws {
        #expect(WorkService.covering(seconds: 15, [10, 10, 10]) == 2)
        #expect(WorkService.covering(seconds: 20, [10, 10, 10]) == 2)
        #expect(WorkService.covering(seconds: 5, [10, 10]) == 1)
        #expect(WorkService.covering(seconds: 100, [10, 10]) == 2)
        #expect(WorkService.covering(seconds: 1, []) == 0)
        let master = try await InProcessMaster.start()
        defer { master.stop() }
        let (store, client) = (master.store, master.client)
        try await master.submit(([10, 10, 0, 10] as [UInt32]).map { InProcessMaster.spec(estimatedSeconds: $0) })
        var ask = Parley_Work_V1_RequestWork()
        ask.worker = "w1"
        ask.slots = 4
        ask.seconds = 15
        let first = try await client.request(ask, as: Parley_Work_V1_WorkAssignments.self)
        #expect(first.assignments.map(\.jobID) == [1, 2], "10 + 10 s reach 15 s")
        let counts = try await store.counts()
        #expect(counts["queued"] == 2 && counts["leased"] == 2)
        ask.seconds = 30
        let second = try await client.request(ask, as: Parley_Work_V1_WorkAssignments.self)
        #expect(second.assignments.map(\.jobID) == [3], "a job without an estimate counts for \(WorkService.defaultEstimate) s")
        ask.seconds = 0
        let third = try await client.request(ask, as: Parley_Work_V1_WorkAssignments.self)
        #expect(third.assignments.map(\.jobID) == [4], "handed back, then handed out again")
        ask.seconds = -1
        let refused = await #expect(throws: ParleyError.self) { _ = try await client.request(ask, as: Parley_Work_V1_WorkAssignments.self) }
        #expect(refused?.code == .invalidArgument)
        // The jobs handed back at once did not use up an attempt.
        let result = try await client.request({ var r = Parley_Work_V1_ResultRequest(); r.jobID = 4; return r }(), as: Parley_Work_V1_ResultReply.self)
        #expect(result.failures.isEmpty, "\(result.failures)")
    }

    /// An authenticated worker's stored result names its entity, whatever its report says.
    @Test func theStoredResultNamesTheAuthenticatedWorker() async throws {
        let master = try await InProcessMaster.start(entity: "worker.alice")
        defer { master.stop() }
        let client = master.client
        let id = try await master.submit([InProcessMaster.spec()])[0]
        var ask = Parley_Work_V1_RequestWork()
        ask.worker = "worker.bob"
        ask.slots = 1
        let assignment = try #require(try await client.request(ask, as: Parley_Work_V1_WorkAssignments.self).assignments.first)
        var report = Parley_Work_V1_ReportResult()
        report.worker = "worker.bob"
        report.jobID = id
        report.leaseID = assignment.leaseID
        #expect(try await client.request(report, as: Parley_Work_V1_ReportAck.self).verdict == .accepted)
        let result = try await client.request({ var r = Parley_Work_V1_ResultRequest(); r.jobID = id; return r }(), as: Parley_Work_V1_ResultReply.self)
        #expect(result.result.worker == "worker.alice", "\(result.result.worker)")
    }

    /// [R-19.2-2] A job claimed beyond the seconds asked that cannot go back to the queue (the
    /// store fails) is handed out rather than left leased to a worker that never hears of it.
    @Test func aJobThatCannotGoBackIsHandedOutNotStranded() async throws {
        let master = try await InProcessMaster.start(wrap: { WrappedStore(base: $0, handBackFails: true) })
        defer { master.stop() }
        let (store, client) = (master.store, master.client)
        try await master.submit(Array(repeating: InProcessMaster.spec(estimatedSeconds: 100), count: 3))
        var ask = Parley_Work_V1_RequestWork()
        ask.worker = "w1"
        ask.slots = 3
        ask.seconds = 1
        let got = try await client.request(ask, as: Parley_Work_V1_WorkAssignments.self)
        #expect(got.assignments.map(\.jobID) == [1, 2, 3], "every job leased to w1 reaches it")
        #expect(try await store.counts()["leased"] == 3)
    }
}

/// A ResultReply always fits a frame: a stored report may come close to a frame by itself,
/// and a job's failure reasons come on top.
@Suite struct ResultReplyFitTests {
    @Test func theOldestFailuresThenTheTailsGiveWayAndTheOutputsStay() throws {
        var reply = Parley_Work_V1_ResultReply()
        reply.state = "succeeded"
        reply.failures = (1...10).map { "lease \($0) on w: " + String(repeating: "x", count: 4000) }
        var output = Parley_Work_V1_OutputFile()
        output.name = "out.bin"
        output.content = Data(repeating: 7, count: 16 << 20)
        reply.result.outputs = [output]
        reply.result.stdoutTail = Data(repeating: 0x6f, count: 20 << 10)
        reply.result.stderrTail = Data(repeating: 0x65, count: 20 << 10)
        let before: [UInt8] = try reply.serializedBytes()
        #expect(before.count > WorkService.maxResultReplyBytes, "the case is one that does not fit")
        WorkService.fit(&reply)
        let after: [UInt8] = try reply.serializedBytes()
        #expect(after.count <= WorkService.maxResultReplyBytes)
        #expect(reply.failures.last?.hasPrefix("lease 10 on w") == true, "the latest reason stays")
        #expect(reply.failures.first?.contains("earlier failure reasons left out") == true, "\(reply.failures.first ?? "")")
        #expect(reply.result.outputs == [output])
        // A reply that fits is left as it is.
        var small = Parley_Work_V1_ResultReply()
        small.failures = ["a", "b"]
        small.result.stdoutTail = Data("out".utf8)
        let copy = small
        WorkService.fit(&small)
        #expect(small == copy)
        // Without failures to drop, the tails give way, each keeping its end.
        var tails = Parley_Work_V1_ResultReply()
        tails.result.outputs = [output]
        tails.result.stdoutTail = Data(repeating: 0x6f, count: 40 << 10) + Data("END".utf8)
        tails.result.stderrTail = Data(repeating: 0x65, count: 40 << 10)
        WorkService.fit(&tails)
        #expect((try tails.serializedBytes() as [UInt8]).count <= WorkService.maxResultReplyBytes)
        #expect(tails.result.stdoutTail.suffix(3) == Data("END".utf8))
        // One tail alone gives all the excess.
        var one = Parley_Work_V1_ResultReply()
        one.failures = ["lease 1 on w: exit 1"]
        one.result.outputs = [output]
        one.result.stdoutTail = Data(repeating: 0x6f, count: 63 << 10) + Data("END".utf8)
        WorkService.fit(&one)
        #expect((try one.serializedBytes() as [UInt8]).count <= WorkService.maxResultReplyBytes)
        #expect(one.result.stdoutTail.suffix(3) == Data("END".utf8) && one.result.stderrTail.isEmpty)
    }
}

/// A store around `base` whose hand-backs fail if asked (a database hiccup), and which
/// counts the specs read.
struct WrappedStore: WorkStore {
    let base: any WorkStore
    var handBackFails = false
    let specReads = NIOLockedValueBox(0)
    func submit(_ jobs: [NewJob], now: Int64) async throws -> [UInt64] { try await self.base.submit(jobs, now: now) }
    func claim(_ requests: [ClaimRequest], now: Int64, leaseDuration: Int64) async throws -> [[ClaimedJob]] {
        try await self.base.claim(requests, now: now, leaseDuration: leaseDuration)
    }
    func report(_ reports: [ReportInput], now: Int64) async throws -> [ReportVerdict] { try await self.base.report(reports, now: now) }
    func expireLeases(now: Int64) async throws -> Int { try await self.base.expireLeases(now: now) }
    func handBack(jobID: UInt64, leaseID: UInt64, worker: String) async throws {
        if self.handBackFails { throw WorkStoreError("the database is gone for a moment") }
        try await self.base.handBack(jobID: jobID, leaseID: leaseID, worker: worker)
    }
    func renew(jobID: UInt64, leaseID: UInt64, worker: String, now: Int64, leaseDuration: Int64, longest: Int64?) async throws -> Lease {
        try await self.base.renew(jobID: jobID, leaseID: leaseID, worker: worker, now: now, leaseDuration: leaseDuration, longest: longest)
    }
    func counts() async throws -> [String: Int] { try await self.base.counts() }
    func job(_ id: UInt64) async throws -> (record: JobRecord, result: [UInt8]?)? { try await self.base.job(id) }
    func spec(_ id: UInt64) async throws -> [UInt8]? {
        self.specReads.withLockedValue { $0 += 1 }
        return try await self.base.spec(id)
    }
    func appliedMigrations() async throws -> [String] { try await self.base.appliedMigrations() }
    func close() async { await self.base.close() }
}
