import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ParleyNIO
import ParleyWire

/// Bytes a connection has received, filled on its event loop and taken by the check.
final class Inbox: Sendable {
    private struct State {
        var bytes = ByteBuffer()
        /// When the last bytes were appended (on the event loop, as they were read).
        var lastArrival = ContinuousClock.now
        var ended = false
        var error: String?
        /// A reader waiting for bytes, the end, or its time to pass.
        var waiter: CheckedContinuation<Void, Never>?
        /// A wake-up that came while no reader waited.
        var woken = false
    }
    private let state = NIOLockedValueBox(State())

    func append(_ buffer: ByteBuffer) {
        let now = ContinuousClock.now
        self.state.withLockedValue { s in
            var b = buffer
            s.bytes.writeBuffer(&b)
            s.lastArrival = now
        }
        self.wake()
    }

    func end(_ error: String?) {
        self.state.withLockedValue { s in
            if !s.ended { s.error = error }
            s.ended = true
        }
        self.wake()
    }

    private func wake() {
        let waiter = self.state.withLockedValue { s -> CheckedContinuation<Void, Never>? in
            defer { s.waiter = nil }
            if s.waiter == nil { s.woken = true }
            return s.waiter
        }
        waiter?.resume()
    }

    /// Returns when bytes are there, the stream has ended, or `timeout` has passed (or
    /// earlier: the caller checks again).
    func wait(_ timeout: Duration) async {
        let timer = Task {
            try? await Task.sleep(for: timeout)
            if !Task.isCancelled { self.wake() }
        }
        defer { timer.cancel() }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let ready = self.state.withLockedValue { s -> Bool in
                if s.bytes.readableBytes > 0 || s.ended || s.woken {
                    s.woken = false
                    return true
                }
                s.waiter = c
                return false
            }
            if ready { c.resume() }
        }
    }

    /// Everything received since the last call, when its last bytes arrived, and whether
    /// the stream has ended.
    func take() -> (ByteBuffer, arrived: ContinuousClock.Instant, ended: Bool) {
        self.state.withLockedValue { s in
            defer { s.bytes = ByteBuffer() }
            return (s.bytes, s.lastArrival, s.ended)
        }
    }
}

/// Collects what the server sends; the last handler of the pipeline (after TLS or WebSocket
/// framing, if any, so that it sees the Parley byte stream).
final class InboxHandler: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    let inbox: Inbox

    init(inbox: Inbox) { self.inbox = inbox }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.inbox.append(self.unwrapInboundIn(data))
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.inbox.end(nil)
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event { self.inbox.end(nil) }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.inbox.end("\(error)")
        context.close(promise: nil)
    }
}

/// What a check sees next from the server.
enum PeerEvent: Sendable {
    case banner(Banner)
    case frame(Frame)
    /// The byte stream ended between two frames.
    case closed
    /// The server's bytes do not decode (section 4.4): a defect of the server.
    case undecodable(ParleyError)
    /// Nothing within the time given.
    case timeout

    var summary: String {
        switch self {
        case .banner(let b): return "banner version \(b.version) supported \(b.supported) required \(b.required)"
        case .frame(let f): return describe(f)
        case .closed: return "the connection closed"
        case .undecodable(let e): return "bytes that do not decode: \(e.code) (\(e.message))"
        case .timeout: return "nothing"
        }
    }
}

/// A short description of a frame, for FAIL lines.
func describe(_ frame: Frame) -> String {
    switch frame.tag {
    case .close:
        if let status = try? Parley_V1_Status(parleyPayload: frame.segments[0]) {
            return "CLOSE \(ParleyError.Code(rawValue: status.code)) \"\(status.message)\""
        }
        return "CLOSE (undecodable status)"
    case .message:
        if let m = try? WireMessage(frame: frame) {
            var text = "MESSAGE \(m.header.kind) id \(m.header.id) seq \(m.header.seq) \(m.header.type)"
            if m.header.kind == .error, let s = try? Parley_V1_Status(parleyPayload: m.payload) {
                text += " \(ParleyError.Code(rawValue: s.code)) \"\(s.message)\""
            }
            return text
        }
        return "MESSAGE (bad header)"
    default:
        return "\(frame.tag) (\(frame.segments.map { "\($0.readableBytes)" }.joined(separator: ",")) bytes)"
    }
}

/// One connection to the server under test, speaking raw bytes: what is sent is exactly what
/// the check built, legal or not; what comes back is decoded with the pure frame codec.
final class ConformancePeer {
    let channel: any Channel
    private let inbox: Inbox
    private var decoder: WireDecoder
    private var pending = ByteBuffer()
    /// Bytes have arrived that do not make a whole banner or frame yet.
    var holdsPartialFrame: Bool { self.pending.readableBytes > 0 || self.decoder.isInsideFrame }
    private var failed = false
    private var ended = false
    /// When the bytes of the last banner or frame `next` returned had all arrived, at the
    /// latest (the time they were read from the socket, not when the check got round to
    /// them: a check starved by a loaded machine still measures the peer's timing).
    private(set) var lastArrival = ContinuousClock.now
    /// Secure mode: the direction that seals what this client sends.
    private var sealer: SecureDirection?
    /// Every banner and frame received, in order.
    private(set) var received: [PeerEvent] = []

    /// A connection made or accepted, whose pipeline ends in an `InboxHandler` for `inbox`.
    init(channel: any Channel, inbox: Inbox, maxFrameSize: Int) {
        self.channel = channel
        self.inbox = inbox
        self.decoder = WireDecoder(maxFrameSize: maxFrameSize)
    }

    deinit { self.channel.close(promise: nil) }

    static func connect(_ target: ConformanceTarget, maxFrameSize: Int = Frame.maximumOwnLimit) async throws -> ConformancePeer {
        let inbox = Inbox()
        let transport = PosixTransport(connectTimeout: .seconds(10), tls: target.tls)
        let channel = try await transport.connect(to: target.address, group: target.group ?? MultiThreadedEventLoopGroup.singleton) { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(InboxHandler(inbox: inbox))
            }
        }
        return ConformancePeer(channel: channel, inbox: inbox, maxFrameSize: maxFrameSize)
    }

    /// Sends bytes as one write, or in writes of `pieces` bytes each.
    func send(_ bytes: ByteBuffer, pieces: Int? = nil) async {
        guard let pieces else {
            try? await self.channel.writeAndFlush(bytes).get()
            return
        }
        var rest = bytes
        var slices: [ByteBuffer] = []
        while rest.readableBytes > 0, let piece = rest.readSlice(length: min(pieces, rest.readableBytes)) { slices.append(piece) }
        // Written and flushed one by one in a single turn of the event loop: a wait for each
        // piece cost a hop of the loop each, which under a loaded machine stretched a
        // handshake in one-byte writes past a client's handshake timeout.
        let channel = self.channel, parts = slices
        let last = channel.eventLoop.flatSubmit { () -> EventLoopFuture<Void> in
            var written = channel.eventLoop.makeSucceededVoidFuture()
            for piece in parts { written = channel.writeAndFlush(piece) }
            return written
        }
        try? await last.get()
    }

    func send(_ frames: [Frame], pieces: Int? = nil) async throws {
        var b = ByteBuffer()
        for f in frames { try b.writeFrame(f, sealedWith: self.sealer) }
        await self.send(b, pieces: pieces)
    }

    /// Sends the frames `bytes` holds, written in crc mode by a check: as they are in crc
    /// mode; in secure mode (`startSealing`) each is decoded and sent sealed, so that a check
    /// of what frames carry runs in both modes. Bytes that are not whole, well-formed frames
    /// test crc framing itself, which secure mode replaces (section 5.1): the check skips.
    func sendFrames(_ bytes: ByteBuffer, pieces: Int? = nil) async throws {
        guard self.sealer != nil else { return await self.send(bytes, pieces: pieces) }
        var decoder = WireDecoder(maxFrameSize: Frame.maximumOwnLimit, expectBanner: false)
        var rest = bytes
        var frames: [Frame] = []
        // A preamble at the end without its body (a frame the server must refuse from its
        // preamble alone) is sealed on its own.
        var lonePreamble: ByteBuffer?
        var start = rest.readerIndex
        do {
            while rest.readableBytes > 0 {
                start = rest.readerIndex
                if rest.readableBytes == Frame.preambleSize {
                    // Checked as a preamble (CRC, reserved bytes, counts) by a decoder of its own.
                    var alone = WireDecoder(maxFrameSize: Frame.maximumOwnLimit, expectBanner: false)
                    var copy = rest
                    _ = try alone.decode(buffer: &copy)
                    lonePreamble = rest.readSlice(length: Frame.preambleSize)
                    break
                }
                guard let element = try decoder.decode(buffer: &rest), case .frame(let frame) = element else { break }
                frames.append(frame)
            }
        } catch where error.code == .protocolViolation && bytes.writerIndex - start >= Frame.preambleSize {
            // A preamble breaking a rule of section 4.4 (segment count, reserved byte, unused
            // descriptors) breaks it sealed as well: it goes sealed on its own, and the
            // server must refuse it once opened, before any body.
            lonePreamble = bytes.getSlice(at: start, length: Frame.preambleSize)
        } catch {
            throw CheckSkip(reason: "it tests crc-mode framing (\(error.message)), which secure mode replaces with sealed frames (section 5.1)")
        }
        guard rest.readableBytes == 0 || lonePreamble != nil else {
            throw CheckSkip(reason: "it tests crc-mode framing (a partial frame), which secure mode replaces with sealed frames (section 5.1)")
        }
        guard let lonePreamble, let sealer = self.sealer else { return try await self.send(frames, pieces: pieces) }
        var b = ByteBuffer()
        for f in frames { try b.writeFrame(f, sealedWith: sealer) }
        b.writeImmutableBuffer(try sealer.sealPreamble(lonePreamble))
        await self.send(b, pieces: pieces)
    }

    /// The next banner or frame from the server, waiting at most `timeout`.
    func next(_ timeout: Duration) async -> PeerEvent {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while true {
            if self.failed || (self.ended && self.pending.readableBytes == 0) { return .closed }
            do {
                if let element = try self.decoder.decode(buffer: &self.pending) {
                    // Not after every frame: a burst of large frames would be moved again and again.
                    if self.pending.readerIndex >= 1 << 20 && self.pending.readerIndex >= self.pending.readableBytes { self.pending.discardReadBytes() }
                    return self.record(element)
                }
            } catch {
                self.failed = true
                return self.record(error)
            }
            let (more, arrived, ended) = self.inbox.take()
            if more.readableBytes > 0 {
                var more = more
                self.pending.writeBuffer(&more)
                self.lastArrival = arrived
                continue
            }
            if ended {
                self.ended = true
                do {
                    if let element = try self.decoder.decodeLast(buffer: &self.pending, seenEOF: true) { return self.record(element) }
                } catch {
                    self.failed = true
                    return self.record(error)
                }
                self.pending.clear()
                return .closed
            }
            let now = ContinuousClock.now
            if now >= deadline { return .timeout }
            await self.inbox.wait(deadline - now)
        }
    }

    private func record(_ element: WireInbound) -> PeerEvent {
        let event: PeerEvent
        switch element {
        case .banner(let b): event = .banner(b)
        case .frame(let f): event = .frame(f)
        }
        self.received.append(event)
        return event
    }

    private func record(_ error: ParleyError) -> PeerEvent {
        let event = PeerEvent.undecodable(error)
        self.received.append(event)
        return event
    }

    /// From the next frame on, the server's frames are sealed (secure mode): opened with
    /// `direction`. Called between two frames, when the handshake settles the keys.
    func startOpening(_ direction: SecureDirection) {
        self.decoder.startOpening(direction)
    }

    /// From now on, frames sent with `send(_:)` and `sendFrames(_:)` are sealed.
    func startSealing(_ direction: SecureDirection) {
        self.sealer = direction
    }

    /// Whether this connection is in secure mode (frames sent sealed).
    var isSealing: Bool { self.sealer != nil }

    func close() {
        self.channel.close(promise: nil)
    }
}

extension ByteBuffer {
    /// Writes `frame` as it goes on the wire: sealed with `sealer` in secure mode, as a crc
    /// frame without one.
    mutating func writeFrame(_ frame: Frame, sealedWith sealer: SecureDirection?) throws {
        guard let sealer else { return self.writeFrame(frame) }
        var parts: [ByteBuffer] = []
        try frame.seal(with: sealer, into: &parts, allocator: ByteBufferAllocator())
        for part in parts { self.writeImmutableBuffer(part) }
    }

    /// Writes what one step of a handshake state machine sends (`edit` may change a frame
    /// first); a `.startSealing` sets `sealer`, which seals the frames after it.
    mutating func writeStep(_ send: [WireOutbound], sealer: inout SecureDirection?, edit: (Frame) -> Frame = { $0 }) throws {
        for element in send {
            switch element {
            case .banner(let banner): self.writeBanner(banner)
            case .frame(let frame): try self.writeFrame(edit(frame), sealedWith: sealer)
            case .startSealing(let keys): sealer = try SecureDirection(keys: keys.keys, sealing: true)
            }
        }
    }
}
