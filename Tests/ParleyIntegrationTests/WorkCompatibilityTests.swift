import Foundation
import NIOCore
import NIOPosix
import Parley
import ParleyTestSupport
import ParleyWire
import ParleyWork
import SwiftProtobuf
import Testing

/// Work protocol compatibility (docs/protocol.md §19.7): the bytes a version-1 worker sent in
/// a whole session are kept in Tests/Fixtures/work/v1-worker-NN.bin, one file per request
/// (the first also holds the connection's banner and handshake), and replayed against the
/// current master, which must answer them as a version-1 master did.
/// `PARLEY_RECORD_WORK_COMPAT=v1 swift test --filter recordWorkFixture` writes them (only
/// when a release changes the work protocol, as a new version).
@Suite(.timeLimit(.minutes(10))) struct WorkCompatibilityTests {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/work")

    /// A version-1 worker's session: it submits a job (as a submitter would), says hello as a
    /// version-1 worker, takes the job, reports it twice (the second as after a reconnect),
    /// and asks for the job's result and the status.
    static func versionOneMessages() throws -> [WireMessage] {
        func request<M: SwiftProtobuf.Message>(_ id: UInt64, _ m: M) -> WireMessage {
            WireMessage(header: MessageHeader(id: id, kind: .request, type: M.protoMessageName), payload: m.parleyPayload())
        }
        let key = try WorkSigning.PrivateKey(rawRepresentation: Array(repeating: 7, count: 32))
        var spec = Parley_Work_V1_JobSpec()
        spec.argv = ["/bin/true"]
        spec.env = ["PATH": "/usr/bin:/bin"]
        var job = Parley_Work_V1_SignedJob()
        job.spec = try spec.serializedBytes()
        job.signature = Data(try key.sign(job: Array(job.spec)))
        var submit = Parley_Work_V1_SubmitJobs()
        submit.jobs = [job]
        var hello = Parley_Work_V1_WorkerHello()
        hello.worker = "v1-worker"
        hello.platform = "linux-x86_64"
        hello.cpus = 2
        hello.slots = 1
        hello.protocolVersion = 1
        var ask = Parley_Work_V1_RequestWork()
        ask.worker = "v1-worker"
        ask.slots = 1
        var report = Parley_Work_V1_ReportResult()
        report.worker = "v1-worker"
        report.jobID = 1
        report.leaseID = 1
        report.wallMs = 3
        report.stdoutTail = Data("done\n".utf8)
        var result = Parley_Work_V1_ResultRequest()
        result.jobID = 1
        return [
            request(1, submit), request(2, hello), request(3, ask), request(4, report), request(5, report),
            request(6, result), request(7, Parley_Work_V1_StatusRequest()),
        ]
    }

    static var recordedStages: [ByteBuffer] {
        get throws {
            var stages: [ByteBuffer] = []
            for n in 0... {
                let url = fixtures.appendingPathComponent(String(format: "v1-worker-%02d.bin", n))
                guard FileManager.default.fileExists(atPath: url.path) else { break }
                stages.append(ByteBuffer(bytes: try Data(contentsOf: url)))
            }
            return stages
        }
    }

    @Test(.enabled(if: ProcessInfo.processInfo.environment["PARLEY_RECORD_WORK_COMPAT"] != nil))
    func recordWorkFixture() throws {
        let messages = try Self.versionOneMessages()
        var previous = 0
        try FileManager.default.createDirectory(at: Self.fixtures, withIntermediateDirectories: true)
        for k in 0..<messages.count {
            // The stream up to request k; stage k is what it adds to the one before.
            let bytes = clientSessionBytes(messages: Array(messages[...k]))
            let stage = Data(bytes.readableBytesView.dropFirst(previous))
            previous = bytes.readableBytes
            try stage.write(to: Self.fixtures.appendingPathComponent(String(format: "v1-worker-%02d.bin", k)))
        }
    }

    /// Sends each stage and waits for the answer to its request before the next (a worker
    /// waits for work before reporting it); returns the answers by request id.
    static func replay(_ stages: [ByteBuffer], to address: ParleyAddress) async throws -> [UInt64: WireMessage] {
        guard case .tcp(let host, let port) = address.kind else { throw ParleyTestFailure("not TCP: \(address)") }
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton).connect(host: host, port: port) { channel in
            channel.eventLoop.makeCompletedFuture { try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel) }
        }
        return try await channel.executeThenClose { inbound, outbound in
            var received = ByteBuffer()
            var answers: [UInt64: WireMessage] = [:]
            var iterator = inbound.makeAsyncIterator()
            for (n, stage) in stages.enumerated() {
                try await outbound.write(stage)
                let id = UInt64(n + 1)
                // A hang detector: a full parallel run on two cores once took more than 10 s.
                let deadline = ContinuousClock.now + .seconds(30)
                while answers[id] == nil {
                    // Each read is bounded too: a master that stays silent fails the test, not hangs it.
                    let timer = Task {
                        try await Task.sleep(until: deadline)
                        try? await channel.channel.close()
                    }
                    defer { timer.cancel() }
                    guard ContinuousClock.now < deadline, var chunk = try await iterator.next() else {
                        throw ParleyTestFailure("no answer to request \(id) of the version-1 worker")
                    }
                    received.writeBuffer(&chunk)
                    for frame in frames(in: received) where frame.tag == .message {
                        if let m = try? WireMessage(frame: frame), [.response, .error].contains(m.header.kind) { answers[m.header.id] = m }
                    }
                }
            }
            return answers
        }
    }

    @Test func aVersionOneWorkerSessionIsAnsweredByTheCurrentMaster() async throws {
        let stages = try Self.recordedStages
        #expect(stages.count == 7, "the version-1 worker fixture is missing from \(Self.fixtures.path)")
        let dir = freshTestDirectory("work-compat")
        let store = try SQLiteWorkStore(path: dir + "/jobs.sqlite")
        var router = ParleyRouter()
        WorkService.register(on: &router, store: store)
        try await withServer(router: router) { _, addresses in
            let answers = try await Self.replay(stages, to: addresses[0])
            func answer<M: SwiftProtobuf.Message>(_ id: UInt64, _ type: M.Type) throws -> M {
                let m = try #require(answers[id])
                #expect(m.header.kind == .response, "request \(id) got \(m.header.kind) \(m.header.type)")
                return try M(parleyPayload: m.payload)
            }
            #expect(try answer(1, Parley_Work_V1_SubmitReply.self).jobIds == [1])
            #expect(try answer(2, Parley_Work_V1_WorkerWelcome.self).protocolVersion == 1)
            let work = try answer(3, Parley_Work_V1_WorkAssignments.self)
            #expect(work.assignments.map(\.jobID) == [1] && work.assignments.map(\.leaseID) == [1])
            #expect(try answer(4, Parley_Work_V1_ReportAck.self).verdict == .accepted)
            #expect(try answer(5, Parley_Work_V1_ReportAck.self).verdict == .alreadyAccepted)
            let result = try answer(6, Parley_Work_V1_ResultReply.self)
            #expect(result.state == "succeeded" && result.result.stdoutTail == Data("done\n".utf8))
            let status = try answer(7, Parley_Work_V1_StatusReply.self)
            #expect(status.succeeded == 1 && status.queued == 0 && status.leased == 0)
        }
    }

    /// Malformed Work messages (payloads that are not the protobuf their type names, cut
    /// short or with a field of the wrong wire type) get a `malformedPayload` error each,
    /// the connection goes on, and nothing is stored.
    @Test func malformedWorkMessagesAreRefusedAndStoreNothing() async throws {
        let dir = freshTestDirectory("work-malformed")
        let store = try SQLiteWorkStore(path: dir + "/jobs.sqlite")
        var router = ParleyRouter()
        WorkService.register(on: &router, store: store)
        let garbage: [(String, [UInt8])] = [
            (Parley_Work_V1_SubmitJobs.protoMessageName, [0x0A, 0x7F, 0x01]),            // a job of 127 bytes, 1 there
            (Parley_Work_V1_ReportResult.protoMessageName, [0x10]),                      // job_id without its value
            (Parley_Work_V1_RequestWork.protoMessageName, [0x12, 0x05]),                 // slots as bytes, cut short
            (Parley_Work_V1_WorkerHello.protoMessageName, [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]), // a tag past 64 bits
        ]
        var messages = garbage.enumerated().map { i, g in
            WireMessage(header: MessageHeader(id: UInt64(i + 1), kind: .request, type: g.0), payload: ByteBuffer(bytes: g.1))
        }
        messages.append(WireMessage(header: MessageHeader(id: 5, kind: .request, type: Parley_Work_V1_StatusRequest.protoMessageName), payload: ByteBuffer()))
        var stages: [ByteBuffer] = []
        var previous = 0
        for k in messages.indices {
            let bytes = clientSessionBytes(messages: Array(messages[...k]))
            stages.append(ByteBuffer(bytes: Array(bytes.readableBytesView.dropFirst(previous))))
            previous = bytes.readableBytes
        }
        try await withServer(router: router) { _, addresses in
            let answers = try await Self.replay(stages, to: addresses[0])
            for id in 1...4 {
                let m = try #require(answers[UInt64(id)])
                #expect(m.header.kind == .error, "request \(id): \(m.header.kind)")
                let error = try Parley_V1_Status(parleyPayload: m.payload)
                #expect(error.code == ParleyError.Code.malformedPayload.rawValue, "request \(id): \(error)")
            }
            let status = try Parley_Work_V1_StatusReply(parleyPayload: try #require(answers[5]).payload)
            #expect(status.queued == 0 && status.leased == 0 && status.succeeded == 0 && status.failed == 0)
        }
        #expect(try await store.counts() == ["queued": 0, "leased": 0, "succeeded": 0, "failed": 0])
    }

    /// Negotiation: the lower of the two highest versions; 0 (a worker from before
    /// negotiation) means 1; a worker below the master's lowest is refused by name.
    /// [R-19.7-1]: a worker below the master's lowest version is refused (clientOutOfDate).
    @Test func versionsAreNegotiated() throws {
        #expect(try WorkService.negotiate(workerHighest: 0) == 1)
        #expect(try WorkService.negotiate(workerHighest: 1) == 1)
        #expect(try WorkService.negotiate(workerHighest: 9) == WorkService.protocolVersions.upperBound)
        #expect(try WorkService.negotiate(workerHighest: 2, versions: 1...3) == 2)
        let old = #expect(throws: ParleyError.self) { try WorkService.negotiate(workerHighest: 1, versions: 2...3) }
        #expect(old?.code == .clientOutOfDate && old?.message.contains("speaks versions 2 to 3") == true)
        // A field a later master adds to its welcome is skipped by a version-1 worker.
        var welcome = Parley_Work_V1_WorkerWelcome()
        welcome.master = "later"
        welcome.protocolVersion = 1
        var bytes = try welcome.serializedBytes() as [UInt8]
        bytes += [0xC8, 0x3E, 0x05]  // field 1001, varint 5: unknown to this version
        let decoded = try Parley_Work_V1_WorkerWelcome(serializedBytes: bytes)
        #expect(decoded.master == "later" && decoded.protocolVersion == 1)
    }
}
