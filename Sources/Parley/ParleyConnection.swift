import Logging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import ParleyNIO
import ParleyWire
import Synchronization
import SwiftProtobuf

/// Limits that keep a connection's work bounded.
public struct ParleyConnectionLimits: Sendable {
    /// Requests this side may have outstanding; further requests wait for a free slot.
    public var maxOutstandingRequests: Int
    /// Peer requests handled at once; beyond it the connection stops reading from the socket,
    /// which pushes back on the peer through TCP flow control.
    public var maxConcurrentHandlers: Int

    /// Run the handlers of peer requests on the connection's event loop, starting at once
    /// inside the read that decoded the request (no thread hop per request; handlers must not
    /// block), or on Swift's global pool.
    public var handlersOnEventLoop: Bool

    /// After this long without a byte from the peer, send it a KEEPALIVE (at most one per
    /// interval); nil: send none, and never time out. Needs the `keepalive` feature on both
    /// sides.
    public var keepaliveInterval: Duration?
    /// After this long without a byte from the peer (despite the KEEPALIVEs), close the
    /// connection with `timeout`. Must be longer than `keepaliveInterval`. Time during which
    /// this side has stopped reading (back-pressure) does not count.
    public var keepaliveTimeout: Duration

    /// Answers and requests written on the event loop while a read is handled leave in one
    /// write when the read burst ends, or as soon as this many are waiting (0: only when it
    /// ends). A peer that sent 32 requests in one write then gets the first answers while
    /// the rest are made, instead of all of them at the end: with queue depth 32 over two
    /// cores and `parley block bench`'s callback client, 4 KiB block reads went from 36,473
    /// to 66,073 IOPS (docs/performance.md, Parley Block). A lossless session's messages
    /// still leave once per read burst (trying the rule there gained nothing measurable).
    public var flushEvery: Int

    /// A handshake not completed this long after the connection became active ends it with
    /// `timeout` (over `tls://` the TLS handshake counts, since Parley's starts on top of it;
    /// over `ws://` and `wss://` it starts after the upgrade, which has its own limit): a
    /// client does not wait for ever on a server that accepted and fell silent, nor a server
    /// keep a connection that never says who it is. nil: wait for ever.
    public var handshakeTimeout: Duration?

    /// Server side only: a connection on which no keepalive timeout runs (the peer did not
    /// negotiate `keepalive`, or `keepaliveInterval` is nil) is closed with `timeout` once
    /// no message has been received from the peer for this long and nothing is in progress (no
    /// request of either side unanswered, no handler running or queued): such a connection
    /// would otherwise be kept for ever, even after its peer is gone without a word.
    /// docs/protocol.md section 7.12. nil: never. Clients ignore it.
    public var idleTimeout: Duration?

    /// The bytes of a stream's items this side has received and its consumer has not yet
    /// taken (each item counts its payload and data bytes plus `streamItemOverhead`): past
    /// it the stream fails with `cancelled`, and the peer is told with CANCEL. There is no
    /// flow control in a stream (docs/protocol.md section 7.6): without a bound, a peer that
    /// streams faster than the consumer reads, or without end, would grow this side until it
    /// ran out of memory. Stopping to read instead would stall every other answer of the
    /// connection, including one the consumer may be waiting for.
    public var maxUnconsumedStreamBytes: Int

    /// After a read burst that held one message and whose end sent what it prompted (a
    /// server's answer, a client's next request), wait this long for the peer's next bytes
    /// without sleeping, instead of going back to the event loop's poll at once. For peers
    /// at queue depth 1 on hosts whose idle CPUs halt (most virtual machines): the peer's
    /// next message then finds this side's thread awake. A wait that runs out makes the
    /// connection let the next 1, 3, 7, ... 1023 chances go (`ReplyPolling`); counted in
    /// `parley_reply_waits_total{outcome="message"|"timeout"}`. The event loop is busy while
    /// it waits, so its other connections wait too. Zero (the default): never. At most
    /// `maxReplyPolling`.
    public var replyPolling: Duration = .zero

    /// The longest reply polling window accepted: a longer busy wait would stall the event
    /// loop's other connections for longer than a wait can save.
    public static let maxReplyPolling: Duration = .milliseconds(10)

    /// Server side: DIRECT requests (docs/protocol.md 7.16) in flight on one connection at
    /// which it stops reading from the socket until one is answered (back-pressure through
    /// TCP, as for requests past `maxConcurrentHandlers`).
    public var maxDirectInFlight = 1024

    public init(
        maxOutstandingRequests: Int = 1024, maxConcurrentHandlers: Int = 1024, handlersOnEventLoop: Bool = true,
        keepaliveInterval: Duration? = .seconds(15), keepaliveTimeout: Duration = .seconds(60),
        flushEvery: Int = PipelineOptions.defaultFlushEvery, handshakeTimeout: Duration? = .seconds(30),
        idleTimeout: Duration? = .seconds(300), maxUnconsumedStreamBytes: Int = 64 << 20
    ) {
        self.maxUnconsumedStreamBytes = maxUnconsumedStreamBytes
        self.idleTimeout = idleTimeout
        self.handshakeTimeout = handshakeTimeout
        self.flushEvery = flushEvery
        self.maxOutstandingRequests = maxOutstandingRequests
        self.maxConcurrentHandlers = maxConcurrentHandlers
        self.handlersOnEventLoop = handlersOnEventLoop
        self.keepaliveInterval = keepaliveInterval
        self.keepaliveTimeout = keepaliveTimeout
    }

    /// The pipeline's options that come from these limits (keepalive timing, flushes), with
    /// the connection's frame-size limit and capture files.
    /// - Throws: `invalidArgument` for a bad keepalive timing or idle timeout.
    func pipelineOptions(maxFrameSize: Int, captureInbound: String? = nil, captureOutbound: String? = nil) throws(ParleyError) -> PipelineOptions {
        if let idle = self.idleTimeout, idle <= .zero {
            throw ParleyError(code: .invalidArgument, message: "the idle timeout (\(idle)) must be positive")
        }
        guard self.maxUnconsumedStreamBytes > 0 else {
            throw ParleyError(code: .invalidArgument, message: "maxUnconsumedStreamBytes (\(self.maxUnconsumedStreamBytes)) must be positive")
        }
        guard self.maxDirectInFlight > 0 else {
            throw ParleyError(code: .invalidArgument, message: "maxDirectInFlight (\(self.maxDirectInFlight)) must be positive")
        }
        guard self.replyPolling >= .zero, self.replyPolling <= Self.maxReplyPolling else {
            throw ParleyError(code: .invalidArgument, message: "the reply polling window (\(self.replyPolling)) must be 0...\(Self.maxReplyPolling)")
        }
        var options = PipelineOptions(
            maxFrameSize: maxFrameSize, captureInbound: captureInbound, captureOutbound: captureOutbound,
            keepalive: try self.keepaliveConfiguration(), flushEvery: self.flushEvery,
            handshakeTimeout: try self.handshakeTimeout.map { t throws(ParleyError) in
                guard t > .zero else { throw ParleyError(code: .invalidArgument, message: "the handshake timeout (\(t)) must be positive") }
                return .nanoseconds(t.nanoseconds)
            }
        )
        options.replyPolling = .nanoseconds(self.replyPolling.nanoseconds)
        options.maxDirectInFlight = self.maxDirectInFlight
        return options
    }

    /// The keepalive timing for the pipeline; nil if keepalives are off.
    /// - Throws: `invalidArgument` unless 0 < interval < timeout.
    func keepaliveConfiguration() throws(ParleyError) -> KeepaliveStateMachine.Configuration? {
        guard let interval = self.keepaliveInterval else { return nil }
        let i = interval.nanoseconds, t = self.keepaliveTimeout.nanoseconds
        guard i > 0, t > i else {
            throw ParleyError(
                code: .invalidArgument,
                message: "keepalive interval (\(interval)) must be positive and shorter than the keepalive timeout (\(self.keepaliveTimeout))"
            )
        }
        return KeepaliveStateMachine.Configuration(interval: i, timeout: t)
    }

    public static var defaults: ParleyConnectionLimits { ParleyConnectionLimits() }

    /// What each stream item counts beyond its bytes towards `maxUnconsumedStreamBytes`
    /// (its header and bookkeeping), so that empty items are bounded too.
    public static let streamItemOverhead = 128
}

/// The bytes of a stream's items received and not yet taken by its consumer
/// (`ParleyConnectionLimits.maxUnconsumedStreamBytes`).
final class StreamBacklog: Sendable {
    private let bytes = Atomic<Int>(0)

    static func size(of message: WireMessage) -> Int {
        message.payload.readableBytes + (message.data?.readableBytes ?? 0) + ParleyConnectionLimits.streamItemOverhead
    }

    /// Counts a received item; returns the bytes now waiting.
    func received(_ message: WireMessage) -> Int {
        self.bytes.add(Self.size(of: message), ordering: .relaxed).newValue
    }

    /// The consumer took an item.
    func taken(_ message: WireMessage) {
        self.bytes.subtract(Self.size(of: message), ordering: .relaxed)
    }
}

/// One established Parley connection, client or server side.
///
/// Both sides can send requests (answered by id, in any order), one-way messages and
/// streamed requests, and both serve the peer's requests with their router.
///
/// Inbound frames are handled where they are decoded, on the channel's event loop: an answer
/// resumes its waiting caller directly, and a request runs its handler right there (with
/// `handlersOnEventLoop`, the default): a synchronous handler inline, an asynchronous one in a
/// task that runs at once on the event loop until it first suspends. A handler that answers
/// without suspending is therefore read, run and answered in one pass, and its answer leaves
/// with the others of the same read burst.
public final class ParleyConnection: Sendable {
    public let session: ParleySession
    /// The event loop the connection runs on (handlers start there by default).
    public let eventLoop: any EventLoop
    /// Runs tasks on `eventLoop`. Callers that mostly wait for answers can run there
    /// (`Task(executorPreference: connection.taskExecutor)`, or `group.addTask(executorPreference:)`):
    /// an answer then resumes its caller on the thread that read it, and the caller's next
    /// request is written from there, with no hop to Swift's global pool and back. Such
    /// callers must not block or compute for long: they hold up the connection's reads.
    /// The handlers of `handlersOnEventLoop` run on this executor.
    public let taskExecutor: EventLoopTaskExecutor
    /// Lossless sessions (feature bit 9): the session that outlives the connection's links.
    /// Nil for a lossy connection.
    public let lossless: LosslessSession?
    /// What happens to the link of a lossless session: down, up again, reset. Finishes when
    /// the connection ends. Never yields for a lossy connection.
    public let linkEvents: AsyncStream<ParleyLinkEvent>
    private let linkEventsContinuation: AsyncStream<ParleyLinkEvent>.Continuation
    /// Called when the current link of a lossless session breaks (the client reconnects, the
    /// server starts the retention clock).
    let onLinkLost: (@Sendable (ParleyError) -> Void)?
    let role: SessionStateMachine.Role
    let channel: any Channel
    let router: ParleyRouter
    let logger: Logger
    let limits: ParleyConnectionLimits
    let onNotice: (@Sendable (ParleyNucleus) -> Void)?
    let onClose: (@Sendable (ParleyError) -> Void)?
    private let outlet: ParleyConnectionHandler.Outlet
    private let state = NIOLockedValueBox(State())
    /// Lossless: the session of the connection, counted from 0; a reset starts the next
    /// (changed under the state lock, read without it: every answer checks it).
    private let epochs = Atomic<UInt64>(0)
    private let metrics: ConnectionMetrics
    /// Messages received from the peer: the idle timer compares the count between ticks.
    private let messagesReceived = Atomic<UInt64>(0)
    /// Server side: what takes the DIRECT requests of this connection, once enabled.
    /// (In a struct: a bare closure read out of the `Mutex`, through its `inout`, came back
    /// reabstracted, one thunk deeper on every request, until each cost a millisecond.)
    private let directHandler = Mutex<DirectHandler?>(nil)
    private struct DirectHandler: Sendable {
        let body: @Sendable (ParleyDirectRequest) -> Void
    }
    /// Server side: DIRECT requests received and not answered yet (the idle timer and a
    /// drain wait for them, as for requests being served).
    private let directInFlight = Atomic<Int>(0)
    private let ended: EventLoopPromise<ParleyError>
    /// Where handlers run: the channel's event loop, or nil for the global pool.
    let executor: EventLoopTaskExecutor?

    private enum Pending {
        /// Resumed exactly once: by the answer, the cancellation or the end of the connection,
        /// whichever removes it from `pending` first.
        case unary(UnsafeContinuation<WireMessage, any Error>)
        /// Like `unary`, for a caller without a task (`call(_:data:as:idempotent:completion:)`).
        case callback(@Sendable (Result<WireMessage, any Error>) -> Void)
        case stream(AsyncThrowingStream<WireMessage, any Error>.Continuation, StreamBacklog)

        /// Ends the wait with `error`.
        func fail(_ error: any Error) {
            switch self {
            case .unary(let c): c.resume(throwing: error)
            case .callback(let complete): complete(.failure(error))
            case .stream(let c, _): c.finish(throwing: error)
            }
        }
    }

    /// An outstanding request: who waits for its answer and, in a lossless session, what a
    /// session reset needs to know of it (one dictionary entry per request, not three).
    private struct Outstanding {
        var waiter: Pending
        /// Lossless: the request's type, for a session reset's report.
        var type: String?
        /// Lossless: the message of an idempotent request, sent again after a session reset.
        var retry: WireMessage?

        init(_ waiter: Pending, type: String? = nil, retry: WireMessage? = nil) {
            self.waiter = waiter
            self.type = type
            self.retry = retry
        }
    }

    /// A peer request being handled.
    private enum Handling {
        /// Its task is being created; `cancelled` if a CANCEL came meanwhile.
        case starting(cancelled: Bool)
        case running(Task<Void, Never>)
        /// A completing handler that has returned and will answer later: no task to cancel
        /// (a CANCEL is noted by nobody; the answer, when it comes, is dropped by the peer).
        case completing
    }

    private struct State {
        var nextID: UInt64 = 1
        var pending: [UInt64: Outstanding] = [:]
        var outstanding = 0
        var slotWaiters = CircularBuffer<CheckedContinuation<Void, any Error>>()
        var serving: [HandlerKey: Handling] = [:]
        /// Peer requests read while all handler slots were taken, in arrival order.
        var backlog = CircularBuffer<(message: WireMessage, handler: ParleyRouter.Handler)>() {
            didSet { if self.backlog.isEmpty { self.queuedRequests = [] } }
        }
        /// The ids of the requests in `backlog`: a new request's id is checked against them
        /// (a scan of the backlog per request made admitting n queued requests O(n²)).
        var queuedRequests = Set<UInt64>()
        var readsPaused = false
        var idleWaiters: [CheckedContinuation<Void, Never>] = []
        var draining = false
        var closed: ParleyError?
        var keepaliveRoundTrip: Duration?
        var linkUps = 0
        /// Server side without keepalive: ticks the idle machine (`limits.idleTimeout`).
        var idleTimer: RepeatedTask?
    }

    init(
        session: ParleySession, role: SessionStateMachine.Role, channel: any Channel,
        outlet: ParleyConnectionHandler.Outlet, router: ParleyRouter, limits: ParleyConnectionLimits,
        logger: Logger, onNotice: (@Sendable (ParleyNucleus) -> Void)? = nil, onClose: (@Sendable (ParleyError) -> Void)? = nil,
        lossless: LosslessSession? = nil, onLinkLost: (@Sendable (ParleyError) -> Void)? = nil,
        sentEarly: SentEarly? = nil, metricsFactory: (any MetricsFactory)? = nil
    ) {
        self.metrics = ConnectionMetrics(factory: metricsFactory ?? MetricsSystem.factory)
        self.session = session
        self.role = role
        self.channel = channel
        self.outlet = outlet
        self.eventLoop = channel.eventLoop
        self.lossless = lossless
        self.onLinkLost = onLinkLost
        (self.linkEvents, self.linkEventsContinuation) = AsyncStream.makeStream(bufferingPolicy: .bufferingNewest(1024))
        self.taskExecutor = EventLoopTaskExecutor(channel.eventLoop)
        self.executor = limits.handlersOnEventLoop ? self.taskExecutor : nil
        self.router = router
        var limits = limits
        if lossless != nil {
            // At most this many requests outstanding in a lossless session ([R-5.2-13]).
            limits.maxOutstandingRequests = min(limits.maxOutstandingRequests, SessionLedger.maxOutstandingRequests)
        }
        self.limits = limits
        self.logger = logger
        self.onNotice = onNotice
        self.onClose = onClose
        self.ended = channel.eventLoop.makePromise()
        if let sentEarly {
            // Sent with the handshake (R-6.1-6): it holds a request slot and its id, and its
            // answer finds it like any other.
            self.state.withLockedValue { s in
                s.outstanding = 1
                s.nextID = sentEarly.id &+ 1
                s.pending[sentEarly.id] = Outstanding(.callback { answer in
                    self.releaseSlot()
                    sentEarly.completion(answer)
                })
            }
        }
        if role == .server, let idle = limits.idleTimeout, idle > .zero,
           limits.keepaliveInterval == nil || !session.features.contains(.keepalive) {
            self.startIdleTimer(timeout: idle.nanoseconds)
        }
    }

    /// Server side without keepalive: ends the connection once it has been idle for
    /// `timeout` nanoseconds (`IdleStateMachine`).
    private func startIdleTimer(timeout: Int64) {
        let loop = self.channel.eventLoop
        let machine = NIOLoopBoundBox(IdleStateMachine(timeout: timeout, now: ParleyConnectionHandler.now()), eventLoop: loop)
        let tick = TimeAmount.nanoseconds(machine.value.tickInterval)
        let timer = loop.scheduleRepeatedTask(initialDelay: tick, delay: tick) { [weak self] task in
            guard let self else { return task.cancel() }
            let busy = self.state.withLockedValue { s in
                !s.pending.isEmpty || !s.serving.isEmpty || !s.backlog.isEmpty || s.readsPaused || s.closed != nil
            } || self.directInFlight.load(ordering: .relaxed) > 0
            guard case .idle(let idle) = machine.value.tick(now: ParleyConnectionHandler.now(), messages: self.messagesReceived.load(ordering: .relaxed), busy: busy) else { return }
            task.cancel()
            let seconds = Double(idle) / 1e9, limit = Double(timeout) / 1e9
            let error = ParleyError(
                code: .timeout,
                message: "idle for \(seconds.formatted2) s: no message received and nothing in progress (idle timeout \(limit.formatted2) s, no keepalive)"
            )
            self.logger.info("closing an idle connection", metadata: ["entity": "\(self.session.entityName)", "idle": "\(seconds.formatted2) s"])
            if self.lossless != nil {
                self.finish(error)  // ends the session: CLOSE goes on its link, if it has one
            } else {
                self.outlet.write(.close(error))  // CLOSE, then the channel closes and `finish` runs
            }
        }
        let keep = self.state.withLockedValue { s -> Bool in
            guard s.closed == nil else { return false }
            s.idleTimer = timer
            return true
        }
        if !keep { timer.cancel() }
    }

    /// A request the handshake already sent (`ParleyClient.connect(to:firstCall:...)`):
    /// its id and who waits for its answer.
    struct SentEarly: Sendable {
        var id: UInt64
        var completion: @Sendable (Result<WireMessage, any Error>) -> Void
    }

    // MARK: - Sending requests

    /// Sends a request and waits for its response.
    ///
    /// - Parameters:
    ///   - request: the request message; its type selects the peer's handler.
    ///   - data: bulk bytes for the data segment, sent without copying.
    ///   - response: the expected response type.
    ///   - timeout: how long to wait for the answer; nil: as long as the connection lasts.
    /// - Throws: `ParleyError` with the peer's error code, `cancelled` if the calling task is
    ///   cancelled, `timeout` if the answer does not come within `timeout` (in both cases the
    ///   peer is told with a CANCEL), `frameTooLarge` or `invalidArgument` if the peer could
    ///   not accept the request, or `connectionClosed`.
    ///   - idempotent: running the request twice does no harm. In a lossless session, it is
    ///     then sent again automatically after a session reset, where other requests that may
    ///     have run fail with `sessionReset`.
    public func call<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message & Sendable>(
        _ request: Request, data: ByteBuffer? = nil, as response: Response.Type = Response.self, timeout: Duration? = nil,
        idempotent: Bool = false
    ) async throws -> ParleyReply<Response> {
        let answer = try await self.exchange(
            type: Request.protoMessageName, payload: request.parleyPayload(allocator: self.channel.allocator), data: data,
            timeout: timeout, idempotent: idempotent
        )
        return try Self.decodeAnswer(answer, as: Response.self)
    }

    /// Sends a request; `completion` runs once with its answer: on the connection's event
    /// loop when the answer comes, or at once if the request cannot be sent. No task and no
    /// continuation per request, for code on the event loop that keeps many requests in
    /// flight (the block map). Without a free request slot (or, in a lossless session, room
    /// in the replay queue) the request waits in a task, as `call` would. There is no timeout
    /// and no cancellation: it ends with the answer or with the connection.
    public func call<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message & Sendable>(
        _ request: Request, data: ByteBuffer? = nil, as response: Response.Type = Response.self, idempotent: Bool = false,
        completion: @escaping @Sendable (Result<ParleyReply<Response>, any Error>) -> Void
    ) {
        let type = Request.protoMessageName
        let payload = request.parleyPayload(allocator: self.channel.allocator)
        guard self.lossless?.hasRoom ?? true, let id = self.tryAcquireSlot() else {
            Task {
                do {
                    let answer = try await self.exchange(type: type, payload: payload, data: data, timeout: nil, idempotent: idempotent)
                    completion(.success(try Self.decodeAnswer(answer, as: Response.self)))
                } catch {
                    completion(.failure(error))
                }
            }
            return
        }
        let message = WireMessage(header: MessageHeader(id: id, kind: .request, type: type), payload: payload, data: data)
        var kick: ParleyConnectionHandler.Outlet?
        let refusal = self.state.withLockedValue { s -> ParleyError? in
            if let closed = s.closed { return closed }
            do throws(ParleyError) { try self.check(message) } catch { return error }
            let pending = Pending.callback { answer in
                self.releaseSlot()
                completion(answer.flatMap { a in Result { try Self.decodeAnswer(a, as: Response.self) } })
            }
            kick = self.enlist(pending, id: id, message: message, idempotent: idempotent, &s)
            return nil
        }
        if let refusal {
            self.releaseSlot()
            completion(.failure(refusal))
        } else if self.lossless == nil {
            self.outlet.write(.message(message))
        } else {
            kick?.pump()
        }
    }

    /// Records request `id` as waiting for its answer and, in a lossless session, hands the
    /// message to the session; returns the link to kick (nil for a lossy connection). Called
    /// under the state lock: a session reset sees both the entry and the numbered message, or
    /// neither.
    private func enlist(_ pending: Pending, id: UInt64, message: WireMessage, idempotent: Bool, _ s: inout State) -> ParleyConnectionHandler.Outlet? {
        guard let lossless = self.lossless else {
            s.pending[id] = Outstanding(pending)
            return nil
        }
        s.pending[id] = Outstanding(pending, type: message.header.type, retry: idempotent ? message : nil)
        return lossless.enqueue(message)
    }

    /// Sends a request message (`type`, `payload`) and waits for the answer (see `call`).
    func exchange(type: String, payload: ByteBuffer, data: ByteBuffer?, timeout: Duration?, idempotent: Bool) async throws -> WireMessage {
        let id = try await self.acquireSlot()
        defer { self.releaseSlot() }
        try await self.lossless?.waitForRoom()
        let message = WireMessage(header: MessageHeader(id: id, kind: .request, type: type), payload: payload, data: data)
        try self.check(message)
        var timer: Scheduled<Void>?
        defer { timer?.cancel() }
        return try await withTaskCancellationHandler {
            try await withUnsafeThrowingContinuation { (continuation: UnsafeContinuation<WireMessage, any Error>) in
                var kick: ParleyConnectionHandler.Outlet?
                let refusal = self.state.withLockedValue { s -> ParleyError? in
                    if let closed = s.closed { return closed }
                    // Cancelled before this point: the cancellation handler found nothing to cancel.
                    if Task.isCancelled { return ParleyError(code: .cancelled, message: "request \(id) cancelled") }
                    kick = self.enlist(.unary(continuation), id: id, message: message, idempotent: idempotent, &s)
                    return nil
                }
                if let refusal {
                    continuation.resume(throwing: refusal)
                } else {
                    if self.lossless == nil { self.outlet.write(.message(message)) } else { kick?.pump() }
                    if let timeout {
                        timer = self.channel.eventLoop.scheduleTask(in: .nanoseconds(timeout.nanoseconds)) {
                            self.cancelOutbound(id: id, ParleyError(
                                code: .timeout, message: "request \(id) (\(type)) got no answer within \(timeout)"
                            ))
                        }
                    }
                }
            }
        } onCancel: {
            self.cancelOutbound(id: id)
        }
    }

    /// Sends a request and waits for its response message.
    public func request<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message & Sendable>(
        _ request: Request, as response: Response.Type = Response.self, timeout: Duration? = nil, idempotent: Bool = false
    ) async throws -> Response {
        try await self.call(request, as: response, timeout: timeout, idempotent: idempotent).message
    }

    /// Sends a request answered by a stream of items and a final response.
    /// Stopping the iteration (or cancelling its task) cancels the request at the peer.
    public func stream<Request: SwiftProtobuf.Message, Item: SwiftProtobuf.Message & Sendable, Final: SwiftProtobuf.Message & Sendable>(
        _ request: Request, data: ByteBuffer? = nil, item: Item.Type, final: Final.Type
    ) async throws -> ParleyResponseStream<Item, Final> {
        let id = try await self.acquireSlot()
        let message = WireMessage(
            header: MessageHeader(id: id, kind: .request, type: Request.protoMessageName),
            payload: request.parleyPayload(allocator: self.channel.allocator), data: data
        )
        do {
            try self.check(message)
            try await self.lossless?.waitForRoom()
        } catch {
            self.releaseSlot()
            throw error
        }
        let (stream, continuation) = AsyncThrowingStream<WireMessage, any Error>.makeStream()
        let backlog = StreamBacklog()
        continuation.onTermination = { termination in
            self.releaseSlot()
            if case .cancelled = termination { self.cancelOutbound(id: id) }
        }
        var kick: ParleyConnectionHandler.Outlet?
        let failure = self.state.withLockedValue { s -> ParleyError? in
            if let closed = s.closed { return closed }
            if let lossless = self.lossless {
                s.pending[id] = Outstanding(.stream(continuation, backlog), type: Request.protoMessageName)
                kick = lossless.enqueue(message)
            } else {
                s.pending[id] = Outstanding(.stream(continuation, backlog))
            }
            return nil
        }
        if let failure {
            continuation.finish(throwing: failure)
            throw failure
        }
        if self.lossless == nil { self.outlet.write(.message(message)) } else { kick?.pump() }
        return ParleyResponseStream(base: stream, backlog: backlog)
    }

    /// Sends a one-way message. Returns once the message is handed to the event loop, or,
    /// while the socket is not keeping up, once it has been written.
    public func send<Message: SwiftProtobuf.Message>(_ message: Message, data: ByteBuffer? = nil) async throws {
        try await self.write(WireMessage(
            header: MessageHeader(id: 0, kind: .oneWay, type: Message.protoMessageName),
            payload: message.parleyPayload(allocator: self.channel.allocator), data: data
        ))
    }

    /// Sends a one-way message without waiting: not for the socket, nor (in a lossless
    /// session) for room in the replay queue. For handlers that answer one-way messages with
    /// one-way messages, where the peer's own sending bounds how many there are.
    public func sendNow<Message: SwiftProtobuf.Message>(_ message: Message, data: ByteBuffer? = nil) throws {
        if let closed = self.state.withLockedValue({ $0.closed }) { throw closed }
        let wire = WireMessage(
            header: MessageHeader(id: 0, kind: .oneWay, type: Message.protoMessageName),
            payload: message.parleyPayload(allocator: self.channel.allocator), data: data
        )
        try self.check(wire)
        self.sendMessage(wire)
    }

    /// Sends nucleus fields to the client (server side only).
    public func sendNotice(_ nucleus: ParleyNucleus) async throws {
        precondition(self.role == .server, "only a server sends notices")
        try await self.control(.notice(nucleus.wire))
    }

    /// Closes the connection; outstanding requests fail with `connectionClosed`. A lossless
    /// session ends: the peer is told with CLOSE and forgets it.
    public func close() {
        let error = ParleyError(code: .connectionClosed, message: "connection closed by this side")
        if self.lossless != nil {
            // `finish` ends the session: its link transmits what was sent before, then CLOSE.
            self.finish(error)
            return
        }
        self.finish(error)
        self.channel.close(promise: nil)
    }

    /// Waits until the connection has ended, by either side; returns why it ended.
    @discardableResult
    public func closed() async -> ParleyError {
        // `ended` is only ever succeeded.
        (try? await self.ended.futureResult.get()) ?? ParleyError(code: .connectionClosed, message: "connection closed")
    }

    /// Why the connection ended, once it has (by either side); nil while it is open. Set
    /// before any request waiting on it fails, so that a caller whose request failed can
    /// tell an ERROR answer on a live connection from the connection's end.
    public var endReason: ParleyError? { self.state.withLockedValue { $0.closed } }

    /// Requests this side is waiting on.
    public var outstandingRequests: Int { self.state.withLockedValue { $0.pending.count } }

    /// Lossless sessions: how many times a new connection resumed the session.
    public var reconnects: Int { self.state.withLockedValue { $0.linkUps } }

    /// The round-trip time of the last KEEPALIVE this side sent that was answered, if any.
    public var keepaliveRoundTrip: Duration? { self.state.withLockedValue { $0.keepaliveRoundTrip } }

    // MARK: - Internals

    /// Refuses what the peer could not accept (the same checks the event loop makes), so
    /// that the sender, not the event loop, gets the error.
    private func check(_ message: WireMessage) throws(ParleyError) {
        try SessionStateMachine.check(message, features: self.session.features, maxPeerFrameSize: self.session.peerMaxFrameSize)
    }

    /// Writes a message that is not a request: returns at once while the channel is writable,
    /// and otherwise waits until the message has been written (back-pressure to the sender).
    func write(_ message: WireMessage) async throws {
        if let closed = self.state.withLockedValue({ $0.closed }) { throw closed }
        try self.check(message)
        if let lossless = self.lossless {
            // The replay bound is the back-pressure: kept messages only go once acknowledged.
            try await lossless.waitForRoom()
            let kick = try self.state.withLockedValue { s -> Result<ParleyConnectionHandler.Outlet?, ParleyError> in
                if let closed = s.closed { return .failure(closed) }
                return .success(lossless.enqueue(message))
            }.get()
            kick?.pump()
            return
        }
        if self.channel.isWritable {
            self.outlet.write(.message(message))
        } else {
            try await self.control(.message(message))
        }
    }

    /// Writes a command and waits until it has been written.
    func control(_ command: ConnectionCommand) async throws {
        do {
            guard let outlet = self.currentOutlet else {
                throw ParleyError(code: .connectionClosed, message: "the session's connection is down; reconnecting")
            }
            let written = self.channel.eventLoop.makePromise(of: Void.self)
            outlet.write(command, promise: written)
            try await written.futureResult.get()
        } catch let error as ParleyError where error.code != .connectionClosed {
            throw error
        } catch {
            throw self.state.withLockedValue { $0.closed } ?? ParleyError(code: .connectionClosed, message: "connection closed", cause: error)
        }
    }

    /// Sends the final answer to a peer request. It is not waited for: a handler is done once
    /// its answer is handed to the event loop. Throws if the peer could not accept it.
    func answer(_ message: WireMessage, epoch: UInt64) throws(ParleyError) {
        try self.check(message)
        // The answer to a request of a session that was reset has no one to go to.
        guard self.isCurrent(epoch: epoch) else { return }
        self.sendMessage(message)
    }

    /// True unless a session reset came since `epoch` (always true for a lossy connection).
    func isCurrent(epoch: UInt64) -> Bool {
        self.lossless == nil || self.epochs.load(ordering: .acquiring) == epoch
    }

    var epoch: UInt64 { self.lossless == nil ? 0 : self.epochs.load(ordering: .acquiring) }

    /// Hands a message to the link: the channel's handler (lossy), or the lossless session,
    /// which numbers and keeps it and has the current link transmit it.
    private func sendMessage(_ message: WireMessage) {
        if let lossless = self.lossless {
            // [R-5.2-13] counts answers only: one-way replies sent at once (sendNow) are paced
            // by the peer's own one-way messages, and a conforming peer slow to acknowledge
            // them must not be ended (counting them failed the lossless soak under load).
            let counted = message.header.kind == .response || message.header.kind == .error
            lossless.enqueue(message, unwaited: counted)?.pump()
        } else {
            self.outlet.write(.message(message))
        }
    }

    /// The outlet of the link that is current (always the one channel's, for a lossy connection).
    private var currentOutlet: ParleyConnectionHandler.Outlet? {
        guard let lossless = self.lossless else { return self.outlet }
        return lossless.currentOutlet
    }

    /// Sends the final answer to a peer request (see `answer(_:)`).
    func answer<M: SwiftProtobuf.Message>(kind: MessageKind, id: UInt64, message: M, data: ByteBuffer?, epoch: UInt64) throws(ParleyError) {
        try self.answer(self.answerMessage(kind: kind, id: id, message: message, data: data), epoch: epoch)
    }

    func answerMessage<M: SwiftProtobuf.Message>(kind: MessageKind, id: UInt64, message: M, data: ByteBuffer?) -> WireMessage {
        WireMessage(
            header: MessageHeader(id: id, kind: kind, type: M.protoMessageName),
            payload: message.parleyPayload(allocator: self.channel.allocator), data: data
        )
    }

    private enum SlotOutcome { case acquired(UInt64), parked, failed(ParleyError) }

    /// Takes a free request slot without waiting, if there is one and no one waits for one;
    /// returns the id of the new request.
    private func tryAcquireSlot() -> UInt64? {
        self.state.withLockedValue { s -> UInt64? in
            guard s.closed == nil, s.slotWaiters.isEmpty, s.outstanding < self.limits.maxOutstandingRequests else { return nil }
            s.outstanding += 1
            defer { s.nextID &+= 1 }
            return s.nextID
        }
    }

    /// Waits for a free request slot; returns the id of the new request.
    private func acquireSlot() async throws -> UInt64 {
        let first = self.state.withLockedValue { s -> SlotOutcome in
            if let closed = s.closed { return .failed(closed) }
            guard s.outstanding < self.limits.maxOutstandingRequests else { return .parked }
            s.outstanding += 1
            defer { s.nextID &+= 1 }
            return .acquired(s.nextID)
        }
        switch first {
        case .acquired(let id): return id
        case .failed(let error): throw error
        case .parked: break
        }
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
            let outcome = self.state.withLockedValue { s -> SlotOutcome in
                if let closed = s.closed { return .failed(closed) }
                if s.outstanding < self.limits.maxOutstandingRequests {
                    s.outstanding += 1
                    return .acquired(0)
                }
                s.slotWaiters.append(c)
                return .parked
            }
            switch outcome {
            case .acquired: c.resume()
            case .failed(let error): c.resume(throwing: error)
            case .parked: break
            }
        }
        return self.state.withLockedValue { s in
            defer { s.nextID &+= 1 }
            return s.nextID
        }
    }

    private func releaseSlot() {
        let waiter = self.state.withLockedValue { s -> CheckedContinuation<Void, any Error>? in
            if let next = s.slotWaiters.popFirst() { return next }  // the slot passes on
            s.outstanding -= 1
            return nil
        }
        waiter?.resume()
    }

    /// Gives up on request `id` with `error` (by default: cancelled) and tells the peer.
    private func cancelOutbound(id: UInt64, _ error: ParleyError? = nil) {
        let pending = self.state.withLockedValue { $0.pending.removeValue(forKey: id) }
        let error = error ?? ParleyError(code: .cancelled, message: "request \(id) cancelled")
        switch pending {
        case let pending?: pending.waiter.fail(error)
        case nil: return  // already answered, or never sent
        }
        guard self.session.features.contains(.streams) else { return }
        let cancel = WireMessage(header: MessageHeader(id: id, kind: .cancel, type: ""), payload: ByteBuffer())
        // Not counted by [R-5.2-13] (not an answer): at most one per request of this side's
        // own, which its bounds hold, whatever the peer does.
        self.sendMessage(cancel)
    }

    static func decodeAnswer<Response: SwiftProtobuf.Message & Sendable>(_ answer: WireMessage, as: Response.Type) throws -> ParleyReply<Response> {
        guard answer.header.type == Response.protoMessageName else {
            throw ParleyError(
                code: .malformedPayload,
                message: "expected a \(Response.protoMessageName) answer, got \"\(answer.header.type)\""
            )
        }
        return ParleyReply(try Response(parleyPayload: answer.payload), data: answer.data)
    }

    /// Fails everything outstanding; idempotent.
    func finish(_ error: ParleyError) {
        var idleTimer: RepeatedTask?
        let ending = self.state.withLockedValue { s -> (pending: [UInt64: Outstanding], waiters: CircularBuffer<CheckedContinuation<Void, any Error>>, serving: [HandlerKey: Handling], idle: [CheckedContinuation<Void, Never>])? in
            guard s.closed == nil else { return nil }
            s.closed = error
            idleTimer = s.idleTimer
            defer {
                s.idleTimer = nil
                s.pending = [:]
                s.slotWaiters = []
                s.serving = [:]
                s.backlog = []
                s.idleWaiters = []
            }
            return (s.pending, s.slotWaiters, s.serving, s.idleWaiters)
        }
        guard let ending else { return }
        idleTimer?.cancel()
        for (_, p) in ending.pending { p.waiter.fail(error) }
        ending.waiters.forEach { $0.resume(throwing: error) }
        for case .running(let task) in ending.serving.values { task.cancel() }
        ending.idle.forEach { $0.resume() }
        // The session's link transmits what was submitted, then CLOSE tells the peer.
        self.lossless?.end(error)?.write(.close(error))
        self.linkEventsContinuation.finish()
        self.ended.succeed(error)
        self.onClose?(error)
    }

    // MARK: - Receiving (on the event loop)

    fileprivate func received(_ event: ConnectionEvent) {
        switch event {
        case .message(let message):
            self.messagesReceived.add(1, ordering: .relaxed)
            self.received(message)
        case .notice(let nucleus):
            self.onNotice?(ParleyNucleus(nucleus))
        case .keepaliveAck(let roundTrip):
            self.state.withLockedValue { $0.keepaliveRoundTrip = .nanoseconds(roundTrip) }
        case .direct(let direct):
            self.messagesReceived.add(1, ordering: .relaxed)
            self.directInFlight.add(1, ordering: .relaxed)
            guard let handler = self.directHandler.withLock({ $0?.body }) else {
                // The handler enables DIRECT only after `enableDirect` stored its handler.
                self.outlet.write(.close(ParleyError(code: .unexpectedFrame, message: "DIRECT frame before a service enabled it")))
                return
            }
            handler(ParleyDirectRequest(direct, connection: self, started: self.metrics.start()))
        case .directAnswered(let started):
            self.directAnswered()
            self.metrics.handled(since: started)
        }
    }

    // MARK: - DIRECT frames (docs/protocol.md 7.16)

    /// Server side: `handler` takes this connection's DIRECT requests from now on, called on
    /// the event loop right where each was read (no task, no slot), and must answer each once
    /// (`ParleyDirectRequest.answer`), from any thread. A service calls it when it grants
    /// DIRECT on the connection, before it answers the grant, so that a DIRECT sent after the
    /// answer finds it enabled.
    /// - Throws: `invalidArgument` on a client side, without feature bit 4, in a lossless
    ///   session, or when DIRECT is already enabled.
    public func enableDirect(_ handler: @escaping @Sendable (ParleyDirectRequest) -> Void) throws(ParleyError) {
        guard self.role == .server else {
            throw ParleyError(code: .invalidArgument, message: "only a server side takes DIRECT requests")
        }
        try SessionStateMachine.mayUseDirect(features: self.session.features)
        let first = self.directHandler.withLock { h -> Bool in
            guard h == nil else { return false }
            h = DirectHandler(body: handler)
            return true
        }
        guard first else { throw ParleyError(code: .invalidArgument, message: "DIRECT is already enabled on this connection") }
        self.outlet.write(.enableDirect)
    }

    /// Server side: DIRECT is enabled on this connection.
    public var isDirectEnabled: Bool { self.directHandler.withLock { $0 != nil } }

    /// Whether the negotiated features allow DIRECT frames on this connection (feature bit 4,
    /// not a lossless session). A client still needs its server's service to grant them.
    public var mayUseDirect: Bool { (try? SessionStateMachine.mayUseDirect(features: self.session.features)) != nil }

    /// Client side: sends a DIRECT request built with `DirectFrame` (the connection gives it
    /// its id); `completion` runs once, on the event loop, with the answer's frame or the
    /// reason there is none (the connection ended: `connectionClosed`, or the peer's CLOSE;
    /// `invalidArgument` when DIRECT cannot be used; `frameTooLarge` over the peer's limit).
    public func sendDirect(_ frame: DirectFrame, completion: @escaping DirectCompletion) {
        guard self.role == .client else {
            return completion(.failure(ParleyError(code: .invalidArgument, message: "only a client side sends DIRECT requests")))
        }
        self.outlet.write(.directRequest(frame, completion))
    }

    /// A DIRECT answer from the service, to be written. The request stops counting as in
    /// flight, and counts as handled, when the handler has taken the answer for an id in
    /// flight (`directAnswered`), on the event loop: not here, where a second answer to one
    /// request (a service's mistake, dropped by the handler) would count it twice.
    fileprivate func answerDirect(_ frame: DirectFrame, started: ContinuousClock.Instant?) {
        self.outlet.write(.directAnswer(frame, started: started))
    }

    /// The handler took the answer to a DIRECT request in flight (on the event loop).
    private func directAnswered() {
        if self.directInFlight.subtract(1, ordering: .relaxed).newValue == 0 {
            // The last one: a drain may be waiting for it.
            let idle = self.state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
                guard s.serving.isEmpty && s.backlog.isEmpty, !s.idleWaiters.isEmpty,
                      self.directInFlight.load(ordering: .relaxed) == 0  // none came meanwhile
                else { return [] }
                defer { s.idleWaiters = [] }
                return s.idleWaiters
            }
            idle.forEach { $0.resume() }
        }
    }

    /// The peer's DIRECT request broke the service's rules of shape: CLOSE with this error.
    fileprivate func directViolation(_ error: ParleyError) {
        self.logger.debug("closing: \(error.message)")
        self.outlet.write(.close(error))
    }

    /// The allocator of the connection's channel (for `DirectFrame`s).
    public var channelAllocator: ByteBufferAllocator { self.channel.allocator }

    /// Ends the connection with CLOSE carrying `error`: for a service whose peer broke its
    /// rules (a malformed DIRECT answer).
    public func close(_ error: ParleyError) {
        self.outlet.write(.close(error))
    }

    private func received(_ message: WireMessage) {
        let h = message.header
        switch h.kind {
        case .response, .error, .streamItem:
            self.answered(message)
        case .cancel:
            self.peerCancelled(id: h.id)
        case .request:
            self.serve(message)
        case .oneWay:
            guard let handler = self.router.oneWayHandlers[h.type] else {
                self.logger.debug("no handler for one-way message", metadata: ["type": "\(h.type)"])
                return
            }
            // Draining starts no new work; a one-way message has no answer to carry the refusal.
            guard !self.state.withLockedValue({ $0.draining }) else {
                self.logger.debug("one-way message dropped while draining", metadata: ["type": "\(h.type)"])
                return
            }
            switch self.admit(message, handler: handler, isRequest: false) {
            case .start(let handler): self.start(message, handler: handler)
            case .runInline(let body): self.runInline(message, body)
            case .complete(let body): self.complete(message, body)
            case .refused(let error) where error.code == .permissionDenied:
                self.logger.warning("permission denied", metadata: ["entity": "\(self.session.entityName)", "type": "\(h.type)", "error": "\(error.message)"])
            case .queued, .closed, .refused, .violation: break
            }
        default:
            break
        }
    }

    private func answered(_ message: WireMessage) {
        let id = message.header.id
        let kind = message.header.kind
        let pending = self.state.withLockedValue { s -> Pending? in
            switch s.pending[id]?.waiter {
            case .unary?, .callback?:
                return kind == .streamItem ? nil : s.pending.removeValue(forKey: id)?.waiter
            case .stream(let c, let backlog)?:
                return kind == .streamItem ? .stream(c, backlog) : s.pending.removeValue(forKey: id)?.waiter
            case nil:
                return nil
            }
        }
        switch (pending, kind) {
        case (.unary(let c)?, .error):
            c.resume(throwing: Self.errorFromAnswer(message))
        case (.unary(let c)?, _):
            c.resume(returning: message)
        case (.callback(let complete)?, .error):
            complete(.failure(Self.errorFromAnswer(message)))
        case (.callback(let complete)?, _):
            complete(.success(message))
        case (.stream(let c, let backlog)?, .streamItem):
            let waiting = backlog.received(message)
            guard waiting <= self.limits.maxUnconsumedStreamBytes else {
                self.logger.warning("stream cancelled: its consumer does not keep up", metadata: ["id": "\(id)", "waiting": "\(waiting)"])
                self.cancelOutbound(id: id, ParleyError(
                    code: .cancelled,
                    message: "stream \(id) cancelled: \(waiting) bytes of its items were received and not yet taken by its consumer (limit \(self.limits.maxUnconsumedStreamBytes), ParleyConnectionLimits.maxUnconsumedStreamBytes)"
                ))
                return
            }
            c.yield(message)
        case (.stream(let c, _)?, .error):
            c.finish(throwing: Self.errorFromAnswer(message))
        case (.stream(let c, let backlog)?, _):
            _ = backlog.received(message)  // the final answer: it ends the stream, no check
            c.yield(message)
            c.finish()
        case (nil, _):
            // An answer to a request we cancelled or never sent: discarded (docs: "Cancel").
            break
        }
    }

    static func errorFromAnswer(_ message: WireMessage) -> ParleyError {
        guard let status = try? Parley_V1_Status(parleyPayload: message.payload) else {
            return ParleyError(code: .malformedPayload, message: "ERROR answer with an unreadable status")
        }
        guard !status.message.allSatisfy(\.isWhitespace) else {
            // A code alone tells the reader of the error nothing (a CLOSE without a message
            // says "no reason given" too).
            return ParleyError(code: ParleyError.Code(rawValue: status.code), message: "request \(message.header.id) failed: the peer's ERROR gave no reason")
        }
        return ParleyError(status: status)
    }

    private func peerCancelled(id: UInt64) {
        let task = self.state.withLockedValue { s -> Task<Void, Never>? in
            switch s.serving[.request(id)] {
            case .running(let task)?:
                return task
            case .starting?:
                s.serving[.request(id)] = .starting(cancelled: true)
                return nil
            case .completing?:
                return nil
            case nil:
                // Not started yet: drop it from the backlog; the requester no longer waits.
                if s.queuedRequests.contains(id),
                   let index = s.backlog.firstIndex(where: { $0.message.header.id == id && $0.message.header.kind == .request }) {
                    s.backlog.remove(at: index)
                    s.queuedRequests.remove(id)
                }
                return nil
            }
        }
        task?.cancel()
    }

    private func serve(_ message: WireMessage) {
        let h = message.header
        let handler = self.router.handlers[h.type]
        switch self.admit(message, handler: handler, isRequest: true) {
        case .start(let handler): self.start(message, handler: handler)
        case .runInline(let body): self.runInline(message, body)
        case .complete(let body): self.complete(message, body)
        case .queued, .closed: break
        case .violation(let error):
            // An ERROR would carry the id of the request still being served: the peer could
            // not tell the two apart. A peer that reuses a live id is broken: close.
            self.logger.debug("closing: \(error.message)")
            self.currentOutlet?.write(.close(error))
        case .refused(let error):
            if error.code == .permissionDenied {
                self.logger.warning("permission denied", metadata: ["entity": "\(self.session.entityName)", "type": "\(h.type)", "error": "\(error.message)"])
            }
            try? self.answer(Self.errorAnswer(id: h.id, error, allocator: self.channel.allocator), epoch: self.epoch)
        }
    }

    static func errorAnswer(id: UInt64, _ error: ParleyError, allocator: ByteBufferAllocator) -> WireMessage {
        WireMessage(
            header: MessageHeader(id: id, kind: .error, type: Parley_V1_Status.protoMessageName),
            payload: error.status.parleyPayload(allocator: allocator)
        )
    }

    /// What a handled message is known by among those running: a request by its id, a
    /// one-way message by its seq (one more per MESSAGE on a connection, [R-7.2-3]). Apart,
    /// so that a peer cannot pick a request id that a one-way message's entry would
    /// overwrite (the request then ran untracked: no cap, no CANCEL, no drain).
    enum HandlerKey: Hashable, Sendable {
        case request(UInt64)
        case oneWay(seq: UInt64)
    }

    private static func key(_ message: WireMessage) -> HandlerKey {
        message.header.kind == .request ? .request(message.header.id) : .oneWay(seq: message.header.seq)
    }

    private enum Admission {
        case start(ParleyRouter.Handler), runInline(ParleyRouter.SyncHandler), queued, closed
        /// A completing handler, called on the event loop with a slot taken (no task).
        case complete(ParleyRouter.CompletingHandler)
        /// Answered with ERROR.
        case refused(ParleyError)
        /// The connection is closed with CLOSE.
        case violation(ParleyError)
    }

    /// Decides what becomes of a peer request or one-way message (`handler` is the router's,
    /// if it has one): refused (draining, id in use, no handler); run inline if it is a
    /// synchronous handler, handlers run on the event loop and nothing is queued (it needs
    /// no slot: it is done before the next frame is read); started at once if a handler
    /// slot is free; or else queued, and then the connection stops reading from the socket
    /// until slots free up (back-pressure through TCP).
    private func admit(_ message: WireMessage, handler: ParleyRouter.Handler?, isRequest: Bool) -> Admission {
        let h = message.header
        let (admission, pause) = self.state.withLockedValue { s -> (Admission, Bool) in
            guard s.closed == nil else { return (.closed, false) }
            if isRequest {
                if s.draining { return (.refused(ParleyError(code: .shuttingDown, message: "server is shutting down; request \(h.type) not started")), false) }
                if s.serving[.request(h.id)] != nil || s.queuedRequests.contains(h.id) {
                    return (.violation(ParleyError(code: .protocolViolation, message: "request id \(h.id) is already in use by a request still being served")), false)
                }
            }
            guard let handler else {
                return (.refused(ParleyError(code: .unknownMessageType, message: "no handler for request type \"\(h.type)\"")), false)
            }
            if let needed = self.router.requirement(for: h.type), !self.session.grants(needed) {
                return (.refused(ParleyError(
                    code: .permissionDenied,
                    message: "\(self.session.entityName) may not send \(h.type): it needs capability \"\(needed)\""
                )), false)
            }
            // Not ahead of requests queued before it (then it waits its turn in the queue).
            if case .sync(let body) = handler, s.backlog.isEmpty, self.executor != nil, self.channel.eventLoop.inEventLoop {
                return (.runInline(body), false)
            }
            if s.backlog.isEmpty && s.serving.count < self.limits.maxConcurrentHandlers {
                if let body = self.completingBody(handler), self.channel.eventLoop.inEventLoop {
                    s.serving[Self.key(message)] = .completing
                    return (.complete(body), false)
                }
                s.serving[Self.key(message)] = .starting(cancelled: false)
                return (.start(handler), false)
            }
            s.backlog.append((message, handler))
            if h.kind == .request { s.queuedRequests.insert(h.id) }
            defer { s.readsPaused = true }
            return (.queued, !s.readsPaused)
        }
        if pause { self.currentOutlet?.pauseReads() }
        return admission
    }

    /// Runs a handler in its own task. On the event loop, the task runs at once, here, until
    /// it first suspends.
    private func start(_ message: WireMessage, handler: ParleyRouter.Handler) {
        let key = Self.key(message)
        let (id, context) = self.handlerContext(for: message)
        let body: @Sendable () async -> Void = {
            let start = self.metrics.start()
            do {
                try await handler.run(message, context)
            } catch {
                self.handlerFailed(error, message: message, id: id, epoch: context.epoch)
            }
            self.metrics.handled(since: start)
            self.handlerFinished(key: key, epoch: context.epoch)
        }
        let task: Task<Void, Never>
        if let executor = self.executor, self.channel.eventLoop.inEventLoop {
            task = Task.immediate(executorPreference: executor, operation: body)
        } else {
            task = Task(executorPreference: self.executor, operation: body)
        }
        let cancel = self.state.withLockedValue { s -> Bool in
            guard case .starting(let cancelled)? = s.serving[key] else { return false }  // already finished
            s.serving[key] = .running(task)
            return cancelled
        }
        if cancel { task.cancel() }
    }

    /// Runs a synchronous handler right here, on the event loop: no task and no slot.
    private func runInline(_ message: WireMessage, _ body: ParleyRouter.SyncHandler) {
        let (id, context) = self.handlerContext(for: message)
        let start = self.metrics.start()
        do {
            try body(message, context)
        } catch {
            self.handlerFailed(error, message: message, id: id, epoch: context.epoch)
        }
        self.metrics.handled(since: start)
    }

    /// A handled message's request id (nil for a one-way message) and its handler's context.
    private func handlerContext(for message: WireMessage) -> (id: UInt64?, context: ParleyRequestContext) {
        let id: UInt64? = message.header.kind == .request ? message.header.id : nil
        var context = ParleyRequestContext(connection: self, data: message.data, requestID: id ?? 0, logger: self.logger)
        context.epoch = self.epoch
        return (id, context)
    }

    /// The body of a completing handler when handlers run on the event loop (elsewhere it runs
    /// in a task, like an asynchronous one).
    private func completingBody(_ handler: ParleyRouter.Handler) -> ParleyRouter.CompletingHandler? {
        guard case .completing(let body) = handler, self.executor != nil else { return nil }
        return body
    }

    /// Calls a completing handler right here, on the event loop, with no task; its slot is
    /// freed when it calls back, from whatever thread.
    private func complete(_ message: WireMessage, _ body: ParleyRouter.CompletingHandler) {
        let key = Self.key(message)
        let (id, context) = self.handlerContext(for: message)
        let start = self.metrics.start()
        body(message, context) { result in
            if case .failure(let error) = result {
                self.handlerFailed(error, message: message, id: id, epoch: context.epoch)
            }
            self.metrics.handled(since: start)
            self.handlerFinished(key: key, epoch: context.epoch)
        }
    }

    /// A handler threw: answers a request with the error, logs a one-way message's.
    private func handlerFailed(_ error: any Error, message: WireMessage, id: UInt64?, epoch: UInt64) {
        self.metrics.failed.increment()
        if let id {
            let parleyError: ParleyError
            switch error {
            case let e as ParleyError: parleyError = e
            case is CancellationError: parleyError = ParleyError(code: .cancelled, message: "request \(id) cancelled")
            default: parleyError = ParleyError(code: .handlerFailed, message: "\(message.header.type) handler failed: \(error)")
            }
            try? self.answer(Self.errorAnswer(id: id, parleyError, allocator: self.channel.allocator), epoch: epoch)
        } else {
            self.logger.debug("one-way handler failed", metadata: ["type": "\(message.header.type)", "error": "\(error)"])
        }
    }

    /// A handler of session `epoch` is done. One of a session that was reset since is not in
    /// `serving` any more, and its key may now be a new request's: it removes nothing.
    private func handlerFinished(key: HandlerKey, epoch: UInt64) {
        let (idle, backlogReady) = self.state.withLockedValue { s -> ([CheckedContinuation<Void, Never>], Bool) in
            // The epoch changes only under this lock.
            if self.isCurrent(epoch: epoch) { s.serving.removeValue(forKey: key) }
            var idle: [CheckedContinuation<Void, Never>] = []
            if s.serving.isEmpty && s.backlog.isEmpty && self.directInFlight.load(ordering: .relaxed) == 0 {
                idle = s.idleWaiters
                s.idleWaiters = []
            }
            // Paused exactly while requests wait in the backlog (and until it has been emptied).
            return (idle, s.readsPaused)
        }
        idle.forEach { $0.resume() }
        if backlogReady {
            // Started from a fresh event-loop job rather than from here: a handler that finishes
            // at once would otherwise start the next one inside itself, nesting ever deeper.
            self.channel.eventLoop.execute { self.startFromBacklog() }
        }
    }

    /// Starts queued requests while handler slots are free; resumes reading once the queue is empty.
    private func startFromBacklog() {
        while true {
            let (next, resume) = self.state.withLockedValue { s -> ((message: WireMessage, handler: ParleyRouter.Handler)?, Bool) in
                guard s.closed == nil, s.serving.count < self.limits.maxConcurrentHandlers else { return (nil, false) }
                guard let queued = s.backlog.popFirst() else {
                    defer { s.readsPaused = false }
                    return (nil, s.readsPaused)
                }
                if queued.message.header.kind == .request { s.queuedRequests.remove(queued.message.header.id) }
                s.serving[Self.key(queued.message)] = self.completingBody(queued.handler) != nil ? .completing : .starting(cancelled: false)
                return (queued, false)
            }
            if resume { self.currentOutlet?.resumeReads() }
            guard let next else { return }
            if let body = self.completingBody(next.handler) {
                self.complete(next.message, body)  // on the event loop: a job of its own
            } else {
                self.start(next.message, handler: next.handler)
            }
        }
    }

    /// Stops taking new requests (they are answered with `shuttingDown`), waits for running
    /// and queued handlers to finish and their answers to be written, then sends CLOSE and closes.
    func drain() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let idle = self.state.withLockedValue { s -> Bool in
                s.draining = true
                if (s.serving.isEmpty && s.backlog.isEmpty && self.directInFlight.load(ordering: .relaxed) == 0) || s.closed != nil { return true }
                s.idleWaiters.append(c)
                return false
            }
            if idle { c.resume() }
        }
        let reason = ParleyError(code: .shuttingDown, message: "server is shutting down")
        try? await self.control(.close(reason))
        if self.lossless != nil { self.finish(reason) }
    }
}

// MARK: - Lossless sessions

/// What happened to the link under a lossless session (feature bit 9).
public enum ParleyLinkEvent: Sendable, CustomStringConvertible {
    /// The connection broke; the session waits for a reconnect, and messages sent meanwhile
    /// are kept for it.
    case down(ParleyError)
    /// A new connection resumed the session; `reconnects` counts them for the session.
    case up(reconnects: Int)
    /// The server no longer had the session (it restarted or forgot it): what became of the
    /// requests outstanding at that moment.
    case reset(ParleySessionReset)

    public var description: String {
        switch self {
        case .down(let error): return "link down: \(error.message)"
        case .up(let n): return "link up (reconnect \(n))"
        case .reset(let r): return "session reset: \(r.reason)"
        }
    }
}

/// A request as the reset report names it.
public struct ParleyRequestRecord: Sendable, Hashable, CustomStringConvertible {
    public var id: UInt64
    public var type: String
    public var description: String { "\(self.id) \(self.type)" }
}

/// What a session reset did to the requests and one-way messages outstanding: nothing is
/// silently lost, nothing silently repeated.
public struct ParleySessionReset: Sendable {
    public var reason: String
    /// Sent, not answered and not idempotent: they may or may not have run. Their callers
    /// got `sessionReset`.
    public var mayHaveRun: [ParleyRequestRecord] = []
    /// Never sent before the reset: they certainly did not run, and were sent in the new session.
    public var notSent: [ParleyRequestRecord] = []
    /// Idempotent, sent and not answered: sent again in the new session.
    public var retried: [ParleyRequestRecord] = []
    /// One-way messages sent and not acknowledged: the server may or may not have received them.
    public var oneWayMayHaveArrived: [ParleyRequestRecord] = []
    /// One-way messages never sent: sent in the new session.
    public var oneWayNotSent: [ParleyRequestRecord] = []
}

extension ParleyConnection {
    /// The current link broke without either side ending the session (on its event loop).
    func linkLost(_ reason: ParleyError) {
        guard self.state.withLockedValue({ $0.closed == nil }) else { return }
        self.logger.debug("link down; the session waits for a reconnect", metadata: ["reason": "\(reason.message)"])
        self.linkEventsContinuation.yield(.down(reason))
        self.onLinkLost?(reason)
    }

    /// A new link resumed the session: control frames and read pauses go to it from now on.
    func linkUp(_ outlet: ParleyConnectionHandler.Outlet) {
        let (paused, count) = self.state.withLockedValue { s -> (Bool, Int) in
            s.linkUps += 1
            return (s.readsPaused, s.linkUps)
        }
        if paused { outlet.pauseReads() }
        self.logger.debug("link up; session resumed", metadata: ["reconnects": "\(count)"])
        self.linkEventsContinuation.yield(.up(reconnects: count))
    }

    /// Client side: the server did not have the session and started a new one (`token`).
    /// Sorts what the old session held: requests never sent, and idempotent ones, are sent
    /// in the new session; other requests sent and unanswered fail with `sessionReset`, and
    /// the report lists them; the old session's peer requests are abandoned (their handlers
    /// cancelled, their answers dropped). Then runs `attach` (the new link), all under the
    /// connection's lock, so that no request is sent or registered in between.
    func sessionWasReset<T>(reason: String, token: [UInt8], serverNonce: UInt64, attach: () throws(ParleyError) -> T) throws(ParleyError) -> T {
        guard let lossless = self.lossless else { return try attach() }
        var report = ParleySessionReset(reason: reason)
        var failed: [(Pending, ParleyError)] = []
        var cancelled: [Task<Void, Never>] = []
        let attached = self.state.withLockedValue { s -> Result<T, ParleyError> in
            // First: from here on, answers of the old session's requests are dropped (an
            // answer checked before this goes into the old ledger, which the reset empties).
            self.epochs.add(1, ordering: .releasing)
            let abandoned = lossless.reset(token: token, serverNonce: serverNonce)
            let unsentRequests = Set(abandoned.untransmitted.filter { $0.header.kind == .request }.map(\.header.id))
            var again: [(seq: UInt64, message: WireMessage)] = []
            for message in abandoned.untransmitted where message.header.kind == .request || message.header.kind == .oneWay {
                let record = ParleyRequestRecord(id: message.header.id, type: message.header.type)
                if message.header.kind == .oneWay {
                    report.oneWayNotSent.append(record)
                    again.append((message.header.seq, message))
                } else if s.pending[message.header.id] != nil {
                    report.notSent.append(record)
                    again.append((message.header.seq, message))
                }
            }
            for message in abandoned.transmitted where message.header.kind == .oneWay {
                report.oneWayMayHaveArrived.append(ParleyRequestRecord(id: 0, type: message.header.type))
            }
            for (id, pending) in s.pending.sorted(by: { $0.key < $1.key }) where !unsentRequests.contains(id) {
                if let message = pending.retry {
                    report.retried.append(ParleyRequestRecord(id: id, type: message.header.type))
                    again.append((message.header.seq, message))
                    continue
                }
                report.mayHaveRun.append(ParleyRequestRecord(id: id, type: pending.type ?? "request"))
                s.pending.removeValue(forKey: id)
                failed.append((pending.waiter, ParleyError(
                    code: .sessionReset,
                    message: "request \(id) may or may not have run: the server lost the session (\(reason))"
                )))
            }
            // The server's requests belong to the session it lost: their answers have no one
            // to go to, and the new session's request ids start again.
            for case .running(let task) in s.serving.values { cancelled.append(task) }
            s.serving = [:]
            s.backlog = []
            for item in again.sorted(by: { $0.seq < $1.seq }) {
                var message = item.message
                message.header.seq = 0
                message.header.ack = 0
                _ = lossless.enqueue(message)  // no link yet: `attach` transmits them
            }
            do throws(ParleyError) {
                return .success(try attach())
            } catch {
                return .failure(error)
            }
        }
        for (pending, error) in failed { pending.fail(error) }
        cancelled.forEach { $0.cancel() }
        self.logger.warning("session reset", metadata: [
            "reason": "\(reason)", "mayHaveRun": "\(report.mayHaveRun.count)", "retried": "\(report.retried.count)", "notSent": "\(report.notSent.count)",
        ])
        self.linkEventsContinuation.yield(.reset(report))
        return try attached.get()
    }
}

/// Receives a connection's events from its pipeline (on the event loop) and hands them to it.
final class ConnectionEventSink: ParleyEventSink {
    let connection: ParleyConnection

    init(_ connection: ParleyConnection) {
        self.connection = connection
    }

    func received(_ event: ConnectionEvent) {
        self.connection.received(event)
    }

    func closed(_ reason: ParleyError) {
        self.connection.finish(reason)
    }

    func linkLost(_ reason: ParleyError) {
        self.connection.linkLost(reason)
    }
}

/// The answer to a streamed request: items, then one final response.
public enum ParleyStreamEvent<Item: Sendable, Final: Sendable>: Sendable {
    case item(Item, data: ByteBuffer?)
    case final(Final)
}

/// The items and final response of a streamed request, in order.
public struct ParleyResponseStream<Item: SwiftProtobuf.Message & Sendable, Final: SwiftProtobuf.Message & Sendable>: AsyncSequence, Sendable {
    public typealias Element = ParleyStreamEvent<Item, Final>
    let base: AsyncThrowingStream<WireMessage, any Error>
    let backlog: StreamBacklog

    public struct AsyncIterator: AsyncIteratorProtocol {
        var base: AsyncThrowingStream<WireMessage, any Error>.AsyncIterator
        let backlog: StreamBacklog
        public mutating func next() async throws -> Element? {
            guard let message = try await self.base.next() else { return nil }
            self.backlog.taken(message)
            if message.header.kind == .streamItem {
                let reply = try ParleyConnection.decodeAnswer(message, as: Item.self)
                return .item(reply.message, data: reply.data)
            }
            return .final(try ParleyConnection.decodeAnswer(message, as: Final.self).message)
        }
    }

    public func makeAsyncIterator() -> AsyncIterator { AsyncIterator(base: self.base.makeAsyncIterator(), backlog: self.backlog) }
}

/// swift-metrics instruments of a connection's request handling.
struct ConnectionMetrics: Sendable {
    let handledCount: Counter
    let failed: Counter
    let latency: Metrics.Timer
    /// Whether handlers are timed: only when a metrics backend was bootstrapped before the
    /// connection was made (or one is given). Without one the durations go nowhere, and
    /// their two clock reads per request were 2.4% of the samples of a server's event loop
    /// answering 64 B echoes (session 17's profile of secure 64 B pipelined).
    let timed: Bool

    /// Instruments of `factory` (the bootstrapped backend unless a server is given its own).
    init(factory: any MetricsFactory) {
        self.handledCount = Counter(label: "parley_requests_handled_total", factory: factory)
        self.failed = Counter(label: "parley_requests_failed_total", factory: factory)
        self.latency = Metrics.Timer(label: "parley_request_duration", factory: factory)
        self.timed = !(factory is NOOPMetricsHandler)
    }

    /// When a handler starts; nil when handlers are not timed.
    func start() -> ContinuousClock.Instant? { self.timed ? .now : nil }

    func handled(since start: ContinuousClock.Instant?) {
        self.handledCount.increment()
        guard let start else { return }
        let elapsed = ContinuousClock.now - start
        self.latency.recordNanoseconds(elapsed.nanoseconds)
    }
}

extension Duration {
    /// The whole duration in nanoseconds (saturating).
    package var nanoseconds: Int64 {
        let (seconds, attoseconds) = self.components
        let (product, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        guard !overflow else { return seconds < 0 ? .min : .max }
        return product.addingReportingOverflow(attoseconds / 1_000_000_000).overflow ? .max : product + attoseconds / 1_000_000_000
    }
}

/// A DIRECT request received by a server side (docs/protocol.md 7.16): its id, the service's
/// header (segment 0 after the id) and its data (segment 1), if any. Answer it exactly once.
public struct ParleyDirectRequest: Sendable {
    public let id: UInt64
    /// Segment 0 after the 8-byte id.
    public let header: ByteBuffer
    /// Segment 1, if the frame has one: in one buffer, or (a large one) as the reads it
    /// arrived in.
    public let dataPieces: ByteBufferPieces?
    public let connection: ParleyConnection
    /// When it was received, if handlers are timed (`parley_request_duration`).
    let started: ContinuousClock.Instant?

    init(_ direct: DirectInbound, connection: ParleyConnection, started: ContinuousClock.Instant?) {
        self.started = started
        var segment0 = direct.segment0
        self.id = segment0.readInteger(endianness: .little, as: UInt64.self)!
        self.header = segment0
        self.dataPieces = direct.data
        self.connection = connection
    }

    /// Segment 1 in one buffer: gathered (copied) when it arrived in several.
    public var data: ByteBuffer? { self.dataPieces?.gathered(allocator: self.connection.channelAllocator) }

    /// A frame for the answer, with this request's id: a header of `headerLength` bytes
    /// after the id (zeroed, for `DirectFrame.setHeader`) and segment 1 of `dataLength`.
    public func answerFrame(headerLength: Int, dataLength: Int?) -> DirectFrame {
        DirectFrame(allocator: self.connection.channelAllocator, id: self.id, headerLength: headerLength, dataLength: dataLength)
    }

    /// Sends the answer (its id is set to this request's).
    public func answer(_ frame: DirectFrame) {
        var frame = frame
        frame.id = self.id
        self.connection.answerDirect(frame, started: self.started)
    }

    /// The request is malformed for its service (a header of the wrong size): the connection
    /// is closed with CLOSE `malformedPayload` naming what was wrong.
    public func violation(_ message: String) {
        self.connection.directViolation(ParleyError(code: .malformedPayload, message: message))
    }
}
