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
    public var session: ParleySession { self.connection.session }
}

/// Sends the items of a streamed response.
public struct ParleyStreamWriter<Item: SwiftProtobuf.Message & Sendable>: Sendable {
    let connection: ParleyConnection
    let requestID: UInt64

    /// Sends one item. Throws `CancellationError` once the requester has cancelled.
    public func send(_ item: Item, data: ByteBuffer? = nil) async throws {
        try Task.checkCancellation()
        try await self.connection.sendAnswer(kind: .streamItem, id: self.requestID, message: item, data: data)
    }
}

/// The handlers of one side of a connection, one per request message type.
///
/// The type name of a request's payload (its full protobuf name) selects the handler.
/// A request with no handler is answered with `unknownMessageType`.
public struct ParleyRouter: Sendable {
    typealias Handler = @Sendable (WireMessage, ParleyRequestContext) async throws -> Void
    var handlers: [String: Handler] = [:]
    var oneWayHandlers: [String: Handler] = [:]

    public init() {}

    /// Registers a request/response handler.
    public mutating func on<Request: SwiftProtobuf.Message & Sendable, Response: SwiftProtobuf.Message & Sendable>(
        _ request: Request.Type,
        _ body: @escaping @Sendable (Request, ParleyRequestContext) async throws -> Response
    ) {
        self.onWithData(request) { req, ctx in ParleyReply(try await body(req, ctx)) }
    }

    /// Registers a handler whose reply may carry bulk bytes in the data segment.
    public mutating func onWithData<Request: SwiftProtobuf.Message & Sendable, Response: SwiftProtobuf.Message & Sendable>(
        _ request: Request.Type,
        _ body: @escaping @Sendable (Request, ParleyRequestContext) async throws -> ParleyReply<Response>
    ) {
        self.handlers[Request.protoMessageName] = { message, ctx in
            let req = try Request(parleyPayload: message.payload)
            let reply = try await body(req, ctx)
            try await ctx.connection.sendAnswer(kind: .response, id: ctx.requestID, message: reply.message, data: reply.data)
        }
    }

    /// Registers a handler that answers with a stream of items ending in a final response.
    public mutating func onStream<Request: SwiftProtobuf.Message & Sendable, Item: SwiftProtobuf.Message & Sendable, Final: SwiftProtobuf.Message & Sendable>(
        _ request: Request.Type, item: Item.Type,
        _ body: @escaping @Sendable (Request, ParleyStreamWriter<Item>, ParleyRequestContext) async throws -> Final
    ) {
        self.handlers[Request.protoMessageName] = { message, ctx in
            let req = try Request(parleyPayload: message.payload)
            let writer = ParleyStreamWriter<Item>(connection: ctx.connection, requestID: ctx.requestID)
            let final = try await body(req, writer, ctx)
            try await ctx.connection.sendAnswer(kind: .response, id: ctx.requestID, message: final, data: nil)
        }
    }

    /// Registers a handler for one-way messages (no answer).
    public mutating func onMessage<Message: SwiftProtobuf.Message & Sendable>(
        _ message: Message.Type, _ body: @escaping @Sendable (Message, ParleyRequestContext) async throws -> Void
    ) {
        self.oneWayHandlers[Message.protoMessageName] = { wire, ctx in
            try await body(try Message(parleyPayload: wire.payload), ctx)
        }
    }
}
