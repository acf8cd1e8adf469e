import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Parley
import ParleyServices
import ParleyTestSupport
import ParleyWire
import SwiftProtobuf
import Testing

/// An active man in the middle between a real client and a real server (TCP, both in this
/// process): a proxy that parses the Parley stream up to the switch to secure mode and edits
/// the banners or the AUTH frames. Every edit must end the handshake with
/// `handshakeTampered`, on every attempt; the same proxy forwarding faithfully must not.
@Suite(.timeLimit(.minutes(3)))
struct ManInTheMiddleTests {
    /// What the proxy changes.
    enum Edit: Sendable, CustomStringConvertible {
        case nothing
        /// Clears feature bit 8 (supported and required) in the client's or the server's banner.
        case stripSecureBit(fromClient: Bool)
        /// Removes a method from AUTH_REQUEST `offered_methods`.
        case dropOfferedMethod(String)
        /// Removes a mode from AUTH_REQUEST `offered_modes`.
        case dropOfferedMode(String)
        /// Rewrites the server's choice of mode (and cipher) in AUTH_REPLY_MORE.
        case challengeChoice(mode: String, cipher: String)
        /// Rewrites the mode (and cipher) AUTH_DONE reports.
        case doneChoice(mode: String, cipher: String)
        /// Replaces the chosen cipher by the other one, in AUTH_REPLY_MORE or in AUTH_DONE.
        case swapCipher(inDone: Bool)
        /// Not a tampering with the handshake: in a crc-mode session, sends before each DIRECT
        /// answer of the server a stray copy of it, for an id the client never used (the id +
        /// 1,000,000) and with header byte 8 (after the id) set to 99 (section 7.16, R-7.16-6).
        case strayDirectAnswers

        var description: String {
            switch self {
            case .nothing: return "nothing"
            case .stripSecureBit(let c): return "strip bit 8 from the \(c ? "client" : "server") banner"
            case .dropOfferedMethod(let m): return "drop offered method \(m)"
            case .dropOfferedMode(let m): return "drop offered mode \(m)"
            case .challengeChoice(let m, let c): return "AUTH_REPLY_MORE chooses \(m) \(c)"
            case .doneChoice(let m, let c): return "AUTH_DONE says \(m) \(c)"
            case .swapCipher(let d): return "the other cipher in \(d ? "AUTH_DONE" : "AUTH_REPLY_MORE")"
            case .strayDirectAnswers: return "a stray copy of each DIRECT answer"
            }
        }

        /// The banner as forwarded (nil: unchanged).
        func banner(_ banner: Banner, fromClient: Bool) -> Banner? {
            guard case .stripSecureBit(let c) = self, c == fromClient, banner.supported.contains(.secureMode) else { return nil }
            var b = banner
            b.supported.remove(.secureMode)
            b.required.remove(.secureMode)
            return b
        }

        /// The frame as forwarded (nil: unchanged).
        func frame(_ frame: Frame, fromClient: Bool) -> Frame? {
            switch (self, fromClient, frame.tag) {
            case (.dropOfferedMethod(let method), true, .authRequest):
                guard var request = try? Parley_V1_AuthRequest(parleyPayload: frame.segments[0]), request.offeredMethods.contains(method) else { return nil }
                request.offeredMethods.removeAll { $0 == method }
                return request.frame(tag: .authRequest)
            case (.dropOfferedMode(let mode), true, .authRequest):
                guard var request = try? Parley_V1_AuthRequest(parleyPayload: frame.segments[0]), request.offeredModes.contains(mode) else { return nil }
                request.offeredModes.removeAll { $0 == mode }
                return request.frame(tag: .authRequest)
            case (.challengeChoice(let mode, let cipher), false, .authReplyMore):
                guard var more = try? Parley_V1_AuthMore(parleyPayload: frame.segments[0]),
                      var challenge = try? Parley_V1_SecretAuthChallenge(serializedBytes: more.payload),
                      challenge.connectionMode != mode || challenge.cipher != cipher
                else { return nil }
                challenge.connectionMode = mode
                challenge.cipher = cipher
                more.payload = (try? challenge.serializedBytes()) ?? Data()
                return more.frame(tag: .authReplyMore)
            case (.doneChoice(let mode, let cipher), false, .authDone):
                guard var done = try? Parley_V1_AuthDone(parleyPayload: frame.segments[0]), done.connectionMode != mode || done.cipher != cipher else { return nil }
                done.connectionMode = mode
                done.cipher = cipher
                return done.frame(tag: .authDone)
            case (.swapCipher(false), false, .authReplyMore):
                guard var more = try? Parley_V1_AuthMore(parleyPayload: frame.segments[0]),
                      var challenge = try? Parley_V1_SecretAuthChallenge(serializedBytes: more.payload), !challenge.cipher.isEmpty
                else { return nil }
                challenge.cipher = Self.otherCipher(challenge.cipher)
                more.payload = (try? challenge.serializedBytes()) ?? Data()
                return more.frame(tag: .authReplyMore)
            case (.swapCipher(true), false, .authDone):
                guard var done = try? Parley_V1_AuthDone(parleyPayload: frame.segments[0]), !done.cipher.isEmpty else { return nil }
                done.cipher = Self.otherCipher(done.cipher)
                return done.frame(tag: .authDone)
            default:
                return nil
            }
        }

        /// The frames sent before `frame` (a stray DIRECT answer, for `strayDirectAnswers`).
        func before(_ frame: Frame, fromClient: Bool) -> [Frame] {
            guard case .strayDirectAnswers = self, !fromClient, frame.tag == .direct, frame.segments[0].readableBytes >= 9 else { return [] }
            var stray = frame
            var head = ByteBuffer(bytes: frame.segments[0].readableBytesView)
            head.setInteger(frame.directID! &+ 1_000_000, at: 0, endianness: .little)
            head.setInteger(UInt8(99), at: 8)
            stray.segments[0] = head
            return [stray]
        }

        /// Whether the proxy follows the frames of the whole session (in crc mode), not only
        /// the handshake's.
        var followsSession: Bool {
            if case .strayDirectAnswers = self { return true }
            return false
        }

        static func otherCipher(_ cipher: String) -> String {
            cipher == SecureCipher.aes256GCM.rawValue ? SecureCipher.chacha20Poly1305.rawValue : SecureCipher.aes256GCM.rawValue
        }
    }

    /// One direction of a proxied connection: parses the banner and crc-mode frames, edits,
    /// and from the switch to secure mode on (AUTH_REQUEST_MORE from the client, AUTH_DONE
    /// from the server) forwards bytes as they come.
    final class TamperHandler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer

        let peer: any Channel
        let fromClient: Bool
        let edit: Edit
        let edits: Counter
        private var pending = ByteBuffer()
        private var sawBanner = false
        private var passthrough = false

        init(peer: any Channel, fromClient: Bool, edit: Edit, edits: Counter) {
            self.peer = peer
            self.fromClient = fromClient
            self.edit = edit
            self.edits = edits
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var bytes = self.unwrapInboundIn(data)
            self.pending.writeBuffer(&bytes)
            for out in self.process() { self.peer.write(out, promise: nil) }
            self.peer.flush()
        }

        func channelInactive(context: ChannelHandlerContext) {
            // Close the other side once what was forwarded to it (a CLOSE, say) is written.
            let peer = self.peer
            peer.writeAndFlush(ByteBuffer()).whenComplete { _ in peer.close(promise: nil) }
            context.fireChannelInactive()
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            context.close(promise: nil)
        }

        private func process() -> [ByteBuffer] {
            var out: [ByteBuffer] = []
            while self.pending.readableBytes > 0 {
                if self.passthrough {
                    out.append(self.pending.readSlice(length: self.pending.readableBytes)!)
                    break
                }
                if !self.sawBanner {
                    guard self.pending.readableBytes >= Banner.size else { break }
                    let original = self.pending.readSlice(length: Banner.size)!
                    self.sawBanner = true
                    var copy = original
                    if let banner = try? copy.readBanner(), let edited = self.edit.banner(banner, fromClient: self.fromClient) {
                        var b = ByteBuffer()
                        b.writeBanner(edited)
                        out.append(b)
                        self.edits.increment()
                    } else {
                        out.append(original)
                    }
                    continue
                }
                guard self.pending.readableBytes >= Frame.preambleSize else { break }
                let at = self.pending.readerIndex
                let count = Int(self.pending.getInteger(at: at + 2, as: UInt8.self)!)
                guard (1...Frame.maxSegments).contains(count) else {
                    self.passthrough = true  // not a frame this proxy understands: forward as is
                    continue
                }
                var total = 0
                for i in 0..<count {
                    total += Int(self.pending.getInteger(at: at + 4 + 6 * i, endianness: .little, as: UInt32.self)!)
                }
                let size = Frame.preambleSize + total + 4 * count
                guard self.pending.readableBytes >= size else { break }
                let original = self.pending.readSlice(length: size)!
                var copy = original
                var decoder = WireDecoder(expectBanner: false)
                guard case .frame(let frame)? = try? decoder.decode(buffer: &copy) else {
                    out.append(original)
                    self.passthrough = true
                    continue
                }
                for extra in self.edit.before(frame, fromClient: self.fromClient) {
                    var b = ByteBuffer()
                    b.writeFrame(extra)
                    out.append(b)
                    self.edits.increment()
                }
                if let edited = self.edit.frame(frame, fromClient: self.fromClient) {
                    var b = ByteBuffer()
                    b.writeFrame(edited)
                    out.append(b)
                    self.edits.increment()
                } else {
                    out.append(original)
                }
                if frame.tag == (self.fromClient ? .authRequestMore : .authDone), !self.edit.followsSession { self.passthrough = true }
            }
            return out
        }
    }

    /// Listens on 127.0.0.1 (port 0) and relays each connection to `target` through two
    /// TamperHandlers. Returns the listener (close it when done) and its address.
    static func startProxy(to target: ParleyAddress, edit: Edit, edits: Counter) async throws -> (any Channel, ParleyAddress) {
        guard case .tcp(let host, let port) = target.kind else { throw ParleyError(code: .invalidArgument, message: "proxy needs TCP") }
        let listener = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { inbound in
                ClientBootstrap(group: inbound.eventLoop)
                    .channelInitializer { outbound in
                        outbound.eventLoop.makeCompletedFuture {
                            try outbound.pipeline.syncOperations.addHandler(TamperHandler(peer: inbound, fromClient: false, edit: edit, edits: edits))
                        }
                    }
                    .connect(host: host, port: port)
                    .flatMapThrowing { outbound in
                        try inbound.pipeline.syncOperations.addHandler(TamperHandler(peer: outbound, fromClient: true, edit: edit, edits: edits))
                    }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        return (listener, .tcp(host: "127.0.0.1", port: listener.localAddress!.port!))
    }

    /// A server with method secret (crc and secure mode allowed) behind a proxy that applies
    /// `edit`; `body` gets the proxy's address, the keys and the server's log.
    static func withTamperedServer(
        edit: Edit, modes: [ConnectionMode] = [.crc, .secure], methods: [String] = [AuthMethod.secret, AuthMethod.none],
        _ body: (ParleyAddress, [String: [UInt8]], Counter, LogCollector) async throws -> Void
    ) async throws {
        let path = freshTestDirectory("mitm") + "/server.keyring"
        let keys = try writeKeyring(path, [("client.alice", ["*"])])
        let source = try ParleyKeyringSource(path: path)
        let logs = LogCollector()
        try await withServer(
            configure: { $0.authMethods = methods; $0.modes = modes; $0.keyring = source },
            logger: logs.logger("server", level: .debug)
        ) { _, addresses in
            let edits = Counter()
            let (proxy, address) = try await Self.startProxy(to: addresses[0], edit: edit, edits: edits)
            do {
                try await body(address, keys, edits, logs)
                try? await proxy.close()
            } catch {
                try? await proxy.close()
                throw error
            }
        }
    }

    static let attempts = 5

    static func configuration(_ keys: [String: [UInt8]], methods: [String]? = nil, modes: [ConnectionMode]? = nil) -> ParleyClient.Configuration {
        .init(authMethods: methods, secret: SecretCredentials(entity: "client.alice", key: keys["client.alice"]!), modes: modes)
    }

    @Test func faithfulProxyControl() async throws {
        try await Self.withTamperedServer(edit: .nothing) { address, keys, edits, logs in
            for i in 0..<Self.attempts {
                for modes: [ConnectionMode] in [[.secure, .crc], [.crc]] {
                    let client = try await ParleyClient.connect(
                        to: address, configuration: Self.configuration(keys, methods: [AuthMethod.secret, AuthMethod.none], modes: modes), logger: quietLogger
                    )
                    #expect(client.session.connectionMode == modes[0])
                    #expect(client.session.entity == "client.alice")
                    #expect(try await ping(client, UInt64(i + 1)) == UInt64(i + 1))
                    client.close()
                }
            }
            #expect(edits.count == 0)
            #expect(logs.all.filter { $0.message == "session established" }.count == 2 * Self.attempts)
            #expect(!logs.all.contains { $0.message == "connection closed on error" })
        }
    }

    static let tamperings: [(Edit, String)] = [
        (.stripSecureBit(fromClient: true), "server"),
        (.stripSecureBit(fromClient: false), "client"),
        (.dropOfferedMethod(AuthMethod.none), "server"),
        (.dropOfferedMode("crc"), "server"),
        (.dropOfferedMode("secure"), "server"),
        (.challengeChoice(mode: "crc", cipher: ""), "server"),
        (.swapCipher(inDone: false), "server"),
        (.doneChoice(mode: "crc", cipher: ""), "client"),
        (.swapCipher(inDone: true), "client"),
    ]

    /// Each edit, five times: never established, always `handshakeTampered` for the client
    /// (its own finding, or the server's CLOSE), and the side that found it says so.
    @Test(arguments: Self.tamperings.indices)
    func everyEditIsDetectedEveryTime(_ index: Int) async throws {
        let (edit, detector) = Self.tamperings[index]
        try await Self.withTamperedServer(edit: edit) { address, keys, edits, logs in
            var applied = 0
            for _ in 0..<Self.attempts {
                let before = edits.count
                let error = await #expect(throws: ParleyError.self, "\(edit)") {
                    let client = try await ParleyClient.connect(
                        to: address, configuration: Self.configuration(keys, methods: [AuthMethod.secret, AuthMethod.none]), logger: quietLogger
                    )
                    client.close()
                }
                if edits.count > before { applied += 1 }
                #expect(error?.code == .handshakeTampered, "\(edit): \(String(describing: error))")
                #expect(error?.closedByPeer == (detector == "server"), "\(edit): \(String(describing: error))")
            }
            // An edit that did not apply (e.g. the cipher already chosen) proves nothing.
            #expect(applied == Self.attempts || edits.count == 0, "\(edit): applied \(applied) of \(Self.attempts)")
            #expect(edits.count > 0, "\(edit) never applied")
            if detector == "server" {
                #expect(!logs.all.contains { $0.message == "session established" }, "\(edit): a session was established")
                let tampered = try await eventually {
                    logs.all.filter { $0.message == "connection closed on error" && $0.metadata.contains("handshakeTampered") }.count == Self.attempts
                }
                #expect(tampered, "\(edit): \(logs.all.map { "\($0.message) \($0.metadata)" })")
            } else {
                // The client found it and closed with CLOSE: the server logs the client's reason.
                // (An edited AUTH_DONE is found after the client's CLIENT_IDENT went out: the
                // server, whose own view of the handshake was intact, has established by then.)
                let told = try await eventually {
                    logs.all.filter { $0.message.hasPrefix("connection closed") && $0.metadata.contains("handshakeTampered") }.count == Self.attempts
                }
                #expect(told, "\(edit): \(logs.all.map { "\($0.message) \($0.metadata)" })")
            }
        }
    }

    /// A secure-only client (bit 8 required, offering only `secure`) whose banner loses bit 8
    /// on the way to a server that allows crc as well: a client that offers `secure` without
    /// bit 8 in its banner can only be a tampered one, and the server says so
    /// (`handshakeTampered`). Never established, every time.
    @Test func strippingTheBitOfASecureOnlyClientNeverDowngradesIt() async throws {
        try await Self.withTamperedServer(edit: .stripSecureBit(fromClient: true)) { address, keys, edits, logs in
            for _ in 0..<Self.attempts {
                let error = await #expect(throws: ParleyError.self) {
                    try await ParleyClient.connect(to: address, configuration: Self.configuration(keys, modes: [.secure]), logger: quietLogger).close()
                }
                #expect(error?.code == .handshakeTampered, "\(String(describing: error))")
                #expect(error?.closedByPeer == true, "the server finds it: \(String(describing: error))")
                #expect(error?.message.contains("offers secure mode but its banner does not support it") == true, "\(String(describing: error))")
            }
            #expect(edits.count == Self.attempts)
            #expect(!logs.all.contains { $0.message == "session established" })
        }
    }

    /// Stripping bit 8 from a secure-only client's banner cannot downgrade it either: the
    /// secure-only server refuses that banner (missingFeatures) before any AUTH frame.
    @Test func strippingTheBitOfASecureOnlySideIsRefusedAtTheBanner() async throws {
        try await Self.withTamperedServer(edit: .stripSecureBit(fromClient: true), modes: [.secure], methods: [AuthMethod.secret]) { address, keys, edits, logs in
            for _ in 0..<Self.attempts {
                let error = await #expect(throws: ParleyError.self) {
                    try await ParleyClient.connect(to: address, configuration: Self.configuration(keys, modes: [.secure]), logger: quietLogger).close()
                }
                // The server refuses the banner it got and closes without CLOSE (the banner
                // rule): the client, whose banners look fine, sees the connection close.
                #expect(error?.code == .connectionClosed || error?.code == .missingFeatures, "\(String(describing: error))")
            }
            #expect(edits.count == Self.attempts)
            #expect(!logs.all.contains { $0.message == "session established" })
            let refused = try await eventually {
                logs.all.filter { $0.message == "connection closed on error" && $0.metadata.contains("missingFeatures (4)") }.count == Self.attempts
            }
            #expect(refused, "\(logs.all.map { "\($0.message) \($0.metadata)" })")
        }
    }
}
