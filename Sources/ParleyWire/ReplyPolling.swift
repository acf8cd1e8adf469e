/// Whether a connection busy-waits for its peer's next bytes after answering, and for how
/// long. Sans IO: the connection does the waiting (`PeerWait`, `parley_await_bytes`) and
/// reports what it saw. Used by the NBD server after its answers, and by Parley connections
/// (`ParleyConnectionLimits.replyPolling`) after a read burst of one message whose end
/// flushed what it prompted (a server's answer, a client's next request).
///
/// Why: a peer at queue depth 1 sends its next request (or its answer) a few tens of
/// microseconds after it reads ours. A thread that sleeps at once lets its CPU go idle, and
/// where idle CPUs halt at once (virtual machines without the guest's halt polling, such as
/// the ones Parley is measured on), waking it again costs an interrupt across CPUs and a trip
/// through the hypervisor: more than the request itself. Waiting a little without sleeping,
/// as the kernel's halt polling does for a whole CPU, keeps that thread awake for exactly the
/// peer that is about to send. A wait that runs out spends its whole window, so after one the
/// connection lets the next 1, then 3, 7, ... up to 1023 chances go by without waiting; a
/// wait that sees bytes resets that. A peer that pauses costs one window per pause; one that
/// is slow costs a window now and then.
public struct ReplyPolling: Sendable, Equatable {
    /// The longest wait, in nanoseconds; 0 never waits.
    public let window: UInt64
    /// Waits in a row that ran out.
    public private(set) var misses = 0
    /// Chances to wait still to let go by.
    public private(set) var skipping = 0
    /// The longest run of chances let go by after misses: 2^10 - 1.
    public static let maximumSkip = 1023

    public init(window: UInt64) {
        self.window = window
    }

    /// Asked after the connection's answers are flushed and nothing is in flight: wait for
    /// the peer's next bytes now?
    public mutating func shouldWait() -> Bool {
        guard self.window > 0 else { return false }
        if self.skipping > 0 {
            self.skipping -= 1
            return false
        }
        return true
    }

    /// What the wait saw: bytes arrived (a request, an answer) or nothing before the window
    /// ran out.
    public mutating func waited(sawBytes: Bool) {
        if sawBytes {
            self.misses = 0
            self.skipping = 0
        } else {
            self.misses = min(self.misses + 1, 10)
            self.skipping = min((1 << self.misses) - 1, Self.maximumSkip)
        }
    }
}
