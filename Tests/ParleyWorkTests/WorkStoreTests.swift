import Foundation
import ParleyWork
import Testing

/// The SQLite job store: migrations, claims, exactly-once acceptance, expiry, persistence.
@Suite struct SQLiteWorkStoreTests {
    static func freshPath() -> String {
        let dir = NSTemporaryDirectory() + "work-store-\(UUID().uuidString.prefix(8))"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir + "/jobs.sqlite"
    }

    static func jobs(_ n: Int, priority: Int = 0) -> [NewJob] {
        (0..<n).map { NewJob(spec: Array("job \($0)".utf8), signature: Array(repeating: 1, count: 64), priority: priority) }
    }

    let second: Int64 = 1_000_000_000

    @Test func migrationsRunOnceAndTheStoreReopens() async throws {
        let path = Self.freshPath()
        do {
            let store = try SQLiteWorkStore(path: path)
            #expect(try store.appliedMigrations() == ["v1: jobs and results"])
            _ = try await store.submit(Self.jobs(3), now: 0)
        }
        let again = try SQLiteWorkStore(path: path)
        #expect(try again.appliedMigrations() == ["v1: jobs and results"])
        #expect(try await again.counts()["queued"] == 3)
    }

    @Test func concurrentClaimsHandEveryJobOutOnceAndResultsAreAcceptedOnce() async throws {
        let store = try SQLiteWorkStore(path: Self.freshPath())
        let ids = try await store.submit(Self.jobs(500), now: 0)
        #expect(Set(ids).count == 500)
        // Ten workers claim in batches of 7 at once until nothing is left.
        let claimed = try await withThrowingTaskGroup(of: [ClaimedJob].self) { group in
            for w in 0..<10 {
                group.addTask {
                    var mine: [ClaimedJob] = []
                    while true {
                        let batch = try await store.claim(worker: "w\(w)", limit: 7, now: 0, leaseDuration: 60 * 1_000_000_000)
                        if batch.isEmpty { return mine }
                        mine += batch
                    }
                }
            }
            var all: [ClaimedJob] = []
            for try await batch in group { all += batch }
            return all
        }
        #expect(claimed.count == 500 && Set(claimed.map(\.id)).count == 500, "a job was handed out twice or not at all")
        #expect(Set(claimed.map(\.lease.id)).count == 500, "lease ids are unique")
        for job in claimed {
            let report = LeaseReport(leaseID: job.lease.id, worker: job.lease.worker, outcome: .success)
            #expect(try await store.report(jobID: job.id, report, result: Array("out \(job.id)".utf8), now: 1) == .accepted)
            // Resent after a reconnect: acknowledged, not stored again.
            #expect(try await store.report(jobID: job.id, report, result: Array("other".utf8), now: 2) == .alreadyAccepted)
        }
        #expect(try await store.counts() == ["queued": 0, "leased": 0, "succeeded": 500, "failed": 0])
        let one = try #require(try await store.job(claimed[0].id))
        #expect(one.result == Array("out \(claimed[0].id)".utf8))
    }

    @Test func priorityThenAgeDecideTheOrder() async throws {
        let store = try SQLiteWorkStore(path: Self.freshPath())
        let low = try await store.submit(Self.jobs(2), now: 0)
        let high = try await store.submit(Self.jobs(2, priority: 5), now: 0)
        let claimed = try await store.claim(worker: "w", limit: 4, now: 0, leaseDuration: second)
        #expect(claimed.map(\.id) == high + low)
    }

    @Test func expiredLeasesGoBackAndFailuresAreRetriedThenFailed() async throws {
        let store = try SQLiteWorkStore(path: Self.freshPath())
        let id = try await store.submit([NewJob(spec: [1], signature: [2], maxAttempts: 2)], now: 0)[0]
        let first = try await store.claim(worker: "a", limit: 1, now: 0, leaseDuration: second)[0]
        #expect(try await store.expireLeases(now: second - 1) == 0)
        #expect(try await store.expireLeases(now: second) == 1)
        #expect(try await store.counts()["queued"] == 1)
        let second = try await store.claim(worker: "b", limit: 1, now: second, leaseDuration: self.second)[0]
        #expect(second.lease.id != first.lease.id)
        #expect(try await store.report(jobID: id, LeaseReport(leaseID: second.lease.id, worker: "b", outcome: .failure("exit 3")), result: [], now: 2) == .failed)
        let job = try #require(try await store.job(id))
        #expect(job.record.state == .failed(reasons: ["lease \(first.lease.id) to a expired", "lease \(second.lease.id) on b: exit 3"]))
        #expect(job.result == nil)
        #expect(try await store.claim(worker: "c", limit: 1, now: 3, leaseDuration: self.second).isEmpty)
    }

    @Test func badReportsAndUnsignedJobsAreRefusedAndStoreNothing() async throws {
        let store = try SQLiteWorkStore(path: Self.freshPath())
        await #expect(throws: WorkStoreError.self) { _ = try await store.submit([NewJob(spec: [1], signature: [])], now: 0) }
        #expect(try await store.counts()["queued"] == 0)
        let id = try await store.submit(Self.jobs(1), now: 0)[0]
        let claimed = try await store.claim(worker: "w1", limit: 1, now: 0, leaseDuration: second)[0]
        #expect(try await store.report(jobID: 999, LeaseReport(leaseID: claimed.lease.id, worker: "w1", outcome: .success), result: [], now: 1) == .rejected("no job 999"))
        let other = try await store.report(jobID: id, LeaseReport(leaseID: claimed.lease.id, worker: "w2", outcome: .success), result: [], now: 1)
        guard case .rejected = other else { Issue.record("another worker's result accepted: \(other)"); return }
        #expect(try await store.job(id)?.result == nil)
        #expect(try await store.counts()["leased"] == 1)
        try await store.handBack(jobID: id, leaseID: claimed.lease.id, worker: "w1")
        #expect(try await store.counts()["queued"] == 1)
    }
}
