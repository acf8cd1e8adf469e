import CParleyCRC32C
import NIOCore

/// What a MESSAGE frame is (docs/protocol.md, "Message kinds").
public struct MessageKind: Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    /// A request; the receiver answers with RESPONSE or ERROR, possibly after STREAM_ITEMs.
    public static let request = MessageKind(rawValue: 1)
    /// The final answer to request `id`.
    public static let response = MessageKind(rawValue: 2)
    /// One item of the stream answering request `id`.
    public static let streamItem = MessageKind(rawValue: 3)
    /// The request `id` failed; payload is a `parley.v1.Status`.
    public static let error = MessageKind(rawValue: 4)
    /// The sender of request `id` no longer wants the answer.
    public static let cancel = MessageKind(rawValue: 5)
    /// A message that expects no answer (`id` is 0).
    public static let oneWay = MessageKind(rawValue: 6)

    static let names: [UInt8: String] = [1: "REQUEST", 2: "RESPONSE", 3: "STREAM_ITEM", 4: "ERROR", 5: "CANCEL", 6: "ONE_WAY"]
    public var description: String { Self.names[self.rawValue] ?? "KIND_\(self.rawValue)" }
    public var isKnown: Bool { Self.names[self.rawValue] != nil }
}

/// Segment 0 of a MESSAGE frame: 32 fixed bytes, then the payload type name.
///
/// ```
/// offset size  field
///   0     8    seq: sender's sequence number of this MESSAGE (1, 2, 3, ...)
///   8     8    ack: highest seq the sender has received from its peer (0: none)
///  16     8    id: request id (sender's id space for REQUEST; the requester's id otherwise)
///  24     1    kind (MessageKind)
///  25     1    flags (0 in version 1)
///  26     2    type-name length N
///  28     4    reserved (0)
///  32     N    type name, UTF-8: the full protobuf name of the payload in segment 1
/// ```
public struct MessageHeader: Hashable, Sendable {
    public static let fixedSize = 32
    public static let maxTypeNameLength = 1024

    public var seq: UInt64
    public var ack: UInt64
    public var id: UInt64
    public var kind: MessageKind
    public var flags: UInt8
    public var type: String

    public init(seq: UInt64 = 0, ack: UInt64 = 0, id: UInt64, kind: MessageKind, flags: UInt8 = 0, type: String) {
        self.seq = seq
        self.ack = ack
        self.id = id
        self.kind = kind
        self.flags = flags
        self.type = type
    }
}

extension ByteBuffer {
    public mutating func writeMessageHeader(_ h: MessageHeader) {
        precondition(h.type.utf8.count <= MessageHeader.maxTypeNameLength, "message type names are at most 1024 bytes")
        let nameLength = self.writerIndex + MessageHeader.fixedSize
        self.writeMultipleIntegers(h.seq, h.ack, h.id, h.kind.rawValue, h.flags, UInt16(0), UInt32(0), endianness: .little)
        let written = self.writeString(h.type)
        self.setInteger(UInt16(written), at: nameLength - 6, endianness: .little)
    }

    public mutating func readMessageHeader() throws(ParleyError) -> MessageHeader {
        var names = MessageTypeNames(capacity: 0)
        return try self.readMessageHeader(names: &names)
    }

    /// Reads a message header, taking its type name from `names` when it is one of those
    /// seen lately (no validation, no allocation: the same `String`).
    public mutating func readMessageHeader(names: inout MessageTypeNames) throws(ParleyError) -> MessageHeader {
        guard self.readableBytes >= MessageHeader.fixedSize else {
            throw ParleyError(code: .malformedPayload, message: "message header is \(self.readableBytes) bytes, needs at least 32")
        }
        let (seq, ack, id, kind, flags, nameLength, reserved) = self.readMultipleIntegers(
            endianness: .little, as: (UInt64, UInt64, UInt64, UInt8, UInt8, UInt16, UInt32).self
        )!
        guard reserved == 0 else {
            throw ParleyError(code: .malformedPayload, message: "message header bytes 28..31 (reserved) are 0x\(String(reserved, radix: 16)), must be 0")
        }
        guard Int(nameLength) <= MessageHeader.maxTypeNameLength, Int(nameLength) == self.readableBytes else {
            throw ParleyError(
                code: .malformedPayload,
                message: "message header says the type name is \(nameLength) bytes but \(self.readableBytes) remain (limit \(MessageHeader.maxTypeNameLength))"
            )
        }
        // Strictly validated, straight from the buffer: `readString` would repair bad bytes
        // into U+FFFD instead.
        let type = self.withUnsafeReadableBytes { names.name($0) }
        guard let type else {
            throw ParleyError(code: .malformedPayload, message: "message type name is not valid UTF-8")
        }
        self.moveReaderIndex(forwardBy: Int(nameLength))
        return MessageHeader(seq: seq, ack: ack, id: id, kind: MessageKind(rawValue: kind), flags: flags, type: type)
    }
}

/// The message type names a connection received lately, so that a name seen before is
/// neither validated nor allocated again: a connection's messages use a handful of types, and
/// each decoded `String` of more than 15 bytes is otherwise a heap allocation (and its
/// validation a generic call). The same `String` also makes the router's dictionary lookup
/// and the comparisons of its key cheaper. Names enter only once validated as UTF-8; at
/// `capacity` the oldest is replaced, so a peer sending ever new names costs a few
/// comparisons per message, not memory.
public struct MessageTypeNames: Sendable {
    private var names: [String] = []
    private var next = 0
    public let capacity: Int
    /// The names kept now (at most `capacity`).
    public var count: Int { self.names.count }

    public init(capacity: Int = 8) {
        self.capacity = capacity
        if capacity > 0 { self.names.reserveCapacity(capacity) }
    }

    /// The name these bytes spell, or nil when they are not valid UTF-8.
    public mutating func name(_ bytes: UnsafeRawBufferPointer) -> String? {
        for i in self.names.indices {
            let same = self.names[i].utf8.withContiguousStorageIfAvailable { known in
                known.count == bytes.count && Self.equal(UnsafeRawBufferPointer(known), bytes)
            }
            if same == true { return self.names[i] }
        }
        guard let name = Self.validate(bytes) else { return nil }
        guard self.capacity > 0 else { return name }
        if self.names.count < self.capacity {
            self.names.append(name)
        } else {
            self.names[self.next] = name
            self.next = (self.next + 1) % self.capacity
        }
        return name
    }

    /// Byte equality of two buffers of the same length, eight bytes at a time.
    static func equal(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> Bool {
        var i = 0
        let n = a.count
        while i + 8 <= n {
            if a.loadUnaligned(fromByteOffset: i, as: UInt64.self) != b.loadUnaligned(fromByteOffset: i, as: UInt64.self) { return false }
            i += 8
        }
        while i < n {
            if a[i] != b[i] { return false }
            i += 1
        }
        return true
    }

    /// Strict UTF-8 validation; ASCII (every protobuf full name) without the generic
    /// `String(validating:as:)`, which looks its encoding's metadata up at run time.
    static func validate(_ bytes: UnsafeRawBufferPointer) -> String? {
        if bytes.allSatisfy({ $0 < 0x80 }) { return String(decoding: bytes, as: UTF8.self) }
        return String(validating: bytes, as: UTF8.self)
    }
}

/// A decoded MESSAGE frame: header, payload (segment 1) and optional bulk data (segment 2).
public struct WireMessage: Hashable, Sendable {
    public var header: MessageHeader
    public var payload: ByteBuffer
    public var data: ByteBuffer?

    public init(header: MessageHeader, payload: ByteBuffer, data: ByteBuffer? = nil) {
        self.header = header
        self.payload = payload
        self.data = data
    }

    /// The frame carrying this message. The data segment is aligned to 4096 bytes when present.
    public func frame(allocator: ByteBufferAllocator) -> Frame {
        var head = allocator.buffer(capacity: MessageHeader.fixedSize + self.header.type.utf8.count)
        head.writeMessageHeader(self.header)
        if let data = self.data {
            return Frame(tag: .message, segments: [head, self.payload, data], alignments: SegmentAlignments(0, 0, 4096))
        }
        return Frame(tag: .message, segments: [head, self.payload])
    }

    /// Encodes this message as a whole MESSAGE frame for a vectored write, byte for byte what
    /// `frame(allocator:)` followed by `Frame.encode(into:allocator:)` produces, but straight
    /// into one head buffer: the header is written in place rather than into a buffer of its
    /// own, and no `Frame` or segment array is built. Payload and data segments of
    /// `zeroCopySegmentThreshold` bytes or more are passed on as they are. Appends to `out`.
    public func encodeFrame(into out: inout [ByteBuffer], allocator: ByteBufferAllocator) {
        let headerLength = MessageHeader.fixedSize + self.header.type.utf8.count
        let payloadLength = self.payload.readableBytes
        let dataLength = self.data?.readableBytes ?? 0
        let count = self.data == nil ? 2 : 3
        let payloadInline = payloadLength < zeroCopySegmentThreshold
        let dataInline = dataLength < zeroCopySegmentThreshold
        if payloadInline && dataInline {
            out.append(self.encodeSmallFrame(headerLength: headerLength, count: count, allocator: allocator))
            return
        }
        var head = allocator.buffer(capacity: Frame.preambleSize + headerLength + (payloadInline ? payloadLength : 0)
            + (dataInline ? dataLength : 0) + 4 * count)
        let headerStart = head.writerIndex + Frame.preambleSize
        head.writeWithUnsafeMutableBytes(minimumWritableBytes: Frame.preambleSize + headerLength) { out in
            self.writeHead(to: out.baseAddress!, headerLength: headerLength, count: count)
            return Frame.preambleSize + headerLength
        }
        let headerCRC = CRC32C.checksum(head, at: headerStart, length: headerLength)
        let payloadCRC = CRC32C.checksum(self.payload)
        if payloadInline {
            head.writeImmutableBuffer(self.payload)
        } else {
            out.append(head)
            out.append(self.payload)
            head = allocator.buffer(capacity: 4 * count)
        }
        var dataCRC: UInt32 = 0
        if let data = self.data {
            dataCRC = CRC32C.checksum(data)
            if dataInline {
                head.writeImmutableBuffer(data)
            } else {
                if head.readableBytes > 0 { out.append(head) }
                out.append(data)
                head = allocator.buffer(capacity: 4 * count)
            }
        }
        head.writeMultipleIntegers(headerCRC, payloadCRC, endianness: .little)
        if self.data != nil { head.writeInteger(dataCRC, endianness: .little) }
        out.append(head)
    }

    /// Encodes this message as a whole sealed MESSAGE frame (secure mode) in one buffer: the
    /// preamble and header are written in place, the payload and data copied after them, then
    /// the preamble is sealed alone and the segments as one message, in place.
    public func sealFrame(with direction: SecureDirection, allocator: ByteBufferAllocator) throws(ParleyError) -> ByteBuffer {
        try direction.ensureRoom(forClose: false)
        let headerLength = MessageHeader.fixedSize + self.header.type.utf8.count
        let count = self.data == nil ? 2 : 3
        let total = headerLength + self.payload.readableBytes + (self.data?.readableBytes ?? 0)
        let size = sealedPreambleSize + total + SecureCipher.tagSize
        var buffer = allocator.buffer(capacity: size)
        var failure: ParleyError?
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: size) { out in
            let base = out.baseAddress!
            // Preamble and header as in crc mode, 16 bytes in; then the preamble moves to the
            // front so that its tag fits between it and the header.
            self.writeHead(to: base + SecureCipher.tagSize, headerLength: headerLength, count: count)
            var preamble: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
            withUnsafeMutableBytes(of: &preamble) { $0.copyMemory(from: UnsafeRawBufferPointer(start: base + SecureCipher.tagSize, count: Frame.preambleSize)) }
            withUnsafeBytes(of: &preamble) { base.copyMemory(from: $0.baseAddress!, byteCount: Frame.preambleSize) }
            var offset = sealedPreambleSize + headerLength
            func append(_ segment: ByteBuffer) {
                let to = base + offset
                segment.withUnsafeReadableBytes { bytes in
                    if let from = bytes.baseAddress { to.copyMemory(from: from, byteCount: bytes.count) }
                }
                offset += segment.readableBytes
            }
            append(self.payload)
            do {
                try direction.seal(base, length: Frame.preambleSize)
                if let data = self.data, data.readableBytes >= zeroCopySegmentThreshold {
                    // The data segment is encrypted from its own buffer into place.
                    let inPlace = total - data.readableBytes
                    try data.withUnsafeReadableBytes { (bytes) throws(ParleyError) in
                        try direction.seal(base + sealedPreambleSize, length: inPlace, extra: bytes)
                    }
                } else {
                    if let data = self.data { append(data) }
                    try direction.seal(base + sealedPreambleSize, length: total)
                }
                return size
            } catch {
                failure = error as? ParleyError ?? ParleyError(code: .protocolViolation, message: "internal: \(error)")
                return 0
            }
        }
        if let failure { throw failure }
        return buffer
    }

    /// The whole frame in one buffer, written in one pass through a pointer: what
    /// `encodeFrame` produces when every segment is below the zero-copy threshold.
    private func encodeSmallFrame(headerLength: Int, count: Int, allocator: ByteBufferAllocator) -> ByteBuffer {
        let payloadLength = self.payload.readableBytes
        let dataLength = self.data?.readableBytes ?? 0
        let size = Frame.preambleSize + headerLength + payloadLength + dataLength + 4 * count
        var head = allocator.buffer(capacity: size)
        head.writeWithUnsafeMutableBytes(minimumWritableBytes: size) { out in
            let p = out.baseAddress!
            func put<T: FixedWidthInteger>(_ value: T, _ offset: Int) {
                p.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self)
            }
            self.writeHead(to: p, headerLength: headerLength, count: count)
            let h = Frame.preambleSize
            var offset = h + headerLength
            // Segments 1 (payload) and 2 (data), then the CRC of each segment.
            self.payload.withUnsafeReadableBytes { bytes in
                if let base = bytes.baseAddress { (p + offset).copyMemory(from: base, byteCount: bytes.count) }
            }
            offset += payloadLength
            self.data?.withUnsafeReadableBytes { bytes in
                if let base = bytes.baseAddress { (p + offset).copyMemory(from: base, byteCount: bytes.count) }
            }
            offset += dataLength
            put(parley_crc32c(0, p + h, headerLength), offset)
            put(parley_crc32c(0, p + h + headerLength, payloadLength), offset + 4)
            if count == 3 { put(parley_crc32c(0, p + h + headerLength + payloadLength, dataLength), offset + 8) }
            return size
        }
        return head
    }

    /// Writes the preamble (with its CRC) and the message header (segment 0) of this message's
    /// frame at `p`: `Frame.preambleSize + headerLength` bytes.
    private func writeHead(to p: UnsafeMutableRawPointer, headerLength: Int, count: Int) {
        precondition(headerLength - MessageHeader.fixedSize <= MessageHeader.maxTypeNameLength, "message type names are at most 1024 bytes")
        func put<T: FixedWidthInteger>(_ value: T, _ offset: Int) {
            p.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self)
        }
        // Preamble: tag, flags, count, reserved; four (length u32, alignment u16); CRC.
        put(FrameTag.message.rawValue, 0)
        put(UInt8(0), 1)
        put(UInt8(count), 2)
        put(UInt8(0), 3)
        put(UInt32(headerLength), 4)
        put(UInt16(0), 8)
        put(UInt32(self.payload.readableBytes), 10)
        put(UInt16(0), 14)
        put(UInt32(self.data?.readableBytes ?? 0), 16)
        put(UInt16(self.data == nil ? 0 : 4096), 20)
        put(UInt32(0), 22)
        put(UInt16(0), 26)
        put(parley_crc32c(0, p, 28), 28)
        // Segment 0: the message header.
        let h = Frame.preambleSize
        put(self.header.seq, h)
        put(self.header.ack, h + 8)
        put(self.header.id, h + 16)
        put(self.header.kind.rawValue, h + 24)
        put(self.header.flags, h + 25)
        put(UInt16(headerLength - MessageHeader.fixedSize), h + 26)
        put(UInt32(0), h + 28)
        var type = self.header.type
        type.withUTF8 { name in
            if let base = name.baseAddress { (p + h + MessageHeader.fixedSize).copyMemory(from: base, byteCount: name.count) }
        }
    }

    /// Parses a MESSAGE frame.
    public init(frame: Frame) throws(ParleyError) {
        var names = MessageTypeNames(capacity: 0)
        try self.init(frame: frame, names: &names)
    }

    /// Parses a MESSAGE frame, taking its type name from `names` if seen lately.
    public init(frame: Frame, names: inout MessageTypeNames) throws(ParleyError) {
        precondition(frame.tag == .message)
        guard frame.segments.count >= 2 else {
            throw ParleyError(code: .malformedPayload, message: "MESSAGE frame has \(frame.segments.count) segment(s); needs header and payload")
        }
        var head = frame.segments[0]
        self.header = try head.readMessageHeader(names: &names)
        self.payload = frame.segments[1]
        self.data = frame.segments.count >= 3 ? frame.segments[2] : nil
    }
}
