import Foundation
import Logging
import NIOCore
import PostgresNIO

/// The job store on PostgreSQL, through postgres-nio, shared by any number of masters.
///
/// Claims lock the queued rows they take with `FOR UPDATE SKIP LOCKED`, so that two masters
/// claiming at once take different jobs without waiting for each other; reports lock their
/// jobs' rows (`FOR UPDATE`, in id order, so that two batches never deadlock) and apply
/// `LeaseRules` to the record they read under the lock. Lease ids come from a sequence, so
/// they are unique across masters. The schema is created and upgraded by `migrations`, run
/// under an advisory lock when a master starts (several starting at once migrate once).
public final class PostgresWorkStore: WorkStore {
    let client: PostgresClient
    let runner: Task<Void, Never>
    let logger: Logger

    /// The schema's migrations, in order; a migration, once released, never changes.
    static let migrations: [(name: String, statements: [String])] = [
        ("v1: jobs and results", [
            """
            CREATE TABLE job (
                id BIGSERIAL PRIMARY KEY,
                batch TEXT NOT NULL DEFAULT '',
                priority INTEGER NOT NULL DEFAULT 0,
                spec BYTEA NOT NULL,
                signature BYTEA NOT NULL,
                state TEXT NOT NULL,
                record BYTEA NOT NULL,
                lease_deadline BIGINT,
                submitted_at BIGINT NOT NULL,
                finished_at BIGINT
            )
            """,
            "CREATE INDEX job_queue ON job (priority DESC, id) WHERE state = 'queued'",
            "CREATE INDEX job_lease ON job (lease_deadline) WHERE state = 'leased'",
            """
            CREATE TABLE result (
                job_id BIGINT PRIMARY KEY REFERENCES job (id) ON DELETE CASCADE,
                lease_id BIGINT NOT NULL,
                worker TEXT NOT NULL,
                result BYTEA NOT NULL,
                accepted_at BIGINT NOT NULL
            )
            """,
            "CREATE SEQUENCE lease_id",
        ]),
        ("v2: the application a job needs", [
            "ALTER TABLE job ADD COLUMN app TEXT NOT NULL DEFAULT ''",
            "DROP INDEX job_queue",
            "CREATE INDEX job_queue ON job (app, priority DESC, id) WHERE state = 'queued'",
        ]),
        // Leases of rows written before it have no holder: not counted until they end.
        ("v3: who holds a lease", [
            "ALTER TABLE job ADD COLUMN lease_worker TEXT",
            "CREATE INDEX job_holder ON job (lease_worker) WHERE state = 'leased'",
        ]),
    ]

    /// Connects to `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?sslmode=disable|prefer|require]`)
    /// and migrates the schema.
    /// - Parameter connectTimeout: how long to try reaching the server at first before giving
    ///   up with an error (the connection pool would otherwise retry for ever).
    public init(
        url: String, maximumConnections: Int = 8, connectTimeout: Duration = .seconds(10), logger: Logger = Logger(label: "parley.work.postgres")
    ) async throws {
        var configuration = try Self.configuration(url, maximumConnections: maximumConnections)
        configuration.options.connectTimeout = connectTimeout
        let client = PostgresClient(configuration: configuration, backgroundLogger: logger)
        self.client = client
        self.logger = logger
        self.runner = Task { await client.run() }
        do {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await self.migrate() }
                group.addTask {
                    try await Task.sleep(for: connectTimeout)
                    throw WorkStoreError("no answer within \(connectTimeout)")
                }
                defer { group.cancelAll() }
                try await group.next()
            }
        } catch {
            self.runner.cancel()
            throw WorkStoreError("PostgreSQL at \(Self.redacted(url)): \(Self.describe(error))")
        }
    }

    public func close() async {
        self.runner.cancel()
        _ = await self.runner.value
    }

    static func configuration(_ url: String, maximumConnections: Int) throws -> PostgresClient.Configuration {
        guard let parts = URLComponents(string: url), parts.scheme == "postgres" || parts.scheme == "postgresql" else {
            throw WorkStoreError("'\(url)' is not a postgres:// URL (postgres://USER@HOST[:PORT]/DATABASE)")
        }
        guard let host = parts.host, !host.isEmpty else { throw WorkStoreError("the PostgreSQL URL '\(Self.redacted(url))' names no host") }
        guard let user = parts.user, !user.isEmpty else { throw WorkStoreError("the PostgreSQL URL '\(Self.redacted(url))' names no user") }
        let database = String(parts.path.dropFirst())
        let tls: PostgresClient.Configuration.TLS
        switch parts.queryItems?.first(where: { $0.name == "sslmode" })?.value ?? "disable" {
        case "disable": tls = .disable
        case "prefer": tls = .prefer(.makeClientConfiguration())
        case "require": tls = .require(.makeClientConfiguration())
        case let other: throw WorkStoreError("sslmode '\(other)' is not one of disable, prefer, require")
        }
        var configuration = PostgresClient.Configuration(
            host: host, port: parts.port ?? 5432, username: user, password: parts.password,
            database: database.isEmpty ? user : database, tls: tls
        )
        configuration.options.maximumConnections = max(1, maximumConnections)
        configuration.options.connectTimeout = .seconds(5)
        return configuration
    }

    /// The URL without its password, for messages.
    static func redacted(_ url: String) -> String {
        guard var parts = URLComponents(string: url), parts.password != nil else { return url }
        parts.password = "***"
        return parts.string ?? url
    }

    /// A PostgreSQL error's own words (postgres-nio's description hides them).
    static func describe(_ error: any Error) -> String {
        if let error = error as? PSQLError {
            if let message = error.serverInfo?[.message] { return message }
            return "\(error.code)" + (error.underlying.map { ": \($0)" } ?? "")
        }
        return "\(error)"
    }

    func transaction<T: Sendable>(_ body: (PostgresConnection) async throws -> T) async throws -> T {
        do {
            return try await self.client.withTransaction(logger: self.logger) { connection in
                try await body(connection)
            }
        } catch let error as WorkStoreError {
            throw error
        } catch let error as LeaseError {
            throw error
        } catch let error as PostgresTransactionError {
            // postgres-nio wraps whatever the body threw: the store's own refusals (a lease
            // rule, "no job ...") go on as they are, so that callers tell them from failures.
            if let refusal = error.closureError as? LeaseError { throw refusal }
            if let refusal = error.closureError as? WorkStoreError { throw refusal }
            throw WorkStoreError("PostgreSQL: \(Self.describe(error.closureError ?? error.beginError ?? error.commitError ?? error.rollbackError ?? error))")
        } catch {
            throw WorkStoreError("PostgreSQL: \(Self.describe(error))")
        }
    }

    func migrate() async throws {
        try await self.transaction { connection in
            // One master migrates at a time; the others wait, then find nothing left to do
            // (even CREATE TABLE IF NOT EXISTS races with itself without the lock).
            try await connection.query("SELECT pg_advisory_xact_lock(7422)", logger: self.logger)
            try await connection.query(
                "CREATE TABLE IF NOT EXISTS schema_migration (name TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())", logger: self.logger
            )
            var applied = Set<String>()
            for try await name in try await connection.query("SELECT name FROM schema_migration", logger: self.logger).decode(String.self) {
                applied.insert(name)
            }
            for migration in Self.migrations where !applied.contains(migration.name) {
                for statement in migration.statements {
                    try await connection.query(PostgresQuery(unsafeSQL: statement), logger: self.logger)
                }
                try await connection.query("INSERT INTO schema_migration (name) VALUES (\(migration.name))", logger: self.logger)
            }
        }
    }

    public func appliedMigrations() async throws -> [String] {
        try await self.transaction { connection in
            var names: [String] = []
            for try await name in try await connection.query("SELECT name FROM schema_migration ORDER BY applied_at, name", logger: self.logger).decode(String.self) {
                names.append(name)
            }
            // In the order they were defined (several can share a timestamp).
            return Self.migrations.map(\.name).filter(names.contains)
        }
    }

    public func submit(_ jobs: [NewJob], now: Int64) async throws -> [UInt64] {
        guard !jobs.isEmpty else { return [] }
        for job in jobs where job.signature.isEmpty {
            throw WorkStoreError("a job without a signature is not stored")
        }
        let records = try jobs.map { ByteBuffer(bytes: try JobRow.encode(JobRecord(id: 0, maxAttempts: $0.maxAttempts))) }
        let batches = jobs.map(\.batch)
        let priorities = jobs.map { Int64($0.priority) }
        let specs = jobs.map { ByteBuffer(bytes: $0.spec) }
        let signatures = jobs.map { ByteBuffer(bytes: $0.signature) }
        let apps = jobs.map(\.app)
        return try await self.transaction { connection in
            var ids: [UInt64] = []
            let rows = try await connection.query(
                """
                INSERT INTO job (batch, priority, spec, signature, state, record, submitted_at, app)
                SELECT b, p, s, g, 'queued', r, \(now), a
                FROM unnest(\(batches)::text[], \(priorities)::bigint[], \(specs)::bytea[], \(signatures)::bytea[], \(records)::bytea[], \(apps)::text[])
                    WITH ORDINALITY AS u(b, p, s, g, r, a, n)
                ORDER BY n
                RETURNING id
                """, logger: self.logger
            )
            for try await id in rows.decode(Int64.self) { ids.append(UInt64(bitPattern: id)) }
            // RETURNING follows the insertion order, which follows ORDER BY n; the ids of a
            // BIGSERIAL grow with it. Sorted, so that the order is the submission order.
            return ids.sorted()
        }
    }

    public func claim(_ requests: [ClaimRequest], now: Int64, leaseDuration: Int64) async throws -> [[ClaimedJob]] {
        let total = requests.reduce(0) { $0 + max(0, $1.limit) }
        guard total > 0 else { return requests.map { _ in [] } }
        return try await self.transaction { connection in
            struct Queued { var id: Int64; var spec: ByteBuffer; var signature: ByteBuffer; var record: ByteBuffer }
            var answers = requests.map { _ in [ClaimedJob]() }
            // What capped workers hold. Claims for one capped worker are serialised by a
            // transaction-level advisory lock per worker, keyed by the hash of its name and
            // taken in the order of the keys (two names may share one: ordered by name, two
            // transactions could then wait on each other): without it, concurrent
            // transactions (several connections of one master, or several masters) each
            // counted without the others' claims and together handed out the cap many times.
            var held: [String: Int] = [:]
            let capped = JobRow.cappedWorkers(requests)
            if !capped.isEmpty {
                var keys: [Int32] = []
                for try await key in try await connection.query(
                    "SELECT DISTINCT hashtext(w) FROM unnest(\(capped)::text[]) AS w ORDER BY 1", logger: self.logger
                ).decode(Int32.self) {
                    keys.append(key)
                }
                for key in keys {
                    try await connection.query("SELECT pg_advisory_xact_lock(7423, \(key))", logger: self.logger)
                }
            }
            if !capped.isEmpty {
                for try await (worker, count) in try await connection.query(
                    "SELECT lease_worker, COUNT(*) FROM job WHERE state = 'leased' AND lease_worker = ANY(\(capped)::text[]) GROUP BY lease_worker",
                    logger: self.logger
                ).decode((String, Int64).self) {
                    held[worker] = Int(count)
                }
            }
            let requests = JobRow.capped(requests, held: held)
            // Requests with the same applications share one query (most often all of them).
            for (indices, names, limit) in JobRow.claimGroups(requests) {
                let group = indices.map { requests[$0] }
                var rows: [Queued] = []
                let found = try await connection.query(
                    """
                    SELECT id, spec, signature, record FROM job WHERE state = 'queued' AND app = ANY(\(names)::text[])
                    ORDER BY priority DESC, id LIMIT \(Int64(limit)) FOR UPDATE SKIP LOCKED
                    """, logger: self.logger
                )
                for try await (id, spec, signature, record) in found.decode((Int64, ByteBuffer, ByteBuffer, ByteBuffer).self) {
                    rows.append(Queued(id: id, spec: spec, signature: signature, record: record))
                }
                guard !rows.isEmpty else { continue }
                var leaseIDs: [UInt64] = []
                for try await id in try await connection.query(
                    "SELECT nextval('lease_id') FROM generate_series(1, \(Int64(rows.count)))", logger: self.logger
                ).decode(Int64.self) {
                    // The sequence starts at 1: anything else is a damaged database.
                    guard id > 0 else { throw WorkStoreError("the database is damaged: the sequence lease_id gave \(id), not a lease id") }
                    leaseIDs.append(UInt64(id))
                }
                let claims = try JobRow.assign(
                    rows, record: { try JobRow.decode(Data($0.record.readableBytesView), id: UInt64(bitPattern: $0.id)) }, requests: group,
                    leaseIDs: leaseIDs, now: now, leaseDuration: leaseDuration
                )
                try await self.save(connection, claims.flatMap { $0.map(\.record) }, now: now)
                for (index, mine) in zip(indices, claims) {
                    answers[index] = mine.map { ClaimedJob(id: $0.record.id, lease: $0.lease, spec: Array(buffer: $0.row.spec), signature: Array(buffer: $0.row.signature)) }
                }
            }
            return answers
        }
    }

    public func report(_ reports: [ReportInput], now: Int64) async throws -> [ReportVerdict] {
        guard !reports.isEmpty else { return [] }
        return try await self.transaction { connection in
            var records: [UInt64: JobRecord] = [:]
            let ids = Array(Set(reports.map { Int64(bitPattern: $0.jobID) })).sorted()
            let found = try await connection.query(
                "SELECT id, record FROM job WHERE id = ANY(\(ids)::bigint[]) ORDER BY id FOR UPDATE", logger: self.logger
            )
            for try await (id, record) in found.decode((Int64, ByteBuffer).self) {
                records[UInt64(bitPattern: id)] = try JobRow.decode(Data(record.readableBytesView), id: UInt64(bitPattern: id))
            }
            var verdicts: [ReportVerdict] = []
            var changed = Set<UInt64>()
            var results: (ids: [Int64], leases: [Int64], workers: [String], bodies: [ByteBuffer]) = ([], [], [], [])
            for input in reports {
                guard var record = records[input.jobID] else {
                    verdicts.append(.rejected("no job \(input.jobID)"))
                    continue
                }
                let verdict = LeaseRules.report(&record, input.report)
                switch verdict {
                case .accepted:
                    results.ids.append(Int64(bitPattern: input.jobID))
                    results.leases.append(Int64(bitPattern: input.report.leaseID))
                    results.workers.append(input.report.worker)
                    results.bodies.append(ByteBuffer(bytes: input.result))
                    changed.insert(input.jobID)
                case .retrying, .failed, .superseded:
                    changed.insert(input.jobID)
                case .alreadyAccepted, .rejected:
                    break
                }
                records[input.jobID] = record
                verdicts.append(verdict)
            }
            if !results.ids.isEmpty {
                try await connection.query(
                    """
                    INSERT INTO result (job_id, lease_id, worker, result, accepted_at)
                    SELECT j, l, w, r, \(now) FROM unnest(\(results.ids)::bigint[], \(results.leases)::bigint[], \(results.workers)::text[], \(results.bodies)::bytea[]) AS u(j, l, w, r)
                    """, logger: self.logger
                )
            }
            try await self.save(connection, changed.sorted().compactMap { records[$0] }, now: now)
            return verdicts
        }
    }

    public func expireLeases(now: Int64) async throws -> Int {
        try await self.transaction { connection in
            var expired: [JobRecord] = []
            let found = try await connection.query(
                "SELECT id, record FROM job WHERE state = 'leased' AND lease_deadline <= \(now) ORDER BY id FOR UPDATE SKIP LOCKED",
                logger: self.logger
            )
            for try await (id, data) in found.decode((Int64, ByteBuffer).self) {
                var record = try JobRow.decode(Data(data.readableBytesView), id: UInt64(bitPattern: id))
                if LeaseRules.expire(&record, now: now) { expired.append(record) }
            }
            try await self.save(connection, expired, now: now)
            return expired.count
        }
    }

    public func handBack(jobID: UInt64, leaseID: UInt64, worker: String) async throws {
        try await self.transaction { connection in
            var record = try await self.lockedRecord(connection, jobID)
            try LeaseRules.handBack(&record, leaseID: leaseID, worker: worker)
            try await self.save(connection, [record], now: 0)
        }
    }

    public func renew(jobID: UInt64, leaseID: UInt64, worker: String, now: Int64, leaseDuration: Int64, longest: Int64?) async throws -> Lease {
        try await self.transaction { connection in
            var record = try await self.lockedRecord(connection, jobID)
            let lease = try LeaseRules.renew(&record, leaseID: leaseID, worker: worker, now: now, duration: leaseDuration, longest: longest)
            try await self.save(connection, [record], now: now)
            return lease
        }
    }

    public func counts() async throws -> [String: Int] {
        var counts: [String: Int] = ["queued": 0, "leased": 0, "succeeded": 0, "failed": 0]
        try await self.transaction { connection in
            var found: [(String, Int64)] = []
            for try await row in try await connection.query("SELECT state, COUNT(*) FROM job GROUP BY state", logger: self.logger).decode((String, Int64).self) {
                found.append(row)
            }
            return found
        }.forEach { counts[$0.0] = Int($0.1) }
        return counts
    }

    public func job(_ id: UInt64) async throws -> (record: JobRecord, result: [UInt8]?)? {
        try await self.transaction { connection -> (record: JobRecord, result: [UInt8]?)? in
            var record: JobRecord?
            var result: [UInt8]?
            for try await (data, body) in try await connection.query(
                "SELECT j.record, r.result FROM job j LEFT JOIN result r ON r.job_id = j.id WHERE j.id = \(Int64(bitPattern: id))",
                logger: self.logger
            ).decode((ByteBuffer, ByteBuffer?).self) {
                record = try JobRow.decode(Data(data.readableBytesView), id: id)
                result = body.map { Array(buffer: $0) }
            }
            return record.map { ($0, result) }
        }
    }

    public func spec(_ id: UInt64) async throws -> [UInt8]? {
        try await self.transaction { connection -> [UInt8]? in
            var spec: [UInt8]?
            for try await bytes in try await connection.query("SELECT spec FROM job WHERE id = \(Int64(bitPattern: id))", logger: self.logger).decode(ByteBuffer.self) {
                spec = Array(buffer: bytes)
            }
            return spec
        }
    }

    /// A job's record, its row locked until the transaction ends; "no job" when there is none.
    private func lockedRecord(_ connection: PostgresConnection, _ jobID: UInt64) async throws -> JobRecord {
        for try await data in try await connection.query(
            "SELECT record FROM job WHERE id = \(Int64(bitPattern: jobID)) FOR UPDATE", logger: self.logger
        ).decode(ByteBuffer.self) {
            return try JobRow.decode(Data(data.readableBytesView), id: jobID)
        }
        throw WorkStoreError("no job \(jobID)")
    }

    /// Writes records back, in one statement.
    private func save(_ connection: PostgresConnection, _ records: [JobRecord], now: Int64) async throws {
        guard !records.isEmpty else { return }
        var ids: [Int64] = [], states: [String] = [], bodies: [ByteBuffer] = [], deadlines: [Int64] = [], workers: [String] = [], finished: [Bool] = []
        for record in records {
            let row = JobRow.state(of: record)
            ids.append(Int64(bitPattern: record.id))
            states.append(row.state)
            bodies.append(ByteBuffer(bytes: try JobRow.encode(record)))
            // Int64.min stands for "no deadline" (NULL): arrays of optionals are not encodable.
            deadlines.append(row.deadline ?? Int64.min)
            workers.append(row.worker ?? "")  // "" stands for NULL (no holder): a worker's name is never empty
            finished.append(row.finished)
        }
        try await connection.query(
            """
            UPDATE job SET state = u.s, record = u.r, lease_deadline = NULLIF(u.d, \(Int64.min)), lease_worker = NULLIF(u.w, ''),
                finished_at = CASE WHEN u.f THEN COALESCE(job.finished_at, \(now)) ELSE job.finished_at END
            FROM unnest(\(ids)::bigint[], \(states)::text[], \(bodies)::bytea[], \(deadlines)::bigint[], \(workers)::text[], \(finished)::boolean[]) AS u(i, s, r, d, w, f)
            WHERE job.id = u.i
            """, logger: self.logger
        )
    }
}
