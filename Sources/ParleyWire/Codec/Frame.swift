import NIOCore

/// A frame tag: the first byte of every preamble (docs/protocol.md, "Frame tags").
///
/// Tags 0x80...0xFF are *ignorable*: a receiver that does not know one skips the frame.
/// An unknown tag below 0x80 is a protocol error (`unknownFrameTag`).
public struct FrameTag: Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    public static let hello = FrameTag(rawValue: 0x01)
    public static let authRequest = FrameTag(rawValue: 0x02)
    public static let authBadMethod = FrameTag(rawValue: 0x03)
    public static let authReplyMore = FrameTag(rawValue: 0x04)
    public static let authRequestMore = FrameTag(rawValue: 0x05)
    public static let authDone = FrameTag(rawValue: 0x06)
    public static let clientIdent = FrameTag(rawValue: 0x07)
    public static let serverIdent = FrameTag(rawValue: 0x08)
    /// Feature bit 9: resume a lossless session (client to server, in place of CLIENT_IDENT).
    public static let sessionReconnect = FrameTag(rawValue: 0x09)
    /// Feature bit 9: the session is resumed (server to client, in place of SERVER_IDENT).
    public static let sessionResumed = FrameTag(rawValue: 0x0A)
    /// Feature bit 9: the server does not have the session (answers SESSION_RECONNECT).
    public static let sessionReset = FrameTag(rawValue: 0x0B)
    /// Feature bit 9: the highest MESSAGE seq received, sent alone when no MESSAGE carries it.
    public static let ack = FrameTag(rawValue: 0x15)
    public static let message = FrameTag(rawValue: 0x10)
    public static let notice = FrameTag(rawValue: 0x11)
    public static let keepalive = FrameTag(rawValue: 0x12)
    public static let keepaliveAck = FrameTag(rawValue: 0x13)
    public static let close = FrameTag(rawValue: 0x14)
    /// Feature bit 4: a service's lean request (client to server) or its answer, matched by
    /// the u64 id that starts segment 0 (docs/protocol.md 7.16).
    public static let direct = FrameTag(rawValue: 0x16)

    static let names: [UInt8: String] = [
        0x01: "HELLO", 0x02: "AUTH_REQUEST", 0x03: "AUTH_BAD_METHOD", 0x04: "AUTH_REPLY_MORE",
        0x05: "AUTH_REQUEST_MORE", 0x06: "AUTH_DONE", 0x07: "CLIENT_IDENT", 0x08: "SERVER_IDENT",
        0x09: "SESSION_RECONNECT", 0x0A: "SESSION_RESUMED", 0x0B: "SESSION_RESET",
        0x10: "MESSAGE", 0x11: "NOTICE", 0x12: "KEEPALIVE", 0x13: "KEEPALIVE_ACK", 0x14: "CLOSE", 0x15: "ACK", 0x16: "DIRECT",
    ]
    public static var allKnown: [FrameTag] { names.keys.sorted().map { FrameTag(rawValue: $0) } }

    public var isKnown: Bool { Self.names[self.rawValue] != nil }
    public var isIgnorable: Bool { self.rawValue >= 0x80 }
    public var description: String {
        Self.names[self.rawValue] ?? "UNKNOWN_0x" + String(self.rawValue, radix: 16, uppercase: true)
    }
}

/// Alignment hints of a frame's four segments (0 = none). A receiver may use them to place a
/// segment's bytes in suitably aligned memory; they never change what the bytes mean.
public struct SegmentAlignments: Hashable, Sendable {
    public var values: (UInt16, UInt16, UInt16, UInt16)
    public init(_ a: UInt16 = 0, _ b: UInt16 = 0, _ c: UInt16 = 0, _ d: UInt16 = 0) { self.values = (a, b, c, d) }
    public static let none = SegmentAlignments()
    public subscript(i: Int) -> UInt16 {
        get {
            switch i {
            case 0: return self.values.0
            case 1: return self.values.1
            case 2: return self.values.2
            default: return self.values.3
            }
        }
        set {
            switch i {
            case 0: self.values.0 = newValue
            case 1: self.values.1 = newValue
            case 2: self.values.2 = newValue
            default: self.values.3 = newValue
            }
        }
    }
    public static func == (l: Self, r: Self) -> Bool { l.values == r.values }
    public func hash(into h: inout Hasher) {
        h.combine(values.0); h.combine(values.1); h.combine(values.2); h.combine(values.3)
    }
}

/// One frame: a tag, flags and 1...4 segments (docs/protocol.md, "Frames").
public struct Frame: Hashable, Sendable {
    public static let preambleSize = 32
    public static let maxSegments = 4
    /// The default limit on the sum of a frame's segment lengths: 16 MiB + 64 KiB.
    public static let defaultMaxFrameSize = 16 * 1024 * 1024 + 64 * 1024
    /// The smallest frame-size limit a side may have: every side accepts frames of up to
    /// 64 KiB, so that the handshake's frames (which are sent before, or without knowing, the
    /// peer's limit) always fit.
    public static let minimumMaxFrameSize = 64 * 1024

    /// The limit a peer's HELLO `max_frame_size` sets: 0 is the default; a value below the
    /// minimum counts as the minimum.
    public static func peerLimit(announced: UInt32) -> Int {
        announced == 0 ? Self.defaultMaxFrameSize : max(Int(announced), Self.minimumMaxFrameSize)
    }

    /// The largest frame-size limit this implementation takes for itself: 1 GiB. A frame, its
    /// preamble and epilogue and what is read ahead of it must fit in one buffer (NIO's hold
    /// less than 4 GiB); a peer may announce more, which only bounds what is sent to it.
    public static let maximumOwnLimit = 1 << 30

    /// Checks a side's own limit.
    public static func validateLimit(_ limit: Int) throws(ParleyError) {
        guard (Self.minimumMaxFrameSize...Self.maximumOwnLimit).contains(limit) else {
            throw ParleyError(code: .invalidArgument, message: "frame-size limit \(limit) is outside \(Self.minimumMaxFrameSize)...\(Self.maximumOwnLimit) bytes")
        }
    }

    public var tag: FrameTag
    public var flags: UInt8
    public var segments: [ByteBuffer]
    public var alignments: SegmentAlignments

    public init(tag: FrameTag, flags: UInt8 = 0, segments: [ByteBuffer], alignments: SegmentAlignments = .none) {
        precondition((1...Frame.maxSegments).contains(segments.count), "a frame has 1...4 segments")
        self.tag = tag
        self.flags = flags
        self.segments = segments
        self.alignments = alignments
    }

    /// Sum of the segment lengths: what the frame-size limit applies to.
    public var payloadSize: Int { self.segments.reduce(0) { $0 + $1.readableBytes } }
    /// Bytes on the wire in crc mode: preamble + segments + one CRC per segment.
    public var wireSize: Int { Frame.preambleSize + self.payloadSize + 4 * self.segments.count }
}

/// Where the encoder stops copying segments into the head buffer and hands them on as-is.
public let zeroCopySegmentThreshold = 16 * 1024

extension ByteBuffer {
    /// Writes a frame's preamble (32 bytes).
    public mutating func writePreamble(_ frame: Frame) {
        let start = self.writerIndex
        self.writeMultipleIntegers(frame.tag.rawValue, frame.flags, UInt8(frame.segments.count), UInt8(0))
        for i in 0..<Frame.maxSegments {
            let length = i < frame.segments.count ? UInt32(frame.segments[i].readableBytes) : 0
            let alignment = i < frame.segments.count ? frame.alignments[i] : 0
            self.writeMultipleIntegers(length, alignment, endianness: .little)
        }
        let crc = CRC32C.checksum(self, at: start, length: 28)
        self.writeInteger(crc, endianness: .little)
    }

    /// Writes a whole frame in crc mode: preamble, segments, epilogue. Copies the segments.
    public mutating func writeFrame(_ frame: Frame) {
        self.writePreamble(frame)
        for segment in frame.segments { self.writeImmutableBuffer(segment) }
        for segment in frame.segments { self.writeInteger(CRC32C.checksum(segment), endianness: .little) }
    }
}

extension Frame {
    /// Encodes the frame for a vectored write: small segments are copied into one head buffer,
    /// segments of `zeroCopySegmentThreshold` bytes or more are passed on as they are (never
    /// copied), followed by the epilogue. Appends to `out`.
    public func encode(into out: inout [ByteBuffer], allocator: ByteBufferAllocator) {
        var head = allocator.buffer(capacity: Frame.preambleSize + 4 * self.segments.count + self.smallSegmentBytes)
        head.writePreamble(self)
        // At most 4 segments: their CRCs are kept in registers, not in a buffer of their own.
        var crcs: (UInt32, UInt32, UInt32, UInt32) = (0, 0, 0, 0)
        for (i, segment) in self.segments.enumerated() {
            let crc = CRC32C.checksum(segment)
            switch i {
            case 0: crcs.0 = crc
            case 1: crcs.1 = crc
            case 2: crcs.2 = crc
            default: crcs.3 = crc
            }
            if segment.readableBytes >= zeroCopySegmentThreshold {
                if head.readableBytes > 0 { out.append(head) }
                head = allocator.buffer(capacity: 4 * self.segments.count)
                out.append(segment)
            } else {
                head.writeImmutableBuffer(segment)
            }
        }
        for i in 0..<self.segments.count {
            switch i {
            case 0: head.writeInteger(crcs.0, endianness: .little)
            case 1: head.writeInteger(crcs.1, endianness: .little)
            case 2: head.writeInteger(crcs.2, endianness: .little)
            default: head.writeInteger(crcs.3, endianness: .little)
            }
        }
        out.append(head)
    }

    private var smallSegmentBytes: Int {
        self.segments.reduce(0) { $0 + ($1.readableBytes < zeroCopySegmentThreshold ? $1.readableBytes : 0) }
    }
}
