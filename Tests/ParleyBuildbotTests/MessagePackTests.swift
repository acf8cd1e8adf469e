import Foundation
import ParleyTestSupport
import Testing
@testable import ParleyWorkBuildbot

/// The hand-written MessagePack codec, against encodings made by Python's msgpack 1.x
/// (`msgpack.packb(value, use_bin_type=True)`, which Buildbot uses), and its refusals.
@Suite struct MessagePackTests {
    static func hex(_ s: String) -> [UInt8] {
        var out: [UInt8] = []
        var i = s.startIndex
        while i < s.endIndex {
            let j = s.index(i, offsetBy: 2)
            out.append(UInt8(s[i..<j], radix: 16)!)
            i = j
        }
        return out
    }

    /// Value and Python's bytes for it.
    static let vectors: [(MessagePack, String)] = [
        (.nil, "c0"), (.bool(true), "c3"), (.bool(false), "c2"), (0, "00"), (127, "7f"), (128, "cc80"), (255, "ccff"),
        (256, "cd0100"), (65535, "cdffff"), (65536, "ce00010000"), (.int(1 << 32), "cf0000000100000000"),
        (.uint(1 << 63), "cf8000000000000000"), (-1, "ff"), (-32, "e0"), (-33, "d0df"), (-128, "d080"), (-129, "d1ff7f"),
        (-32768, "d18000"), (-32769, "d2ffff7fff"), (.int(-2_147_483_649), "d3ffffffff7fffffff"), (.int(.min), "d38000000000000000"),
        (.double(1.5), "cb3ff8000000000000"), ("", "a0"), (.string(String(repeating: "a", count: 31)), "bf" + String(repeating: "61", count: 31)),
        (.string(String(repeating: "a", count: 32)), "d920" + String(repeating: "61", count: 32)), ("é", "a2c3a9"),
        (.binary([]), "c400"), (.binary([0, 1]), "c4020001"), (.array([]), "90"), (.array([1, .array([2])]), "92019102"), (.map([]), "80"),
        (.object(["op": "response", "seq_number": 3, "result": .nil]), "83a26f70a8726573706f6e7365aa7365715f6e756d62657203a6726573756c74c0"),
        (.array((0..<16).map { .int(Int64($0)) }), "dc0010000102030405060708090a0b0c0d0e0f"),
    ]

    /// Equal values hash alike: NaNs of any sign and payload are equal here, so they must
    /// hash alike too (a float32 NaN with a payload, decoded, keeps its bits).
    @Test func everyNaNHashesAlike() {
        let nans: [MessagePack] = [.double(.nan), .double(-.nan), .double(Double(bitPattern: 0x7ff8_0000_0000_0001)), .double(.signalingNaN)]
        #expect(Set(nans).count == 1)
        #expect(Set(nans.map(\.hashValue)).count == 1)
        #expect(Set([MessagePack.double(0.0), .double(-0.0)]).count == 1)
    }

    @Test func encodesAsPythonMsgpackDoes() {
        for (value, bytes) in Self.vectors {
            #expect(value.encoded() == Self.hex(bytes), "\(value)")
        }
    }

    @Test func decodesWhatPythonMsgpackSends() throws {
        for (value, bytes) in Self.vectors {
            #expect(try MessagePack.decode(Self.hex(bytes)) == value, "\(bytes)")
        }
        // Forms a smallest-first encoder never makes, which Python may: float32, str8 of a
        // short string, uint64 of a small number, array32, map16, bin16.
        #expect(try MessagePack.decode(Self.hex("ca3fc00000")) == .double(1.5))
        #expect(try MessagePack.decode(Self.hex("d90161")) == "a")
        #expect(try MessagePack.decode(Self.hex("cf0000000000000005")) == 5)
        #expect(try MessagePack.decode(Self.hex("dd0000000101")) == .array([1]))
        #expect(try MessagePack.decode(Self.hex("de0001a16101")) == .object(["a": 1]))
        #expect(try MessagePack.decode(Self.hex("c5000161")) == .binary([0x61]))
    }

    @Test func roundTripsNestedValues() throws {
        var random = SplitMix(seed: 7)
        func value(_ depth: Int) -> MessagePack {
            switch random.next() % (depth > 3 ? 7 : 9) {
            case 0: return .nil
            case 1: return .bool(random.next() & 1 == 1)
            case 2: return .int(Int64(bitPattern: random.next()) >> (random.next() % 64))
            case 3: return .double(Double(Int64(bitPattern: random.next() >> 11)) / 7)
            case 4: return .string(String(repeating: "x", count: Int(random.next() % 300)))
            case 5: return .binary((0..<Int(random.next() % 7_000)).map { UInt8(truncatingIfNeeded: $0) })
            case 6: return .uint(random.next() | 1 << 63)
            case 7: return .array((0..<Int(random.next() % 20)).map { _ in value(depth + 1) })
            default: return .map((0..<Int(random.next() % 20)).map { i in (.string("k\(i)"), value(depth + 1)) })
            }
        }
        for _ in 0..<200 {
            let v = value(0)
            #expect(try MessagePack.decode(v.encoded()) == v)
        }
    }

    @Test func refusesBadInputNamingTheByte() {
        let cases: [(String, String)] = [
            ("", "truncated"),
            ("c1", "reserved byte 0xc1"),
            ("c0c0", "1 bytes after the value"),
            ("a5616263", "3 left"),
            ("d9", "truncated"),
            ("cd01", "needs 1 more bytes"),
            ("c4ff00", "255 bytes announced"),
            ("a2c328", "not UTF-8"),
            ("d40100", "extension type (0xd4)"),
            ("c70100", "extension type (0xc7)"),
            ("dc0005c0", "5 elements announced"),
            ("dfffffffff", "more than the limit"),
            ("83a16101", "truncated"),
        ]
        for (bytes, text) in cases {
            #expect {
                _ = try MessagePack.decode(Self.hex(bytes))
            } throws: { error in
                "\(error)".contains(text)
            }
        }
        // Nesting past the depth limit (here 64): refused, not recursed into.
        let deep = [UInt8](repeating: 0x91, count: 100_000) + [0xc0]
        #expect(throws: MessagePackError.self) { _ = try MessagePack.decode(deep) }
        let fine = [UInt8](repeating: 0x91, count: 64) + [0xc0]
        #expect((try? MessagePack.decode(fine)) != nil)
        // Values in the whole message are counted (each within every per-array limit): an
        // array of 4,096 chains of 63 one-element arrays is 266,240 values, each a heap
        // allocation; past the limit (here 100,000) it is refused before most are built.
        let chain = [UInt8](repeating: 0x91, count: 63) + [0xc0]
        let chains: [UInt8] = [0xdd, 0, 0, 0x10, 0] + Array([[UInt8]](repeating: chain, count: 4096).joined())
        #expect { _ = try MessagePack.decode(chains, limits: .init(maxValues: 100_000)) } throws: { "\($0)".contains("more than 100000 values") }
        #expect((try? MessagePack.decode(chains)) != nil, "within the default limit")
    }

    /// Every single-byte change, truncation and a seeded run of random corruptions of real
    /// Buildbot messages: each either decodes or throws; nothing crashes, hangs or allocates
    /// what it was told to (bounded by count, not time). PARLEY_MUTATIONS raises the count.
    @Test func mutatedMessagesNeverCrash() throws {
        let samples: [MessagePack] = [
            BuildbotMessage.request(op: "update", seq: 12, [("command_id", "4"), ("args", .array([.array(["stdout", .array(["hello\n", .array([5]), .array([.double(1.7e9)])])]), .array(["rc", 0])]))]),
            BuildbotMessage.request(op: "update_upload_file_write", seq: 3, [("command_id", "7"), ("args", .binary(Array(repeating: 0x41, count: 300)))]),
            BuildbotMessage.response(seq: 1, result: .object(["basedir": "/w", "numcpus": 2, "worker_commands": .object(["shell": "3.3"])])),
        ]
        var random = SplitMix(seed: 12)
        let rounds = Int(ProcessInfo.processInfo.environment["PARLEY_MUTATIONS"] ?? "") ?? 3000
        var decoded = 0, refused = 0
        for sample in samples {
            let bytes = sample.encoded()
            for i in bytes.indices {
                for delta: UInt8 in [1, 0x80, 0xff] {
                    var m = bytes
                    m[i] &+= delta
                    if (try? MessagePack.decode(m)) != nil { decoded += 1 } else { refused += 1 }
                }
                if (try? MessagePack.decode(bytes[..<i])) != nil { decoded += 1 } else { refused += 1 }
            }
            for _ in 0..<rounds {
                var m = bytes
                for _ in 0..<(1 + random.next() % 4) { m[Int(random.next() % UInt64(m.count))] = UInt8(truncatingIfNeeded: random.next()) }
                if let value = try? MessagePack.decode(m) {
                    decoded += 1
                    _ = try? BuildbotMessage.parse(value)
                } else {
                    refused += 1
                }
            }
        }
        #expect(refused > 0 && decoded > 0)
    }
}
