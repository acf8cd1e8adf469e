import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Parley
import ParleyServices
import ParleyTestSupport
import ParleyWire
import Testing

/// Corrupted variants of valid client byte streams, fed to a live server.
// The limit catches a hang: 100,000 variants take 8 to 10 minutes in a loaded full run
// (625 s once the independent Python implementations' live tests ran beside it).
@Suite(.timeLimit(.minutes(20)))
struct MutationTests {
    /// Valid client→server streams the variants are made from.
    static let seeds: [[UInt8]] = {
        func echo(id: UInt64, size: Int, data: Int = 0) -> WireMessage {
            var e = Parley_Echo_V1_Echo()
            e.payload = Data(repeating: UInt8(id), count: size)
            return WireMessage(header: MessageHeader(id: id, kind: .request, type: Parley_Echo_V1_Echo.protoMessageName), payload: e.parleyPayload(),
                               data: data > 0 ? ByteBuffer(repeating: 7, count: data) : nil)
        }
        var count = Parley_Echo_V1_Count()
        count.count = 3
        let stream = WireMessage(header: MessageHeader(id: 3, kind: .request, type: Parley_Echo_V1_Count.protoMessageName), payload: count.parleyPayload())
        let cancel = WireMessage(header: MessageHeader(id: 3, kind: .cancel, type: ""), payload: ByteBuffer())
        let oneWay = WireMessage(header: MessageHeader(id: 0, kind: .oneWay, type: Parley_Echo_V1_Ping.protoMessageName), payload: ByteBuffer())
        let keepalive = SessionStateMachine.keepaliveFrame(tag: .keepalive, timestamp: 99)
        let full = clientSessionBytes(messages: [pingMessage(id: 1), echo(id: 2, size: 100, data: 300), stream, cancel, oneWay, echo(id: 4, size: 3000)])
        var withKeepalive = clientSessionBytes(messages: [pingMessage(id: 1)])
        withKeepalive.writeFrame(keepalive)
        // Lossless sessions (bit 9): a reconnect to a session the server does not have (it
        // answers SESSION_RESET), the CLIENT_IDENT that follows, messages and ACKs.
        var reconnect = Parley_V1_SessionReconnect()
        reconnect.sessionToken = Data(repeating: 0x42, count: 16)
        reconnect.serverNonce = 7
        reconnect.lastReceivedSeq = 3
        reconnect.connectSeq = 2
        let lossless = clientSessionBytes(
            features: ParleyFeatures.implemented.union(.reconnect), messages: [pingMessage(id: 1), oneWay, echo(id: 2, size: 50)],
            identPrefix: [reconnect.frame(tag: .sessionReconnect)], trailingFrames: [SessionStateMachine.ackFrame(0)]
        )
        return [full, clientSessionBytes(messages: []), withKeepalive, clientSessionBytes(messages: (1...5).map { pingMessage(id: $0) }), lossless]
            .map { Array($0.readableBytesView) }
    }()

    /// Frame start offsets in a stream (after the banner), for structure-aware mutations.
    static func frameOffsets(_ bytes: [UInt8]) -> [Int] {
        var offsets: [Int] = []
        var at = 32
        while at + 32 <= bytes.count {
            offsets.append(at)
            let count = Int(bytes[at + 2])
            var total = 0
            for i in 0..<count {
                let o = at + 4 + 6 * i
                total += Int(bytes[o]) | Int(bytes[o + 1]) << 8 | Int(bytes[o + 2]) << 16 | Int(bytes[o + 3]) << 24
            }
            at += 32 + total + 4 * count
        }
        return offsets
    }

    static func fixPreambleCRC(_ bytes: inout [UInt8], at offset: Int) {
        let crc = bytes[offset..<(offset + 28)].withUnsafeBytes { CRC32C.checksum($0) }
        for i in 0..<4 { bytes[offset + 28 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
    }

    static func variant(_ n: Int, rng: inout SplitMix) -> (bytes: [UInt8], kind: String) {
        let seed = seeds[Int(rng.next() % UInt64(seeds.count))]
        var b = seed
        switch n % 8 {
        case 0, 1:  // bit flips
            for _ in 0..<(1 + Int(rng.next() % 4)) {
                let i = Int(rng.next() % UInt64(b.count))
                b[i] ^= UInt8(1) << UInt8(rng.next() % 8)
            }
            return (b, "bitflip")
        case 2:  // truncation
            return (Array(b.prefix(Int(rng.next() % UInt64(b.count)))), "truncate")
        case 3:  // splice two streams at random points
            let other = seeds[Int(rng.next() % UInt64(seeds.count))]
            let cut1 = Int(rng.next() % UInt64(b.count)), cut2 = Int(rng.next() % UInt64(other.count))
            return (Array(b.prefix(cut1)) + Array(other.suffix(from: cut2)), "splice")
        case 4:  // huge or wrong lengths, with a valid preamble CRC so the length is believed
            let offsets = frameOffsets(b)
            let at = offsets[Int(rng.next() % UInt64(offsets.count))]
            let choices: [UInt32] = [UInt32.max, 1 << 31, UInt32(Frame.defaultMaxFrameSize + 1), 1 << 20, UInt32(rng.next() % 5000)]
            let length = choices[Int(rng.next() % UInt64(choices.count))]
            let seg = at + 4 + 6 * Int(rng.next() % UInt64(max(1, b[at + 2])))
            for i in 0..<4 { b[seg + i] = UInt8(truncatingIfNeeded: length >> (8 * UInt32(i))) }
            fixPreambleCRC(&b, at: at)
            return (b, "length")
        case 5:  // preamble fields rewritten with a fixed CRC: tag, flags, segment count, reserved
            let offsets = frameOffsets(b)
            let at = offsets[Int(rng.next() % UInt64(offsets.count))]
            b[at + Int(rng.next() % 4)] = UInt8(truncatingIfNeeded: rng.next())
            fixPreambleCRC(&b, at: at)
            return (b, "preamble")
        case 6:  // a frame duplicated, dropped or moved (out-of-order seq, missing handshake steps)
            let offsets = frameOffsets(b) + [b.count]
            guard offsets.count >= 3 else { return (b, "none") }
            let i = Int(rng.next() % UInt64(offsets.count - 1))
            let frame = Array(b[offsets[i]..<offsets[i + 1]])
            if rng.next() % 2 == 0 {
                b.insert(contentsOf: frame, at: offsets[Int(rng.next() % UInt64(offsets.count))])
                return (b, "duplicate")
            }
            b.removeSubrange(offsets[i]..<offsets[i + 1])
            return (b, "drop")
        default:  // random bytes inserted or overwritten
            let i = Int(rng.next() % UInt64(b.count))
            let junk = (0..<(1 + Int(rng.next() % 16))).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            if rng.next() % 2 == 0 { b.insert(contentsOf: junk, at: i) } else {
                for (k, v) in junk.enumerated() where i + k < b.count { b[i + k] = v }
            }
            return (b, "junk")
        }
    }

    @Test func hundredThousandCorruptedStreamsNeverCrashOrHangTheServer() async throws {
        let variants = Int(ProcessInfo.processInfo.environment["PARLEY_MUTATION_VARIANTS"] ?? "") ?? 100_000
        let workers = 8
        let logs = LogCollector()
        let path = testScratchPath("mutation.sock")
        try await withOwnEventLoop { ownGroup in try await withServer(listen: [.unix(path: path), .tcp(host: "127.0.0.1", port: 0)], configure: { $0.sessionRetention = .seconds(1) }, logger: logs.logger("server", level: .warning), group: ownGroup) { server, addresses in
            // A well-behaved client keeps working throughout.
            let good = try await ParleyClient.connect(to: addresses[1], logger: quietLogger)
            defer { good.close() }
            let stop = Signal()
            let goodPings = Task {
                var n: UInt64 = 0
                while !stop.isRaised {
                    n += 1
                    guard try await ping(good, n) == n else { return -1 }
                    try await Task.sleep(for: .milliseconds(20))
                }
                return Int(n)
            }
            // A variant left open for 10 s is tried again alone once the run is over: a server
            // that hangs on it hangs again; one only slowed by a loaded machine (a CI run saw
            // one such in 100,000) closes then, and is printed, not failed.
            let slow = NIOLockedValueBox<[(n: Int, kind: String, bytes: [UInt8], address: ParleyAddress)]>([])
            let done = Counter()
            try await withThrowingTaskGroup(of: Void.self) { group in
                for w in 0..<workers {
                    group.addTask {
                        var rng = SplitMix(seed: 0xC0FFEE &+ UInt64(w) &* 7919)
                        var n = w
                        while n < variants {
                            let (bytes, kind) = Self.variant(n, rng: &rng)
                            // Most go over the Unix socket (cheaper); every 16th over TCP.
                            let address = n % 16 == 0 ? addresses[1] : addresses[0]
                            let peer = try await RawPeer.connect(address)
                            let (_, closed) = try await peer.exchange(ByteBuffer(bytes: bytes), seconds: 10)
                            if !closed { slow.withLockedValue { $0.append((n, kind, bytes, address)) } }
                            done.increment()
                            n += workers
                        }
                    }
                }
                try await group.waitForAll()
            }
            let slowOnes = slow.withLockedValue { $0 }
            var hangs = 0
            for (n, kind, bytes, address) in slowOnes.prefix(20) {
                let peer = try await RawPeer.connect(address)
                let (_, closed) = try await peer.exchange(ByteBuffer(bytes: bytes), seconds: 30)
                print("variant \(n) (\(kind), \(bytes.count) bytes) was left open for 10 s; alone it was \(closed ? "closed" : "left open for 30 s")")
                if !closed {
                    hangs += 1
                    Issue.record("variant \(n) (\(kind), \(bytes.count) bytes) left the connection open for 10 s, and again alone for 30 s")
                }
            }
            stop.raise()
            let pings = try await goodPings.value
            #expect(done.count == variants)
            #expect(slowOnes.count <= 20, "\(slowOnes.count) variants left open for 10 s")
            #expect(hangs == 0)
            #expect(pings > 0, "the good client was served throughout (\(pings) pings)")
            // Every error the server logged names a known code and says what was wrong.
            let errors = logs.all.filter { $0.message == "connection closed on error" }
            let knownNames = ParleyError.Code.allKnown.map(\.description)
            let unclear = errors.filter { record in !knownNames.contains { record.metadata.contains("\($0) (") } }
            #expect(errors.count > variants / 2, "most variants were refused with a logged error (\(errors.count))")
            #expect(unclear.isEmpty, "errors without a code: \(unclear.prefix(3).map(\.metadata))")
            // And the server still accepts new clients.
            let after = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { after.close() }
            #expect(try await ping(after, 1) == 1)
            #expect(server.connectionCount <= 2)
            // Lossless sessions the variants started are forgotten after the retention time.
            #expect(try await eventually(seconds: 10) { server.sessionCount == 0 }, "\(server.sessionCount) sessions left")
        } }
    }
}
