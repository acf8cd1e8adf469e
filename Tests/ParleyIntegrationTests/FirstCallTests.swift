import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import Parley
@testable import ParleyNIO
import ParleyServices
import ParleyWire
import Testing

/// A first request sent with the handshake's last flight (docs/protocol.md, R-6.1-6): in
/// secure mode it follows CLIENT_IDENT at once, sealed, and its answer comes with
/// SERVER_IDENT, one round trip sooner than after the handshake.
@Suite(.timeLimit(.minutes(2)))
struct FirstCallTests {
    // MARK: - The flights, counted (two handlers in embedded channels, the test carrying the bytes)

    /// Records what reached one side, and when the handshake completed.
    final class Sink: ParleyEventSink, @unchecked Sendable {
        var outlet: ParleyConnectionHandler.Outlet?
        var result: HandshakeResult?
        var received: [WireMessage] = []
        /// The flight (one way, counted by the test) in which the handshake completed, and
        /// the one that brought the first answer.
        var establishedInFlight: Int?
        var answerInFlight: Int?
        var flight = 0
        func received(_ event: ConnectionEvent) {
            guard case .message(let m) = event else { return }
            self.received.append(m)
            if self.answerInFlight == nil { self.answerInFlight = self.flight }
        }
        func closed(_ reason: ParleyError) {}
    }

    static let alice = SecretEntity(name: "client.alice", key: Array(repeating: 0xA1, count: 32), capabilities: ["*"])

    static func request(_ id: UInt64) -> WireMessage {
        WireMessage(header: MessageHeader(id: id, kind: .request, type: "t.Question"), payload: ByteBuffer(bytes: [8, UInt8(id)]))
    }

    /// Runs a `secret` handshake between two handlers, the client holding request 1 as an
    /// early message (and sending it itself once established if the handshake did not take
    /// it); carries the bytes flight by flight until both sides are quiet.
    /// `method`: `secret` (with `mode`), or `none` (crc mode; CLIENT_IDENT and the request
    /// then go in the first flight, R-6.1-5).
    /// `ciphers`: what both sides offer and accept in secure mode (this machine's preference
    /// by default).
    static func run(
        mode: ConnectionMode, method: String = AuthMethod.secret, ciphers: [SecureCipher] = SecureCipher.preferred
    ) throws -> (client: Sink, server: ReadBurstFlushTests.EchoSink, channels: (client: EmbeddedChannel, server: EmbeddedChannel)) {
        var supported = ParleyFeatures.implemented
        supported.insert(.secureMode)
        let banner = Banner(supported: supported, required: [])
        let size = UInt32(Frame.defaultMaxFrameSize)
        var ident = Parley_V1_ClientIdent()
        ident.version = "1.0.0"
        ident.clientNonce = 7
        var clientConfiguration = ClientHandshakeStateMachine.Configuration(
            banner: banner, maxFrameSize: size, authMethods: [method], ident: ident, serverAddress: "test",
            secret: SecretCredentials(entity: alice.name, key: alice.key), modes: [mode], randomness: .generate()
        )
        clientConfiguration.identInFirstFlight = true
        clientConfiguration.ciphers = ciphers
        let clientMachine = ClientHandshakeStateMachine(configuration: clientConfiguration)
        let serverMachine = ServerHandshakeStateMachine(configuration: .init(
            banner: banner, maxFrameSize: size, authMethods: [AuthMethod.secret, AuthMethod.none], ident: Parley_V1_ServerIdent(), clientAddress: "test",
            modes: [.crc, .secure], ciphers: ciphers, secrets: SecretDirectory([alice]), randomness: .generate(), globalID: 1
        ))
        let client = EmbeddedChannel(), server = EmbeddedChannel()
        let clientSink = Sink(), serverSink = ReadBurstFlushTests.EchoSink()
        let clientHandler = ParleyConnectionHandler(role: .client(clientMachine), eventLoop: client.eventLoop) { result, outlet in
            clientSink.outlet = outlet
            clientSink.result = result
            clientSink.establishedInFlight = clientSink.flight
            if result.earlyMessagesSent == 0 { outlet.write(.message(Self.request(1))) }
            return EstablishedLink(sink: clientSink)
        }
        clientHandler.earlyMessages = [Self.request(1)]
        let serverHandler = ParleyConnectionHandler(role: .server(serverMachine), eventLoop: server.eventLoop) { _, outlet in
            serverSink.outlet = outlet
            return EstablishedLink(sink: serverSink)
        }
        try ParleyPipeline.configure(server, options: PipelineOptions(), handler: serverHandler)
        try ParleyPipeline.configure(client, options: PipelineOptions(), handler: clientHandler)
        let address = try SocketAddress(ipAddress: "127.0.0.1", port: 1)
        try server.connect(to: address).wait()
        try client.connect(to: address).wait()
        for flight in 1...20 {
            clientSink.flight = flight
            let toServer = try ReadBurstFlushTests.take(client), toClient = try ReadBurstFlushTests.take(server)
            if toServer == nil, toClient == nil { break }
            if let toServer { try ReadBurstFlushTests.burst(toServer, into: server) }
            if let toClient { try ReadBurstFlushTests.burst(toClient, into: client) }
        }
        return (clientSink, serverSink, (client, server))
    }

    @Test func inSecureModeTheAnswerComesWithServerIdent() throws {
        let (client, server, channels) = try Self.run(mode: .secure)
        let result = try #require(client.result, "the handshake did not complete")
        #expect(result.connectionMode == .secure)
        #expect(result.earlyMessagesAllowed && result.earlyMessagesSent == 1)
        #expect(server.received.map(\.header.id) == [1])
        #expect(server.received.first?.header.seq == 1)
        #expect(client.received.map(\.header.id) == [1], "the answer arrived")
        // In the bytes that completed the handshake (the 4th flight: two round trips): no
        // round trip after it.
        #expect(client.answerInFlight != nil && client.answerInFlight == client.establishedInFlight)
        #expect(client.establishedInFlight == 4)
        // The session numbers on after the early message: the server, which checks that
        // seqs arrive in order, takes the next request (seq 2) and answers it.
        client.outlet?.write(.message(Self.request(2)))
        try ReadBurstFlushTests.burst(try #require(try ReadBurstFlushTests.take(channels.client)), into: channels.server)
        try ReadBurstFlushTests.burst(try #require(try ReadBurstFlushTests.take(channels.server)), into: channels.client)
        #expect(server.received.map(\.header.seq) == [1, 2])
        #expect(client.received.map(\.header.id) == [1, 2])
    }

    /// In crc mode nothing travels before AUTH_DONE: the early message is dropped unsent and
    /// the request goes once the connection is up, its answer a round trip later.
    @Test func inCrcModeTheRequestWaitsForTheHandshake() throws {
        let (client, server, _) = try Self.run(mode: .crc)
        let result = try #require(client.result, "the handshake did not complete")
        #expect(result.connectionMode == .crc)
        #expect(!result.earlyMessagesAllowed && result.earlyMessagesSent == 0)
        #expect(server.received.map(\.header.id) == [1], "sent once, after the handshake")
        #expect(server.received.first?.header.seq == 1)
        #expect(client.received.map(\.header.id) == [1])
        let established = try #require(client.establishedInFlight)
        #expect(established == 4)
        #expect(client.answerInFlight == established + 2, "one round trip (two flights) after the handshake")
    }

    /// [R-6.1-5] Method none, crc mode: CLIENT_IDENT and the request go in the first flight;
    /// the server's first answer completes the handshake and carries the answer: one round
    /// trip in all.
    @Test func withMethodNoneEverythingGoesInTheFirstFlight() throws {
        let (client, server, _) = try Self.run(mode: .crc, method: AuthMethod.none)
        let result = try #require(client.result, "the handshake did not complete")
        #expect(result.connectionMode == .crc && result.authMethod == AuthMethod.none)
        #expect(result.earlyMessagesAllowed && result.earlyMessagesSent == 1)
        #expect(server.received.map(\.header.id) == [1] && server.received.first?.header.seq == 1)
        #expect(client.establishedInFlight == 2)
        #expect(client.answerInFlight == 2)
    }

    // MARK: - ParleyClient.connect(to:firstCall:) over real sockets

    /// The ids of the requests a server's Ping handler ran, in order.
    final class Ran: Sendable {
        private let box = NIOLockedValueBox<[UInt64]>([])
        func record(_ id: UInt64) { self.box.withLockedValue { $0.append(id) } }
        var ids: [UInt64] { self.box.withLockedValue { $0 } }
        var count: Int { self.ids.count }
    }

    /// Answers Ping with a Pong naming the server; `serves: false`: no handler at all (a
    /// server that only redirects).
    static func pingRouter(_ ran: Ran, name: String, serves: Bool) -> ParleyRouter {
        var router = ParleyRouter()
        guard serves else { return router }
        router.on(Parley_Echo_V1_Ping.self) { request, context in
            ran.record(context.requestID)
            var pong = Parley_Echo_V1_Pong()
            pong.sequence = request.sequence
            pong.serverName = name
            return pong
        }
        return router
    }

    /// A server allowing method `secret` in both modes over the keyring at `keyring`.
    static func withKeyedServer<T>(
        keyring: String, name: String, ran: Ran, serves: Bool = true, configure: (inout ParleyServer.Configuration) -> Void = { _ in },
        _ body: (ParleyAddress) async throws -> T
    ) async throws -> T {
        let source = try ParleyKeyringSource(path: keyring)
        return try await withServer(
            configure: { $0.authMethods = [AuthMethod.secret]; $0.modes = [.crc, .secure]; $0.keyring = source; configure(&$0) },
            router: Self.pingRouter(ran, name: name, serves: serves)
        ) { _, addresses in try await body(addresses[0]) }
    }

    static func keyring() throws -> (path: String, credentials: SecretCredentials) {
        let path = freshTestDirectory("first-call") + "/server.keyring"
        let keys = try writeKeyring(path, [("client.alice", ["*"])])
        return (path, SecretCredentials(entity: "client.alice", key: keys["client.alice"]!))
    }

    static func pingRequest(_ n: UInt64) -> Parley_Echo_V1_Ping {
        var ping = Parley_Echo_V1_Ping()
        ping.sequence = n
        return ping
    }

    @Test(arguments: [ConnectionMode.secure, .crc])
    func connectWithAFirstCallThenGoOn(mode: ConnectionMode) async throws {
        let ran = Ran()
        let (path, credentials) = try Self.keyring()
        try await Self.withKeyedServer(keyring: path, name: "one", ran: ran) { address in
            // One request slot: the first call must give its slot back, or the next call waits forever.
            var configuration = ParleyClient.Configuration(secret: credentials, modes: [mode])
            configuration.limits.maxOutstandingRequests = 1
            let (client, reply) = try await ParleyClient.connect(
                to: address, configuration: configuration, logger: quietLogger, firstCall: Self.pingRequest(41), as: Parley_Echo_V1_Pong.self
            )
            defer { client.close() }
            #expect(client.session.connectionMode == mode)
            #expect(reply.message.sequence == 41 && reply.message.serverName == "one")
            #expect(client.connection.outstandingRequests == 0)
            for n in UInt64(42)...44 { #expect(try await ping(client, n) == n) }
            // The first call had id 1; the next ones take the ids after it.
            #expect(ran.ids == [1, 2, 3, 4])
        }
    }

    /// Method none (the default), crc mode: the first call goes in the first flight; one with
    /// a data segment (a feature the server's banner has not been seen to offer) goes once
    /// connected. Both are answered, and the ids go on after them.
    @Test(arguments: [false, true])
    func aFirstCallWithMethodNone(withData: Bool) async throws {
        try await withServer { _, addresses in
            var echo = Parley_Echo_V1_Echo()
            echo.text = "first"
            let data = withData ? ByteBuffer(bytes: Array(repeating: 7, count: 1000)) : nil
            let (client, reply) = try await ParleyClient.connect(
                to: addresses[0], logger: quietLogger, firstCall: echo, data: data, as: Parley_Echo_V1_EchoReply.self
            )
            defer { client.close() }
            #expect(client.session.authMethod == AuthMethod.none && client.session.connectionMode == .crc)
            #expect(reply.message.text == "first" && reply.data == data)
            #expect(try await ping(client, 5) == 5)
            #expect(client.connection.outstandingRequests == 0)
        }
    }

    /// [R-6.1-7] In crc mode too: a server that refuses the client (here: out of date) never
    /// runs the request that came with CLIENT_IDENT in the first flight.
    @Test func aRefusedMethodNoneFirstCallNeverRuns() async throws {
        let ran = Ran()
        try await withServer(configure: { $0.minimumClientVersion = "99.0" }, router: Self.pingRouter(ran, name: "strict", serves: true)) { _, addresses in
            let refused = await #expect(throws: ParleyError.self) {
                try await ParleyClient.connect(to: addresses[0], logger: quietLogger, firstCall: Self.pingRequest(1), as: Parley_Echo_V1_Pong.self)
            }
            #expect(refused?.code == .clientOutOfDate, "\(String(describing: refused))")
            try await Task.sleep(for: .milliseconds(200))
            #expect(ran.count == 0)
        }
    }

    /// Which server runs a method-none first call shows whether it went in the first flight:
    /// the redirecting front answers it there (it went with CLIENT_IDENT); with a data
    /// segment it cannot, and the server the redirect leads to answers it.
    @Test(arguments: [false, true])
    func aMethodNoneFirstCallRunsWhereItWasSent(withData: Bool) async throws {
        try await withServer(router: EchoService.router(name: "back")) { _, backs in
            try await withServer(configure: { $0.nucleus.redirects = [backs[0].description] }, router: EchoService.router(name: "front")) { _, fronts in
                var ping = Self.pingRequest(3)
                ping.sequence = 3
                let (client, reply) = try await ParleyClient.connect(
                    to: fronts[0], logger: quietLogger, firstCall: ping, data: withData ? ByteBuffer(bytes: [1, 2, 3]) : nil, as: Parley_Echo_V1_Pong.self
                )
                defer { client.close() }
                #expect(client.address == backs[0])
                #expect(reply.message.sequence == 3)
                #expect(reply.message.serverName == (withData ? "back" : "front"))
            }
        }
    }

    /// A method-none first call larger than a first flight may carry (64 KiB: the server's
    /// frame limit is not known yet, R-6.1-5) does not go in it: the server the redirect
    /// leads to answers it, whole; one just under the limit goes in the first flight.
    @Test(arguments: [60_000, 70_000])
    func aMethodNoneFirstCallOverTheFirstFlightLimitWaits(textSize: Int) async throws {
        /// Echoes the text back, recording the request's id.
        func echoRouter(_ ran: Ran) -> ParleyRouter {
            var router = ParleyRouter()
            router.on(Parley_Echo_V1_Echo.self) { request, context in
                ran.record(context.requestID)
                var reply = Parley_Echo_V1_EchoReply()
                reply.text = request.text
                return reply
            }
            return router
        }
        let ranFront = Ran(), ranBack = Ran()
        try await withServer(router: echoRouter(ranBack)) { _, backs in
            try await withServer(configure: { $0.nucleus.redirects = [backs[0].description] }, router: echoRouter(ranFront)) { _, fronts in
                var echo = Parley_Echo_V1_Echo()
                echo.text = String(repeating: "x", count: textSize)
                let (client, reply) = try await ParleyClient.connect(
                    to: fronts[0], logger: quietLogger, firstCall: echo, as: Parley_Echo_V1_EchoReply.self
                )
                defer { client.close() }
                #expect(client.address == backs[0])
                #expect(reply.message.text == echo.text)
                let early = textSize < 65_536
                #expect(ranFront.count == (early ? 1 : 0) && ranBack.count == (early ? 0 : 1))
                echo.text = "next"
                #expect(try await client.call(echo, as: Parley_Echo_V1_EchoReply.self).message.text == "next")
                #expect(ranBack.ids.last == (early ? 1 : 2))
            }
        }
    }

    /// A request sent with the handshake runs where it was sent: on a redirecting server in
    /// secure mode (the client waits for its answer there, then follows the redirect), unless
    /// that server only redirects (no handler: `unknownMessageType`, nothing ran), when it is
    /// made again where the redirect leads; in crc mode it is an ordinary call on the server
    /// the redirect leads to.
    @Test(arguments: [(ConnectionMode.secure, true), (.secure, false), (.crc, true)])
    func aRedirectedFirstCall(mode: ConnectionMode, frontServes: Bool) async throws {
        let ranFront = Ran(), ranBack = Ran()
        let (path, credentials) = try Self.keyring()
        let answeredByFront = mode == .secure && frontServes
        try await Self.withKeyedServer(keyring: path, name: "back", ran: ranBack) { back in
            try await Self.withKeyedServer(
                keyring: path, name: "front", ran: ranFront, serves: frontServes, configure: { $0.nucleus.redirects = [back.description] }
            ) { front in
                let (client, reply) = try await ParleyClient.connect(
                    to: front, configuration: .init(secret: credentials, modes: [mode]), logger: quietLogger,
                    firstCall: Self.pingRequest(7), as: Parley_Echo_V1_Pong.self
                )
                defer { client.close() }
                #expect(client.address == back && client.redirectedFrom == [front])
                #expect(reply.message.sequence == 7)
                #expect(reply.message.serverName == (answeredByFront ? "front" : "back"))
                #expect(ranFront.count == (answeredByFront ? 1 : 0) && ranBack.count == (answeredByFront ? 0 : 1))
                #expect(try await ping(client, 8) == 8)
                #expect(ranBack.count == (answeredByFront ? 1 : 2))
            }
        }
    }

    /// [R-6.1-7] A server that refuses the client in SERVER_IDENT never runs the request that
    /// followed CLIENT_IDENT. The client's capture shows the request did leave: it is longer
    /// by one sealed Ping than the capture of the same refusal without a first call.
    @Test func aRefusedClientsEarlyRequestNeverRuns() async throws {
        let ran = Ran()
        let (path, credentials) = try Self.keyring()
        let directory = freshTestDirectory("first-call-refused")
        try await Self.withKeyedServer(keyring: path, name: "strict", ran: ran, configure: { $0.minimumClientVersion = "99.0" }) { address in
            var sizes: [Int] = []
            for (n, firstCall) in [false, true].enumerated() {
                var configuration = ParleyClient.Configuration(secret: credentials, modes: [.secure])
                configuration.captureOutbound = directory + "/out-\(n)"
                let refused = await #expect(throws: ParleyError.self) {
                    if firstCall {
                        _ = try await ParleyClient.connect(to: address, configuration: configuration, logger: quietLogger, firstCall: Self.pingRequest(1), as: Parley_Echo_V1_Pong.self)
                    } else {
                        _ = try await ParleyClient.connect(to: address, configuration: configuration, logger: quietLogger)
                    }
                }
                #expect(refused?.code == .clientOutOfDate, "\(String(describing: refused))")
                // The capture file is complete once the channel has closed.
                #expect(try await eventually(seconds: 10) {
                    (try? FileManager.default.attributesOfItem(atPath: configuration.captureOutbound!)[.size] as? Int).map { $0 > 0 } ?? false
                })
                try await Task.sleep(for: .milliseconds(100))
                sizes.append(try FileManager.default.attributesOfItem(atPath: configuration.captureOutbound!)[.size] as? Int ?? 0)
            }
            let ping = WireMessage(
                header: MessageHeader(seq: 1, id: 1, kind: .request, type: Parley_Echo_V1_Ping.protoMessageName), payload: Self.pingRequest(1).parleyPayload()
            ).frame(allocator: ByteBufferAllocator())
            // Give or take the varint of each connection's random client nonce (1 to 10 bytes).
            let extra = sizes[1] - sizes[0]
            #expect(abs(extra - ping.sealedWireSize) <= 9, "captured \(sizes), a sealed Ping is \(ping.sealedWireSize) bytes")
            // The server handles a connection's frames in order and stopped at the refusal;
            // give a late handler (there should be none) time to show itself.
            try await Task.sleep(for: .milliseconds(200))
            #expect(ran.count == 0)
        }
    }
}
