import NIOConcurrencyHelpers

/// Group commit: requests that arrive while a transaction is running wait for the next one,
/// which takes all of them (up to `maxBatch`) at once. A master answering many workers commits
/// their claims or reports in a few transactions instead of one each, which is what lets one
/// SQLite file or one PostgreSQL server keep up (docs/performance.md, "Parley Work").
///
/// At most `concurrency` transactions run at once: 1 for SQLite (one writer anyway), more for
/// PostgreSQL, where row locks let transactions run side by side. A batch also stops at
/// `maxWeight` (the bytes of its inputs, say). When a batch of several fails, each of its
/// requests is committed again alone, so that one bad request fails only itself.
final class GroupCommit<Input: Sendable, Output: Sendable>: Sendable {
    typealias Waiter = (input: Input, continuation: CheckedContinuation<Output, any Error>)

    private struct State {
        var pending: [Waiter] = []
        var running = 0
    }

    private let state = NIOLockedValueBox(State())
    private let maxBatch: Int
    private let maxWeight: Int
    private let weight: @Sendable (Input) -> Int
    private let concurrency: Int
    private let commit: @Sendable ([Input]) async throws -> [Output]

    /// - Parameter commit: runs one transaction for a batch; returns one output per input, in order.
    init(
        maxBatch: Int, maxWeight: Int = .max, weight: @escaping @Sendable (Input) -> Int = { _ in 1 }, concurrency: Int = 1,
        commit: @escaping @Sendable ([Input]) async throws -> [Output]
    ) {
        self.maxBatch = max(1, maxBatch)
        self.maxWeight = maxWeight
        self.weight = weight
        self.concurrency = max(1, concurrency)
        self.commit = commit
    }

    func submit(_ input: Input) async throws -> Output {
        try await withCheckedThrowingContinuation { continuation in
            let start = self.state.withLockedValue { state -> Bool in
                state.pending.append((input, continuation))
                guard state.running < self.concurrency else { return false }
                state.running += 1
                return true
            }
            if start { Task { await self.drain() } }
        }
    }

    private func run(_ inputs: [Input]) async throws -> [Output] {
        let outputs = try await self.commit(inputs)
        guard outputs.count == inputs.count else {
            throw WorkStoreError("the store answered \(outputs.count) times for a batch of \(inputs.count)")
        }
        return outputs
    }

    private func drain() async {
        while true {
            let batch = self.state.withLockedValue { state -> [Waiter] in
                var count = 0, total = 0
                for waiter in state.pending.prefix(self.maxBatch) {
                    let w = self.weight(waiter.input)
                    if count > 0 && total + w > self.maxWeight { break }
                    count += 1
                    total += w
                }
                let batch = Array(state.pending.prefix(count))
                state.pending.removeFirst(batch.count)
                if batch.isEmpty { state.running -= 1 }
                return batch
            }
            guard !batch.isEmpty else { return }
            do {
                let outputs = try await self.run(batch.map(\.input))
                for (waiter, output) in zip(batch, outputs) { waiter.continuation.resume(returning: output) }
            } catch where batch.count > 1 {
                // One at a time: only the requests that fail alone fail.
                for waiter in batch {
                    do {
                        waiter.continuation.resume(returning: try await self.run([waiter.input])[0])
                    } catch {
                        waiter.continuation.resume(throwing: error)
                    }
                }
            } catch {
                for waiter in batch { waiter.continuation.resume(throwing: error) }
            }
        }
    }
}
