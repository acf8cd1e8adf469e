import NIOConcurrencyHelpers
import NIOCore
import ParleyWire
import Synchronization

/// What receives a connection's events, on the connection's event loop.
///
/// The async layer implements it (`ParleyConnection`): answers complete their waiting callers
/// and requests start their handlers right where the frame was decoded, with no queue and no
/// thread hop in between.
public protocol ParleyEventSink: AnyObject, Sendable {
    /// An event after the handshake: a message, a notice or a keepalive answer. On the event loop.
    func received(_ event: ConnectionEvent)
    /// The connection has closed, for this reason. Called once, on the event loop.
    func closed(_ reason: ParleyError)
    /// Lossless sessions: the current connection broke without either side closing the
    /// session (no CLOSE); the session lives on, detached. Called once instead of `closed`.
    func linkLost(_ reason: ParleyError)
}

extension ParleyEventSink {
    public func linkLost(_ reason: ParleyError) { self.closed(reason) }
}

/// What `establish` returns: the sink of the session's events, and for a lossless session
/// (feature bit 9) the session and this connection's link in it, already attached.
public struct EstablishedLink {
    public var sink: any ParleyEventSink
    public var lossless: (session: LosslessSession, link: LosslessSession.LinkID)?

    public init(sink: any ParleyEventSink, lossless: (session: LosslessSession, link: LosslessSession.LinkID)? = nil) {
        self.sink = sink
        self.lossless = lossless
    }
}

/// Server side: what becomes of a client's SESSION_RECONNECT.
public enum ResumeDecision: Sendable {
    /// Resume: SESSION_RESUMED with this last received seq.
    case resume(lastReceivedSeq: UInt64)
    /// The session is unknown: SESSION_RESET with this reason.
    case reset(reason: String)
    /// CLOSE with this error (an out-of-date attempt, another entity's session).
    case refuse(ParleyError)
}

/// Runs the wire decoder and the handshake and session state machines on the event loop; the
/// tail of a Parley pipeline (after an optional capture handler).
///
/// Inbound it decodes the bytes read into banners and frames (`WireDecoder`, run here rather
/// than in a `ByteToMessageHandler` of its own: no pipeline step and no boxed value per frame),
/// turns them into `ConnectionEvent`s and hands them to the sink that `establish` returned
/// when the handshake completed. Outbound it takes
/// `ConnectionCommand`s (through the pipeline, or from any thread through its `Outlet`), stamps
/// seq/ack, and writes each frame as a list of buffers (bulk segments are never copied).
/// Every protocol error is sent to the peer in a CLOSE frame when possible, reported as the
/// reason the connection closed, and closes the channel.
///
/// Flushes are coalesced: answers written while a read burst is handled leave together when it
/// ends (as a raw NIO echo flushes in `channelReadComplete`), or every `flushEvery` of them
/// in a long burst, so that the peer can start on them meanwhile (a lossless session's
/// messages leave once per burst, when it pumps); commands queued from other
/// threads leave in one write per batch; other writes on the event loop flush once at the end
/// of the event-loop tick.
public final class ParleyConnectionHandler: ChannelDuplexHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = Never
    public typealias OutboundIn = ConnectionCommand
    public typealias OutboundOut = ByteBuffer

    public enum Role {
        case client(ClientHandshakeStateMachine)
        case server(ServerHandshakeStateMachine)
    }

    /// Called on the event loop when the handshake has completed; returns the sink of the session.
    public typealias Establish = (HandshakeResult, Outlet) throws -> EstablishedLink

    private enum State {
        case handshaking(Role)
        /// The session's machine is `session`, kept out of the enum so that it is mutated in
        /// place (taking it out of an enum case and putting it back copies it, with a retain
        /// and release of each of its references, on every message).
        case established
        case closing
    }

    private var state: State
    /// The session's state machine, from the end of the handshake (`.established`) on.
    private var session: SessionStateMachine?
    private var decoder = WireDecoder()
    /// Bytes read but not decoded yet: the start of a frame whose end has not arrived.
    private var unread: ByteBuffer?
    /// `unread` is a buffer of its own sized for the piece it gathers (`channelRead`), not
    /// the rest of a read: the next read's bytes are appended to it in place.
    private var unreadIsPiece = false
    /// Inside the decoding loop of `channelRead`.
    private var decoding = false
    /// Used once: dropped after the handshake, since what it captures (the caller's promise of
    /// the connection) would otherwise keep the connection, which holds this handler, alive.
    private var establish: Establish?
    private let establishedPromise: EventLoopPromise<Void>
    private var sink: (any ParleyEventSink)?
    /// A lossless session's connection: the session, and this connection's link in it.
    private var lossless: (session: LosslessSession, link: LosslessSession.LinkID)?
    /// A CLOSE was sent or received: the session ends with the connection (not just the link).
    private var closeExchanged = false
    private var ackTimer: Scheduled<Void>?
    private var pumpBuffer: [WireMessage] = []
    /// A pump is due at the end of this event-loop tick.
    private var pumpDeferred = false
    /// Server side: decides on a client's SESSION_RECONNECT (feature bit 9). Without it, every
    /// reconnect gets SESSION_RESET.
    public var resolveResume: ((SessionResumeRequest) -> ResumeDecision)?
    /// Lossless sessions: received messages go unacknowledged at most this long when nothing
    /// is sent back; and an ACK leaves at once when this many are unacknowledged.
    public var ackDelay: TimeAmount = .milliseconds(2)
    public var ackBatch: UInt64 = 256
    /// The first error seen: the reason the connection closes.
    private var failure: ParleyError?
    private var closedOut = false
    private var context: ChannelHandlerContext?
    private var scratch: [ByteBuffer] = []
    private let queue = CommandQueue()
    /// Secure mode, outbound: seals every frame written after the handshake switched.
    private var sealer: SecureDirection?
    /// Where secure-mode counters start: 0 on the wire; tests start them near a key update or
    /// near the end (both sides must agree).
    public var secureCounterStart: UInt64 = 0
    /// Client side: MESSAGEs to send right after CLIENT_IDENT when the handshake allows it
    /// (`HandshakeStep.earlyMessages`: in secure mode, R-6.1-6; in the first flight, R-6.1-5)
    /// and they fit its terms; dropped unsent otherwise (the caller learns how many went
    /// from `HandshakeResult.earlyMessagesSent`). Set before the channel is active; numbered
    /// seq 1, 2, ... like the session's first messages.
    public var earlyMessages: [WireMessage] = []
    /// How many early messages went: the session numbers on after them.
    private var earlySent = 0

    /// A flush is scheduled for the end of this event-loop tick.
    private var flushScheduled = false
    /// Between the first `channelRead` of a read burst and its `channelReadComplete`.
    private var inReadBurst = false
    /// Writes of this read burst not yet flushed: flushed at `channelReadComplete`, or as
    /// soon as there are `flushEvery`.
    private var unflushedInBurst = 0
    /// After this many writes in one read burst, flush at once instead of at its end (0: at
    /// its end only); set from `PipelineOptions.flushEvery`.
    public var flushEvery = PipelineOptions.defaultFlushEvery
    /// Messages received in this read burst.
    private var messagesInBurst = 0
    /// Messages written since the last flush (counted for a client's wait after sending one).
    private var unflushedMessages = 0
    /// Messages received in the last read burst: a client whose answers come several at a
    /// time has several requests in flight, and does not wait after sending one more.
    private var lastBurstMessages = 0
    /// After a read burst of one message whose end flushed what it prompted (a server's
    /// answer, a client's next request), and on a client after a flush outside a read burst
    /// that sent one message (a lone request), busy-wait this long for the peer's next bytes
    /// (`ReplyPolling`; counted in `parley_reply_waits_total{outcome="message"|"timeout"}`); zero: never. Set from
    /// `PipelineOptions.replyPolling`, before the channel is active.
    public var replyPolling: TimeAmount = .zero {
        didSet { self.peerWait = self.replyPolling > .zero ? PeerWait(window: self.replyPolling, label: "parley_reply_waits_total", seen: "message") : nil }
    }
    private var peerWait: PeerWait?
    /// Reading is paused: for the async layer's request backlog (`Outlet.pauseReads`), or
    /// for DIRECT requests in flight (`directLedger`); it resumes when neither holds it.
    private var readsPaused: Bool { self.backlogPaused || self.directPaused }
    private var backlogPaused = false
    private var directPaused = false
    /// Server side, once DIRECT is enabled: the DIRECT requests not answered yet.
    private var directLedger: DirectLedger?
    /// Client side: who waits for the answer to each DIRECT request sent, by id.
    private var directWaiting: [UInt64: DirectCompletion] = [:]
    private var lastDirectID: UInt64 = 0
    /// Server side: DIRECT requests in flight at which reading pauses until one is answered
    /// (docs/protocol.md 7.15); set from `ParleyConnectionLimits.maxDirectInFlight`.
    public var maxDirectInFlight = 1024
    private var readPending = false
    /// A server side: it decodes no more of the peer's bytes while the channel is not
    /// writable (answers wait for the peer to read them). Otherwise a peer that sends requests
    /// and never reads would have answers pile up without end: handler slots free as soon as
    /// an answer is handed over, and a small request (a block read) can ask for a large one.
    /// Clients keep reading, so that two sides that both write cannot wait for each other.
    private let pausesForWritability: Bool

    /// Keepalive timing, when configured and negotiated (from the end of the handshake).
    private var keepalive: KeepaliveStateMachine?
    private var keepaliveTimer: RepeatedTask?
    /// Something arrived from the peer since the last keepalive tick.
    private var heardSinceTick = false
    /// The channel's buffered outbound bytes at the last keepalive tick, while reads were
    /// paused because the peer did not read its answers (nil otherwise).
    private var outboundAtTick: Int?
    /// Bytes this handler wrote since the last keepalive tick.
    private var writtenSinceTick = 0
    /// When to send KEEPALIVE and give up on a silent peer; nil: never. Used when the
    /// `keepalive` feature is negotiated.
    public var keepaliveConfiguration: KeepaliveStateMachine.Configuration?

    /// A handshake not completed this long after it started ends the connection with
    /// `timeout`, without CLOSE (a peer that fell silent would not read it); nil: never.
    public var handshakeTimeout: TimeAmount?
    private var handshakeTimer: Scheduled<Void>?

    /// Succeeds once the handshake has completed and `establish` has returned; fails with the
    /// reason if the connection closes first.
    public var established: EventLoopFuture<Void> { self.establishedPromise.futureResult }

    /// The largest frame accepted from the peer (sum of its segment lengths); checked as soon
    /// as a preamble arrives, before any of the frame is buffered.
    public var maxFrameSize: Int {
        get { self.configuredMaxFrameSize }
        set {
            self.configuredMaxFrameSize = newValue
            self.applyFrameLimit()
        }
    }
    private var configuredMaxFrameSize = Frame.defaultMaxFrameSize

    /// The decoder's limit: the configured one, held to `handshakeFrameLimit` on a server
    /// side until its handshake has completed.
    private func applyFrameLimit() {
        let early = self.pausesForWritability && !self.isEstablished
        self.decoder.maxFrameSize = early ? min(self.configuredMaxFrameSize, Self.handshakeFrameLimit) : self.configuredMaxFrameSize
    }

    /// The largest frame a server takes before the handshake has completed: the handshake's
    /// own frames are far smaller, and early messages come after CLIENT_IDENT, which completes
    /// it (docs/protocol.md 4.5); a peer that has not authenticated cannot make it buffer 16 MiB.
    public static let handshakeFrameLimit = 256 * 1024

    private var isEstablished: Bool {
        if case .established = self.state { return true }
        return false
    }

    public init(role: Role, eventLoop: any EventLoop, establish: @escaping Establish) {
        if case .server = role { self.pausesForWritability = true } else { self.pausesForWritability = false }
        self.state = .handshaking(role)
        self.establish = establish
        self.establishedPromise = eventLoop.makePromise()
        self.applyFrameLimit()
    }

    /// Commands written from other threads, waiting for one event-loop job to write them all.
    final class CommandQueue: Sendable {
        typealias Entry = (command: ConnectionCommand, promise: EventLoopPromise<Void>?)
        private let box = NIOLockedValueBox<(commands: [Entry], scheduled: Bool)>(([], false))
        /// How many commands the box holds, changed under its lock: read without it by the
        /// event loop before each write of its own (every IO's), which a lock round cost.
        private let count = Atomic<Int>(0)

        /// Queues a command; true if the caller must schedule the job that drains the queue.
        func append(_ command: ConnectionCommand, promise: EventLoopPromise<Void>?) -> Bool {
            self.box.withLockedValue { q in
                q.commands.append((command, promise))
                self.count.store(q.commands.count, ordering: .releasing)
                defer { q.scheduled = true }
                return !q.scheduled
            }
        }

        /// Whether commands wait for the draining job. A command queued before the caller's
        /// own (its append happened before) is seen.
        var isEmpty: Bool { self.count.load(ordering: .acquiring) == 0 }

        func take(into commands: inout [Entry]) {
            self.box.withLockedValue { q in
                swap(&commands, &q.commands)
                self.count.store(0, ordering: .releasing)
                q.scheduled = false
            }
        }
    }

    /// The async layer's way in: writes commands and pauses reads, from any thread.
    public struct Outlet: Sendable {
        let handler: NIOLoopBound<ParleyConnectionHandler>
        let queue: CommandQueue

        /// Writes a command; `promise` (if any) completes once it has been written. On the
        /// event loop it is written at once; from another thread it joins the commands queued
        /// since the last batch, which are written and flushed together by one event-loop job,
        /// in the order they were queued.
        public func write(_ command: ConnectionCommand, promise: EventLoopPromise<Void>? = nil) {
            if self.handler.eventLoop.inEventLoop {
                // Commands queued from other threads go first: a request's CANCEL written here
                // (its timeout fired on the event loop) must not overtake the REQUEST itself,
                // still waiting in the queue when the event loop was slow to run its job.
                if !self.queue.isEmpty { self.handler.value.drainQueue() }
                self.handler.value.writeFromOutlet(command, promise: promise)
            } else if self.queue.append(command, promise: promise) {
                let handler = self.handler
                self.handler.eventLoop.execute { handler.value.drainQueue() }
            }
        }

        /// Lossless sessions: transmits what the session has not transmitted on this link. On
        /// the event loop it is deferred to the end of the read burst or of the tick, so that
        /// the messages of one burst leave in one batch.
        public func pump() {
            if self.handler.eventLoop.inEventLoop {
                self.handler.value.requestPump()
            } else {
                let handler = self.handler
                self.handler.eventLoop.execute { handler.value.pumpLossless() }
            }
        }

        /// Stops reading from the socket until `resumeReads` is called.
        public func pauseReads() {
            self.onEventLoop { $0.setReadsPaused(true) }
        }

        /// Resumes reading, issuing the read that was held back, if any.
        public func resumeReads() {
            self.onEventLoop { $0.setReadsPaused(false) }
        }

        private func onEventLoop(_ body: @escaping @Sendable (ParleyConnectionHandler) -> Void) {
            if self.handler.eventLoop.inEventLoop {
                body(self.handler.value)
            } else {
                let handler = self.handler
                self.handler.eventLoop.execute { body(handler.value) }
            }
        }
    }

    public func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        // Added to a channel that is already active (after a WebSocket upgrade): start now,
        // since no channelActive will come.
        if context.channel.isActive { self.start(context: context) }
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        self.closeOut()
        self.context = nil
    }

    public func channelActive(context: ChannelHandlerContext) {
        self.start(context: context)
        context.fireChannelActive()
    }

    private var started = false

    private func start(context: ChannelHandlerContext) {
        guard !self.started, case .handshaking(var role) = self.state else { return }
        self.started = true
        let step: HandshakeStep
        switch role {
        case .client(var m):
            step = m.start()
            role = .client(m)
        case .server(var m):
            step = m.start()
            role = .server(m)
        }
        self.state = .handshaking(role)
        if let limit = self.handshakeTimeout {
            let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
            self.handshakeTimer = context.eventLoop.scheduleTask(in: limit) { handler.value.handshakeTimedOut(after: limit) }
        }
        self.perform(step, context: context)
    }

    private func handshakeTimedOut(after limit: TimeAmount) {
        guard case .handshaking = self.state, let context = self.context else { return }
        let seconds = Double(limit.nanoseconds) / 1e9
        self.failConnection(ParleyError(code: .timeout, message: "the handshake did not complete within \(seconds.formatted2) s"), tellPeer: false,
                            peerSilent: true, context: context)
    }

    private func stopHandshakeTimer() {
        self.handshakeTimer?.cancel()
        self.handshakeTimer = nil
    }

    public func channelInactive(context: ChannelHandlerContext) {
        if !self.decoding, !self.isClosing {
            // The peer has gone: bytes left over are a frame it never finished.
            var rest = self.unread ?? ByteBuffer()
            self.unread = nil
            do {
                while !self.isClosing, let inbound = try self.decoder.decodeLast(buffer: &rest, seenEOF: true) {
                    self.received(inbound, context: context)
                }
            } catch {
                self.recordFailure(error)
            }
        }
        self.state = .closing
        self.unread = nil
        self.closeOut()
        context.fireChannelInactive()
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.inReadBurst = true
        self.heardSinceTick = true
        guard !self.isClosing else { return }
        var buffer = self.unwrapInboundIn(data)
        if var unread = self.unread {
            self.unread = nil  // so that `unread` is the only reference and grows in place
            let ownPiece = self.unreadIsPiece
            self.unreadIsPiece = false
            if let step = self.decoder.bytesForNextStep, unread.readableBytes < step, self.peerReadsAnswers(context) {
                // The end of a read cut a preamble or a body: complete just that piece, in a
                // buffer of its size, and decode what follows it where it arrived. Appending
                // the whole read to the piece would copy every byte of it (and the storage
                // the piece shares with frames still held) once more. A piece longer than a
                // read grows in its own buffer as its bytes arrive (never more than twice
                // what arrived: a peer that declares a large frame and sends its first bytes
                // holds no more than that).
                if !ownPiece {
                    let arrived = unread.readableBytes + buffer.readableBytes
                    var piece = context.channel.allocator.buffer(capacity: min(step, max(arrived, 1 << 16)))
                    piece.writeBuffer(&unread)
                    unread = piece
                }
                var rest = buffer.readSlice(length: min(step - unread.readableBytes, buffer.readableBytes))!
                unread.writeBuffer(&rest)
                self.decode(&unread, context: context)
                guard buffer.readableBytes > 0 else {
                    self.unreadIsPiece = self.unread != nil
                    return
                }
                if var left = self.unread {
                    // Not expected (the piece is one step), but never drop a byte.
                    self.unread = nil
                    left.writeBuffer(&buffer)
                    buffer = left
                }
            } else {
                unread.writeBuffer(&buffer)
                buffer = unread
            }
        }
        self.decode(&buffer, context: context)
    }

    /// Decodes and handles the frames in `buffer` (while the peer reads what is answered);
    /// keeps the rest in `unread`.
    private func decode(_ buffer: inout ByteBuffer, context: ChannelHandlerContext) {
        self.decoding = true
        defer { self.decoding = false }
        do {
            while !self.isClosing, self.peerReadsAnswers(context), let inbound = try self.decoder.decodeCollecting(buffer: &buffer) {
                switch inbound {
                case .wire(let inbound): self.received(inbound, context: context)
                case .direct(let direct): self.received(direct, context: context)
                }
            }
        } catch {
            // The bytes the peer sent are bad. Tell it why, then close.
            self.failConnection(error, tellPeer: true, context: context)
            return
        }
        guard !self.isClosing, buffer.readableBytes > 0 else { return }
        if buffer.readerIndex > 0, buffer.readableBytes < buffer.readerIndex {
            // Keep the unfinished frame, not the bytes of the frames already handed on.
            buffer.discardReadBytes()
        }
        self.unread = buffer
        self.unreadIsPiece = false  // `channelRead` says when it is
    }

    private var isClosing: Bool {
        if case .closing = self.state { return true }
        return false
    }

    /// A DIRECT frame whose large data was collected as the reads it arrived in.
    private func received(_ direct: DirectInbound, context: ChannelHandlerContext) {
        guard case .established = self.state else {
            // Out of place before the session (the handshake says so, as for any frame).
            return self.received(.frame(direct.frame), context: context)
        }
        self.handle(self.session!.received(direct: direct), context: context)
    }

    private func received(_ inbound: WireInbound, context: ChannelHandlerContext) {
        switch self.state {
        case .closing:
            return
        case .handshaking(var role):
            let step: HandshakeStep
            switch role {
            case .client(var m):
                step = m.received(inbound)
                role = .client(m)
            case .server(var m):
                step = m.received(inbound)
                role = .server(m)
            }
            self.state = .handshaking(role)
            self.perform(step, context: context)
        case .established:
            self.handle(self.session!.received(inbound), context: context)
        }
    }

    /// What the session machine made of a frame of the established session.
    private func handle(_ event: SessionStateMachine.Inbound, context: ChannelHandlerContext) {
        switch event {
        case .message(let message):
            if let lossless = self.lossless {
                switch lossless.session.received(message.header, on: lossless.link) {
                case .deliver: self.sink?.received(.message(message))
                case .duplicate: break
                case .stale:
                    // A newer connection of the session took over: this one is done.
                    self.state = .closing
                    context.close(promise: nil)
                case .violation(let error):
                    self.failConnection(error, tellPeer: true, context: context)
                }
            } else {
                self.sink?.received(.message(message))
            }
            self.messagesInBurst += 1
        case .ack(let ack):
            guard let lossless = self.lossless else { break }
            do {
                try lossless.session.acknowledged(ack, on: lossless.link)
            } catch {
                self.failConnection(error, tellPeer: true, context: context)
            }
        case .notice(let nucleus):
            self.sink?.received(.notice(nucleus))
        case .keepaliveAck(let stamp):
            // docs/protocol.md 7.12: an ACK that matches no KEEPALIVE of ours is ignored.
            guard var machine = self.keepalive, let roundTrip = machine.answered(stamp, now: Self.now()) else { break }
            self.keepalive = machine
            self.sink?.received(.keepaliveAck(roundTrip: roundTrip))
        case .reply(let frame):
            self.writeFrame(frame, context: context)
            self.flush(context: context)
        case .ignore:
            break
        case .peerClosed(let error):
            self.state = .closing
            // A newer connection of the same session took over: only this link ends.
            if error.code != .sessionSuperseded { self.closeExchanged = true }
            self.recordFailure(error)
            context.close(promise: nil)
        case .direct(let direct):
            self.receivedDirect(direct, context: context)
            self.messagesInBurst += 1
        case .violation(let error):
            self.failConnection(error, tellPeer: true, context: context)
        }
    }

    /// A DIRECT frame the session machine let through: a request to admit and hand on
    /// (server), or an answer for whoever waits for its id (client; one for an id not in
    /// flight is discarded, as an answer to a cancelled request is).
    private func receivedDirect(_ direct: DirectInbound, context: ChannelHandlerContext) {
        let id = direct.id!
        guard self.session!.role == .server else {
            self.directWaiting.removeValue(forKey: id)?(.success(direct))
            return
        }
        guard self.directLedger != nil else {
            // Enabled without a ledger: only a server enables DIRECT for requests.
            self.failConnection(ParleyError(code: .unexpectedFrame, message: "DIRECT request to a side that takes none"), tellPeer: true, context: context)
            return
        }
        switch self.directLedger!.admit(id) {
        case .duplicate:
            self.failConnection(ParleyError(code: .protocolViolation, message: "DIRECT id \(id) is already in use by a request still being served"),
                                tellPeer: true, context: context)
        case .admitted(let pause):
            if pause { self.setDirectPaused(true) }
            self.sink?.received(.direct(direct))
        }
    }

    public func channelReadComplete(context: ChannelHandlerContext) {
        if self.lossless != nil, case .established = self.state {
            self.acknowledgeAfterReadBurst(context: context)
        }
        self.inReadBurst = false
        let lone = self.messagesInBurst == 1
        self.lastBurstMessages = self.messagesInBurst
        self.messagesInBurst = 0
        self.unflushedMessages = 0
        guard self.unflushedInBurst > 0 else {
            context.fireChannelReadComplete()
            return
        }
        self.unflushedInBurst = 0
        context.flush()
        context.fireChannelReadComplete()
        if lone { self.awaitPeer(context: context) }
    }

    /// After a read burst of one message whose answer (or, on a client, whose next request)
    /// just left: the peer at queue depth 1 sends again within microseconds, so wait for it
    /// a little without sleeping (`ReplyPolling` says why; `replyPolling` how long). A peer
    /// with several messages in flight sends them in bursts, which are read in one go as before.
    private func awaitPeer(context: ChannelHandlerContext) {
        // A server that cannot write (its peer does not read answers) does not read either:
        // nothing to wait for.
        guard self.peerWait != nil, self.isEstablished, !self.readsPaused, context.channel.isActive,
              self.peerReadsAnswers(context) else { return }
        // A wait that cannot be done (no descriptor, a failed ioctl) is not tried again: the
        // connection goes on as one that does not wait.
        if case .unavailable = self.peerWait!.wait(on: context.channel) { self.peerWait = nil }
    }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let security = event as? TransportSecurityEvent, case .handshaking(.server(var machine)) = self.state {
            machine.transportSecured(protocolName: security.protocolName, peerEntity: security.peerEntity)
            self.state = .handshaking(.server(machine))
        }
        context.fireUserInboundEventTriggered(event)
    }

    public func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if case .closing = self.state {
            return
        }
        if let error = error as? ParleyError {
            self.failConnection(error, tellPeer: true, context: context)
        } else if let tls = error as? TLSFailure {
            // The transport could not authenticate (an untrusted certificate, either way): no
            // CLOSE can cross a broken TLS connection.
            self.state = .closing
            self.recordFailure(ParleyError(code: .authenticationFailed, message: "\(tls)", cause: tls.underlying))
            context.close(promise: nil)
        } else {
            self.state = .closing
            self.recordFailure(ParleyError(code: .connectionClosed, message: "connection failed: \(error)", cause: error))
            context.close(promise: nil)
        }
    }

    public func read(context: ChannelHandlerContext) {
        if self.readsPaused || !self.peerReadsAnswers(context) {
            self.readPending = true
        } else {
            context.read()
        }
    }

    /// False on a server side whose established channel is not writable (see
    /// `pausesForWritability`).
    private func peerReadsAnswers(_ context: ChannelHandlerContext) -> Bool {
        guard self.pausesForWritability, self.isEstablished else { return true }
        return context.channel.isWritable
    }

    public func channelWritabilityChanged(context: ChannelHandlerContext) {
        if self.pausesForWritability, context.channel.isWritable, !self.decoding, !self.isClosing {
            if var rest = self.unread, rest.readableBytes > 0 {
                self.unread = nil
                self.heardSinceTick = true
                self.decode(&rest, context: context)
                // What was decoded is acknowledged as after a read burst: no read burst ends here.
                if self.lossless != nil, self.isEstablished {
                    self.acknowledgeAfterReadBurst(context: context)
                }
            }
            if !self.readsPaused, self.readPending, self.peerReadsAnswers(context) {
                self.readPending = false
                context.read()
            }
        }
        context.fireChannelWritabilityChanged()
    }

    public func flush(context: ChannelHandlerContext) {
        if self.inReadBurst {
            self.deferFlush(context: context, count: 1)
            return
        }
        guard !self.flushScheduled else { return }
        self.flushScheduled = true
        context.eventLoop.assumeIsolated().execute {
            self.flushScheduled = false
            self.flushOutsideReadBurst(context: context)
        }
    }

    /// A flush outside a read burst. On a client that just sent one message (a request at
    /// queue depth 1, such as `parley block map` forwarding one NBD request), the answer is
    /// the next thing to come: wait for it without sleeping, as after a read burst. Not when
    /// the answers came several at a time last (requests in flight; waiting there cost the
    /// map 6% of its 4 KiB reads at queue depth 32).
    private func flushOutsideReadBurst(context: ChannelHandlerContext) {
        let lone = self.unflushedMessages == 1 && self.lastBurstMessages <= 1
        self.unflushedMessages = 0
        context.flush()
        if lone, !self.pausesForWritability { self.awaitPeer(context: context) }  // a client
    }

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        self.write(self.unwrapOutboundIn(data), promise: promise, context: context)
    }

    // MARK: - Outlet (on the event loop)

    fileprivate func writeFromOutlet(_ command: ConnectionCommand, promise: EventLoopPromise<Void>?) {
        guard let context = self.context else {
            Self.fail(command, promise, self.failure ?? ParleyError(code: .connectionClosed, message: "connection closed"))
            return
        }
        self.write(command, promise: promise, context: context)
        self.flush(context: context)
    }

    fileprivate func drainQueue() {
        var commands: [CommandQueue.Entry] = []
        self.queue.take(into: &commands)
        guard let context = self.context else {
            let error = self.failure ?? ParleyError(code: .connectionClosed, message: "connection closed")
            commands.forEach { Self.fail($0.command, $0.promise, error) }
            return
        }
        for entry in commands {
            self.write(entry.command, promise: entry.promise, context: context)
        }
        if self.inReadBurst {
            self.deferFlush(context: context, count: commands.count)
        } else {
            self.flushOutsideReadBurst(context: context)
        }
    }

    /// A flush asked for during a read burst: at its end, or now if `flushEvery` writes are
    /// waiting. Without the latter a long burst (32 block IOs in one read) left as one write
    /// only after every answer was made, and the peer, idle until then, answered with another
    /// such burst: the two sides took turns instead of working at once.
    private func deferFlush(context: ChannelHandlerContext, count: Int) {
        self.unflushedInBurst += count
        if self.flushEvery > 0, self.unflushedInBurst >= self.flushEvery {
            self.unflushedInBurst = 0
            self.unflushedMessages = 0
            context.flush()
        }
    }

    fileprivate func setReadsPaused(_ paused: Bool) {
        self.backlogPaused = paused
        self.readsPausedChanged()
    }

    private func setDirectPaused(_ paused: Bool) {
        self.directPaused = paused
        self.readsPausedChanged()
    }

    private func readsPausedChanged() {
        let paused = self.readsPaused
        self.keepalive?.readsPaused(paused, now: Self.now())
        if !paused, self.readPending, let context = self.context, self.peerReadsAnswers(context) {
            self.readPending = false
            context.read()
        }
    }

    // MARK: - Internals

    private func write(_ command: ConnectionCommand, promise: EventLoopPromise<Void>?, context: ChannelHandlerContext) {
        guard case .established = self.state else {
            Self.fail(command, promise, self.failure ?? ParleyError(code: .connectionClosed, message: "connection is not established"))
            return
        }
        switch command {
        case .enableDirect:
            do {
                try self.session!.enableDirect()
                if self.session!.role == .server, self.directLedger == nil { self.directLedger = DirectLedger(limit: self.maxDirectInFlight) }
                promise?.succeed(())
            } catch {
                promise?.fail(error)
            }
        case .directAnswer(let frame, let started):
            guard self.directLedger != nil, case .known(let resume) = self.directLedger!.answered(frame.id) else {
                promise?.fail(ParleyError(code: .invalidArgument, message: "no DIRECT request \(frame.id) is waiting for an answer"))
                return
            }
            do {
                try self.session!.checkDirect(payloadSize: frame.payloadSize)
                try self.writeDirect(frame, promise: promise, context: context)
            } catch {
                // The service answered with what the peer cannot take (or the key is spent):
                // the request cannot be answered, and its peer would wait for it forever.
                promise?.fail(error)
                self.failConnection(error, tellPeer: true, context: context)
                return
            }
            self.sink?.received(.directAnswered(started: started))
            if resume { self.setDirectPaused(false) }
        case .directRequest(var frame, let completion):
            guard self.session!.role == .client else {
                let error = ParleyError(code: .invalidArgument, message: "only a client side sends DIRECT requests")
                promise?.fail(error)
                completion(.failure(error))
                return
            }
            do {
                if !self.session!.isDirectEnabled { try self.session!.enableDirect() }
                try self.session!.checkDirect(payloadSize: frame.payloadSize)
            } catch {
                promise?.fail(error)
                completion(.failure(error))
                return
            }
            self.lastDirectID &+= 1
            frame.id = self.lastDirectID
            self.directWaiting[self.lastDirectID] = completion
            self.unflushedMessages += 1
            do {
                try self.writeDirect(frame, promise: promise, context: context)
            } catch {
                self.directWaiting.removeValue(forKey: self.lastDirectID)
                promise?.fail(error)
                completion(.failure(error))
                self.failConnection(error, tellPeer: true, context: context)
            }
        case .message(let message) where self.lossless != nil:
            // Numbered and kept by the session; transmitted by whichever link is current.
            self.lossless?.session.submit(message)
            promise?.succeed(())
        case .message(let message):
            do {
                let stamped = try self.session!.stamp(message)
                self.unflushedMessages += 1
                do {
                    try self.writeStamped(stamped, promise: promise, context: context)
                } catch {
                    promise?.fail(error)
                    self.failConnection(error, tellPeer: true, context: context)
                }
            } catch {
                promise?.fail(error)
            }
        case .notice(let nucleus):
            do {
                try self.session!.mayControl(.notice)
                var notice = Parley_V1_Notice()
                notice.nucleus = nucleus
                self.writeFrame(notice.frame(tag: .notice, allocator: context.channel.allocator), context: context, promise: promise)
            } catch {
                promise?.fail(error)
            }
        case .keepalive(let stamp):
            do {
                try self.session!.mayControl(.keepalive)
                self.writeFrame(SessionStateMachine.keepaliveFrame(tag: .keepalive, timestamp: stamp), context: context, promise: promise)
            } catch {
                promise?.fail(error)
            }
        case .close(let error):
            // A lossless session transmits what was submitted before it ends.
            if self.lossless != nil { self.pumpLossless() }
            self.state = .closing
            self.closeExchanged = true
            self.recordFailure(error)
            let written = context.eventLoop.makePromise(of: Void.self)
            self.writeFrame(error.status.frame(tag: .close, allocator: context.channel.allocator), context: context, promise: written)
            context.flush()
            let channel = context.channel
            written.futureResult.whenComplete { result in
                promise?.completeWith(result)
                channel.close(promise: nil)
            }
        }
    }

    /// A command that cannot be written: its promise and, for a DIRECT request, its
    /// completion fail with `error`.
    private static func fail(_ command: ConnectionCommand, _ promise: EventLoopPromise<Void>?, _ error: ParleyError) {
        promise?.fail(error)
        if case .directRequest(_, let completion) = command { completion(.failure(error)) }
    }

    /// Writes a DIRECT frame as the one buffer it was built in: finished with its CRCs, or
    /// sealed in place in secure mode (which fails only when the key is exhausted).
    private func writeDirect(_ frame: DirectFrame, promise: EventLoopPromise<Void>?, context: ChannelHandlerContext) throws(ParleyError) {
        let bytes: ByteBuffer
        if let sealer = self.sealer {
            bytes = try frame.finishSealed(with: sealer)
        } else if frame.hasExternalData {
            // A large segment 1 held in buffers of its own: written after the head as it is.
            let parts = frame.finishCRCVectored(allocator: context.channel.allocator)
            for part in parts.dropLast() { self.emit(part, promise: nil, context: context) }
            bytes = parts.last!
        } else {
            bytes = frame.finishCRC()
        }
        self.emit(bytes, promise: promise, context: context)
    }

    private func perform(_ step: HandshakeStep, context: ChannelHandlerContext) {
        for element in step.send {
            switch element {
            case .banner(let banner):
                var buffer = context.channel.allocator.buffer(capacity: Banner.size)
                buffer.writeBanner(banner)
                self.emit(buffer, promise: nil, context: context)
            case .frame(let frame):
                self.writeFrame(frame, context: context)
            case .startSealing(let secure):
                do {
                    self.sealer = try SecureDirection(keys: secure.keys, sealing: true, counter: self.secureCounterStart)
                } catch {
                    self.state = .closing
                    self.recordFailure(error)
                    self.flushThenClose(context: context)
                    return
                }
            }
        }
        if let terms = step.earlyMessages, !self.earlyMessages.isEmpty {
            guard self.sendEarly(terms, context: context) else { return }
        }
        if let secure = step.startOpening {
            do {
                self.decoder.startOpening(try SecureDirection(keys: secure.keys, sealing: false, counter: self.secureCounterStart))
            } catch {
                self.state = .closing
                self.recordFailure(error)
                self.flushThenClose(context: context)
                return
            }
        }
        switch step.outcome {
        case .none:
            if !step.send.isEmpty { context.flush() }
        case .resumeRequested(let request):
            guard case .handshaking(.server(var machine)) = self.state else { return }
            let next: HandshakeStep
            switch self.resolveResume?(request) ?? .reset(reason: "this server keeps no sessions") {
            case .resume(let lastReceived): next = machine.resume(lastReceivedSeq: lastReceived)
            case .reset(let reason): next = machine.reset(reason: reason)
            case .refuse(let error): next = machine.refuseResume(error)
            }
            self.state = .handshaking(.server(machine))
            self.perform(next, context: context)
        case .established(var result):
            if !step.send.isEmpty { context.flush() }
            result.earlyMessagesSent = self.earlySent
            let role: SessionStateMachine.Role
            if case .handshaking(.client(_)) = self.state { role = .client } else { role = .server }
            let peerMax = Frame.peerLimit(announced: result.peerHello.maxFrameSize)
            // Early messages took the first seqs: the session goes on from there.
            self.session = SessionStateMachine(role: role, features: result.features, maxPeerFrameSize: peerMax, sent: UInt64(self.earlySent))
            self.state = .established
            self.applyFrameLimit()
            self.stopHandshakeTimer()
            self.earlyMessages = []
            if let configuration = self.keepaliveConfiguration, result.features.contains(.keepalive) {
                self.startKeepalive(configuration, context: context)
            }
            do {
                guard let establish = self.establish else { throw ParleyError(code: .protocolViolation, message: "internal: established twice") }
                self.establish = nil
                let established = try establish(result, Outlet(handler: NIOLoopBound(self, eventLoop: context.eventLoop), queue: self.queue))
                self.sink = established.sink
                self.lossless = established.lossless
                self.establishedPromise.succeed(())
                if self.lossless != nil {
                    // Replay what the peer has not received, then go on with new messages.
                    self.pumpLossless()
                }
            } catch let error as ParleyError {
                // The peer is told why (a reconnect that contradicts the session, ...).
                self.failConnection(error, tellPeer: true, context: context)
            } catch {
                self.state = .closing
                self.recordFailure(ParleyError(code: .unspecified, message: "session setup failed: \(error)", cause: error))
                context.close(promise: nil)
            }
        case .failed(let error):
            // The step's frames (if any) already hold the CLOSE to send.
            self.state = .closing
            self.recordFailure(error)
            self.flushThenClose(context: context)
        }
    }

    /// Writes the early messages after the step that allowed them (sealed in secure mode),
    /// numbered seq 1, 2, ...; if one of them needs what `terms` does not grant (a feature,
    /// a larger frame), none goes, and the caller sends them once the session is up.
    /// Returns false if the connection is closing.
    private func sendEarly(_ terms: EarlyMessageTerms, context: ChannelHandlerContext) -> Bool {
        let early = self.earlyMessages
        self.earlyMessages = []
        var session = SessionStateMachine(role: .client, features: terms.features, maxPeerFrameSize: Frame.peerLimit(announced: terms.peerMaxFrameSize))
        var stamped: [WireMessage] = []
        do throws(ParleyError) {
            for message in early { stamped.append(try session.stamp(message)) }
        } catch {
            return true
        }
        for message in stamped {
            do {
                try self.writeStamped(message, promise: nil, context: context)
            } catch {
                // The key is exhausted: the connection cannot go on.
                self.state = .closing
                self.recordFailure(error)
                self.flushThenClose(context: context)
                return false
            }
        }
        self.earlySent = stamped.count
        return true
    }

    /// Writes a numbered MESSAGE: sealed in secure mode (which fails only when the key is
    /// exhausted), else its frame as a list of buffers (bulk segments never copied).
    private func writeStamped(_ message: WireMessage, promise: EventLoopPromise<Void>?, context: ChannelHandlerContext) throws(ParleyError) {
        if let sealer = self.sealer {
            self.emit(try message.sealFrame(with: sealer, allocator: context.channel.allocator), promise: promise, context: context)
            return
        }
        self.scratch.empty()
        message.encodeFrame(into: &self.scratch, allocator: context.channel.allocator)
        self.writeScratch(context: context, promise: promise)
    }

    // MARK: - Keepalive

    /// The monotonic clock of the keepalive machine (and the connection's idle machine), in
    /// nanoseconds.
    package static func now() -> Int64 { Int64(truncatingIfNeeded: NIODeadline.now().uptimeNanoseconds) }

    private func startKeepalive(_ configuration: KeepaliveStateMachine.Configuration, context: ChannelHandlerContext) {
        var machine = KeepaliveStateMachine(configuration: configuration, now: Self.now())
        if self.readsPaused { machine.readsPaused(true, now: Self.now()) }
        self.keepalive = machine
        let tick = TimeAmount.nanoseconds(configuration.tickInterval)
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        self.keepaliveTimer = context.eventLoop.scheduleRepeatedTask(initialDelay: tick, delay: tick) { _ in
            handler.value.keepaliveTick()
        }
    }

    /// Writes bytes of the connection to the channel, counting them (`keepaliveTick`).
    private func emit(_ bytes: ByteBuffer, promise: EventLoopPromise<Void>?, context: ChannelHandlerContext) {
        self.writtenSinceTick &+= bytes.readableBytes
        context.write(self.wrapOutboundOut(bytes), promise: promise)
    }

    private func keepaliveTick() {
        guard var machine = self.keepalive, let context = self.context, case .established = self.state else { return }
        var heard = self.heardSinceTick
        if self.peerReadsAnswers(context) {
            self.outboundAtTick = nil
        } else if self.flushScheduled || self.unflushedInBurst > 0 {
            // Bytes written and not flushed yet may not be in the channel's buffer (TLS and
            // WebSocket hold them until the flush): the next tick decides, counting them.
        } else {
            // Not reading because the peer does not read its answers fast enough: its
            // KEEPALIVE_ACKs wait unread behind its requests. The peer taking bytes of the
            // answers is hearing from it; one that takes nothing for the timeout is given up on.
            // What the socket took is what was waiting, plus what was written since, less
            // what waits now (answers and KEEPALIVEs go on being written meanwhile).
            let outbound = try? context.channel.syncOptions?.getOption(.bufferedWritableBytes)
            if let outbound, let before = self.outboundAtTick, before + self.writtenSinceTick > outbound { heard = true }
            self.outboundAtTick = outbound
            self.writtenSinceTick = 0
        }
        if self.outboundAtTick == nil { self.writtenSinceTick = 0 }
        let action = machine.tick(now: Self.now(), heard: heard)
        self.keepalive = machine
        self.heardSinceTick = false
        switch action {
        case .none:
            break
        case .sendKeepalive(let stamp):
            self.write(.keepalive(stamp), promise: nil, context: context)
            self.flush(context: context)
        case .timedOut(let silent):
            let seconds = Double(silent) / 1e9
            let timeout = Double(machine.configuration.timeout) / 1e9
            // A lossless session outlives the link: no CLOSE, which would end the session.
            self.failConnection(
                ParleyError(code: .timeout, message: "nothing received from the peer for \(seconds.formatted2) s (keepalive timeout \(timeout.formatted2) s)"),
                tellPeer: self.lossless == nil, peerSilent: true, context: context
            )
        }
    }

    private func stopKeepalive() {
        self.keepaliveTimer?.cancel()
        self.keepaliveTimer = nil
        self.keepalive = nil
    }

    private func recordFailure(_ error: ParleyError) {
        if self.failure == nil { self.failure = error }
    }

    /// How long a connection whose peer went silent (a keepalive or handshake timeout) tries
    /// to flush before it closes anyway: such a peer may read nothing more, and what waits
    /// behind a full socket would otherwise hold the close, and the report of the lost link,
    /// until the peer comes back (a stopped server kept a lossless sender's link "up" for the
    /// whole 6 s it was stopped, in a CI run on 2026-12-04).
    static let silentPeerFlushLimit = TimeAmount.milliseconds(250)

    private func failConnection(_ error: ParleyError, tellPeer: Bool, peerSilent: Bool = false, context: ChannelHandlerContext) {
        self.state = .closing
        if tellPeer {
            self.closeExchanged = true
            self.writeFrame(error.status.frame(tag: .close, allocator: context.channel.allocator), context: context)
        }
        self.recordFailure(error)
        self.flushThenClose(context: context, limit: peerSilent ? Self.silentPeerFlushLimit : nil)
    }

    /// Flushes, then closes; with a `limit`, closes after it even if the flush has not ended.
    private func flushThenClose(context: ChannelHandlerContext, limit: TimeAmount? = nil) {
        let done = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(self.wrapOutboundOut(ByteBuffer()), promise: done)
        let channel = context.channel
        let deadline = limit.map { context.eventLoop.scheduleTask(in: $0) { channel.close(promise: nil) } }
        done.futureResult.whenComplete { _ in
            deadline?.cancel()
            channel.close(promise: nil)
        }
    }

    /// Reports the end of the connection, once: to the sink, or through `established`.
    private func closeOut() {
        self.stopKeepalive()
        self.stopHandshakeTimer()
        self.ackTimer?.cancel()
        self.ackTimer = nil
        guard !self.closedOut else { return }
        self.closedOut = true
        // DIRECT requests still waiting end with the connection (docs/protocol.md 7.16), after
        // the sink has learnt of the end: a caller that asks whether the connection ended
        // (a multipath client telling a failed path from a refusal) must hear yes.
        let waiting = self.directWaiting
        self.directWaiting = [:]
        defer {
            if !waiting.isEmpty {
                let reason = self.failure ?? ParleyError(code: .connectionClosed, message: "peer closed the connection")
                for (_, completion) in waiting { completion(.failure(reason)) }
            }
        }
        // The sink's connection holds this handler (its outlet): let go of it, or neither is
        // ever freed.
        let sink = self.sink
        let lossless = self.lossless
        self.sink = nil
        self.lossless = nil
        if let lossless, let sink {
            // Only the session's current link speaks for it; an older one just goes.
            guard lossless.session.detach(lossless.link) else { return }
            let reason = self.failure ?? ParleyError(code: .connectionClosed, message: "peer closed the connection")
            if self.closeExchanged {
                sink.closed(reason)
            } else {
                sink.linkLost(reason)
            }
            return
        }
        if let sink {
            sink.closed(self.failure ?? ParleyError(code: .connectionClosed, message: "peer closed the connection"))
        } else {
            self.establishedPromise.fail(self.failure ?? ParleyError(code: .connectionClosed, message: "connection closed during the handshake"))
        }
    }

    // MARK: - Lossless sessions

    /// A message was submitted on this event loop: transmit it with the others of the read
    /// burst (at `channelReadComplete`) or of this tick.
    fileprivate func requestPump() {
        if self.inReadBurst { return }  // acknowledgeAfterReadBurst pumps
        guard !self.pumpDeferred, let context = self.context else { return }
        self.pumpDeferred = true
        context.eventLoop.assumeIsolated().execute {
            self.pumpDeferred = false
            self.pumpLossless()
        }
    }

    /// Transmits, in seq order, what the session has not transmitted on this link yet.
    fileprivate func pumpLossless() {
        guard let lossless = self.lossless, let context = self.context, case .established = self.state else { return }
        self.pumpBuffer.empty()
        guard lossless.session.takeForTransmission(lossless.link, into: &self.pumpBuffer), !self.pumpBuffer.isEmpty else { return }
        for message in self.pumpBuffer {
            if let sealer = self.sealer {
                do {
                    let sealed = try message.sealFrame(with: sealer, allocator: context.channel.allocator)
                    self.emit(sealed, promise: nil, context: context)
                } catch {
                    self.failConnection(error, tellPeer: true, context: context)
                    return
                }
            } else {
                self.scratch.empty()
                message.encodeFrame(into: &self.scratch, allocator: context.channel.allocator)
                self.writeScratch(context: context, promise: nil)
            }
        }
        self.pumpBuffer.empty()
        self.flush(context: context)
    }

    /// After a read burst: transmits what is waiting (its MESSAGEs carry the ack); if
    /// received messages are still unacknowledged, sends ACK at once when many are, or
    /// after `ackDelay` unless a MESSAGE carries it first.
    private func acknowledgeAfterReadBurst(context: ChannelHandlerContext) {
        guard let lossless = self.lossless else { return }
        self.pumpLossless()
        let unacknowledged = lossless.session.unacknowledgedReceived(lossless.link)
        guard unacknowledged > 0 else { return }
        if unacknowledged >= self.ackBatch {
            self.sendAck(context: context)
        } else if self.ackTimer == nil {
            let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
            self.ackTimer = context.eventLoop.scheduleTask(in: self.ackDelay) {
                let h = handler.value
                h.ackTimer = nil
                if let context = h.context, case .established = h.state { h.sendAck(context: context) }
            }
        }
    }

    private func sendAck(context: ChannelHandlerContext) {
        guard let lossless = self.lossless, let ack = lossless.session.ackToSend(lossless.link) else { return }
        self.writeFrame(SessionStateMachine.ackFrame(ack), context: context)
        self.flush(context: context)
    }

    private func writeFrame(_ frame: Frame, context: ChannelHandlerContext, promise: EventLoopPromise<Void>? = nil) {
        self.scratch.empty()
        if let sealer = self.sealer {
            do {
                try frame.seal(with: sealer, into: &self.scratch, allocator: context.channel.allocator)
            } catch {
                promise?.fail(error)
                if frame.tag == .close {
                    // Not even a CLOSE fits any more: close without one.
                    self.state = .closing
                    self.recordFailure(error)
                    context.close(promise: nil)
                } else {
                    self.failConnection(error, tellPeer: true, context: context)
                }
                return
            }
        } else {
            frame.encode(into: &self.scratch, allocator: context.channel.allocator)
        }
        self.writeScratch(context: context, promise: promise)
    }

    private func writeScratch(context: ChannelHandlerContext, promise: EventLoopPromise<Void>?) {
        let last = self.scratch.count - 1
        for (i, buffer) in self.scratch.enumerated() {
            self.emit(buffer, promise: i == last ? promise : nil, context: context)
        }
    }
}

extension Array {
    /// Removes every element, keeping the capacity: for the few buffers of one frame (and
    /// the messages of one pump), a `popLast` each costs less than
    /// `removeAll(keepingCapacity:)`, which goes through an unspecialised `replaceSubrange`
    /// (1% of a 64 B round trip's CPU in a profile).
    fileprivate mutating func empty() {
        while self.popLast() != nil {}
    }
}

extension Double {
    /// Two decimals, for messages.
    package var formatted2: String {
        let hundredths = (self * 100).rounded()
        let whole = Int(hundredths / 100)
        let frac = Int(abs(hundredths).truncatingRemainder(dividingBy: 100))
        return "\(whole).\(frac < 10 ? "0" : "")\(frac)"
    }
}
