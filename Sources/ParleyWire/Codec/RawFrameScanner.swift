/// A crc-mode frame found in bytes a caller holds, with every check of docs/protocol.md 4.4
/// done: for a data path that reads a socket with plain system calls into a buffer of its
/// own (the map's data lane, docs/proposals/map-data-lane.md) and must decide exactly as
/// `WireDecoder` does (the same checks, in the same order, with the same errors).
public struct RawFrame: Sendable, Equatable {
    public var tag: FrameTag
    public var flags: UInt8
    /// 1...4.
    public var segmentCount: Int
    /// The segment lengths; 0 from `segmentCount` on.
    public var lengths: (Int, Int, Int, Int)
    /// The frame's bytes on the wire: preamble, segments, epilogue.
    public var size: Int

    public static func == (a: RawFrame, b: RawFrame) -> Bool {
        a.tag == b.tag && a.flags == b.flags && a.segmentCount == b.segmentCount && a.size == b.size
            && a.lengths.0 == b.lengths.0 && a.lengths.1 == b.lengths.1 && a.lengths.2 == b.lengths.2 && a.lengths.3 == b.lengths.3
    }

    /// Segment `i`'s length.
    public func length(_ i: Int) -> Int {
        switch i {
        case 0: return self.lengths.0
        case 1: return self.lengths.1
        case 2: return self.lengths.2
        default: return self.lengths.3
        }
    }

    /// Segment `i`'s offset from the frame's first byte (`i < segmentCount`).
    public func offset(_ i: Int) -> Int {
        var at = Frame.preambleSize
        for j in 0..<i { at += self.length(j) }
        return at
    }
}

public enum RawFrameScanner {
    public enum Scan: Sendable, Equatable {
        /// At least this many more bytes are needed before the frame can be checked further.
        case needMore(Int)
        /// A whole frame starts at the first byte, `RawFrame.size` bytes long.
        case frame(RawFrame)
    }

    /// Looks at the frame at the start of `bytes` (crc mode, after the banner): waits for the
    /// preamble, checks its CRC, shape and size (before any segment byte is waited for),
    /// then waits for the segments and epilogue and checks the segment CRCs. An error is
    /// fatal to the connection (R-4.4-5): nothing after it can be read.
    public static func scan(_ bytes: UnsafeRawBufferPointer, maxFrameSize: Int) throws(ParleyError) -> Scan {
        guard bytes.count >= Frame.preambleSize else { return .needMore(Frame.preambleSize - bytes.count) }
        let preamble = try WireDecoder.checkPreamble(UnsafeRawBufferPointer(rebasing: bytes[0..<Frame.preambleSize]), maxFrameSize: maxFrameSize)
        let size = Frame.preambleSize + preamble.bodySize
        guard bytes.count >= size else { return .needMore(size - bytes.count) }
        let body = UnsafeRawBufferPointer(rebasing: bytes[Frame.preambleSize..<size])
        var offset = 0
        for i in 0..<preamble.count {
            try WireDecoder.checkSegmentCRC(body, preamble: preamble, segment: i, at: offset)
            offset += preamble.length(i)
        }
        return .frame(RawFrame(
            tag: preamble.tag, flags: preamble.flags, segmentCount: preamble.count,
            lengths: (preamble.length(0), preamble.length(1), preamble.length(2), preamble.length(3)), size: size
        ))
    }
}
