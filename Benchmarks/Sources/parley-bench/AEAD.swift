import ArgumentParser
import Crypto
import Foundation
import NIOCore
import ParleyWire

/// The AEAD ceiling on this machine: how fast the ciphers themselves seal and open, with no
/// socket, no event loop and no framing beyond Parley's own sealed frame.
struct AEADBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "aead",
        abstract: "Measure raw AEAD speed on this machine (the ceiling of secure mode).",
        discussion: """
            One thread, no I/O. For each payload size: swift-crypto's AES.GCM.seal and \
            AES.GCM.open (they allocate their output), with a 256-bit key (secure mode's cipher) \
            and a 128-bit key (the suite TLS 1.3 negotiates on a CPU with AES instructions); then \
            Parley's in-place path with AES-256-GCM: WireMessage.sealFrame (the MESSAGE frame \
            sealed straight into one fresh outgoing buffer: preamble alone, then header and \
            payload) and WireDecoder opening sealed frames in place after startOpening (each \
            frame in a buffer of its own, sealed beforehand, untimed). GB/s counts payload bytes \
            (10^9 per second). The cases alternate within each repetition; the table shows \
            medians.
            """
    )

    @Option(help: "Measurements of each case and size (the median is reported).")
    var repetitions: Int = 5

    @Option(help: "Seconds measured per measurement.")
    var duration: Double = 0.5

    @Option(
        help: ArgumentHelp("Comma-separated payload sizes in bytes (default: 64,65536,1048576).", valueName: "list"),
        transform: { text in
            try text.split(separator: ",").map { item in
                guard let n = Int(item), (1...(16 << 20)).contains(n) else { throw BenchError("bad size \"\(item)\": 1...16777216") }
                return n
            }
        }
    )
    var sizes: [Int] = [64, 64 * 1024, 1 << 20]

    func validate() throws {
        guard self.repetitions >= 1 else { throw ValidationError("--repetitions must be at least 1") }
        guard self.duration > 0, self.duration <= 60 else { throw ValidationError("--duration must be in (0, 60] seconds") }
        guard !self.sizes.isEmpty else { throw ValidationError("--sizes: give at least one size") }
    }

    func run() async throws {
        let cases = AEADCase.all
        print("## parley-bench aead\n")
        print("- machine: \(machineDescription())")
        print("- one thread; \(self.repetitions) repetitions of \(self.duration) s per case and size (cases alternate; medians)")
        print("- Parley's preferred cipher here: \(SecureCipher.preferred[0].rawValue)\n")
        var results: [String: [Int: [AEADRun]]] = [:]
        for rep in 1...self.repetitions {
            for size in self.sizes {
                for c in cases {
                    let run = try c.measure(size, self.duration)
                    results[c.name, default: [:]][size, default: []].append(run)
                    progress("aead \(rep)/\(self.repetitions) \(c.name) \(byteSize(size)): \(fixed(run.gbPerSecond, 2)) GB/s, \(fixed(run.nanosPerOperation, 0)) ns per operation")
                }
            }
        }
        func medianRun(_ name: String, _ size: Int) -> (gb: Double, ns: Double)? {
            guard let runs = results[name]?[size], let gb = median(runs.map(\.gbPerSecond)), let ns = median(runs.map(\.nanosPerOperation)) else { return nil }
            return (gb, ns)
        }
        let header = ["case"] + self.sizes.map { "\(byteSize($0)): GB/s (ns/op)" }
        var rows = cases.map { c in
            [c.name] + self.sizes.map { size in medianRun(c.name, size).map { "\(fixed($0.gb, 2)) (\(grouped($0.ns)))" } ?? "-" }
        }
        for (a, b) in [(AEADCase.parleySeal, AEADCase.cryptoSeal256), (AEADCase.parleyOpen, AEADCase.cryptoOpen256)] {
            rows.append(["\(a) / \(b)"] + self.sizes.map { size in
                guard let x = medianRun(a, size), let y = medianRun(b, size), y.gb > 0 else { return "-" }
                return times(x.gb / y.gb)
            })
        }
        print(markdownTable(header, rows))
    }
}

/// One measurement: operations done and the seconds they took (timed part only).
struct AEADRun {
    var operations: Int
    var bytesPerOperation: Int
    var seconds: Double
    var gbPerSecond: Double { Double(self.operations * self.bytesPerOperation) / self.seconds / 1e9 }
    var nanosPerOperation: Double { self.seconds * 1e9 / Double(self.operations) }
}

struct AEADCase {
    var name: String
    /// (payload size, seconds) -> the run.
    var measure: (Int, Double) throws -> AEADRun

    static let cryptoSeal256 = "swift-crypto AES.GCM.seal, AES-256"
    static let cryptoOpen256 = "swift-crypto AES.GCM.open, AES-256"
    static let parleySeal = "Parley sealFrame in place, AES-256-GCM"
    static let parleyOpen = "Parley WireDecoder open in place, AES-256-GCM"

    static var all: [AEADCase] {
        [
            AEADCase(name: cryptoSeal256) { try cryptoSeal(size: $0, seconds: $1, key: SymmetricKey(size: .bits256)) },
            AEADCase(name: cryptoOpen256) { try cryptoOpen(size: $0, seconds: $1, key: SymmetricKey(size: .bits256)) },
            AEADCase(name: "swift-crypto AES.GCM.seal, AES-128 (TLS 1.3's suite)") { try cryptoSeal(size: $0, seconds: $1, key: SymmetricKey(size: .bits128)) },
            AEADCase(name: "swift-crypto AES.GCM.open, AES-128 (TLS 1.3's suite)") { try cryptoOpen(size: $0, seconds: $1, key: SymmetricKey(size: .bits128)) },
            AEADCase(name: parleySeal) { try sealFrames(size: $0, seconds: $1) },
            AEADCase(name: parleyOpen) { try openFrames(size: $0, seconds: $1) },
        ]
    }

    /// Runs `operation` until `seconds` have passed.
    static func loop(size: Int, seconds: Double, _ operation: () throws -> Int) rethrows -> AEADRun {
        var sink = 0
        var n = 0
        let start = nanotime()
        let end = start + UInt64(seconds * 1e9)
        var now = start
        repeat {
            for _ in 0..<8 { sink &+= try operation() }
            n += 8
            now = nanotime()
        } while now < end
        blackHole(sink)
        return AEADRun(operations: n, bytesPerOperation: size, seconds: Double(now - start) / 1e9)
    }

    static func cryptoSeal(size: Int, seconds: Double, key: SymmetricKey) throws -> AEADRun {
        let plain = Data(testBytes(size))
        let nonce = AES.GCM.Nonce()
        return try loop(size: size, seconds: seconds) {
            let box = try AES.GCM.seal(plain, using: key, nonce: nonce)
            return box.ciphertext.count + box.tag.count
        }
    }

    static func cryptoOpen(size: Int, seconds: Double, key: SymmetricKey) throws -> AEADRun {
        let box = try AES.GCM.seal(Data(testBytes(size)), using: key, nonce: AES.GCM.Nonce())
        return try loop(size: size, seconds: seconds) {
            try AES.GCM.open(box, using: key).count
        }
    }

    static func keys() -> SecureDirectionKeys {
        var rng = SystemRandomNumberGenerator()
        return SecureDirectionKeys(
            cipher: .aes256GCM, key: (0..<32).map { _ in rng.next() }, iv: (0..<12).map { _ in rng.next() }
        )
    }

    /// An Echo request as the benchmark's Parley client sends it (64 B: in the payload).
    static func message(size: Int) -> WireMessage {
        WireMessage(
            header: MessageHeader(seq: 1, ack: 0, id: 1, kind: .request, type: "parley.echo.v1.Echo"),
            payload: ByteBuffer(bytes: testBytes(size))
        )
    }

    static func sealFrames(size: Int, seconds: Double) throws -> AEADRun {
        let sealer = try SecureDirection(keys: keys(), sealing: true)
        let message = Self.message(size: size)
        let allocator = ByteBufferAllocator()
        return try loop(size: size, seconds: seconds) {
            try message.sealFrame(with: sealer, allocator: allocator).readableBytes
        }
    }

    /// Seals a batch of frames (untimed), then opens them one by one with the decoder (timed),
    /// until the opening has taken `seconds`. Each frame is in a buffer of its own, uniquely
    /// owned when it is opened (opening is in place: a shared buffer would be copied first).
    static func openFrames(size: Int, seconds: Double) throws -> AEADRun {
        let keys = Self.keys()
        let sealer = try SecureDirection(keys: keys, sealing: true)
        var decoder = WireDecoder(expectBanner: false)
        decoder.startOpening(try SecureDirection(keys: keys, sealing: false))
        let message = Self.message(size: size)
        let allocator = ByteBufferAllocator()
        let batchSize = max(1, min(4096, (16 << 20) / size))
        var batch: [ByteBuffer] = []
        batch.reserveCapacity(batchSize)
        var timed: UInt64 = 0
        var n = 0
        var sink = 0
        while Double(timed) / 1e9 < seconds {
            batch.removeAll(keepingCapacity: true)
            for _ in 0..<batchSize { batch.append(try message.sealFrame(with: sealer, allocator: allocator)) }
            let start = nanotime()
            for i in batch.indices {
                var buffer = ByteBuffer()
                swap(&buffer, &batch[i])
                guard case .frame(let frame)? = try decoder.decode(buffer: &buffer) else {
                    throw BenchError("a sealed frame did not decode")
                }
                sink &+= frame.segments.count
            }
            timed += nanotime() - start
            n += batchSize
        }
        blackHole(sink)
        return AEADRun(operations: n, bytesPerOperation: size, seconds: Double(timed) / 1e9)
    }
}

@inline(never)
func blackHole(_ value: Int) {
    if value == 0x5EED_F00D { print("") }
}
