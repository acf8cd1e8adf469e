import Foundation
import NIOCore

/// Copies the raw bytes of a connection, one file per direction, for `parley decode`.
/// Sits at the head of the pipeline, so it sees exactly what crosses the socket.
public final class CaptureHandler: ChannelDuplexHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = ByteBuffer
    public typealias OutboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    private let inbound: FileHandle?
    private let outbound: FileHandle?

    /// - Parameters:
    ///   - inboundPath: file to receive the bytes read from the peer (truncated first).
    ///   - outboundPath: file to receive the bytes written to the peer (truncated first).
    public init(inboundPath: String?, outboundPath: String?) throws {
        func open(_ path: String?) throws -> FileHandle? {
            guard let path else { return nil }
            guard FileManager.default.createFile(atPath: path, contents: nil) else {
                throw CocoaError(.fileWriteUnknown, userInfo: [NSFilePathErrorKey: path])
            }
            return FileHandle(forWritingAtPath: path)
        }
        self.inbound = try open(inboundPath)
        self.outbound = try open(outboundPath)
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if let file = self.inbound { file.write(Data(self.unwrapInboundIn(data).readableBytesView)) }
        context.fireChannelRead(data)
    }

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if let file = self.outbound { file.write(Data(self.unwrapOutboundIn(data).readableBytesView)) }
        context.write(data, promise: promise)
    }

    public func channelInactive(context: ChannelHandlerContext) {
        try? self.inbound?.close()
        try? self.outbound?.close()
        context.fireChannelInactive()
    }
}
