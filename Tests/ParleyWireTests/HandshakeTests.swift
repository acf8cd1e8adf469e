import Foundation
import NIOCore
import ParleyWire
import SwiftProtobuf
import Testing

/// A client and a server machine exchanging real bytes through real decoders.
struct Pair {
    var client: ClientHandshakeStateMachine
    var server: ServerHandshakeStateMachine
    var clientDecoder = WireDecoder()
    var serverDecoder = WireDecoder()
    var clientOutcome: HandshakeStep.Outcome?
    var serverOutcome: HandshakeStep.Outcome?
    /// Bytes each side sent, for inspection.
    var toServer = ByteBuffer()
    var toClient = ByteBuffer()

    static func clientConfig(supported: ParleyFeatures = .implemented, required: ParleyFeatures = [], methods: [String] = ["none"], version: String = "1.0.0") -> ClientHandshakeStateMachine.Configuration {
        var ident = Parley_V1_ClientIdent()
        ident.platform = "test-platform"
        ident.implementation = "test-client"
        ident.version = version
        return .init(banner: Banner(supported: supported, required: required), maxFrameSize: 1 << 20, authMethods: methods, ident: ident, serverAddress: "127.0.0.1:7420")
    }

    static func serverConfig(supported: ParleyFeatures = .implemented, required: ParleyFeatures = [], methods: [String] = ["none"], minimum: String? = nil) -> ServerHandshakeStateMachine.Configuration {
        var ident = Parley_V1_ServerIdent()
        ident.implementation = "test-server"
        ident.version = "2.0.0"
        var m = Parley_V1_ServerMessage()
        m.priority = .high
        m.text = "hello"
        ident.nucleus.messages = [m]
        ident.nucleus.requestDelaySeconds = 1.5
        ident.nucleus.redirects = ["[::1]:7421"]
        return .init(banner: Banner(supported: supported, required: required), maxFrameSize: 1 << 20, authMethods: methods, ident: ident, minimumClientVersion: minimum, clientAddress: "127.0.0.1:50000")
    }

    init(client: ClientHandshakeStateMachine.Configuration = Pair.clientConfig(), server: ServerHandshakeStateMachine.Configuration = Pair.serverConfig()) {
        self.client = ClientHandshakeStateMachine(configuration: client)
        self.server = ServerHandshakeStateMachine(configuration: server)
    }
}

extension Pair {
    static func established(_ outcome: HandshakeStep.Outcome?) -> HandshakeResult? {
        if case .established(let r)? = outcome { return r }
        return nil
    }

    static func failure(_ outcome: HandshakeStep.Outcome?) -> ParleyError? {
        if case .failed(let e)? = outcome { return e }
        return nil
    }
}

@Suite struct HandshakeTests {
    @Test(arguments: [0, 1, 5, 32])
    func clientAndServerEstablish(chunk: Int) throws {
        var pair = Pair()
        try pair.runBuffered(chunk: chunk)
        let c = try #require(Pair.established(pair.clientOutcome))
        let s = try #require(Pair.established(pair.serverOutcome))
        #expect(c.features == .implemented && s.features == .implemented)
        #expect(c.authMethod == "none" && s.authMethod == "none")
        #expect(c.serverIdent.implementation == "test-server")
        #expect(c.serverIdent.nucleus.messages.first?.text == "hello")
        #expect(c.serverIdent.nucleus.requestDelaySeconds == 1.5)
        #expect(c.serverIdent.nucleus.redirects == ["[::1]:7421"])
        #expect(s.clientIdent.implementation == "test-client")
        #expect(s.clientIdent.platform == "test-platform")
        #expect(c.peerHello.peerAddress == "127.0.0.1:50000", "the address the server sees the client at")
        #expect(s.peerHello.peerAddress == "127.0.0.1:7420")
    }

    @Test func clientFirstFlightIsPipelined() {
        var client = ClientHandshakeStateMachine(configuration: Pair.clientConfig())
        let step = client.start()
        let tags = step.send.map { e -> String in
            if case .frame(let f) = e { return f.tag.description }
            return "banner"
        }
        #expect(tags == ["banner", "HELLO", "AUTH_REQUEST"])
        #expect(step.outcome == nil)
    }

    @Test func negotiatedFeaturesAreTheIntersectionAndUnknownOptionalBitsAreFine() throws {
        let unknown = ParleyFeatures(rawValue: 1 << 50)
        var pair = Pair(client: Pair.clientConfig(supported: [.streams, .notice, unknown]), server: Pair.serverConfig(supported: .implemented))
        try pair.runBuffered()
        #expect(Pair.established(pair.clientOutcome)?.features == [.streams, .notice])
        #expect(Pair.established(pair.serverOutcome)?.features == [.streams, .notice])
    }

    @Test func peerRequiringUnknownFeatureIsRefusedOnBothSides() throws {
        let unknown = ParleyFeatures(rawValue: 1 << 41)
        var pair = Pair(client: Pair.clientConfig(supported: ParleyFeatures.implemented.union(unknown), required: unknown))
        try pair.runBuffered()
        let c = try #require(Pair.failure(pair.clientOutcome))
        let s = try #require(Pair.failure(pair.serverOutcome))
        #expect(c.code == .missingFeatures && s.code == .missingFeatures)
        #expect(s.message.contains("bit41") && s.message.contains("version 1"))
        #expect(c.message.contains("bit41") && c.message.contains("this side (protocol version 1) requires"))
    }

    @Test func serverRequiringFeatureClientLacksIsRefused() throws {
        var pair = Pair(client: Pair.clientConfig(supported: [.streams]), server: Pair.serverConfig(required: [.keepalive]))
        try pair.runBuffered()
        #expect(Pair.failure(pair.clientOutcome)?.code == .missingFeatures)
        #expect(Pair.failure(pair.serverOutcome)?.message.contains("keepalive") == true)
    }

    @Test func versionZeroIsRefused() {
        var server = ServerHandshakeStateMachine(configuration: Pair.serverConfig())
        _ = server.start()
        let step = server.received(.banner(Banner(version: 0, supported: .implemented)))
        #expect(Pair.failure(step.outcome)?.code == .unsupportedVersion)
        var client = ClientHandshakeStateMachine(configuration: Pair.clientConfig())
        _ = client.start()
        #expect(Pair.failure(client.received(.banner(Banner(version: 0, supported: []))).outcome)?.code == .unsupportedVersion)
        // A later version is accepted (it must speak version 1 to us).
        var c2 = ClientHandshakeStateMachine(configuration: Pair.clientConfig())
        _ = c2.start()
        #expect(c2.received(.banner(Banner(version: 7, supported: .implemented))).outcome == nil)
    }

    /// [R-6.1-5] With one method without further rounds and crc mode only, CLIENT_IDENT goes
    /// in the first flight (and MESSAGEs needing no feature may follow); the handshake then
    /// completes in the server's first answer, and nothing is sent twice.
    @Test func identInTheFirstFlightWhenTheMethodIsSure() throws {
        var config = Pair.clientConfig()
        config.identInFirstFlight = true
        var pair = Pair(client: config)
        var probe = ClientHandshakeStateMachine(configuration: config)
        let first = probe.start()
        let tags = first.send.map { e -> String in
            if case .frame(let f) = e { return f.tag.description }
            return "banner"
        }
        #expect(tags == ["banner", "HELLO", "AUTH_REQUEST", "CLIENT_IDENT"])
        #expect(first.earlyMessages == EarlyMessageTerms(features: [], peerMaxFrameSize: UInt32(Frame.minimumMaxFrameSize)))
        try pair.runBuffered()
        let c = try #require(Pair.established(pair.clientOutcome))
        #expect(Pair.established(pair.serverOutcome)?.clientIdent.implementation == "test-client")
        #expect(c.earlyMessagesAllowed)
        // Exactly one CLIENT_IDENT crossed.
        var decoder = WireDecoder()
        var bytes = pair.toServer
        var idents = 0
        while let e = try decoder.decode(buffer: &bytes) { if case .frame(let f) = e, f.tag == .clientIdent { idents += 1 } }
        #expect(idents == 1)
    }

    /// Not with several methods (AUTH_BAD_METHOD may lead to another), method secret (more
    /// rounds), secure mode, or a session to resume; and no early MESSAGEs with bit 9.
    @Test func identWaitsForAuthDoneWhenTheOutcomeIsOpen() {
        func firstFlight(_ change: (inout ClientHandshakeStateMachine.Configuration) -> Void) -> (tags: [String], early: EarlyMessageTerms?) {
            var config = Pair.clientConfig()
            config.identInFirstFlight = true
            change(&config)
            var machine = ClientHandshakeStateMachine(configuration: config)
            let step = machine.start()
            return (step.send.compactMap { if case .frame(let f) = $0 { return f.tag.description } else { return nil } }, step.earlyMessages)
        }
        #expect(firstFlight { $0.authMethods = ["none", "tls"] }.tags.last == "AUTH_REQUEST")
        // Method secret alone, crc mode only: its rounds decide the outcome.
        #expect(firstFlight {
            $0.authMethods = ["secret"]
            $0.secret = SecretCredentials(entity: "client.alice", key: Array(repeating: 0xA1, count: 32))
            $0.randomness = HandshakeRandomness(challenge: Array(repeating: 1, count: 32), keySharePrivateKey: Array(repeating: 3, count: 32))
        }.tags.last == "AUTH_REQUEST")
        #expect(firstFlight { $0.modes = [.crc, .secure]; $0.banner.supported.insert(.secureMode) }.tags.last == "AUTH_REQUEST")
        #expect(firstFlight { $0.resume = SessionResumeOffer(token: Array(repeating: 1, count: 16), serverNonce: 1, lastReceivedSeq: 0, connectSeq: 1) }.tags.last == "AUTH_REQUEST")
        #expect(firstFlight { $0.identInFirstFlight = false }.tags.last == "AUTH_REQUEST")
        let lossless = firstFlight { $0.banner.supported.insert(.reconnect) }
        #expect(lossless.tags.last == "CLIENT_IDENT" && lossless.early == nil)
    }

    /// A server that refuses the one method of a client that sent CLIENT_IDENT with it says
    /// so (still unexpectedFrame, as R-6.1-5 has it).
    @Test func aFirstFlightIdentAfterAuthBadMethodIsExplained() throws {
        var config = Pair.clientConfig(methods: ["tls"])
        config.identInFirstFlight = true
        var pair = Pair(client: config, server: Pair.serverConfig(methods: ["none"]))
        try pair.runBuffered()
        #expect(Pair.failure(pair.clientOutcome)?.code == .authenticationFailed)
        let s = try #require(Pair.failure(pair.serverOutcome))
        #expect(s.code == .unexpectedFrame)
        #expect(s.message.contains("no common authentication method"), "\(s.message)")
    }

    /// Method tls: the certificate's entity gets its keyring capabilities; one revoked or
    /// expired in the keyring is refused, as with method secret.
    @Test(arguments: ["fine", "revoked", "expired"]) func methodTLSHonoursTheKeyring(state: String) throws {
        var server = Pair.serverConfig(methods: ["tls"])
        server.now = 2_000_000_000
        server.secrets = SecretDirectory([SecretEntity(
            name: "client.alice", key: Array(repeating: 1, count: 32), capabilities: ["block.read"],
            expires: state == "expired" ? 1_999_999_999 : nil, revoked: state == "revoked")])
        var pair = Pair(client: Pair.clientConfig(methods: ["tls"]), server: server)
        pair.server.transportSecured(protocolName: "TLSv1.3", peerEntity: "client.alice")
        try pair.runBuffered()
        if state == "fine" {
            let s = try #require(Pair.established(pair.serverOutcome))
            #expect(s.authMethod == "tls" && s.entity == "client.alice" && s.capabilities == ["block.read"])
        } else {
            let s = try #require(Pair.failure(pair.serverOutcome))
            #expect(s.code == .authenticationFailed && s.message.contains(state == "revoked" ? "revoked" : "expired"), "\(s.message)")
            #expect(Pair.failure(pair.clientOutcome)?.code == .authenticationFailed)
        }
    }

    @Test func noCommonAuthMethod() throws {
        var pair = Pair(client: Pair.clientConfig(methods: ["cephx"]), server: Pair.serverConfig(methods: ["none"]))
        try pair.runBuffered()
        let c = try #require(Pair.failure(pair.clientOutcome))
        #expect(c.code == .authenticationFailed)
        #expect(c.message.contains("cephx") && c.message.contains("none"))
    }

    @Test func authFallsBackToTheNextOfferedMethod() throws {
        var pair = Pair(client: Pair.clientConfig(methods: ["kerberos", "none"]), server: Pair.serverConfig(methods: ["none"]))
        try pair.runBuffered()
        #expect(Pair.established(pair.clientOutcome)?.authMethod == "none")
        #expect(Pair.established(pair.serverOutcome)?.authMethod == "none")
    }

    @Test func serverGivesUpAfterTooManyAuthAttempts() {
        var server = ServerHandshakeStateMachine(configuration: Pair.serverConfig())
        _ = server.start()
        _ = server.received(.banner(Banner(supported: .implemented)))
        var hello = Parley_V1_Hello()
        hello.entityType = .client
        _ = server.received(.frame(hello.frame(tag: .hello)))
        var auth = Parley_V1_AuthRequest()
        auth.method = "bogus"
        var last = HandshakeStep()
        for _ in 0..<3 { last = server.received(.frame(auth.frame(tag: .authRequest))) }
        #expect(Pair.failure(last.outcome)?.code == .authenticationFailed)
    }

    /// [R-8.4-1] A refused client reports `clientOutOfDate` with the refusal and the refusing
    /// SERVER_IDENT's other messages.
    @Test func outOfDateClientIsToldAndRefused() throws {
        var pair = Pair(client: Pair.clientConfig(version: "0.9.5"), server: Pair.serverConfig(minimum: "0.10.0"))
        try pair.runBuffered()
        let c = try #require(Pair.failure(pair.clientOutcome))
        #expect(c.code == .clientOutOfDate)
        #expect(c.message.contains("0.9.5") && c.message.contains("0.10.0"))
        #expect(c.message.contains("server message [high]: hello"), "the refusing SERVER_IDENT's other messages are shown")
        #expect(Pair.failure(pair.serverOutcome)?.code == .clientOutOfDate)
        // The SERVER_IDENT carried the high-priority message for clients that only know the nucleus.
        var d = WireDecoder()
        let frames = try decodeAll(pair.toClient, decoder: &d).compactMap { e -> Frame? in
            if case .frame(let f) = e { return f }
            return nil
        }
        #expect(frames.map(\.tag) == [.hello, .authDone, .serverIdent, .close])
        let ident = try Parley_V1_ServerIdent(parleyPayload: frames[2].segments[0])
        #expect(ident.nucleus.messages.contains { $0.priority == .high && $0.text.contains("out of date") })
        var ok = Pair(client: Pair.clientConfig(version: "0.10.0"), server: Pair.serverConfig(minimum: "0.10.0"))
        try ok.runBuffered()
        #expect(Pair.established(ok.clientOutcome) != nil)
    }

    /// Section 5.2, check 1: an out-of-date client reconnecting a lossless session is refused
    /// as at CLIENT_IDENT (SERVER_IDENT with the refusal, then CLOSE), and the client reports
    /// `clientOutOfDate` with the server's messages (it took that SERVER_IDENT for a stray
    /// frame, failed with `unexpectedFrame`, and its reconnector tried again for a minute).
    @Test func outOfDateClientIsRefusedOnAReconnectToo() throws {
        let features = ParleyFeatures.implemented.union([.reconnect])
        var client = Pair.clientConfig(supported: features, version: "0.9.5")
        client.resume = SessionResumeOffer(token: Array(repeating: 7, count: 16), serverNonce: 1, lastReceivedSeq: 0, connectSeq: 2)
        var pair = Pair(client: client, server: Pair.serverConfig(supported: features, minimum: "0.10.0"))
        try pair.runBuffered()
        let c = try #require(Pair.failure(pair.clientOutcome))
        #expect(c.code == .clientOutOfDate, "\(c)")
        #expect(c.message.contains("server message [high]: hello"), "\(c)")
        #expect(Pair.failure(pair.serverOutcome)?.code == .clientOutOfDate)
        var d = WireDecoder()
        let sent = try decodeAll(pair.toServer, decoder: &d).compactMap { e -> FrameTag? in
            if case .frame(let f) = e { return f.tag }
            return nil
        }
        #expect(sent.contains(.sessionReconnect) && !sent.contains(.close), "the client sent \(sent)")
    }

    /// A SERVER_IDENT without a refusal in answer to SESSION_RECONNECT (before any
    /// SESSION_RESET) is `unexpectedFrame`: the answers are SESSION_RESUMED or SESSION_RESET.
    @Test func aPlainServerIdentAnsweringSessionReconnectIsUnexpected() throws {
        let features = ParleyFeatures.implemented.union([.reconnect])
        var client = Pair.clientConfig(supported: features)
        client.resume = SessionResumeOffer(token: Array(repeating: 7, count: 16), serverNonce: 1, lastReceivedSeq: 0, connectSeq: 2)
        var pair = Pair(client: client, server: Pair.serverConfig(supported: features))
        try pair.runBuffered()
        guard case .resumeRequested? = pair.serverOutcome else {
            Issue.record("the server did not ask to resume: \(String(describing: pair.serverOutcome))")
            return
        }
        #expect(pair.clientOutcome == nil)
        var ident = Parley_V1_ServerIdent()
        ident.implementation = "test-server"
        ident.sessionToken = Data(repeating: 7, count: 16)
        let step = pair.client.received(.frame(ident.frame(tag: .serverIdent)))
        #expect(Pair.failure(step.outcome)?.code == .unexpectedFrame, "\(String(describing: step.outcome))")
    }

    @Test func versionComparison() {
        #expect(Negotiation.compareVersions("0.10.0", "0.9.9") == 1)
        #expect(Negotiation.compareVersions("1.0", "1.0.0") == 0)
        #expect(Negotiation.compareVersions("1.2.3-beta", "1.2.4") == -1)
        // Empty parts are parts (docs/protocol.md 8.4): ".9" is 0.9, "1..5" is 1.0.5.
        #expect(Negotiation.compareVersions(".9", "1.0") == -1)
        #expect(Negotiation.compareVersions("1..5", "1.0.6") == -1)
        #expect(Negotiation.compareVersions("1.", "1.0") == 0)
        // Numbers of any size; ASCII digits only; leading zeros change nothing.
        #expect(Negotiation.compareVersions("99999999999999999999", "1.0") == 1)
        #expect(Negotiation.compareVersions("99999999999999999999", "99999999999999999998") == 1)
        #expect(Negotiation.compareVersions("1\u{00B2}", "1") == 0, "a superscript two is no digit")
        #expect(Negotiation.compareVersions("2\u{0661}", "3") == -1, "an Arabic-Indic one is no digit")
        #expect(Negotiation.compareVersions("007.1", "7.01") == 0)
        #expect(Negotiation.compareVersions("", "0") == 0)
        #expect(Negotiation.compareVersions("v2", "1") == -1, "no leading digits: 0")
    }

    // MARK: unexpected input in each state

    static func serverAt(_ stage: Int) -> ServerHandshakeStateMachine {
        var s = ServerHandshakeStateMachine(configuration: Pair.serverConfig())
        _ = s.start()
        if stage >= 1 { _ = s.received(.banner(Banner(supported: .implemented))) }
        if stage >= 2 {
            var hello = Parley_V1_Hello()
            hello.entityType = .client
            _ = s.received(.frame(hello.frame(tag: .hello)))
        }
        if stage >= 3 {
            var auth = Parley_V1_AuthRequest()
            auth.method = "none"
            _ = s.received(.frame(auth.frame(tag: .authRequest)))
        }
        return s
    }

    static func clientAt(_ stage: Int) -> ClientHandshakeStateMachine {
        var c = ClientHandshakeStateMachine(configuration: Pair.clientConfig())
        _ = c.start()
        if stage >= 1 { _ = c.received(.banner(Banner(supported: .implemented))) }
        if stage >= 2 {
            var hello = Parley_V1_Hello()
            hello.entityType = .server
            _ = c.received(.frame(hello.frame(tag: .hello)))
        }
        if stage >= 3 {
            var done = Parley_V1_AuthDone()
            done.method = "none"
            _ = c.received(.frame(done.frame(tag: .authDone)))
        }
        return c
    }

    @Test(arguments: 1...3)
    func serverRejectsUnexpectedKnownTag(stage: Int) {
        var s = Self.serverAt(stage)
        let step = s.received(.frame(Parley_V1_ServerIdent().frame(tag: .serverIdent)))
        let e = Pair.failure(step.outcome)
        #expect(e?.code == .unexpectedFrame)
        #expect(e?.message.contains("SERVER_IDENT") == true)
        #expect(step.send.count == 1, "tells the peer with CLOSE")
        // Everything after a failure is refused.
        #expect(Pair.failure(s.received(.frame(Parley_V1_Hello().frame(tag: .hello))).outcome) != nil)
    }

    @Test(arguments: 1...3)
    func clientRejectsUnexpectedKnownTag(stage: Int) {
        var c = Self.clientAt(stage)
        let e = Pair.failure(c.received(.frame(Parley_V1_ClientIdent().frame(tag: .clientIdent))).outcome)
        #expect(e?.code == .unexpectedFrame)
    }

    @Test(arguments: 1...3)
    func unknownCriticalTagFailsAndIgnorableTagIsSkipped(stage: Int) {
        var s = Self.serverAt(stage)
        #expect(s.received(.frame(Frame(tag: FrameTag(rawValue: 0xC3), segments: [buffer([1])]))) == HandshakeStep())
        #expect(Pair.failure(s.received(.frame(Frame(tag: FrameTag(rawValue: 0x55), segments: [buffer([1])]))).outcome)?.code == .unknownFrameTag)
        var c = Self.clientAt(stage)
        #expect(c.received(.frame(Frame(tag: FrameTag(rawValue: 0x80), segments: [ByteBuffer()]))) == HandshakeStep())
        #expect(Pair.failure(c.received(.frame(Frame(tag: FrameTag(rawValue: 0x7F), segments: [ByteBuffer()]))).outcome)?.code == .unknownFrameTag)
    }

    @Test(arguments: 1...3)
    func peerCloseDuringHandshakeCarriesItsReason(stage: Int) {
        var status = Parley_V1_Status()
        status.code = ParleyError.Code.shuttingDown.rawValue
        status.message = "going away"
        var c = Self.clientAt(stage)
        let step = c.received(.frame(status.frame(tag: .close)))
        #expect(Pair.failure(step.outcome) == ParleyError(code: .shuttingDown, message: "peer closed the connection: going away"))
        #expect(Pair.failure(step.outcome)?.closedByPeer == true)
        #expect(step.send.isEmpty, "no CLOSE in answer to CLOSE")
        var s = Self.serverAt(stage)
        #expect(Pair.failure(s.received(.frame(status.frame(tag: .close))).outcome)?.code == .shuttingDown)
    }

    @Test func malformedPayloadsAreRefused() {
        let garbage = Frame(tag: .hello, segments: [buffer([0xFF, 0xFF, 0xFF])])
        var s = Self.serverAt(1)
        #expect(Pair.failure(s.received(.frame(garbage)).outcome)?.code == .malformedPayload)
        var c = Self.clientAt(1)
        #expect(Pair.failure(c.received(.frame(garbage)).outcome)?.code == .malformedPayload)
        var c3 = Self.clientAt(3)
        #expect(Pair.failure(c3.received(.frame(Frame(tag: .serverIdent, segments: [buffer([0x0A, 0x05])]))).outcome)?.code == .malformedPayload)
        // An AUTH_BAD_METHOD whose payload does not decode (a length past its end) is
        // malformedPayload, not taken as an empty one ("no common method").
        var c2 = Self.clientAt(2)
        #expect(Pair.failure(c2.received(.frame(Frame(tag: .authBadMethod, segments: [buffer([0x12, 0x05, 0x6E])]))).outcome)?.code == .malformedPayload)
    }

    @Test func wrongEntityTypeAndSecondBanner() {
        var hello = Parley_V1_Hello()
        hello.entityType = .server
        var s = Self.serverAt(1)
        #expect(Pair.failure(s.received(.frame(hello.frame(tag: .hello))).outcome)?.code == .protocolViolation)
        var s2 = Self.serverAt(2)
        #expect(Pair.failure(s2.received(.banner(Banner(supported: []))).outcome)?.code == .protocolViolation)
        var c = Self.clientAt(1)
        hello.entityType = .client
        #expect(Pair.failure(c.received(.frame(hello.frame(tag: .hello))).outcome)?.code == .protocolViolation)
    }

    @Test func frameBeforeBannerAndStartTwice() {
        var s = ServerHandshakeStateMachine(configuration: Pair.serverConfig())
        _ = s.start()
        #expect(Pair.failure(s.received(.frame(Parley_V1_Hello().frame(tag: .hello))).outcome)?.code == .unexpectedFrame)
        var c = ClientHandshakeStateMachine(configuration: Pair.clientConfig())
        _ = c.start()
        #expect(Pair.failure(c.start().outcome) != nil)
    }

    /// [R-6.1-2] The client refuses an AUTH_DONE for another method than its last request's,
    /// or with a mode the method cannot give (`authenticationFailed`).
    @Test func authDoneForAnotherMethodOrModeIsRefused() {
        var c = Self.clientAt(2)
        var done = Parley_V1_AuthDone()
        done.method = "other"
        #expect(Pair.failure(c.received(.frame(done.frame(tag: .authDone))).outcome)?.code == .authenticationFailed)
        var c2 = Self.clientAt(2)
        done.method = "none"
        done.connectionMode = "secure"
        #expect(Pair.failure(c2.received(.frame(done.frame(tag: .authDone))).outcome)?.code == .authenticationFailed)
    }
}

extension Pair {
    /// Like `run`, but each side's decoder keeps unconsumed bytes between deliveries.
    mutating func runBuffered(chunk: Int = 0) throws {
        var c2s = wireBytes(self.client.start().send)
        var s2c = wireBytes(self.server.start().send)
        self.toServer.writeImmutableBuffer(c2s)
        self.toClient.writeImmutableBuffer(s2c)
        var clientPending = ByteBuffer()
        var serverPending = ByteBuffer()
        var rounds = 0
        while (c2s.readableBytes > 0 || s2c.readableBytes > 0) && rounds < 100_000 {
            rounds += 1
            var nextC2S = ByteBuffer()
            var nextS2C = ByteBuffer()
            if s2c.readableBytes > 0 {
                var piece = s2c.readSlice(length: chunk == 0 ? s2c.readableBytes : min(chunk, s2c.readableBytes))!
                clientPending.writeBuffer(&piece)
                while self.clientOutcome == nil, let element = try self.clientDecoder.decode(buffer: &clientPending) {
                    let step = self.client.received(element)
                    nextC2S.writeImmutableBuffer(wireBytes(step.send))
                    self.clientOutcome = step.outcome
                }
            }
            if c2s.readableBytes > 0 {
                var piece = c2s.readSlice(length: chunk == 0 ? c2s.readableBytes : min(chunk, c2s.readableBytes))!
                serverPending.writeBuffer(&piece)
                while self.serverOutcome == nil, let element = try self.serverDecoder.decode(buffer: &serverPending) {
                    let step = self.server.received(element)
                    nextS2C.writeImmutableBuffer(wireBytes(step.send))
                    self.serverOutcome = step.outcome
                }
            }
            self.toServer.writeImmutableBuffer(nextC2S)
            self.toClient.writeImmutableBuffer(nextS2C)
            c2s.writeImmutableBuffer(nextC2S)
            s2c.writeImmutableBuffer(nextS2C)
        }
    }
}
