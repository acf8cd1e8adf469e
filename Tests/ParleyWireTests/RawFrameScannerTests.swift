import NIOCore
import ParleyTestSupport
import ParleyWire
import Testing

/// `RawFrameScanner` decides as `WireDecoder` does: every rule of docs/protocol.md 4.4 on its
/// own, and whole streams of frames, intact and mutated, decoded side by side.
@Suite struct RawFrameScannerTests {
    static let limit = 65_536

    /// A preamble with its CRC made right, whatever its fields say.
    static func preamble(tag: UInt8 = FrameTag.keepalive.rawValue, count: UInt8, lengths: [UInt32], reserved: UInt8 = 0, flags: UInt8 = 0,
                         alignments: [UInt16] = []) -> [UInt8] {
        var p = [UInt8](repeating: 0, count: 32)
        p[0] = tag
        p[1] = flags
        p[2] = count
        p[3] = reserved
        for (i, length) in lengths.enumerated() {
            withUnsafeBytes(of: length.littleEndian) { for (j, b) in $0.enumerated() { p[4 + 6 * i + j] = b } }
        }
        for (i, a) in alignments.enumerated() {
            withUnsafeBytes(of: a.littleEndian) { for (j, b) in $0.enumerated() { p[8 + 6 * i + j] = b } }
        }
        let crc = CRC32C.checksum(p[0..<28])
        withUnsafeBytes(of: crc.littleEndian) { for (j, b) in $0.enumerated() { p[28 + j] = b } }
        return p
    }

    static func scan(_ bytes: [UInt8], limit: Int = Self.limit) -> Result<RawFrameScanner.Scan, ParleyError> {
        bytes.withUnsafeBytes { raw in Result { () throws(ParleyError) in try RawFrameScanner.scan(raw, maxFrameSize: limit) } }
    }

    static func encoded(_ frame: Frame) -> [UInt8] {
        var out: [ByteBuffer] = []
        frame.encode(into: &out, allocator: ByteBufferAllocator())
        return out.flatMap { Array($0.readableBytesView) }
    }

    @Test func aWholeFrameIsFoundWithItsSegments() throws {
        let frame = Frame(tag: .direct, segments: [ByteBuffer(bytes: Array(0..<32)), ByteBuffer(bytes: [UInt8](repeating: 7, count: 4096))],
                          alignments: SegmentAlignments(0, 4096))
        let bytes = Self.encoded(frame) + [1, 2, 3]  // the next frame's first bytes
        guard case .success(.frame(let found)) = Self.scan(bytes) else { Issue.record("no frame: \(Self.scan(bytes))"); return }
        #expect(found.tag == .direct && found.segmentCount == 2 && found.size == 32 + 32 + 4096 + 8)
        #expect(found.offset(0) == 32 && found.length(0) == 32 && found.offset(1) == 64 && found.length(1) == 4096)
        #expect(Array(bytes[found.offset(1)..<(found.offset(1) + found.length(1))]) == [UInt8](repeating: 7, count: 4096))
    }

    @Test func itAsksForWhatIsMissing() {
        let bytes = Self.encoded(Frame(tag: .keepalive, segments: [ByteBuffer(bytes: [1, 2, 3, 4, 5, 6, 7, 8])]))
        #expect(Self.scan([]) == .success(.needMore(32)))
        #expect(Self.scan(Array(bytes.prefix(31))) == .success(.needMore(1)))
        // The preamble is checked as soon as it is there: the body is then awaited.
        #expect(Self.scan(Array(bytes.prefix(32))) == .success(.needMore(12)))
        #expect(Self.scan(Array(bytes.prefix(43))) == .success(.needMore(1)))
    }

    @Test func everyRuleOfTheReceiverIsChecked() {
        func code(_ bytes: [UInt8], limit: Int = Self.limit) -> ParleyError.Code? {
            if case .failure(let e) = Self.scan(bytes, limit: limit) { return e.code }
            return nil
        }
        var good = Self.preamble(count: 1, lengths: [8])
        #expect(code(good + [UInt8](repeating: 0, count: 12)) == .badSegmentCRC)
        good[5] ^= 1  // a length changed after the CRC was made
        #expect(code(good) == .badPreambleCRC)
        #expect(code(Self.preamble(count: 0, lengths: [])) == .protocolViolation)
        #expect(code(Self.preamble(count: 5, lengths: [1])) == .protocolViolation)
        #expect(code(Self.preamble(count: 1, lengths: [1], reserved: 1)) == .protocolViolation)
        #expect(code(Self.preamble(count: 1, lengths: [1, 1])) == .protocolViolation, "a descriptor after the segments")
        #expect(code(Self.preamble(count: 1, lengths: [1], alignments: [0, 8])) == .protocolViolation, "an alignment after the segments")
        // Too large is refused from the preamble alone, before any byte of the body.
        #expect(code(Self.preamble(count: 2, lengths: [40_000, 30_000])) == .frameTooLarge)
        #expect(code(Self.preamble(count: 1, lengths: [100]), limit: 99) == .frameTooLarge)
        #expect(Self.scan(Self.preamble(count: 1, lengths: [100]), limit: 100) == .success(.needMore(104)))
        // Segment 1's CRC wrong, segment 0's right.
        var direct = Self.encoded(Frame(tag: .direct, segments: [ByteBuffer(bytes: [1, 2]), ByteBuffer(bytes: [3, 4, 5])]))
        direct[direct.count - 1] ^= 0x40
        guard case .failure(let e) = Self.scan(direct) else { Issue.record("a bad CRC of segment 1 passed"); return }
        #expect(e.code == .badSegmentCRC && e.message.contains("segment 1"))
    }

    /// Streams of random frames, intact and mutated, through both decoders: the same frames
    /// (tag, flags, segment bytes) in the same order, then the same error, or both waiting.
    @Test func itDecidesAsTheWireDecoderDoes() throws {
        var rng = SplitMix(seed: 58)
        let rounds = 3_000
        var frames = 0, errors = 0
        for round in 0..<rounds {
            var stream: [UInt8] = []
            for _ in 0..<(1 + Int(rng.next() % 4)) {
                let count = 1 + Int(rng.next() % 4)
                let segments = (0..<count).map { _ in
                    let length = rng.next() % 8 == 0 ? Int(rng.next() % 20_000) : Int(rng.next() % 64)
                    return ByteBuffer(bytes: (0..<length).map { _ in UInt8(truncatingIfNeeded: rng.next()) })
                }
                let tag = [FrameTag.direct, .keepalive, .message, FrameTag(rawValue: UInt8(truncatingIfNeeded: rng.next()))][Int(rng.next() % 4)]
                stream += Self.encoded(Frame(tag: tag, flags: rng.next() % 5 == 0 ? 1 : 0, segments: segments))
            }
            if round % 4 != 0, !stream.isEmpty {
                switch rng.next() % 3 {
                case 0: stream[Int(rng.next() % UInt64(stream.count))] ^= UInt8(1) << UInt8(rng.next() % 8)
                case 1: stream = Array(stream.prefix(Int(rng.next() % UInt64(stream.count))))
                default: stream[Int(rng.next() % UInt64(min(stream.count, 40)))] = UInt8(truncatingIfNeeded: rng.next())
                }
            }
            let limit = rng.next() % 3 == 0 ? 65_536 : 1 << 20

            var decoder = WireDecoder(maxFrameSize: limit, expectBanner: false)
            var buffer = ByteBuffer(bytes: stream)
            var expected: [Frame] = []
            var expectedError: ParleyError?
            do {
                while let item = try decoder.decode(buffer: &buffer) {
                    guard case .frame(let f) = item else { Issue.record("a banner without one expected"); return }
                    expected.append(f)
                }
            } catch {
                expectedError = error
            }

            var found: [Frame] = []
            var foundError: ParleyError?
            var at = 0
            scanning: while true {
                switch Self.scan(Array(stream[at...]), limit: limit) {
                case .success(.needMore(let n)):
                    #expect(n > 0)
                    break scanning
                case .success(.frame(let f)):
                    let segments = (0..<f.segmentCount).map { i in ByteBuffer(bytes: stream[(at + f.offset(i))..<(at + f.offset(i) + f.length(i))]) }
                    found.append(Frame(tag: f.tag, flags: f.flags, segments: segments))
                    at += f.size
                case .failure(let e):
                    foundError = e
                    break scanning
                }
            }
            #expect(found.count == expected.count, "round \(round): \(found.count) frames against \(expected.count)")
            for (a, b) in zip(found, expected) {
                #expect(a.tag == b.tag && a.flags == b.flags && a.segments == b.segments, "round \(round): a frame differs")
            }
            #expect(foundError?.code == expectedError?.code && foundError?.message == expectedError?.message,
                    "round \(round): \(String(describing: foundError)) against \(String(describing: expectedError))")
            frames += found.count
            errors += foundError == nil ? 0 : 1
        }
        // Both outcomes were exercised, not only one.
        #expect(frames > rounds / 2 && errors > rounds / 4, "\(frames) frames, \(errors) errors")
    }
}
