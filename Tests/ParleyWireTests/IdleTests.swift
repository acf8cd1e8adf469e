import ParleyWire
import Testing

@Suite struct IdleTests {
    static let ms: Int64 = 1_000_000

    @Test func idleForTheTimeoutEndsAtTheNextTick() {
        var m = IdleStateMachine(timeout: 400 * Self.ms, now: 0)
        #expect(m.tickInterval == 100 * Self.ms)
        #expect(m.tick(now: 100 * Self.ms, messages: 0, busy: false) == .none)
        #expect(m.tick(now: 399 * Self.ms, messages: 0, busy: false) == .none)
        #expect(m.tick(now: 400 * Self.ms, messages: 0, busy: false) == .none, "seen, to be confirmed at the next tick")
        #expect(m.tick(now: 500 * Self.ms, messages: 0, busy: false) == .idle(for: 500 * Self.ms))
        #expect(m.tick(now: 600 * Self.ms, messages: 0, busy: false) == .none, "reported once")
        #expect(m.tick(now: 700 * Self.ms, messages: 5, busy: false) == .none, "and the machine stays done")
    }

    @Test func aMessageRestartsTheClock() {
        var m = IdleStateMachine(timeout: 400 * Self.ms, now: 0, messages: 7)
        #expect(m.tick(now: 300 * Self.ms, messages: 8, busy: false) == .none)
        #expect(m.tick(now: 699 * Self.ms, messages: 8, busy: false) == .none, "399 ms idle")
        #expect(m.tick(now: 700 * Self.ms, messages: 8, busy: false) == .none)
        #expect(m.tick(now: 800 * Self.ms, messages: 8, busy: false) == .idle(for: 500 * Self.ms))
    }

    @Test func workInProgressIsNotIdle() {
        var m = IdleStateMachine(timeout: 400 * Self.ms, now: 0)
        // A long request: nothing new arrives, but an answer is owed.
        for t in stride(from: Int64(100), through: 2000, by: 100) {
            #expect(m.tick(now: t * Self.ms, messages: 1, busy: true) == .none)
        }
        // Idle from the last tick that saw work (2000 ms).
        #expect(m.tick(now: 2100 * Self.ms, messages: 1, busy: false) == .none)
        #expect(m.tick(now: 2400 * Self.ms, messages: 1, busy: false) == .none, "seen")
        #expect(m.tick(now: 2500 * Self.ms, messages: 1, busy: false) == .idle(for: 500 * Self.ms))
    }

    @Test func newsBetweenSeeingAndConfirmingTheTimeoutKeepsTheConnection() {
        var m = IdleStateMachine(timeout: 400 * Self.ms, now: 0)
        #expect(m.tick(now: 450 * Self.ms, messages: 0, busy: false) == .none, "seen")
        // The loop was busy; the message that waited was read before this tick.
        #expect(m.tick(now: 460 * Self.ms, messages: 1, busy: false) == .none)
        #expect(m.tick(now: 860 * Self.ms, messages: 1, busy: false) == .none, "seen again, 400 ms later")
        #expect(m.tick(now: 870 * Self.ms, messages: 1, busy: false) == .idle(for: 410 * Self.ms))
    }

    @Test func aShortTimeoutTicksEveryMillisecond() {
        let m = IdleStateMachine(timeout: 2 * Self.ms, now: 0)
        #expect(m.tickInterval == 1 * Self.ms)
    }
}
