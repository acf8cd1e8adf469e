import NIOConcurrencyHelpers
import Parley

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
        router.on(Parley_Echo_V1_Sleep.self) { request, _ in
            try await Task.sleep(for: .milliseconds(Int(request.delayMs)))
            var slept = Parley_Echo_V1_Slept()
            slept.delayMs = request.delayMs
            return slept
        }
    }

    /// A router with only this service.
    public static func router(name: String = "parley", executionLog: FileHandle? = nil) -> ParleyRouter {
        var router = ParleyRouter()
        self.register(on: &router, name: name, executionLog: executionLog)
        return router
    }
}
