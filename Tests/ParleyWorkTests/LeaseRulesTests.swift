import Foundation
import ParleyWork
import Testing

/// The lease rules of Parley Work (sans-IO): exactly-once acceptance, retries, expiry.
@Suite struct LeaseRulesTests {
    let second: Int64 = 1_000_000_000

    /// §19.3: a lease has one outcome. A success from a lease that reported a failure is
    /// refused, also once another lease has succeeded; its failure sent again is acknowledged.
    @Test func aSuccessAfterTheSameLeasesFailureIsRefusedEvenOnceTheJobSucceeded() throws {
        var job = JobRecord(id: 1, maxAttempts: 3)
        let first = try LeaseRules.assign(&job, to: "w1", leaseID: 10, now: 0, duration: 60 * second)
        #expect(LeaseRules.report(&job, LeaseReport(leaseID: first.id, worker: "w1", outcome: .failure("exit 1"))) == .retrying)
        let second = try LeaseRules.assign(&job, to: "w2", leaseID: 11, now: 1, duration: 60 * second)
        #expect(LeaseRules.report(&job, LeaseReport(leaseID: second.id, worker: "w2", outcome: .success)) == .accepted)
        let late = LeaseRules.report(&job, LeaseReport(leaseID: first.id, worker: "w1", outcome: .success))
        guard case .rejected(let why) = late else { Issue.record("a failed lease's success was not refused: \(late)"); return }
        #expect(why.contains("already reported a failure"), "\(why)")
        #expect(LeaseRules.report(&job, LeaseReport(leaseID: first.id, worker: "w1", outcome: .failure("exit 1"))) == .alreadyAccepted)
        #expect(job.state == .succeeded(leaseID: second.id))
    }

    /// [R-19.3-1]
    @Test func aJobIsLeasedThenAcceptedExactlyOnce() throws {
        var job = JobRecord(id: 1)
        let lease = try LeaseRules.assign(&job, to: "w1", leaseID: 10, now: 0, duration: 60 * second)
        #expect(job.state == .leased(lease) && lease.deadline == 60 * second)
        let report = LeaseReport(leaseID: 10, worker: "w1", outcome: .success)
        #expect(LeaseRules.report(&job, report) == .accepted)
        #expect(job.state == .succeeded(leaseID: 10) && job.isFinished)
        // Resent after a reconnect: acknowledged again, nothing changes.
        let before = job
        #expect(LeaseRules.report(&job, report) == .alreadyAccepted)
        #expect(job == before)
        #expect(throws: LeaseError.self) { try LeaseRules.assign(&job, to: "w2", leaseID: 11, now: 0, duration: 1) }
    }

    @Test func reportsForUnknownLeasesOrOtherWorkersAreRejectedAndChangeNothing() throws {
        var job = JobRecord(id: 2)
        _ = try LeaseRules.assign(&job, to: "w1", leaseID: 20, now: 0, duration: second)
        let before = job
        #expect(LeaseRules.report(&job, LeaseReport(leaseID: 99, worker: "w1", outcome: .success)) == .rejected("job 2 has no lease 99"))
        guard case .rejected(let why) = LeaseRules.report(&job, LeaseReport(leaseID: 20, worker: "mallory", outcome: .success)) else {
            Issue.record("another worker's report accepted")
            return
        }
        #expect(why.contains("belongs to worker w1"))
        #expect(job == before)
    }

    @Test func failuresAreRetriedUpToTheLimitThenTheJobFailsWithEveryReason() throws {
        var job = JobRecord(id: 3, maxAttempts: 3)
        _ = try LeaseRules.assign(&job, to: "w1", leaseID: 1, now: 0, duration: second)
        let first = LeaseReport(leaseID: 1, worker: "w1", outcome: .failure("exit status 2"))
        #expect(LeaseRules.report(&job, first) == .retrying)
        #expect(job.state == .queued)
        #expect(LeaseRules.report(&job, first) == .alreadyAccepted, "a resent failure is not counted twice")
        _ = try LeaseRules.assign(&job, to: "w2", leaseID: 2, now: 0, duration: second)
        #expect(LeaseRules.expire(&job, now: 2 * second))
        #expect(job.state == .queued)
        _ = try LeaseRules.assign(&job, to: "w3", leaseID: 3, now: 0, duration: second)
        #expect(LeaseRules.report(&job, LeaseReport(leaseID: 3, worker: "w3", outcome: .failure("signal 9"))) == .failed)
        guard case .failed(let reasons) = job.state else { Issue.record("not failed: \(job.state)"); return }
        #expect(reasons == ["lease 1 on w1: exit status 2", "lease 2 to w2 expired", "lease 3 on w3: signal 9"])
        #expect(throws: LeaseError.self) { try LeaseRules.assign(&job, to: "w4", leaseID: 4, now: 0, duration: 1) }
    }

    /// A reason longer than the record keeps (any front end's: a Buildbot worker's failure
    /// text may be 16 MiB) is cut, marked so.
    @Test func aLongReasonIsCut() throws {
        var job = JobRecord(id: 4, maxAttempts: 1)
        _ = try LeaseRules.assign(&job, to: "w1", leaseID: 1, now: 0, duration: second)
        #expect(LeaseRules.report(&job, LeaseReport(leaseID: 1, worker: "w1", outcome: .failure(String(repeating: "x", count: 1 << 20)))) == .failed)
        let reason = try #require(job.failures.first)
        #expect(reason.utf8.count <= LeaseRules.maxReasonBytes + 6 && reason.hasSuffix(" [cut]"), "\(reason.utf8.count)")
    }

    @Test func aLateSuccessFromAnExpiredLeaseIsAcceptedOnceAndItsCompetitorIsSuperseded() throws {
        var job = JobRecord(id: 4)
        _ = try LeaseRules.assign(&job, to: "slow", leaseID: 1, now: 0, duration: second)
        #expect(!LeaseRules.expire(&job, now: second - 1), "not before the deadline")
        #expect(LeaseRules.expire(&job, now: second))
        _ = try LeaseRules.assign(&job, to: "fast", leaseID: 2, now: second, duration: second)
        #expect(LeaseRules.report(&job, LeaseReport(leaseID: 1, worker: "slow", outcome: .success)) == .accepted)
        #expect(LeaseRules.report(&job, LeaseReport(leaseID: 2, worker: "fast", outcome: .success)) == .superseded)
        #expect(job.state == .succeeded(leaseID: 1))
        #expect(LeaseRules.report(&job, LeaseReport(leaseID: 1, worker: "slow", outcome: .success)) == .alreadyAccepted)
    }

    /// A lease has one outcome: once it reported a failure, a later success from it is
    /// refused, and an expired lease's late failure is acknowledged without being counted twice.
    @Test func aLeaseHasOneOutcome() throws {
        var job = JobRecord(id: 6, maxAttempts: 3)
        _ = try LeaseRules.assign(&job, to: "w1", leaseID: 1, now: 0, duration: second)
        #expect(LeaseRules.report(&job, LeaseReport(leaseID: 1, worker: "w1", outcome: .failure("exit 1"))) == .retrying)
        guard case .rejected = LeaseRules.report(&job, LeaseReport(leaseID: 1, worker: "w1", outcome: .success)) else {
            Issue.record("a lease that failed was later accepted as a success")
            return
        }
        _ = try LeaseRules.assign(&job, to: "w2", leaseID: 2, now: 0, duration: second)
        #expect(LeaseRules.expire(&job, now: second))
        #expect(job.failures.count == 2)
        #expect(LeaseRules.report(&job, LeaseReport(leaseID: 2, worker: "w2", outcome: .failure("exit 9"))) == .superseded)
        #expect(job.failures.count == 2, "the expired attempt is not counted again")
        #expect(LeaseRules.report(&job, LeaseReport(leaseID: 2, worker: "w2", outcome: .failure("exit 9"))) == .alreadyAccepted)
        #expect(job.state == .queued)
    }

    @Test func aHandedBackJobIsQueuedWithoutUsingAnAttempt() throws {
        var job = JobRecord(id: 5, maxAttempts: 1)
        _ = try LeaseRules.assign(&job, to: "w1", leaseID: 7, now: 0, duration: second)
        #expect(throws: LeaseError.self) { try LeaseRules.handBack(&job, leaseID: 7, worker: "w2") }
        try LeaseRules.handBack(&job, leaseID: 7, worker: "w1")
        #expect(job.state == .queued && job.leases.isEmpty)
        _ = try LeaseRules.assign(&job, to: "w2", leaseID: 8, now: 0, duration: second)
        #expect(LeaseRules.report(&job, LeaseReport(leaseID: 8, worker: "w2", outcome: .success)) == .accepted)
    }

    /// A random schedule of assignments, reports (some resent, some late, some from the wrong
    /// worker), expiries and hand-backs: whatever happens, at most one success is ever accepted
    /// per job, a finished job never runs again, and every lease ends.
    @Test func randomSchedulesNeverAcceptTwice() throws {
        var rng = SystemRandomNumberGenerator()
        for round in 0..<2_000 {
            var job = JobRecord(id: UInt64(round), maxAttempts: Int.random(in: 1...4, using: &rng))
            var now: Int64 = 0
            var nextLease: UInt64 = 1
            var accepted = 0
            var issued: [Lease] = []
            for _ in 0..<30 {
                now += Int64.random(in: 0...(2 * second), using: &rng)
                switch Int.random(in: 0..<5, using: &rng) {
                case 0:
                    if let lease = try? LeaseRules.assign(&job, to: "w\(Int.random(in: 0..<3, using: &rng))", leaseID: nextLease, now: now, duration: second) {
                        issued.append(lease)
                        nextLease += 1
                    }
                case 1, 2:
                    guard let lease = issued.randomElement(using: &rng) else { break }
                    let worker = Int.random(in: 0..<10, using: &rng) == 0 ? "mallory" : lease.worker
                    let outcome: LeaseReport.Outcome = Bool.random(using: &rng) ? .success : .failure("exit \(lease.id)")
                    if LeaseRules.report(&job, LeaseReport(leaseID: lease.id, worker: worker, outcome: outcome)) == .accepted { accepted += 1 }
                case 3:
                    LeaseRules.expire(&job, now: now)
                default:
                    if case .leased(let lease) = job.state { try? LeaseRules.handBack(&job, leaseID: lease.id, worker: lease.worker) }
                }
                #expect(accepted <= 1, "round \(round): two results accepted")
                #expect(job.leases.count <= job.maxAttempts)
                if case .succeeded(let id) = job.state { #expect(job.leases.contains { $0.id == id }) }
            }
        }
    }

    /// Renewal extends the current lease of its own worker, never shortens it, and is refused
    /// once the lease ended (expired, reported, handed back) or for another worker.
    @Test func aLeaseIsRenewedOnlyWhileItRunsAndOnlyByItsWorker() throws {
        var job = JobRecord(id: 1)
        let lease = try LeaseRules.assign(&job, to: "w", leaseID: 5, now: 0, duration: 100)
        let renewed = try LeaseRules.renew(&job, leaseID: 5, worker: "w", now: 50, duration: 100)
        #expect(renewed.deadline == 150 && job.state == .leased(renewed) && job.leases == [renewed])
        #expect(try LeaseRules.renew(&job, leaseID: 5, worker: "w", now: 60, duration: 10).deadline == 150, "never earlier")
        #expect(throws: LeaseError.self) { _ = try LeaseRules.renew(&job, leaseID: 5, worker: "other", now: 70, duration: 100) }
        #expect(throws: LeaseError.self) { _ = try LeaseRules.renew(&job, leaseID: 4, worker: "w", now: 70, duration: 100) }
        #expect(throws: LeaseError.self) { _ = try LeaseRules.renew(&job, leaseID: 5, worker: "w", now: 150, duration: 100) }
        #expect(LeaseRules.expire(&job, now: 150))
        #expect(throws: LeaseError.self) { _ = try LeaseRules.renew(&job, leaseID: 5, worker: "w", now: 151, duration: 100) }
        _ = lease
    }
}

extension LeaseRulesTests {
    /// Renewals end `longest` after the lease was handed out: one that would take the lease
    /// past it is refused (not cut short: a worker counts a granted renewal as a whole lease
    /// time), and the lease ends at its deadline. A lease from before stores kept its grant
    /// time is not held to it.
    @Test func renewalsEndTheLongestAfterTheLeaseWasHandedOut() throws {
        var job = JobRecord(id: 1)
        let lease = try LeaseRules.assign(&job, to: "w", leaseID: 5, now: 1_000, duration: 10)
        #expect(lease.granted == 1_000)
        #expect(try LeaseRules.renew(&job, leaseID: 5, worker: "w", now: 1_005, duration: 10, longest: 25).deadline == 1_015)
        #expect(try LeaseRules.renew(&job, leaseID: 5, worker: "w", now: 1_014, duration: 10, longest: 25).deadline == 1_024)
        #expect(try LeaseRules.renew(&job, leaseID: 5, worker: "w", now: 1_015, duration: 10, longest: 25).deadline == 1_025, "up to the longest")
        let refused = #expect(throws: LeaseError.self) { _ = try LeaseRules.renew(&job, leaseID: 5, worker: "w", now: 1_016, duration: 10, longest: 25) }
        #expect(refused?.message.contains("longest time") == true, "\(String(describing: refused))")
        #expect(job.state == .leased(Lease(id: 5, worker: "w", deadline: 1_025, granted: 1_000)), "its deadline stays")
        #expect(LeaseRules.expire(&job, now: 1_025), "it ends at its deadline")
        // Without a grant time (an old record), no end.
        var old = JobRecord(id: 2)
        _ = try LeaseRules.assign(&old, to: "w", leaseID: 6, now: 0, duration: 10)
        if case .leased(var l) = old.state {
            l.granted = nil
            old.state = .leased(l)
            old.leases = [l]
        }
        #expect(try LeaseRules.renew(&old, leaseID: 6, worker: "w", now: 5, duration: 1_000, longest: 25).deadline == 1_005)
    }
}

/// A worker's lease on its own clock: the master's wall-clock deadline plays no part, so a
/// worker whose clock is far ahead of or behind the master's keeps and stops jobs alike.
@Suite struct WorkerLeaseTests {
    static let s: Int64 = 1_000_000_000

    @Test func theLeaseRunsFromWhenTheWorkerAskedAndStopsAtTheMargin() {
        let lease = WorkerLease(leaseTime: 600 * Self.s, askedAt: 10 * Self.s)
        #expect(lease.deadline == 610 * Self.s)
        #expect(lease.margin == 5 * Self.s)
        #expect(lease.renewalInterval == 200 * Self.s)
        #expect(!lease.mustStop(now: 11 * Self.s), "taken a second ago: 599 s left")
        #expect(!lease.mustStop(now: 605 * Self.s - 1))
        #expect(lease.mustStop(now: 605 * Self.s), "5 s before the end")
    }

    @Test func aRenewalCountsFromWhenItWasSentAndNeverShortens() {
        var lease = WorkerLease(leaseTime: 30 * Self.s, askedAt: 0)
        #expect(lease.margin == 5 * Self.s)
        lease.renewed(sentAt: 10 * Self.s, leaseTime: 30 * Self.s)
        #expect(lease.deadline == 40 * Self.s)
        lease.renewed(sentAt: 5 * Self.s, leaseTime: 30 * Self.s)
        #expect(lease.deadline == 40 * Self.s, "an older renewal's answer arriving late changes nothing")
        #expect(!lease.mustStop(now: 34 * Self.s) && lease.mustStop(now: 35 * Self.s))
        // After a failover, a master with a shorter lease time renews for its time, not ours;
        // one with a longer time is not trusted beyond the lease's own.
        lease.renewed(sentAt: 30 * Self.s, leaseTime: 12 * Self.s)
        #expect(lease.deadline == 42 * Self.s)
        lease.renewed(sentAt: 40 * Self.s, leaseTime: 600 * Self.s)
        #expect(lease.deadline == 70 * Self.s)
    }

    /// The worker's end is never after the master's: a short lease is not lengthened.
    @Test func shortLeasesStopAQuarterBeforeAndAreNeverLengthened() {
        let short = WorkerLease(leaseTime: 8 * Self.s, askedAt: 0)
        #expect(short.margin == 2 * Self.s)
        #expect(!short.mustStop(now: 6 * Self.s - 1) && short.mustStop(now: 6 * Self.s))
        let oneSecond = WorkerLease(leaseTime: 1 * Self.s, askedAt: 0)
        #expect(oneSecond.deadline == 1 * Self.s && oneSecond.margin == Self.s / 4)
        #expect(oneSecond.mustStop(now: 750_000_000) && !oneSecond.mustStop(now: 750_000_000 - 1))
        #expect(oneSecond.renewalInterval == 333_333_333)
        let none = WorkerLease(leaseTime: -60 * Self.s, askedAt: 0)
        #expect(none.leaseTime == 0 && none.mustStop(now: 0), "a lease already over stops the job at once")
    }
}
