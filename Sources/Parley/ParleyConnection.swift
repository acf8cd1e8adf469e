import Logging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import ParleyNIO
import ParleyWire
import SwiftProtobuf

/// Limits that keep a connection's work bounded.
public struct ParleyConnectionLimits: Sendable {
    /// Requests this side may have outstanding; further requests wait for a free slot.
    public var maxOutstandingRequests: Int
    /// Peer requests handled at once; beyond it the connection stops reading from the socket,
    /// which pushes back on the peer through TCP flow control.
    public var maxConcurrentHandlers: Int

    /// Run the inbound loop and the handlers of peer requests on the connection's event loop
    /// (no thread hop per request; handlers must not block), or on Swift's global pool.
    public var handlersOnEventLoop: Bool

    public init(maxOutstandingRequests: Int = 1024, maxConcurrentHandlers: Int = 1024, handlersOnEventLoop: Bool = true) {
        self.maxOutstandingRequests = maxOutstandingRequests
        self.maxConcurrentHandlers = maxConcurrentHandlers
        self.handlersOnEventLoop = handlersOnEventLoop
    }

    public static var defaults: ParleyConnectionLimits { ParleyConnectionLimits() }
}

/// One established Parley connection, client or server side.
///
/// Both sides can send requests (answered by id, in any order), one-way messages and
/// streamed requests, and both serve the peer's requests with their router.
public final class ParleyConnection: Sendable {
    public let session: ParleySession
    let role: SessionStateMachine.Role
    let channel: any Channel
    let outbound: NIOAsyncChannelOutboundWriter<ConnectionCommand>
    let router: ParleyRouter
    let logger: Logger
    let limits: ParleyConnectionLimits
    let onNotice: (@Sendable (ParleyNucleus) -> Void)?
    private let state = NIOLockedValueBox(State())
    private let metrics = ConnectionMetrics()
    /// Where handlers run: the channel's event loop, or nil for the global pool.
    let executor: EventLoopTaskExecutor?

    private enum Pending {
        /// The request is being written; no one waits yet.
        case registered
        /// The answer came before the requester started waiting.
        case early(Result<WireMessage, any Error>)
        case unary(CheckedContinuation<WireMessage, any Error>)
        case stream(AsyncThrowingStream<WireMessage, any Error>.Continuation)
    }

    private final class Serving: Sendable {
        private let box = NIOLockedValueBox<(task: Task<Void, Never>?, cancelled: Bool)>((nil, false))
        func set(_ task: Task<Void, Never>) {
            let cancel = self.box.withLockedValue { v -> Bool in
                v.task = task
                return v.cancelled
            }
            if cancel { task.cancel() }
        }
        func cancel() {
            let task = self.box.withLockedValue { v -> Task<Void, Never>? in
                v.cancelled = true
                return v.task
            }
            task?.cancel()
        }
    }

    private struct State {
        var nextID: UInt64 = 1
        var pending: [UInt64: Pending] = [:]
        var outstanding = 0
        var slotWaiters: [CheckedContinuation<Void, any Error>] = []
        var serving: [UInt64: Serving] = [:]
        var handlerSlotWaiter: CheckedContinuation<Void, Never>?
        var idleWaiters: [CheckedContinuation<Void, Never>] = []
        var draining = false
        var closed: ParleyError?
    }

    init(
        session: ParleySession, role: SessionStateMachine.Role, channel: ParleyAsyncChannel,
        outbound: NIOAsyncChannelOutboundWriter<ConnectionCommand>, router: ParleyRouter,
        limits: ParleyConnectionLimits, logger: Logger, onNotice: (@Sendable (ParleyNucleus) -> Void)? = nil
    ) {
        self.session = session
        self.role = role
        self.channel = channel.channel
        self.executor = limits.handlersOnEventLoop ? EventLoopTaskExecutor(channel.channel.eventLoop) : nil
        self.outbound = outbound
        self.router = router
        self.limits = limits
        self.logger = logger
        self.onNotice = onNotice
    }

    // MARK: - Sending requests

    /// Sends a request and waits for its response.
    ///
    /// - Parameters:
    ///   - request: the request message; its type selects the peer's handler.
    ///   - data: bulk bytes for the data segment, sent without copying.
    ///   - response: the expected response type.
    /// - Throws: `ParleyError` with the peer's error code, `cancelled` if the calling task is
    ///   cancelled (the peer is told), or `connectionClosed`.
    public func call<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message & Sendable>(
        _ request: Request, data: ByteBuffer? = nil, as response: Response.Type = Response.self
    ) async throws -> ParleyReply<Response> {
        try await self.acquireSlot()
        defer { self.releaseSlot() }
        let id = try self.allocateID()
        let message = WireMessage(
            header: MessageHeader(id: id, kind: .request, type: Request.protoMessageName),
            payload: request.parleyPayload(allocator: self.channel.allocator), data: data
        )
        self.state.withLockedValue { $0.pending[id] = .registered }
        let answer: WireMessage = try await withTaskCancellationHandler {
            do {
                try await self.write(.message(message))
            } catch {
                self.state.withLockedValue { _ = $0.pending.removeValue(forKey: id) }
                throw error
            }
            return try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<WireMessage, any Error>) in
                let early = self.state.withLockedValue { s -> Result<WireMessage, any Error>? in
                    switch s.pending[id] {
                    case .registered?:
                        s.pending[id] = .unary(continuation)
                        return nil
                    case .early(let result)?:
                        s.pending.removeValue(forKey: id)
                        return result
                    default:
                        return .failure(s.closed ?? ParleyError(code: .cancelled, message: "request \(id) cancelled"))
                    }
                }
                if let early { continuation.resume(with: early) }
            }
        } onCancel: {
            self.cancelOutbound(id: id)
        }
        return try Self.decodeAnswer(answer, as: Response.self)
    }

    /// Sends a request and waits for its response message.
    public func request<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message & Sendable>(
        _ request: Request, as response: Response.Type = Response.self
    ) async throws -> Response {
        try await self.call(request, as: response).message
    }

    /// Sends a request answered by a stream of items and a final response.
    /// Stopping the iteration (or cancelling its task) cancels the request at the peer.
    public func stream<Request: SwiftProtobuf.Message, Item: SwiftProtobuf.Message & Sendable, Final: SwiftProtobuf.Message & Sendable>(
        _ request: Request, data: ByteBuffer? = nil, item: Item.Type, final: Final.Type
    ) async throws -> ParleyResponseStream<Item, Final> {
        try await self.acquireSlot()
        let id: UInt64
        do { id = try self.allocateID() } catch {
            self.releaseSlot()
            throw error
        }
        let (stream, continuation) = AsyncThrowingStream<WireMessage, any Error>.makeStream()
        continuation.onTermination = { termination in
            self.releaseSlot()
            if case .cancelled = termination { self.cancelOutbound(id: id) }
        }
        let failure = self.state.withLockedValue { s -> ParleyError? in
            if let closed = s.closed { return closed }
            s.pending[id] = .stream(continuation)
            return nil
        }
        if let failure {
            continuation.finish(throwing: failure)
            throw failure
        }
        let message = WireMessage(
            header: MessageHeader(id: id, kind: .request, type: Request.protoMessageName),
            payload: request.parleyPayload(allocator: self.channel.allocator), data: data
        )
        try await self.write(.message(message))
        return ParleyResponseStream(base: stream)
    }

    /// Sends a one-way message.
    public func send<Message: SwiftProtobuf.Message>(_ message: Message, data: ByteBuffer? = nil) async throws {
        try await self.write(.message(WireMessage(
            header: MessageHeader(id: 0, kind: .oneWay, type: Message.protoMessageName),
            payload: message.parleyPayload(allocator: self.channel.allocator), data: data
        )))
    }

    /// Sends nucleus fields to the client (server side only).
    public func sendNotice(_ nucleus: ParleyNucleus) async throws {
        precondition(self.role == .server, "only a server sends notices")
        try await self.write(.notice(nucleus.wire))
    }

    /// Closes the connection; outstanding requests fail with `connectionClosed`.
    public func close() {
        self.finish(ParleyError(code: .connectionClosed, message: "connection closed by this side"))
        self.channel.close(promise: nil)
    }

    /// Requests this side is waiting on.
    public var outstandingRequests: Int { self.state.withLockedValue { $0.pending.count } }

    // MARK: - Internals

    func write(_ command: ConnectionCommand) async throws {
        do {
            try await self.outbound.write(command)
        } catch {
            throw self.state.withLockedValue { $0.closed } ?? ParleyError(code: .connectionClosed, message: "connection closed", cause: error)
        }
    }

    func sendAnswer<M: SwiftProtobuf.Message>(kind: MessageKind, id: UInt64, message: M, data: ByteBuffer?) async throws {
        try await self.write(.message(WireMessage(
            header: MessageHeader(id: id, kind: kind, type: M.protoMessageName),
            payload: message.parleyPayload(allocator: self.channel.allocator), data: data
        )))
    }

    private func allocateID() throws -> UInt64 {
        let (id, closed) = self.state.withLockedValue { s -> (UInt64, ParleyError?) in
            defer { s.nextID &+= 1 }
            return (s.nextID, s.closed)
        }
        if let closed { throw closed }
        return id
    }

    private enum SlotOutcome { case acquired, parked, failed(ParleyError) }

    private func acquireSlot() async throws {
        let first = self.state.withLockedValue { s -> SlotOutcome in
            if let closed = s.closed { return .failed(closed) }
            guard s.outstanding < self.limits.maxOutstandingRequests else { return .parked }
            s.outstanding += 1
            return .acquired
        }
        switch first {
        case .acquired: return
        case .failed(let error): throw error
        case .parked: break
        }
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
            let outcome = self.state.withLockedValue { s -> SlotOutcome in
                if let closed = s.closed { return .failed(closed) }
                if s.outstanding < self.limits.maxOutstandingRequests {
                    s.outstanding += 1
                    return .acquired
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
    }

    private func releaseSlot() {
        let waiter = self.state.withLockedValue { s -> CheckedContinuation<Void, any Error>? in
            if !s.slotWaiters.isEmpty { return s.slotWaiters.removeFirst() }  // slot passes on
            s.outstanding -= 1
            return nil
        }
        waiter?.resume()
    }

    private func cancelOutbound(id: UInt64) {
        let pending = self.state.withLockedValue { $0.pending.removeValue(forKey: id) }
        let error = ParleyError(code: .cancelled, message: "request \(id) cancelled")
        switch pending {
        case .unary(let c)?: c.resume(throwing: error)
        case .stream(let c)?: c.finish(throwing: error)
        case .registered?, .early?, nil: break
        }
        guard self.session.features.contains(.streams) else { return }
        let cancel = WireMessage(header: MessageHeader(id: id, kind: .cancel, type: ""), payload: ByteBuffer())
        Task { try? await self.write(.message(cancel)) }
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
        let (pending, waiters, serving, handlerWaiter, idle) = self.state.withLockedValue { s in
            if s.closed == nil { s.closed = error }
            defer {
                s.pending = [:]
                s.slotWaiters = []
                s.serving = [:]
                s.handlerSlotWaiter = nil
                s.idleWaiters = []
            }
            return (s.pending, s.slotWaiters, s.serving, s.handlerSlotWaiter, s.idleWaiters)
        }
        for (_, p) in pending {
            switch p {
            case .unary(let c): c.resume(throwing: error)
            case .stream(let c): c.finish(throwing: error)
            case .registered, .early: break
            }
        }
        waiters.forEach { $0.resume(throwing: error) }
        serving.values.forEach { $0.cancel() }
        handlerWaiter?.resume()
        idle.forEach { $0.resume() }
    }

    // MARK: - Receiving

    /// Reads events until the connection ends. Returns the reason it ended.
    func runInbound(_ iterator: inout NIOAsyncChannelInboundStream<ConnectionEvent>.AsyncIterator) async -> ParleyError {
        let reason: ParleyError
        do {
            while let event = try await iterator.next() {
                switch event {
                case .message(let message):
                    await self.received(message)
                case .notice(let nucleus):
                    self.onNotice?(ParleyNucleus(nucleus))
                case .keepaliveAck, .established:
                    break
                }
            }
            reason = ParleyError(code: .connectionClosed, message: "peer closed the connection")
        } catch let error as ParleyError {
            reason = error
        } catch {
            reason = ParleyError(code: .connectionClosed, message: "connection failed: \(error)", cause: error)
        }
        self.finish(reason)
        return reason
    }

    private func received(_ message: WireMessage) async {
        let h = message.header
        switch h.kind {
        case .response, .error, .streamItem:
            self.answered(message)
        case .cancel:
            let serving = self.state.withLockedValue { $0.serving[h.id] }
            serving?.cancel()
        case .request:
            await self.serve(message)
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
            await self.spawn(id: nil, message: message, handler: handler)
        default:
            break
        }
    }

    private func answered(_ message: WireMessage) {
        let id = message.header.id
        let kind = message.header.kind
        let pending = self.state.withLockedValue { s -> Pending? in
            switch s.pending[id] {
            case .registered?:
                if kind != .streamItem {
                    s.pending[id] = .early(kind == .error ? .failure(Self.errorFromAnswer(message)) : .success(message))
                }
                return nil
            case .early?:
                return nil
            case .unary?:
                return kind == .streamItem ? nil : s.pending.removeValue(forKey: id)
            case .stream?:
                return kind == .streamItem ? s.pending[id] : s.pending.removeValue(forKey: id)
            case nil:
                return nil
            }
        }
        switch (pending, kind) {
        case (.unary(let c)?, .error):
            c.resume(throwing: Self.errorFromAnswer(message))
        case (.unary(let c)?, _):
            c.resume(returning: message)
        case (.stream(let c)?, .streamItem):
            c.yield(message)
        case (.stream(let c)?, .error):
            c.finish(throwing: Self.errorFromAnswer(message))
        case (.stream(let c)?, _):
            c.yield(message)
            c.finish()
        case (.registered?, _), (.early?, _), (nil, _):
            // An answer to a request we cancelled or never sent: discarded (docs: "Cancel").
            break
        }
    }

    static func errorFromAnswer(_ message: WireMessage) -> ParleyError {
        guard let status = try? Parley_V1_Status(parleyPayload: message.payload) else {
            return ParleyError(code: .malformedPayload, message: "ERROR answer with an unreadable status")
        }
        return ParleyError(status: status)
    }

    private func serve(_ message: WireMessage) async {
        let h = message.header
        let refusal: ParleyError? = self.state.withLockedValue { s in
            if s.draining { return ParleyError(code: .shuttingDown, message: "server is shutting down; request \(h.type) not started") }
            if s.serving[h.id] != nil { return ParleyError(code: .protocolViolation, message: "request id \(h.id) is already in use") }
            return nil
        }
        if let refusal {
            try? await self.write(.message(Self.errorAnswer(id: h.id, refusal, allocator: self.channel.allocator)))
            return
        }
        guard let handler = self.router.handlers[h.type] else {
            let error = ParleyError(code: .unknownMessageType, message: "no handler for request type \"\(h.type)\"")
            try? await self.write(.message(Self.errorAnswer(id: h.id, error, allocator: self.channel.allocator)))
            return
        }
        await self.spawn(id: h.id, message: message, handler: handler)
    }

    static func errorAnswer(id: UInt64, _ error: ParleyError, allocator: ByteBufferAllocator) -> WireMessage {
        WireMessage(
            header: MessageHeader(id: id, kind: .error, type: Parley_V1_Status.protoMessageName),
            payload: error.status.parleyPayload(allocator: allocator)
        )
    }

    /// Runs a handler in its own task, waiting first for a free handler slot (back-pressure).
    private func spawn(id: UInt64?, message: WireMessage, handler: @escaping ParleyRouter.Handler) async {
        await self.waitForHandlerSlot()
        let serving = Serving()
        let key = id ?? (UInt64.max - UInt64(message.header.seq))
        let admitted = self.state.withLockedValue { s -> Bool in
            guard s.closed == nil else { return false }
            s.serving[key] = serving
            return true
        }
        guard admitted else { return }
        let context = ParleyRequestContext(connection: self, data: message.data, requestID: id ?? 0, logger: self.logger)
        let task = Task(executorPreference: self.executor) {
            let start = ContinuousClock.now
            defer { self.metrics.handled(since: start) }
            do {
                try await handler(message, context)
            } catch {
                self.metrics.failed.increment()
                if let id {
                    let parleyError: ParleyError
                    switch error {
                    case let e as ParleyError: parleyError = e
                    case is CancellationError: parleyError = ParleyError(code: .cancelled, message: "request \(id) cancelled")
                    default: parleyError = ParleyError(code: .handlerFailed, message: "\(message.header.type) handler failed: \(error)")
                    }
                    try? await self.write(.message(Self.errorAnswer(id: id, parleyError, allocator: self.channel.allocator)))
                } else {
                    self.logger.debug("one-way handler failed", metadata: ["type": "\(message.header.type)", "error": "\(error)"])
                }
            }
            self.handlerFinished(key: key)
        }
        serving.set(task)
    }

    private func waitForHandlerSlot() async {
        let full = self.state.withLockedValue { $0.serving.count >= self.limits.maxConcurrentHandlers && $0.closed == nil }
        guard full else { return }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let parked = self.state.withLockedValue { s -> Bool in
                guard s.serving.count >= self.limits.maxConcurrentHandlers, s.closed == nil else { return false }
                s.handlerSlotWaiter = c
                return true
            }
            if !parked { c.resume() }
        }
    }

    private func handlerFinished(key: UInt64) {
        let (slot, idle) = self.state.withLockedValue { s -> (CheckedContinuation<Void, Never>?, [CheckedContinuation<Void, Never>]) in
            s.serving.removeValue(forKey: key)
            let slot = s.handlerSlotWaiter
            s.handlerSlotWaiter = nil
            var idle: [CheckedContinuation<Void, Never>] = []
            if s.serving.isEmpty {
                idle = s.idleWaiters
                s.idleWaiters = []
            }
            return (slot, idle)
        }
        slot?.resume()
        idle.forEach { $0.resume() }
    }

    /// Stops taking new requests (they are answered with `shuttingDown`), waits for running
    /// handlers to finish and their answers to be written, then sends CLOSE and closes.
    func drain() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let idle = self.state.withLockedValue { s -> Bool in
                s.draining = true
                if s.serving.isEmpty || s.closed != nil { return true }
                s.idleWaiters.append(c)
                return false
            }
            if idle { c.resume() }
        }
        try? await self.write(.close(ParleyError(code: .shuttingDown, message: "server is shutting down")))
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

    public struct AsyncIterator: AsyncIteratorProtocol {
        var base: AsyncThrowingStream<WireMessage, any Error>.AsyncIterator
        public mutating func next() async throws -> Element? {
            guard let message = try await self.base.next() else { return nil }
            if message.header.kind == .streamItem {
                let reply = try ParleyConnection.decodeAnswer(message, as: Item.self)
                return .item(reply.message, data: reply.data)
            }
            return .final(try ParleyConnection.decodeAnswer(message, as: Final.self).message)
        }
    }

    public func makeAsyncIterator() -> AsyncIterator { AsyncIterator(base: self.base.makeAsyncIterator()) }
}

/// swift-metrics instruments of a connection's request handling.
struct ConnectionMetrics: Sendable {
    let handledCount = Counter(label: "parley_requests_handled_total")
    let failed = Counter(label: "parley_requests_failed_total")
    let latency = Metrics.Timer(label: "parley_request_duration")

    func handled(since start: ContinuousClock.Instant) {
        self.handledCount.increment()
        let elapsed = ContinuousClock.now - start
        self.latency.recordNanoseconds(elapsed.components.seconds * 1_000_000_000 + elapsed.components.attoseconds / 1_000_000_000)
    }
}
