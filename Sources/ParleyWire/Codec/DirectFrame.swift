import NIOCore

/// A DIRECT frame (feature bit 4, tag 0x16; docs/protocol.md 7.16) built whole in one
/// buffer, so that it leaves in one write with nothing copied after it is made: a service
/// writes its header into segment 0 after the id, and a read's data straight into segment 1
/// (`withUnsafeMutableData`), then the connection stamps the id and finishes the frame in
/// crc mode (`finishCRC`) or seals it in place (`finishSealed`).
///
/// Layout: `[16 spare][preamble 32][segment 0: id u64 LE, header][segment 1][16 epilogue]`.
/// Segment 0 starts 48 bytes in, in both modes: in crc mode the frame is bytes 16...; in
/// secure mode the preamble moves to 0-31, its tag goes to 32-47, and the body is sealed
/// where it is (what `WireMessage.sealFrame` does for MESSAGE).
///
/// A frame has one owner at a time: the service that builds it, then the connection that
/// sends it. Its buffer lives in a box shared by copies of the struct, so that handing it
/// on (through closures, enums and the connection's commands, each of which holds a copy
/// for a while) never makes the 4 KiB of a block read be copied when the id or the CRCs are
/// written (it did, twice per read: 9% of a server's CPU). Do not keep a copy after handing
/// a frame on, nor change it from two threads.
public struct DirectFrame: Sendable {
    private final class Box: @unchecked Sendable {
        @exclusivity(unchecked) var buffer: ByteBuffer
        init(_ buffer: ByteBuffer) { self.buffer = buffer }
    }
    /// Bytes before the preamble: room for the sealed preamble's tag.
    static let spare = SecureCipher.tagSize
    /// Where segment 0 (the id) starts in `buffer`.
    static let segment0Start = DirectFrame.spare + Frame.preambleSize
    /// The alignment hint of segment 1 (bulk data).
    public static let dataAlignment: UInt16 = 4096
    /// Bytes of segment 0 the core owns: the id.
    public static let idSize = 8

    private let box: Box
    private var buffer: ByteBuffer {
        get { self.box.buffer }
        nonmutating _modify { yield &self.box.buffer }
    }
    /// Length of segment 0: the 8-byte id and the service's header.
    public let segment0Length: Int
    /// Length of segment 1, or nil for a frame of one segment.
    public let dataLength: Int?
    /// Segment 1 when it is large and was given as buffers of its own (`init(...dataPieces:)`):
    /// sent as they are after the frame's head (a vectored write, nothing copied) in crc mode.
    private let external: ByteBufferPieces?

    /// Starts a frame: preamble, the id and a zeroed header of `headerLength` bytes; segment
    /// 1 (if `dataLength` is not nil) is still to be written with `writeData` or
    /// `withUnsafeMutableData`.
    public init(allocator: ByteBufferAllocator, id: UInt64 = 0, headerLength: Int, dataLength: Int?) {
        self.init(allocator: allocator, id: id, headerLength: headerLength, dataLength: dataLength) { _ in }
    }

    /// Starts a frame whose header `writeHeader` fills in place: it gets the `headerLength`
    /// bytes after the id, zeroed, so that a service writes its fields in one go rather than
    /// one `setHeader` each. The preamble, its CRC and the id are stored in one pass over the
    /// buffer (ByteBuffer's writes, one per field, were 4% of a block server's CPU).
    public init(allocator: ByteBufferAllocator, id: UInt64 = 0, headerLength: Int, dataLength: Int?,
                writeHeader: (UnsafeMutableRawBufferPointer) -> Void) {
        self.init(allocator: allocator, id: id, headerLength: headerLength, dataLength: dataLength, external: nil, writeHeader: writeHeader)
    }

    /// The frame's head; segment 1 is `external` when given, else written into the buffer later.
    private init(allocator: ByteBufferAllocator, id: UInt64, headerLength: Int, dataLength: Int?, external: ByteBufferPieces?,
                 writeHeader: (UnsafeMutableRawBufferPointer) -> Void) {
        precondition(headerLength >= 0 && (dataLength ?? 0) >= 0)
        let segment0Length = Self.idSize + headerLength
        self.segment0Length = segment0Length
        self.dataLength = dataLength
        let head = Self.segment0Start + segment0Length
        var b = allocator.buffer(capacity: head + (external == nil ? dataLength ?? 0 : 0) + SecureCipher.tagSize)
        b.writeWithUnsafeMutableBytes(minimumWritableBytes: head) { raw in
            let base = raw.baseAddress!
            base.initializeMemory(as: UInt8.self, repeating: 0, count: head)
            // The preamble (docs/protocol.md 4.1): tag, flags 0, segment count, reserved; then
            // length u32 and alignment u16 of segments 0-3, little-endian; then its CRC.
            let preamble = base + Self.spare
            preamble.storeBytes(of: FrameTag.direct.rawValue, as: UInt8.self)
            preamble.storeBytes(of: dataLength == nil ? 1 : 2, toByteOffset: 2, as: UInt8.self)
            preamble.storeBytes(of: UInt32(segment0Length).littleEndian, toByteOffset: 4, as: UInt32.self)
            if let dataLength {
                preamble.storeBytes(of: UInt32(dataLength).littleEndian, toByteOffset: 10, as: UInt32.self)
                preamble.storeBytes(of: Self.dataAlignment.littleEndian, toByteOffset: 14, as: UInt16.self)
            }
            let crc = CRC32C.checksum(UnsafeRawBufferPointer(start: preamble, count: Frame.preambleSize - 4))
            preamble.storeBytes(of: crc.littleEndian, toByteOffset: Frame.preambleSize - 4, as: UInt32.self)
            (base + Self.segment0Start).storeBytes(of: id.littleEndian, as: UInt64.self)
            writeHeader(UnsafeMutableRawBufferPointer(start: base + Self.segment0Start + Self.idSize, count: headerLength))
            return head
        }
        self.box = Box(b)
        self.external = external
    }

    /// Starts a frame whose segment 1 is `dataPieces`: from `zeroCopySegmentThreshold` bytes
    /// on they are kept as they are and sent after the frame's head without being copied
    /// (crc mode; sealing copies them in), smaller data is copied into the frame.
    public init(allocator: ByteBufferAllocator, id: UInt64 = 0, headerLength: Int, dataPieces: ByteBufferPieces,
                writeHeader: (UnsafeMutableRawBufferPointer) -> Void) {
        let length = dataPieces.readableBytes
        guard length >= zeroCopySegmentThreshold else {
            self.init(allocator: allocator, id: id, headerLength: headerLength, dataLength: length, writeHeader: writeHeader)
            if let one = dataPieces.single {
                self.buffer.writeImmutableBuffer(one)  // no array for what nearly every write is
            } else {
                for piece in dataPieces.pieces { self.buffer.writeImmutableBuffer(piece) }
            }
            return
        }
        self.init(allocator: allocator, id: id, headerLength: headerLength, dataLength: length, external: dataPieces, writeHeader: writeHeader)
    }

    /// Segment 1 is held in buffers of its own (see `init(...dataPieces:)`): `finishCRCVectored`
    /// sends it, in crc mode.
    public var hasExternalData: Bool { self.external != nil }

    /// The id (bytes 0-7 of segment 0).
    public var id: UInt64 {
        get { self.buffer.getInteger(at: Self.segment0Start, endianness: .little, as: UInt64.self)! }
        set { self.buffer.setInteger(newValue, at: Self.segment0Start, endianness: .little) }
    }

    /// Sets an integer of the header, little-endian, `offset` bytes into segment 0 (the
    /// header starts at 8, after the id).
    public mutating func setHeader<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        precondition(offset >= Self.idSize && offset + MemoryLayout<T>.size <= self.segment0Length, "header field outside segment 0")
        self.buffer.setInteger(value, at: Self.segment0Start + offset, endianness: .little)
    }

    private var dataStart: Int { Self.segment0Start + self.segment0Length }
    /// Segment 1 has been written.
    private var isComplete: Bool { self.buffer.writerIndex == self.dataStart + (self.external == nil ? self.dataLength ?? 0 : 0) }

    /// Copies `data` into segment 1; it must be `dataLength` bytes.
    public mutating func writeData(_ data: ByteBuffer) {
        precondition(self.external == nil && data.readableBytes == self.dataLength && self.buffer.writerIndex == self.dataStart,
                     "segment 1 is \(self.dataLength ?? 0) bytes, written once")
        self.buffer.writeImmutableBuffer(data)
    }

    /// Lets `body` write segment 1 in place (a read's data read straight into the frame):
    /// it gets exactly `dataLength` bytes of uninitialised memory and must fill them all.
    public mutating func withUnsafeMutableData<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        let length = self.dataLength ?? 0
        precondition(self.external == nil && self.buffer.writerIndex == self.dataStart, "segment 1 is written once")
        var result: R?
        _ = try self.buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { raw in
            result = try body(UnsafeMutableRawBufferPointer(rebasing: raw[..<length]))
            return length
        }
        return result!
    }

    /// The bytes of segment 0 after the id, and of segment 1: for checks and tests.
    public var header: ByteBuffer { self.buffer.getSlice(at: Self.segment0Start + Self.idSize, length: self.segment0Length - Self.idSize)! }
    public var data: ByteBuffer? {
        if let external { return external.gathered() }
        return self.dataLength.map { self.buffer.getSlice(at: self.dataStart, length: $0)! }
    }

    /// The frame as a `Frame` (segments are slices of the buffer, not copies).
    public var frame: Frame {
        precondition(self.isComplete, "segment 1 not written")
        let segment0 = self.buffer.getSlice(at: Self.segment0Start, length: self.segment0Length)!
        guard let data = self.data else { return Frame(tag: .direct, segments: [segment0]) }
        return Frame(tag: .direct, segments: [segment0, data], alignments: SegmentAlignments(0, Self.dataAlignment))
    }

    /// Sum of the segment lengths (what the peer's frame-size limit applies to).
    public var payloadSize: Int { self.segment0Length + (self.dataLength ?? 0) }

    /// Finishes the frame in crc mode: appends the segments' CRCs and returns the wire bytes.
    public consuming func finishCRC() -> ByteBuffer {
        precondition(self.isComplete && self.external == nil, "segment 1 not written, or held apart (finishCRCVectored)")
        let segment0 = (start: Self.segment0Start, length: self.segment0Length)
        let data = self.dataLength.map { (start: self.dataStart, length: $0) }
        let written = self.buffer.writerIndex
        precondition(self.buffer.readerIndex == 0)
        self.buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 8) { tail in
            // The epilogue: a CRC-32C per segment, little-endian, computed where the segments
            // lie (index 0 of the buffer is `written` bytes before its tail).
            let base = UnsafeRawPointer(tail.baseAddress! - written)
            let crc0 = CRC32C.checksum(UnsafeRawBufferPointer(start: base + segment0.start, count: segment0.length))
            tail.storeBytes(of: crc0.littleEndian, as: UInt32.self)
            guard let data else { return 4 }
            let crc1 = CRC32C.checksum(UnsafeRawBufferPointer(start: base + data.start, count: data.length))
            tail.storeBytes(of: crc1.littleEndian, toByteOffset: 4, as: UInt32.self)
            return 8
        }
        self.buffer.moveReaderIndex(to: Self.spare)
        return self.buffer
    }

    /// Finishes a frame whose segment 1 is held apart (`hasExternalData`) in crc mode: the
    /// wire bytes as the frame's head (preamble and segment 0), the data's buffers as they
    /// are, and the epilogue, to be written in this order.
    public consuming func finishCRCVectored(allocator: ByteBufferAllocator) -> [ByteBuffer] {
        guard let external = self.external else { return [self.finishCRC()] }
        precondition(self.isComplete && self.buffer.readerIndex == 0)
        var epilogue = allocator.buffer(capacity: 8)
        let crc0 = CRC32C.checksum(self.buffer, at: Self.segment0Start, length: self.segment0Length)
        epilogue.writeMultipleIntegers(crc0, external.crc32c(), endianness: .little)
        self.buffer.moveReaderIndex(to: Self.spare)
        var out = [self.buffer]
        out.reserveCapacity(external.pieceCount + 2)
        out.append(contentsOf: external.pieces)
        out.append(epilogue)
        return out
    }

    /// Finishes the frame in secure mode, in place: the preamble sealed alone (moved to the
    /// front, its tag where it was), the segments sealed as one message, its tag after them.
    /// Fails with `keyExhausted` when the counter has no room left for it.
    public consuming func finishSealed(with direction: SecureDirection) throws(ParleyError) -> ByteBuffer {
        precondition(self.isComplete, "segment 1 not written")
        try direction.ensureRoom(forClose: false)
        if let external {
            // Sealed where it lies: segment 1 joins the frame's buffer first.
            for piece in external.pieces { self.buffer.writeImmutableBuffer(piece) }
        }
        let total = self.payloadSize
        self.buffer.writeRepeatingByte(0, count: SecureCipher.tagSize)
        var failure: ParleyError?
        self.buffer.withUnsafeMutableReadableBytes { raw in
            let base = raw.baseAddress!
            // The preamble moves to the front (through a copy: the two places overlap).
            var preamble: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
            withUnsafeMutableBytes(of: &preamble) { $0.copyMemory(from: UnsafeRawBufferPointer(start: base + Self.spare, count: Frame.preambleSize)) }
            withUnsafeBytes(of: &preamble) { base.copyMemory(from: $0.baseAddress!, byteCount: Frame.preambleSize) }
            do throws(ParleyError) {
                try direction.seal(base, length: Frame.preambleSize)
                try direction.seal(base + sealedPreambleSize, length: total)
            } catch {
                failure = error
            }
        }
        if let failure { throw failure }
        return self.buffer
    }
}

extension Frame {
    /// The direct id of a DIRECT frame (docs/protocol.md 7.16: bytes 0-7 of segment 0,
    /// little-endian), or nil when segment 0 is shorter than an id.
    @inlinable
    public var directID: UInt64? {
        self.segments[0].getInteger(at: self.segments[0].readerIndex, endianness: .little, as: UInt64.self)
    }
}

/// A received DIRECT frame (docs/protocol.md 7.16): its flags, segment 0 (the id, then the
/// service's header) and segment 1, if any, as one buffer or as the reads a large one arrived
/// in (`WireDecoder.decodeCollecting`).
public struct DirectInbound: Hashable, Sendable {
    public var flags: UInt8
    public var segment0: ByteBuffer
    /// Segment 1; nil for a frame of one segment.
    public var data: ByteBufferPieces?
    /// Segments after the second (a DIRECT frame may have up to four; services use two).
    public var moreSegments: [ByteBuffer]

    public init(flags: UInt8 = 0, segment0: ByteBuffer, data: ByteBufferPieces?, moreSegments: [ByteBuffer] = []) {
        self.flags = flags
        self.segment0 = segment0
        self.data = data
        self.moreSegments = moreSegments
    }

    /// A DIRECT frame decoded whole.
    public init(_ frame: Frame) {
        self.init(flags: frame.flags, segment0: frame.segments[0], data: frame.segments.count > 1 ? ByteBufferPieces(frame.segments[1]) : nil,
                  moreSegments: frame.segments.count > 2 ? Array(frame.segments[2...]) : [])
    }

    /// The direct id (bytes 0-7 of segment 0, little-endian), or nil when segment 0 is shorter.
    @inlinable
    public var id: UInt64? {
        self.segment0.getInteger(at: self.segment0.readerIndex, endianness: .little, as: UInt64.self)
    }

    /// The frame, its data gathered into one buffer (for tests and tools).
    public var frame: Frame {
        var segments = [self.segment0]
        if let data { segments.append(data.gathered()) }
        segments += self.moreSegments
        return Frame(tag: .direct, flags: self.flags, segments: segments,
                     alignments: self.data == nil ? .none : SegmentAlignments(0, DirectFrame.dataAlignment))
    }
}
