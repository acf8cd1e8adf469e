import Foundation
import GRDB
import Logging
@testable import ParleyWork
import PostgresNIO
import Testing
import ParleyTestSupport

/// The stores a test runs on: SQLite always; PostgreSQL when PARLEY_TEST_POSTGRES names a
/// server (`Scripts/postgres-for-tests.sh start` prints one; `.ci/run` starts it), each test
/// in a database of its own.
enum StoreKind: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case sqlite, postgres

    static var available: [StoreKind] {
        ProcessInfo.processInfo.environment["PARLEY_TEST_POSTGRES"] == nil ? [.sqlite] : [.sqlite, .postgres]
    }

    var testDescription: String { self.rawValue }

    func make() async throws -> any WorkStore {
        switch self {
        case .sqlite: return try SQLiteWorkStore(path: SQLiteWorkStoreTests.freshPath())
        case .postgres: return try await PostgresWorkStore(url: try await TestPostgres.freshDatabase(), connectTimeout: TestPostgres.patience)
        }
    }
}

/// Fresh databases on the test server.
enum TestPostgres {
    static var url: String? { ProcessInfo.processInfo.environment["PARLEY_TEST_POSTGRES"] }
    /// How long a store waits for the server at first: the whole suite runs at once on two
    /// cores, and a connection can take seconds then.
    static let patience = Duration.seconds(60)

    /// Creates an empty database and returns its URL.
    static func freshDatabase() async throws -> String {
        let base = try #require(self.url, "PARLEY_TEST_POSTGRES is not set")
        let name = "parley_test_\(UUID().uuidString.prefix(8).lowercased())"
        var parts = try #require(URLComponents(string: base))
        var config = PostgresClient.Configuration(
            host: parts.host ?? "127.0.0.1", port: parts.port ?? 5432, username: parts.user ?? "parley", password: parts.password,
            database: String(parts.path.dropFirst()), tls: .disable
        )
        config.options.maximumConnections = 1
        config.options.connectTimeout = patience
        let client = PostgresClient(configuration: config, backgroundLogger: Logger(label: "test.postgres"))
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await client.run() }
            try await client.query(PostgresQuery(unsafeSQL: "CREATE DATABASE \(name)"))
            group.cancelAll()
        }
        parts.path = "/" + name
        return try #require(parts.string)
    }
}

/// The job stores: migrations, claims, exactly-once acceptance, expiry, persistence.
@Suite struct SQLiteWorkStoreTests {
    static func freshPath() -> String {
        let dir = testScratchPath("work-store-\(UUID().uuidString.prefix(8))")
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir + "/jobs.sqlite"
    }

    static func jobs(_ n: Int, priority: Int = 0, app: String = "") -> [NewJob] {
        (0..<n).map { NewJob(spec: Array("job \($0)".utf8), signature: Array(repeating: 1, count: 64), priority: priority, app: app) }
    }

    let second: Int64 = 1_000_000_000

    @Test func migrationsRunOnceAndTheStoreReopens() async throws {
        let path = Self.freshPath()
        do {
            let store = try SQLiteWorkStore(path: path)
            #expect(try await store.appliedMigrations() == ["v1: jobs and results", "v2: queue index in claim order", "v3: the application a job needs", "v4: who holds a lease"])
            _ = try await store.submit(Self.jobs(3), now: 0)
        }
        let again = try SQLiteWorkStore(path: path)
        #expect(try await again.appliedMigrations() == ["v1: jobs and results", "v2: queue index in claim order", "v3: the application a job needs", "v4: who holds a lease"])
        #expect(try await again.counts()["queued"] == 3)
    }

    /// Records survive the store's format in every state, and records written as JSON (by
    /// the first stores) are still read.
    @Test func recordsRoundTripAndOldJSONRecordsAreRead() throws {
        var record = JobRecord(id: 9, maxAttempts: 3)
        var seen: [JobRecord] = [record]
        _ = try LeaseRules.assign(&record, to: "w1", leaseID: 4, now: 10, duration: 5)
        seen.append(record)
        _ = LeaseRules.report(&record, LeaseReport(leaseID: 4, worker: "w1", outcome: .failure("exit 3")))
        seen.append(record)
        _ = try LeaseRules.assign(&record, to: "w2", leaseID: 7, now: 20, duration: 5)
        LeaseRules.expire(&record, now: 30)
        seen.append(record)
        _ = try LeaseRules.assign(&record, to: "w3", leaseID: 8, now: 40, duration: 5)
        _ = LeaseRules.report(&record, LeaseReport(leaseID: 8, worker: "w3", outcome: .failure("signal 9")))
        seen.append(record)
        var won = JobRecord(id: 9)
        _ = try LeaseRules.assign(&won, to: "w", leaseID: 1, now: 0, duration: 5)
        _ = LeaseRules.report(&won, LeaseReport(leaseID: 1, worker: "w", outcome: .success))
        seen.append(won)
        for r in seen {
            #expect(try JobRow.decode(JobRow.encode(r), id: 9) == r)
            #expect(try JobRow.decode(JSONEncoder().encode(r), id: 9) == r, "the JSON of the first stores")
        }
        #expect(Set(seen.map { JobRow.state(of: $0).state }) == ["queued", "leased", "failed", "succeeded"])
        #expect(throws: (any Error).self) { _ = try JobRow.decode(Data([0xFF, 0xFF]), id: 1) }
    }

    /// A database made by a master of the first version (migration v1 only, jobs queued) is
    /// upgraded when a later master opens it, and its jobs are still claimed in order.
    @Test func aVersionOneDatabaseIsMigratedAndKeepsItsJobs() async throws {
        let path = Self.freshPath()
        do {
            let pool = try DatabasePool(path: path)
            try SQLiteWorkStore.migrator.migrate(pool, upTo: "v1: jobs and results")
            try await pool.write { db in
                for (i, priority) in [0, 5, 0].enumerated() {
                    try db.execute(
                        sql: "INSERT INTO job (batch, priority, spec, signature, state, record, submittedAt) VALUES ('', ?, ?, ?, 'queued', ?, 0)",
                        arguments: [priority, Data("job \(i)".utf8), Data(repeating: 1, count: 64), try JobRow.encode(JobRecord(id: 0))]
                    )
                }
            }
        }
        let store = try SQLiteWorkStore(path: path)
        #expect(try await store.appliedMigrations() == ["v1: jobs and results", "v2: queue index in claim order", "v3: the application a job needs", "v4: who holds a lease"])
        let claimed = try await store.claim(worker: "w", limit: 3, now: 0, leaseDuration: second)
        #expect(claimed.map(\.id) == [2, 1, 3])
    }

    @Test(.enabled(if: TestPostgres.url != nil, "needs PARLEY_TEST_POSTGRES"))
    func postgresMigratesOnceWhenSeveralMastersStartAtOnce() async throws {
        let url = try await TestPostgres.freshDatabase()
        // Three masters start together on one empty database: one migrates, the others wait.
        let stores = try await withThrowingTaskGroup(of: PostgresWorkStore.self) { group in
            for _ in 0..<3 { group.addTask { try await PostgresWorkStore(url: url, connectTimeout: TestPostgres.patience) } }
            var all: [PostgresWorkStore] = []
            for try await store in group { all.append(store) }
            return all
        }
        for store in stores {
            #expect(try await store.appliedMigrations() == ["v1: jobs and results", "v2: the application a job needs", "v3: who holds a lease"])
        }
        _ = try await stores[0].submit(Self.jobs(4), now: 0)
        #expect(try await stores[2].counts()["queued"] == 4)
        for store in stores { await store.close() }
        let again = try await PostgresWorkStore(url: url, connectTimeout: TestPostgres.patience)
        #expect(try await again.appliedMigrations() == ["v1: jobs and results", "v2: the application a job needs", "v3: who holds a lease"])
        #expect(try await again.counts()["queued"] == 4)
        await again.close()
    }

    @Test func postgresRefusesABadURLClearly() async throws {
        await #expect(throws: WorkStoreError.self) { _ = try await PostgresWorkStore(url: "mysql://x@y/z") }
        await #expect(throws: WorkStoreError.self) { _ = try await PostgresWorkStore(url: "postgres://127.0.0.1/db") }
        // Nothing listens there: a clear error, not a hang.
        let error = await #expect(throws: WorkStoreError.self) { _ = try await PostgresWorkStore(url: "postgres://u@127.0.0.1:1/db", connectTimeout: .seconds(1)) }
        #expect(error?.message.contains("127.0.0.1:1") == true)
    }

    /// A job that needs an application goes only to a worker that runs it; a worker that
    /// runs applications still gets the jobs that need none.
    /// [R-19.2-1]: only jobs of the applications a worker names (or of none) go to it.
    @Test(arguments: StoreKind.available) func jobsGoOnlyToWorkersThatRunTheirApplication(kind: StoreKind) async throws {
        let store = try await kind.make()
        defer { Task { await store.close() } }
        let plain = try await store.submit(Self.jobs(2), now: 0)
        let python = try await store.submit(Self.jobs(2, priority: 9, app: "python3"), now: 0)
        let gpu = try await store.submit(Self.jobs(1, app: "cuda-12"), now: 0)
        let bare = try await store.claim(worker: "bare", limit: 10, now: 0, leaseDuration: second)
        #expect(Set(bare.map(\.id)) == Set(plain), "a worker without applications gets only the plain jobs: \(bare.map(\.id))")
        // In one batch with a worker of other applications: each gets its own.
        _ = try await store.submit(Self.jobs(1), now: 0)
        let claims = try await store.claim(
            [ClaimRequest(worker: "py", limit: 2, apps: ["python3"]), ClaimRequest(worker: "bare", limit: 10)], now: 0, leaseDuration: second
        )
        #expect(claims[0].map(\.id) == python, "the python3 worker gets the python3 jobs first (higher priority)")
        #expect(claims[1].count == 1 && !python.contains(claims[1][0].id))
        #expect(try await store.claim(worker: "py", limit: 10, apps: ["python3"], now: 0, leaseDuration: second).isEmpty)
        #expect(try await store.claim(worker: "gpu", limit: 10, apps: ["cuda-12", "python3"], now: 0, leaseDuration: second).map(\.id) == gpu)
    }

    /// A cap on the leases a worker holds: asking again and again gets it no more than the
    /// cap; a report, a hand-back or an expiry makes room; other workers are not held back;
    /// two requests of one worker in a batch share its room. [R-19.2-4]
    @Test(arguments: StoreKind.available) func aWorkerHoldsNoMoreLeasesThanItsCap(kind: StoreKind) async throws {
        let store = try await kind.make()
        defer { Task { await store.close() } }
        _ = try await store.submit(Self.jobs(20), now: 0)
        func claim(_ worker: String, _ limit: Int, now: Int64 = 0) async throws -> [ClaimedJob] {
            try await store.claim([ClaimRequest(worker: worker, limit: limit, maxHeld: 3)], now: now, leaseDuration: second)[0]
        }
        let first = try await claim("hoarder", 2)
        #expect(first.count == 2)
        #expect(try await claim("hoarder", 5).count == 1, "3 held: the cap")
        #expect(try await claim("hoarder", 5).isEmpty, "again and again: nothing more")
        #expect(try await claim("other", 2).count == 2, "another worker is not held back")
        // A report makes room for one; a hand-back for one more.
        _ = try await store.report(jobID: first[0].id, LeaseReport(leaseID: first[0].lease.id, worker: "hoarder", outcome: .success), result: [1], now: 1)
        try await store.handBack(jobID: first[1].id, leaseID: first[1].lease.id, worker: "hoarder")
        #expect(try await claim("hoarder", 5).count == 2)
        // Two requests of one worker in one batch share its room (1 left for "other").
        let batch = try await store.claim(
            [ClaimRequest(worker: "other", limit: 1, maxHeld: 3), ClaimRequest(worker: "other", limit: 4, maxHeld: 3)], now: 0, leaseDuration: second
        )
        #expect(batch.map(\.count) == [1, 0])
        // Expired leases free their holder too; without a cap a worker takes what it asks.
        #expect(try await store.expireLeases(now: 10 * second) == 6)
        #expect(try await claim("hoarder", 5, now: 10 * second).count == 3)
        #expect(try await store.claim(worker: "hoarder", limit: 4, now: 10 * second, leaseDuration: second).count == 4)
    }

    /// [R-19.2-4] Claims for one capped worker in concurrent transactions (a master with
    /// several store connections, or several masters on one database) still stop at the cap.
    @Test(arguments: StoreKind.available) func concurrentClaimsOfOneWorkerStopAtItsCap(kind: StoreKind) async throws {
        let store = try await kind.make()
        defer { Task { await store.close() } }
        _ = try await store.submit(Self.jobs(16), now: 0)
        let got = try await withThrowingTaskGroup(of: Int.self) { group in
            for _ in 0..<8 {
                group.addTask {
                    try await store.claim([ClaimRequest(worker: "hoarder", limit: 2, maxHeld: 2)], now: 0, leaseDuration: self.second)[0].count
                }
            }
            return try await group.reduce(0, +)
        }
        #expect(got == 2, "\(got) leases handed out under a cap of 2")
        #expect(try await store.counts()["leased"] == 2)
    }

    @Test func capsCutEachRequestToWhatItsWorkerHasRoomFor() {
        let requests = [
            ClaimRequest(worker: "a", limit: 5, maxHeld: 4), ClaimRequest(worker: "b", limit: 5),
            ClaimRequest(worker: "a", limit: 5, maxHeld: 4), ClaimRequest(worker: "c", limit: 2, maxHeld: 1),
            ClaimRequest(worker: "d", limit: 3, maxHeld: 10),
        ]
        let capped = JobRow.capped(requests, held: ["a": 1, "b": 50, "c": 7])
        #expect(capped.map(\.limit) == [3, 5, 0, 0, 3])
        #expect(JobRow.cappedWorkers(requests) == ["a", "c", "d"])
    }

    @Test(arguments: StoreKind.available) func batchedClaimsAndReportsKeepEachVerdict(kind: StoreKind) async throws {
        let store = try await kind.make()
        defer { Task { await store.close() } }
        let ids = try await store.submit(Self.jobs(10), now: 0)
        #expect(ids == ids.sorted() && Set(ids).count == 10)
        let claims = try await store.claim(
            [ClaimRequest(worker: "a", limit: 3), ClaimRequest(worker: "b", limit: 0), ClaimRequest(worker: "c", limit: 20)], now: 0, leaseDuration: second
        )
        #expect(claims.map(\.count) == [3, 0, 7])
        #expect(Set(claims.flatMap { $0.map(\.id) }) == Set(ids))
        #expect(claims[0].allSatisfy { $0.lease.worker == "a" } && claims[2].allSatisfy { $0.lease.worker == "c" })
        let a = claims[0][0], c = claims[2][0], c2 = claims[2][1]
        let verdicts = try await store.report([
            ReportInput(jobID: a.id, report: LeaseReport(leaseID: a.lease.id, worker: "a", outcome: .success), result: [1]),
            ReportInput(jobID: a.id, report: LeaseReport(leaseID: a.lease.id, worker: "a", outcome: .success), result: [2]),
            ReportInput(jobID: c.id, report: LeaseReport(leaseID: c.lease.id, worker: "a", outcome: .success), result: [3]),
            ReportInput(jobID: 999_999, report: LeaseReport(leaseID: 1, worker: "a", outcome: .success), result: [4]),
            ReportInput(jobID: c2.id, report: LeaseReport(leaseID: c2.lease.id, worker: "c", outcome: .failure("exit 1")), result: [5]),
        ], now: 1)
        #expect(verdicts[0] == .accepted && verdicts[1] == .alreadyAccepted && verdicts[4] == .retrying)
        guard case .rejected = verdicts[2], case .rejected = verdicts[3] else { Issue.record("bad reports accepted: \(verdicts)"); return }
        #expect(try await store.job(a.id)?.result == [1])
        #expect(try await store.job(c.id)?.result == nil)
        #expect(try await store.counts() == ["queued": 1, "leased": 8, "succeeded": 1, "failed": 0])
    }

    @Test(arguments: StoreKind.available) func concurrentClaimsHandEveryJobOutOnceAndResultsAreAcceptedOnce(kind: StoreKind) async throws {
        let store = try await kind.make()
        defer { Task { await store.close() } }
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

    @Test(arguments: StoreKind.available) func priorityThenAgeDecideTheOrder(kind: StoreKind) async throws {
        let store = try await kind.make()
        defer { Task { await store.close() } }
        let low = try await store.submit(Self.jobs(2), now: 0)
        let high = try await store.submit(Self.jobs(2, priority: 5), now: 0)
        let claimed = try await store.claim(worker: "w", limit: 4, now: 0, leaseDuration: second)
        #expect(claimed.map(\.id) == high + low)
    }

    @Test(arguments: StoreKind.available) func expiredLeasesGoBackAndFailuresAreRetriedThenFailed(kind: StoreKind) async throws {
        let store = try await kind.make()
        defer { Task { await store.close() } }
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

    @Test(arguments: StoreKind.available) func badReportsAndUnsignedJobsAreRefusedAndStoreNothing(kind: StoreKind) async throws {
        let store = try await kind.make()
        defer { Task { await store.close() } }
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

    /// The service tells a refusal (answered `invalidArgument`, which stops a worker's job)
    /// from a store failure by the error's type: every store throws its refusals as they are
    /// (postgres-nio wraps what a transaction's body throws; the store unwraps them).
    @Test(arguments: StoreKind.available) func refusalsKeepTheirTypeOnEveryStore(kind: StoreKind) async throws {
        let store = try await kind.make()
        defer { Task { await store.close() } }
        let id = try await store.submit(Self.jobs(1), now: 0)[0]
        let claimed = try await store.claim(worker: "w1", limit: 1, now: 0, leaseDuration: second)[0]
        #expect(try await store.expireLeases(now: second) == 1)
        await #expect(throws: LeaseError.self, "renewal of an expired lease") {
            _ = try await store.renew(jobID: id, leaseID: claimed.lease.id, worker: "w1", now: second + 1, leaseDuration: self.second)
        }
        await #expect(throws: LeaseError.self, "hand-back of an expired lease") {
            try await store.handBack(jobID: id, leaseID: claimed.lease.id, worker: "w1")
        }
        let missing = await #expect(throws: WorkStoreError.self) {
            _ = try await store.renew(jobID: 999, leaseID: 1, worker: "w1", now: 1, leaseDuration: self.second)
        }
        #expect(missing?.message.hasPrefix("no job") == true, "\(missing?.message ?? "")")
    }
}

/// What a damaged database can hold: a job id that is negative as a signed integer reads
/// back as the id it stands for (ids go in and out as bit patterns), and a lease counter that
/// went backwards is refused with an error that names it, not a trap.
@Suite struct WorkStoreDamagedRowTests {
    let second: Int64 = 1_000_000_000

    @Test func aNegativeJobIDReadsBackAsItsBitPattern() async throws {
        let store = try SQLiteWorkStore(path: SQLiteWorkStoreTests.freshPath())
        defer { Task { await store.close() } }
        let id = try await store.submit(SQLiteWorkStoreTests.jobs(1), now: 0)[0]
        try await store.pool.write { db in try db.execute(sql: "UPDATE job SET id = -5 WHERE id = ?", arguments: [Int64(bitPattern: id)]) }
        let damaged = UInt64(bitPattern: -5)
        let claimed = try await store.claim(worker: "w", limit: 1, now: 0, leaseDuration: second)
        #expect(claimed.map(\.id) == [damaged])
        _ = try await store.renew(jobID: damaged, leaseID: claimed[0].lease.id, worker: "w", now: 1, leaseDuration: second)
        #expect(try await store.expireLeases(now: 10 * second) == 1)
        let again = try await store.claim(worker: "w", limit: 1, now: 10 * second, leaseDuration: second)
        #expect(again.map(\.id) == [damaged])
        let report = LeaseReport(leaseID: again[0].lease.id, worker: "w", outcome: .success)
        #expect(try await store.report(jobID: damaged, report, result: [7], now: 11 * second) == .accepted)
        #expect(try await store.job(damaged)?.result == [7])
        // Rowids below zero: a job submitted then is found by the id it was given.
        try await store.pool.write { db in try db.execute(sql: "UPDATE sqlite_sequence SET seq = -10 WHERE name = 'job'") }
        let next = try await store.submit(SQLiteWorkStoreTests.jobs(1), now: 12 * second)[0]
        #expect(try await store.spec(next) != nil, "job \(next)")
    }

    @Test func aLeaseCounterThatWentBackwardsIsRefused() async throws {
        let store = try SQLiteWorkStore(path: SQLiteWorkStoreTests.freshPath())
        defer { Task { await store.close() } }
        _ = try await store.submit(SQLiteWorkStoreTests.jobs(1), now: 0)
        try await store.pool.write { db in try db.execute(sql: "UPDATE counter SET value = -100 WHERE name = 'lease'") }
        let error = await #expect(throws: WorkStoreError.self) { _ = try await store.claim(worker: "w", limit: 1, now: 0, leaseDuration: second) }
        #expect(error?.message.contains("counter.value") == true, "\(String(describing: error))")
        #expect(try await store.counts()["queued"] == 1)
    }
}
