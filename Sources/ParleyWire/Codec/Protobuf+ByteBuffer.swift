import NIOCore
import SwiftProtobuf

/// A `ByteBuffer` seen as protobuf's contiguous bytes, so that messages are encoded straight
/// into a buffer and decoded straight from one, without intermediate arrays.
struct ProtobufBytes: SwiftProtobufContiguousBytes {
    var buffer: ByteBuffer

    init(_ buffer: ByteBuffer) { self.buffer = buffer }

    init(repeating: UInt8, count: Int) {
        // An empty message (a reply with every field at its default) shares one buffer
        // instead of allocating storage for no bytes.
        self.buffer = count == 0 ? Self.empty : ByteBuffer(repeating: repeating, count: count)
    }

    private static let empty = ByteBuffer()

    init<S: Sequence>(_ sequence: S) where S.Element == UInt8 {
        self.buffer = ByteBuffer(bytes: sequence)
    }

    var count: Int { self.buffer.readableBytes }

    func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try self.buffer.withUnsafeReadableBytes(body)
    }

    mutating func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        guard self.count > 0 else {
            // No bytes to write: not the shared empty buffer (that would copy it), but a
            // zero-length view with an address (SwiftProtobuf's encoder unwraps it).
            var byte: UInt8 = 0
            return try Swift.withUnsafeMutableBytes(of: &byte) { try body(UnsafeMutableRawBufferPointer(start: $0.baseAddress, count: 0)) }
        }
        return try self.buffer.withUnsafeMutableReadableBytes(body)
    }
}

extension SwiftProtobuf.Message {
    /// Decodes a protobuf payload, naming the type and what was wrong on failure.
    public init(parleyPayload buffer: ByteBuffer) throws(ParleyError) {
        do {
            try self.init(serializedBytes: ProtobufBytes(buffer))
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
        let bytes: ProtobufBytes? = try? self.serializedBytes()
        return bytes?.buffer ?? allocator.buffer(capacity: 0)
    }

    /// A one-segment frame carrying this message.
    public func frame(tag: FrameTag, allocator: ByteBufferAllocator = ByteBufferAllocator()) -> Frame {
        Frame(tag: tag, segments: [self.parleyPayload(allocator: allocator)])
    }
}
