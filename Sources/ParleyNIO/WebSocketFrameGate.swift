import NIOCore
import NIOWebSocket

/// The lengths of the WebSocket frames in a byte stream (RFC 6455 5.2), read from their
/// headers as the bytes go by, without buffering a frame: sans-IO, for `WebSocketFrameGate`.
///
/// NIO's frame decoder buffers a whole frame, up to its `maxFrameSize`, before handing any of
/// it on, and that limit is fixed when the upgrade adds the decoder. A server that takes 16 MiB
/// frames from an authenticated peer would otherwise buffer 16 MiB for anyone who connects;
/// the gate looks at each frame's declared length first. (No maintained package does this:
/// NIO's decoder has no limit that changes after the upgrade.)
struct WebSocketFrameLengths {
    /// Bytes of the current frame's header seen so far (at most 14: 2, 8 of length, 4 of mask key).
    private var header: [UInt8] = []
    /// Payload bytes of the current frame still to go by.
    private var remaining: UInt64 = 0
    /// Where, in the bytes of the last `scan`, the header of the frame it refused began (0 if
    /// it began in earlier bytes).
    private(set) var refusedHeaderStart = 0

    /// Scans `bytes`; returns the payload length of the first frame whose header says it is
    /// longer than `limit`, or nil if every frame header in them (so far) is within it.
    mutating func scan(_ bytes: UnsafeRawBufferPointer, limit: Int) -> UInt64? {
        var i = 0
        var start = 0  // where the current header began here (0: in earlier bytes)
        while i < bytes.count {
            if self.remaining > 0 {
                let skip = Int(min(self.remaining, UInt64(bytes.count - i)))
                i += skip
                self.remaining -= UInt64(skip)
                continue
            }
            if self.header.isEmpty { start = i }
            self.header.append(bytes[i])
            i += 1
            guard let needed = Self.headerLength(self.header), self.header.count == needed else { continue }
            let length = Self.payloadLength(self.header)
            self.header.removeAll(keepingCapacity: true)
            if length > UInt64(limit) {
                self.refusedHeaderStart = start
                return length
            }
            self.remaining = length
        }
        return nil
    }

    /// The whole header's length once its first two bytes are known.
    private static func headerLength(_ h: [UInt8]) -> Int? {
        guard h.count >= 2 else { return nil }
        let masked = h[1] & 0x80 != 0 ? 4 : 0
        switch h[1] & 0x7F {
        case 126: return 4 + masked
        case 127: return 10 + masked
        default: return 2 + masked
        }
    }

    private static func payloadLength(_ h: [UInt8]) -> UInt64 {
        switch h[1] & 0x7F {
        case 126: return UInt64(h[2]) << 8 | UInt64(h[3])
        case 127: return h[2..<10].reduce(0) { $0 << 8 | UInt64($1) }
        case let n: return UInt64(n)
        }
    }
}

/// Placed before NIO's WebSocket frame decoder on a server: refuses frames longer than
/// `limit` (the Parley handshake's frame limit) until `lift()`, which the server calls once
/// the Parley handshake has completed (the decoder's own `maxFrameSize` holds from then on).
/// A frame too long fails the channel with `NIOWebSocketError.invalidFrameLength`, which the
/// WebSocket error handler answers with close code 1009 (message too big) before closing.
final class WebSocketFrameGate: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private let limit: Int
    private var lengths = WebSocketFrameLengths()
    private var refused = false
    /// The handshake has completed: everything passes (until the gate is removed).
    private var lifted = false

    init(limit: Int) { self.limit = limit }

    /// Lets everything through from now on; the server calls it once the Parley handshake
    /// has completed (and then removes the gate).
    func lift() { self.lifted = true }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !self.refused else { return }  // what follows a refused frame goes nowhere
        guard !self.lifted else { return context.fireChannelRead(data) }
        var buffer = self.unwrapInboundIn(data)
        let limit = self.limit
        guard buffer.withUnsafeReadableBytes({ self.lengths.scan($0, limit: limit) }) != nil else {
            return context.fireChannelRead(data)
        }
        // The frames before the long one go on first: they may complete the handshake
        // (CLIENT_IDENT and what follows it in the same read), which lifts the limit.
        let before = self.lengths.refusedHeaderStart
        if before > 0 { context.fireChannelRead(self.wrapInboundOut(buffer.readSlice(length: before)!)) }
        if self.lifted { return context.fireChannelRead(self.wrapInboundOut(buffer)) }
        self.refused = true
        context.fireErrorCaught(NIOWebSocketError.invalidFrameLength)
    }
}
