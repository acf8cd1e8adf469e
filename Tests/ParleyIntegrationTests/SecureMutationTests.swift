import Foundation
import Logging
import NIOCore
import NIOPosix
import Parley
import ParleyServices
import ParleyTestSupport
import ParleyWire
import Testing

/// Corrupted client byte streams against a live server with `--auth secret --mode crc,secure`
/// (in this process, over TCP and a Unix socket), as `MutationTests` does for crc mode.
///
/// Two sources of variants:
/// - *replayed*: a recorded valid secure session (captured from a real client), mutated and
///   replayed on a fresh connection. The server's challenge is fresh per connection, so a
///   replay never gets past AUTH_REQUEST_MORE: this exercises the clear part of the handshake.
/// - *live*: the test runs the handshake itself (the sans-IO client machine over a raw
///   socket), so it holds the real traffic keys, then sends CLIENT_IDENT and requests sealed
///   and mutates the sealed stream: this exercises the server's opening of sealed frames.
///
/// The server must never crash or hang, every connection must end within a bound, every error
/// it logs names a known code, and a fresh valid client is served at the end.
/// `PARLEY_SECURE_MUTATION_VARIANTS` sets the number of variants of each kind (default 3000).
@Suite(.timeLimit(.minutes(10)))
struct SecureMutationTests {
    static var variants: Int { Int(ProcessInfo.processInfo.environment["PARLEY_SECURE_MUTATION_VARIANTS"] ?? "") ?? 3000 }
    static let workers = 8
    /// How long a variant may keep its connection open: a hang detector, generous because a
    /// full parallel test run on two cores once starved variants past 10 s.
    static let bound: Double = 30

    /// A server with method secret over a fresh keyring, crc and secure mode allowed.
    static func withSecureServer(
        logs: LogCollector, _ body: (ParleyServer, [ParleyAddress], SecretCredentials) async throws -> Void
    ) async throws {
        let dir = freshTestDirectory("secure-mutation")
        let keys = try writeKeyring(dir + "/server.keyring", [("client.alice", ["*"])])
        let source = try ParleyKeyringSource(path: dir + "/server.keyring")
        try await withOwnEventLoop { ownGroup in
            try await withServer(
                listen: [.unix(path: dir + "/s.sock"), .tcp(host: "127.0.0.1", port: 0)],
                configure: { $0.authMethods = [AuthMethod.secret]; $0.modes = [.crc, .secure]; $0.keyring = source },
                logger: logs.logger("server", level: .warning), group: ownGroup
            ) { server, addresses in
                try await body(server, addresses, SecretCredentials(entity: "client.alice", key: keys["client.alice"]!))
            }
        }
    }

    /// Checks the end state common to both tests.
    static func checkAfterwards(_ server: ParleyServer, _ addresses: [ParleyAddress], _ credentials: SecretCredentials, logs: LogCollector,
                                hangs: Counter, done: Counter, expectCodes: [ParleyError.Code]) async throws {
        #expect(done.count == Self.variants)
        #expect(hangs.count == 0)
        let errors = logs.all.filter { $0.message == "connection closed on error" }
        let knownNames = ParleyError.Code.allKnown.map(\.description)
        let unclear = errors.filter { record in !knownNames.contains { record.metadata.contains("\($0) (") } }
        #expect(unclear.isEmpty, "errors without a code: \(unclear.prefix(3).map(\.metadata))")
        #expect(errors.count > Self.variants / 3, "most variants were refused with a logged error (\(errors.count))")
        for code in expectCodes {
            #expect(errors.contains { $0.metadata.contains("\(code) (") }, "no variant was refused with \(code)")
        }
        // A fresh valid client, in secure mode, is still served; nothing is left open.
        let after = try await ParleyClient.connect(to: addresses[1], configuration: .init(secret: credentials), logger: quietLogger)
        defer { after.close() }
        #expect(after.session.connectionMode == .secure)
        #expect(try await ping(after, 1) == 1)
        #expect(try await eventually { server.connectionCount <= 1 })
    }

    // MARK: Replayed

    /// Frame offsets of the clear part of a secure client stream (after the banner, through
    /// AUTH_REQUEST_MORE), and where the sealed part starts.
    static func clearFrames(_ bytes: [UInt8]) -> (offsets: [Int], sealedStart: Int) {
        var offsets: [Int] = []
        var at = Banner.size
        while at + Frame.preambleSize <= bytes.count {
            offsets.append(at)
            let tag = bytes[at], count = Int(bytes[at + 2])
            var total = 0
            for i in 0..<count {
                let o = at + 4 + 6 * i
                total += Int(bytes[o]) | Int(bytes[o + 1]) << 8 | Int(bytes[o + 2]) << 16 | Int(bytes[o + 3]) << 24
            }
            at += Frame.preambleSize + total + 4 * count
            if tag == FrameTag.authRequestMore.rawValue { break }
        }
        return (offsets, at)
    }

    static func mutate(_ seed: [UInt8], n: Int, rng: inout SplitMix) -> (bytes: [UInt8], kind: String) {
        var b = seed
        let (offsets, sealedStart) = Self.clearFrames(seed)
        func random(_ bound: Int) -> Int { Int(rng.next() % UInt64(max(1, bound))) }
        switch n % 8 {
        case 0:  // bit flips anywhere
            for _ in 0..<(1 + random(4)) { b[random(b.count)] ^= UInt8(1) << UInt8(random(8)) }
            return (b, "bitflip")
        case 1:  // bit flips in the clear handshake (banner, HELLO, AUTH frames)
            for _ in 0..<(1 + random(3)) { b[random(sealedStart)] ^= UInt8(1) << UInt8(random(8)) }
            return (b, "bitflip-clear")
        case 2:
            return (Array(b.prefix(random(b.count))), "truncate")
        case 3:  // a clear frame's length or preamble rewritten, its CRC fixed so it is believed
            let at = offsets[random(offsets.count)]
            if rng.next() % 2 == 0 {
                let choices: [UInt32] = [UInt32.max, 1 << 31, UInt32(Frame.defaultMaxFrameSize + 1), 1 << 20, UInt32(random(5000))]
                let length = choices[random(choices.count)]
                let seg = at + 4 + 6 * random(max(1, Int(b[at + 2])))
                for i in 0..<4 { b[seg + i] = UInt8(truncatingIfNeeded: length >> (8 * UInt32(i))) }
            } else {
                b[at + random(4)] = UInt8(truncatingIfNeeded: rng.next())
            }
            MutationTests.fixPreambleCRC(&b, at: at)
            return (b, "preamble")
        case 4:  // a clear frame dropped or duplicated (handshake steps missing or repeated)
            let bounds = offsets + [sealedStart]
            let i = random(bounds.count - 1)
            let frame = Array(b[bounds[i]..<bounds[i + 1]])
            if rng.next() % 2 == 0 {
                b.insert(contentsOf: frame, at: bounds[random(bounds.count)])
                return (b, "duplicate")
            }
            b.removeSubrange(bounds[i]..<bounds[i + 1])
            return (b, "drop")
        case 5:  // the sealed part cut, shifted or cut short by a byte
            var tail = Array(b[sealedStart...])
            switch rng.next() % 3 {
            case 0: tail.removeFirst(min(tail.count, 1 + random(47)))
            case 1: tail = Array(tail.prefix(random(tail.count)))
            default: tail.insert(UInt8(truncatingIfNeeded: rng.next()), at: random(tail.count))
            }
            return (Array(b[..<sealedStart]) + tail, "sealed-shift")
        case 6:  // the handshake only, then the clear frames of a crc session
            var clear = ByteBuffer()
            var session = SessionStateMachine(role: .client, features: .implemented)
            clear.writeFrame(Parley_V1_ClientIdent().frame(tag: .clientIdent))
            clear.writeFrame(try! session.frame(for: pingMessage(id: 1), allocator: ByteBufferAllocator()))
            return (Array(b[..<sealedStart]) + Array(clear.readableBytesView), "clear-after-switch")
        default:  // random bytes inserted or overwritten
            let i = random(b.count)
            let junk = (0..<(1 + random(16))).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            if rng.next() % 2 == 0 { b.insert(contentsOf: junk, at: i) } else {
                for (k, v) in junk.enumerated() where i + k < b.count { b[i + k] = v }
            }
            return (b, "junk")
        }
    }

    @Test func replayedVariantsOfARecordedSecureSession() async throws {
        let logs = LogCollector()
        try await Self.withSecureServer(logs: logs) { server, addresses, credentials in
            // Record a valid secure session from a real client.
            let capture = testScratchPath("secure-seed-\(UUID().uuidString.prefix(8)).out")
            let client = try await ParleyClient.connect(to: addresses[1], configuration: .init(captureOutbound: capture, secret: credentials), logger: quietLogger)
            #expect(client.session.connectionMode == .secure)
            #expect(try await ping(client, 1) == 1)
            var echo = Parley_Echo_V1_Echo()
            echo.payload = Data(repeating: 5, count: 300)
            _ = try await client.call(echo, data: ByteBuffer(repeating: 9, count: 1000), as: Parley_Echo_V1_EchoReply.self)
            client.close()
            await client.closed()
            let seed = [UInt8](try Data(contentsOf: URL(fileURLWithPath: capture)))
            let (offsets, sealedStart) = Self.clearFrames(seed)
            #expect(offsets.count == 3, "HELLO, AUTH_REQUEST, AUTH_REQUEST_MORE in the clear")
            #expect(seed.count > sealedStart + 200, "then sealed frames")
            // The seed replayed as is: refused (the server's challenge is fresh), not hung.
            let (_, closed) = try await RawPeer.connect(addresses[1]).exchange(ByteBuffer(bytes: seed), seconds: Self.bound)
            #expect(closed)
            #expect(try await eventually { logs.all.contains { $0.metadata.contains("handshakeTampered") } }, "a replay is refused as tampered")

            let hangs = Counter(), done = Counter()
            let variants = Self.variants, workers = Self.workers
            try await withThrowingTaskGroup(of: Void.self) { group in
                for w in 0..<workers {
                    group.addTask {
                        var rng = SplitMix(seed: 0x5EC0DE &+ UInt64(w) &* 7919)
                        var n = w
                        while n < variants {
                            let (bytes, kind) = Self.mutate(seed, n: n, rng: &rng)
                            let peer = try await RawPeer.connect(n % 16 == 0 ? addresses[1] : addresses[0])
                            let (_, closed) = try await peer.exchange(ByteBuffer(bytes: bytes), seconds: Self.bound)
                            if !closed {
                                hangs.increment()
                                Issue.record("replayed variant \(n) (\(kind), \(bytes.count) bytes) left the connection open for \(Self.bound) s")
                            }
                            done.increment()
                            n += workers
                        }
                    }
                }
                try await group.waitForAll()
            }
            try await Self.checkAfterwards(server, addresses, credentials, logs: logs, hangs: hangs, done: done,
                                           expectCodes: [.handshakeTampered, .badPreambleCRC, .truncated])
        }
    }

    // MARK: Live

    /// Runs the client handshake of method secret over a raw connection up to the switch to
    /// sealing; returns the clear bytes to send (banner, HELLO, AUTH_REQUEST were sent) and
    /// the sealing direction. Throws if the server refuses.
    static func handshake(
        inbound: inout NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator, outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>,
        credentials: SecretCredentials
    ) async throws -> (clear: ByteBuffer, sealer: SecureDirection, ident: Frame) {
        var ident = Parley_V1_ClientIdent()
        ident.platform = "test"
        ident.implementation = "secure-mutator"
        ident.version = "1.0.0"
        var machine = ClientHandshakeStateMachine(configuration: .init(
            banner: Banner(supported: ParleyFeatures.implemented.union(.secureMode)), maxFrameSize: UInt32(Frame.defaultMaxFrameSize),
            authMethods: [AuthMethod.secret], ident: ident, serverAddress: "mutation", secret: credentials, modes: [.secure],
            randomness: .generate()
        ))
        var first = ByteBuffer()
        for item in machine.start().send {
            switch item {
            case .banner(let b): first.writeBanner(b)
            case .frame(let f): first.writeFrame(f)
            case .startSealing: break
            }
        }
        try await outbound.write(first)
        var decoder = WireDecoder()
        var buffer = ByteBuffer()
        while var chunk = try await inbound.next() {
            buffer.writeBuffer(&chunk)
            while let element = try decoder.decode(buffer: &buffer) {
                let step = machine.received(element)
                if case .failed(let error) = step.outcome { throw error }
                guard step.send.contains(where: { if case .startSealing = $0 { return true } else { return false } }) else { continue }
                var clear = ByteBuffer()
                var sealer: SecureDirection?
                var sealedIdent: Frame?
                for item in step.send {
                    switch item {
                    case .banner(let b): clear.writeBanner(b)
                    case .frame(let f) where sealer == nil: clear.writeFrame(f)
                    case .frame(let f): sealedIdent = f
                    case .startSealing(let s): sealer = try SecureDirection(keys: s.keys, sealing: true)
                    }
                }
                guard let sealer, let sealedIdent else { throw ParleyError(code: .protocolViolation, message: "no CLIENT_IDENT after the switch") }
                return (clear, sealer, sealedIdent)
            }
        }
        throw ParleyError(code: .connectionClosed, message: "server closed during the handshake")
    }

    /// The sealed frames of a session: CLIENT_IDENT, requests (one with a data segment), a
    /// KEEPALIVE and a one-way message, each its own buffer.
    static func sealedSession(ident: Frame, sealer: SecureDirection) throws -> [[UInt8]] {
        var session = SessionStateMachine(role: .client, features: .implemented)
        var echo = Parley_Echo_V1_Echo()
        echo.payload = Data(repeating: 3, count: 200)
        let messages = [
            pingMessage(id: 1),
            WireMessage(header: MessageHeader(id: 2, kind: .request, type: Parley_Echo_V1_Echo.protoMessageName), payload: echo.parleyPayload(),
                        data: ByteBuffer(repeating: 7, count: 700)),
            pingMessage(id: 3),
            WireMessage(header: MessageHeader(id: 0, kind: .oneWay, type: Parley_Echo_V1_Ping.protoMessageName), payload: ByteBuffer()),
        ]
        var frames = [ident]
        for m in messages { frames.append(try session.frame(for: m, allocator: ByteBufferAllocator())) }
        frames.insert(SessionStateMachine.keepaliveFrame(tag: .keepalive, timestamp: 42), at: 3)
        var out: [ByteBuffer] = []
        for f in frames { try f.seal(with: sealer, into: &out, allocator: ByteBufferAllocator()) }
        return out.map { Array($0.readableBytesView) }
    }

    static func mutateSealed(_ frames: [[UInt8]], n: Int, rng: inout SplitMix) -> (bytes: [UInt8], kind: String) {
        func random(_ bound: Int) -> Int { Int(rng.next() % UInt64(max(1, bound))) }
        var f = frames
        switch n % 10 {
        case 0:  // untouched: the control (answered, then the half-close ends it)
            return (f.flatMap { $0 }, "none")
        case 1, 2:  // bit flips in one frame: its preamble, its body or a tag
            let i = random(f.count)
            for _ in 0..<(1 + random(2)) { f[i][random(f[i].count)] ^= UInt8(1) << UInt8(random(8)) }
            return (f.flatMap { $0 }, "bitflip")
        case 3:  // a sealed preamble's own bytes flipped where its segment lengths are
            let i = random(f.count)
            f[i][4 + random(24)] ^= 0xFF
            return (f.flatMap { $0 }, "preamble-flip")
        case 4:  // a frame dropped, duplicated (replayed) or two swapped (reordered)
            let i = random(f.count)
            switch rng.next() % 3 {
            case 0: f.remove(at: i)
            case 1: f.insert(f[i], at: random(f.count + 1))
            default: f.swapAt(i, random(f.count))
            }
            return (f.flatMap { $0 }, "reorder")
        case 5:  // truncated anywhere
            let all = f.flatMap { $0 }
            return (Array(all.prefix(random(all.count))), "truncate")
        case 6:  // bytes inserted or removed (everything after is misaligned)
            var all = f.flatMap { $0 }
            let i = random(all.count)
            if rng.next() % 2 == 0 {
                all.insert(contentsOf: (0..<(1 + random(8))).map { _ in UInt8(truncatingIfNeeded: rng.next()) }, at: i)
            } else {
                all.removeSubrange(i..<min(all.count, i + 1 + random(8)))
            }
            return (all, "shift")
        case 7:  // a clear crc-mode frame in place of a sealed one (first: CLOSE is accepted)
            var clear = ByteBuffer()
            if rng.next() % 2 == 0 {
                clear.writeFrame(ParleyError(code: .authenticationFailed, message: "clear close").status.frame(tag: .close))
            } else {
                var session = SessionStateMachine(role: .client, features: .implemented)
                clear.writeFrame(try! session.frame(for: pingMessage(id: 9), allocator: ByteBufferAllocator()))
            }
            f.insert(Array(clear.readableBytesView), at: random(f.count + 1))
            return (f.flatMap { $0 }, "clear-frame")
        case 8:  // random bytes in place of a sealed frame
            let i = random(f.count)
            f[i] = (0..<f[i].count).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            return (f.flatMap { $0 }, "random-frame")
        default:  // a tag cut: the last 1...16 bytes of a frame gone
            let i = random(f.count)
            f[i].removeLast(min(f[i].count, 1 + random(16)))
            return (f.flatMap { $0 }, "tag-cut")
        }
    }

    @Test func liveVariantsOfSealedFrames() async throws {
        let logs = LogCollector()
        try await Self.withSecureServer(logs: logs) { server, addresses, credentials in
            let hangs = Counter(), done = Counter(), refusedHandshakes = Counter()
            let variants = Self.variants, workers = Self.workers
            try await withThrowingTaskGroup(of: Void.self) { group in
                for w in 0..<workers {
                    group.addTask {
                        var rng = SplitMix(seed: 0x11FE &+ UInt64(w) &* 104_729)
                        var n = w
                        while n < variants {
                            let peer = try await RawPeer.connect(n % 16 == 0 ? addresses[1] : addresses[0])
                            let seed = rng.next(), current = n
                            let result = await withThrowingTaskGroup(of: String?.self) { race in
                                race.addTask {
                                    try await peer.channel.executeThenClose { inbound, outbound in
                                        var iterator = inbound.makeAsyncIterator()
                                        let (clear, sealer, ident) = try await Self.handshake(inbound: &iterator, outbound: outbound, credentials: credentials)
                                        var rng = SplitMix(seed: seed)
                                        let (tail, kind) = Self.mutateSealed(try Self.sealedSession(ident: ident, sealer: sealer), n: current, rng: &rng)
                                        var bytes = clear
                                        bytes.writeBytes(tail)
                                        try? await outbound.write(bytes)
                                        outbound.finish()
                                        while (try? await iterator.next()) != nil {}
                                        return kind
                                    }
                                }
                                race.addTask {
                                    try await Task.sleep(for: .milliseconds(Int64(Self.bound * 1000)))
                                    return nil
                                }
                                defer { race.cancelAll() }
                                do { return try await race.next()! } catch { refusedHandshakes.increment(); return "refused: \(error)" }
                            }
                            if result == nil {
                                hangs.increment()
                                Issue.record("live variant \(n) left the connection open for \(Self.bound) s")
                            }
                            done.increment()
                            n += workers
                        }
                    }
                }
                try await group.waitForAll()
            }
            #expect(refusedHandshakes.count == 0, "the unmutated handshake always succeeds")
            try await Self.checkAfterwards(server, addresses, credentials, logs: logs, hangs: hangs, done: done,
                                           expectCodes: [.badAuthTag, .truncated])
        }
    }
}
