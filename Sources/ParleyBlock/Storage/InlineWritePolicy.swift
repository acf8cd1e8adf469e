/// When a buffered write may run on the thread that received it (an event loop) although the
/// file system refuses `RWF_NOWAIT` for writes (ext4 does), instead of a hop to an IO thread
/// and back: two wake-ups that cost more than a 4 KiB copy into the page cache. Also, on any
/// file system, for a large write gathered from several network reads (up to 1 MiB by
/// default): written from the CPU that just read it, it took 11% less server CPU per MiB
/// than handed to an IO thread (docs/performance.md, session 21).
///
/// A buffered write blocks when it must read a partly written page that is not cached (so
/// only whole pages are written inline), when the kernel throttles a writer that dirtied too
/// much, or on the journal. The last two cannot be seen beforehand, so the policy watches:
/// one inline write slower than `slowNanoseconds` during which the thread slept in the
/// kernel stops inline writes for `pauseNanoseconds`, and they go to the IO threads
/// meanwhile. A write that was slow only because the thread was preempted (it never slept:
/// the CPUs were busy with other work, not waiting for the disk) pauses nothing: on a
/// machine whose client, server and relay share two CPUs that happened about once every
/// two seconds of writing, and each one sent every write to the IO threads for a second
/// (docs/performance.md, session 22). Sans-IO: the caller passes the clock's readings and
/// whether the thread slept in.
public struct InlineWritePolicy: Sendable, Equatable {
    /// The largest write done inline; 0 turns inline writes off.
    public var largest: Int
    /// Writes are inline only if offset and length are multiples of this (the page size).
    public var alignment: Int
    public var slowNanoseconds: Int64
    public var pauseNanoseconds: Int64

    public init(largest: Int = 1 << 20, alignment: Int = 4096, slowNanoseconds: Int64 = 1_000_000, pauseNanoseconds: Int64 = 1_000_000_000) {
        self.largest = largest
        self.alignment = max(1, alignment)
        self.slowNanoseconds = slowNanoseconds
        self.pauseNanoseconds = pauseNanoseconds
    }

    public static let off = InlineWritePolicy(largest: 0)

    /// Whether a write of `length` bytes at `offset` may run inline at `now`, given the end of
    /// the current pause (`pausedUntil`, from `pause(after:at:)`).
    public func allows(offset: UInt64, length: Int, now: Int64, pausedUntil: Int64) -> Bool {
        length > 0 && length <= self.largest && offset % UInt64(self.alignment) == 0 && length % self.alignment == 0
            && now >= pausedUntil
    }

    /// Whether an inline write that took `nanoseconds` was slow (then ask `pause`).
    public func isSlow(_ nanoseconds: Int64) -> Bool { nanoseconds > self.slowNanoseconds }

    /// After an inline write that took `nanoseconds` and ended at `now`, during which the
    /// thread slept in the kernel (`slept`) or not: the end of the pause it starts, or nil if
    /// it was quick enough or only preempted.
    public func pause(after nanoseconds: Int64, slept: Bool, at now: Int64) -> Int64? {
        self.isSlow(nanoseconds) && slept ? now &+ self.pauseNanoseconds : nil
    }
}
