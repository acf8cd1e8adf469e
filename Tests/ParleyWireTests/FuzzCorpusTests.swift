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
            let decoded = data.withUnsafeBytes { _FuzzHarness.run($0) }
            if file.lastPathComponent.hasPrefix("ping-session-client") {
                #expect(decoded >= 9, "a valid client session decodes completely")
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
                b.withUnsafeBytes { _ = _FuzzHarness.run($0) }
            }
        }
    }
}
