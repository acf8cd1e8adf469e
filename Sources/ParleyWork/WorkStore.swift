import Foundation
import GRDB
import SwiftProtobuf

/// A job as submitted: what to run (the signed bytes of its specification, opaque to the
/// store), its priority and how many attempts it gets.
public struct NewJob: Sendable, Hashable {
    public var spec: [UInt8]
    public var signature: [UInt8]
    public var priority: Int
    public var maxAttempts: Int
    public var batch: String
    /// The application the job needs (from its spec): only workers that run it get it.
    public var app: String

    public init(spec: [UInt8], signature: [UInt8], priority: Int = 0, maxAttempts: Int = 3, batch: String = "", app: String = "") {
        self.app = app
        self.spec = spec
        self.signature = signature
        self.priority = priority
        self.maxAttempts = maxAttempts
        self.batch = batch
    }
}

/// A job handed to a worker under a lease.
public struct ClaimedJob: Sendable, Hashable {
    public var id: UInt64
    public var lease: Lease
    public var spec: [UInt8]
    public var signature: [UInt8]
}

/// One worker's request for work, in a batch of claims.
public struct ClaimRequest: Sendable, Hashable {
    public var worker: String
    public var limit: Int
    /// The applications the worker runs: it gets jobs that need none or one of them.
    public var apps: [String]
    /// The most leases the worker may hold at once, those it holds counted (nil: no cap): a
    /// worker asking again and again cannot take the whole queue. Leases held from before the
    /// store recorded holders (its v4 / v3 migration) are not counted until they end.
    public var maxHeld: Int?
    public init(worker: String, limit: Int, apps: [String] = [], maxHeld: Int? = nil) {
        self.worker = worker
        self.limit = limit
        self.apps = apps
        self.maxHeld = maxHeld
    }
}

/// One worker's report on a lease, in a batch of reports, with its result (stored once, when
/// accepted).
public struct ReportInput: Sendable, Hashable {
    public var jobID: UInt64
    public var report: LeaseReport
    public var result: [UInt8]
    public init(jobID: UInt64, report: LeaseReport, result: [UInt8]) {
        self.jobID = jobID
        self.report = report
        self.result = result
    }
}

/// Where jobs live: a small protocol, so that the scheduler does not care whether it is
/// SQLite (`SQLiteWorkStore`, one master) or PostgreSQL (`PostgresWorkStore`, shared by
/// several masters). Every method is one transaction that applies `LeaseRules`; claims and
/// reports come in batches so that a master commits many in one transaction (`GroupCommit`).
public protocol WorkStore: Sendable {
    /// Stores jobs; returns their ids, in order.
    func submit(_ jobs: [NewJob], now: Int64) async throws -> [UInt64]
    /// Hands up to `limit` queued jobs (highest priority first, then oldest) to each request's
    /// worker; the answer has one list per request, in order. No job goes to two workers.
    func claim(_ requests: [ClaimRequest], now: Int64, leaseDuration: Int64) async throws -> [[ClaimedJob]]
    /// Workers' reports on leases; one verdict per report, in order.
    func report(_ reports: [ReportInput], now: Int64) async throws -> [ReportVerdict]
    /// Puts back the jobs whose leases expired; returns how many.
    func expireLeases(now: Int64) async throws -> Int
    /// A worker gives a job back unfinished.
    func handBack(jobID: UInt64, leaseID: UInt64, worker: String) async throws
    /// A worker's job still runs: its lease is extended (`LeaseRules.renew`), to at most
    /// `longest` from when it was handed out (nil: no end).
    func renew(jobID: UInt64, leaseID: UInt64, worker: String, now: Int64, leaseDuration: Int64, longest: Int64?) async throws -> Lease
    /// Jobs by state ("queued", "leased", "succeeded", "failed").
    func counts() async throws -> [String: Int]
    /// A job's record and, if accepted, its result.
    func job(_ id: UInt64) async throws -> (record: JobRecord, result: [UInt8]?)?
    /// A job's signed spec (the bytes the submitter signed).
    func spec(_ id: UInt64) async throws -> [UInt8]?
    /// The names of the schema migrations applied, oldest first.
    func appliedMigrations() async throws -> [String]
    /// Releases the store's connections.
    func close() async
}

extension WorkStore {
    /// Hands up to `limit` queued jobs to `worker`.
    public func claim(worker: String, limit: Int, apps: [String] = [], now: Int64, leaseDuration: Int64) async throws -> [ClaimedJob] {
        try await self.claim([ClaimRequest(worker: worker, limit: limit, apps: apps)], now: now, leaseDuration: leaseDuration)[0]
    }

    /// A lease renewed with no end to its renewals.
    public func renew(jobID: UInt64, leaseID: UInt64, worker: String, now: Int64, leaseDuration: Int64) async throws -> Lease {
        try await self.renew(jobID: jobID, leaseID: leaseID, worker: worker, now: now, leaseDuration: leaseDuration, longest: nil)
    }

    /// One worker's report on a lease.
    public func report(jobID: UInt64, _ report: LeaseReport, result: [UInt8], now: Int64) async throws -> ReportVerdict {
        try await self.report([ReportInput(jobID: jobID, report: report, result: result)], now: now)[0]
    }

    public func close() async {}
}

/// How a `JobRecord` is kept in a row, the same in every store: its state as text, its lease
/// deadline (nil unless leased), whether it finished, and the record itself (protobuf).
enum JobRow {
    static func state(of record: JobRecord) -> (state: String, deadline: Int64?, worker: String?, finished: Bool) {
        switch record.state {
        case .queued: return ("queued", nil, nil, false)
        case .leased(let lease): return ("leased", lease.deadline, lease.worker, false)
        case .succeeded: return ("succeeded", nil, nil, true)
        case .failed: return ("failed", nil, nil, true)
        }
    }

    /// The requests with each limit cut so that no worker ends up holding more than its
    /// `maxHeld` leases: `held` is what each holds now; requests of one worker in the same
    /// batch count against it in order, each as if granted in full.
    static func capped(_ requests: [ClaimRequest], held: [String: Int]) -> [ClaimRequest] {
        var taken = held
        return requests.map { request in
            guard let cap = request.maxHeld else { return request }
            var r = request
            let holds = taken[request.worker, default: 0]
            r.limit = max(0, min(request.limit, cap - holds))
            taken[request.worker] = holds + r.limit
            return r
        }
    }

    /// The workers whose requests have a cap, for the count of what they hold.
    static func cappedWorkers(_ requests: [ClaimRequest]) -> [String] {
        Array(Set(requests.filter { $0.maxHeld != nil }.map(\.worker))).sorted()
    }

    /// The record in the store's format (`Protos/parley/work/v1/store.proto`): protobuf, a
    /// few microseconds where JSON took tens (found with perf: JSON was a quarter of a busy
    /// master's time).
    static func encode(_ record: JobRecord) throws -> Data {
        var stored = Parley_Work_Store_V1_StoredJob()
        switch record.state {
        case .queued: stored.queued = true
        case .leased(let lease): stored.leased = Self.stored(lease)
        case .succeeded(let leaseID): stored.succeededLease = leaseID
        case .failed(let reasons):
            var failed = Parley_Work_Store_V1_StoredJob.Failed()
            failed.reasons = reasons
            stored.failed = failed
        }
        stored.leases = record.leases.map(Self.stored)
        stored.maxAttempts = UInt32(clamping: record.maxAttempts)
        stored.failures = record.failures
        stored.failedLeases = record.failedLeases
        return try stored.serializedData()
    }

    /// Reads a record in the store's format, or in the JSON that stores wrote before it.
    static func decode(_ data: Data, id: UInt64) throws -> JobRecord {
        if data.first == UInt8(ascii: "{") {
            var record = try JSONDecoder().decode(JobRecord.self, from: data)
            record.id = id
            return record
        }
        let stored = try Parley_Work_Store_V1_StoredJob(serializedBytes: data)
        var record = JobRecord(id: id, maxAttempts: Int(stored.maxAttempts))
        switch stored.state {
        case .queued, nil: record.state = .queued
        case .leased(let lease): record.state = .leased(Self.lease(lease))
        case .succeededLease(let leaseID): record.state = .succeeded(leaseID: leaseID)
        case .failed(let failed): record.state = .failed(reasons: failed.reasons)
        }
        record.leases = stored.leases.map(Self.lease)
        record.failures = stored.failures
        record.failedLeases = stored.failedLeases
        return record
    }

    private static func stored(_ lease: Lease) -> Parley_Work_Store_V1_StoredLease {
        var stored = Parley_Work_Store_V1_StoredLease()
        stored.id = lease.id
        stored.worker = lease.worker
        stored.deadline = lease.deadline
        if let granted = lease.granted { stored.granted = granted }
        return stored
    }

    private static func lease(_ stored: Parley_Work_Store_V1_StoredLease) -> Lease {
        Lease(id: stored.id, worker: stored.worker, deadline: stored.deadline, granted: stored.hasGranted ? stored.granted : nil)
    }

    /// Claim requests grouped by the applications their workers run (most often one group):
    /// each group's request indices, the application names its query takes (`""`, a job
    /// needing none, first) and how many jobs it asks for in all. Groups asking for none are
    /// left out.
    static func claimGroups(_ requests: [ClaimRequest]) -> [(indices: [Int], apps: [String], limit: Int)] {
        Dictionary(grouping: requests.indices, by: { Set(requests[$0].apps) }).compactMap { apps, indices in
            let limit = indices.reduce(0) { $0 + max(0, requests[$1].limit) }
            return limit > 0 ? (indices, [""] + apps.sorted(), limit) : nil
        }
    }

    /// Applies `LeaseRules.assign` to the queued jobs `rows` found for `requests`, in order,
    /// handing each request up to its limit; `leaseIDs` are fresh ids, one per row at least.
    static func assign<Row>(
        _ rows: [Row], record: (Row) throws -> JobRecord, requests: [ClaimRequest], leaseIDs: [UInt64], now: Int64, leaseDuration: Int64
    ) throws -> [[(row: Row, record: JobRecord, lease: Lease)]] {
        var claims: [[(row: Row, record: JobRecord, lease: Lease)]] = []
        var next = 0
        for request in requests {
            var mine: [(row: Row, record: JobRecord, lease: Lease)] = []
            while mine.count < request.limit, next < rows.count {
                var job = try record(rows[next])
                let lease = try LeaseRules.assign(&job, to: request.worker, leaseID: leaseIDs[next], now: now, duration: leaseDuration)
                mine.append((rows[next], job, lease))
                next += 1
            }
            claims.append(mine)
        }
        return claims
    }
}

public struct WorkStoreError: Error, Sendable, Hashable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { self.message }
}

/// The job store on SQLite (WAL), through GRDB. The schema is created and upgraded by
/// migrations (`migrator`), run when the store opens.
public final class SQLiteWorkStore: WorkStore {
    let pool: DatabasePool

    /// Opens (creating if needed) the database at `path` and migrates it.
    public init(path: String) throws {
        var configuration = Configuration()
        configuration.busyMode = .timeout(5)
        self.pool = try DatabasePool(path: path, configuration: configuration)
        try Self.migrator.migrate(self.pool)
    }

    /// The schema's migrations, in order; a migration, once released, never changes.
    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1: jobs and results") { db in
            try db.create(table: "job") { t in
                t.autoIncrementedPrimaryKey("id")
                t.column("batch", .text).notNull().defaults(to: "")
                t.column("priority", .integer).notNull().defaults(to: 0)
                t.column("spec", .blob).notNull()
                t.column("signature", .blob).notNull()
                t.column("state", .text).notNull()
                // The lease rules' record (leases handed out, failures), as JSON.
                t.column("record", .blob).notNull()
                t.column("leaseDeadline", .integer)
                t.column("submittedAt", .integer).notNull()
                t.column("finishedAt", .integer)
            }
            try db.create(index: "job_queue", on: "job", columns: ["state", "priority", "id"])
            try db.create(index: "job_lease", on: "job", columns: ["state", "leaseDeadline"])
            try db.create(table: "result") { t in
                t.primaryKey("jobId", .integer).references("job", onDelete: .cascade)
                t.column("leaseId", .integer).notNull()
                t.column("worker", .text).notNull()
                t.column("result", .blob).notNull()
                t.column("acceptedAt", .integer).notNull()
            }
            // Lease ids are unique in the whole store.
            try db.create(table: "counter") { t in
                t.primaryKey("name", .text)
                t.column("value", .integer).notNull()
            }
            try db.execute(sql: "INSERT INTO counter (name, value) VALUES ('lease', 0)")
        }
        // The claim's ORDER BY priority DESC, id could not walk v1's index in order: every
        // claim sorted the whole queue (found with perf: most of a busy master's time).
        migrator.registerMigration("v2: queue index in claim order") { db in
            try db.execute(sql: "DROP INDEX job_queue")
            try db.execute(sql: "CREATE INDEX job_queue ON job (state, priority DESC, id)")
        }
        migrator.registerMigration("v3: the application a job needs") { db in
            try db.execute(sql: "ALTER TABLE job ADD COLUMN app TEXT NOT NULL DEFAULT ''")
        }
        // Leases of rows written before it have no holder: not counted until they end.
        migrator.registerMigration("v4: who holds a lease") { db in
            try db.execute(sql: "ALTER TABLE job ADD COLUMN leaseWorker TEXT")
            try db.execute(sql: "CREATE INDEX job_holder ON job (leaseWorker) WHERE state = 'leased'")
        }
        return migrator
    }

    public func appliedMigrations() async throws -> [String] {
        try await self.pool.read { db in try Self.migrator.appliedMigrations(db) }
    }

    public func submit(_ jobs: [NewJob], now: Int64) async throws -> [UInt64] {
        try await self.pool.write { db in
            try jobs.map { job in
                guard !job.signature.isEmpty else { throw WorkStoreError("a job without a signature is not stored") }
                try db.execute(
                    sql: "INSERT INTO job (batch, priority, spec, signature, state, record, submittedAt, app) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
                    arguments: [job.batch, job.priority, Data(job.spec), Data(job.signature), try JobRow.encode(JobRecord(id: 0, maxAttempts: job.maxAttempts)), now, job.app]
                )
                return UInt64(bitPattern: db.lastInsertedRowID)
            }
        }
    }

    public func claim(_ requests: [ClaimRequest], now: Int64, leaseDuration: Int64) async throws -> [[ClaimedJob]] {
        let total = requests.reduce(0) { $0 + max(0, $1.limit) }
        guard total > 0 else { return requests.map { _ in [] } }
        return try await self.pool.write { db in
            var answers = requests.map { _ in [ClaimedJob]() }
            var held: [String: Int] = [:]
            let capped = JobRow.cappedWorkers(requests)
            if !capped.isEmpty {
                for row in try Row.fetchAll(
                    db, sql: "SELECT leaseWorker, COUNT(*) AS n FROM job WHERE state = 'leased' AND leaseWorker IN (\(capped.map { _ in "?" }.joined(separator: ", "))) GROUP BY leaseWorker",
                    arguments: StatementArguments(capped)
                ) {
                    held[row["leaseWorker"]] = row["n"]
                }
            }
            let requests = JobRow.capped(requests, held: held)
            // Requests with the same applications share one query (most often all of them).
            for (indices, names, limit) in JobRow.claimGroups(requests) {
                let group = indices.map { requests[$0] }
                let rows = try Row.fetchAll(
                    db, sql: "SELECT id, spec, signature, record FROM job WHERE state = 'queued' AND app IN (\(names.map { _ in "?" }.joined(separator: ", "))) ORDER BY priority DESC, id LIMIT ?",
                    arguments: StatementArguments(names) + [limit]
                )
                let first = try Self.takeLeaseIDs(db, count: rows.count)
                let claims = try JobRow.assign(
                    rows, record: { try JobRow.decode($0["record"], id: UInt64(bitPattern: $0["id"] as Int64)) }, requests: group,
                    leaseIDs: (0..<UInt64(rows.count)).map { first + $0 }, now: now, leaseDuration: leaseDuration
                )
                for (index, mine) in zip(indices, claims) {
                    answers[index] = try mine.map { claim in
                        try Self.save(db, claim.record, now: now)
                        return ClaimedJob(id: claim.record.id, lease: claim.lease, spec: Array(claim.row["spec"] as Data), signature: Array(claim.row["signature"] as Data))
                    }
                }
            }
            return answers
        }
    }

    public func report(_ reports: [ReportInput], now: Int64) async throws -> [ReportVerdict] {
        try await self.pool.write { db in
            try reports.map { input in
                guard let data = try Data.fetchOne(db, sql: "SELECT record FROM job WHERE id = ?", arguments: [Int64(bitPattern: input.jobID)]) else {
                    return .rejected("no job \(input.jobID)")
                }
                var record = try JobRow.decode(data, id: input.jobID)
                let verdict = LeaseRules.report(&record, input.report)
                switch verdict {
                case .accepted:
                    try db.execute(
                        sql: "INSERT INTO result (jobId, leaseId, worker, result, acceptedAt) VALUES (?, ?, ?, ?, ?)",
                        arguments: [Int64(bitPattern: input.jobID), Int64(bitPattern: input.report.leaseID), input.report.worker, Data(input.result), now]
                    )
                    try Self.save(db, record, now: now)
                case .retrying, .failed, .superseded:
                    try Self.save(db, record, now: now)
                case .alreadyAccepted, .rejected:
                    break
                }
                return verdict
            }
        }
    }

    public func expireLeases(now: Int64) async throws -> Int {
        try await self.pool.write { db in
            let rows = try Row.fetchAll(db, sql: "SELECT id, record FROM job WHERE state = 'leased' AND leaseDeadline <= ?", arguments: [now])
            var expired = 0
            for row in rows {
                let id = UInt64(bitPattern: row["id"] as Int64)
                var record = try JobRow.decode(row["record"], id: id)
                if LeaseRules.expire(&record, now: now) {
                    try Self.save(db, record, now: now)
                    expired += 1
                }
            }
            return expired
        }
    }

    public func handBack(jobID: UInt64, leaseID: UInt64, worker: String) async throws {
        try await self.pool.write { db in
            var record = try Self.record(db, jobID)
            try LeaseRules.handBack(&record, leaseID: leaseID, worker: worker)
            try Self.save(db, record, now: 0)
        }
    }

    public func renew(jobID: UInt64, leaseID: UInt64, worker: String, now: Int64, leaseDuration: Int64, longest: Int64?) async throws -> Lease {
        try await self.pool.write { db in
            var record = try Self.record(db, jobID)
            let lease = try LeaseRules.renew(&record, leaseID: leaseID, worker: worker, now: now, duration: leaseDuration, longest: longest)
            try Self.save(db, record, now: now)
            return lease
        }
    }

    public func counts() async throws -> [String: Int] {
        try await self.pool.read { db in
            var counts: [String: Int] = ["queued": 0, "leased": 0, "succeeded": 0, "failed": 0]
            for row in try Row.fetchAll(db, sql: "SELECT state, COUNT(*) AS n FROM job GROUP BY state") {
                counts[row["state"]] = row["n"]
            }
            return counts
        }
    }

    public func job(_ id: UInt64) async throws -> (record: JobRecord, result: [UInt8]?)? {
        try await self.pool.read { db in
            guard let data = try Data.fetchOne(db, sql: "SELECT record FROM job WHERE id = ?", arguments: [Int64(bitPattern: id)]) else { return nil }
            let result = try Data.fetchOne(db, sql: "SELECT result FROM result WHERE jobId = ?", arguments: [Int64(bitPattern: id)])
            return (try JobRow.decode(data, id: id), result.map { Array($0) })
        }
    }

    public func spec(_ id: UInt64) async throws -> [UInt8]? {
        try await self.pool.read { db in
            try Data.fetchOne(db, sql: "SELECT spec FROM job WHERE id = ?", arguments: [Int64(bitPattern: id)]).map { Array($0) }
        }
    }

    // MARK: - Rows

    /// A job's record, inside a write transaction; "no job" when there is none.
    private static func record(_ db: Database, _ jobID: UInt64) throws -> JobRecord {
        guard let data = try Data.fetchOne(db, sql: "SELECT record FROM job WHERE id = ?", arguments: [Int64(bitPattern: jobID)]) else {
            throw WorkStoreError("no job \(jobID)")
        }
        return try JobRow.decode(data, id: jobID)
    }

    /// Reserves `count` lease ids; returns the first (they follow one another). The counter
    /// only grows from 0: a value below `count` is a damaged database, refused.
    private static func takeLeaseIDs(_ db: Database, count: Int) throws -> UInt64 {
        try db.execute(sql: "UPDATE counter SET value = value + ? WHERE name = 'lease'", arguments: [count])
        let last = try Int64.fetchOne(db, sql: "SELECT value FROM counter WHERE name = 'lease'") ?? 0
        guard last >= Int64(count) else {
            throw WorkStoreError("the database is damaged: counter.value of 'lease' is \(last) after reserving \(count) lease ids")
        }
        return UInt64(last - Int64(count)) + 1
    }

    private static func save(_ db: Database, _ record: JobRecord, now: Int64) throws {
        let row = JobRow.state(of: record)
        try db.execute(
            sql: "UPDATE job SET state = ?, record = ?, leaseDeadline = ?, leaseWorker = ?, finishedAt = COALESCE(finishedAt, ?) WHERE id = ?",
            arguments: [row.state, try JobRow.encode(record), row.deadline, row.worker, row.finished ? now : nil, Int64(bitPattern: record.id)]
        )
    }
}
