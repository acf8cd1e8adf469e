import NIOCore
import SwiftProtobuf

extension SwiftProtobuf.Message {
    /// Decodes a protobuf payload, naming the type and what was wrong on failure.
    public init(parleyPayload buffer: ByteBuffer) throws(ParleyError) {
        do {
            try self.init(serializedBytes: Array(buffer.readableBytesView))
        } catch {
            throw ParleyError(
                code: .malformedPayload,
                message: "\(Self.protoMessageName) payload of \(buffer.readableBytes) bytes does not decode: \(error)",
                cause: error
            )
        }
    }

    /// Encodes this message into a new buffer. Encoding a well-formed message cannot fail.
    public func parleyPayload(allocator: ByteBufferAllocator = ByteBufferAllocator()) -> ByteBuffer {
        let bytes: [UInt8] = (try? self.serializedBytes()) ?? []
        var buffer = allocator.buffer(capacity: bytes.count)
        buffer.writeBytes(bytes)
        return buffer
    }

    /// A one-segment frame carrying this message.
    public func frame(tag: FrameTag, allocator: ByteBufferAllocator = ByteBufferAllocator()) -> Frame {
        Frame(tag: tag, segments: [self.parleyPayload(allocator: allocator)])
    }
}
