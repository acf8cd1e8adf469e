import NIOCore
import ParleyServices
import ParleyWire
import SwiftProtobuf

/// What the conformance client announces, and how it sends its first flight.
struct ClientOptions {
    /// The features a banner of this client announces unless a check says otherwise: the
    /// implemented ones, and secure mode when the server requires it (set by the runner).
    @TaskLocal static var announced: ParleyFeatures = .implemented

    var version: UInt16 = 1
    var supported: ParleyFeatures = Self.announced
    var required: ParleyFeatures = []
    var maxFrameSize: UInt32 = .max
    var peerAddress = "conformance-client"
    var ident: Frame = {
        var ident = Parley_V1_ClientIdent()
        ident.platform = "any"
        ident.implementation = "parley-conform"
        ident.version = "1.0.0"
        ident.name = "parley conform"
        ident.clientNonce = 1
        return ident.frame(tag: .clientIdent)
    }()
    /// Frames sent between HELLO and AUTH_REQUEST, and between AUTH_DONE and CLIENT_IDENT.
    var beforeAuth: [Frame] = []
    var beforeIdent: [Frame] = []
    var hello: Frame?
    /// Writes of this many bytes each (nil: one write per flight).
    var pieces: Int?

    func helloFrame() -> Frame {
        if let hello { return hello }
        var h = Parley_V1_Hello()
        h.entityType = .client
        h.peerAddress = self.peerAddress
        h.maxFrameSize = self.maxFrameSize
        return h.frame(tag: .hello)
    }

    static func authRequest(_ method: String = "none") -> Frame {
        var auth = Parley_V1_AuthRequest()
        auth.method = method
        auth.offeredMethods = [method]
        return auth.frame(tag: .authRequest)
    }

    func firstFlight() -> ByteBuffer {
        var b = ByteBuffer()
        b.writeBanner(Banner(version: self.version, supported: self.supported, required: self.required))
        b.writeFrame(self.helloFrame())
        for f in self.beforeAuth { b.writeFrame(f) }
        b.writeFrame(Self.authRequest())
        return b
    }
}

/// A session of the conformance client with the server: the handshake done, then MESSAGEs
/// numbered by hand (so that a check can also number them wrongly).
final class ClientSession {
    let peer: ConformancePeer
    let context: CheckContext
    let serverBanner: Banner
    let serverHello: Parley_V1_Hello
    let serverIdent: Parley_V1_ServerIdent
    let features: ParleyFeatures
    var nextSeq: UInt64 = 1
    var nextId: UInt64 = 1
    var lastReceivedSeq: UInt64 = 0
    /// Every MESSAGE received, in order, and every other frame of the session.
    var messages: [WireMessage] = []
    var controls: [Frame] = []
    /// Numbering faults in what the server sent: seq not 1, 2, 3, ...
    var seqFaults: [String] = []

    private init(peer: ConformancePeer, context: CheckContext, banner: Banner, hello: Parley_V1_Hello, ident: Parley_V1_ServerIdent, features: ParleyFeatures) {
        self.peer = peer
        self.context = context
        self.serverBanner = banner
        self.serverHello = hello
        self.serverIdent = ident
        self.features = features
    }

    static func open(context: CheckContext, options: ClientOptions = ClientOptions(), maxFrameSize: Int = Frame.maximumOwnLimit) async throws -> ClientSession {
        try await self.open(peer: try await context.connect(maxFrameSize: maxFrameSize), context: context, options: options)
    }

    /// Runs the handshake (method none, crc mode). A server that cannot have this handshake
    /// (it requires features or a method this client lacks) makes the check SKIP.
    static func open(peer: ConformancePeer, context: CheckContext, options: ClientOptions) async throws -> ClientSession {
        if context.secure { return try await self.openSecure(peer: peer, context: context, options: options) }
        await peer.send(options.firstFlight(), pieces: options.pieces)
        let banner = try await self.expectBanner(peer, context.timeout)
        let theirNeeds = banner.required.subtracting(options.supported)
        let ourNeeds = options.required.subtracting(banner.supported)
        guard theirNeeds.isEmpty, ourNeeds.isEmpty else {
            throw CheckSkip(reason: "the server requires features \(theirNeeds) that parley conform does not speak")
        }
        let features = banner.supported.intersection(options.supported)
        let helloFrame = try await self.expect(.hello, peer, context.timeout, "HELLO")
        let hello = try decode(Parley_V1_Hello.self, helloFrame)
        let authFrame = try await self.expectOneOf([.authDone, .authBadMethod], peer, context.timeout, "AUTH_DONE")
        if authFrame.tag == .authBadMethod {
            let bad = try? Parley_V1_AuthBadMethod(parleyPayload: authFrame.segments[0])
            throw CheckSkip(reason: "the server does not allow method none (it allows \(bad?.allowedMethods ?? []))")
        }
        var second = ByteBuffer()
        for f in options.beforeIdent { second.writeFrame(f) }
        second.writeFrame(options.ident)
        await peer.send(second, pieces: options.pieces)
        let identFrame = try await self.expect(.serverIdent, peer, context.timeout, "SERVER_IDENT")
        let ident = try decode(Parley_V1_ServerIdent.self, identFrame)
        if ident.hasRefusal {
            throw CheckSkip(reason: "the server refuses this client: \(ident.refusal.message)")
        }
        return ClientSession(peer: peer, context: context, banner: banner, hello: hello, ident: ident, features: features)
    }

    /// The same session in secure mode (method `secret` with the target's key): the
    /// handshake is the client state machine's, with this check's banner, frame limit and
    /// CLIENT_IDENT; every frame after it is sealed by the peer. A check that adds frames to
    /// the handshake or rewrites HELLO tests the method-none handshake, and skips.
    static func openSecure(peer: ConformancePeer, context: CheckContext, options: ClientOptions) async throws -> ClientSession {
        guard options.beforeAuth.isEmpty, options.beforeIdent.isEmpty, options.hello == nil else {
            throw CheckSkip(reason: "it adds frames to the method-none handshake or rewrites HELLO, and the session checks run in secure mode")
        }
        guard let ident = try? Parley_V1_ClientIdent(parleyPayload: options.ident.segments[0]), options.ident.tag == .clientIdent else {
            throw CheckSkip(reason: "it sends a CLIENT_IDENT that does not decode, which the secure handshake cannot carry")
        }
        let banner = Banner(version: options.version, supported: options.supported.union(.secureMode), required: options.required)
        let (result, _) = try await SecureClientSession.handshake(
            peer: peer, context: context, banner: banner, maxFrameSize: options.maxFrameSize, ident: ident, pieces: options.pieces
        )
        if result.serverIdent.hasRefusal {
            throw CheckSkip(reason: "the server refuses this client: \(result.serverIdent.refusal.message)")
        }
        return ClientSession(
            peer: peer, context: context, banner: result.peerBanner, hello: result.peerHello, ident: result.serverIdent,
            features: result.features.subtracting(.secureMode)
        )
    }

    static func expectBanner(_ peer: ConformancePeer, _ timeout: Duration) async throws -> Banner {
        let event = await peer.next(timeout)
        guard case .banner(let banner) = event else { throw fail("the server's banner", event.summary) }
        return banner
    }

    /// The next frame with this tag, skipping ignorable unknown tags.
    static func expect(_ tag: FrameTag, _ peer: ConformancePeer, _ timeout: Duration, _ what: String) async throws -> Frame {
        try await self.expectOneOf([tag], peer, timeout, what)
    }

    static func expectOneOf(_ tags: [FrameTag], _ peer: ConformancePeer, _ timeout: Duration, _ what: String) async throws -> Frame {
        while true {
            let event = await peer.next(timeout)
            if case .frame(let f) = event {
                if tags.contains(f.tag) { return f }
                if f.tag.isIgnorable && !f.tag.isKnown { continue }
            }
            throw fail(what, event.summary)
        }
    }

    // MARK: Sending

    /// A MESSAGE frame with the next seq and the current ack, unless given.
    func message(
        kind: MessageKind, id: UInt64, type: String, payload: ByteBuffer = ByteBuffer(), data: ByteBuffer? = nil,
        seq: UInt64? = nil, headerFlags: UInt8 = 0
    ) -> Frame {
        let s = seq ?? self.nextSeq
        self.nextSeq = s + 1
        let header = MessageHeader(seq: s, ack: self.lastReceivedSeq, id: id, kind: kind, flags: headerFlags, type: type)
        return WireMessage(header: header, payload: payload, data: data).frame(allocator: ByteBufferAllocator())
    }

    /// The size, as frame limits count it (the sum of its segment lengths, R-4.4-3), of the
    /// MESSAGE `message(kind:id:type:payload:)` would build next.
    func nextMessageSize(kind: MessageKind, id: UInt64, type: String, payload: ByteBuffer) -> Int {
        let header = MessageHeader(seq: self.nextSeq, ack: self.lastReceivedSeq, id: id, kind: kind, type: type)
        return WireMessage(header: header, payload: payload).frame(allocator: ByteBufferAllocator()).payloadSize
    }

    func newId() -> UInt64 {
        defer { self.nextId += 1 }
        return self.nextId
    }

    /// Sends a REQUEST and returns its id.
    @discardableResult
    func request(_ type: String, _ payload: ByteBuffer, data: ByteBuffer? = nil, id: UInt64? = nil) async throws -> UInt64 {
        let id = id ?? self.newId()
        try await self.peer.send([self.message(kind: .request, id: id, type: type, payload: payload, data: data)])
        return id
    }

    func ping(_ sequence: UInt64 = 1, id: UInt64? = nil) -> Frame {
        var p = Parley_Echo_V1_Ping()
        p.sequence = sequence
        return self.message(kind: .request, id: id ?? self.newId(), type: Parley_Echo_V1_Ping.protoMessageName, payload: p.parleyPayload())
    }

    func send(_ frames: [Frame], pieces: Int? = nil) async throws {
        try await self.peer.send(frames, pieces: pieces)
    }

    // MARK: Receiving

    /// The next frame of the session: MESSAGEs are parsed and numbered, KEEPALIVEs answered,
    /// ignorable unknown tags skipped. Returns nil on timeout; a CLOSE, the end of the stream
    /// or undecodable bytes are failures unless the caller handles them (`nextEvent`).
    /// `timeout` bounds the whole call: KEEPALIVEs answered on the way do not restart it.
    func nextEvent(_ timeout: Duration? = nil) async throws -> PeerEvent {
        let deadline = ContinuousClock.now.advanced(by: timeout ?? self.context.timeout)
        while true {
            let left = deadline - ContinuousClock.now
            guard left > .zero else { return .timeout }
            let event = await self.peer.next(left)
            guard case .frame(let f) = event else { return event }
            switch f.tag {
            case .message:
                let m: WireMessage
                do { m = try WireMessage(frame: f) } catch { throw fail("a MESSAGE with a valid header (section 7.2)", "\(error)") }
                if m.header.seq != self.lastReceivedSeq &+ 1 {
                    self.seqFaults.append("seq \(m.header.seq) after \(self.lastReceivedSeq)")
                }
                self.lastReceivedSeq = m.header.seq
                self.messages.append(m)
                return event
            case .keepalive:
                self.controls.append(f)
                var ack = f
                ack.tag = .keepaliveAck
                try await self.peer.send([ack])
            default:
                if f.tag.isIgnorable && !f.tag.isKnown { continue }
                self.controls.append(f)
                return event
            }
        }
    }

    /// The final answer (RESPONSE or ERROR) to request `id`, within `timeout` in all (other
    /// messages, NOTICEs, ACKs and KEEPALIVEs on the way do not restart it).
    func answer(_ id: UInt64, timeout: Duration? = nil) async throws -> WireMessage {
        if let m = self.messages.first(where: { $0.header.id == id && ($0.header.kind == .response || $0.header.kind == .error) }) {
            return m
        }
        let deadline = ContinuousClock.now.advanced(by: timeout ?? self.context.timeout)
        while true {
            let event = try await self.nextEvent(max(deadline - ContinuousClock.now, .zero))
            switch event {
            case .frame(let f) where f.tag == .message:
                let m = self.messages.last!
                if m.header.id == id && (m.header.kind == .response || m.header.kind == .error) { return m }
            case .frame(let f) where f.tag == .notice || f.tag == .keepaliveAck || f.tag == .ack:
                continue
            default:
                throw fail("the answer to request \(id)", event.summary)
            }
        }
    }

    /// Reads until the server closes the connection, at most `timeout`; returns what came.
    func drainUntilClosed(_ timeout: Duration? = nil) async throws -> (frames: [Frame], closed: Bool) {
        var frames: [Frame] = []
        let deadline = ContinuousClock.now.advanced(by: timeout ?? self.context.timeout)
        while ContinuousClock.now < deadline {
            let event = try await self.nextEvent(deadline - ContinuousClock.now)
            switch event {
            case .frame(let f): frames.append(f)
            case .closed: return (frames, true)
            case .undecodable(let e): throw fail("frames that decode", "\(e.code): \(e.message)")
            case .timeout, .banner: return (frames, false)
            }
        }
        return (frames, false)
    }

    /// The server closes the connection with CLOSE `code` (section 4.4: it SHOULD send CLOSE
    /// and MUST close), after at most the answers to what came before.
    func expectClose(_ code: ParleyError.Code, because why: String) async throws {
        try await expectCloseFrame(code, because: why, in: self.drainUntilClosed())
    }
}

func decode<M: SwiftProtobuf.Message>(_ type: M.Type, _ frame: Frame) throws -> M {
    do { return try M(parleyPayload: frame.segments[0]) } catch { throw fail("a \(M.protoMessageName) payload that decodes", "\(error)") }
}

/// Checks that a connection ended with CLOSE `code`: the CLOSE is the last frame, and then
/// the connection closed.
func expectCloseFrame(_ code: ParleyError.Code, because why: String, in drained: (frames: [Frame], closed: Bool)) throws {
    let expected = "CLOSE \(code) (\(why)), then the connection closed"
    guard let close = drained.frames.last, close.tag == .close else {
        let seen = drained.frames.map(describe) + [drained.closed ? "the connection closed without CLOSE" : "the connection still open"]
        throw fail(expected, seen.joined(separator: "; "))
    }
    let status = try decode(Parley_V1_Status.self, close)
    guard status.code == code.rawValue else {
        throw fail(expected, describe(close))
    }
    guard drained.closed else { throw fail(expected, "\(describe(close)), but the connection stayed open") }
}

/// A frame with a preamble written by hand: any tag, flags, segment count, byte 3 and
/// descriptors, with a correct CRC unless `corruptCRC`.
func rawFrame(
    tag: UInt8, flags: UInt8 = 0, count: UInt8? = nil, byte3: UInt8 = 0, segments: [ByteBuffer],
    descriptors: [(UInt32, UInt16)]? = nil, corruptPreambleCRC: Bool = false, corruptSegmentCRC: Bool = false
) -> ByteBuffer {
    var b = ByteBuffer()
    b.writeMultipleIntegers(tag, flags, count ?? UInt8(segments.count), byte3)
    let d = descriptors ?? segments.map { (UInt32($0.readableBytes), UInt16(0)) }
    for i in 0..<4 {
        let (length, alignment) = i < d.count ? d[i] : (0, 0)
        b.writeMultipleIntegers(length, alignment, endianness: .little)
    }
    var crc = CRC32C.checksum(b, at: 0, length: 28)
    if corruptPreambleCRC { crc ^= 0xFFFF_FFFF }
    b.writeInteger(crc, endianness: .little)
    for s in segments { b.writeImmutableBuffer(s) }
    for (i, s) in segments.enumerated() {
        var c = CRC32C.checksum(s)
        if corruptSegmentCRC && i == 0 { c ^= 0x0101_0101 }
        b.writeInteger(c, endianness: .little)
    }
    return b
}

extension ByteBuffer {
    init(frame: Frame) {
        self.init()
        self.writeFrame(frame)
    }
}
