import Foundation
import Parley
@testable import ParleyWork
import ParleyTestSupport
import SwiftProtobuf
import Testing

/// What submitters and workers send the master, mutated: valid messages of every kind the
/// master takes (and job specs, mutated before they are signed, so that they pass the
/// signature and reach the spec's checks) with bytes flipped, cut, repeated and moved, then
/// decoded as protobuf (most still decode, with other values). Every one is answered or
/// refused with an error that says why, within a timeout; none is a handler's unexpected
/// failure (`handlerFailed`); and the store is whole afterwards: its counts add up, and a
/// valid job still runs through submit, claim and report. `PARLEY_WORK_MUTATIONS` variants
/// (default 3,000).
@Suite(.timeLimit(.minutes(5)))
struct WorkMutationTests {
    static let variants = ProcessInfo.processInfo.environment["PARLEY_WORK_MUTATIONS"].flatMap(Int.init) ?? 3_000

    static func mutate(_ input: [UInt8], _ rng: inout SplitMix) -> [UInt8] {
        var out = input
        // Mostly one change, mostly to a value: protobuf's lengths and tags break under
        // most changes, and a message that no longer decodes tests SwiftProtobuf, not us.
        for _ in 0..<(Int.random(in: 0..<4, using: &rng) == 0 ? 2 : 1) {
            guard !out.isEmpty else {
                out = [UInt8.random(in: 0...255, using: &rng)]
                continue
            }
            let at = Int.random(in: 0..<out.count, using: &rng)
            switch Int.random(in: 0..<10, using: &rng) {
            case 0, 6, 7: out[at] ^= UInt8(1) << UInt8.random(in: 0..<7, using: &rng)
            case 1, 8, 9: out[at] = [0x00, 0x01, 0x7F, 0x2F, 0x2E, 0x20, 0x41].randomElement(using: &rng)!
            case 2: out.removeSubrange(at..<min(out.count, at + Int.random(in: 1...16, using: &rng)))
            case 3: out.insert(UInt8.random(in: 0...255, using: &rng), at: at)
            case 4: ByteMutations.repeatRange(&out, at: at, maxLength: 40, times: 1, using: &rng)
            default: ByteMutations.moveRange(&out, at: at, maxLength: 40, using: &rng)
            }
        }
        return out
    }

    /// A spec with a bit of everything the master checks: inputs inline and by URL,
    /// outputs, an environment, limits, an application.
    static func richSpec() -> Parley_Work_V1_JobSpec {
        var spec = InProcessMaster.spec(["/bin/sh", "-c", "cat in.txt > out.txt"], estimatedSeconds: 5)
        spec.env = ["LANG": "C", "X": "1"]
        spec.maxWallSeconds = 60
        spec.maxCpuSeconds = 30
        spec.maxMemoryBytes = 1 << 30
        spec.maxOutputBytes = 4096
        spec.name = "rich"
        var inline = Parley_Work_V1_InputFile()
        inline.name = "in.txt"
        inline.content = Data("hello\n".utf8)
        inline.size = 6
        inline.sha256 = Data(WorkFiles.sha256(Array("hello\n".utf8)))
        var fetched = Parley_Work_V1_InputFile()
        fetched.name = "sub/data.bin"
        fetched.url = "http://127.0.0.1:9/data.bin"
        fetched.size = 3
        fetched.sha256 = Data(repeating: 7, count: 32)
        spec.inputs = [inline, fetched]
        spec.outputs = ["out.txt", "logs/run.log"]
        return spec
    }

    @Test func mutatedMessagesAreAnsweredOrRefusedAndTheStoreStaysWhole() async throws {
        let master = try await InProcessMaster.start()
        defer { master.stop() }
        // Jobs and leases for the reports, renewals and hand-backs to name.
        let ids = try await master.submit([Self.richSpec(), InProcessMaster.spec(), InProcessMaster.spec(["/bin/echo", "x"])])
        #expect(ids.count == 3)
        var ask = Parley_Work_V1_RequestWork()
        ask.worker = "w1"
        ask.slots = 2
        let leases = try await master.client.request(ask, as: Parley_Work_V1_WorkAssignments.self).assignments
        #expect(leases.count == 2)
        let lease = try #require(leases.first)

        var hello = Parley_Work_V1_WorkerHello()
        hello.worker = "w1"
        hello.platform = "x86_64-pc-linux-gnu"
        hello.cpus = 2
        hello.slots = 2
        hello.protocolVersion = 1
        hello.apps = ["python3"]
        hello.resourceShare = 0.5
        var report = Parley_Work_V1_ReportResult()
        report.worker = "w1"
        report.jobID = lease.jobID
        report.leaseID = lease.leaseID
        report.wallMs = 12
        report.stdoutTail = Data("out\n".utf8)
        var output = Parley_Work_V1_OutputFile()
        output.name = "out.txt"
        output.content = Data("hello\n".utf8)
        output.size = 6
        output.sha256 = Data(WorkFiles.sha256(Array("hello\n".utf8)))
        report.outputs = [output]
        var failure = report
        failure.exitStatus = 3
        failure.errorKind = .compute
        failure.message = "exit 3"
        failure.outputs = []
        var back = Parley_Work_V1_HandBack()
        back.worker = "w1"
        back.jobID = lease.jobID
        back.leaseID = lease.leaseID
        var result = Parley_Work_V1_ResultRequest()
        result.jobID = lease.jobID
        var asking = ask
        asking.apps = ["python3"]
        asking.seconds = 30
        let specBytes: [UInt8] = try Self.richSpec().serializedBytes()

        var rng = SplitMix(seed: 0x5EED_3011)
        var outcomes: [String: Int] = [:]
        var undecodable = 0
        for i in 0..<Self.variants {
            /// Sends `message`, noting how it ended under `label` (`bytes`: what it came from).
            func deliver<M: SwiftProtobuf.Message & Sendable, R: SwiftProtobuf.Message & Sendable>(
                _ message: M, _ answer: R.Type, label: String, bytes: [UInt8]
            ) async {
                do {
                    _ = try await master.client.request(message, as: answer, timeout: .seconds(20))
                    outcomes["\(label): answered", default: 0] += 1
                } catch let error as ParleyError {
                    outcomes["\(label): \(error.code)", default: 0] += 1
                    #expect(!error.message.isEmpty, "variant \(i): \(label) refused without a reason")
                    #expect(error.code != .handlerFailed && error.code != .timeout, "variant \(i): \(label) \(bytes): \(error)")
                } catch {
                    Issue.record("variant \(i): \(label): \(error)")
                }
            }
            /// Sends `seed` mutated (when it still decodes).
            func send<M: SwiftProtobuf.Message & Sendable, R: SwiftProtobuf.Message & Sendable>(_ seed: M, _ answer: R.Type) async throws {
                let serialized: [UInt8] = try seed.serializedBytes()
                let bytes = Self.mutate(serialized, &rng)
                guard let message = try? M(serializedBytes: bytes) else {
                    undecodable += 1
                    return
                }
                await deliver(message, answer, label: M.protoMessageName, bytes: bytes)
            }
            switch Int.random(in: 0..<9, using: &rng) {
            case 0:
                // A spec mutated before it is signed: it passes the signature, and the
                // master's own checks decide.
                let mutated = Self.mutate(specBytes, &rng)
                guard (try? Parley_Work_V1_JobSpec(serializedBytes: mutated)) != nil else {
                    undecodable += 1
                    continue
                }
                var submit = Parley_Work_V1_SubmitJobs()
                submit.jobs = [try master.signed(mutated)]
                await deliver(submit, Parley_Work_V1_SubmitReply.self, label: "signed spec", bytes: mutated)
            case 1: try await send(hello, Parley_Work_V1_WorkerWelcome.self)
            case 2: try await send(asking, Parley_Work_V1_WorkAssignments.self)
            case 3: try await send(report, Parley_Work_V1_ReportAck.self)
            case 4: try await send(failure, Parley_Work_V1_ReportAck.self)
            case 5: try await send(InProcessMaster.renewal(of: lease), Parley_Work_V1_LeaseRenewed.self)
            case 6: try await send(back, Parley_Work_V1_HandBackReply.self)
            case 7: try await send(result, Parley_Work_V1_ResultReply.self)
            default:
                var submit = Parley_Work_V1_SubmitJobs()
                var job = try master.signed(specBytes)
                job.priority = 3
                job.maxAttempts = 2
                submit.jobs = [job]
                try await send(submit, Parley_Work_V1_SubmitReply.self)
            }
        }
        print("work mutations: \(Self.variants) variants, \(undecodable) no longer protobuf; \(outcomes.sorted { $0.key < $1.key })")
        #expect(outcomes.keys.contains { $0.hasSuffix("answered") } && outcomes.keys.contains { !$0.hasSuffix("answered") })

        // The store is whole: its counts add up to the jobs it holds, and a valid job still
        // goes through.
        let counts = try await master.store.counts()
        let status = try await master.client.request(Parley_Work_V1_StatusRequest(), as: Parley_Work_V1_StatusReply.self)
        #expect(Int(status.queued) == counts["queued"] && Int(status.leased) == counts["leased"])
        #expect(Int(status.succeeded) == counts["succeeded"] && Int(status.failed) == counts["failed"])
        let fresh = try #require(try await master.submit([InProcessMaster.spec(["/bin/true"])]).first)
        var answer = try await master.client.request(Parley_Work_V1_ResultRequest.with { $0.jobID = fresh }, as: Parley_Work_V1_ResultReply.self)
        #expect(answer.state == "queued", "\(answer)")
        var worker = Parley_Work_V1_RequestWork()
        worker.worker = "w-final"
        worker.slots = 1000
        var mine: Parley_Work_V1_Assignment?
        for _ in 0..<50 where mine == nil {
            let got = try await master.client.request(worker, as: Parley_Work_V1_WorkAssignments.self).assignments
            if got.isEmpty { break }
            mine = got.first { $0.jobID == fresh }
        }
        let assignment = try #require(mine, "the fresh job was never handed out")
        var done = Parley_Work_V1_ReportResult()
        done.worker = "w-final"
        done.jobID = assignment.jobID
        done.leaseID = assignment.leaseID
        let ack = try await master.client.request(done, as: Parley_Work_V1_ReportAck.self)
        #expect(ack.verdict == .accepted)
        answer = try await master.client.request(Parley_Work_V1_ResultRequest.with { $0.jobID = fresh }, as: Parley_Work_V1_ResultReply.self)
        #expect(answer.state == "succeeded", "\(answer)")
    }
}
