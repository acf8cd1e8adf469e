import Foundation
import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// Copies the raw bytes of a connection, one file per direction, for `parley decode`.
/// Sits at the head of the pipeline, so it sees exactly what crosses the socket.
public final class CaptureHandler: ChannelDuplexHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = ByteBuffer
    public typealias OutboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    private var inbound: FileHandle?
    private var outbound: FileHandle?
    private let paths: (inbound: String?, outbound: String?)

    /// - Parameters:
    ///   - inboundPath: file to receive the bytes read from the peer (truncated first).
    ///   - outboundPath: file to receive the bytes written to the peer (truncated first).
    public init(inboundPath: String?, outboundPath: String?) throws {
        // Opened in place, not created afresh: FileManager.createFile writes a new file and
        // renames it over the path, which replaced a device such as /dev/full (as root) or a
        // FIFO with a regular file.
        func openCapture(_ path: String?) throws -> FileHandle? {
            guard let path else { return nil }
            // O_NONBLOCK: a FIFO without a reader fails at once (ENXIO) instead of blocking
            // the event loop; cleared for the writes.
            let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NONBLOCK, 0o644)
            guard fd >= 0 else { throw WriteFailed(path: path, reason: String(cString: strerror(errno))) }
            let flags = fcntl(fd, F_GETFL)
            guard flags >= 0, fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) == 0 else {
                let reason = String(cString: strerror(errno))
                Glibc.close(fd)
                throw WriteFailed(path: path, reason: reason)
            }
            return FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        }
        self.inbound = try openCapture(inboundPath)
        self.outbound = try openCapture(outboundPath)
        self.paths = (inboundPath, outboundPath)
    }

    /// A capture that cannot be written (disk full, /dev/full) ends the capture and the
    /// connection with an error naming the file, rather than the process.
    public struct WriteFailed: Error, CustomStringConvertible {
        public var path: String
        public var reason: String
        public var description: String { "cannot write the capture file \(self.path): \(self.reason)" }
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if let file = self.inbound {
            do {
                try file.write(contentsOf: Data(self.unwrapInboundIn(data).readableBytesView))
            } catch {
                self.failed(context: context, path: self.paths.inbound ?? "", error)
                return
            }
        }
        context.fireChannelRead(data)
    }

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if let file = self.outbound {
            do {
                try file.write(contentsOf: Data(self.unwrapOutboundIn(data).readableBytesView))
            } catch {
                self.failed(context: context, path: self.paths.outbound ?? "", error)
                promise?.fail(WriteFailed(path: self.paths.outbound ?? "", reason: "\(error.localizedDescription)"))
                return
            }
        }
        context.write(data, promise: promise)
    }

    private func failed(context: ChannelHandlerContext, path: String, _ error: any Error) {
        try? self.inbound?.close()
        try? self.outbound?.close()
        self.inbound = nil
        self.outbound = nil
        context.fireErrorCaught(WriteFailed(path: path, reason: "\(error.localizedDescription)"))
        context.close(promise: nil)
    }

    public func channelInactive(context: ChannelHandlerContext) {
        try? self.inbound?.close()
        try? self.outbound?.close()
        context.fireChannelInactive()
    }
}
