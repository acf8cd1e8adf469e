/// When to send KEEPALIVE and when to give up on a silent peer (docs/protocol.md, "KEEPALIVE
/// and KEEPALIVE_ACK").
///
/// The connection ticks it periodically (every `Configuration.tickInterval`) with the current
/// time and whether anything arrived from the peer since the previous tick. After `interval`
/// without a byte from the peer it asks for a KEEPALIVE (at most one per `interval`); after
/// `timeout` without a byte it declares the peer gone, but only once the first KEEPALIVE of
/// this silence is at least `timeout - interval` old (so a peer is never given up on without
/// having been asked, and always gets that long to answer: if this side's event loop was so
/// busy that its first tick after the interval came after the timeout, the KEEPALIVE goes
/// then), and only at the tick after the one that first saw all that: the event loop polls the
/// socket between two ticks, so bytes that were waiting while this side's event loop was busy
/// (a handler that ran long) are read before the peer is given up on. While this side has stopped reading (back-pressure)
/// silence is not the peer's fault: the clock of silence restarts when reading resumes.
///
/// Invariants: no clock, timer or channel inside; times are monotonic nanoseconds passed in.
public struct KeepaliveStateMachine: Sendable {
    public struct Configuration: Hashable, Sendable {
        /// Silence (nothing received) after which a KEEPALIVE is sent, in nanoseconds.
        public var interval: Int64
        /// Silence after which the peer is declared gone, in nanoseconds; more than `interval`.
        public var timeout: Int64

        public init(interval: Int64, timeout: Int64) {
            precondition(interval > 0 && timeout > interval, "keepalive: 0 < interval < timeout")
            self.interval = interval
            self.timeout = timeout
        }

        /// How often the connection should tick the machine: a quarter of the interval, so that
        /// a KEEPALIVE comes at most a quarter interval late (a timeout, confirmed at the next
        /// tick, at most half an interval); at least 1 ms.
        public var tickInterval: Int64 { max(self.interval / 4, 1_000_000) }
    }

    public enum Action: Hashable, Sendable {
        case none
        /// Send a KEEPALIVE carrying this timestamp.
        case sendKeepalive(UInt64)
        /// Nothing has arrived from the peer for this many nanoseconds: close the connection.
        case timedOut(silentFor: Int64)
    }

    public let configuration: Configuration
    /// When something last arrived from the peer (or when silence started to count).
    private(set) var lastHeard: Int64
    /// When the last KEEPALIVE was sent, if one was.
    private(set) var lastKeepalive: Int64?
    /// When the first KEEPALIVE of the current silence was sent, if one was.
    private(set) var firstKeepaliveOfSilence: Int64?
    private var readsPaused = false
    /// Timestamps of the KEEPALIVEs sent and not answered yet, oldest first (at most
    /// `maximumUnanswered`: older ones are forgotten, their ACKs then match nothing).
    private(set) var unanswered: [UInt64] = []
    /// How many unanswered KEEPALIVEs are remembered: one goes per interval of silence, and the
    /// timeout is a few intervals (the reference: 4).
    public static let maximumUnanswered = 8
    /// A tick saw the timeout pass; the next one without news from the peer ends it.
    private var timeoutSeen = false
    private var timedOut = false

    public init(configuration: Configuration, now: Int64) {
        self.configuration = configuration
        self.lastHeard = now
    }

    /// This side stopped (true) or resumed (false) reading from the peer.
    public mutating func readsPaused(_ paused: Bool, now: Int64) {
        if self.readsPaused && !paused {
            self.heard(now: now)
        }
        self.readsPaused = paused
    }

    /// A tick: `heard` if anything arrived from the peer since the previous tick.
    public mutating func tick(now: Int64, heard: Bool) -> Action {
        guard !self.timedOut else { return .none }
        if heard || self.readsPaused {
            self.heard(now: now)
            return .none
        }
        let silent = now - self.lastHeard
        let grace = self.configuration.timeout - self.configuration.interval
        if silent >= self.configuration.timeout, let asked = self.firstKeepaliveOfSilence, now - asked >= grace {
            guard self.timeoutSeen else {
                self.timeoutSeen = true
                return .none
            }
            self.timedOut = true
            return .timedOut(silentFor: silent)
        }
        guard silent >= self.configuration.interval else { return .none }
        if let last = self.lastKeepalive, now - last < self.configuration.interval { return .none }
        self.lastKeepalive = now
        if self.firstKeepaliveOfSilence == nil { self.firstKeepaliveOfSilence = now }
        let stamp = UInt64(max(now, 0))
        if self.unanswered.count == Self.maximumUnanswered { self.unanswered.removeFirst() }
        self.unanswered.append(stamp)
        return .sendKeepalive(stamp)
    }

    /// A KEEPALIVE_ACK carrying `stamp` arrived: returns the round-trip time in nanoseconds if
    /// it answers a KEEPALIVE this side sent (and forgets that one), nil if it matches nothing
    /// (docs/protocol.md 7.12: such an ACK is ignored, so a peer cannot make up a round trip).
    public mutating func answered(_ stamp: UInt64, now: Int64) -> Int64? {
        guard let index = self.unanswered.firstIndex(of: stamp) else { return nil }
        self.unanswered.remove(at: index)
        return max(now - Int64(stamp), 0)
    }

    private mutating func heard(now: Int64) {
        self.lastHeard = now
        self.firstKeepaliveOfSilence = nil
        self.timeoutSeen = false
    }
}
