import NIOConcurrencyHelpers
import NIOCore
import Parley
import Synchronization

import Foundation

/// The built-in service of `parley serve`: echo, ping, a counting stream, a sleep, a one-way
/// ping answered by a one-way pong, and logged work.
public enum EchoService {
    /// Registers the service's handlers on a router.
    /// - Parameters:
    ///   - name: the server name reported in `Pong`.
    ///   - executionLog: a file to which each `Work` request's key is appended (a line) when
    ///     it starts running.
    public static func register(on router: inout ParleyRouter, name: String = "parley", executionLog: FileHandle? = nil) {
        // A one-way Ping is answered by a one-way Pong with the same sequence, in order.
        router.onMessage(Parley_Echo_V1_Ping.self) { ping, context in
            var pong = Parley_Echo_V1_Pong()
            pong.sequence = ping.sequence
            pong.serverName = name
            try context.connection.sendNow(pong)
        }
        // A one-way Echo is accepted and dropped: a sink for `parley send`.
        router.onMessage(Parley_Echo_V1_Echo.self) { (_: Parley_Echo_V1_Echo, _: ParleyRequestContext) throws in }
        let log = executionLog.map { NIOLockedValueBox($0) }
        router.on(Parley_Echo_V1_Work.self) { work, _ in
            if let log {
                // A failed write (disk full, a pipe whose reader left) fails the request, not the server.
                try log.withLockedValue { try $0.write(contentsOf: Data("\(work.key)\n".utf8)) }
            }
            if work.delayMs > 0 { try await Task.sleep(for: .milliseconds(Int(work.delayMs))) }
            var done = Parley_Echo_V1_WorkDone()
            done.key = work.key
            return done
        }
        router.onWithData(Parley_Echo_V1_Echo.self) { request, context in
            var reply = Parley_Echo_V1_EchoReply()
            reply.payload = request.payload
            reply.text = request.text
            return ParleyReply(reply, data: context.data)
        }
        router.on(Parley_Echo_V1_Ping.self) { request, _ in
            var pong = Parley_Echo_V1_Pong()
            pong.sequence = request.sequence
            pong.serverName = name
            return pong
        }
        router.onStream(Parley_Echo_V1_Count.self, item: Parley_Echo_V1_CountItem.self) { request, writer, _ in
            var done = Parley_Echo_V1_CountDone()
            do {
                for i in 0..<request.count {
                    if request.intervalMs > 0 { try await Task.sleep(for: .milliseconds(Int(request.intervalMs))) }
                    var item = Parley_Echo_V1_CountItem()
                    item.index = i
                    item.line = "line \(i + 1) of \(request.count)"
                    try await writer.send(item)
                    done.sent = i + 1
                }
            } catch is CancellationError {
                done.cancelled = true
            }
            return done
        }
        // DIRECT frames (docs/protocol.md 7.16): enabled before the grant is answered
        // (R-7.16-1); each request echoed in a DIRECT answer, after the grant's delay.
        router.on(Parley_Echo_V1_EnableDirect.self) { request, context in
            guard request.delayMs <= Self.maxDirectDelayMs else {
                throw ParleyError(code: .invalidArgument, message: "delay_ms \(request.delayMs) is over the echo service's limit of \(Self.maxDirectDelayMs)")
            }
            let delay = Int(request.delayMs)
            let connection = context.connection
            let pending = DelayedAnswers()
            try connection.enableDirect { direct in
                guard delay > 0 else { return direct.answer(Self.directEcho(of: direct)) }
                pending.add {
                    try await Task.sleep(for: .milliseconds(delay))
                    direct.answer(Self.directEcho(of: direct))
                }
            }
            if delay > 0 {
                // Answers still waiting when the connection ends are dropped, not kept.
                Task {
                    _ = await connection.closed()
                    pending.cancelAll()
                }
            }
            var granted = Parley_Echo_V1_DirectGranted()
            granted.delayMs = request.delayMs
            return granted
        }
        router.on(Parley_Echo_V1_Sleep.self) { request, _ in
            try await Task.sleep(for: .milliseconds(Int(request.delayMs)))
            var slept = Parley_Echo_V1_Slept()
            slept.delayMs = request.delayMs
            return slept
        }
    }

    /// The longest an `EnableDirect` may ask DIRECT answers to wait, in milliseconds: a client
    /// cannot make the server hold what it sent for longer (nor a drain wait longer).
    public static let maxDirectDelayMs: UInt32 = 10_000

    /// The echo of a DIRECT request: its segment 0 as sent (the id, then the rest) and its
    /// segment 1, if it had one.
    static func directEcho(of direct: ParleyDirectRequest) -> DirectFrame {
        var answer = DirectFrame(allocator: direct.connection.channelAllocator, id: direct.id, headerLength: direct.header.readableBytes,
                                 dataLength: direct.data?.readableBytes) { $0.copyBytes(from: direct.header.readableBytesView) }
        if let data = direct.data { answer.writeData(data) }
        return answer
    }

    /// A router with only this service.
    public static func router(name: String = "parley", executionLog: FileHandle? = nil) -> ParleyRouter {
        var router = ParleyRouter()
        self.register(on: &router, name: name, executionLog: executionLog)
        return router
    }
}

/// The delayed DIRECT answers of one connection: tasks that sleep, then answer; all cancelled
/// (their answers dropped) when the connection ends.
final class DelayedAnswers: Sendable {
    private struct State {
        var tasks: [Int: Task<Void, Never>] = [:]
        var next = 0
        var cancelled = false
    }
    private let state = Mutex(State())

    /// Runs `body` in a task of its own, unless the connection has ended.
    func add(_ body: @escaping @Sendable () async throws -> Void) {
        self.state.withLock { s in
            guard !s.cancelled else { return }
            let key = s.next
            s.next += 1
            // Made under the lock, so that it is in `tasks` before it can remove itself.
            s.tasks[key] = Task {
                try? await body()
                self.state.withLock { _ = $0.tasks.removeValue(forKey: key) }
            }
        }
    }

    /// Cancels every waiting answer, and any added later.
    func cancelAll() {
        let tasks = self.state.withLock { s -> [Task<Void, Never>] in
            s.cancelled = true
            defer { s.tasks = [:] }
            return Array(s.tasks.values)
        }
        tasks.forEach { $0.cancel() }
    }
}
