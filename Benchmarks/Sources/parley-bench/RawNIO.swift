import NIOCore
import NIOPosix
import NIOSSL
import Synchronization

// The floor: a SwiftNIO echo of length-prefixed frames (u32 big-endian length, then the
// bytes). The server writes each frame back as it was read and flushes once per read burst;
// the client matches answers to requests in order (there are no ids: the server answers in
// order), so many tasks can have requests in flight on one connection. With a TLS context
// (the TLS echo) NIOSSL's handler comes first in both pipelines: the same echo inside TLS 1.3.
//
// The coalescing client (system raw-coalesced, the honest floor) writes the way Parley's
// client does (`ParleyConnectionHandler`): requests made off the event loop join a queue that
// one event-loop job writes out with one flush; a flush asked for on the event loop happens
// at the end of the read burst (`channelReadComplete`) or else at the end of the event-loop
// tick. The plain client flushes every request (one event-loop job, one write each). The
// server is the same for both: it already flushes once per read burst, as Parley's does.

/// Splits the byte stream into frames. The server keeps the length prefix so that it can
/// write the frame back untouched; the client strips it.
struct LengthPrefixedDecoder: NIOSingleStepByteToMessageDecoder {
    typealias InboundOut = ByteBuffer
    static let maxFrameSize = 64 << 20
    let keepPrefix: Bool

    mutating func decode(buffer: inout ByteBuffer) throws -> ByteBuffer? {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return nil }
        guard Int(length) <= Self.maxFrameSize else { throw BenchError("raw frame of \(length) bytes is too large") }
        guard buffer.readableBytes >= 4 + Int(length) else { return nil }
        if self.keepPrefix { return buffer.readSlice(length: 4 + Int(length)) }
        buffer.moveReaderIndex(forwardBy: 4)
        return buffer.readSlice(length: Int(length))
    }

    mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> ByteBuffer? {
        try self.decode(buffer: &buffer)
    }
}

/// Server side: writes every frame back, flushes when the read burst is over.
final class RawEchoHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        context.write(data, promise: nil)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

enum RawServer {
    /// Binds on 127.0.0.1 (port 0: any free port) and returns the listening channel.
    /// - Parameter tls: the server's TLS context (the TLS echo), nil for plain TCP.
    static func start(port: Int = 0, tls: NIOSSLContext? = nil) async throws -> any Channel {
        try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    if let tls { try sync.addHandler(NIOSSLServerHandler(context: tls)) }
                    try sync.addHandler(ByteToMessageHandler(LengthPrefixedDecoder(keepPrefix: true)))
                    try sync.addHandler(RawEchoHandler())
                }
            }
            .bind(host: "127.0.0.1", port: port)
            .get()
    }
}

/// One request of the raw client: the bytes to send and where the answer goes.
struct RawRequest: Sendable {
    var payload: ByteBuffer
    var answer: EventLoopPromise<ByteBuffer>
}

/// Requests made off the event loop, waiting for the one event-loop job that writes them all
/// (the coalescing client; Parley's `ParleyConnectionHandler.CommandQueue`).
final class RawRequestQueue: Sendable {
    private let box = Mutex<(requests: [RawRequest], scheduled: Bool)>(([], false))

    /// Queues a request; true if the caller must schedule the job that drains the queue.
    func append(_ request: RawRequest) -> Bool {
        self.box.withLock { q in
            q.requests.append(request)
            defer { q.scheduled = true }
            return !q.scheduled
        }
    }

    func take(into requests: inout [RawRequest]) {
        self.box.withLock { q in
            swap(&requests, &q.requests)
            q.scheduled = false
        }
    }
}

/// Client side: frames each request and completes the oldest waiting promise per answer.
/// With `coalescing`, flushes are coalesced as Parley's connection handler coalesces them.
final class RawClientHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = RawRequest
    typealias OutboundOut = ByteBuffer

    /// Below this a request is copied behind its prefix (one buffer); at or above it the
    /// prefix and the payload go out as two buffers of one vectored write (no copy).
    static let copyThreshold = 16 * 1024
    private var waiting = CircularBuffer<EventLoopPromise<ByteBuffer>>(initialCapacity: 128)

    let coalescing: Bool
    private var context: ChannelHandlerContext?
    private var closed = false
    /// Coalescing: a flush is scheduled for the end of this event-loop tick.
    private var flushScheduled = false
    /// Coalescing: between the first `channelRead` of a read burst and its `channelReadComplete`.
    private var inReadBurst = false
    /// Coalescing: a flush was asked for during the read burst; it happens at `channelReadComplete`.
    private var flushAfterReadBurst = false
    private var drained: [RawRequest] = []

    init(coalescing: Bool = false) { self.coalescing = coalescing }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        self.send(self.unwrapOutboundIn(data), promise: promise, context: context)
    }

    func flush(context: ChannelHandlerContext) {
        guard self.coalescing else { return context.flush() }
        if self.inReadBurst {
            self.flushAfterReadBurst = true
            return
        }
        guard !self.flushScheduled else { return }
        self.flushScheduled = true
        context.eventLoop.assumeIsolated().execute {
            self.flushScheduled = false
            context.flush()
        }
    }

    /// Coalescing, on the event loop: writes every queued request, then one flush (at the end
    /// of the read burst if one is under way), as `ParleyConnectionHandler.drainQueue` does.
    func drain(_ queue: RawRequestQueue) {
        queue.take(into: &self.drained)
        defer { self.drained.removeAll(keepingCapacity: true) }
        guard let context = self.context, !self.closed else {
            for request in self.drained { request.answer.fail(BenchError("raw echo: connection closed")) }
            return
        }
        for request in self.drained { self.send(request, promise: nil, context: context) }
        if self.inReadBurst {
            self.flushAfterReadBurst = true
        } else {
            context.flush()
        }
    }

    /// Coalescing, on the event loop: one request written by a caller running on the loop.
    func writeOnLoop(_ request: RawRequest) {
        guard let context = self.context, !self.closed else {
            return request.answer.fail(BenchError("raw echo: connection closed"))
        }
        self.send(request, promise: nil, context: context)
        self.flush(context: context)
    }

    private func send(_ request: RawRequest, promise: EventLoopPromise<Void>?, context: ChannelHandlerContext) {
        self.waiting.append(request.answer)
        let length = request.payload.readableBytes
        if length < Self.copyThreshold {
            var buffer = context.channel.allocator.buffer(capacity: 4 + length)
            buffer.writeInteger(UInt32(length))
            buffer.writeImmutableBuffer(request.payload)
            context.write(self.wrapOutboundOut(buffer), promise: promise)
        } else {
            var prefix = context.channel.allocator.buffer(capacity: 4)
            prefix.writeInteger(UInt32(length))
            context.write(self.wrapOutboundOut(prefix), promise: nil)
            context.write(self.wrapOutboundOut(request.payload), promise: promise)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.inReadBurst = self.coalescing
        let frame = self.unwrapInboundIn(data)
        guard let answer = self.waiting.popFirst() else {
            context.fireErrorCaught(BenchError("raw echo: an answer nobody asked for"))
            context.close(promise: nil)
            return
        }
        answer.succeed(frame)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.inReadBurst = false
        if self.flushAfterReadBurst {
            self.flushAfterReadBurst = false
            context.flush()
        }
        context.fireChannelReadComplete()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.closed = true
        self.failAll(error)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.closed = true
        self.failAll(BenchError("raw echo: connection closed"))
        context.fireChannelInactive()
    }

    private func failAll(_ error: any Error) {
        while let answer = self.waiting.popFirst() { answer.fail(error) }
    }
}

final class RawClient: Sendable {
    let channel: any Channel
    /// The coalescing client's handler and queue (nil: flush every request).
    private let coalescer: (handler: NIOLoopBound<RawClientHandler>, queue: RawRequestQueue)?

    init(channel: any Channel) {
        self.channel = channel
        self.coalescer = nil
    }

    /// A client whose writes go through `handler` (made with `coalescing: true`) and `queue`.
    init(channel: any Channel, coalescing handler: NIOLoopBound<RawClientHandler>) {
        self.channel = channel
        self.coalescer = (handler, RawRequestQueue())
    }

    /// - Parameter tls: the client's TLS context (the TLS echo), nil for plain TCP. The TLS
    ///   handshake starts on connect; the first echo waits for it (NIOSSL holds writes).
    /// - Parameter coalescing: write as Parley's client does (queue, one job and one flush
    ///   per batch) instead of flushing every request.
    static func connect(port: Int, tls: NIOSSLContext? = nil, coalescing: Bool = false) async throws -> RawClient {
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    // An IP address: no SNI; the certificate's IP addresses are checked.
                    if let tls { try sync.addHandler(NIOSSLClientHandler(context: tls, serverHostname: nil)) }
                    try sync.addHandler(ByteToMessageHandler(LengthPrefixedDecoder(keepPrefix: false)))
                    try sync.addHandler(RawClientHandler(coalescing: coalescing))
                }
            }
            // An address, not a name: no getaddrinfo on another thread (as Parley's transport).
            .connect(to: try SocketAddress(ipAddress: "127.0.0.1", port: port))
            .get()
        guard coalescing else { return RawClient(channel: channel) }
        let handler = try await channel.eventLoop.submit {
            NIOLoopBound(try channel.pipeline.syncOperations.handler(type: RawClientHandler.self), eventLoop: channel.eventLoop)
        }.get()
        return RawClient(channel: channel, coalescing: handler)
    }

    /// Sends one frame and returns the frame that comes back.
    func echo(_ payload: ByteBuffer) async throws -> ByteBuffer {
        let answer = self.channel.eventLoop.makePromise(of: ByteBuffer.self)
        let request = RawRequest(payload: payload, answer: answer)
        if let (handler, queue) = self.coalescer {
            if handler.eventLoop.inEventLoop {
                handler.value.writeOnLoop(request)
            } else if queue.append(request) {
                handler.eventLoop.execute { handler.value.drain(queue) }
            }
        } else {
            self.channel.writeAndFlush(request).whenFailure { answer.fail($0) }
        }
        return try await answer.futureResult.get()
    }

    func close() async {
        try? await self.channel.close()
    }
}
