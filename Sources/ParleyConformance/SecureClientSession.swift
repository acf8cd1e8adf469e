import NIOCore
import ParleyServices
import ParleyWire

/// A secure session of the conformance client (method `secret`, with the key the target
/// names), driven by the client handshake state machine; frames sent after the switch are
/// sealed by hand, so that a check can also send them altered.
final class SecureClientSession {
    let peer: ConformancePeer
    let context: CheckContext
    let result: HandshakeResult
    let sealer: SecureDirection?
    var nextSeq: UInt64 = 1

    private init(peer: ConformancePeer, context: CheckContext, result: HandshakeResult, sealer: SecureDirection?) {
        self.peer = peer
        self.context = context
        self.result = result
        self.sealer = sealer
    }

    /// Runs the handshake with method `secret` in secure mode. Skips without a key, or when
    /// the server refuses the method or the key (a matter of its policy and keyring); any
    /// other failure is the server's.
    /// `early`: requests (made by `ping(id:)`-like builders, numbered from seq 1) sent sealed
    /// right after CLIENT_IDENT, before SERVER_IDENT (R-6.1-6); the session numbers on after them.
    static func open(_ c: CheckContext, early: [(_ seq: UInt64) -> Frame] = []) async throws -> SecureClientSession {
        let peer = try await c.connect()
        let (result, sealer) = try await self.handshake(
            peer: peer, context: c, banner: Banner(supported: ParleyFeatures.implemented.union(.secureMode)), maxFrameSize: .max,
            ident: self.ident, pieces: nil, early: early
        )
        let session = SecureClientSession(peer: peer, context: c, result: result, sealer: sealer)
        session.nextSeq = UInt64(early.count) + 1
        return session
    }

    static var ident: Parley_V1_ClientIdent {
        var ident = Parley_V1_ClientIdent()
        ident.platform = "any"
        ident.implementation = "parley-conform"
        ident.version = "1.0.0"
        ident.name = "parley conform"
        ident.clientNonce = 1
        return ident
    }

    /// The secure handshake on `peer`, driven by the client state machine; afterwards the
    /// peer opens what the server sends and seals what `send` sends.
    static func handshake(
        peer: ConformancePeer, context c: CheckContext, banner: Banner, maxFrameSize: UInt32, ident: Parley_V1_ClientIdent, pieces: Int?,
        early: [(_ seq: UInt64) -> Frame] = []
    ) async throws -> (HandshakeResult, SecureDirection?) {
        switch try await self.run(peer: peer, context: c, banner: banner, maxFrameSize: maxFrameSize, ident: ident, pieces: pieces, reconnect: nil, early: early) {
        case .established(let result, let sealer): return (result, sealer)
        case .answered: throw fail("a secure handshake", "an answer to a SESSION_RECONNECT that was not sent")
        }
    }

    /// The secure handshake with `reconnect` (a SESSION_RECONNECT frame, as a check built
    /// it, well-formed or not) sealed in place of CLIENT_IDENT; returns what the server
    /// answered it with (SESSION_RESUMED, SESSION_RESET or CLOSE, opened), without judging it.
    /// Frames the check sends afterwards are sealed (`sendFrames`).
    static func reconnect(peer: ConformancePeer, context c: CheckContext, banner: Banner, reconnect: Frame) async throws -> PeerEvent {
        switch try await self.run(peer: peer, context: c, banner: banner, maxFrameSize: .max, ident: self.ident, pieces: nil, reconnect: reconnect) {
        case .answered(let event): return event
        case .established: throw fail("an answer to SESSION_RECONNECT", "a session established without it")
        }
    }

    private enum Outcome {
        case established(HandshakeResult, SecureDirection?)
        case answered(PeerEvent)
    }

    private static func run(
        peer: ConformancePeer, context c: CheckContext, banner: Banner, maxFrameSize: UInt32, ident: Parley_V1_ClientIdent, pieces: Int?,
        reconnect: Frame?, early: [(_ seq: UInt64) -> Frame] = []
    ) async throws -> Outcome {
        guard let secret = c.target.secret else {
            peer.close()
            throw CheckSkip(reason: "no key of the server's keyring was given (--keyring FILE --name ENTITY)")
        }
        let missing = c.serverBanner.required.subtracting(banner.supported)
        guard missing.isEmpty else {
            peer.close()
            throw CheckSkip(reason: "the server requires features \(missing) that parley conform does not speak")
        }
        guard c.serverBanner.supported.contains(.secureMode) else {
            peer.close()
            throw CheckSkip(reason: "the server does not offer secure mode (bit 8)")
        }
        var machine = ClientHandshakeStateMachine(configuration: .init(
            banner: banner, maxFrameSize: maxFrameSize, authMethods: [AuthMethod.secret], ident: ident,
            serverAddress: c.target.address.description, secret: secret, modes: [.secure], randomness: .generate()
        ))
        var sealer: SecureDirection?
        var step = machine.start()
        // The SESSION_RECONNECT went out (in place of CLIENT_IDENT, with the last proof): the
        // machine still takes the rest of the handshake (AUTH_DONE), and the answer to the
        // reconnect is returned for the check to judge.
        var reconnected = false
        while true {
            var out = ByteBuffer()
            try out.writeStep(step.send, sealer: &sealer) { frame in
                guard let reconnect, frame.tag == .clientIdent else { return frame }
                reconnected = true
                return reconnect
            }
            if step.earlyMessages != nil, let sealer {
                for (i, frame) in early.enumerated() { try out.writeFrame(frame(UInt64(i) + 1), sealedWith: sealer) }
            }
            if out.readableBytes > 0 { await peer.send(out, pieces: pieces) }
            if let opening = step.startOpening { peer.startOpening(try SecureDirection(keys: opening.keys, sealing: false)) }
            if reconnected, let sealer, !peer.isSealing { peer.startSealing(sealer) }
            switch step.outcome {
            case .established(let result):
                if let sealer { peer.startSealing(sealer) }
                return .established(result, sealer)
            case .failed(let error) where error.code == .authenticationFailed:
                peer.close()
                throw CheckSkip(reason: "the server does not accept method secret with this key: \(error.message)")
            case .failed(let error):
                peer.close()
                throw fail("a secure handshake with method secret", "\(error.code): \(error.message)")
            case .resumeRequested, nil:
                break
            }
            var event = await peer.next(c.timeout)
            if reconnected {
                while case .frame(let f) = event, f.tag.isIgnorable && !f.tag.isKnown { event = await peer.next(c.timeout) }
                guard case .frame(let f) = event, [.authDone, .authReplyMore].contains(f.tag) else { return .answered(event) }
            }
            switch event {
            case .banner(let banner): step = machine.received(.banner(banner))
            case .frame(let frame): step = machine.received(.frame(frame))
            default:
                peer.close()
                throw fail("the secure handshake to go on", event.summary)
            }
        }
    }

    /// The bytes of `frame` sealed with this client's keys.
    func sealed(_ frame: Frame) throws -> ByteBuffer {
        guard let sealer = self.sealer else { throw fail("secure mode", "the server chose crc mode") }
        var out = ByteBuffer()
        try out.writeFrame(frame, sealedWith: sealer)
        return out
    }

    func ping(id: UInt64) -> Frame {
        defer { self.nextSeq += 1 }
        return Self.ping(id: id, seq: self.nextSeq)
    }

    static func ping(id: UInt64, seq: UInt64) -> Frame {
        var p = Parley_Echo_V1_Ping()
        p.sequence = id
        return WireMessage(header: MessageHeader(seq: seq, id: id, kind: .request, type: Parley_Echo_V1_Ping.protoMessageName), payload: p.parleyPayload())
            .frame(allocator: ByteBufferAllocator())
    }
}
