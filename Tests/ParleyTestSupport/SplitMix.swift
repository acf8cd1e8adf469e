/// A small deterministic random number generator for tests (no global randomness): SplitMix64.
public struct SplitMix: RandomNumberGenerator {
    public var state: UInt64

    public init(seed: UInt64) { self.state = seed }

    public mutating func next() -> UInt64 {
        self.state &+= 0x9E37_79B9_7F4A_7C15
        var z = self.state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Mutations of byte strings that mutation tests share, drawn from a `SplitMix`.
public enum ByteMutations {
    /// Inserts, at `at`, `times` copies of up to `maxLength` bytes starting there (nesting,
    /// when they hold an opening tag or a length prefix).
    public static func repeatRange(_ bytes: inout [UInt8], at: Int, maxLength: Int, times: Int, using rng: inout SplitMix) {
        let end = min(bytes.count, at + Int.random(in: 1...maxLength, using: &rng))
        let piece = Array(bytes[at..<end])
        bytes.insert(contentsOf: Array(repeating: piece, count: times).joined(), at: at)
    }

    /// Moves up to `maxLength` bytes starting at `at` to a random place.
    public static func moveRange(_ bytes: inout [UInt8], at: Int, maxLength: Int, using rng: inout SplitMix) {
        let end = min(bytes.count, at + Int.random(in: 1...maxLength, using: &rng))
        let piece = Array(bytes[at..<end])
        bytes.removeSubrange(at..<end)
        bytes.insert(contentsOf: piece, at: Int.random(in: 0...bytes.count, using: &rng))
    }
}
