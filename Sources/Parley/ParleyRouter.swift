import Logging
import NIOCore
import ParleyWire
import SwiftProtobuf

/// A reply to a request: a message and, optionally, bulk bytes in the data segment.
public struct ParleyReply<Message: SwiftProtobuf.Message & Sendable>: Sendable {
    public var message: Message
    public var data: ByteBuffer?

    public init(_ message: Message, data: ByteBuffer? = nil) {
        self.message = message
        self.data = data
    }
}

/// What a handler knows about the request it is answering.
public struct ParleyRequestContext: Sendable {
    /// The connection the request came in on: use it to send requests back to the peer.
    public let connection: ParleyConnection
    /// Bulk bytes that came in the request's data segment.
    public let data: ByteBuffer?
    public let requestID: UInt64
    public var logger: Logger
    /// Lossless sessions: which session of the connection the request came in (a session
    /// reset starts another); answers to a session that was reset are dropped.
    var epoch: UInt64 = 0
    public var session: ParleySession { self.connection.session }
}

/// Sends the items of a streamed response.
public struct ParleyStreamWriter<Item: SwiftProtobuf.Message & Sendable>: Sendable {
    let connection: ParleyConnection
    let requestID: UInt64
    var epoch: UInt64 = 0

    /// Sends one item. Throws `CancellationError` once the requester has cancelled.
    public func send(_ item: Item, data: ByteBuffer? = nil) async throws {
        try Task.checkCancellation()
        guard self.connection.isCurrent(epoch: self.epoch) else { throw CancellationError() }
        try await self.connection.write(self.connection.answerMessage(kind: .streamItem, id: self.requestID, message: item, data: data))
    }
}

/// The handlers of one side of a connection, one per request message type.
///
/// The type name of a request's payload (its full protobuf name) selects the handler.
/// A request with no handler is answered with `unknownMessageType`.
///
/// A handler is either asynchronous (its closure may `await`) or synchronous (it cannot):
/// Swift picks the synchronous registration for a closure that does not `await`. With
/// `ParleyConnectionLimits.handlersOnEventLoop` (the default), a synchronous handler runs
/// right where its request was decoded, on the event loop, with no task created for it, and
/// must therefore not block; an asynchronous one runs in a task of its own, which starts on
/// the event loop and runs there until it first suspends.
public struct ParleyRouter: Sendable {
    typealias AsyncHandler = @Sendable (WireMessage, ParleyRequestContext) async throws -> Void
    typealias SyncHandler = @Sendable (WireMessage, ParleyRequestContext) throws -> Void
    /// Returns at once and calls its last argument exactly once, from any thread, when the
    /// request has been answered (success) or failed (failure: answered with ERROR for it).
    typealias CompletingHandler = @Sendable (WireMessage, ParleyRequestContext, @escaping @Sendable (Result<Void, any Error>) -> Void) -> Void

    enum Handler: Sendable {
        case async(AsyncHandler)
        case sync(SyncHandler)
        case completing(CompletingHandler)

        /// Runs the handler, whichever kind it is.
        func run(_ message: WireMessage, _ context: ParleyRequestContext) async throws {
            switch self {
            case .async(let body): try await body(message, context)
            case .sync(let body): try body(message, context)
            case .completing(let body):
                try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
                    body(message, context) { c.resume(with: $0) }
                }
            }
        }
    }

    var handlers: [String: Handler] = [:]
    var oneWayHandlers: [String: Handler] = [:]
    /// Capability each message type needs, by type name.
    var requirements: [String: String] = [:]
    /// Capability needed by message types without a requirement of their own.
    var defaultRequirement: String?

    public init() {}

    /// Requires `capability` of the authenticated entity for requests and one-way messages of
    /// these types: others are refused with `permissionDenied` before any handler runs.
    public mutating func require(_ capability: String, for types: any SwiftProtobuf.Message.Type...) {
        for type in types { self.requirements[type.protoMessageName] = capability }
    }

    /// Requires `capability` for every message type that has no requirement of its own.
    public mutating func requireByDefault(_ capability: String) {
        self.defaultRequirement = capability
    }

    /// The capability a message of this type name needs, if any.
    public func requirement(for typeName: String) -> String? {
        self.requirements[typeName] ?? self.defaultRequirement
    }

    /// Registers a request/response handler.
    public mutating func on<Request: SwiftProtobuf.Message & Sendable, Response: SwiftProtobuf.Message & Sendable>(
        _ request: Request.Type,
        _ body: @escaping @Sendable (Request, ParleyRequestContext) async throws -> Response
    ) {
        self.onWithData(request) { req, ctx in ParleyReply(try await body(req, ctx)) }
    }

    /// Registers a request/response handler that answers without suspending (see the type's
    /// documentation: on the event loop it runs inline and must not block).
    public mutating func on<Request: SwiftProtobuf.Message & Sendable, Response: SwiftProtobuf.Message & Sendable>(
        _ request: Request.Type,
        _ body: @escaping @Sendable (Request, ParleyRequestContext) throws -> Response
    ) {
        self.onWithData(request) { req, ctx in ParleyReply(try body(req, ctx)) }
    }

    /// Registers a handler whose reply may carry bulk bytes in the data segment.
    public mutating func onWithData<Request: SwiftProtobuf.Message & Sendable, Response: SwiftProtobuf.Message & Sendable>(
        _ request: Request.Type,
        _ body: @escaping @Sendable (Request, ParleyRequestContext) async throws -> ParleyReply<Response>
    ) {
        self.handlers[Request.protoMessageName] = .async { message, ctx in
            let req = try Request(parleyPayload: message.payload)
            let reply = try await body(req, ctx)
            try ctx.connection.answer(kind: .response, id: ctx.requestID, message: reply.message, data: reply.data, epoch: ctx.epoch)
        }
    }

    /// Registers a handler whose reply may carry bulk bytes in the data segment, and which
    /// answers without suspending (on the event loop it runs inline and must not block).
    public mutating func onWithData<Request: SwiftProtobuf.Message & Sendable, Response: SwiftProtobuf.Message & Sendable>(
        _ request: Request.Type,
        _ body: @escaping @Sendable (Request, ParleyRequestContext) throws -> ParleyReply<Response>
    ) {
        self.handlers[Request.protoMessageName] = .sync { message, ctx in
            let req = try Request(parleyPayload: message.payload)
            let reply = try body(req, ctx)
            try ctx.connection.answer(kind: .response, id: ctx.requestID, message: reply.message, data: reply.data, epoch: ctx.epoch)
        }
    }

    /// Registers a handler that returns at once and answers later by calling `respond` exactly
    /// once, from any thread: for work handed to threads or event loops of its own (the block
    /// server's storage IO) without a task per request. With `handlersOnEventLoop` (the
    /// default) it is called on the event loop, right where the request was decoded, and must
    /// not block; it holds a handler slot until it responds. A failure is answered with ERROR,
    /// as a throwing handler's error is.
    public mutating func onWithData<Request: SwiftProtobuf.Message & Sendable, Response: SwiftProtobuf.Message & Sendable>(
        _ request: Request.Type,
        completing body: @escaping @Sendable (Request, ParleyRequestContext, _ respond: @escaping @Sendable (Result<ParleyReply<Response>, any Error>) -> Void) -> Void
    ) {
        self.handlers[Request.protoMessageName] = .completing { message, ctx, done in
            let req: Request
            do {
                req = try Request(parleyPayload: message.payload)
            } catch {
                done(.failure(error))
                return
            }
            body(req, ctx) { result in
                done(result.flatMap { reply in
                    Result { () throws(ParleyError) in
                        try ctx.connection.answer(kind: .response, id: ctx.requestID, message: reply.message, data: reply.data, epoch: ctx.epoch)
                    }.mapError { $0 as any Error }
                })
            }
        }
    }

    /// Registers a handler that answers with a stream of items ending in a final response.
    public mutating func onStream<Request: SwiftProtobuf.Message & Sendable, Item: SwiftProtobuf.Message & Sendable, Final: SwiftProtobuf.Message & Sendable>(
        _ request: Request.Type, item: Item.Type,
        _ body: @escaping @Sendable (Request, ParleyStreamWriter<Item>, ParleyRequestContext) async throws -> Final
    ) {
        self.handlers[Request.protoMessageName] = .async { message, ctx in
            let req = try Request(parleyPayload: message.payload)
            let writer = ParleyStreamWriter<Item>(connection: ctx.connection, requestID: ctx.requestID, epoch: ctx.epoch)
            let final = try await body(req, writer, ctx)
            try ctx.connection.answer(kind: .response, id: ctx.requestID, message: final, data: nil, epoch: ctx.epoch)
        }
    }

    /// Registers a handler for one-way messages (no answer).
    public mutating func onMessage<Message: SwiftProtobuf.Message & Sendable>(
        _ message: Message.Type, _ body: @escaping @Sendable (Message, ParleyRequestContext) async throws -> Void
    ) {
        self.oneWayHandlers[Message.protoMessageName] = .async { wire, ctx in
            try await body(try Message(parleyPayload: wire.payload), ctx)
        }
    }

    /// Registers a handler for one-way messages that does not suspend (on the event loop it
    /// runs inline and must not block).
    public mutating func onMessage<Message: SwiftProtobuf.Message & Sendable>(
        _ message: Message.Type, _ body: @escaping @Sendable (Message, ParleyRequestContext) throws -> Void
    ) {
        self.oneWayHandlers[Message.protoMessageName] = .sync { wire, ctx in
            try body(try Message(parleyPayload: wire.payload), ctx)
        }
    }
}
