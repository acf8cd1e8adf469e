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
    /// Every frame after this one is sealed with these keys (secure mode).
    case startSealing(SecureSwitch)
}

/// What `WireDecoder.decodeCollecting` gives: what `decode` gives, or a DIRECT frame whose
/// large segment 1 was collected as the reads it arrived in.
public enum CollectedInbound: Hashable, Sendable {
    case wire(WireInbound)
    case direct(DirectInbound)
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
        /// Secure mode: a sealed body that did not arrive whole, opened as its pieces come
        /// (`pieces` holds what is done).
        case bodyInPieces(Preamble)
        case failed(ParleyError)
    }

    /// A sealed body arriving in several reads. With AES-256-GCM each piece is decrypted from
    /// the input straight into `plain` (the input is not kept, nothing is copied to gather
    /// it); with ChaCha20-Poly1305 the ciphertext is gathered in `plain` and opened there in
    /// place once whole. Either way nothing of `plain` is handed on before the tag checks.
    struct BodyInPieces {
        /// The body's own buffer: `writerIndex` is how many of its bytes have arrived.
        var plain: ByteBuffer
        /// The tag, as its bytes arrive.
        var tag: (UInt64, UInt64) = (0, 0)
        var tagBytes = 0
        var frameNumber: UInt64
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
    /// In secure mode: opens each sealed preamble and segments (docs/protocol.md, "Secure mode").
    private var opener: SecureDirection?
    /// The next frame is the first sealed one: a peer that failed the handshake after this side
    /// switched may still send its CLOSE in the clear, and it is accepted there (only there).
    private var firstSealedFrame = false
    /// The body of `.bodyInPieces`, kept out of `state` so that writing into it never copies it.
    private var pieces: BodyInPieces?
    /// `decodeCollecting`: the body of a large DIRECT frame as it arrives (in `.body`).
    private var directBody: DirectBody?

    /// A DIRECT body collected as the slices of the reads it arrives in (`ReadPieceCollector`:
    /// a slice kept pins at most twice its bytes, the buffers small reads are copied into at
    /// most twice theirs, so a peer that sends a large frame pins no more than about twice
    /// what it sent, however it paces its reads).
    typealias DirectBody = ReadPieceCollector

    /// From the next byte on, frames are sealed: opened with `direction`. Called between two
    /// frames, when the handshake settles the keys.
    public mutating func startOpening(_ direction: SecureDirection) {
        precondition(!direction.sealing)
        self.opener = direction
        self.firstSealedFrame = true
    }

    /// True once `startOpening` has been called.
    public var isSecure: Bool { self.opener != nil }

    /// True between a frame's preamble and the end of its body: bytes of a frame have been
    /// taken that do not make a whole frame yet (in secure mode the input may then be empty).
    public var isInsideFrame: Bool {
        switch self.state {
        case .body, .bodyInPieces: return true
        case .banner, .preamble, .failed: return false
        }
    }

    /// In crc mode, how many bytes the next step takes, counted from the first byte not
    /// decoded yet: a preamble's 32, then the body's segments and CRCs. A reader that holds
    /// the start of a piece cut by the end of a read completes just that piece from the next
    /// read (`ParleyConnectionHandler`), and decodes what follows where it arrived, instead
    /// of appending the whole next read to it. Nil where a step has no such size: the
    /// banner, secure mode (a sealed body is opened as its pieces arrive), a failed decoder.
    public var bytesForNextStep: Int? {
        guard self.opener == nil, self.directBody == nil else { return nil }
        switch self.state {
        case .preamble: return Frame.preambleSize
        case .body(let preamble): return preamble.bodySize
        case .banner, .bodyInPieces, .failed: return nil
        }
    }

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
            self.pieces = nil
            throw error
        }
    }

    /// `decode` for a reader that takes a large DIRECT frame's data as the reads it arrives
    /// in (`ParleyConnectionHandler`): in crc mode, a DIRECT frame of two segments whose
    /// segment 1 is at least `zeroCopySegmentThreshold` bytes and whose body has not all
    /// arrived is collected from this and the following calls' buffers (their bytes are
    /// taken, as slices: nothing copied) and given as `.direct` once whole and checked. The
    /// checks and their errors are `decode`'s, in the same order.
    public mutating func decodeCollecting(buffer: inout ByteBuffer) throws(ParleyError) -> CollectedInbound? {
        if self.directBody == nil {
            if let inbound = try self.decode(buffer: &buffer) { return .wire(inbound) }
            guard self.opener == nil, case .body(let p) = self.state, p.tag == .direct, p.count == 2,
                  p.length(1) >= zeroCopySegmentThreshold else { return nil }
            self.directBody = DirectBody(minimumSlice: 1024, halfTheBuffer: true)
        }
        guard case .body(let preamble) = self.state, var body = self.directBody else { preconditionFailure("collecting outside a DIRECT body") }
        self.directBody = nil  // so that an own buffer in it is uniquely referenced and grows in place
        let take = min(preamble.bodySize - body.count, buffer.readableBytes)
        var piece = buffer.readSlice(length: take)!
        body.take(&piece, missing: preamble.bodySize - body.count - take, allocator: ByteBufferAllocator())
        guard body.count == preamble.bodySize else {
            self.directBody = body
            return nil
        }
        do {
            let direct = try Self.checkDirectBody(ByteBufferPieces(body.pieces), preamble: preamble)
            self.state = .preamble
            return .direct(direct)
        } catch {
            self.state = .failed(error)
            throw error
        }
    }

    /// The segments of a whole DIRECT body of two segments held in pieces, their CRCs checked
    /// as `step` checks them.
    private static func checkDirectBody(_ body: ByteBufferPieces, preamble: Preamble) throws(ParleyError) -> DirectInbound {
        let length0 = preamble.length(0), length1 = preamble.length(1)
        let epilogue = body.slice(at: length0 + length1, length: 8).gathered()
        let segment0 = body.slice(at: 0, length: length0).gathered()
        let data = body.slice(at: length0, length: length1)
        for (i, computed) in [(0, CRC32C.checksum(segment0)), (1, data.crc32c())] {
            let stored = epilogue.getInteger(at: epilogue.readerIndex + 4 * i, endianness: .little, as: UInt32.self)!
            guard stored == computed else {
                throw Self.segmentCRCMismatch(preamble, segment: i, computed: computed, stored: stored)
            }
        }
        return DirectInbound(flags: preamble.flags, segment0: segment0, data: data)
    }

    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws(ParleyError) -> WireInbound? {
        if self.directBody != nil {
            // A DIRECT body being collected: what is left may finish it (given gathered, as
            // `decode` gives a frame), or the peer ended the connection inside it.
            guard case .body(let collecting) = self.state else { preconditionFailure("collecting outside a DIRECT body") }
            if case .direct(let direct)? = try self.decodeCollecting(buffer: &buffer) {
                var frame = direct.frame
                frame.alignments = collecting.alignments  // the preamble's hints, as `decode` gives them
                return .frame(frame)
            }
            if let body = self.directBody {
                guard seenEOF else { return nil }
                throw self.fail(ParleyError(
                    code: .truncated,
                    message: "connection ended inside a \(collecting.tag) frame: \(body.count) of \(collecting.bodySize) body bytes arrived"
                ))
            }
        }
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
                message: "connection ended inside a \(p.tag) frame: \(buffer.readableBytes) of \(self.opener == nil ? p.bodySize : p.total + SecureCipher.tagSize) body bytes arrived"
            ))
        case .bodyInPieces(let p):
            let arrived = (self.pieces?.plain.writerIndex ?? 0) + (self.pieces?.tagBytes ?? 0) + buffer.readableBytes
            throw self.fail(ParleyError(
                code: .truncated,
                message: "connection ended inside a \(p.tag) frame: \(arrived) of \(p.total + SecureCipher.tagSize) body bytes arrived"
            ))
        }
    }

    private mutating func fail(_ error: ParleyError) -> ParleyError {
        self.state = .failed(error)
        self.pieces = nil
        self.directBody = nil
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
            let read: Preamble?
            if let opener = self.opener {
                read = try self.openPreamble(&buffer, opener: opener)
            } else {
                read = try Self.readPreamble(&buffer, maxFrameSize: self.maxFrameSize)
            }
            guard let preamble = read else { return nil }
            self.state = .body(preamble)
            return try self.step(&buffer)
        case .body(let preamble) where self.opener != nil:
            return try self.openBody(&buffer, preamble: preamble, opener: self.opener!)
        case .bodyInPieces(let preamble):
            return try self.continueBody(&buffer, preamble: preamble, opener: self.opener!)
        case .body(let preamble):
            guard buffer.readableBytes >= preamble.bodySize else { return nil }
            try buffer.withUnsafeReadableBytes { (raw) throws(ParleyError) in
                let body = UnsafeRawBufferPointer(rebasing: raw[0..<preamble.bodySize])
                var offset = 0
                for i in 0..<preamble.count {
                    try Self.checkSegmentCRC(body, preamble: preamble, segment: i, at: offset)
                    offset += preamble.length(i)
                }
            }
            var segments: [ByteBuffer] = []
            segments.reserveCapacity(preamble.count)
            for i in 0..<preamble.count { segments.append(buffer.readSlice(length: preamble.length(i))!) }
            buffer.moveReaderIndex(forwardBy: 4 * preamble.count)
            self.state = .preamble
            return .frame(Frame(tag: preamble.tag, flags: preamble.flags, segments: segments, alignments: preamble.alignments))
        }
    }

    static func readPreamble(_ buffer: inout ByteBuffer, maxFrameSize: Int) throws(ParleyError) -> Preamble? {
        guard buffer.readableBytes >= Frame.preambleSize else { return nil }
        let preamble = try buffer.withUnsafeReadableBytes { (raw) throws(ParleyError) in
            try Self.checkPreamble(UnsafeRawBufferPointer(rebasing: raw[0..<Frame.preambleSize]), maxFrameSize: maxFrameSize)
        }
        buffer.moveReaderIndex(forwardBy: Frame.preambleSize)
        return preamble
    }

    /// Checks a crc-mode preamble's CRC (R-4.4-1), then its shape and size (`parsePreamble`).
    static func checkPreamble(_ p: UnsafeRawBufferPointer, maxFrameSize: Int) throws(ParleyError) -> Preamble {
        let computed = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: p[0..<28]))
        let stored = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 28, as: UInt32.self))
        guard computed == stored else {
            throw ParleyError(
                code: .badPreambleCRC,
                message: "frame preamble CRC mismatch: computed 0x\(String(computed, radix: 16)), preamble says 0x\(String(stored, radix: 16)) (preamble: \(Array(p[0..<32]).hexString))"
            )
        }
        return try Self.parsePreamble(p, maxFrameSize: maxFrameSize)
    }

    /// Checks segment `i`'s CRC against the epilogue (R-4.4-4): `body` is the frame's bytes
    /// after its preamble, segments and epilogue.
    static func checkSegmentCRC(_ body: UnsafeRawBufferPointer, preamble: Preamble, segment i: Int, at offset: Int) throws(ParleyError) {
        let length = preamble.length(i)
        let stored = UInt32(littleEndian: body.loadUnaligned(fromByteOffset: preamble.total + 4 * i, as: UInt32.self))
        let computed = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: body[offset..<(offset + length)]))
        guard stored == computed else { throw Self.segmentCRCMismatch(preamble, segment: i, computed: computed, stored: stored) }
    }

    /// R-4.4-4's error, whichever way the segment was held.
    static func segmentCRCMismatch(_ preamble: Preamble, segment i: Int, computed: UInt32, stored: UInt32) -> ParleyError {
        ParleyError(
            code: .badSegmentCRC,
            message: "\(preamble.tag) frame segment \(i) (\(preamble.length(i)) bytes) CRC mismatch: computed 0x\(String(computed, radix: 16)), epilogue says 0x\(String(stored, radix: 16))"
        )
    }

    /// Parses 32 preamble bytes whose integrity is established (by the CRC, or by the AEAD
    /// tag in secure mode): shape, then the frame-size limit.
    static func parsePreamble(_ p: UnsafeRawBufferPointer, maxFrameSize: Int) throws(ParleyError) -> Preamble {
        let tag = FrameTag(rawValue: p[0])
        let flags = p[1], count = p[2], reserved = p[3]
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
            let length = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 4 + 6 * i, as: UInt32.self))
            let alignment = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 8 + 6 * i, as: UInt16.self))
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
        return Preamble(tag: tag, flags: flags, count: Int(count), lengths: lengths, alignments: alignments, total: total)
    }

    // MARK: - Secure mode

    /// Opens a sealed preamble (48 bytes) once it is all there. Nothing in it is looked at
    /// before its tag has been checked.
    private mutating func openPreamble(_ buffer: inout ByteBuffer, opener: SecureDirection) throws(ParleyError) -> Preamble? {
        guard buffer.readableBytes >= sealedPreambleSize else {
            // The first frame after the switch may be a clear CLOSE (R-5.1-6), and one shorter
            // than a sealed preamble (a short reason) is taken once it is whole: waiting for 48
            // bytes would wait for ever on a peer that sent it and waits for the close.
            if self.firstSealedFrame, buffer.readableBytes >= Frame.preambleSize,
               let close = try? Self.clearClosePreamble(buffer, maxFrameSize: self.maxFrameSize),
               buffer.readableBytes >= Frame.preambleSize + close.total + 4
            {
                self.firstSealedFrame = false
                self.opener = nil
                buffer.moveReaderIndex(forwardBy: Frame.preambleSize)
                return close
            }
            return nil
        }
        let first = self.firstSealedFrame
        self.firstSealedFrame = false
        let frameNumber = opener.counter / 2
        var plain: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
        let opened = try buffer.withUnsafeReadableBytes { (raw) throws(ParleyError) -> Bool in
            try withUnsafeMutableBytes(of: &plain) { (out) throws(ParleyError) -> Bool in
                try opener.open(from: raw.baseAddress!, to: out.baseAddress!, length: Frame.preambleSize, tag: raw.baseAddress! + Frame.preambleSize)
            }
        }
        guard opened else {
            if first, let close = try? Self.clearClosePreamble(buffer, maxFrameSize: self.maxFrameSize) {
                // The peer gave up on the handshake before switching: take its CLOSE as sent.
                self.opener = nil
                buffer.moveReaderIndex(forwardBy: Frame.preambleSize)
                return close
            }
            throw ParleyError(
                code: .badAuthTag,
                message: "sealed preamble of frame \(frameNumber) failed authentication: the frame was altered, replayed, reordered or dropped, or the keys differ"
            )
        }
        let preamble = try withUnsafeBytes(of: &plain) { (p) throws(ParleyError) in try Self.parsePreamble(p, maxFrameSize: self.maxFrameSize) }
        buffer.moveReaderIndex(forwardBy: sealedPreambleSize)
        return preamble
    }

    /// A clear CLOSE preamble (right CRC, tag CLOSE, one segment) at the reader index, or nil.
    private static func clearClosePreamble(_ buffer: ByteBuffer, maxFrameSize: Int) throws(ParleyError) -> Preamble? {
        var copy = buffer
        guard let preamble = try Self.readPreamble(&copy, maxFrameSize: maxFrameSize), preamble.tag == .close, preamble.count == 1 else {
            return nil
        }
        return preamble
    }

    /// Opens the sealed segments once they and their tag are all there; the segments are handed
    /// on as slices. A small body is opened into a buffer of its own: opening it in place would
    /// make the receive buffer copy itself whenever the application still holds segments of
    /// earlier frames (pipelined small messages). A large body (64 KiB or more) is opened in
    /// place: its receive buffer holds little else, and a fresh buffer per frame costs more.
    private mutating func openBody(_ buffer: inout ByteBuffer, preamble: Preamble, opener: SecureDirection) throws(ParleyError) -> WireInbound? {
        let size = preamble.total + SecureCipher.tagSize
        let frameNumber = opener.counter / 2
        guard buffer.readableBytes >= size else {
            // Part of the body is here: open it as it comes rather than wait for it whole
            // (which would copy every read into a growing buffer before opening it).
            guard buffer.readableBytes > 0, preamble.total > 0 else { return nil }
            if opener.opensInPieces { try opener.beginOpening() }
            self.pieces = BodyInPieces(
                plain: ByteBufferAllocator().buffer(capacity: Self.room(for: buffer.readableBytes, total: preamble.total)), frameNumber: frameNumber
            )
            self.state = .bodyInPieces(preamble)
            return try self.continueBody(&buffer, preamble: preamble, opener: opener)
        }
        let total = preamble.total
        var opened = false
        var plain: ByteBuffer
        if total >= zeroCopySegmentThreshold * 4 {
            opened = try buffer.withUnsafeMutableReadableBytes { (raw) throws(ParleyError) -> Bool in
                try opener.open(from: raw.baseAddress!, to: raw.baseAddress!, length: total, tag: raw.baseAddress! + total)
            }
            plain = buffer.readSlice(length: total)!
            buffer.moveReaderIndex(forwardBy: SecureCipher.tagSize)
        } else {
            plain = ByteBufferAllocator().buffer(capacity: max(total, 1))
            var failure: ParleyError?
            buffer.withUnsafeReadableBytes { raw in
                _ = plain.writeWithUnsafeMutableBytes(minimumWritableBytes: max(total, 1)) { out in
                    do {
                        opened = try opener.open(from: raw.baseAddress!, to: out.baseAddress!, length: total, tag: raw.baseAddress! + total)
                    } catch {
                        failure = error as? ParleyError
                    }
                    return total
                }
            }
            if let failure { throw failure }
            buffer.moveReaderIndex(forwardBy: size)
        }
        return try self.opened(opened, plain, preamble: preamble, frameNumber: frameNumber)
    }

    /// The frame of an opened body, or `badAuthTag` if it did not open.
    private mutating func opened(_ opened: Bool, _ plain: ByteBuffer, preamble: Preamble, frameNumber: UInt64) throws(ParleyError) -> WireInbound {
        guard opened else {
            throw ParleyError(
                code: .badAuthTag,
                message: "sealed segments of \(preamble.tag) frame \(frameNumber) (\(preamble.total) bytes) failed authentication: the frame was altered or cut"
            )
        }
        var plain = plain
        var segments: [ByteBuffer] = []
        segments.reserveCapacity(preamble.count)
        for i in 0..<preamble.count { segments.append(plain.readSlice(length: preamble.length(i))!) }
        self.state = .preamble
        return .frame(Frame(tag: preamble.tag, flags: preamble.flags, segments: segments, alignments: preamble.alignments))
    }

    /// The capacity for a body in pieces once `arrived` of its `total` bytes are in: four
    /// times what has arrived (at least 64 KiB), at most the body. A peer that declares a large
    /// frame and sends little of it does not get the whole size reserved, and a large body
    /// is regrown only a few times (fourfold each time) before it is whole.
    static func room(for arrived: Int, total: Int) -> Int {
        min(total, max(64 << 10, 4 * arrived))
    }

    /// Takes what `buffer` holds of a body arriving in pieces; hands the frame on once its tag
    /// has arrived and checks.
    private mutating func continueBody(_ buffer: inout ByteBuffer, preamble: Preamble, opener: SecureDirection) throws(ParleyError) -> WireInbound? {
        guard var body = self.pieces else { preconditionFailure("a body in pieces without its buffer") }
        self.pieces = nil  // so that `body.plain` is uniquely referenced and written in place
        let total = preamble.total
        // AES-256-GCM: `plain` holds plaintext, decrypted piece by piece; otherwise ciphertext.
        let decrypting = opener.opensInPieces
        let take = min(total - body.plain.writerIndex, buffer.readableBytes)
        if take > 0 {
            if body.plain.writableBytes < take {
                body.plain.reserveCapacity(Self.room(for: body.plain.writerIndex + take, total: total))
            }
            var failure: ParleyError?
            _ = buffer.withUnsafeReadableBytes { input in
                body.plain.writeWithUnsafeMutableBytes(minimumWritableBytes: take) { out in
                    if decrypting {
                        do throws(ParleyError) {
                            try opener.openPiece(from: input.baseAddress!, to: out.baseAddress!, length: take)
                        } catch {
                            failure = error
                        }
                    } else {
                        out.baseAddress!.copyMemory(from: input.baseAddress!, byteCount: take)
                    }
                    return take
                }
            }
            if let failure { throw failure }
            buffer.moveReaderIndex(forwardBy: take)
        }
        let tagTake = min(SecureCipher.tagSize - body.tagBytes, buffer.readableBytes)
        if tagTake > 0 {
            let at = body.tagBytes
            withUnsafeMutableBytes(of: &body.tag) { tag in
                buffer.withUnsafeReadableBytes { input in
                    (tag.baseAddress! + at).copyMemory(from: input.baseAddress!, byteCount: tagTake)
                }
            }
            body.tagBytes += tagTake
            buffer.moveReaderIndex(forwardBy: tagTake)
        }
        guard body.tagBytes == SecureCipher.tagSize else {
            self.pieces = body
            return nil
        }
        let opened: Bool
        if decrypting {
            opened = withUnsafeBytes(of: &body.tag) { opener.finishOpening(tag: $0.baseAddress!) }
        } else {
            var tag = body.tag
            opened = try body.plain.withUnsafeMutableReadableBytes { (raw) throws(ParleyError) -> Bool in
                try withUnsafeBytes(of: &tag) { (t) throws(ParleyError) -> Bool in
                    try opener.open(from: raw.baseAddress!, to: raw.baseAddress!, length: total, tag: t.baseAddress!)
                }
            }
        }
        return try self.opened(opened, body.plain, preamble: preamble, frameNumber: body.frameNumber)
    }
}
