import Foundation
import Logging
import Metrics
import NIOConcurrencyHelpers
import Parley
import ParleyWire
import SwiftProtobuf

/// The master's side of the Work protocol: handlers for a `ParleyRouter`, on a `WorkStore`.
/// Submitters send `SubmitJobs`; workers say `WorkerHello`, ask with `RequestWork` and end
/// each lease with `ReportResult`; anyone may ask `StatusRequest` and `ResultRequest`.
public enum WorkService {
    public struct Configuration: Sendable {
        /// How long a lease lasts before the job goes back to the queue.
        public var leaseDuration: Duration
        public var defaultMaxAttempts: Int
        /// The project's public key: jobs whose signature does not verify are refused (and
        /// nothing is stored). Nil: signatures are checked by the workers only.
        public var trust: WorkSigning.PublicKey?
        public var name: String
        /// A key rotation to announce to workers in their welcome (the caller has checked it
        /// against `trust`); jobs signed by its next key are accepted too.
        public var rotation: WorkSigning.Rotation?
        /// How many store transactions (group commits of claims, and of reports) may run at
        /// once: 1 suits SQLite (one writer); PostgreSQL takes more.
        public var storeConcurrency: Int
        /// Require capabilities of authenticated entities: `work.submit` to submit, `work.worker`
        /// for a worker's messages, `work.read` for status and results (`work.*`: all).
        public var requireCapabilities = false
        /// Relay submitters' commands to workers (`RunWorkerCommand`, §19.8): anyone who may
        /// connect (with `work.command`, when capabilities are required) can then run
        /// commands on the workers that accept them.
        public var relayCommands = false
        /// The project's preferences, sent to every worker in its welcome (§19.2).
        public var preferences = Parley_Work_V1_Preferences()
        /// The most leases one worker may hold at once ([R-19.2-4]; nil: no cap): past it
        /// RequestWork hands it nothing until it reports, hands back or lets leases expire.
        public var maxLeasesPerWorker: Int?

        public init(leaseDuration: Duration = .seconds(600), defaultMaxAttempts: Int = 3, trust: WorkSigning.PublicKey? = nil, name: String = "parley-work",
                    rotation: WorkSigning.Rotation? = nil, storeConcurrency: Int = 1) {
            self.rotation = rotation
            self.leaseDuration = leaseDuration
            self.defaultMaxAttempts = defaultMaxAttempts
            self.trust = trust
            self.name = name
            self.storeConcurrency = storeConcurrency
        }

        /// The keys whose jobs are accepted.
        var trusted: [WorkSigning.PublicKey] { (self.trust.map { [$0] } ?? []) + (self.rotation.map { [$0.next] } ?? []) }
    }

    /// The work protocol versions this master speaks (§19.7): a worker's hello says the
    /// highest it speaks, the welcome the one both use.
    public static let protocolVersions: ClosedRange<UInt32> = 1...1

    /// The version a master speaking `versions` uses with a worker whose highest is
    /// `workerHighest` (0: a worker from before versions were negotiated, which speaks 1).
    public static func negotiate(workerHighest: UInt32, versions: ClosedRange<UInt32> = protocolVersions) throws(ParleyError) -> UInt32 {
        let highest = max(1, workerHighest)
        guard highest >= versions.lowerBound else {
            throw ParleyError(code: .clientOutOfDate, message: "work protocol version \(highest) is no longer served: this master speaks versions \(versions.lowerBound) to \(versions.upperBound)")
        }
        return min(highest, versions.upperBound)
    }

    /// What a job with no estimate counts for in a request in seconds.
    public static let defaultEstimate: Double = 60

    /// A job's estimated run time (its spec's, or `defaultEstimate`).
    static func estimate(of spec: [UInt8]) -> Double {
        let seconds = (try? Parley_Work_V1_JobSpec(serializedBytes: spec))?.estimatedSeconds ?? 0
        return seconds > 0 ? Double(seconds) : Self.defaultEstimate
    }

    /// How many of the jobs, in order, a request for `seconds` of work takes: up to and
    /// including the one whose estimate reaches it, and at least one.
    public static func covering(seconds: Double, _ estimates: [Double]) -> Int {
        var sum = 0.0
        for (i, estimate) in estimates.enumerated() {
            sum += estimate
            if sum >= seconds { return i + 1 }
        }
        return estimates.count
    }

    /// The largest output tail a report may carry, per stream.
    public static let maxTail = 1 << 20
    /// Jobs one `SubmitJobs` may hold.
    public static let maxJobsPerSubmit = 1000
    /// Bytes kept of the end of each of a job's stdout and stderr: its `max_output_bytes`
    /// (else `fallback`), held to `cap` (the largest tail a report may carry by default).
    public static func tailLimit(_ spec: Parley_Work_V1_JobSpec, fallback: UInt64, cap: Int = WorkService.maxTail) -> Int {
        Int(min(spec.maxOutputBytes > 0 ? spec.maxOutputBytes : fallback, UInt64(max(1, cap))))
    }

    /// Attempts a job may ask for (`max_attempts`).
    public static let maxAttempts: UInt32 = 1000
    /// Bytes of a failure's message kept (the rest is cut).
    public static let maxMessage = 4096

    /// Wall-clock nanoseconds since 1970: leases outlive processes and move between masters.
    public static func now() -> Int64 { Int64(Date().timeIntervalSince1970 * 1e9) }

    /// How long a native worker's lease may last from when it was handed out, renewals
    /// included (docs/protocol.md 19.3): the job's `max_wall_seconds` (a day when it has
    /// none) and two lease times (its inputs' fetch, its report). A worker renewing past it
    /// is refused, and the lease ends at its deadline.
    static func longestLease(_ spec: Parley_Work_V1_JobSpec?, leaseNanoseconds: Int64) -> Int64 {
        let wall = Int64(spec?.maxWallSeconds ?? 0)
        return (wall > 0 ? wall : Self.longestWithoutMaxWall) * 1_000_000_000 &+ 2 &* max(0, leaseNanoseconds)
    }

    /// The run time a job without `max_wall_seconds` is allowed, in seconds.
    static let longestWithoutMaxWall: Int64 = 86_400

    /// `longestLease` by job, so that a job's spec (up to a frame, with inline inputs) is
    /// read once per master, not at every renewal. A job's spec never changes; emptied when
    /// it holds `capacity` jobs.
    final class LongestLeases: Sendable {
        static let capacity = 65_536
        private let known = NIOLockedValueBox<[UInt64: Int64]>([:])

        func longest(job: UInt64, store: any WorkStore, leaseNanoseconds: Int64) async throws -> Int64 {
            if let known = self.known.withLockedValue({ $0[job] }) { return known }
            let spec = try await store.spec(job).flatMap { try? Parley_Work_V1_JobSpec(serializedBytes: $0) }
            let longest = WorkService.longestLease(spec, leaseNanoseconds: leaseNanoseconds)
            self.known.withLockedValue { known in
                if known.count >= Self.capacity { known.removeAll(keepingCapacity: true) }
                known[job] = longest
            }
            return longest
        }
    }

    /// - Parameter commands: where workers' connections are kept for master-initiated
    ///   commands (§19.8); nil: none are sent.
    public static func register(on router: inout ParleyRouter, store: any WorkStore, configuration: Configuration = .init(), commands: WorkCommandCenter? = nil) {
        commands?.register(on: &router, relay: configuration.relayCommands, requireCapabilities: configuration.requireCapabilities)
        if configuration.requireCapabilities {
            router.require("work.submit", for: Parley_Work_V1_SubmitJobs.self)
            router.require("work.worker", for: Parley_Work_V1_WorkerHello.self, Parley_Work_V1_RequestWork.self, Parley_Work_V1_ReportResult.self,
                           Parley_Work_V1_HandBack.self, Parley_Work_V1_RenewLease.self)
            router.require("work.read", for: Parley_Work_V1_StatusRequest.self, Parley_Work_V1_ResultRequest.self)
        }
        let leaseNanoseconds = Int64(configuration.leaseDuration.components.seconds) * 1_000_000_000
        let longestLeases = LongestLeases()
        let submitted = Counter(label: "parley_work_jobs_submitted_total")
        let assigned = Counter(label: "parley_work_jobs_assigned_total")
        let verdicts = Dictionary(uniqueKeysWithValues: ["accepted", "already_accepted", "retrying", "failed", "superseded", "rejected"].map {
            ($0, Counter(label: "parley_work_reports_total", dimensions: [("verdict", $0)]))
        })
        let claimCommit = Metrics.Timer(label: "parley_work_commit_seconds", dimensions: [("kind", "claim")], preferredDisplayUnit: .seconds)
        let reportCommit = Metrics.Timer(label: "parley_work_commit_seconds", dimensions: [("kind", "report")], preferredDisplayUnit: .seconds)
        // Claims and reports from many workers are committed together (GroupCommit).
        let claims = GroupCommit<ClaimRequest, [ClaimedJob]>(maxBatch: 256, concurrency: configuration.storeConcurrency) { requests in
            let started = ContinuousClock.now
            defer { claimCommit.record(duration: ContinuousClock.now - started) }
            return try await store.claim(requests, now: Self.now(), leaseDuration: leaseNanoseconds)
        }
        let reports = GroupCommit<ReportInput, ReportVerdict>(
            maxBatch: 1024, maxWeight: 64 << 20, weight: { $0.result.count }, concurrency: configuration.storeConcurrency
        ) { inputs in
            let started = ContinuousClock.now
            defer { reportCommit.record(duration: ContinuousClock.now - started) }
            return try await store.report(inputs, now: Self.now())
        }
        router.on(Parley_Work_V1_SubmitJobs.self) { request, _ in
            guard !request.jobs.isEmpty else { throw ParleyError(code: .invalidArgument, message: "SubmitJobs holds no job") }
            // Each job's signature is checked here, on the connection's event loop: a batch is
            // kept short enough not to hold it (a 16 MiB batch held some 200,000 jobs).
            guard request.jobs.count <= Self.maxJobsPerSubmit else {
                throw ParleyError(code: .invalidArgument, message: "SubmitJobs holds \(request.jobs.count) jobs, more than \(Self.maxJobsPerSubmit); send them in batches; nothing was stored")
            }
            var jobs: [NewJob] = []
            for (i, job) in request.jobs.enumerated() {
                if configuration.trust != nil {
                    do throws(WorkSigningError) {
                        try WorkSigning.verify(job: Array(job.spec), signature: Array(job.signature), byAnyOf: configuration.trusted)
                    } catch {
                        throw ParleyError(code: .permissionDenied, message: "job \(i) of the batch is refused: \(error.message); nothing was stored")
                    }
                } else if job.signature.count != 64 {
                    throw ParleyError(code: .invalidArgument, message: "job \(i) of the batch is not signed; nothing was stored")
                }
                guard let spec = try? Parley_Work_V1_JobSpec(serializedBytes: job.spec) else {
                    throw ParleyError(code: .malformedPayload, message: "job \(i) of the batch: its spec is not a JobSpec; nothing was stored")
                }
                do throws(WorkFiles.FileError) {
                    try WorkFiles.check(spec: spec)
                } catch {
                    throw ParleyError(code: .invalidArgument, message: "job \(i) of the batch is refused: \(error.message); nothing was stored")
                }
                do throws(ParleyError) {
                    try Self.check(app: spec.app)
                } catch {
                    throw ParleyError(code: .invalidArgument, message: "job \(i) of the batch is refused: \(error.message); nothing was stored")
                }
                // Each attempt adds a reason to the job's record, which is rewritten whole.
                guard job.maxAttempts <= Self.maxAttempts else {
                    throw ParleyError(code: .invalidArgument, message: "job \(i) of the batch is refused: max_attempts \(job.maxAttempts) is over the limit of \(Self.maxAttempts); nothing was stored")
                }
                jobs.append(NewJob(
                    spec: Array(job.spec), signature: Array(job.signature), priority: Int(job.priority),
                    maxAttempts: job.maxAttempts > 0 ? Int(job.maxAttempts) : configuration.defaultMaxAttempts, app: spec.app
                ))
            }
            var reply = Parley_Work_V1_SubmitReply()
            reply.jobIds = try await store.submit(jobs, now: Self.now())
            submitted.increment(by: reply.jobIds.count)
            return reply
        }
        router.on(Parley_Work_V1_WorkerHello.self) { (hello: Parley_Work_V1_WorkerHello, ctx: ParleyRequestContext) -> Parley_Work_V1_WorkerWelcome in
            var welcome = Parley_Work_V1_WorkerWelcome()
            welcome.protocolVersion = try Self.negotiate(workerHighest: hello.protocolVersion)
            // Named as its requests are (§19.2): the authenticated entity, else the name it
            // gives; an authenticated worker cannot take over another's commands.
            var hello = hello
            hello.worker = try Self.worker(hello.worker, ctx)
            commands?.attach(hello, connection: ctx.connection)
            if let rotation = configuration.rotation {
                welcome.nextPublicKey = Data(rotation.next.rawRepresentation)
                welcome.rotationSignature = Data(rotation.signature)
            }
            welcome.master = configuration.name
            if configuration.preferences != Parley_Work_V1_Preferences() { welcome.preferences = configuration.preferences }
            welcome.leaseSeconds = UInt32(clamping: configuration.leaseDuration.components.seconds)
            return welcome
        }
        // Expired leases are looked for at most once a second (not on every request: that
        // would take the store's write lock each time).
        let lastExpiry = NIOLockedValueBox<Int64>(0)
        router.on(Parley_Work_V1_RequestWork.self) { request, context in
            let worker = try Self.worker(request.worker, context)
            let now = Self.now()
            let due = lastExpiry.withLockedValue { last -> Bool in
                guard now - last >= 1_000_000_000 else { return false }
                last = now
                return true
            }
            if due { _ = try await store.expireLeases(now: now) }
            guard request.apps.count <= 64 else {
                throw ParleyError(code: .invalidArgument, message: "a worker may run at most 64 applications; this one claims \(request.apps.count)")
            }
            for app in request.apps {
                guard !app.isEmpty else { throw ParleyError(code: .invalidArgument, message: "an application the worker runs has an empty name") }
                try Self.check(app: app)
            }
            guard request.seconds.isFinite, request.seconds >= 0 else {
                throw ParleyError(code: .invalidArgument, message: "a request for \(request.seconds) seconds of work: give 0 or more")
            }
            var claimed = try await claims.submit(ClaimRequest(worker: worker, limit: Int(min(request.slots, 64)), apps: request.apps, maxHeld: configuration.maxLeasesPerWorker))
            if request.seconds > 0 {
                // Enough jobs for the seconds asked (at least one); the others go back to the
                // queue at once, their attempts not counted.
                let kept = Self.covering(seconds: request.seconds, claimed.map { Self.estimate(of: $0.spec) })
                var handedOut = Array(claimed[..<kept])
                for job in claimed[kept...] {
                    do {
                        try await store.handBack(jobID: job.id, leaseID: job.lease.id, worker: worker)
                    } catch {
                        // Still leased to this worker: it gets the job rather than the lease
                        // running out unused and counting as a failed attempt.
                        context.logger.warning("a job claimed beyond the seconds asked could not go back to the queue; handed out", metadata: ["job": "\(job.id)", "error": "\(error)"])
                        handedOut.append(job)
                    }
                }
                claimed = handedOut
            }
            if !claimed.isEmpty { assigned.increment(by: claimed.count) }
            var reply = Parley_Work_V1_WorkAssignments()
            reply.assignments = claimed.map { job in
                var a = Parley_Work_V1_Assignment()
                a.jobID = job.id
                a.leaseID = job.lease.id
                a.deadlineUnixMs = job.lease.deadline / 1_000_000
                a.job.spec = Data(job.spec)
                a.job.signature = Data(job.signature)
                return a
            }
            return reply
        }
        router.on(Parley_Work_V1_HandBack.self) { request, context in
            let worker = try Self.worker(request.worker, context)
            do {
                try await store.handBack(jobID: request.jobID, leaseID: request.leaseID, worker: worker)
            } catch let error as LeaseError {
                throw ParleyError(code: .invalidArgument, message: "hand-back refused: \(error.message)")
            } catch let error as WorkStoreError {
                throw ParleyError(code: .invalidArgument, message: "hand-back refused: \(error.message)")
            }
            return Parley_Work_V1_HandBackReply()
        }
        router.on(Parley_Work_V1_RenewLease.self) { request, context in
            let worker = try Self.worker(request.worker, context)
            let lease: Lease
            do {
                let longest = try await longestLeases.longest(job: request.jobID, store: store, leaseNanoseconds: leaseNanoseconds)
                lease = try await store.renew(
                    jobID: request.jobID, leaseID: request.leaseID, worker: worker, now: Self.now(), leaseDuration: leaseNanoseconds, longest: longest
                )
            } catch let error as LeaseError {
                throw ParleyError(code: .invalidArgument, message: "renewal refused: \(error.message)")
            } catch let error as WorkStoreError where error.message.hasPrefix("no job") {
                throw ParleyError(code: .invalidArgument, message: "renewal refused: \(error.message)")
            }
            var reply = Parley_Work_V1_LeaseRenewed()
            reply.deadlineUnixMs = lease.deadline / 1_000_000
            return reply
        }
        router.on(Parley_Work_V1_ReportResult.self) { report, context in
            var report = report
            let worker = try Self.worker(report.worker, context)
            // The stored result names the worker the session authenticated, not what it wrote.
            report.worker = worker
            for (name, tail) in [("stdout", report.stdoutTail), ("stderr", report.stderrTail)] where tail.count > Self.maxTail {
                throw ParleyError(code: .invalidArgument, message: "report refused: its \(name) tail of \(tail.count) bytes is over the limit of \(Self.maxTail); nothing was stored")
            }
            do throws(WorkFiles.FileError) {
                try WorkFiles.check(outputs: report.outputs)
            } catch {
                throw ParleyError(code: .invalidArgument, message: "report refused: \(error.message); nothing was stored")
            }
            if !report.outputs.isEmpty {
                // Only the files the signed spec names, each once.
                let spec = try await store.spec(report.jobID).flatMap { try? Parley_Work_V1_JobSpec(serializedBytes: $0) }
                let names = report.outputs.map(\.name)
                guard let spec, Set(names).count == names.count, Set(names).isSubset(of: spec.outputs) else {
                    throw ParleyError(code: .invalidArgument, message: "report refused: its output files are not the ones the job's spec names; nothing was stored")
                }
            }
            // A failure's message becomes a reason in the job's record, kept for good and
            // rewritten with it: its first 4 KiB are kept.
            report.message = LeaseRules.cut(report.message, to: Self.maxMessage)
            let outcome: LeaseReport.Outcome
            if report.errorKind == .none, report.exitStatus == 0, report.signal == 0 {
                outcome = .success
            } else {
                outcome = .failure(Self.describe(report))
            }
            let verdict = try await reports.submit(ReportInput(
                jobID: report.jobID, report: LeaseReport(leaseID: report.leaseID, worker: worker, outcome: outcome),
                result: try report.serializedBytes()
            ))
            verdicts[Self.metricName(verdict)]?.increment()
            var ack = Parley_Work_V1_ReportAck()
            switch verdict {
            case .accepted: ack.verdict = .accepted
            case .alreadyAccepted: ack.verdict = .alreadyAccepted
            case .retrying: ack.verdict = .retrying
            case .failed: ack.verdict = .failed
            case .superseded: ack.verdict = .superseded
            case .rejected(let why): throw ParleyError(code: .invalidArgument, message: "report refused: \(why)")
            }
            return ack
        }
        router.on(Parley_Work_V1_StatusRequest.self) { _, _ in
            let counts = try await store.counts()
            var reply = Parley_Work_V1_StatusReply()
            reply.queued = UInt64(counts["queued"] ?? 0)
            reply.leased = UInt64(counts["leased"] ?? 0)
            reply.succeeded = UInt64(counts["succeeded"] ?? 0)
            reply.failed = UInt64(counts["failed"] ?? 0)
            return reply
        }
        router.on(Parley_Work_V1_ResultRequest.self) { request, _ in
            guard let job = try await store.job(request.jobID) else {
                throw ParleyError(code: .invalidArgument, message: "no job \(request.jobID)")
            }
            let reply = try Self.resultReply(job)
            return reply
        }
    }

    /// An application's name: up to 64 of A-Z a-z 0-9 . _ - (empty: none).
    public static func check(app: String) throws(ParleyError) {
        guard app.utf8.count <= 64, app.utf8.allSatisfy({ $0 < 0x80 && (Character(UnicodeScalar($0)).isLetter || Character(UnicodeScalar($0)).isNumber || "._-".utf8.contains($0)) }) else {
            throw ParleyError(code: .invalidArgument, message: "the application name '\(app.prefix(70))' is not up to 64 of A-Z a-z 0-9 . _ -")
        }
    }

    /// A job's state, failures and accepted result, as `ResultRequest` answers it.
    public static func resultReply(_ job: (record: JobRecord, result: [UInt8]?)) throws -> Parley_Work_V1_ResultReply {
        var reply = Parley_Work_V1_ResultReply()
        switch job.record.state {
        case .queued: reply.state = "queued"
        case .leased: reply.state = "leased"
        case .succeeded: reply.state = "succeeded"
        case .failed: reply.state = "failed"
        }
        reply.failures = job.record.failures
        if let result = job.result { reply.result = try Parley_Work_V1_ReportResult(serializedBytes: result) }
        Self.fit(&reply)
        return reply
    }

    /// Most bytes of a ResultReply's payload: it must fit a frame of the default limit with
    /// its message header (a stored report may itself come close to a frame, and a job has
    /// up to its attempts' failure reasons of 4 KiB each besides).
    static let maxResultReplyBytes = Frame.defaultMaxFrameSize - (16 << 10)

    /// Makes a reply fit `maxResultReplyBytes`: the oldest failure reasons give way first (a
    /// line says how many), then the report's tails (each keeps its end); the outputs stay.
    static func fit(_ reply: inout Parley_Work_V1_ResultReply, limit: Int = maxResultReplyBytes) {
        func size() -> Int { (try? reply.serializedBytes() as [UInt8])?.count ?? Int.max }
        var over = size() - limit
        guard over > 0 else { return }
        var dropped = 0
        while over > 0, reply.failures.count > 1 {
            over -= reply.failures.removeFirst().utf8.count + 3
            dropped += 1
        }
        if dropped > 0 { reply.failures.insert("(\(dropped) earlier failure reasons left out: the reply would not fit a frame)", at: 0) }
        over = size() - limit
        guard over > 0 else { return }
        // Each tail gives half the excess, and what the other cannot give (each keeps its end).
        let (out, err) = (reply.result.stdoutTail.count, reply.result.stderrTail.count)
        let fromOut = min(out, max(over / 2 + 1, over - err))
        let fromErr = min(err, max(0, over - fromOut))
        reply.result.stdoutTail = Data(reply.result.stdoutTail.dropFirst(fromOut))
        reply.result.stderrTail = Data(reply.result.stderrTail.dropFirst(fromErr))
    }

    /// The worker a request speaks for: the authenticated entity when there is one (a worker
    /// cannot speak for another), else the name it gives.
    static func worker(_ claimed: String, _ context: ParleyRequestContext) throws -> String {
        if let entity = context.session.entity { return entity }
        guard !claimed.isEmpty else { throw ParleyError(code: .invalidArgument, message: "the request names no worker") }
        guard claimed.utf8.count <= 256, !claimed.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) else {
            throw ParleyError(code: .invalidArgument, message: "a worker's name is at most 256 bytes without control characters")
        }
        return claimed
    }

    static func metricName(_ verdict: ReportVerdict) -> String {
        switch verdict {
        case .accepted: "accepted"
        case .alreadyAccepted: "already_accepted"
        case .retrying: "retrying"
        case .failed: "failed"
        case .superseded: "superseded"
        case .rejected: "rejected"
        }
    }

    static func describe(_ report: Parley_Work_V1_ReportResult) -> String {
        switch report.errorKind {
        case .signature: return "refused: bad signature (\(report.message))"
        case .spec: return "refused: \(report.message)"
        case .compute: return "could not run: \(report.message)"
        case .download: return "input failed, not run: \(report.message)"
        case .upload: return "output failed: \(report.message)"
        default:
            let what: String
            if report.signal == SIGXCPU {
                what = "CPU-time limit reached: killed by SIGXCPU (signal \(report.signal))"
            } else {
                what = report.signal != 0 ? "killed by signal \(report.signal)" : "exit status \(report.exitStatus)"
            }
            // The failed attempt's report is not kept: its last line of stderr says why.
            let last = String(decoding: report.stderrTail, as: UTF8.self).split(whereSeparator: \.isNewline).last.map { String($0.prefix(200)) }
            return last.map { "\(what): \($0)" } ?? what
        }
    }
}

extension Duration {
    /// Whole milliseconds (0 for a negative duration): wall times in reports and results.
    package var wholeMilliseconds: UInt64 {
        UInt64(max(0, self.components.seconds * 1000 + self.components.attoseconds / 1_000_000_000_000_000))
    }
}
