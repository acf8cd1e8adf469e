import NIOConcurrencyHelpers

/// Group commit: requests that arrive while a transaction is running wait for the next one,
/// which takes all of them (up to `maxBatch`) at once. A master answering many workers commits
/// their claims or reports in a few transactions instead of one each, which is what lets one
/// SQLite file or one PostgreSQL server keep up (docs/performance.md, "Parley Work").
///
/// At most `concurrency` transactions run at once: 1 for SQLite (one writer anyway), more for
/// PostgreSQL, where row locks let transactions run side by side. A batch that fails fails
/// every request in it, with the same error; nothing of it was committed.
final class GroupCommit<Input: Sendable, Output: Sendable>: Sendable {
    typealias Waiter = (input: Input, continuation: CheckedContinuation<Output, any Error>)

    private struct State {
        var pending: [Waiter] = []
        var running = 0
    }

    private let state = NIOLockedValueBox(State())
    private let maxBatch: Int
    private let concurrency: Int
    private let commit: @Sendable ([Input]) async throws -> [Output]

    /// - Parameter commit: runs one transaction for a batch; returns one output per input, in order.
    init(maxBatch: Int, concurrency: Int = 1, commit: @escaping @Sendable ([Input]) async throws -> [Output]) {
        self.maxBatch = max(1, maxBatch)
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

    private func drain() async {
        while true {
            let batch = self.state.withLockedValue { state -> [Waiter] in
                let batch = Array(state.pending.prefix(self.maxBatch))
                state.pending.removeFirst(batch.count)
                if batch.isEmpty { state.running -= 1 }
                return batch
            }
            guard !batch.isEmpty else { return }
            do {
                let outputs = try await self.commit(batch.map(\.input))
                guard outputs.count == batch.count else {
                    throw WorkStoreError("the store answered \(outputs.count) times for a batch of \(batch.count)")
                }
                for (waiter, output) in zip(batch, outputs) { waiter.continuation.resume(returning: output) }
            } catch {
                for waiter in batch { waiter.continuation.resume(throwing: error) }
            }
        }
    }
}
