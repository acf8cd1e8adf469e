/// What the fault proxy does to the bytes of one direction of one connection, decided
/// without IO, clock or global randomness: a seeded generator is passed in, so that a run with
/// the same seed and the same traffic does the same things (`parley chaos --seed`).
///
/// For each chunk of bytes read from one side, `plan(_:)` says how to write it to the other:
/// in which pieces, after which delays, and whether to cut the connection inside it (after how
/// many of its bytes) or stall this direction for a while first.
public struct ChaosPlan: Sendable {
    public struct Settings: Sendable, Hashable {
        /// Cut the connection once this many bytes have passed in this direction (nil: never).
        public var cutAfterBytes: Int?
        /// Probability, per chunk, of cutting the connection at a random byte of the chunk.
        public var cutProbability: Double
        /// Largest piece a chunk is split into (nil: chunks pass whole).
        public var fragment: Int?
        /// Delay before each piece, in milliseconds: `delay` plus up to `jitter`.
        public var delayMilliseconds: Int
        public var jitterMilliseconds: Int
        /// Stall this direction once, for `stallMilliseconds`, after `stallAfterBytes` bytes.
        public var stallAfterBytes: Int?
        public var stallMilliseconds: Int
        /// The direction's bandwidth, in bytes per second (nil: as fast as it goes): each piece
        /// takes `length / rate` to pass, after the one before it, like a link of that speed.
        public var rateBytesPerSecond: Int?

        public init(
            cutAfterBytes: Int? = nil, cutProbability: Double = 0, fragment: Int? = nil, delayMilliseconds: Int = 0,
            jitterMilliseconds: Int = 0, stallAfterBytes: Int? = nil, stallMilliseconds: Int = 0, rateBytesPerSecond: Int? = nil
        ) {
            self.cutAfterBytes = cutAfterBytes
            self.cutProbability = cutProbability
            self.fragment = fragment
            self.delayMilliseconds = delayMilliseconds
            self.jitterMilliseconds = jitterMilliseconds
            self.stallAfterBytes = stallAfterBytes
            self.stallMilliseconds = stallMilliseconds
            self.rateBytesPerSecond = rateBytesPerSecond
        }

        /// Whether anything at all is done to the bytes.
        public var isTransparent: Bool {
            self.cutAfterBytes == nil && self.cutProbability == 0 && self.fragment == nil && self.delayMilliseconds == 0
                && self.jitterMilliseconds == 0 && self.stallAfterBytes == nil && self.rateBytesPerSecond == nil
        }
    }

    /// One write of part of a chunk.
    public struct Piece: Sendable, Hashable {
        /// Offset and length within the chunk.
        public var offset: Int
        public var length: Int
        /// Wait this long before writing it.
        public var delayMilliseconds: Int
        /// And this long more: the time its bytes take at the direction's rate.
        public var transmitNanoseconds: Int64

        public init(offset: Int, length: Int, delayMilliseconds: Int, transmitNanoseconds: Int64 = 0) {
            self.offset = offset
            self.length = length
            self.delayMilliseconds = delayMilliseconds
            self.transmitNanoseconds = transmitNanoseconds
        }
    }

    /// What to do with one chunk.
    public struct Step: Sendable, Hashable {
        public var pieces: [Piece]
        /// After the pieces, cut the connection (the rest of the chunk is not written).
        public var cut: Bool

        public init(pieces: [Piece], cut: Bool) {
            self.pieces = pieces
            self.cut = cut
        }
        /// Bytes of this chunk written before the cut, if it cuts.
        public var bytesBeforeCut: Int { self.pieces.reduce(0) { $0 + $1.length } }
    }

    public let settings: Settings
    private var random: SplitMix64
    /// Bytes passed so far in this direction.
    public private(set) var passed = 0
    private var stalled = false
    /// What the pieces' transmit times left over when rounded down to nanoseconds, in units of
    /// 1/rate ns: carried to the next, so that together they take what their bytes take.
    private var transmitCarry: Int64 = 0

    public init(settings: Settings, seed: UInt64) {
        self.settings = settings
        self.random = SplitMix64(seed: seed)
    }

    public mutating func plan(_ count: Int) -> Step {
        var end = count
        var cut = false
        if let limit = self.settings.cutAfterBytes, self.passed + count >= limit {
            end = max(0, limit - self.passed)
            cut = true
        }
        if !cut, self.settings.cutProbability > 0, count > 0, self.random.unit() < self.settings.cutProbability {
            end = Int(self.random.next() % UInt64(count))
            cut = true
        }
        var pieces: [Piece] = []
        var offset = 0
        let rate = self.settings.rateBytesPerSecond.map { Int64(max(1, $0)) }
        func piece(_ offset: Int, _ length: Int, _ delay: Int) -> Piece {
            var transmit: Int64 = 0
            if let rate {
                let total = Int64(length) * 1_000_000_000 + self.transmitCarry
                (transmit, self.transmitCarry) = total.quotientAndRemainder(dividingBy: rate)
            }
            return Piece(offset: offset, length: length, delayMilliseconds: delay, transmitNanoseconds: transmit)
        }
        while offset < end {
            var length = end - offset
            if let fragment = self.settings.fragment, fragment > 0 {
                length = min(length, 1 + Int(self.random.next() % UInt64(fragment)))
            }
            var delay = self.settings.delayMilliseconds
            if self.settings.jitterMilliseconds > 0 { delay += Int(self.random.next() % UInt64(self.settings.jitterMilliseconds + 1)) }
            if !self.stalled, let after = self.settings.stallAfterBytes, self.passed + offset + length > after {
                // Stall before the piece that crosses the mark: split it there.
                let before = max(0, after - (self.passed + offset))
                if before > 0 {
                    pieces.append(piece(offset, before, delay))
                    offset += before
                    length -= before
                    delay = 0
                }
                delay += self.settings.stallMilliseconds
                self.stalled = true
            }
            pieces.append(piece(offset, length, delay))
            offset += length
        }
        self.passed += end
        return Step(pieces: pieces, cut: cut)
    }
}

/// SplitMix64: small, fast, and the same sequence everywhere for a seed (also the block
/// benchmark's offsets: `SystemRandomNumberGenerator` makes a system call per number).
public struct SplitMix64: RandomNumberGenerator, Sendable {
    var state: UInt64
    public init(seed: UInt64) { self.state = seed }

    public mutating func next() -> UInt64 {
        self.state &+= 0x9E37_79B9_7F4A_7C15
        var z = self.state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// A number in [0, 1).
    mutating func unit() -> Double { Double(self.next() >> 11) / Double(1 << 53) }

    /// A seed for a sub-stream (a connection, a direction).
    static func derive(_ seed: UInt64, _ a: UInt64, _ b: UInt64) -> UInt64 {
        var g = SplitMix64(seed: seed ^ (a &* 0x9E37_79B9_7F4A_7C15) ^ (b &* 0xC2B2_AE3D_27D4_EB4F))
        return g.next()
    }
}
