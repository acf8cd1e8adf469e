import NIOCore

/// What arrives on a connection: first the peer's banner, then frames.
public enum WireInbound: Hashable, Sendable {
    case banner(Banner)
    case frame(Frame)
}

/// What a side sends: its banner, then frames.
public enum WireOutbound: Hashable, Sendable {
    case banner(Banner)
    case frame(Frame)
}

/// Decodes one direction of a connection in crc mode: a banner, then frames.
///
/// Invariants:
/// - The preamble CRC is checked before any length in the preamble is acted upon.
/// - The frame-size limit is enforced right after the preamble, before any segment byte is
///   buffered.
/// - Segments are slices of the input (`readSlice`): never copied.
/// - After an error the decoder stays failed; the connection must be closed.
public struct WireDecoder: NIOSingleStepByteToMessageDecoder {
    public typealias InboundOut = WireInbound

    private enum State {
        case banner
        case preamble
        case body(Preamble)
        case failed(ParleyError)
    }

    struct Preamble {
        var tag: FrameTag
        var flags: UInt8
        /// Number of segments, 1...4.
        var count: Int
        /// Segment lengths; entries at `count` and after are 0. Inline: no array per frame.
        var lengths: (UInt32, UInt32, UInt32, UInt32)
        var alignments: SegmentAlignments
        /// The sum of the segment lengths.
        var total: Int
        var bodySize: Int { self.total + 4 * self.count }

        func length(_ i: Int) -> Int {
            switch i {
            case 0: return Int(self.lengths.0)
            case 1: return Int(self.lengths.1)
            case 2: return Int(self.lengths.2)
            default: return Int(self.lengths.3)
            }
        }
    }

    private var state: State
    public var maxFrameSize: Int

    /// - Parameters:
    ///   - maxFrameSize: largest accepted sum of segment lengths.
    ///   - expectBanner: false to decode frames only (a capture that starts after the banner).
    public init(maxFrameSize: Int = Frame.defaultMaxFrameSize, expectBanner: Bool = true) {
        self.maxFrameSize = maxFrameSize
        self.state = expectBanner ? .banner : .preamble
    }

    public mutating func decode(buffer: inout ByteBuffer) throws(ParleyError) -> WireInbound? {
        do {
            return try self.step(&buffer)
        } catch {
            self.state = .failed(error)
            throw error
        }
    }

    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws(ParleyError) -> WireInbound? {
        if let element = try self.decode(buffer: &buffer) { return element }
        guard seenEOF else { return nil }
        switch self.state {
        case .preamble where buffer.readableBytes == 0:
            return nil
        case .banner where buffer.readableBytes == 0:
            return nil
        case .failed:
            return nil
        case .banner:
            throw self.fail(ParleyError(code: .truncated, message: "connection ended inside the banner after \(buffer.readableBytes) of 32 bytes"))
        case .preamble:
            throw self.fail(ParleyError(code: .truncated, message: "connection ended inside a frame preamble after \(buffer.readableBytes) of 32 bytes"))
        case .body(let p):
            throw self.fail(ParleyError(
                code: .truncated,
                message: "connection ended inside a \(p.tag) frame: \(buffer.readableBytes) of \(p.bodySize) body bytes arrived"
            ))
        }
    }

    private mutating func fail(_ error: ParleyError) -> ParleyError {
        self.state = .failed(error)
        return error
    }

    private mutating func step(_ buffer: inout ByteBuffer) throws(ParleyError) -> WireInbound? {
        switch self.state {
        case .failed(let error):
            throw error
        case .banner:
            guard let banner = try buffer.readBanner() else { return nil }
            self.state = .preamble
            return .banner(banner)
        case .preamble:
            guard let preamble = try Self.readPreamble(&buffer, maxFrameSize: self.maxFrameSize) else { return nil }
            self.state = .body(preamble)
            return try self.step(&buffer)
        case .body(let preamble):
            guard buffer.readableBytes >= preamble.bodySize else { return nil }
            let crcStart = buffer.readerIndex + preamble.total
            var segments: [ByteBuffer] = []
            segments.reserveCapacity(preamble.count)
            for i in 0..<preamble.count {
                let length = preamble.length(i)
                let stored = buffer.getInteger(at: crcStart + 4 * i, endianness: .little, as: UInt32.self)!
                let computed = CRC32C.checksum(buffer, at: buffer.readerIndex, length: length)
                guard stored == computed else {
                    throw ParleyError(
                        code: .badSegmentCRC,
                        message: "\(preamble.tag) frame segment \(i) (\(length) bytes) CRC mismatch: computed 0x\(String(computed, radix: 16)), epilogue says 0x\(String(stored, radix: 16))"
                    )
                }
                segments.append(buffer.readSlice(length: length)!)
            }
            buffer.moveReaderIndex(forwardBy: 4 * preamble.count)
            self.state = .preamble
            return .frame(Frame(tag: preamble.tag, flags: preamble.flags, segments: segments, alignments: preamble.alignments))
        }
    }

    static func readPreamble(_ buffer: inout ByteBuffer, maxFrameSize: Int) throws(ParleyError) -> Preamble? {
        guard buffer.readableBytes >= Frame.preambleSize else { return nil }
        let start = buffer.readerIndex
        let computed = CRC32C.checksum(buffer, at: start, length: 28)
        let stored = buffer.getInteger(at: start + 28, endianness: .little, as: UInt32.self)!
        guard computed == stored else {
            let bytes = buffer.getBytes(at: start, length: 32)!
            throw ParleyError(
                code: .badPreambleCRC,
                message: "frame preamble CRC mismatch: computed 0x\(String(computed, radix: 16)), preamble says 0x\(String(stored, radix: 16)) (preamble: \(bytes.hexString))"
            )
        }
        let (tagByte, flags, count, reserved) = buffer.getMultipleIntegers(at: start, as: (UInt8, UInt8, UInt8, UInt8).self)!
        let tag = FrameTag(rawValue: tagByte)
        guard (1...Frame.maxSegments).contains(Int(count)) else {
            throw ParleyError(code: .protocolViolation, message: "\(tag) frame has \(count) segments; a frame has 1 to 4")
        }
        guard reserved == 0 else {
            throw ParleyError(code: .protocolViolation, message: "\(tag) frame preamble byte 3 (reserved) is 0x\(String(reserved, radix: 16)), must be 0")
        }
        var lengths: (UInt32, UInt32, UInt32, UInt32) = (0, 0, 0, 0)
        var alignments = SegmentAlignments.none
        var total = 0
        for i in 0..<Frame.maxSegments {
            let (length, alignment) = buffer.getMultipleIntegers(at: start + 4 + 6 * i, endianness: .little, as: (UInt32, UInt16).self)!
            if i < Int(count) {
                switch i {
                case 0: lengths.0 = length
                case 1: lengths.1 = length
                case 2: lengths.2 = length
                default: lengths.3 = length
                }
                alignments[i] = alignment
                total += Int(length)
            } else if length != 0 || alignment != 0 {
                throw ParleyError(code: .protocolViolation, message: "\(tag) frame declares \(count) segments but descriptor \(i) is not zero")
            }
        }
        guard total <= maxFrameSize else {
            throw ParleyError(
                code: .frameTooLarge,
                message: "\(tag) frame of \(total) bytes exceeds the limit of \(maxFrameSize) bytes"
            )
        }
        buffer.moveReaderIndex(forwardBy: Frame.preambleSize)
        return Preamble(tag: tag, flags: flags, count: Int(count), lengths: lengths, alignments: alignments, total: total)
    }
}
