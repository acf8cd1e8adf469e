import NIOConcurrencyHelpers
import NIOCore
import Parley
import ParleyBlock
import ParleyChaos

/// What `parley block bench` drives, and how: one IO after another in each of `depth` slots
/// until `end`, each IO's latency in nanoseconds.
struct BlockBenchPlan: Sendable {
    var depth: Int
    var blocks: UInt64
    var blockSize: UInt64
    var random: Bool
    var writes: Bool
    var end: ContinuousClock.Instant

    /// Where slot `slot` starts in a sequential run: the slots spread over the device.
    func firstBlock(of slot: Int) -> UInt64 { UInt64(slot) * (self.blocks / UInt64(self.depth)) }

    /// The byte offset of a slot's next IO; `next` is the slot's sequential position.
    func offset(_ rng: inout SplitMix64, next: inout UInt64) -> UInt64 {
        let block = self.random ? rng.next() % self.blocks : next % self.blocks
        next += 1
        return block * self.blockSize
    }
}

/// Keeps the plan's IOs in flight with the clients' completion calls (`BlockClient.io(...,
/// completion:)`, `BlockMultipathDevice.submit`): each answer sends the slot's next IO from
/// the thread it arrives on, with no task per IO, as fio's nbd engine does with libnbd's
/// asynchronous calls.
final class BlockBenchCallbackDriver: Sendable {
    typealias Submit = @Sendable (_ offset: UInt64, _ done: @escaping @Sendable (Result<Void, any Error>) -> Void) -> Void

    private struct State {
        var rng: SplitMix64
        var next: [UInt64]
        var latencies: [Int64] = []
        var inFlight = 0
        var failure: (any Error)?
        var finished: CheckedContinuation<[Int64], any Error>?
    }

    private let plan: BlockBenchPlan
    private let submit: Submit
    private let state: NIOLockedValueBox<State>

    init(plan: BlockBenchPlan, submit: @escaping Submit) {
        self.plan = plan
        self.submit = submit
        var latencies: [Int64] = []
        latencies.reserveCapacity(1 << 18)
        self.state = NIOLockedValueBox(State(
            rng: SplitMix64(seed: UInt64.random(in: 0...UInt64.max)), next: (0..<plan.depth).map(plan.firstBlock(of:)),
            latencies: latencies
        ))
    }

    /// Runs the plan; the latencies of every IO, or the first error.
    func run() async throws -> [Int64] {
        try await withCheckedThrowingContinuation { continuation in
            self.state.withLockedValue {
                $0.finished = continuation
                $0.inFlight = self.plan.depth
            }
            for slot in 0..<self.plan.depth { self.issue(slot: slot) }
        }
    }

    /// Sends the slot's next IO, or retires the slot when the time is up or an IO failed.
    private func issue(slot: Int) {
        let offset: UInt64? = self.state.withLockedValue { s in
            guard s.failure == nil, ContinuousClock.now < self.plan.end else { return nil }
            return self.plan.offset(&s.rng, next: &s.next[slot])
        }
        guard let offset else { return self.retire() }
        let t0 = ContinuousClock.now
        self.submit(offset) { result in
            let elapsed = (ContinuousClock.now - t0).nanoseconds
            self.state.withLockedValue { s in
                switch result {
                case .success: s.latencies.append(elapsed)
                case .failure(let error): if s.failure == nil { s.failure = error }
                }
            }
            self.issue(slot: slot)
        }
    }

    private func retire() {
        let done: (CheckedContinuation<[Int64], any Error>, Result<[Int64], any Error>)? = self.state.withLockedValue { s in
            s.inFlight -= 1
            guard s.inFlight == 0, let finished = s.finished else { return nil }
            s.finished = nil
            return (finished, s.failure.map { .failure($0) } ?? .success(s.latencies))
        }
        if let (continuation, result) = done { continuation.resume(with: result) }
    }
}

extension BlockBench.Target {
    /// One IO of the plan through the client's completion call.
    func submit(writes: Bool, offset: UInt64, length: UInt32, payload: ByteBuffer,
                done: @escaping @Sendable (Result<Void, any Error>) -> Void) {
        switch self {
        case .single(let client, let device):
            client.io(device, writes ? .write : .read, offset: offset, length: length, data: writes ? payload : nil) {
                done($0.map { _ in () })
            }
        case .multipath(let device):
            let io = MultipathIOState.IO(writes ? .write : .read, offset: offset, length: UInt64(length))
            device.submit(io, data: writes ? payload : nil) { done($0.map { _ in () }.mapError { $0 as any Error }) }
        }
    }

    /// The plan with a task per slot, each awaiting one IO after another (`--api async`).
    func runTasks(_ plan: BlockBenchPlan, length: UInt32, payload: ByteBuffer) async throws -> [Int64] {
        try await withThrowingTaskGroup(of: [Int64].self) { group in
            for slot in 0..<plan.depth {
                group.addTask {
                    var rng = SplitMix64(seed: UInt64.random(in: 0...UInt64.max))
                    var next = plan.firstBlock(of: slot)
                    var latencies: [Int64] = []
                    latencies.reserveCapacity(1 << 16)
                    while ContinuousClock.now < plan.end {
                        let offset = plan.offset(&rng, next: &next)
                        let t0 = ContinuousClock.now
                        if plan.writes {
                            try await self.write(offset: offset, data: payload)
                        } else {
                            try await self.read(offset: offset, length: length)
                        }
                        latencies.append((ContinuousClock.now - t0).nanoseconds)
                    }
                    return latencies
                }
            }
            var all: [Int64] = []
            for try await part in group { all += part }
            return all
        }
    }
}
