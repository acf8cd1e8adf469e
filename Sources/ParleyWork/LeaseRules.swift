/// The rules a job follows in the scheduler, sans-IO: no clock, store or randomness inside
/// (the time and the ids are passed in). The store keeps `JobRecord`s and applies these rules
/// inside its transactions, so that every master (SQLite, or several on PostgreSQL) decides
/// the same way.
///
/// A job is queued, then handed out under a *lease* (a worker, an id, a deadline). The lease
/// ends with a report from its worker, with its deadline passing, or with the worker handing
/// it back. A result is accepted exactly once: a report resent after a reconnect gets the same
/// answer again and changes nothing; a late success from an expired lease is still accepted if
/// no other attempt succeeded first (the work was done), and its competitor's later report is
/// answered as superseded. A failed attempt is retried until `maxAttempts` leases were handed
/// out, then the job fails with the reasons of every attempt.
public struct JobRecord: Sendable, Hashable, Codable {
    public enum State: Sendable, Hashable, Codable {
        case queued
        case leased(Lease)
        /// Succeeded under this lease.
        case succeeded(leaseID: UInt64)
        /// Failed for good: the reasons of its attempts, oldest first.
        case failed(reasons: [String])
    }

    public var id: UInt64
    public var state: State = .queued
    /// Leases handed out so far, oldest first (at most `maxAttempts`).
    public var leases: [Lease] = []
    public var maxAttempts: Int
    /// Why attempts failed, oldest first.
    public var failures: [String] = []
    /// Leases whose worker reported a failure: a lease has one outcome.
    public var failedLeases: [UInt64] = []

    public init(id: UInt64, maxAttempts: Int = 3) {
        self.id = id
        self.maxAttempts = max(1, maxAttempts)
    }

    public var isFinished: Bool {
        switch self.state {
        case .succeeded, .failed: return true
        case .queued, .leased: return false
        }
    }
}

public struct Lease: Sendable, Hashable, Codable {
    /// Unique among the job's leases (the store hands out ids that are unique everywhere).
    public var id: UInt64
    public var worker: String
    /// Nanoseconds since 1970 (wall clock: leases outlive processes and move between masters).
    public var deadline: Int64
    /// When it was handed out, nanoseconds since 1970 (nil: a lease from before stores kept
    /// it); renewals end at a time counted from here (`LeaseRules.renew`'s `longest`).
    public var granted: Int64?

    public init(id: UInt64, worker: String, deadline: Int64, granted: Int64? = nil) {
        self.id = id
        self.worker = worker
        self.deadline = deadline
        self.granted = granted
    }
}

/// What a worker reports at the end of a lease.
public struct LeaseReport: Sendable, Hashable {
    public enum Outcome: Sendable, Hashable {
        case success
        /// The attempt failed (non-zero exit, a signal, a download, upload or signature error):
        /// the reason, for the job's record.
        case failure(String)
    }

    public var leaseID: UInt64
    public var worker: String
    public var outcome: Outcome

    public init(leaseID: UInt64, worker: String, outcome: Outcome) {
        self.leaseID = leaseID
        self.worker = worker
        self.outcome = outcome
    }
}

/// The scheduler's answer to a report. Every case but `rejected` is acknowledged to the
/// worker (it then forgets the report); `rejected` is an error naming what was wrong.
public enum ReportVerdict: Sendable, Hashable {
    /// The result is accepted: the job succeeded.
    case accepted
    /// This report was already accepted (resent after a reconnect): acknowledged again.
    case alreadyAccepted
    /// The failure is recorded and the job queued again for another attempt.
    case retrying
    /// The failure is recorded and it was the last attempt: the job failed.
    case failed
    /// Another attempt's result was accepted first: this one is acknowledged, not counted.
    case superseded
    case rejected(String)
}

public enum LeaseRules {
    /// Hands a queued job to `worker` under lease `leaseID` until `now + duration`.
    /// - Throws: a reason, if the job is not queued.
    public static func assign(_ job: inout JobRecord, to worker: String, leaseID: UInt64, now: Int64, duration: Int64) throws(LeaseError) -> Lease {
        guard case .queued = job.state else {
            throw LeaseError("job \(job.id) is not queued (\(job.state))")
        }
        guard job.leases.count < job.maxAttempts else {
            throw LeaseError("job \(job.id) already had its \(job.maxAttempts) attempts")
        }
        guard !job.leases.contains(where: { $0.id == leaseID }) else {
            throw LeaseError("lease id \(leaseID) was already used for job \(job.id)")
        }
        let lease = Lease(id: leaseID, worker: worker, deadline: now &+ max(0, duration), granted: now)
        job.leases.append(lease)
        job.state = .leased(lease)
        return lease
    }

    /// A worker reports the end of a lease.
    public static func report(_ job: inout JobRecord, _ report: LeaseReport) -> ReportVerdict {
        guard let lease = job.leases.first(where: { $0.id == report.leaseID }) else {
            return .rejected("job \(job.id) has no lease \(report.leaseID)")
        }
        guard lease.worker == report.worker else {
            return .rejected("lease \(report.leaseID) of job \(job.id) belongs to worker \(lease.worker), not \(report.worker)")
        }
        // Each lease has one outcome: a failure, once reported, stays its outcome.
        let failedBefore = job.failedLeases.contains(report.leaseID)
        switch (job.state, report.outcome) {
        case (.succeeded(let accepted), let outcome):
            if accepted == report.leaseID { return .alreadyAccepted }
            guard failedBefore else { return .superseded }
            // A failure sent again is acknowledged as before; a success from a lease that
            // reported a failure is refused, whether or not another lease succeeded since.
            if case .success = outcome { return .rejected("lease \(report.leaseID) of job \(job.id) already reported a failure") }
            return .alreadyAccepted
        case (.leased(let current), .success) where current.id == report.leaseID:
            job.state = .succeeded(leaseID: report.leaseID)
            return .accepted
        case (.leased(let current), .failure(let why)) where current.id == report.leaseID:
            job.failedLeases.append(report.leaseID)
            return self.attemptFailed(&job, reason: "lease \(lease.id) on \(lease.worker): \(why)")
        case (_, .success):
            // An earlier lease (expired, or handed out before a failure made the job fail):
            // the work was done, so it counts if no other attempt succeeded and this lease
            // did not report a failure before.
            if failedBefore { return .rejected("lease \(report.leaseID) of job \(job.id) already reported a failure") }
            job.state = .succeeded(leaseID: report.leaseID)
            return .accepted
        case (_, .failure):
            // An earlier lease's failure: its attempt was counted when the lease ended
            // (expired); acknowledged, not counted again.
            if failedBefore { return .alreadyAccepted }
            job.failedLeases.append(report.leaseID)
            return .superseded
        }
    }

    /// Ends the lease of a job whose deadline has passed; true if it did.
    @discardableResult
    public static func expire(_ job: inout JobRecord, now: Int64) -> Bool {
        guard case .leased(let lease) = job.state, now >= lease.deadline else { return false }
        _ = self.attemptFailed(&job, reason: "lease \(lease.id) to \(lease.worker) expired")
        return true
    }

    /// The worker says the job still runs: its current lease, if not expired, now ends at
    /// `now + duration` (never earlier than it did).
    /// - Parameter longest: how long, from when it was handed out, the lease may last at
    ///   most, renewals included (nil: no end): a renewal that would take it past that is
    ///   refused, so that a worker renewing for ever cannot keep a job for ever.
    public static func renew(_ job: inout JobRecord, leaseID: UInt64, worker: String, now: Int64, duration: Int64, longest: Int64? = nil) throws(LeaseError) -> Lease {
        guard case .leased(var lease) = job.state, lease.id == leaseID else {
            throw LeaseError("job \(job.id) is not leased under \(leaseID): the lease ended")
        }
        guard lease.worker == worker else {
            throw LeaseError("lease \(leaseID) of job \(job.id) belongs to worker \(lease.worker), not \(worker)")
        }
        guard now < lease.deadline else { throw LeaseError("lease \(leaseID) of job \(job.id) expired") }
        let end = now &+ max(0, duration)
        // Refused rather than cut short: a worker counts a granted renewal as a whole lease
        // time on its own clock, and would run on past a shorter deadline.
        if let longest, let granted = lease.granted, end > granted &+ max(0, longest) {
            throw LeaseError("lease \(leaseID) of job \(job.id) has had its longest time (\(longest / 1_000_000_000) s from when it was handed out: the job's run time and two lease times): it is not renewed, and ends at its deadline")
        }
        lease.deadline = max(lease.deadline, end)
        job.state = .leased(lease)
        if let i = job.leases.firstIndex(where: { $0.id == leaseID }) { job.leases[i] = lease }
        return lease
    }

    /// The worker gives the job back unfinished (it is shutting down): queued again, and the
    /// attempt does not count against the job.
    public static func handBack(_ job: inout JobRecord, leaseID: UInt64, worker: String) throws(LeaseError) {
        guard case .leased(let lease) = job.state, lease.id == leaseID else {
            throw LeaseError("job \(job.id) is not leased under \(leaseID)")
        }
        guard lease.worker == worker else {
            throw LeaseError("lease \(leaseID) of job \(job.id) belongs to worker \(lease.worker), not \(worker)")
        }
        job.leases.removeAll { $0.id == leaseID }
        job.state = .queued
    }

    /// Bytes of a failed attempt's reason kept in the job's record (which keeps every
    /// reason and is rewritten whole at each change): past it, the reason is cut.
    public static let maxReasonBytes = 8192

    /// `text`'s first `bytes` bytes, marked " [cut]" when there was more.
    public static func cut(_ text: String, to bytes: Int) -> String {
        text.utf8.count <= bytes ? text : String(decoding: text.utf8.prefix(bytes), as: UTF8.self) + " [cut]"
    }

    private static func attemptFailed(_ job: inout JobRecord, reason: String) -> ReportVerdict {
        job.failures.append(Self.cut(reason, to: Self.maxReasonBytes))
        if job.leases.count >= job.maxAttempts {
            job.state = .failed(reasons: job.failures)
            return .failed
        }
        job.state = .queued
        return .retrying
    }
}

public struct LeaseError: Error, Sendable, Hashable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { self.message }
}

/// A worker's view of one lease, on its own monotonic clock (sans-IO: times are nanoseconds
/// of a monotonic clock, passed in). The master's deadline is a time on the master's wall
/// clock; a worker whose clock is ahead of it would stop every job at once, one whose clock
/// is behind would run jobs past the real deadline. So the worker counts the lease time
/// itself, from before it asked (the master starts the lease later, so the worker's deadline
/// is never after the master's), and each renewal from before it was sent.
public struct WorkerLease: Sendable, Equatable {
    /// The master's lease time, in nanoseconds (the one that granted the lease).
    public let leaseTime: Int64
    /// The job stops this long before the lease would end without a renewal: 5 s, or a
    /// quarter of the lease when that is shorter.
    public let margin: Int64
    /// When the lease ends at the latest, on the worker's clock.
    public private(set) var deadline: Int64

    /// `leaseTime`: the master's, from its welcome; `askedAt`: when the request that brought
    /// the lease was sent (to the master that answered). The deadline is never later than the
    /// master's: nothing here lengthens the lease.
    public init(leaseTime: Int64, askedAt: Int64) {
        self.leaseTime = max(leaseTime, 0)
        self.margin = min(5_000_000_000, self.leaseTime / 4)
        self.deadline = askedAt + self.leaseTime
    }

    /// How often to renew: every third of the lease time (at least every 100 ms).
    public var renewalInterval: Int64 { max(self.leaseTime / 3, 100_000_000) }

    /// A renewal sent at `sentAt` was granted by a master whose lease time is `leaseTime`
    /// (another master than the first, after a failover, may have a shorter one): it extended
    /// the lease to its now plus that time, which is no earlier than `sentAt` plus it.
    public mutating func renewed(sentAt: Int64, leaseTime: Int64) {
        self.deadline = max(self.deadline, sentAt + max(min(leaseTime, self.leaseTime), 0))
    }

    /// True once the lease would end within the margin: the job must stop.
    public func mustStop(now: Int64) -> Bool {
        self.deadline - now <= self.margin
    }
}
