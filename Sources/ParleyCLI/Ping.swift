import ArgumentParser
import Foundation
import Logging
import NIOCore
import Parley
import ParleyServices

struct Ping: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure round trips to a Parley server.",
        discussion: """
            Connects, prints what the handshake negotiated (protocol version, features, auth
            method, the server's identity and any server messages, request delay or
            redirects), then sends COUNT Ping requests one after another and prints
            min/median/p99 round-trip times. Exits non-zero if the server cannot be reached
            or refuses the session.
            """
    )

    @Argument(help: ArgumentHelp("Server address: HOST:PORT, [V6]:PORT, unix:PATH, tls://HOST:PORT, ws://HOST:PORT/PATH or wss://HOST:PORT/PATH.", valueName: "address"))
    var address: String

    @Option(name: .shortAndLong, help: "Number of round trips.")
    var count: Int = 10

    @Option(name: .long, help: "Bytes of payload per request (0: a Ping; more: an Echo of that size).")
    var size: Int = 0

    @Option(name: .long, help: "Record the bytes received from the server in this file (see `parley decode`).")
    var captureIn: String?

    @Option(name: .long, help: "Record the bytes sent to the server in this file.")
    var captureOut: String?

    @Flag(name: .long, help: "Print only the summary line.")
    var quiet = false

    @OptionGroup var security: ClientSecurityOptions

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        do { _ = try ParleyAddress(parsing: self.address) } catch { throw ValidationError(error.message) }
        guard self.count >= 1 else { throw ValidationError("--count must be at least 1") }
        guard (0...(16 << 20)).contains(self.size) else { throw ValidationError("--size must be 0...16777216") }
        try self.security.check(address: try ParleyAddress(parsing: self.address))
    }

    func run() async throws {
        self.logging.bootstrap()
        let address = try ParleyAddress(parsing: self.address)
        let client: ParleyClient
        do {
            var configuration = ParleyClient.Configuration(name: "parley-ping", captureInbound: self.captureIn, captureOutbound: self.captureOut)
            try self.security.apply(to: &configuration, address: address)
            client = try await ParleyClient.connect(
                to: address, configuration: configuration,
                logger: Logger(label: "parley.ping")
            )
        } catch let error as ParleyError {
            print("parley ping: \(error.message) [\(error.code)]")
            throw ExitCode(2)
        }
        defer { client.close() }
        let s = client.session
        if !self.quiet {
            if !client.redirectedFrom.isEmpty { print("redirected from \(client.redirectedFrom.map(\.description).joined(separator: " -> ")) to \(client.address)") }
            print("connected to \(client.address): \(s.peer.implementation) \(s.peer.version) on \(s.peer.platform), name \"\(s.peer.name)\"")
            print("protocol version \(s.localVersion) (server \(s.peerVersion)), features \(s.features)")
            print("auth \(s.authMethod)\(s.entity.map { " as \($0)" } ?? ""), mode \(s.connectionMode)\(s.cipher.map { " (\($0.rawValue))" } ?? "")")
            print("server sees us at \(s.addressSeenByPeer)")
            for m in client.serverMessages { print("server message \(m)") }
            if s.nucleus.requestDelay > 0 { print("request delay: \(s.nucleus.requestDelay) s") }
            if !client.redirects.isEmpty { print("redirects: \(client.redirects.joined(separator: ", "))") }
        }
        var samples: [Double] = []
        let clock = ContinuousClock()
        for i in 1...self.count {
            do {
                try await self.roundTrip(i, client: client, clock: clock, samples: &samples)
            } catch let error as ParleyError {
                print("parley ping: request \(i): \(error.message) [\(error.code)]")
                throw ExitCode(2)
            }
        }
        let sorted = samples.sorted()
        func pct(_ p: Double) -> Double { sorted[min(sorted.count - 1, Int((Double(sorted.count) * p).rounded(.up)) - 1)] }
        print(String(format: "%d round trips to %@: min/median/p99 = %.3f/%.3f/%.3f ms", sorted.count, client.address.description, sorted[0], pct(0.5), pct(0.99)))
    }

    /// One Ping (or Echo of --size bytes), timed.
    private func roundTrip(_ i: Int, client: ParleyClient, clock: ContinuousClock, samples: inout [Double]) async throws {
        try await client.waitForRequestDelay()
        let start = clock.now
        if self.size == 0 {
            var ping = Parley_Echo_V1_Ping()
            ping.sequence = UInt64(i)
            let pong = try await client.request(ping, as: Parley_Echo_V1_Pong.self)
            guard pong.sequence == UInt64(i) else { throw ParleyError(code: .protocolViolation, message: "pong \(pong.sequence) for ping \(i)") }
        } else {
            var echo = Parley_Echo_V1_Echo()
            echo.payload = Data(repeating: UInt8(i & 0xFF), count: self.size)
            let reply = try await client.request(echo, as: Parley_Echo_V1_EchoReply.self)
            guard reply.payload == echo.payload else { throw ParleyError(code: .protocolViolation, message: "echo \(i) came back different") }
        }
        let ms = (clock.now - start).milliseconds
        samples.append(ms)
        if !self.quiet { print(String(format: "seq=%d time=%.3f ms", i, ms)) }
    }
}

extension Duration {
    var milliseconds: Double {
        Double(self.components.seconds) * 1000 + Double(self.components.attoseconds) / 1e15
    }
}
