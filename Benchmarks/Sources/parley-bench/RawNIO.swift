import NIOCore
import NIOPosix
import NIOSSL

// The floor: a SwiftNIO echo of length-prefixed frames (u32 big-endian length, then the
// bytes). The server writes each frame back as it was read and flushes once per read burst;
// the client matches answers to requests in order (there are no ids: the server answers in
// order), so many tasks can have requests in flight on one connection. With a TLS context
// (the TLS echo) NIOSSL's handler comes first in both pipelines: the same echo inside TLS 1.3.

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

/// Client side: frames each request and completes the oldest waiting promise per answer.
final class RawClientHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = RawRequest
    typealias OutboundOut = ByteBuffer

    /// Below this a request is copied behind its prefix (one buffer); at or above it the
    /// prefix and the payload go out as two buffers of one vectored write (no copy).
    static let copyThreshold = 16 * 1024
    private var waiting = CircularBuffer<EventLoopPromise<ByteBuffer>>(initialCapacity: 128)

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let request = self.unwrapOutboundIn(data)
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
        let frame = self.unwrapInboundIn(data)
        guard let answer = self.waiting.popFirst() else {
            context.fireErrorCaught(BenchError("raw echo: an answer nobody asked for"))
            context.close(promise: nil)
            return
        }
        answer.succeed(frame)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.failAll(error)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.failAll(BenchError("raw echo: connection closed"))
        context.fireChannelInactive()
    }

    private func failAll(_ error: any Error) {
        while let answer = self.waiting.popFirst() { answer.fail(error) }
    }
}

final class RawClient: Sendable {
    let channel: any Channel

    init(channel: any Channel) { self.channel = channel }

    /// - Parameter tls: the client's TLS context (the TLS echo), nil for plain TCP. The TLS
    ///   handshake starts on connect; the first echo waits for it (NIOSSL holds writes).
    static func connect(port: Int, tls: NIOSSLContext? = nil) async throws -> RawClient {
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let sync = channel.pipeline.syncOperations
                    // An IP address: no SNI; the certificate's IP addresses are checked.
                    if let tls { try sync.addHandler(NIOSSLClientHandler(context: tls, serverHostname: nil)) }
                    try sync.addHandler(ByteToMessageHandler(LengthPrefixedDecoder(keepPrefix: false)))
                    try sync.addHandler(RawClientHandler())
                }
            }
            .connect(host: "127.0.0.1", port: port)
            .get()
        return RawClient(channel: channel)
    }

    /// Sends one frame and returns the frame that comes back.
    func echo(_ payload: ByteBuffer) async throws -> ByteBuffer {
        let answer = self.channel.eventLoop.makePromise(of: ByteBuffer.self)
        self.channel.writeAndFlush(RawRequest(payload: payload, answer: answer)).whenFailure { answer.fail($0) }
        return try await answer.futureResult.get()
    }

    func close() async {
        try? await self.channel.close()
    }
}
