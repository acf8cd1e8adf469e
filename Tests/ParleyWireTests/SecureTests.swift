import Crypto
import Foundation
import NIOCore
import ParleyWire
import SwiftProtobuf
import Testing

// Secure mode: the sealed frame codec, the key schedule and the `secret` handshake, checked
// against swift-crypto (an independent AEAD implementation) and against every kind of
// tampering the issue names.

let testKeys = SecureDirectionKeys(cipher: .aes256GCM, key: Array(0..<32), iv: Array(100..<112))

/// A frame with all four segments, small enough to flip every bit of.
func sampleFrame() -> Frame {
    Frame(tag: .message, segments: [buffer(Array(repeating: 7, count: 40)), buffer("payload"), buffer([]), buffer([1, 2, 3])],
          alignments: SegmentAlignments(0, 0, 4096, 0))
}

func sealed(_ frames: [Frame], keys: SecureDirectionKeys = testKeys, counter: UInt64 = 0) throws -> [ByteBuffer] {
    let sealer = try SecureDirection(keys: keys, sealing: true, counter: counter)
    return try frames.map { frame in
        var out: [ByteBuffer] = []
        try frame.seal(with: sealer, into: &out, allocator: ByteBufferAllocator())
        return out[0]
    }
}

func opener(_ keys: SecureDirectionKeys = testKeys, counter: UInt64 = 0) throws -> WireDecoder {
    var decoder = WireDecoder(expectBanner: false)
    decoder.startOpening(try SecureDirection(keys: keys, sealing: false, counter: counter))
    return decoder
}

func joined(_ buffers: [ByteBuffer]) -> ByteBuffer {
    var out = ByteBuffer()
    for b in buffers { out.writeImmutableBuffer(b) }
    return out
}

@Suite struct SecureFrameTests {
    @Test(arguments: SecureCipher.allCases)
    func sealedFrameIsTheAEADOfPreambleThenSegments(cipher: SecureCipher) throws {
        // The layout of docs/protocol.md: the preamble sealed alone with counter 0, then the
        // concatenated segments with counter 1; checked against swift-crypto's own AEADs.
        let keys = SecureDirectionKeys(cipher: cipher, key: testKeys.key, iv: testKeys.iv)
        let frame = sampleFrame()
        let wire = Array(try sealed([frame], keys: keys)[0].readableBytesView)
        var preamble = ByteBuffer()
        preamble.writePreamble(frame)
        let segments = frame.segments.flatMap { Array($0.readableBytesView) }
        func reference(_ plain: [UInt8], counter: UInt64) throws -> [UInt8] {
            let nonce = SecureDirection.nonce(iv: keys.iv, counter: counter)
            switch cipher {
            case .aes256GCM:
                let box = try AES.GCM.seal(plain, using: SymmetricKey(data: keys.key), nonce: AES.GCM.Nonce(data: nonce))
                return Array(box.ciphertext) + Array(box.tag)
            case .chacha20Poly1305:
                let box = try ChaChaPoly.seal(plain, using: SymmetricKey(data: keys.key), nonce: ChaChaPoly.Nonce(data: nonce))
                return Array(box.ciphertext) + Array(box.tag)
            }
        }
        let expected = try reference(Array(preamble.readableBytesView), counter: 0) + reference(segments, counter: 1)
        #expect(wire == expected)
        #expect(wire.count == frame.sealedWireSize)
    }

    @Test func nonceIsTheIVXorTheCounterLittleEndian() {
        let nonce = SecureDirection.nonce(iv: Array(repeating: 0, count: 12), counter: 0x0102_0304_0506_0708)
        #expect(nonce == [8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 0, 0])
    }

    @Test(arguments: SecureCipher.allCases)
    func framesRoundTripInOrder(cipher: SecureCipher) throws {
        let keys = SecureDirectionKeys(cipher: cipher, key: testKeys.key, iv: testKeys.iv)
        var large = ByteBuffer()
        large.writeBytes((0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 7) })
        let message = WireMessage(header: MessageHeader(seq: 1, ack: 0, id: 1, kind: .request, type: "t.Big"), payload: buffer("p"), data: large)
        let frames = [sampleFrame(), Frame(tag: .keepalive, segments: [buffer([0, 1, 2, 3, 4, 5, 6, 7])]), message.frame(allocator: ByteBufferAllocator())]
        // Frames through Frame.seal, and the message also through WireMessage.sealFrame: same bytes.
        let sealer = try SecureDirection(keys: keys, sealing: true)
        var wire: [ByteBuffer] = []
        for frame in frames.dropLast() { try frame.seal(with: sealer, into: &wire, allocator: ByteBufferAllocator()) }
        wire.append(try message.sealFrame(with: sealer, allocator: ByteBufferAllocator()))
        let viaFrame = try sealed(frames, keys: keys)
        #expect(wire.map { Array($0.readableBytesView) } == viaFrame.map { Array($0.readableBytesView) })
        for chunk in [0, 1, 47, 48, 1000] {
            var decoder = try opener(keys)
            let decoded = try decodeAll(joined(wire), decoder: &decoder, chunk: chunk)
            #expect(decoded == frames.map { .frame($0) }, "chunk \(chunk)")
        }
    }

    /// [R-5.1-8] A sealed frame that does not open is `badAuthTag`.
    @Test func aBitFlippedAnywhereIsRejected() throws {
        let wire = try sealed([sampleFrame()])[0]
        for offset in 0..<wire.readableBytes {
            for bit in [0, 3, 7] {
                var bytes = Array(wire.readableBytesView)
                bytes[offset] ^= UInt8(1 << bit)
                var decoder = try opener()
                let code = ParleyError.code { _ = try decodeAll(buffer(bytes), decoder: &decoder) }
                #expect(code == .badAuthTag, "bit \(bit) of byte \(offset)")
            }
        }
    }

    /// A body that arrives in several reads is opened as its pieces come (decrypted straight
    /// into its own buffer with AES-256-GCM, gathered with ChaCha20-Poly1305): a flipped bit
    /// in any piece, or in a tag split across reads, still fails, and nothing is handed on.
    @Test(arguments: SecureCipher.allCases)
    func aBitFlippedInABodyArrivingInPiecesIsRejected(cipher: SecureCipher) throws {
        let keys = SecureDirectionKeys(cipher: cipher, key: testKeys.key, iv: testKeys.iv)
        let wire = try sealed([sampleFrame(), sampleFrame()], keys: keys)
        let bytes = Array(joined(wire).readableBytesView)
        let first = wire[0].readableBytes
        for chunk in [1, 7, 50] {
            var intact = try opener(keys)
            #expect(try decodeAll(buffer(bytes), decoder: &intact, chunk: chunk) == [.frame(sampleFrame()), .frame(sampleFrame())])
            // Every byte of the second frame's body and tag (its preamble opens whole).
            for offset in (first + sealedPreambleSize)..<bytes.count {
                var flipped = bytes
                flipped[offset] ^= 0x10
                var decoder = try opener(keys)
                var decoded: [WireInbound] = []
                let code = ParleyError.code {
                    var pending = ByteBuffer()
                    var input = buffer(flipped)
                    while input.readableBytes > 0 {
                        var piece = input.readSlice(length: min(chunk, input.readableBytes))!
                        pending.writeBuffer(&piece)
                        while let element = try decoder.decode(buffer: &pending) { decoded.append(element) }
                    }
                }
                #expect(code == .badAuthTag, "chunk \(chunk), byte \(offset)")
                #expect(decoded == [.frame(sampleFrame())], "chunk \(chunk), byte \(offset)")
            }
        }
    }

    @Test(arguments: SecureCipher.allCases)
    func aConnectionEndingInsideABodyInPiecesSaysHowMuchArrived(cipher: SecureCipher) throws {
        let keys = SecureDirectionKeys(cipher: cipher, key: testKeys.key, iv: testKeys.iv)
        let wire = try sealed([sampleFrame()], keys: keys)[0]
        let bodySize = wire.readableBytes - sealedPreambleSize
        var decoder = try opener(keys)
        #expect(!decoder.isInsideFrame)
        var pending = wire.getSlice(at: wire.readerIndex, length: sealedPreambleSize + 20)!
        #expect(try decoder.decode(buffer: &pending) == nil)
        #expect(pending.readableBytes == 0, "the body's first piece is taken, not left in the input")
        #expect(decoder.isInsideFrame)
        var more = wire.getSlice(at: wire.readerIndex + sealedPreambleSize + 20, length: bodySize - 21)!
        #expect(try decoder.decode(buffer: &more) == nil)
        var rest = ByteBuffer()
        do {
            _ = try decoder.decodeLast(buffer: &rest, seenEOF: true)
            Issue.record("no error")
        } catch {
            #expect(error.code == .truncated)
            #expect(error.message.contains("\(bodySize - 1) of \(bodySize) body bytes arrived"), "\(error.message)")
        }
        #expect(!decoder.isInsideFrame)
    }

    @Test func replayedReorderedDroppedAndTruncatedFramesAreRejected() throws {
        let frames = [sampleFrame(), Frame(tag: .keepalive, segments: [buffer([1, 2, 3, 4, 5, 6, 7, 8])]), sampleFrame()]
        let w = try sealed(frames)
        func decode(_ parts: [ByteBuffer]) -> (Int, ParleyError.Code?) {
            var decoder = try! opener()
            var count = 0
            let code = ParleyError.code {
                var pending = joined(parts)
                while let _ = try decoder.decode(buffer: &pending) { count += 1 }
                _ = try decoder.decodeLast(buffer: &pending, seenEOF: true)
            }
            return (count, code)
        }
        #expect(decode(w) == (3, nil))
        #expect(decode([w[0], w[0]]) == (1, .badAuthTag), "replayed")
        #expect(decode([w[1], w[0]]) == (0, .badAuthTag), "reordered")
        #expect(decode([w[0], w[2]]) == (1, .badAuthTag), "dropped")
        var cut = w[1]
        cut.moveWriterIndex(to: cut.writerIndex - 1)
        #expect(decode([w[0], cut]) == (1, .truncated), "truncated")
        // A frame sealed for the other direction (same key, wrong iv) does not open either.
        let other = try sealed([sampleFrame()], keys: SecureDirectionKeys(cipher: .aes256GCM, key: testKeys.key, iv: Array(repeating: 9, count: 12)))
        #expect(decode(other) == (0, .badAuthTag))
    }

    /// [R-5.1-7] The sealed preamble is opened before any of its fields is acted upon.
    @Test func theFrameSizeLimitIsCheckedOnlyAfterThePreambleOpens() throws {
        let big = Frame(tag: .message, segments: [buffer(Array(repeating: 1, count: 2000)), buffer([])])
        let wire = try sealed([big])[0]
        var decoder = try opener()
        decoder.maxFrameSize = 1000
        var head = wire.getSlice(at: 0, length: sealedPreambleSize)!
        #expect(ParleyError.code { _ = try decoder.decode(buffer: &head) } == .frameTooLarge)
    }

    /// [R-5.1-6] A clear CLOSE is accepted as the first frame after the switch, and only there.
    @Test func firstSealedFrameMayBeAClearClose() throws {
        // A peer that failed the handshake after this side switched sends its CLOSE in the clear.
        var status = Parley_V1_Status()
        status.code = ParleyError.Code.handshakeTampered.rawValue
        status.message = "tampered"
        var decoder = try opener()
        let decoded = try decodeAll(frameBytes(status.frame(tag: .close)), decoder: &decoder)
        guard case .frame(let f)? = decoded.first else { Issue.record("no frame"); return }
        #expect(f.tag == .close)
        // Anywhere else, a clear frame is a bad tag.
        var second = try opener()
        var bytes = joined(try sealed([sampleFrame()]))
        bytes.writeImmutableBuffer(frameBytes(status.frame(tag: .close)))
        #expect(ParleyError.code { _ = try decodeAll(bytes, decoder: &second) } == .badAuthTag)
        // And a clear frame other than CLOSE is refused even first.
        var third = try opener()
        #expect(ParleyError.code { _ = try decodeAll(frameBytes(sampleFrame()), decoder: &third) } == .badAuthTag)
    }

    /// A clear CLOSE shorter than a sealed preamble (48 bytes) is taken too, at the end of the
    /// stream and before it, once it is whole; before, the decoder waited for 48 bytes and
    /// reported the connection's end as truncated.
    @Test(arguments: ["", "bye"])
    func aShortClearCloseIsTakenFirst(reason: String) throws {
        var status = Parley_V1_Status()
        status.code = ParleyError.Code.authenticationFailed.rawValue
        status.message = reason
        let bytes = frameBytes(status.frame(tag: .close))
        #expect(bytes.readableBytes < 48)
        var atEnd = try opener()
        var b = bytes
        guard case .frame(let f)? = try atEnd.decodeLast(buffer: &b, seenEOF: true) else { Issue.record("refused at the end of the stream"); return }
        let got = try Parley_V1_Status(parleyPayload: f.segments[0])
        #expect(f.tag == .close && got == status)
        var open = try opener()
        var partial = bytes.getSlice(at: bytes.readerIndex, length: bytes.readableBytes - 1)!
        #expect(try open.decode(buffer: &partial) == nil, "not taken before it is whole")
        var whole = bytes
        guard case .frame(let g)? = try open.decode(buffer: &whole) else { Issue.record("refused while the connection is open"); return }
        #expect(g.tag == .close)
    }

    /// [R-5.1-9] The key is updated every 2^32 AEAD messages, by sender and receiver alike.
    /// Started 3 before the update, it falls on a body (frame 1's); 2 or 4 before, on a
    /// preamble: the piecewise opening of the body after it must use the new key either way.
    @Test(arguments: [UInt64(3), 2, 4])
    func keysAreUpdatedEvery2To32MessagesOnBothSides(before: UInt64) throws {
        let start = SecureDirection.keyUpdateInterval - before
        let frames = (0..<4).map { _ in sampleFrame() }
        let wire = try sealed(frames, counter: start)
        for chunk in [0, 7] {
            // In pieces (chunk 7), the bodies before and after the update are opened piece by
            // piece, each under its own key.
            var decoder = try opener(counter: start)
            #expect(try decodeAll(joined(wire), decoder: &decoder, chunk: chunk) == frames.map { .frame($0) }, "chunk \(chunk)")
        }
        // The frame sealed at counter 2^32 used the updated key: an opener that started at 2^32
        // without the update (a fresh direction at counter 0 with the same iv) cannot open it.
        let direction = try SecureDirection(keys: testKeys, sealing: true, counter: start)
        #expect(direction.keys.key == testKeys.key)
        var out: [ByteBuffer] = []
        for _ in 0..<3 { try sampleFrame().seal(with: direction, into: &out, allocator: ByteBufferAllocator()) }
        #expect(direction.keys.key != testKeys.key, "the key changed at 2^32")
    }

    /// [R-5.1-10] The counter never wraps; the last values are kept for a CLOSE.
    @Test func theCounterNeverWrapsACloseIsKeptForLast() throws {
        let sealer = try SecureDirection(keys: testKeys, sealing: true, counter: SecureDirection.lastCounter - 3)
        var out: [ByteBuffer] = []
        try sampleFrame().seal(with: sealer, into: &out, allocator: ByteBufferAllocator())
        #expect(throws: ParleyError.self) { try sampleFrame().seal(with: sealer, into: &out, allocator: ByteBufferAllocator()) }
        let code = ParleyError.code { try sampleFrame().seal(with: sealer, into: &out, allocator: ByteBufferAllocator()) }
        #expect(code == .keyExhausted)
        var status = Parley_V1_Status()
        status.code = ParleyError.Code.keyExhausted.rawValue
        try status.frame(tag: .close).seal(with: sealer, into: &out, allocator: ByteBufferAllocator())
        #expect(ParleyError.code { try status.frame(tag: .close).seal(with: sealer, into: &out, allocator: ByteBufferAllocator()) } == .keyExhausted)
        // The opener at the same place opens both frames, then refuses to go further.
        var decoder = try opener(counter: SecureDirection.lastCounter - 3)
        #expect(try decodeAll(joined(out), decoder: &decoder).count == 2)
    }
}

// MARK: - The secret handshake

/// A client and a server machine over a byte stream each way, with secure mode and a hook
/// that lets a man in the middle edit what crosses.
struct SecurePair {
    var client: ClientHandshakeStateMachine
    var server: ServerHandshakeStateMachine
    var clientDecoder = WireDecoder()
    var serverDecoder = WireDecoder()
    var clientSealer: SecureDirection?
    var serverSealer: SecureDirection?
    var clientOutcome: HandshakeStep.Outcome?
    var serverOutcome: HandshakeStep.Outcome?
    /// Every byte that crossed, both ways (what a capture would hold).
    var captured = ByteBuffer()
    /// What the server sent.
    var fromServer: [WireOutbound] = []
    /// Every step of the client's after `start`.
    var clientSteps: [HandshakeStep] = []
    /// Edits an element a side sends before it is encoded: (from client, element) -> element.
    var tamper: (Bool, WireOutbound) -> WireOutbound = { $1 }

    static let alice = SecretEntity(name: "client.alice", key: Array(repeating: 0xA1, count: 32), capabilities: ["echo"])

    static func clientConfig(
        entity: String = "client.alice", key: [UInt8] = alice.key, modes: [ConnectionMode] = [.secure, .crc],
        methods: [String] = ["secret"], seed: UInt8 = 1
    ) -> ClientHandshakeStateMachine.Configuration {
        var ident = Parley_V1_ClientIdent()
        ident.platform = "client-platform-string"
        ident.implementation = "client-implementation-string"
        ident.version = "1.0.0"
        ident.name = "client-name-string"
        var supported = ParleyFeatures.implemented
        if modes.contains(.secure) { supported.insert(.secureMode) }
        return .init(
            banner: Banner(supported: supported, required: modes == [.secure] ? .secureMode : []), maxFrameSize: 1 << 20,
            authMethods: methods, ident: ident, serverAddress: "127.0.0.1:7420",
            secret: SecretCredentials(entity: entity, key: key), modes: modes,
            randomness: HandshakeRandomness(challenge: Array(repeating: seed, count: 32), keySharePrivateKey: Array(repeating: seed &+ 2, count: 32))
        )
    }

    static func serverConfig(
        entities: [SecretEntity] = [alice], modes: [ConnectionMode] = [.crc, .secure], methods: [String] = ["secret"], now: Int64 = 1000
    ) -> ServerHandshakeStateMachine.Configuration {
        var ident = Parley_V1_ServerIdent()
        ident.implementation = "server-implementation-string"
        ident.name = "server-name-string"
        var supported = ParleyFeatures.implemented
        if modes.contains(.secure) { supported.insert(.secureMode) }
        return .init(
            banner: Banner(supported: supported, required: modes == [.secure] ? .secureMode : []), maxFrameSize: 1 << 20,
            authMethods: methods, ident: ident, clientAddress: "127.0.0.1:50000", modes: modes,
            secrets: SecretDirectory(entities), now: now,
            randomness: HandshakeRandomness(challenge: Array(repeating: 0x55, count: 32), keySharePrivateKey: Array(repeating: 0x66, count: 32)),
            globalID: 42
        )
    }

    init(client: ClientHandshakeStateMachine.Configuration = SecurePair.clientConfig(), server: ServerHandshakeStateMachine.Configuration = SecurePair.serverConfig()) {
        self.client = ClientHandshakeStateMachine(configuration: client)
        self.server = ServerHandshakeStateMachine(configuration: server)
    }

    /// Encodes what one side sends, sealing once it switched.
    mutating func encode(_ elements: [WireOutbound], fromClient: Bool) throws -> ByteBuffer {
        var out = ByteBuffer()
        if !fromClient { self.fromServer += elements }
        for element in elements {
            switch self.tamper(fromClient, element) {
            case .banner(let b): out.writeBanner(b)
            case .frame(let f):
                var parts: [ByteBuffer] = []
                if let sealer = fromClient ? self.clientSealer : self.serverSealer {
                    try f.seal(with: sealer, into: &parts, allocator: ByteBufferAllocator())
                } else {
                    f.encode(into: &parts, allocator: ByteBufferAllocator())
                }
                for var p in parts { out.writeBuffer(&p) }
            case .startSealing(let secure):
                let direction = try SecureDirection(keys: secure.keys, sealing: true)
                if fromClient { self.clientSealer = direction } else { self.serverSealer = direction }
            }
        }
        self.captured.writeImmutableBuffer(out)
        return out
    }

    /// Runs the handshake, then each established side sends one MESSAGE: returns what each
    /// side received of the other's MESSAGE (nil if none got through).
    mutating func run() throws -> (atServer: WireMessage?, atClient: WireMessage?) {
        var c2s = try self.encode(self.client.start().send, fromClient: true)
        var s2c = try self.encode(self.server.start().send, fromClient: false)
        var atServer: WireMessage?
        var atClient: WireMessage?
        var rounds = 0
        while (c2s.readableBytes > 0 || s2c.readableBytes > 0) && rounds < 100 {
            rounds += 1
            var nextC2S = ByteBuffer()
            var nextS2C = ByteBuffer()
            do {
                while self.clientOutcome.map(Self.isEstablished) ?? true, let element = try self.clientDecoder.decode(buffer: &s2c) {
                    if case .frame(let f) = element, f.tag == .message { atClient = try WireMessage(frame: f); continue }
                    if case .frame(let f) = element, f.tag == .close, self.clientOutcome != nil {
                        self.clientOutcome = .failed(ParleyError(peerClose: try Parley_V1_Status(parleyPayload: f.segments[0])))
                        continue
                    }
                    let step = self.client.received(element)
                    self.clientSteps.append(step)
                    nextC2S.writeImmutableBuffer(try self.encode(step.send, fromClient: true))
                    if let secure = step.startOpening { self.clientDecoder.startOpening(try SecureDirection(keys: secure.keys, sealing: false)) }
                    if let outcome = step.outcome {
                        self.clientOutcome = outcome
                        if Self.isEstablished(outcome) { nextC2S.writeImmutableBuffer(try self.encode([.frame(Self.message("to-server-payload"))], fromClient: true)) }
                    }
                }
            } catch let error as ParleyError {
                self.clientOutcome = .failed(error)
            }
            do {
                while self.serverOutcome.map(Self.isEstablished) ?? true, let element = try self.serverDecoder.decode(buffer: &c2s) {
                    if case .frame(let f) = element, f.tag == .message { atServer = try WireMessage(frame: f); continue }
                    if case .frame(let f) = element, f.tag == .close, self.serverOutcome != nil {
                        // In the session: the peer closed (as the session machine reports it).
                        self.serverOutcome = .failed(ParleyError(peerClose: try Parley_V1_Status(parleyPayload: f.segments[0])))
                        continue
                    }
                    let step = self.server.received(element)
                    nextS2C.writeImmutableBuffer(try self.encode(step.send, fromClient: false))
                    if let secure = step.startOpening { self.serverDecoder.startOpening(try SecureDirection(keys: secure.keys, sealing: false)) }
                    if let outcome = step.outcome {
                        self.serverOutcome = outcome
                        if Self.isEstablished(outcome) { nextS2C.writeImmutableBuffer(try self.encode([.frame(Self.message("to-client-payload"))], fromClient: false)) }
                    }
                }
            } catch let error as ParleyError {
                self.serverOutcome = .failed(error)
            }
            c2s.writeImmutableBuffer(nextC2S)
            s2c.writeImmutableBuffer(nextS2C)
        }
        return (atServer, atClient)
    }

    static func isEstablished(_ outcome: HandshakeStep.Outcome) -> Bool {
        if case .established = outcome { return true }
        return false
    }

    static func message(_ text: String) -> Frame {
        WireMessage(header: MessageHeader(seq: 1, ack: 0, id: 1, kind: .request, type: "t.Msg"), payload: buffer(text))
            .frame(allocator: ByteBufferAllocator())
    }

    var clientError: ParleyError? { Pair.failure(self.clientOutcome) }
    var serverError: ParleyError? { Pair.failure(self.serverOutcome) }
}

/// Re-encodes a control frame after editing its payload.
func edited<M: SwiftProtobuf.Message>(_ frame: Frame, as type: M.Type, _ change: (inout M) -> Void) -> Frame {
    var message = try! M(serializedBytes: Array(frame.segments[0].readableBytesView))
    change(&message)
    return Frame(tag: frame.tag, segments: [ByteBuffer(bytes: try! message.serializedBytes() as [UInt8])])
}

@Suite struct SecretHandshakeTests {
    /// [R-5.1-11] The server chooses the first mode of the client's list that it allows.
    @Test(arguments: [[ConnectionMode.secure, .crc], [.crc]])
    func establishesAndCarriesMessages(modes: [ConnectionMode]) throws {
        var pair = SecurePair(client: SecurePair.clientConfig(modes: modes))
        let (atServer, atClient) = try pair.run()
        let c = try #require(Pair.established(pair.clientOutcome))
        let s = try #require(Pair.established(pair.serverOutcome))
        #expect(c.connectionMode == modes[0] && s.connectionMode == modes[0])
        #expect(c.cipher == (modes[0] == .secure ? SecureCipher.preferred[0] : nil))
        #expect(c.entity == "client.alice" && s.entity == "client.alice")
        #expect(s.capabilities == ["echo"])
        #expect(c.globalID == 42 && s.globalID == 42)
        #expect(s.clientIdent.name == "client-name-string")
        #expect(c.serverIdent.name == "server-name-string")
        #expect(atServer.map { String(buffer: $0.payload) } == "to-server-payload")
        #expect(atClient.map { String(buffer: $0.payload) } == "to-client-payload")
    }

    /// [R-6.1-6] MESSAGEs may follow CLIENT_IDENT at once in secure mode only: the step that
    /// sends CLIENT_IDENT says so, with the banners' features and the server's frame limit.
    @Test(arguments: [[ConnectionMode.secure, .crc], [.crc]])
    func earlyMessagesAreAllowedInSecureModeOnly(modes: [ConnectionMode]) throws {
        var pair = SecurePair(client: SecurePair.clientConfig(modes: modes))
        _ = try pair.run()
        let c = try #require(Pair.established(pair.clientOutcome))
        let granting = pair.clientSteps.filter { $0.earlyMessages != nil }
        let identStep = try #require(pair.clientSteps.first { step in
            step.send.contains { if case .frame(let f) = $0 { return f.tag == .clientIdent } else { return false } }
        })
        if modes[0] == .secure {
            #expect(granting.count == 1)
            #expect(identStep.earlyMessages == EarlyMessageTerms(features: c.features, peerMaxFrameSize: 1 << 20))
            #expect(c.earlyMessagesAllowed)
        } else {
            #expect(granting.isEmpty)
            #expect(!c.earlyMessagesAllowed)
        }
    }

    /// [R-6.1-6] Not with feature bit 9: a lossless session numbers its messages itself.
    @Test func noEarlyMessagesInALosslessSession() throws {
        var client = SecurePair.clientConfig(modes: [.secure])
        var server = SecurePair.serverConfig()
        client.banner.supported.insert(.reconnect)
        server.banner.supported.insert(.reconnect)
        server.sessionToken = Array(repeating: 9, count: SessionToken.size)
        var pair = SecurePair(client: client, server: server)
        _ = try pair.run()
        let c = try #require(Pair.established(pair.clientOutcome))
        #expect(c.connectionMode == .secure && c.features.contains(.reconnect))
        #expect(pair.clientSteps.allSatisfy { $0.earlyMessages == nil })
        #expect(!c.earlyMessagesAllowed)
    }

    @Test func aSecureCaptureHoldsNoSecretNoPayloadNoIdentity() throws {
        var pair = SecurePair()
        _ = try pair.run()
        #expect(Pair.established(pair.clientOutcome)?.connectionMode == .secure)
        let capture = Array(pair.captured.readableBytesView)
        func contains(_ needle: [UInt8]) -> Bool {
            guard needle.count <= capture.count else { return false }
            return (0...(capture.count - needle.count)).contains { Array(capture[$0..<($0 + needle.count)]) == needle }
        }
        for text in ["client.alice", "client-name-string", "client-platform-string", "client-implementation-string",
                     "server-name-string", "server-implementation-string", "to-server-payload", "to-client-payload"] {
            #expect(!contains(Array(text.utf8)), "\(text) appears in the capture")
        }
        #expect(!contains(SecurePair.alice.key), "the key appears in the capture")
        #expect(!contains(Array(SecurePair.alice.key.prefix(8))))
        // The check itself works: the same session in crc mode shows its strings.
        var crc = SecurePair(client: SecurePair.clientConfig(modes: [.crc]))
        _ = try crc.run()
        #expect(String(decoding: crc.captured.readableBytesView, as: UTF8.self).contains("to-server-payload"))
    }

    @Test func wrongKeyIsRefusedWithAClearErrorOnBothSides() throws {
        var pair = SecurePair(client: SecurePair.clientConfig(key: Array(repeating: 0xEE, count: 32)))
        _ = try pair.run()
        #expect(pair.serverError?.code == .authenticationFailed)
        #expect(pair.serverError?.message.contains("wrong key for \"client.alice\"") == true)
        #expect(pair.clientError?.code == .authenticationFailed)
        #expect(pair.clientError?.message.contains("wrong key") == true, "the client reads the server's CLOSE")
    }

    /// [R-5.1-4] The server's checks of AUTH_REQUEST_MORE: unknown, revoked and expired
    /// entities are each refused with `authenticationFailed` and their own message.
    @Test func unknownRevokedAndExpiredEntitiesEachHaveTheirError() throws {
        var unknown = SecurePair(client: SecurePair.clientConfig(entity: "client.mallory"))
        _ = try unknown.run()
        #expect(unknown.clientError?.message.contains("as \"client.mallory\"") == true && unknown.clientError?.message.contains("the entity is not in the server's keyring") == true, "\(String(describing: unknown.clientError))")
        #expect(unknown.serverError?.message.contains("unknown entity \"client.mallory\"") == true, "the server logs the name")
        #expect(!occurs(Array("client.mallory".utf8), in: Array(unknown.captured.readableBytesView)), "the name stays out of what travels in the clear")
        var revokedAlice = SecurePair.alice
        revokedAlice.revoked = true
        var revoked = SecurePair(server: SecurePair.serverConfig(entities: [revokedAlice]))
        _ = try revoked.run()
        #expect(revoked.clientError?.message.contains("has been revoked") == true)
        var expiredAlice = SecurePair.alice
        expiredAlice.expires = 999
        var expired = SecurePair(server: SecurePair.serverConfig(entities: [expiredAlice], now: 1000))
        _ = try expired.run()
        #expect(expired.clientError?.message.contains("expired") == true)
        #expect(expired.serverError?.message.contains("expired") == true)
        for pair in [unknown, revoked, expired] { #expect(pair.clientError?.code == .authenticationFailed) }
        var future = SecurePair.alice
        future.expires = 1001
        var valid = SecurePair(server: SecurePair.serverConfig(entities: [future], now: 1000))
        _ = try valid.run()
        #expect(Pair.established(valid.clientOutcome) != nil)
    }

    /// [R-5.1-1] A server refuses a method outside its policy, and `none` when its only mode is
    /// `secure`, saying why.
    @Test func aClientOfferingOnlyRefusedMethodsFails() throws {
        var pair = SecurePair(client: SecurePair.clientConfig(modes: [.crc], methods: ["none"]))
        _ = try pair.run()
        #expect(pair.clientError?.code == .authenticationFailed)
        #expect(pair.clientError?.message.contains("no common authentication method") == true)
        // A secure-only server refuses none even when it lists it, saying why.
        var secureOnly = SecurePair(
            client: SecurePair.clientConfig(modes: [.secure], methods: ["none"]),
            server: SecurePair.serverConfig(modes: [.secure], methods: ["secret", "none"])
        )
        _ = try secureOnly.run()
        #expect(secureOnly.clientError?.message.contains("cannot key secure mode") == true)
    }

    /// Methods none and tls give crc mode only (section 5.1, R-5.1-11): an AUTH_REQUEST of
    /// method none offering secure mode only has no mode in common with the server, which
    /// refuses it (CLOSE authenticationFailed) rather than answering AUTH_DONE in crc mode.
    @Test func methodNoneOfferingOnlySecureModeHasNoCommonMode() throws {
        var pair = SecurePair(
            client: SecurePair.clientConfig(modes: [.crc], methods: ["none"]),
            server: SecurePair.serverConfig(modes: [.crc, .secure], methods: ["none", "secret"])
        )
        pair.tamper = { from, element in
            guard from, case .frame(let f) = element, f.tag == .authRequest, var auth = try? Parley_V1_AuthRequest(parleyPayload: f.segments[0]) else { return element }
            auth.offeredModes = [ConnectionMode.secure.rawValue]
            return .frame(auth.frame(tag: .authRequest))
        }
        _ = try pair.run()
        #expect(pair.serverError?.code == .authenticationFailed, "\(String(describing: pair.serverError))")
        #expect(pair.serverError?.message.contains("crc mode only") == true)
        #expect(Pair.established(pair.serverOutcome) == nil)
        // Offering crc (or nothing, which means crc) is served as before.
        var plain = SecurePair(
            client: SecurePair.clientConfig(modes: [.crc], methods: ["none"]),
            server: SecurePair.serverConfig(modes: [.crc, .secure], methods: ["none", "secret"])
        )
        _ = try plain.run()
        #expect(Pair.established(plain.serverOutcome) != nil)
    }

    @Test func aSecureOnlyServerRefusesAClientWithoutSecureModeAtTheBanner() throws {
        var pair = SecurePair(client: SecurePair.clientConfig(modes: [.crc]), server: SecurePair.serverConfig(modes: [.secure]))
        _ = try pair.run()
        #expect(pair.serverError?.code == .missingFeatures)
        #expect(pair.clientError?.code == .missingFeatures)
        let tags = pair.fromServer.map { element -> String in
            if case .frame(let f) = element { return f.tag.description }
            return "banner"
        }
        #expect(tags == ["banner", "HELLO"], "the server sent nothing but its banner and HELLO")
    }

    // MARK: Man in the middle

    @Test func strippingTheSecureBitFromABannerIsDetected() throws {
        for fromClient in [true, false] {
            var pair = SecurePair()
            pair.tamper = { from, element in
                guard from == fromClient, case .banner(var b) = element else { return element }
                b.supported.remove(.secureMode)
                return .banner(b)
            }
            _ = try pair.run()
            #expect(pair.clientError != nil && pair.serverError != nil, "from client: \(fromClient)")
            let detected = pair.clientError?.code == .handshakeTampered || pair.serverError?.code == .handshakeTampered
            #expect(detected, "from client: \(fromClient)")
            #expect(Pair.established(pair.clientOutcome) == nil && Pair.established(pair.serverOutcome) == nil)
        }
    }

    @Test func removingAnOfferedMethodOrModeIsDetected() throws {
        var pair = SecurePair(client: SecurePair.clientConfig(methods: ["secret", "none"]))
        pair.tamper = { from, element in
            guard from, case .frame(let f) = element, f.tag == .authRequest else { return element }
            return .frame(edited(f, as: Parley_V1_AuthRequest.self) { $0.offeredMethods = ["secret"]; $0.offeredModes = ["crc"] })
        }
        _ = try pair.run()
        #expect(pair.serverError?.code == .handshakeTampered)
        #expect(pair.clientError?.code == .handshakeTampered, "the client reads the server's CLOSE")
    }

    @Test func rewritingTheChosenModeIsDetected() throws {
        // In the challenge: the server notices the client's transcript differs.
        var challenge = SecurePair()
        challenge.tamper = { from, element in
            guard !from, case .frame(let f) = element, f.tag == .authReplyMore else { return element }
            return .frame(edited(f, as: Parley_V1_AuthMore.self) { more in
                var c = try! Parley_V1_SecretAuthChallenge(serializedBytes: more.payload)
                c.connectionMode = "crc"
                c.cipher = ""
                more.payload = try! c.serializedBytes()
            })
        }
        _ = try challenge.run()
        #expect(challenge.serverError?.code == .handshakeTampered)
        #expect(Pair.established(challenge.clientOutcome) == nil)
        // In AUTH_DONE: the client notices, and the server reads its (sealed) CLOSE.
        var done = SecurePair()
        done.tamper = { from, element in
            guard !from, case .frame(let f) = element, f.tag == .authDone else { return element }
            return .frame(edited(f, as: Parley_V1_AuthDone.self) { $0.connectionMode = "crc"; $0.cipher = "" })
        }
        _ = try done.run()
        #expect(done.clientError?.code == .handshakeTampered)
        #expect(done.serverError?.code == .handshakeTampered)
    }

    /// [R-5.1-3] The client refuses an AUTH_REPLY_MORE whose mode or cipher it did not offer
    /// (`authenticationFailed`), before it proves anything.
    @Test func aChallengeWithAModeOrCipherNotOfferedIsRefusedByTheClient() throws {
        // An empty mode is not taken for crc in the challenge (docs/protocol.md R-5.1-3).
        for (mode, cipher) in [("carrier-pigeon", ""), ("secure", "rot13"), ("", "")] {
            var pair = SecurePair()
            pair.tamper = { from, element in
                guard !from, case .frame(let f) = element, f.tag == .authReplyMore else { return element }
                return .frame(edited(f, as: Parley_V1_AuthMore.self) { more in
                    var c = try! Parley_V1_SecretAuthChallenge(serializedBytes: more.payload)
                    c.connectionMode = mode
                    c.cipher = cipher
                    more.payload = try! c.serializedBytes()
                })
            }
            _ = try pair.run()
            #expect(pair.clientError?.code == .authenticationFailed, "mode \(mode) cipher \(cipher): \(String(describing: pair.clientError))")
            #expect(Pair.established(pair.clientOutcome) == nil && Pair.established(pair.serverOutcome) == nil)
        }
    }

    /// R-5.1-2, R-5.1-3: a key share whose X25519 result is all zeros (a low-order point, RFC
    /// 7748 section 6.1) is refused with `authenticationFailed`, by the server in the client's
    /// AUTH_REQUEST and by the client in the server's challenge.
    @Test func lowOrderKeySharesAreRefusedOnBothSides() throws {
        // The point of order 1 (u = 0) and one of order 8 (u = 1): either gives a zero secret.
        for point in [[UInt8](repeating: 0, count: 32), [1] + [UInt8](repeating: 0, count: 31)] {
            var toServer = SecurePair()
            toServer.tamper = { from, element in
                guard from, case .frame(let f) = element, f.tag == .authRequest, var auth = try? Parley_V1_AuthRequest(parleyPayload: f.segments[0]),
                      var request = try? Parley_V1_SecretAuthRequest(serializedBytes: auth.payload) else { return element }
                request.clientKeyShare = Data(point)
                auth.payload = try! request.serializedBytes()
                return .frame(auth.frame(tag: .authRequest))
            }
            _ = try toServer.run()
            #expect(toServer.serverError?.code == .authenticationFailed && toServer.serverError?.message.contains("X25519") == true, "\(String(describing: toServer.serverError))")
            var toClient = SecurePair()
            toClient.tamper = { from, element in
                guard !from, case .frame(let f) = element, f.tag == .authReplyMore else { return element }
                return .frame(edited(f, as: Parley_V1_AuthMore.self) { more in
                    var c = try! Parley_V1_SecretAuthChallenge(serializedBytes: more.payload)
                    c.serverKeyShare = Data(point)
                    more.payload = try! c.serializedBytes()
                })
            }
            _ = try toClient.run()
            #expect(toClient.clientError?.code == .authenticationFailed && toClient.clientError?.message.contains("X25519") == true, "\(String(describing: toClient.clientError))")
            #expect(Pair.established(toClient.clientOutcome) == nil && Pair.established(toClient.serverOutcome) == nil)
        }
    }

    /// [R-5.1-5] The client refuses an AUTH_DONE whose server proof is wrong.
    @Test func anImpostorServerWithoutTheKeyIsDetectedByTheClient() throws {
        // What a server that does not hold alice's key can at best send: a wrong proof.
        var pair = SecurePair()
        pair.tamper = { from, element in
            guard !from, case .frame(let f) = element, f.tag == .authDone else { return element }
            return .frame(edited(f, as: Parley_V1_AuthDone.self) { done in
                var p = try! Parley_V1_SecretAuthDone(serializedBytes: done.payload)
                p.serverProof = Data(repeating: 0, count: 32)
                done.payload = try! p.serializedBytes()
            })
        }
        _ = try pair.run()
        #expect(pair.clientError?.code == .authenticationFailed)
        #expect(pair.clientError?.message.contains("did not prove it holds the key") == true)
    }
}

/// Prints the secure-mode vectors of docs/protocol.md section 5.1 from the implementation
/// (`PARLEY_PRINT_SECURE_VECTORS=1 swift test --filter printSecureVectors`); the document
/// tests then check the document against the implementation.
@Suite struct SecureVectorPrinter {
    @Test(.enabled(if: ProcessInfo.processInfo.environment["PARLEY_PRINT_SECURE_VECTORS"] != nil))
    func printSecureVectors() throws {
        func hex(_ b: [UInt8]) -> String { b.hexString }
        func wireLines(_ b: [UInt8]) -> String {
            stride(from: 0, to: b.count, by: 16).map { "  " + hex(Array(b[$0..<min($0 + 16, b.count)])) }.joined(separator: "\n")
        }
        func sealedVector(name: String, keys: SecureDirectionKeys, counter: UInt64, tag: String, segments: [String], frame: Frame) throws {
            let wire = Array(try sealed([frame], keys: keys, counter: counter)[0].readableBytesView)
            print("```vector\nname: \(name)\nkind: sealed\ncipher: \(keys.cipher.rawValue)\nkey: \(hex(keys.key))\niv: \(hex(keys.iv))\ncounter: \(counter)\ntag: \(tag)\nflags: 0")
            for s in segments { print("segment: \(s)") }
            print("wire:\n" + wireLines(wire) + "\n```\n")
        }
        try sealedVector(name: "sealed-keepalive", keys: testKeys, counter: 0, tag: "0x12 KEEPALIVE", segments: ["u64le 1"],
                         frame: Frame(tag: .keepalive, segments: [ByteBuffer(bytes: [1, 0, 0, 0, 0, 0, 0, 0])]))
        let chacha = SecureDirectionKeys(cipher: .chacha20Poly1305, key: testKeys.key, iv: testKeys.iv)
        var ping = Parley_V1_Status()
        ping.code = 18
        ping.message = "bye"
        try sealedVector(name: "sealed-close-chacha", keys: chacha, counter: 6, tag: "0x14 CLOSE",
                         segments: ["proto parley.v1.Status {\"code\":18,\"message\":\"bye\"}"], frame: ping.frame(tag: .close))
        try sealedVector(name: "sealed-keepalive-after-key-update", keys: testKeys, counter: SecureDirection.keyUpdateInterval, tag: "0x12 KEEPALIVE",
                         segments: ["u64le 2"], frame: Frame(tag: .keepalive, segments: [ByteBuffer(bytes: [2, 0, 0, 0, 0, 0, 0, 0])]))
        // Method secret.
        let key = SecurePair.alice.key
        let cc = [UInt8](repeating: 0x01, count: 32), cp = [UInt8](repeating: 0x03, count: 32)
        let sc = [UInt8](repeating: 0x55, count: 32), sp = [UInt8](repeating: 0x66, count: 32)
        let t1 = [UInt8](repeating: 0x11, count: 32), t2 = [UInt8](repeating: 0x22, count: 32)
        let shared = try SecretKeyShare.sharedSecret(privateKey: cp, peerPublicKey: try SecretKeyShare.publicKey(privateKey: sp))
        let schedule = SecretKeySchedule(entity: "client.alice", key: key, clientChallenge: cc, serverChallenge: sc, sharedSecret: shared)
        let traffic = schedule.trafficKeys(cipher: .aes256GCM, transcript: t2)
        print("""
            ```vector
            name: secret-key-schedule
            kind: secret
            entity: client.alice
            key: \(hex(key))
            client-challenge: \(hex(cc))
            client-share-private: \(hex(cp))
            server-challenge: \(hex(sc))
            server-share-private: \(hex(sp))
            t1: \(hex(t1))
            t2: \(hex(t2))
            global-id: 42
            cipher: aes-256-gcm
            client-share: \(hex(try SecretKeyShare.publicKey(privateKey: cp)))
            server-share: \(hex(try SecretKeyShare.publicKey(privateKey: sp)))
            shared: \(hex(shared))
            sealed-entity: \(hex(SecretIdentity.seal(entity: "client.alice", clientChallenge: cc, serverChallenge: sc, sharedSecret: shared)))
            client-proof: \(hex(schedule.clientProof))
            server-proof: \(hex(schedule.serverProof))
            client-transcript-mac: \(hex(schedule.clientTranscriptMAC(t1)))
            server-transcript-mac: \(hex(schedule.serverTranscriptMAC(t2, globalID: 42)))
            key-c2s: \(hex(traffic.clientToServer.key))
            iv-c2s: \(hex(traffic.clientToServer.iv))
            key-s2c: \(hex(traffic.serverToClient.key))
            iv-s2c: \(hex(traffic.serverToClient.iv))
            wire:
            ```

            """)
        // The transcript of a secret handshake's first records.
        var transcript = HandshakeTranscript()
        transcript.clientBanner = HandshakeTranscript.bannerBytes(Banner(supported: [.streams, .keepalive, .notice, .dataSegment, .secureMode]))
        transcript.serverBanner = HandshakeTranscript.bannerBytes(Banner(supported: [.streams, .keepalive, .notice, .dataSegment, .secureMode]))
        var hello = Parley_V1_Hello()
        hello.entityType = .client
        transcript.clientHello = try hello.serializedBytes()
        hello.entityType = .server
        transcript.serverHello = try hello.serializedBytes()
        var auth = Parley_V1_AuthRequest()
        auth.method = "secret"
        auth.offeredMethods = ["secret"]
        transcript.auth = [.init(fromClient: true, tag: 0x02, bytes: try auth.serializedBytes())]
        print("```vector\nname: transcript-records\nkind: transcript")
        print("record: C 0 \(hex(transcript.clientBanner))\nrecord: S 0 \(hex(transcript.serverBanner))")
        print("record: C 1 \(hex(transcript.clientHello))\nrecord: S 1 \(hex(transcript.serverHello))")
        print("record: C 2 \(hex(transcript.auth[0].bytes))\ndigest: \(hex(transcript.digest()))\nwire:\n```")
    }
}

/// Whether `needle` occurs in `haystack`.
func occurs(_ needle: [UInt8], in haystack: [UInt8]) -> Bool {
    guard !needle.isEmpty, haystack.count >= needle.count else { return false }
    return (0...(haystack.count - needle.count)).contains { Array(haystack[$0..<$0 + needle.count]) == needle }
}
