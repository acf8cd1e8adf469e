/// When a server gives up on a connection that is idle and not watched by keepalive
/// (docs/protocol.md, section 7.12, "Idle connections without keepalive").
///
/// The connection ticks it periodically (every `tickInterval`) with the current time, the
/// number of messages received from the peer so far, and whether anything is in progress
/// (a request of either side unanswered, a handler running or queued, reads paused). A tick
/// that sees a new message or work in progress restarts the idle clock; once the clock has
/// run for `timeout`, the next tick that still sees nothing new says so, once. Like the
/// keepalive machine it waits for a tick after the one that saw the timeout pass: the event
/// loop reads the socket between two ticks, so a message that waited while the loop was busy
/// counts before the connection is given up on.
///
/// Invariants: no clock, timer or channel inside; times are monotonic nanoseconds passed in.
public struct IdleStateMachine: Sendable {
    public enum Action: Hashable, Sendable {
        case none
        /// Nothing received and nothing in progress for this many nanoseconds: close the
        /// connection with `timeout`.
        case idle(for: Int64)
    }

    /// Idle time after which the connection ends, in nanoseconds (positive).
    public let timeout: Int64
    /// When the current idle stretch started.
    private(set) var idleSince: Int64
    /// The peer's message count at the last tick.
    private var messagesSeen: UInt64
    /// A tick saw the timeout pass; the next one without news ends it.
    private var timeoutSeen = false
    private var ended = false

    public init(timeout: Int64, now: Int64, messages: UInt64 = 0) {
        precondition(timeout > 0, "idle timeout must be positive")
        self.timeout = timeout
        self.idleSince = now
        self.messagesSeen = messages
    }

    /// How often the connection should tick: a quarter of the timeout (so a connection ends
    /// at most half a timeout late), at least 1 ms.
    public var tickInterval: Int64 { max(self.timeout / 4, 1_000_000) }

    public mutating func tick(now: Int64, messages: UInt64, busy: Bool) -> Action {
        guard !self.ended else { return .none }
        if messages != self.messagesSeen || busy {
            self.messagesSeen = messages
            self.idleSince = now
            self.timeoutSeen = false
            return .none
        }
        let idle = now &- self.idleSince
        guard idle >= self.timeout else { return .none }
        guard self.timeoutSeen else {
            self.timeoutSeen = true
            return .none
        }
        self.ended = true
        return .idle(for: idle)
    }
}
