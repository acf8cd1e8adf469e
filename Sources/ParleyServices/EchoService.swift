import Parley

/// The built-in service of `parley serve`: echo, ping, a counting stream and a sleep.
public enum EchoService {
    /// Registers the service's handlers on a router.
    /// - Parameter name: the server name reported in `Pong`.
    public static func register(on router: inout ParleyRouter, name: String = "parley") {
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
    public static func router(name: String = "parley") -> ParleyRouter {
        var router = ParleyRouter()
        self.register(on: &router, name: name)
        return router
    }
}
