import Foundation
import ParleyTestSupport
import ParleyWire
import Testing

/// Replays the libFuzzer corpus (valid sessions and minimized findings) through the harness
/// the fuzzer uses, and a batch of deterministic mutations of each file.
@Suite struct FuzzCorpusTests {
    static var corpus: [URL] {
        let dir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("FuzzTesting/Corpus")
        return ((try? FileManager.default.contentsOfDirectory(at: dir, includingPropertiesForKeys: nil)) ?? []).sorted { $0.path < $1.path }
    }

    @Test func corpusReplaysWithoutCrashing() throws {
        let files = Self.corpus
        #expect(files.count >= 2, "the corpus is in FuzzTesting/Corpus")
        for file in files {
            let data = try Data(contentsOf: file)
            let decoded = data.withUnsafeBytes { _FuzzHarness.runAny($0) }
            if file.lastPathComponent.hasPrefix("ping-session-client") {
                #expect(decoded >= 9, "a valid client session decodes completely")
            }
            // FuzzTesting/make-direct-seeds.py: a client session with DIRECT (bit 4) and three
            // DIRECT requests of 16,383 to 20,000 bytes of data, so that the fuzzer starts from
            // frames large enough to be collected as the reads they arrive in, then a KEEPALIVE
            // (the harness counts a frame before the session's verdict on it, and stops after
            // a violation: the KEEPALIVE is counted only if all three DIRECT frames passed).
            if file.lastPathComponent == "direct-large-session.bin" {
                #expect(decoded == 13, "the banner, 8 frames, 3 DIRECT requests and a KEEPALIVE, all past the session's rules: \(decoded)")
            }
            if file.lastPathComponent == "direct-large-bad-data-crc.bin" {
                #expect(decoded == 10, "decoding stops at the DIRECT frame whose data CRC is wrong: \(decoded)")
            }
            if file.lastPathComponent.hasPrefix("secure-session-") {
                #expect(data.first == UInt8(ascii: "S"), "secure seeds select runSecure")
                #expect(decoded == 6, "CLIENT_IDENT and five requests, sealed and opened (\(file.lastPathComponent): \(decoded))")
            }
        }
    }

    @Test func mutationsOfTheCorpusNeverCrash() throws {
        var rng = SplitMix(seed: 7)
        for file in Self.corpus {
            let original = [UInt8](try Data(contentsOf: file))
            guard !original.isEmpty else { continue }
            for _ in 0..<2000 {
                var b = original
                switch rng.next() % 3 {
                case 0: b[Int(rng.next() % UInt64(b.count))] ^= UInt8(1) << UInt8(rng.next() % 8)
                case 1: b = Array(b.prefix(Int(rng.next() % UInt64(b.count))))
                default: b[Int(rng.next() % UInt64(b.count))] = UInt8(truncatingIfNeeded: rng.next())
                }
                b.withUnsafeBytes { _ = _FuzzHarness.runAny($0) }
            }
        }
    }

    /// The secure harness on its own: each options byte over the secure seeds and their
    /// mutations; raw (unsealed) input never gets a frame through, sealed input does.
    @Test func secureHarnessOpensWhatItSealsAndNothingElse() throws {
        let seeds = try Self.corpus.filter { $0.lastPathComponent.hasPrefix("secure-session-") }.map { [UInt8](try Data(contentsOf: $0)) }
        #expect(!seeds.isEmpty)
        var rng = SplitMix(seed: 11)
        for seed in seeds {
            let frames = Array(seed.dropFirst(2))
            for options in UInt8(0)..<8 {
                let decoded = ([options] + frames).withUnsafeBytes { _FuzzHarness.runSecure($0) }
                if options & 2 == 0 {
                    #expect(decoded == 0, "unsealed bytes are refused (options \(options))")
                } else {
                    #expect(decoded == 6, "options \(options): \(decoded)")
                }
            }
            for _ in 0..<2000 {
                var b = [UInt8(truncatingIfNeeded: rng.next() % 8)] + frames
                switch rng.next() % 4 {
                case 0: b[1 + Int(rng.next() % UInt64(b.count - 1))] ^= UInt8(1) << UInt8(rng.next() % 8)
                case 1: b = Array(b.prefix(1 + Int(rng.next() % UInt64(b.count))))
                case 2:  // a preamble's segment length rewritten: authentic, and still checked
                    let at = 1 + 32 * Int(rng.next() % 4)
                    if at + 8 < b.count { b[at + 4 + Int(rng.next() % 4)] = UInt8(truncatingIfNeeded: rng.next()) }
                default: b[1 + Int(rng.next() % UInt64(b.count - 1))] = UInt8(truncatingIfNeeded: rng.next())
                }
                b.withUnsafeBytes { _ = _FuzzHarness.runSecure($0) }
            }
        }
    }
}
