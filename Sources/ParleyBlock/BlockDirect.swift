import NIOCore
import Parley


/// The block protocol's DIRECT headers (docs/protocol.md 17.9): what follows the core's
/// 8-byte id in segment 0 of a DIRECT frame, little-endian. Pure codec.
///
/// Request, segment 0 = 32 bytes: id u64 (0-7), operation u8 (8, `IoOperation`), flags u8
/// (9, bit 0 FUA), reserved u16 (10), device_id u32 (12), offset u64 (16), length u32 (24),
/// reserved u32 (28); segment 1 carries a write's data. Answer, segment 0 = 16 bytes: id,
/// status u32 (8, `BlockStatus`), reserved u32 (12); segment 1 carries a successful read's
/// data (exactly `length` bytes, also when that is 0).
public enum BlockDirect {
    /// Header bytes after the id: a request's and an answer's.
    public static let requestHeaderLength = 24
    public static let answerHeaderLength = 8
    /// Segment 0 of an answer: the id and its header.
    public static let answerSegment0Length = DirectFrame.idSize + answerHeaderLength

    public struct Request: Equatable, Sendable {
        public var operation: UInt8
        public var flags: UInt8
        public var deviceID: UInt32
        public var offset: UInt64
        public var length: UInt32
        /// The reserved bytes (10-11 and 28-31), which must be 0.
        public var reserved: UInt64 = 0

        public init(operation: UInt8, flags: UInt8, deviceID: UInt32, offset: UInt64, length: UInt32) {
            self.operation = operation
            self.flags = flags
            self.deviceID = deviceID
            self.offset = offset
            self.length = length
        }

        public struct Malformed: Error, Equatable {
            public var message: String
        }

        /// Reads a request's header (segment 0 after the id). Fails only on its size: every
        /// value of its fields is answered, with a status when it is wrong.
        public static func decode(_ header: ByteBuffer) -> Result<Request, Malformed> {
            guard header.readableBytes == BlockDirect.requestHeaderLength else {
                return .failure(Malformed(message: "a block DIRECT request's segment 0 is \(DirectFrame.idSize + BlockDirect.requestHeaderLength) bytes, got \(DirectFrame.idSize + header.readableBytes)"))
            }
            var h = header
            let (op, flags, reserved0, device, offset, length, reserved1) = h.readMultipleIntegers(
                endianness: .little, as: (UInt8, UInt8, UInt16, UInt32, UInt64, UInt32, UInt32).self)!
            var r = Request(operation: op, flags: flags, deviceID: device, offset: offset, length: length)
            r.reserved = UInt64(reserved0) | UInt64(reserved1) << 16
            return .success(r)
        }

        /// A request frame with this header and a write's data copied into segment 1.
        public func frame(allocator: ByteBufferAllocator, data: ByteBuffer?) -> DirectFrame {
            var frame = DirectFrame(allocator: allocator, headerLength: BlockDirect.requestHeaderLength, dataLength: data?.readableBytes) { self.writeHeader(into: $0) }
            if let data { frame.writeData(data) }
            return frame
        }

        /// A request frame with this header and a write's data as segment 1: copied into the
        /// frame when small, sent from its own buffers when large (`DirectFrame`).
        public func frame(allocator: ByteBufferAllocator, data: ByteBufferPieces) -> DirectFrame {
            DirectFrame(allocator: allocator, headerLength: BlockDirect.requestHeaderLength, dataPieces: data) { self.writeHeader(into: $0) }
        }

        private func writeHeader(into h: UnsafeMutableRawBufferPointer) {
            // Offsets in segment 0 less the id's 8 bytes.
            h.storeBytes(of: self.operation, toByteOffset: 0, as: UInt8.self)
            h.storeBytes(of: self.flags, toByteOffset: 1, as: UInt8.self)
            h.storeBytes(of: UInt16(truncatingIfNeeded: self.reserved).littleEndian, toByteOffset: 2, as: UInt16.self)
            h.storeBytes(of: self.deviceID.littleEndian, toByteOffset: 4, as: UInt32.self)
            h.storeBytes(of: self.offset.littleEndian, toByteOffset: 8, as: UInt64.self)
            h.storeBytes(of: self.length.littleEndian, toByteOffset: 16, as: UInt32.self)
            h.storeBytes(of: UInt32(truncatingIfNeeded: self.reserved >> 16).littleEndian, toByteOffset: 20, as: UInt32.self)
        }
    }

    /// Writes an answer's status (the frame's header is otherwise zero).
    public static func setStatus(_ status: Parley_Block_V1_BlockStatus, in frame: inout DirectFrame) {
        frame.setHeader(UInt32(truncatingIfNeeded: status.rawValue), at: 8)
    }

    /// An answer as a client reads it.
    public struct Answer: Equatable, Sendable {
        public var status: Parley_Block_V1_BlockStatus
        /// A read's data: one buffer, or (a large read) the reads it arrived in.
        public var data: ByteBufferPieces?

        /// Reads an answer (segment 0 starts with the id). A segment 0 that is not 16 bytes,
        /// or reserved bytes that are not 0, fail: the server broke the protocol.
        public static func decode(_ frame: DirectInbound) -> Result<Answer, Request.Malformed> {
            let segment0 = frame.segment0
            guard segment0.readableBytes == BlockDirect.answerSegment0Length,
                  let (_, status, reserved) = segment0.getMultipleIntegers(at: segment0.readerIndex, endianness: .little, as: (UInt64, UInt32, UInt32).self)
            else {
                return .failure(Request.Malformed(message: "a block DIRECT answer's segment 0 is \(BlockDirect.answerSegment0Length) bytes, got \(segment0.readableBytes)"))
            }
            guard reserved == 0 else {
                return .failure(Request.Malformed(message: "reserved bytes of a block DIRECT answer are not 0"))
            }
            return .success(Answer(status: Parley_Block_V1_BlockStatus(rawValue: Int(status)) ?? .UNRECOGNIZED(Int(status)),
                                   data: frame.data))
        }
    }
}
