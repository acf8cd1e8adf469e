import Foundation
import ParleyTestSupport
import Logging
import NIOConcurrencyHelpers
import Parley
import SwiftProtobuf
import ParleyWork
import Testing
@testable import ParleyWorkBuildbot
#if canImport(Glibc)
import Glibc
#endif

/// A blocking TCP client on 127.0.0.1 for bad input: raw HTTP and hand-made WebSocket frames.
/// Its reads block a thread of their own (`onOwnThread`), never one of Swift's pool.
final class RawSocket: @unchecked Sendable {
    let fd: Int32

    init(port: Int) throws {
        // 30 s: in a full parallel run on a loaded machine the master's first frame once came
        // later than 10 s (two runs of 2026-12-01 failed credentialsAreCheckedAtTheUpgrade so).
        self.fd = try connectLoopback(port: port, timeoutSeconds: 30)
    }

    deinit { close(self.fd) }

    func send(_ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { Glibc.send(self.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    func send(_ text: String) { self.send(Array(text.utf8)) }

    /// Reads until `count` bytes came, or the peer closed, or 30 s passed.
    func receive(atLeast count: Int = .max) async -> [UInt8] {
        await onOwnThread { self.receiveBlocking(atLeast: count) }
    }

    /// Bytes read past the last whole frame (the next frame's start): read first.
    private var leftover: [UInt8] = []
    /// True once a read found the peer's end of the stream (not a read timeout).
    private(set) var peerClosed = false

    func receiveBlocking(atLeast count: Int = .max) -> [UInt8] {
        var out = self.leftover
        self.leftover = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while out.count < count {
            let n = buffer.withUnsafeMutableBytes { recv(self.fd, $0.baseAddress, $0.count, 0) }
            if n == 0 || (n < 0 && errno == ECONNRESET) { self.peerClosed = true }
            if n <= 0 { break }
            out += buffer[0..<n]
        }
        return out
    }

    /// Reads the HTTP response head (up to the blank line).
    func head() async -> String {
        await onOwnThread { self.headBlocking() }
    }

    func headBlocking() -> String {
        var out: [UInt8] = []
        while !out.suffix(4).elementsEqual([13, 10, 13, 10]) {
            var byte: UInt8 = 0
            guard recv(self.fd, &byte, 1, 0) == 1 else { break }
            out.append(byte)
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// One whole frame from the server (unmasked): opcode and payload.
    func frame() async -> (opcode: UInt8, payload: [UInt8])? {
        await onOwnThread { self.frameBlocking() }
    }

    func frameBlocking() -> (opcode: UInt8, payload: [UInt8])? {
        let header = self.receiveBlocking(atLeast: 2)
        guard header.count >= 2 else { return nil }
        var length = Int(header[1] & 0x7f)
        var rest = Array(header[2...])
        func need(_ n: Int) { if rest.count < n { rest += self.receiveBlocking(atLeast: n - rest.count) } }
        if length == 126 {
            need(2)
            length = Int(rest[0]) << 8 | Int(rest[1])
            rest.removeFirst(2)
        } else if length == 127 {
            need(8)
            length = rest[0..<8].reduce(0) { $0 << 8 | Int($1) }
            rest.removeFirst(8)
        }
        need(length)
        guard rest.count >= length else { return nil }
        self.leftover = Array(rest.dropFirst(length))
        return (header[0] & 0x0f, Array(rest.prefix(length)))
    }

    /// A client frame: FIN, the opcode, masked as RFC 6455 requires.
    static func frame(opcode: UInt8, _ payload: [UInt8], mask: [UInt8] = [1, 2, 3, 4]) -> [UInt8] {
        var out: [UInt8] = [0x80 | opcode]
        if payload.count < 126 {
            out.append(0x80 | UInt8(payload.count))
        } else {
            out.append(0x80 | 126)
            out += [UInt8(payload.count >> 8), UInt8(payload.count & 0xff)]
        }
        out += mask
        out += payload.enumerated().map { $0.element ^ mask[$0.offset % 4] }
        return out
    }
}

@Suite(.serialized) struct BuildbotListenerTests {
    /// A front end on a fresh SQLite store and keyring, for `body`; stopped afterwards.
    static func withFrontEnd(
        callTimeout: Duration = .seconds(20), grace: Duration = .seconds(60), keepalive: Duration? = nil, upgradeTimeout: Duration? = nil, _ body: (_ port: Int, _ password: String, _ store: SQLiteWorkStore) async throws -> Void
    ) async throws {
        let dir = testScratchPath("bb-listener-\(UUID().uuidString)")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let key = (0..<32).map { UInt8($0) }
        var keyring = ParleyKeyring()
        keyring.entities.append(.init(name: "bb1", key: key, caps: ["work.worker"], created: Date()))
        try keyring.save(path: dir + "/keyring.json")
        let store = try SQLiteWorkStore(path: dir + "/jobs.sqlite")
        var configuration = BuildbotFrontEnd.Configuration(host: "127.0.0.1", port: 0, keyringPath: dir + "/keyring.json")
        configuration.listener.callTimeout = callTimeout
        configuration.commandGrace = grace
        if let keepalive { configuration.keepaliveInterval = keepalive }
        if let upgradeTimeout { configuration.listener.upgradeTimeout = upgradeTimeout }
        let port = AsyncStream<Int>.makeStream()
        let frontEnd = BuildbotFrontEnd(configuration: configuration, store: store, commands: nil, logger: Logger(label: "test"), onListening: { port.continuation.yield($0) })
        let running = Task { try await frontEnd.run() }
        defer { running.cancel() }
        var iterator = port.stream.makeAsyncIterator()
        let bound = try #require(await iterator.next())
        try await body(bound, Data(key).base64EncodedString(), store)
    }

    /// What a scripted worker's `answer` may do: send a message, or complete the command a
    /// start_command body names (with the worker's next seq).
    struct WorkerSide {
        let send: (MessagePack) -> Void
        let complete: (MessagePack) -> Void
        /// Sends an update (its args, e.g. `[["rc", 1]]`) for the command a start_command
        /// body names (with the worker's next seq).
        let update: (MessagePack, MessagePack) -> Void
        /// Sends what `body` sends in one write (one TCP segment on loopback): the master
        /// reads its messages back to back.
        let together: (() -> Void) -> Void
        /// Sends bytes as they are (a close frame: `RawSocket.frame(opcode: 8, ...)`).
        let raw: ([UInt8]) -> Void
    }

    /// Logs in as bb1 and plays the worker: each request of the master goes to `answer`
    /// (its op, seq and body), which returns false to give the default answer instead:
    /// get_worker_info a scripted basedir, anything else an empty response. Returns true when
    /// the master dropped the worker (a close frame or the end of the stream, not the
    /// socket's read timeout), false after `seconds` or 500 frames.
    static func scriptedWorker(
        port: Int, password: String, seconds: Int = 25,
        _ answer: (_ op: String, _ seq: Int64, _ body: MessagePack, _ worker: WorkerSide) throws -> Bool
    ) async throws -> Bool {
        let socket = try RawSocket(port: port)
        socket.send(Self.upgrade(Self.basic("bb1", password)))
        #expect(await socket.head().hasPrefix("HTTP/1.1 101"))
        var batch: [UInt8]?
        func send(_ message: MessagePack) {
            let frame = RawSocket.frame(opcode: 2, message.encoded())
            if batch != nil { batch! += frame } else { socket.send(frame) }
        }
        var seq: Int64 = 0
        let side = WorkerSide(send: send, complete: { body in
            guard let id = body["command_id"] else { return }
            send(BuildbotMessage.request(op: "complete", seq: seq, [("command_id", id), ("args", .nil)]))
            seq += 1
        }, update: { body, args in
            guard let id = body["command_id"] else { return }
            send(BuildbotMessage.request(op: "update", seq: seq, [("command_id", id), ("args", args)]))
            seq += 1
        }, together: { body in
            batch = []
            body()
            let bytes = batch ?? []
            batch = nil
            socket.send(bytes)
        }, raw: { bytes in
            if batch != nil { batch! += bytes } else { socket.send(bytes) }
        })
        let started = ContinuousClock.now
        for _ in 0..<500 where ContinuousClock.now - started < .seconds(seconds) {
            guard let frame = await socket.frame() else { return socket.peerClosed }
            if frame.opcode == 8 { return true }
            guard frame.opcode == 2, case .request(let op, let n, let body) = try BuildbotMessage.parse(try MessagePack.decode(frame.payload)) else { continue }
            if try answer(op, n, body, side) { continue }
            let result: MessagePack = op == "get_worker_info" ? .object(["basedir": "/scripted", "version": "scripted", "numcpus": 1]) : .nil
            send(BuildbotMessage.response(seq: n, result: result))
        }
        return false
    }

    static func upgrade(_ authorization: String?, websocket: Bool = true) -> String {
        var request = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if websocket { request += "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" }
        if let authorization { request += "Authorization: \(authorization)\r\n" }
        return request + "\r\n"
    }

    static func basic(_ name: String, _ password: String) -> String { "Basic " + Data("\(name):\(password)".utf8).base64EncodedString() }

    @Test func credentialsAreCheckedAtTheUpgrade() async throws {
        try await Self.withFrontEnd { port, password, _ in
            let missing = try RawSocket(port: port)
            missing.send(Self.upgrade(nil))
            let noAuth = await String(decoding: missing.receive(), as: UTF8.self)
            #expect(noAuth.hasPrefix("HTTP/1.1 401") && noAuth.contains("WWW-Authenticate: Basic") && noAuth.contains("no Authorization header"), "\(noAuth)")
            let wrong = try RawSocket(port: port)
            wrong.send(Self.upgrade(Self.basic("bb1", password + "x")))
            let refused = await String(decoding: wrong.receive(), as: UTF8.self)
            #expect(refused.hasPrefix("HTTP/1.1 401") && refused.contains("unknown worker name or wrong password"), "\(refused)")
            let stranger = try RawSocket(port: port)
            stranger.send(Self.upgrade(Self.basic("nobody", password)))
            await #expect(String(decoding: stranger.receive(), as: UTF8.self).hasPrefix("HTTP/1.1 401"))
            let malformed = try RawSocket(port: port)
            malformed.send(Self.upgrade("Basic !!!"))
            let bad = await String(decoding: malformed.receive(), as: UTF8.self)
            #expect(bad.hasPrefix("HTTP/1.1 400") && bad.contains("not base64"), "\(bad)")
            let plain = try RawSocket(port: port)
            plain.send(Self.upgrade(Self.basic("bb1", password), websocket: false))
            await #expect(String(decoding: plain.receive(), as: UTF8.self).hasPrefix("HTTP/1.1 426"))
            let good = try RawSocket(port: port)
            good.send(Self.upgrade(Self.basic("bb1", password)))
            await #expect(good.head().hasPrefix("HTTP/1.1 101"))
            // The master speaks first, as Buildbot's does: print "attached".
            let first = try #require(await good.frame())
            let message = try MessagePack.decode(first.payload)
            #expect(first.opcode == 2 && message["op"] == "print" && message["message"] == "attached" && message["seq_number"] == 0)
        }
    }

    /// Bad messages after the upgrade: a close frame naming what was wrong, then the end of
    /// the connection; the store untouched (its one job still queued).
    @Test func badMessagesCloseTheConnectionWithAReason() async throws {
        try await Self.withFrontEnd { port, password, store in
            _ = try await store.submit([NewJob(spec: [1], signature: [2])], now: WorkService.now())
            let cases: [([UInt8], UInt16, String)] = [
                (RawSocket.frame(opcode: 2, [0xc1]), 1007, "reserved byte 0xc1"),
                (RawSocket.frame(opcode: 2, [0x93, 0x01]), 1007, "truncated"),
                (RawSocket.frame(opcode: 2, MessagePack.array([]).encoded()), 1007, "must be a map"),
                (RawSocket.frame(opcode: 2, BuildbotMessage.response(seq: 99).encoded()), 1007, "never sent"),
                (RawSocket.frame(opcode: 2, [UInt8](repeating: 0x91, count: 200) + [0xc0]), 1007, "nested deeper"),
            ]
            for (frame, code, text) in cases {
                let socket = try RawSocket(port: port)
                socket.send(Self.upgrade(Self.basic("bb1", password)))
                await #expect(socket.head().hasPrefix("HTTP/1.1 101"))
                _ = await socket.frame()  // print "attached"
                socket.send(frame)
                let close = try #require(await socket.frame(), "no close frame for \(text)")
                #expect(close.opcode == 8)
                if close.payload.count >= 2 {
                    let got = UInt16(close.payload[0]) << 8 | UInt16(close.payload[1])
                    let reason = String(decoding: close.payload.dropFirst(2), as: UTF8.self)
                    #expect(got == code && reason.contains(text), "\(got) \(reason)")
                }
                await #expect(socket.receive().isEmpty, "the connection stays open after \(text)")
            }
            // A frame that breaks WebSocket itself (a ping longer than 125 bytes): closed.
            let socket = try RawSocket(port: port)
            socket.send(Self.upgrade(Self.basic("bb1", password)))
            await #expect(socket.head().hasPrefix("HTTP/1.1 101"))
            _ = await socket.frame()
            socket.send(RawSocket.frame(opcode: 9, [UInt8](repeating: 0, count: 200)))
            var closed = false
            for _ in 0..<5 {
                guard let f = await socket.frame() else { closed = true; break }
                if f.opcode == 8 { closed = await socket.receive().isEmpty; break }
            }
            #expect(closed)
            #expect(try await store.counts()["queued"] == 1)
        }
    }

    /// A worker that never ends a job's command (the stock worker ends it at maxTime; this
    /// one ignores the limit and the interrupt): past max_wall_seconds and the grace the
    /// master interrupts it, past the grace again it fails the job (an attempt counted, the
    /// reason named) and drops the worker, instead of holding the job for ever. One that
    /// does not even answer the interrupt is closed at the call timeout: the job fails so too
    /// (not handed back as if the worker had merely gone away), and the reason says the
    /// connection ended (with a grace longer than the call timeout, so that it must).
    @Test(arguments: [true, false]) func aJobsCommandThatOutlivesItsDeadlineFailsTheJobAndDropsTheWorker(answersInterrupt: Bool) async throws {
        let grace: Duration = answersInterrupt ? .seconds(1) : .seconds(20)
        let callTimeout: Duration = answersInterrupt ? .seconds(20) : .seconds(8)
        try await Self.withFrontEnd(callTimeout: callTimeout, grace: grace) { port, password, store in
            var spec = Parley_Work_V1_JobSpec()
            spec.argv = ["sleep", "1000"]
            spec.maxWallSeconds = 1
            let job = try #require(try await store.submit([NewJob(spec: try spec.serializedBytes(), signature: [2])], now: WorkService.now()).first)
            // The worker's side, scripted: it answers every request and ends every command
            // at once except the shell, which it leaves running, interrupt or not.
            var shell: MessagePack?, interrupted: MessagePack?, shellStarted: ContinuousClock.Instant?
            let closed = try await Self.scriptedWorker(port: port, password: password, seconds: 60) { op, n, body, worker in
                switch op {
                case "start_command":
                    worker.send(BuildbotMessage.response(seq: n))
                    if body["command_name"] == "shell" {
                        shell = body["command_id"]
                        shellStarted = ContinuousClock.now
                    } else {
                        worker.complete(body)
                    }
                case "interrupt_command":
                    interrupted = body["command_id"]
                    if answersInterrupt { worker.send(BuildbotMessage.response(seq: n)) }
                default:
                    return false
                }
                return true
            }
            #expect(closed, "the master dropped the worker")
            #expect(shell != nil && interrupted == shell, "the shell command \(String(describing: shell)) was interrupted: \(String(describing: interrupted))")
            if let shellStarted {
                let least = .seconds(1) + grace + (answersInterrupt ? grace : callTimeout)
                #expect(ContinuousClock.now - shellStarted >= least, "not before max_wall_seconds, the grace, and the grace again or the call timeout")
            }
            // A worker closed at the call timeout is gone before the report is stored: wait
            // for it (bounded), so that a job handed back shows as such.
            var record = try #require(try await store.job(job)?.record)
            for _ in 0..<100 where record.failures.isEmpty {
                try await Task.sleep(for: .milliseconds(100))
                record = try #require(try await store.job(job)?.record)
            }
            #expect(record.leases.count == 1)
            #expect(record.failures.count == 1 && record.failures[0].contains("did not end the command within max_wall_seconds (1 s)"), "\(record.failures)")
            let why = answersInterrupt ? "interrupted, it did not end within" : "its connection ended after the interrupt was due"
            #expect(record.failures.first?.contains(why) == true, "\(record.failures)")
            #expect(record.state == .queued, "an attempt counted, the job queued again for another worker")
        }
    }

    /// A job whose worker goes away while it runs is handed back uncounted twice; the third
    /// time the loss counts as a failed attempt, so that a job that kills its worker fails
    /// after its attempts instead of going from worker to worker for ever.
    @Test func aJobWhoseWorkerKeepsGoingAwayFailsAfterTwoUncountedLosses() async throws {
        try await Self.withFrontEnd { port, password, store in
            var spec = Parley_Work_V1_JobSpec()
            spec.argv = ["sleep", "1000"]
            let job = try #require(try await store.submit([NewJob(spec: try spec.serializedBytes(), signature: [2], maxAttempts: 1)], now: WorkService.now()).first)
            struct Gone: Error {}
            for round in 1...3 {
                do {
                    _ = try await Self.scriptedWorker(port: port, password: password) { op, n, body, worker in
                        guard op == "start_command" else { return false }
                        worker.send(BuildbotMessage.response(seq: n))
                        // The job's command starts: the worker goes away (its socket closes).
                        if body["command_name"] == "shell" { throw Gone() }
                        worker.complete(body)
                        return true
                    }
                    Issue.record("round \(round): the job's command never started")
                } catch is Gone {}
                var record = try #require(try await store.job(job)?.record)
                for _ in 0..<150 {
                    let settled = round < 3 ? record.state == .queued : !record.failures.isEmpty
                    if settled { break }
                    try await Task.sleep(for: .milliseconds(100))
                    record = try #require(try await store.job(job)?.record)
                }
                if round < 3 {
                    #expect(record.state == .queued && record.leases.isEmpty && record.failures.isEmpty, "round \(round): handed back uncounted: \(record)")
                } else {
                    #expect(record.failures.count == 1 && record.failures[0].contains("went away while the job ran (3 times on this master)"), "\(record.failures)")
                    guard case .failed = record.state else {
                        Issue.record("the job did not fail after its one attempt: \(record.state)")
                        return
                    }
                }
            }
        }
    }

    /// A job of one attempt that runs for ever, and a scripted login `n` of bb1 that takes its
    /// shell command and holds it (setting `holding` to `n`); with `endsInterrupted`, it ends
    /// the held command when the master interrupts it, then answers the interrupt.
    static func holdingWorker(
        port: Int, password: String, _ n: Int, holding: NIOLockedValueBox<Int>, endsInterrupted: Bool
    ) -> Task<Bool, any Error> {
        Task {
            var held: MessagePack?
            return try await Self.scriptedWorker(port: port, password: password, seconds: 40) { op, seq, body, side in
                switch op {
                case "start_command":
                    side.send(BuildbotMessage.response(seq: seq))
                    if body["command_name"] == "shell" { held = body; holding.withLockedValue { $0 = n } } else { side.complete(body) }
                    return true
                case "interrupt_command" where endsInterrupted:
                    // The command ends, then the interrupt is answered (the master closes the
                    // session once it has its answer).
                    if let held { side.complete(held) }
                    side.send(BuildbotMessage.response(seq: seq))
                    return true
                default:
                    return false
                }
            }
        }
    }

    static func foreverJob(_ store: any WorkStore) async throws -> UInt64 {
        var spec = Parley_Work_V1_JobSpec()
        spec.argv = ["sleep", "1000"]
        return try #require(try await store.submit([NewJob(spec: try spec.serializedBytes(), signature: [2], maxAttempts: 1)], now: WorkService.now()).first)
    }

    /// A job whose worker logs in again while it runs (its link lost, as the master sees it)
    /// is handed back uncounted however often: the master ended the old session, the job
    /// did not kill it.
    @Test func aJobWhoseWorkerLogsInAgainIsNotCountedAsLost() async throws {
        try await Self.withFrontEnd { port, password, store in
            let job = try await Self.foreverJob(store)
            let holding = NIOLockedValueBox(0)
            var workers: [Task<Bool, any Error>] = []
            for n in 1...4 {
                workers.append(Self.holdingWorker(port: port, password: password, n, holding: holding, endsInterrupted: false))
                var held = false
                for _ in 0..<200 where !held {
                    try await Task.sleep(for: .milliseconds(100))
                    held = holding.withLockedValue { $0 } == n
                }
                #expect(held, "login \(n) never got the job")
                let record = try #require(try await store.job(job)?.record)
                #expect(record.failures.isEmpty && record.leases.count == 1, "login \(n): \(record)")
            }
            for w in workers { w.cancel() }
        }
    }

    /// The same when the worker ends the interrupted command, as a real worker does: the
    /// command's end (a failure) is not the job's failure, and the job is handed back.
    @Test func aJobInterruptedBecauseItsWorkerLoggedInAgainIsHandedBack() async throws {
        try await Self.withFrontEnd { port, password, store in
            let job = try await Self.foreverJob(store)
            let holding = NIOLockedValueBox(0)
            let first = Self.holdingWorker(port: port, password: password, 1, holding: holding, endsInterrupted: true)
            for _ in 0..<200 where holding.withLockedValue({ $0 }) != 1 { try await Task.sleep(for: .milliseconds(100)) }
            #expect(holding.withLockedValue { $0 } == 1, "the first login never got the job")
            let second = Self.holdingWorker(port: port, password: password, 2, holding: holding, endsInterrupted: true)
            for _ in 0..<200 where holding.withLockedValue({ $0 }) != 2 { try await Task.sleep(for: .milliseconds(100)) }
            #expect(holding.withLockedValue { $0 } == 2, "the second login never got the job")
            let record = try #require(try await store.job(job)?.record)
            #expect(record.failures.isEmpty && record.leases.count == 1, "\(record)")
            first.cancel()
            second.cancel()
        }
    }

    /// The master's stop (the worker logged in again) interrupts what runs then; a step
    /// the job starts after, while the stop waits for the interrupt's answer, that fails on
    /// its own (here the shell, rc 1) is the job's failure: counted, not handed back. The
    /// interrupted step (the job's mkdir) completed first. Before, any command interrupted
    /// by the stop handed the failed job back.
    @Test func aJobFailingOnItsOwnAfterTheStopInterruptedAnEarlierStepIsCounted() async throws {
        try await Self.withFrontEnd { port, password, store in
            var spec = Parley_Work_V1_JobSpec()
            spec.argv = ["false"]
            let job = try #require(try await store.submit([NewJob(spec: try spec.serializedBytes(), signature: [2], maxAttempts: 1)], now: WorkService.now()).first)
            let heldMkdir = NIOLockedValueBox(false)
            let first = Task {
                var mkdirs = 0
                var mkdir: MessagePack?
                var interrupt: Int64?
                return try await Self.scriptedWorker(port: port, password: password, seconds: 40) { op, seq, body, side in
                    switch op {
                    case "start_command":
                        side.send(BuildbotMessage.response(seq: seq))
                        if body["command_name"] == "mkdir" {
                            mkdirs += 1
                            // The session's own mkdir completes; the job's is held.
                            if mkdirs == 1 { side.complete(body) } else { mkdir = body; heldMkdir.withLockedValue { $0 = true } }
                        } else if body["command_name"] == "shell" {
                            // The job's shell fails on its own; then the interrupt is answered,
                            // in the same write: the master must serve the shell's end before
                            // it closes the connection at the answer.
                            side.together {
                                side.update(body, .array([.array(["rc", 1])]))
                                side.complete(body)
                                if let interrupt { side.send(BuildbotMessage.response(seq: interrupt)) }
                            }
                        } else {
                            side.complete(body)
                        }
                        return true
                    case "interrupt_command":
                        // The held mkdir completes (the job goes on to its shell); the
                        // interrupt is answered once the shell has ended.
                        if let mkdir { side.complete(mkdir) }
                        interrupt = seq
                        return true
                    default:
                        return false
                    }
                }
            }
            defer { first.cancel() }
            for _ in 0..<200 where !heldMkdir.withLockedValue({ $0 }) { try await Task.sleep(for: .milliseconds(50)) }
            #expect(heldMkdir.withLockedValue { $0 }, "the job's mkdir never came")
            // The worker logs in again: the master stops the first session. This one holds
            // every command it is given (a job handed back would stay leased to it).
            let second = Task {
                try await Self.scriptedWorker(port: port, password: password, seconds: 40) { op, seq, body, side in
                    guard op == "start_command" else { return false }
                    side.send(BuildbotMessage.response(seq: seq))
                    if body["command_name"] == "mkdir", body["args"]?["paths"]?.arrayValue?.count == 2 { side.complete(body) }
                    return true
                }
            }
            defer { second.cancel() }
            var record = try #require(try await store.job(job)?.record)
            for _ in 0..<200 where !record.isFinished {
                try await Task.sleep(for: .milliseconds(50))
                record = try #require(try await store.job(job)?.record)
            }
            #expect(record.isFinished && record.failures.count == 1 && record.leases.count == 1, "\(record)")
            #expect(record.failures.first?.contains("exit status 1") == true || record.failures.first?.contains("rc 1") == true, "\(record.failures)")
        }
    }

    /// A worker that ends the job's command and then its connection, all in one write: the
    /// command's end, received before the close, is the job's (reported, a success here),
    /// not lost with the connection (the job handed back as if the worker went away first).
    @Test func aCommandsEndThatCameBeforeTheWorkersCloseIsTheJobs() async throws {
        try await Self.withFrontEnd { port, password, store in
            var spec = Parley_Work_V1_JobSpec()
            spec.argv = ["true"]
            let job = try #require(try await store.submit([NewJob(spec: try spec.serializedBytes(), signature: [2], maxAttempts: 1)], now: WorkService.now()).first)
            let dropped = try await Self.scriptedWorker(port: port, password: password) { op, seq, body, side in
                guard op == "start_command" else { return false }
                side.send(BuildbotMessage.response(seq: seq))
                if body["command_name"] == "shell" {
                    side.together {
                        side.update(body, .array([.array(["rc", 0])]))
                        side.complete(body)
                        side.raw(RawSocket.frame(opcode: 8, [0x03, 0xe8]))
                    }
                } else {
                    side.complete(body)
                }
                return true
            }
            #expect(dropped, "the master did not end the connection after the worker's close")
            var record = try #require(try await store.job(job)?.record)
            for _ in 0..<100 where !record.isFinished && record.leases.isEmpty == false {
                try await Task.sleep(for: .milliseconds(50))
                record = try #require(try await store.job(job)?.record)
            }
            #expect(record.isFinished && record.failures.isEmpty && record.leases.count == 1, "\(record)")
        }
    }

    /// A worker that answers keepalives but never completes a job's step (here its mkdir):
    /// the step's deadline (the call timeout) fails the job, an attempt counted, and drops
    /// the worker, instead of holding the job, its lease renewed, for ever.
    @Test func aStepTheWorkerNeverCompletesFailsTheJobAndDropsTheWorker() async throws {
        try await Self.withFrontEnd(callTimeout: .seconds(2), keepalive: .milliseconds(500)) { port, password, store in
            var spec = Parley_Work_V1_JobSpec()
            spec.argv = ["true"]
            let job = try #require(try await store.submit([NewJob(spec: try spec.serializedBytes(), signature: [2])], now: WorkService.now()).first)
            var mkdirs = 0
            let closed = try await Self.scriptedWorker(port: port, password: password) { op, n, body, worker in
                guard op == "start_command" else { return false }
                worker.send(BuildbotMessage.response(seq: n))
                mkdirs += 1
                // The session's own mkdir completes; the job's never does.
                if mkdirs == 1 { worker.complete(body) }
                return true
            }
            #expect(closed, "the master kept a worker whose step never completed")
            var record = try #require(try await store.job(job)?.record)
            for _ in 0..<100 where record.failures.isEmpty {
                try await Task.sleep(for: .milliseconds(100))
                record = try #require(try await store.job(job)?.record)
            }
            #expect(record.failures.count == 1 && record.failures[0].contains("did not complete mkdir within"), "\(record.failures)")
        }
    }

    /// Connections that never become a logged-in WebSocket (silent, a request cut short, a
    /// refused login kept open) are closed after the upgrade timeout, not held for ever (each
    /// holds a descriptor: enough of them and nothing could be accepted or opened); a
    /// logged-in worker is not.
    @Test func connectionsThatNeverLogInAreClosed() async throws {
        try await Self.withFrontEnd(upgradeTimeout: .seconds(1)) { port, password, _ in
            let silent = try RawSocket(port: port)
            let partial = try RawSocket(port: port)
            partial.send("GET / HTTP/1.1\r\nHost: 1")
            let refused = try RawSocket(port: port)
            refused.send("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n")
            let worker = try RawSocket(port: port)
            worker.send(Self.upgrade(Self.basic("bb1", password)))
            await #expect(worker.head().hasPrefix("HTTP/1.1 101"))
            let started = ContinuousClock.now
            for socket in [silent, partial, refused] {
                _ = await socket.receive()
                #expect(socket.peerClosed)
            }
            #expect(ContinuousClock.now - started < .seconds(25), "closed by the upgrade timeout, not the test socket's 30 s")
            // The logged-in worker outlived the timeout: answered now, the master's requests
            // (print, get_worker_info) are followed by its next one.
            var requests: [String] = []
            for _ in 0..<3 {
                guard let frame = await worker.frame(), frame.opcode == 2,
                      case .request(let op, let n, _) = try BuildbotMessage.parse(try MessagePack.decode(frame.payload)) else { break }
                requests.append(op)
                let result: MessagePack = op == "get_worker_info" ? .object(["basedir": "/scripted", "version": "scripted", "numcpus": 1]) : .nil
                worker.send(RawSocket.frame(opcode: 2, BuildbotMessage.response(seq: n, result: result).encoded()))
            }
            #expect(requests == ["print", "get_worker_info", "set_worker_settings"] && !worker.peerClosed, "\(requests)")
        }
    }

    /// A worker that answers a keepalive with an exception is dropped, not kept without
    /// keepalives: the keyring check before each keepalive (which shuts a revoked worker
    /// down) would otherwise end for the rest of its session.
    @Test func aKeepaliveAnsweredWithAnExceptionDropsTheWorker() async throws {
        try await Self.withFrontEnd(keepalive: .milliseconds(300)) { port, password, _ in
            var keepalives = 0
            let closed = try await Self.scriptedWorker(port: port, password: password, seconds: 20) { op, n, body, worker in
                switch op {
                case "keepalive":
                    keepalives += 1
                    worker.send(BuildbotMessage.response(seq: n, result: "no", exception: true))
                case "start_command":
                    // The master's mkdir: done at once.
                    worker.send(BuildbotMessage.response(seq: n))
                    worker.complete(body)
                default:
                    return false
                }
                return true
            }
            #expect(closed, "the master kept a worker whose keepalive failed")
            #expect(keepalives == 1)
        }
    }

    /// A worker that sends requests and does not read the answers is held back by TCP (the
    /// master stops reading once it cannot answer), not buffered by the master without
    /// bound; once it reads, every request is answered.
    @Test func aWorkerThatDoesNotReadIsHeldBack() async throws {
        // The master's own first request (print) stays unanswered for the whole test.
        try await Self.withFrontEnd(callTimeout: .seconds(300)) { port, password, _ in
            let socket = try RawSocket(port: port)
            socket.send(Self.upgrade(Self.basic("bb1", password)))
            await #expect(socket.head().hasPrefix("HTTP/1.1 101"))
            var timeout = timeval(tv_sec: 2, tv_usec: 0)
            setsockopt(socket.fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            // Each request for a command that does not run is answered with an exception that
            // repeats its 8 KiB command id: answers as large as the requests.
            let id = String(repeating: "x", count: 8192)
            let cap = 256 << 20  // above what the sockets' buffers hold (tcp_rmem's maximum is 32 MiB here)
            @Sendable func frame(_ n: Int) -> [UInt8] {
                RawSocket.frame(opcode: 2, BuildbotMessage.request(op: "update", seq: Int64(n), [("command_id", .string(id))]).encoded())
            }
            // Sends until a send waits 2 s (held back) or `cap` bytes went (not held back);
            // returns the frames begun and what is left of the last one.
            let (frames, heldBack, leftover) = await onOwnThread { () -> (Int, Bool, [UInt8]) in
                var sent = 0
                var frames = 0
                while sent < cap {
                    var rest = frame(frames + 1)[...]
                    frames += 1
                    while !rest.isEmpty {
                        let n = rest.withUnsafeBytes { Glibc.send(socket.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                        if n <= 0 { return (frames, true, Array(rest)) }
                        rest = rest.dropFirst(n)
                        sent += n
                    }
                }
                return (frames, false, [])
            }
            #expect(heldBack, "the master took \(cap) bytes of requests it could not answer")
            // Now read: the rest of the last frame goes out meanwhile, and every request is answered.
            let finish = Task { await onOwnThread { () -> Bool in
                var rest = leftover[...]
                for _ in 0..<30 where !rest.isEmpty {  // each try waits at most 2 s (SO_SNDTIMEO)
                    let n = rest.withUnsafeBytes { Glibc.send(socket.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                    if n > 0 { rest = rest.dropFirst(n) }
                }
                return rest.isEmpty
            } }
            // Frames come back to back here: read and parsed in one buffer, without frame().
            let answered = await onOwnThread { () -> Set<Int64> in
                var answered = Set<Int64>()
                var input: [UInt8] = []
                var at = 0
                for _ in 0..<(frames + 16) where answered.count < frames {
                    func need(_ n: Int) -> Bool {
                        while input.count - at < n {
                            let more = socket.receiveBlocking(atLeast: 1)
                            if more.isEmpty { return false }
                            input = Array(input[at...]) + more
                            at = 0
                        }
                        return true
                    }
                    guard need(2) else { break }
                    let opcode = input[at] & 0x0f
                    var length = Int(input[at + 1] & 0x7f)
                    var header = 2
                    if length == 126 {
                        guard need(4) else { break }
                        length = Int(input[at + 2]) << 8 | Int(input[at + 3])
                        header = 4
                    } else if length == 127 {
                        guard need(10) else { break }
                        length = input[(at + 2)..<(at + 10)].reduce(0) { $0 << 8 | Int($1) }
                        header = 10
                    }
                    guard need(header + length) else { break }
                    let payload = input[(at + header)..<(at + header + length)]
                    at += header + length
                    guard opcode == 2, let m = try? MessagePack.decode(payload, limits: .init()),
                          m["op"]?.stringValue == "response", let seq = m["seq_number"]?.intValue else { continue }
                    answered.insert(seq)
                }
                return answered
            }
            #expect(await finish.value, "the last request could not be sent")
            #expect(answered.count == frames, "\(answered.count) of \(frames) requests answered")
        }
    }
}
