import NIOCore
import ParleyWire
import ParleyTestSupport
import Testing

// DIRECT frames (docs/protocol.md 7.16): the one-buffer builder against the generic frame
// codec, both modes; the session machine's rules; the server's ledger of ids in flight.

/// A DIRECT frame built with `DirectFrame`: id, a header of `header` bytes (each byte its
/// index + 1), and segment 1 holding `data`, if any.
private func built(id: UInt64, header: Int, data: [UInt8]?) -> DirectFrame {
    var f = DirectFrame(allocator: ByteBufferAllocator(), id: id, headerLength: header, dataLength: data?.count)
    for i in 0..<header { f.setHeader(UInt8(i + 1), at: 8 + i) }
    if let data { f.writeData(ByteBuffer(bytes: data)) }
    return f
}

/// The same frame as a `Frame`, built segment by segment.
private func generic(id: UInt64, header: Int, data: [UInt8]?) -> Frame {
    var s0 = ByteBuffer()
    s0.writeInteger(id, endianness: .little)
    for i in 0..<header { s0.writeInteger(UInt8(i + 1)) }
    guard let data else { return Frame(tag: .direct, segments: [s0]) }
    return Frame(tag: .direct, segments: [s0, ByteBuffer(bytes: data)], alignments: SegmentAlignments(0, DirectFrame.dataAlignment))
}

private let shapes: [(header: Int, data: [UInt8]?)] = [
    (24, nil), (8, Array(repeating: 0xab, count: 512)), (0, []), (24, (0..<20_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }),
]

@Suite struct DirectFrameTests {
    @Test func crcModeIsTheFrameCodecsBytes() throws {
        for shape in shapes {
            let ours = built(id: 0x0102_0304_0506_0708, header: shape.header, data: shape.data).finishCRC()
            #expect(ours == frameBytes(generic(id: 0x0102_0304_0506_0708, header: shape.header, data: shape.data)), "header \(shape.header), data \(shape.data?.count ?? -1)")
            // And it decodes to the frame.
            var decoder = WireDecoder(expectBanner: false)
            var bytes = ours
            guard case .frame(let decoded)? = try decoder.decode(buffer: &bytes) else { Issue.record("no frame"); continue }
            #expect(decoded == generic(id: 0x0102_0304_0506_0708, header: shape.header, data: shape.data))
        }
    }

    @Test func setIDAndAccessors() {
        var f = built(id: 1, header: 8, data: [1, 2, 3])
        f.id = 77
        #expect(f.id == 77)
        #expect(f.payloadSize == 8 + 8 + 3)
        #expect(f.header == ByteBuffer(bytes: [1, 2, 3, 4, 5, 6, 7, 8]))
        #expect(f.data == ByteBuffer(bytes: [1, 2, 3]))
        #expect(f.frame == generic(id: 77, header: 8, data: [1, 2, 3]))
    }

    @Test func dataWrittenInPlace() {
        var f = DirectFrame(allocator: ByteBufferAllocator(), id: 9, headerLength: 8, dataLength: 4096)
        for i in 0..<8 { f.setHeader(UInt8(i + 1), at: 8 + i) }
        let n = f.withUnsafeMutableData { raw -> Int in
            for i in 0..<raw.count { raw[i] = UInt8(truncatingIfNeeded: i) }
            return raw.count
        }
        #expect(n == 4096)
        #expect(f.finishCRC() == frameBytes(generic(id: 9, header: 8, data: (0..<4096).map { UInt8(truncatingIfNeeded: $0) })))
    }

    /// Sealed in place, the frame is what `Frame.seal` makes at the same counter, for both
    /// ciphers, across a key update, and it opens back to the frame.
    @Test(arguments: SecureCipher.allCases)
    func secureModeIsTheFrameCodecsBytes(cipher: SecureCipher) throws {
        let keys = SecureDirectionKeys(cipher: cipher, key: testKeys.key, iv: testKeys.iv)
        for counter: UInt64 in [0, SecureDirection.keyUpdateInterval - 1, SecureDirection.keyUpdateInterval] {
            for shape in shapes {
                let ours = try built(id: 5, header: shape.header, data: shape.data)
                    .finishSealed(with: try SecureDirection(keys: keys, sealing: true, counter: counter))
                let theirs = try sealed([generic(id: 5, header: shape.header, data: shape.data)], keys: keys, counter: counter)[0]
                #expect(ours == theirs, "\(cipher) counter \(counter) header \(shape.header)")
                var decoder = try opener(keys, counter: counter)
                var bytes = ours
                guard case .frame(let decoded)? = try decoder.decode(buffer: &bytes) else { Issue.record("no frame"); continue }
                #expect(decoded == generic(id: 5, header: shape.header, data: shape.data))
            }
        }
    }

    /// Data given in pieces: copied in below the threshold, sent from its own buffers above
    /// it; either way the bytes on the wire are the frame codec's, in both modes.
    @Test(arguments: [1, 3, 7])
    func dataInPiecesIsTheFrameCodecsBytes(cuts: Int) throws {
        for count in [0, 100, zeroCopySegmentThreshold - 1, zeroCopySegmentThreshold, 70_001] {
            let data = (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
            let step = max(1, count / cuts)
            let pieces = ByteBufferPieces(stride(from: 0, to: count, by: step).map { ByteBuffer(bytes: data[$0..<min(count, $0 + step)]) })
            func make() -> DirectFrame {
                DirectFrame(allocator: ByteBufferAllocator(), id: 42, headerLength: 8, dataPieces: pieces) { h in
                    for i in 0..<8 { h[i] = UInt8(i + 1) }
                }
            }
            let expected = generic(id: 42, header: 8, data: data)
            let f = make()
            #expect(f.hasExternalData == (count >= zeroCopySegmentThreshold), "\(count) bytes")
            #expect(f.payloadSize == 16 + count)
            #expect(f.data == ByteBuffer(bytes: data))
            #expect(f.frame == expected)
            var wire = ByteBuffer()
            for part in make().finishCRCVectored(allocator: ByteBufferAllocator()) { wire.writeImmutableBuffer(part) }
            #expect(wire == frameBytes(expected), "\(count) bytes in \(cuts) cuts")
            let keys = SecureDirectionKeys(cipher: .aes256GCM, key: testKeys.key, iv: testKeys.iv)
            let sealedOurs = try make().finishSealed(with: try SecureDirection(keys: keys, sealing: true, counter: 3))
            #expect(sealedOurs == (try sealed([expected], keys: keys, counter: 3)[0]), "sealed, \(count) bytes")
        }
    }

    @Test func piecesSliceGatherAndCRC() {
        let bytes = (0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        let cut = ByteBufferPieces([ByteBuffer(bytes: bytes[0..<10]), ByteBuffer(), ByteBuffer(bytes: bytes[10..<600]), ByteBuffer(bytes: bytes[600...])])
        #expect(cut.pieceCount == 3)
        #expect(cut.readableBytes == 1000)
        #expect(cut.single == nil)
        #expect(cut.gathered() == ByteBuffer(bytes: bytes))
        #expect(cut.crc32c() == CRC32C.checksum(bytes))
        #expect(cut == ByteBufferPieces(ByteBuffer(bytes: bytes)))
        for (offset, length) in [(0, 1000), (5, 10), (10, 590), (599, 2), (0, 0), (999, 1), (300, 600)] {
            let s = cut.slice(at: offset, length: length)
            #expect(s.gathered() == ByteBuffer(bytes: bytes[offset..<(offset + length)]), "slice \(offset)+\(length)")
        }
        var seen: [UInt8] = []
        cut.forEachBatch { (pieces, skipped) in
            #expect(skipped == seen.count)
            for p in pieces { seen += p }
        }
        #expect(seen == bytes)
        // 200 pieces: batches of 64, each knowing where it starts.
        let many = ByteBufferPieces((0..<200).map { ByteBuffer(bytes: bytes[($0 * 5)..<($0 * 5 + 5)]) })
        var starts: [Int] = []
        many.forEachBatch { (pieces, skipped) in
            starts.append(skipped)
            #expect(pieces.count <= ByteBufferPieces.batchSize)
        }
        #expect(starts == [0, 320, 640, 960])
        #expect(ByteBufferPieces([ByteBuffer(bytes: [1, 2])]).single == ByteBuffer(bytes: [1, 2]))
        #expect(ByteBufferPieces([ByteBuffer]()).readableBytes == 0)
    }

    /// What a collector keeps as slices and what it copies, under both rules.
    @Test func readPieceCollectorKeepsWhatIsWorthKeeping() {
        func read(_ n: Int, capacity: Int) -> ByteBuffer {
            var b = ByteBufferAllocator().buffer(capacity: capacity)
            b.writeRepeatingByte(UInt8(truncatingIfNeeded: n), count: n)
            return b
        }
        var pipelined = ReadPieceCollector(minimumSlice: 1024, halfTheBuffer: false)
        var strict = ReadPieceCollector(minimumSlice: 1024, halfTheBuffer: true)
        for (n, capacity) in [(4096, 128 << 10), (60_000, 64 << 10), (10, 64 << 10), (20, 64 << 10), (1023, 1023)] {
            var a = read(n, capacity: capacity), b = a
            pipelined.take(&a, missing: 1 << 20, allocator: ByteBufferAllocator())
            strict.take(&b, missing: 1 << 20, allocator: ByteBufferAllocator())
            #expect(a.readableBytes == 0 && b.readableBytes == 0, "all of a piece is taken")
        }
        let total = 4096 + 60_000 + 10 + 20 + 1023
        #expect(pipelined.count == total && strict.count == total)
        // Pipelined: the 4 KiB slice of a 128 KiB read and the 60 KB read kept, the three small
        // pieces copied into one buffer of its own (64 KiB: at most twice what it holds and
        // 64 KiB).
        func copiedAfterTheKept(_ c: ReadPieceCollector) {
            let copied = c.pieces.dropFirst(2)
            #expect(c.pieces.prefix(2).map(\.readableBytes) == [4096, 60_000])
            #expect(copied.reduce(0) { $0 + $1.readableBytes } == 10 + 20 + 1023)
            #expect(copied.count == 1, "\(copied.map(\.readableBytes))")
            let capacity: Int = copied.reduce(0) { $0 + $1.storageCapacity }
            #expect(capacity <= 2 * 1053 + 65536)
        }
        copiedAfterTheKept(pipelined)
        // Strict: the 4 KiB slice pins a 128 KiB buffer, so it is copied (with the small ones
        // after the kept 60 KB read).
        copiedAfterTheKept(strict)
        #expect(strict.pieces[0].storageCapacity < 128 << 10, "the 4 KiB slice was copied")
        #expect(pipelined.pieces[0].storageCapacity == 128 << 10, "the 4 KiB slice was kept")
        let bytes = ByteBufferPieces(strict.pieces).gathered()
        #expect(bytes == ByteBufferPieces(pipelined.pieces).gathered())
    }

    /// Copied reads just above a power of two (4,097 bytes in 64 KiB read buffers) fill
    /// buffers of 64 KiB, not one buffer per read.
    @Test func copiedReadsFillBuffersOfSixtyFourKiB() {
        var c = ReadPieceCollector(minimumSlice: 1024, halfTheBuffer: true)
        var left = 1 << 20
        while left > 0 {
            let n = min(4097, left)
            var b = ByteBufferAllocator().buffer(capacity: 64 << 10)
            b.writeRepeatingByte(7, count: n)
            left -= n
            c.take(&b, missing: left, allocator: ByteBufferAllocator())
        }
        #expect(c.count == 1 << 20)
        #expect(c.pieces.count <= 20, "\(c.pieces.count) buffers for 1 MiB")
        #expect(c.pieces.reduce(0) { $0 + $1.storageCapacity } <= 2 * (1 << 20) + (64 << 10))
    }

    @Test func sealingRefusesAnExhaustedCounter() throws {
        let sealer = try SecureDirection(keys: testKeys, sealing: true, counter: SecureDirection.lastCounter - 2)
        #expect(ParleyError.code { _ = try built(id: 1, header: 8, data: nil).finishSealed(with: sealer) } == .keyExhausted)
    }
}

@Suite struct DirectSessionTests {
    func direct(flags: UInt8 = 0, segment0: Int = 16, data: Int? = nil) -> WireInbound {
        let s0 = ByteBuffer(repeating: 1, count: segment0)
        let segments = data.map { [s0, ByteBuffer(repeating: 2, count: $0)] } ?? [s0]
        return .frame(Frame(tag: .direct, flags: flags, segments: segments))
    }

    /// [R-7.16-2]: a DIRECT frame is unexpectedFrame without bit 4 or before it was enabled.
    @Test func refusedUntilEnabled() throws {
        var without = SessionStateMachine(role: .server, features: [.streams, .keepalive])
        guard case .violation(let e) = without.received(self.direct()) else { Issue.record("violation expected"); return }
        #expect(e.code == .unexpectedFrame)
        var notEnabled = SessionStateMachine(role: .client, features: .implemented)
        guard case .violation(let f) = notEnabled.received(self.direct()) else { Issue.record("violation expected"); return }
        #expect(f.code == .unexpectedFrame && f.message.contains("before a service enabled"))
        var enabled = SessionStateMachine(role: .server, features: .implemented)
        try enabled.enableDirect()
        #expect(enabled.received(self.direct(data: 4096)) == .direct(DirectInbound(Frame(tag: .direct, segments: [ByteBuffer(repeating: 1, count: 16), ByteBuffer(repeating: 2, count: 4096)]))))
    }

    /// [R-7.16-3]: never in a lossless session, and not without bit 4.
    @Test func enablingNeedsBitFourAndNoLosslessSession() {
        var lossless = SessionStateMachine(role: .server, features: ParleyFeatures.implemented.union(.reconnect))
        #expect(ParleyError.code { try lossless.enableDirect() } == .invalidArgument)
        var old = SessionStateMachine(role: .server, features: [.streams, .keepalive, .notice, .dataSegment])
        #expect(ParleyError.code { try old.enableDirect() } == .invalidArgument)
        #expect(!old.isDirectEnabled && !lossless.isDirectEnabled)
    }

    /// [R-7.16-3]: DIRECT frames between MESSAGEs leave the numbering alone.
    @Test func directFramesAreNotNumbered() throws {
        var s = SessionStateMachine(role: .server, features: .implemented)
        try s.enableDirect()
        func message(_ seq: UInt64) -> WireInbound {
            .frame(WireMessage(header: MessageHeader(seq: seq, ack: 0, id: seq, kind: .request, type: "t"), payload: ByteBuffer()).frame(allocator: ByteBufferAllocator()))
        }
        guard case .message = s.received(message(1)) else { Issue.record("message expected"); return }
        guard case .direct = s.received(self.direct()) else { Issue.record("direct expected"); return }
        guard case .message = s.received(message(2)) else { Issue.record("seq 2 must follow seq 1 across a DIRECT frame"); return }
        #expect(s.lastReceivedSeq == 2)
        let stamped = try s.stamp(WireMessage(header: MessageHeader(id: 1, kind: .response, type: "t"), payload: ByteBuffer()))
        #expect(stamped.header.seq == 1)
    }

    /// [R-7.16-4] and R-4.9-3: flags and a segment 0 too short for the id.
    @Test func shapeViolations() throws {
        var a = SessionStateMachine(role: .server, features: .implemented)
        try a.enableDirect()
        guard case .violation(let flags) = a.received(self.direct(flags: 2)) else { Issue.record("violation expected"); return }
        #expect(flags.code == .protocolViolation)
        var b = SessionStateMachine(role: .server, features: .implemented)
        try b.enableDirect()
        guard case .violation(let short) = b.received(self.direct(segment0: 7)) else { Issue.record("violation expected"); return }
        #expect(short.code == .malformedPayload)
        var c = SessionStateMachine(role: .server, features: .implemented)
        try c.enableDirect()
        guard case .direct = c.received(self.direct(segment0: 8)) else { Issue.record("8 bytes are enough"); return }
    }

    @Test func sendersCheckEnablingAndThePeersLimit() throws {
        var s = SessionStateMachine(role: .client, features: .implemented, maxPeerFrameSize: 70_000)
        #expect(ParleyError.code { try s.checkDirect(payloadSize: 32) } == .invalidArgument)
        try s.enableDirect()
        #expect(ParleyError.code { try s.checkDirect(payloadSize: 70_000) } == nil)
        #expect(ParleyError.code { try s.checkDirect(payloadSize: 70_001) } == .frameTooLarge)
    }
}

@Suite struct DirectLedgerTests {
    /// [R-7.16-5]: an id in flight cannot be used again; [R-7.16-8]: reading pauses at the bound
    /// and resumes when an answer frees a place.
    @Test func idsPauseAndResume() {
        var l = DirectLedger(limit: 3)
        #expect(l.admit(1) == .admitted(pause: false))
        #expect(l.admit(1) == .duplicate)
        #expect(l.admit(2) == .admitted(pause: false))
        #expect(l.admit(3) == .admitted(pause: true))
        #expect(l.isPaused && l.count == 3)
        #expect(l.answered(9) == .unknown)
        #expect(l.answered(2) == .known(resume: true))
        #expect(!l.isPaused)
        #expect(l.answered(2) == .unknown, "answered twice")
        #expect(l.admit(2) == .admitted(pause: true), "an answered id may be used again")
        #expect(l.answered(1) == .known(resume: true))
        #expect(l.answered(3) == .known(resume: false))
        #expect(l.count == 1)
    }
}

/// `WireDecoder.decodeCollecting`: a large DIRECT frame cut by reads is collected as the
/// reads' slices and gives what `decode` gives of the whole frame; CRC errors and a cut
/// connection are caught as `decode` catches them.
@Suite struct DirectCollectingTests {
    /// A DIRECT frame of `dataLength` bytes of data, then a KEEPALIVE, as wire bytes.
    func stream(dataLength: Int, alignments: SegmentAlignments = SegmentAlignments(0, DirectFrame.dataAlignment))
        -> (bytes: [UInt8], direct: Frame, keepalive: Frame)
    {
        var s0 = ByteBuffer()
        s0.writeInteger(UInt64(99), endianness: .little)
        s0.writeBytes([1, 2, 3])
        let data = ByteBuffer(bytes: (0..<dataLength).map { UInt8(truncatingIfNeeded: $0 &* 17 &+ 3) })
        let direct = Frame(tag: .direct, segments: [s0, data], alignments: alignments)
        var stamp = ByteBuffer()
        stamp.writeInteger(UInt64(5), endianness: .little)
        let keepalive = Frame(tag: .keepalive, segments: [stamp])
        return (Array(frameBytes(direct).readableBytesView) + Array(frameBytes(keepalive).readableBytesView), direct, keepalive)
    }

    /// Feeds `bytes` in reads of the given sizes (cycled), each read its own buffer of
    /// `capacity` bytes, as NIO's reads are; returns what came out.
    func feed(_ bytes: [UInt8], reads: [Int], capacity: Int = 64 << 10, into decoder: inout WireDecoder) throws(ParleyError) -> [CollectedInbound] {
        var out: [CollectedInbound] = []
        var failure: ParleyError?
        bytes.withUnsafeBytes { raw in
            do throws(ParleyError) {
                _ = try _FuzzHarness.feedCollecting(raw, reads: reads, capacity: capacity, into: &decoder) { out.append($0) }
            } catch {
                failure = error
            }
        }
        if let failure { throw failure }
        return out
    }

    @Test(arguments: [[1], [7, 4093], [16 << 10], [64 << 10], [100_000], [3, 60_000, 5]])
    func cutFramesGiveTheWholeFrame(reads: [Int]) throws {
        for dataLength in [zeroCopySegmentThreshold - 1, zeroCopySegmentThreshold, 200_000] {
            let (bytes, direct, keepalive) = self.stream(dataLength: dataLength)
            var decoder = WireDecoder(expectBanner: false)
            let out = try self.feed(bytes, reads: reads, into: &decoder)
            #expect(out.count == 2, "\(dataLength) bytes in reads of \(reads)")
            // Collected exactly when the data is large and the read that completes the
            // preamble does not bring the whole frame.
            let frameLength = bytes.count - (32 + 8 + 4)
            var readEnd = 0, i = 0
            while readEnd < 32 { readEnd += reads[i % reads.count]; i += 1 }
            let collected = dataLength >= zeroCopySegmentThreshold && readEnd < frameLength
            switch out.first {
            case .direct(let d)?:
                #expect(collected, "collected though small or whole in the first read")
                #expect(d.frame == direct)
                #expect(d.data?.readableBytes == dataLength)
            case .wire(.frame(let f))?:
                // Whole in one read, or too small to collect: decoded as `decode` does.
                #expect(!collected, "\(dataLength) bytes in reads of \(reads) not collected")
                #expect(f == direct)
            default:
                Issue.record("no DIRECT frame from reads of \(reads): \(out)")
            }
            #expect(out.last == .wire(.frame(keepalive)))
            #expect(!decoder.isInsideFrame)
        }
    }

    /// A read that brings a few bytes is copied, not kept: pieces pin about what arrived.
    @Test func fewBytesPerReadAreCopied() throws {
        let (bytes, _, _) = self.stream(dataLength: 100_000)
        var decoder = WireDecoder(expectBanner: false)
        let out = try self.feed(bytes, reads: [1000], into: &decoder)
        guard case .direct(let d)? = out.first else { Issue.record("no DIRECT frame"); return }
        // 100 reads of 1,000 bytes into 64 KiB buffers: gathered in two buffers of its own.
        #expect(d.data!.pieceCount <= 3, "\(d.data!.pieces.map { ($0.readableBytes, $0.storageCapacity) })")
        let pinned = d.data!.pieces.reduce(0) { $0 + $1.storageCapacity }
        #expect(pinned <= 2 * 100_000 + (64 << 10), "\(pinned) bytes pinned")
    }

    /// A peer that alternates reads worth keeping as slices (half of their buffer) with
    /// one-byte reads: each one-byte read is copied, and the buffers it is copied into hold
    /// no more than twice what they were given and 64 KiB (they were 64 KiB each, 32 MiB for
    /// 1 MiB).
    @Test func slicesBetweenSingleBytesPinAboutWhatArrived() throws {
        let (bytes, direct, _) = self.stream(dataLength: 1 << 20)
        var decoder = WireDecoder(expectBanner: false)
        let out = try self.feed(bytes, reads: [2048, 1], capacity: 4096, into: &decoder)
        guard case .direct(let d)? = out.first else { Issue.record("no DIRECT frame"); return }
        #expect(d.frame == direct)
        let pinned = d.data!.pieces.reduce(0) { $0 + $1.storageCapacity }
        #expect(pinned <= 2 * (1 << 20) + (64 << 10), "\(pinned) bytes pinned for 1 MiB")
    }

    @Test(arguments: [0, 1])
    func aBadSegmentCRCIsCaught(segment: Int) throws {
        var (bytes, _, _) = self.stream(dataLength: 50_000)
        // The epilogue of the DIRECT frame: 8 bytes before the KEEPALIVE (32 + 8 + 4 bytes).
        let epilogue = bytes.count - (32 + 8 + 4) - 8
        bytes[epilogue + 4 * segment] ^= 0x01
        var decoder = WireDecoder(expectBanner: false)
        let error = ParleyError.code { _ = try self.feed(bytes, reads: [4096], into: &decoder) }
        #expect(error == .badSegmentCRC)
        var whole = WireDecoder(expectBanner: false)
        var buffer = ByteBuffer(bytes: bytes)
        #expect(ParleyError.code { _ = try whole.decode(buffer: &buffer) } == .badSegmentCRC, "decode agrees")
        // A data byte flipped fails segment 1's CRC as well.
        var (flipped, _, _) = self.stream(dataLength: 50_000)
        flipped[32 + 11 + 20_000] ^= 0x80
        var again = WireDecoder(expectBanner: false)
        #expect(ParleyError.code { _ = try self.feed(flipped, reads: [4096], into: &again) } == .badSegmentCRC)
    }

    /// Streams of DIRECT frames of 0-100 KiB of data between small frames, a byte of them
    /// changed or the stream cut short, fed in reads of random sizes: `decodeCollecting`
    /// gives what `decode` gives, and fails where it fails (`_FuzzHarness.collectingAgrees`,
    /// which the fuzz target also runs).
    @Test func randomStreamsCollectAsTheyDecode() throws {
        var rng = SplitMix(seed: 48)
        for round in 0..<300 {
            var banner = ByteBuffer()
            banner.writeBanner(Banner(supported: .implemented))
            var stream = Array(banner.readableBytesView)
            for _ in 0..<(1 + rng.next() % 4) {
                stream += self.stream(dataLength: Int(rng.next() % 3 == 0 ? rng.next() % 100_000 : 16_384 + rng.next() % 70_000)).bytes
            }
            switch rng.next() % 4 {
            case 0: stream[Int(rng.next() % UInt64(stream.count))] ^= UInt8(1) << UInt8(rng.next() % 8)
            case 1: stream = Array(stream.prefix(Int(rng.next() % UInt64(stream.count))))
            default: break
            }
            let reads = (0..<3).map { _ in 1 + Int(rng.next() % (rng.next() % 2 == 0 ? 70_000 : 5_000)) }
            let agrees = stream.withUnsafeBytes { _FuzzHarness.collectingAgrees($0, reads: reads) }
            #expect(agrees, "round \(round), reads \(reads)")
        }
    }

    @Test func aConnectionCutWhileCollectingIsTruncated() throws {
        let (bytes, _, _) = self.stream(dataLength: 50_000)
        var decoder = WireDecoder(expectBanner: false)
        let out = try self.feed(Array(bytes[0..<30_000]), reads: [4096], into: &decoder)
        #expect(out.isEmpty)
        #expect(decoder.isInsideFrame)
        var empty = ByteBuffer()
        do {
            _ = try decoder.decodeLast(buffer: &empty, seenEOF: true)
            Issue.record("no error at the end of a cut frame")
        } catch {
            #expect(error.code == .truncated && error.message.contains("29968 of 50019"), "\(error.message)")
        }
    }

    /// The rest of a collected frame handed over at the end (a reader that held it back)
    /// finishes it: the frame, then what follows, then the end.
    /// ... with the frame's own alignment hints, as `decode` gives them (none, or 4096 for the data).
    @Test(arguments: [SegmentAlignments.none, SegmentAlignments(0, DirectFrame.dataAlignment)])
    func theRestAtTheEndFinishesACollectedFrame(alignments: SegmentAlignments) throws {
        let (bytes, direct, keepalive) = self.stream(dataLength: 50_000, alignments: alignments)
        var decoder = WireDecoder(expectBanner: false)
        #expect(try self.feed(Array(bytes[0..<30_000]), reads: [4096], into: &decoder).isEmpty)
        var rest = ByteBuffer(bytes: bytes[30_000...])
        guard case .frame(let f)? = try decoder.decodeLast(buffer: &rest, seenEOF: true) else { Issue.record("no DIRECT frame"); return }
        #expect(f == direct && f.alignments == alignments)
        #expect(try decoder.decodeLast(buffer: &rest, seenEOF: true) == .frame(keepalive))
        #expect(try decoder.decodeLast(buffer: &rest, seenEOF: true) == nil)
    }
}
