import NIOCore

/// Drives arbitrary bytes through everything a server does with a client's bytes: the
/// decoder, the server handshake machine and the session machine. Used by the libFuzzer
/// target (FuzzTesting/) and by the test that replays its corpus. Must never crash or hang,
/// whatever the input; returns how many elements were decoded.
public enum _FuzzHarness {
    @discardableResult
    public static func run(_ bytes: UnsafeRawBufferPointer) -> Int {
        // The connection handler's way of decoding (large DIRECT data collected as the reads
        // it arrives in), with read sizes from the input: what decoding it whole gives.
        let reads = [1 + Int(bytes.first ?? 0) &* 97 % 5000, 1 + Int(bytes.last ?? 0) &* 131]
        precondition(Self.collectingAgrees(bytes, reads: reads), "decodeCollecting in reads of \(reads) disagrees with decode")
        var buffer = ByteBuffer(bytes: bytes)
        var decoder = WireDecoder(maxFrameSize: 1 << 20)
        var ident = Parley_V1_ServerIdent()
        ident.version = "1.0.0"
        var configuration = ServerHandshakeStateMachine.Configuration(
            banner: Banner(supported: ParleyFeatures.implemented.union(.reconnect)), maxFrameSize: 1 << 20, ident: ident,
            minimumClientVersion: "0.0.5", clientAddress: "fuzz"
        )
        configuration.sessionToken = Array(repeating: 7, count: SessionToken.size)
        var handshake = ServerHandshakeStateMachine(configuration: configuration)
        _ = handshake.start()
        var session: SessionStateMachine?
        // A lossless session's numbering: what a server does with the MESSAGEs and ACKs.
        var ledger = SessionLedger()
        var decoded = 0
        do {
            while let element = try decoder.decodeLast(buffer: &buffer, seenEOF: true) {
                decoded += 1
                if var s = session {
                    let event = s.received(element)
                    session = s
                    if case .violation = event { break }
                    if case .peerClosed = event { break }
                    if s.isLossless {
                        if case .message(let m) = event, case .violation = ledger.received(m.header) { break }
                        if case .ack(let ack) = event, (try? ledger.acknowledge(ack)) == nil { break }
                    }
                } else {
                    var step = handshake.received(element)
                    if case .resumeRequested(let request)? = step.outcome {
                        // Both answers, depending on the input: resume a session that sent two messages, or reset.
                        if request.connectSeq % 2 == 0 {
                            ledger.append(WireMessage(header: MessageHeader(id: 1, kind: .request, type: "a"), payload: ByteBuffer()))
                            ledger.append(WireMessage(header: MessageHeader(id: 2, kind: .request, type: "a"), payload: ByteBuffer()))
                            while ledger.nextToTransmit() != nil {}
                            if (try? ledger.resume(peerLastReceived: min(request.lastReceivedSeq, 2))) == nil { return decoded }
                            step = handshake.resume(lastReceivedSeq: ledger.lastReceivedSeq)
                        } else {
                            step = handshake.reset(reason: "fuzz")
                        }
                    }
                    switch step.outcome {
                    case .established(let r)?:
                        session = SessionStateMachine(role: .server, features: r.features)
                        // DIRECT frames reach the session's rules where the features allow them.
                        try? session?.enableDirect()
                    case .failed?: return decoded
                    case .resumeRequested?, nil: break
                    }
                }
            }
        } catch {}
        return decoded
    }

    /// True when `WireDecoder.decodeCollecting`, fed `bytes` in reads of the sizes `reads`
    /// cycles through (each read its own buffer, the rest of a read kept and completed as the
    /// connection handler does), gives what `decode` gives of `bytes` at once: the same
    /// banner and frames (a collected DIRECT frame compared by its bytes), and the same error
    /// code where it fails.
    public static func collectingAgrees(_ bytes: UnsafeRawBufferPointer, reads: [Int], maxFrameSize: Int = 1 << 20) -> Bool {
        enum Element: Equatable {
            case banner(Banner)
            case frame(FrameTag, UInt8, [ByteBuffer])
        }
        func element(_ inbound: WireInbound) -> Element {
            switch inbound {
            case .banner(let b): return .banner(b)
            case .frame(let f): return .frame(f.tag, f.flags, f.segments)
            }
        }
        var whole = WireDecoder(maxFrameSize: maxFrameSize)
        var all = ByteBuffer(bytes: bytes)
        var expected: [Element] = []
        var expectedError: ParleyError.Code?
        do {
            while let e = try whole.decodeLast(buffer: &all, seenEOF: true) { expected.append(element(e)) }
        } catch {
            expectedError = error.code
        }
        var decoder = WireDecoder(maxFrameSize: maxFrameSize)
        var got: [Element] = []
        var gotError: ParleyError.Code?
        do {
            var rest = try Self.feedCollecting(bytes, reads: reads, into: &decoder) { e in
                switch e {
                case .wire(let w): got.append(element(w))
                case .direct(let d): got.append(.frame(.direct, d.flags, d.frame.segments))
                }
            }
            while let e = try decoder.decodeLast(buffer: &rest, seenEOF: true) { got.append(element(e)) }
        } catch {
            gotError = error.code
        }
        return got == expected && gotError == expectedError
    }

    /// Feeds `bytes` to `decoder.decodeCollecting` in reads of the sizes `reads` cycles
    /// through, each read a buffer of its own of at least `capacity` bytes (as NIO's reads
    /// are), the rest of a read kept and completed by the next as the connection handler
    /// does; `each` gets what comes out. Returns what is left undecoded at the end.
    public static func feedCollecting(_ bytes: UnsafeRawBufferPointer, reads: [Int], capacity: Int = 0, into decoder: inout WireDecoder,
                                      _ each: (CollectedInbound) -> Void) throws(ParleyError) -> ByteBuffer {
        var rest = ByteBuffer()
        var at = 0, i = 0
        while at < bytes.count {
            let n = min(max(1, reads[i % reads.count]), bytes.count - at)
            i += 1
            var read = ByteBufferAllocator().buffer(capacity: max(n, capacity))
            read.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[at..<(at + n)]))
            at += n
            var buffer = read
            if rest.readableBytes > 0 {
                rest.writeBuffer(&read)
                buffer = rest
            }
            rest = ByteBuffer()
            while let e = try decoder.decodeCollecting(buffer: &buffer) { each(e) }
            if buffer.readableBytes > 0 { rest = buffer }
        }
        return rest
    }

    /// The entry point of the libFuzzer target: an input whose first byte is `S` (0x53) goes
    /// to `runSecure` (without that byte), any other input to `run`, so that the committed
    /// crc-mode corpus (which starts with the banner magic) keeps its meaning.
    @discardableResult
    public static func runAny(_ bytes: UnsafeRawBufferPointer) -> Int {
        if let first = bytes.first, first == UInt8(ascii: "S") {
            return self.runSecure(UnsafeRawBufferPointer(rebasing: bytes[1...]))
        }
        return self.run(bytes)
    }

    /// Fixed keys for `runSecure`: the fuzzer cannot learn real ones, so the harness seals
    /// (or does not seal) the input itself.
    static let secureKey: [UInt8] = (0..<32).map { UInt8($0) }
    static let secureIV: [UInt8] = (0..<12).map { UInt8(0x60 + $0) }

    /// Drives bytes through what a server does with a client's bytes after the switch to
    /// secure mode: a decoder opening sealed frames (`startOpening` with fixed keys), then
    /// CLIENT_IDENT and the session machine. The first byte chooses:
    /// - bit 0: the cipher (0 AES-256-GCM, 1 ChaCha20-Poly1305);
    /// - bit 1: 0 feeds the rest as it is (sealed bytes from someone without the keys: the
    ///   tag checks, and the clear-CLOSE exception for the first frame); 1 treats the rest as
    ///   crc-mode frames (preamble, segments as the preamble declares, epilogue) and seals
    ///   each preamble and body with the fixed keys first, so that authentic preambles with any
    ///   content (bad shapes, huge or short lengths) and authentic bodies reach the checks
    ///   behind the tags;
    /// - bit 2: 1 delivers the stream in pieces of 1 to 64 bytes (sizes from the input), as a
    ///   socket may, instead of all at once.
    /// Must never crash or hang; returns how many elements were decoded.
    @discardableResult
    public static func runSecure(_ bytes: UnsafeRawBufferPointer) -> Int {
        guard let options = bytes.first else { return 0 }
        let cipher: SecureCipher = options & 1 == 0 ? .aes256GCM : .chacha20Poly1305
        let keys = SecureDirectionKeys(cipher: cipher, key: self.secureKey, iv: self.secureIV)
        let rest = UnsafeRawBufferPointer(rebasing: bytes[1...])
        var stream: ByteBuffer
        if options & 2 == 0 {
            stream = ByteBuffer(bytes: rest)
        } else {
            guard let sealer = try? SecureDirection(keys: keys, sealing: true) else { return 0 }
            stream = Self.sealFrames(rest, with: sealer)
        }
        guard let opener = try? SecureDirection(keys: keys, sealing: false) else { return 0 }
        var decoder = WireDecoder(maxFrameSize: 1 << 20, expectBanner: false)
        decoder.startOpening(opener)
        var session: SessionStateMachine?
        var decoded = 0
        // Piece sizes come from the input itself, so a run is reproducible.
        var pieceSeed = UInt64(truncatingIfNeeded: rest.count) &* 0x9E37_79B9_7F4A_7C15 | 1
        var buffer = ByteBuffer()
        var finished = false
        func consume(_ element: WireInbound) -> Bool {
            decoded += 1
            guard case .frame(let frame) = element else { return false }
            if var s = session {
                let event = s.received(element)
                session = s
                if case .violation = event { return false }
                if case .peerClosed = event { return false }
                return true
            }
            // The first sealed frame from a client is CLIENT_IDENT (or a CLOSE).
            guard frame.tag == .clientIdent, frame.segments.count == 1,
                  (try? Parley_V1_ClientIdent(parleyPayload: frame.segments[0])) != nil
            else { return false }
            session = SessionStateMachine(role: .server, features: ParleyFeatures.implemented.union(.secureMode))
            try? session?.enableDirect()
            return true
        }
        do {
            while !finished {
                let eof: Bool
                if options & 4 != 0 {
                    pieceSeed = pieceSeed &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
                    let size = min(stream.readableBytes, 1 + Int(pieceSeed >> 58))
                    var piece = stream.readSlice(length: size)!
                    buffer.writeBuffer(&piece)
                    eof = stream.readableBytes == 0
                } else {
                    buffer.writeBuffer(&stream)
                    eof = true
                }
                while let element = try decoder.decodeLast(buffer: &buffer, seenEOF: eof) {
                    if !consume(element) { finished = true; break }
                }
                if eof { finished = true }
            }
        } catch {}
        return decoded
    }

    /// Seals crc-mode frames as secure mode sends them: each 32-byte preamble alone, then the
    /// segments its descriptors declare (as many bytes as there are, if fewer) as one message;
    /// the 4-byte CRCs of the epilogue (if there) are skipped. A preamble shorter than 32
    /// bytes at the end is sealed padded with zeros.
    static func sealFrames(_ input: UnsafeRawBufferPointer, with sealer: SecureDirection) -> ByteBuffer {
        var out = ByteBuffer()
        var at = 0
        while at < input.count {
            var preamble = [UInt8](repeating: 0, count: Frame.preambleSize + SecureCipher.tagSize)
            let available = min(Frame.preambleSize, input.count - at)
            for i in 0..<available { preamble[i] = input[at + i] }
            at += available
            let count = min(Int(preamble[2]), Frame.maxSegments)
            var declared = 0
            for i in 0..<count {
                let o = 4 + 6 * i
                declared += Int(preamble[o]) | Int(preamble[o + 1]) << 8 | Int(preamble[o + 2]) << 16 | Int(preamble[o + 3]) << 24
            }
            let ok = preamble.withUnsafeMutableBytes { p -> Bool in (try? sealer.seal(p.baseAddress!, length: Frame.preambleSize)) != nil }
            guard ok else { break }
            out.writeBytes(preamble)
            let length = min(declared, input.count - at)
            var body = [UInt8](repeating: 0, count: length + SecureCipher.tagSize)
            for i in 0..<length { body[i] = input[at + i] }
            at += length
            let sealed = body.withUnsafeMutableBytes { p -> Bool in (try? sealer.seal(p.baseAddress!, length: length)) != nil }
            guard sealed else { break }
            out.writeBytes(body)
            at += min(4 * count, input.count - at)
        }
        return out
    }
}
