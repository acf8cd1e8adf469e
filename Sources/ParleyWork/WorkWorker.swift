import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Logging
import NIOConcurrencyHelpers
import Parley
import ParleyWire
import SwiftProtobuf

/// A worker: asks its master for jobs, checks each job's signature against the project's
/// public key before running anything, runs it in a directory of its own with a clean
/// environment and a wall-time limit, and reports the result. Its connection is a lossless
/// session, so a report survives a broken connection; reports are idempotent for the master
/// (a resent one is acknowledged again), so they are sent again after a session reset too,
/// and to another master when this one is gone (`WorkMasterLink`).
public final class WorkWorker: Sendable {
    public struct Configuration: Sendable {
        public var name: String
        public var slots: Int
        /// Jobs run in `directory/job-ID-LEASE`, removed once the job's report is made unless
        /// `keepJobDirectories`.
        public var directory: String
        public var trust: WorkSigning.PublicKey
        public var defaultMaxWall: Duration
        public var defaultMaxOutput: Int
        /// How long to wait before asking again when the master had no work.
        public var idleDelay: Duration
        /// The command that applies a job's CPU and memory limits and then runs it
        /// (`parley work exec`): it is given `--cpu SECONDS --memory BYTES -- PROGRAM ARGS...`.
        /// Nil: jobs that ask for those limits are refused (never run without them).
        public var limiter: [String]?
        /// The applications this worker runs (JobSpec.app): it gets jobs that need none or one of these.
        public var apps: [String]
        /// Keep each job's directory once its report is made (false: removed then, so that
        /// the worker's disk does not fill with the inputs and outputs of every job it ran).
        public var keepJobDirectories = false

        public init(
            name: String, slots: Int = 1, directory: String, trust: WorkSigning.PublicKey,
            defaultMaxWall: Duration = .seconds(3600), defaultMaxOutput: Int = 64 << 10, idleDelay: Duration = .milliseconds(200),
            limiter: [String]? = nil, apps: [String] = []
        ) {
            self.limiter = limiter
            self.apps = apps
            self.name = name
            self.slots = max(1, slots)
            self.directory = directory
            self.trust = trust
            self.defaultMaxWall = defaultMaxWall
            self.defaultMaxOutput = defaultMaxOutput
            self.idleDelay = idleDelay
        }
    }

    public let configuration: Configuration
    let link: WorkMasterLink
    let logger: Logger
    private let counts = NIOLockedValueBox((ran: 0, refused: 0))
    /// Shutting down: no new job is taken, running ones are stopped and handed back.
    private let stopping = NIOLockedValueBox(false)
    /// The child process of each running job, by job id.
    private let running = NIOLockedValueBox<[UInt64: Int32]>([:])
    private let handedBack = NIOLockedValueBox<[UInt64]>([])
    /// The master's preferences (from its welcome): fewer slots, another idle delay.
    private let preferences = NIOLockedValueBox(Parley_Work_V1_Preferences())
    /// The master's lease time in nanoseconds, from its welcome (0: not told).
    private let leaseTime = NIOLockedValueBox<Int64>(0)
    /// The keys jobs may be signed with: `trust`, and the next keys of rotations it vouched for.
    private let trusted: NIOLockedValueBox<[WorkSigning.PublicKey]>

    /// What runs the master's commands (registered on the link's router); stopped at shutdown.
    let commands: WorkCommandExecutor?

    public init(link: WorkMasterLink, configuration: Configuration, commands: WorkCommandExecutor? = nil, logger: Logger = Logger(label: "parley.work.worker")) {
        self.link = link
        self.commands = commands
        self.configuration = configuration
        self.trusted = NIOLockedValueBox([configuration.trust])
        self.logger = logger
        // Every master this worker moves to hears its hello (and may announce a rotation).
        link.setOnConnect { [weak self] client in
            guard let self else { return }
            try await self.hello(over: client)
        }
    }

    /// The keys this worker accepts jobs from now.
    public var trustedKeys: [WorkSigning.PublicKey] { self.trusted.withLockedValue { $0 } }

    /// A master announces a key rotation: the next key is trusted from now on if a key this
    /// worker trusts signed it; otherwise it is ignored (and jobs signed with it refused).
    func consider(rotation welcome: Parley_Work_V1_WorkerWelcome) {
        guard !welcome.nextPublicKey.isEmpty else { return }
        do throws(WorkSigningError) {
            let next = try WorkSigning.PublicKey(rawRepresentation: Array(welcome.nextPublicKey))
            let trusted = self.trusted.withLockedValue { $0 }
            guard !trusted.contains(next) else { return }
            var vouched: WorkSigning.PublicKey?
            for key in trusted where (try? key.verifyRotation(to: next, signature: Array(welcome.rotationSignature))) != nil { vouched = key }
            guard let vouched else {
                throw WorkSigningError("key \(next.id) is not vouched for by any trusted key (\(trusted.map(\.id).joined(separator: ", ")))")
            }
            self.trusted.withLockedValue { $0.append(next) }
            self.logger.notice("key rotation: now trusting \(next.id), vouched for by \(vouched.id)")
        } catch {
            self.logger.warning("key rotation refused", metadata: ["error": "\(error.message)"])
        }
    }

    /// Jobs run and jobs refused so far.
    public var ran: (ran: Int, refused: Int) { self.counts.withLockedValue { $0 } }

    /// Jobs handed back to the master at shutdown.
    public var handedBackJobs: [UInt64] { self.handedBack.withLockedValue { $0 } }

    /// Stops taking jobs, stops the running ones and hands them back to the master (which
    /// queues them again without counting the attempt); `run()` then returns.
    public func shutDown() {
        self.stopping.withLockedValue { $0 = true }
        self.commands?.interruptAll(reason: "the worker is shutting down")
        for pid in self.running.withLockedValue({ Array($0.values) }) { JobRunner.killGroup(pid) }
    }

    private var isStopping: Bool { self.stopping.withLockedValue { $0 } }

    /// Says hello, then runs `slots` loops that ask for a job, run it and report it, until the
    /// task is cancelled or the connection ends.
    public func run() async throws {
        try await self.hello(over: try await self.link.client())
        try await withThrowingTaskGroup(of: Void.self) { group in
            for slot in 0..<self.configuration.slots {
                group.addTask { try await self.slotLoop(slot) }
            }
            try await group.waitForAll()
        }
    }

    /// The slots the master's preferences leave this worker, and how long to wait after no work.
    var preferred: (slots: Int, idle: Duration) {
        let p = self.preferences.withLockedValue { $0 }
        return (p.maxSlots > 0 ? min(self.configuration.slots, Int(p.maxSlots)) : self.configuration.slots,
                p.idleMilliseconds > 0 ? .milliseconds(Int64(p.idleMilliseconds)) : self.configuration.idleDelay)
    }

    private func slotLoop(_ slot: Int) async throws {
        while !Task.isCancelled, !self.isStopping {
            // A slot beyond what the master prefers stays idle (until another master says otherwise).
            guard slot < self.preferred.slots else {
                try? await Task.sleep(for: self.preferred.idle)
                continue
            }
            var request = Parley_Work_V1_RequestWork()
            request.worker = self.configuration.name
            request.slots = 1
            request.apps = self.configuration.apps
            let assignments: Parley_Work_V1_WorkAssignments
            let askedAt: ContinuousClock.Instant
            do {
                // When it went to the master that answered (not to one that failed over).
                (assignments, askedAt) = try await self.link.timedRequest(request, as: Parley_Work_V1_WorkAssignments.self)
            } catch let error as ParleyError where Self.isLasting(error) {
                throw error
            } catch {
                // A session reset (the master restarted), a busy store: ask again shortly. A
                // lease in a reply that was lost expires on the master.
                self.logger.warning("asking for work failed; trying again", metadata: ["error": "\(error)"])
                try? await Task.sleep(for: self.preferred.idle)
                continue
            }
            guard let assignment = assignments.assignments.first else {
                try? await Task.sleep(for: self.preferred.idle)
                continue
            }
            let (report, handBack) = await self.execute(assignment, askedAt: askedAt)
            if handBack {
                // Not run, or stopped by this worker's shutdown: not a failure of the job.
                var back = Parley_Work_V1_HandBack()
                back.worker = self.configuration.name
                back.jobID = assignment.jobID
                back.leaseID = assignment.leaseID
                do {
                    _ = try await self.link.request(back, as: Parley_Work_V1_HandBackReply.self)
                    self.handedBack.withLockedValue { $0.append(assignment.jobID) }
                    self.logger.info("handed back", metadata: ["job": "\(assignment.jobID)"])
                } catch {
                    self.logger.warning("handing back failed; the lease will expire", metadata: ["job": "\(assignment.jobID)", "error": "\(error)"])
                }
                continue
            }
            // The report goes through whatever happens to the connection (idempotent over a
            // lossless session); only the session's end stops it.
            // A refusal is final; a store error on the master (a failed transaction) is not:
            // the report is sent again, with back-off, rather than lost.
            var delay = Duration.milliseconds(500)
            for attempt in 1...12 {
                do {
                    let ack = try await self.link.request(report, as: Parley_Work_V1_ReportAck.self)
                    self.logger.debug("reported", metadata: ["job": "\(assignment.jobID)", "verdict": "\(ack.verdict)"])
                    break
                } catch let error as ParleyError where Self.isLasting(error) {
                    throw error
                } catch let error as ParleyError where [.invalidArgument, .malformedPayload].contains(error.code) || attempt == 12 {
                    self.logger.warning("report refused", metadata: ["job": "\(assignment.jobID)", "error": "\(error)"])
                    break
                } catch {
                    self.logger.warning("report failed; sending it again", metadata: ["job": "\(assignment.jobID)", "error": "\(error)", "attempt": "\(attempt)"])
                    try? await Task.sleep(for: delay)
                    delay = min(delay * 2, .seconds(5))
                }
            }
        }
    }

    /// Keeps a running job's lease: renews it every third of the lease time, and stops the
    /// job (setting `lost`) when the master refuses a renewal or when the lease would end
    /// within 5 s (a quarter of the lease, if shorter) without one. The lease is counted on
    /// this worker's monotonic clock from `askedAt` (`WorkerLease`), not from the master's
    /// wall-clock deadline, so that clocks set apart change nothing.
    func keepLease(_ assignment: Parley_Work_V1_Assignment, askedAt: ContinuousClock.Instant, lost: NIOLockedValueBox<String?>) -> Task<Void, Never> {
        let clock = ContinuousClock()
        let origin = clock.now
        let nanos: @Sendable (ContinuousClock.Instant) -> Int64 = { ($0 - origin).nanoseconds }
        // The master's lease time from its welcome; a master that did not say (0): what is
        // left of the deadline by this worker's wall clock, as before.
        let told = self.leaseTime.withLockedValue { $0 }
        let leftMs = assignment.deadlineUnixMs.subtractingReportingOverflow(Int64(Date().timeIntervalSince1970 * 1000)).partialValue
        // (As before the lease was counted here: at least 3 s when the master did not say.)
        let leaseTime = told > 0 ? told : max(3_000, min(leftMs, Int64.max / 2_000_000)) * 1_000_000
        let lease = NIOLockedValueBox(WorkerLease(leaseTime: leaseTime, askedAt: nanos(askedAt)))
        let (interval, margin) = lease.withLockedValue { ($0.renewalInterval, $0.margin) }
        let stop: @Sendable (String) -> Void = { why in
            let first = lost.withLockedValue { state -> Bool in
                guard state == nil else { return false }
                state = why
                return true
            }
            guard first, let pid = self.running.withLockedValue({ $0[assignment.jobID] }) else { return }
            self.logger.warning("job stopped: \(why)", metadata: ["job": "\(assignment.jobID)"])
            JobRunner.killGroup(pid)
        }
        return Task {
            await withTaskGroup(of: Void.self) { group in
                group.addTask {
                    while !Task.isCancelled {
                        try? await Task.sleep(for: .nanoseconds(interval))
                        if Task.isCancelled { return }
                        var renew = Parley_Work_V1_RenewLease()
                        renew.worker = self.configuration.name
                        renew.jobID = assignment.jobID
                        renew.leaseID = assignment.leaseID
                        let sent = nanos(clock.now)
                        do {
                            _ = try await self.link.request(renew, as: Parley_Work_V1_LeaseRenewed.self)
                            // The lease time of the master connected now (after a failover,
                            // maybe another than the one that granted the lease).
                            let current = self.leaseTime.withLockedValue { $0 }
                            lease.withLockedValue { $0.renewed(sentAt: sent, leaseTime: current > 0 ? current : leaseTime) }
                        } catch let error as ParleyError where error.code == .invalidArgument {
                            stop("the master refused to renew the lease (\(error.message))")
                            return
                        } catch {
                            // A cut, a master gone: the link tries others; the watch below
                            // stops the job if the lease runs out meanwhile.
                        }
                    }
                }
                group.addTask {
                    while !Task.isCancelled {
                        if lease.withLockedValue({ $0.mustStop(now: nanos(clock.now)) }) {
                            stop("its lease ends within \(margin / 1_000_000) ms and could not be renewed")
                            return
                        }
                        try? await Task.sleep(for: .milliseconds(250))
                    }
                }
                await group.waitForAll()
            }
        }
    }

    /// Says hello to a master: the version is agreed and a key rotation considered.
    func hello(over client: ParleyClient) async throws {
        var hello = Parley_Work_V1_WorkerHello()
        hello.worker = self.configuration.name
        hello.platform = ParleyBuild.platform
        hello.cpus = UInt32(ProcessInfo.processInfo.activeProcessorCount)
        hello.memoryBytes = ProcessInfo.processInfo.physicalMemory
        hello.slots = UInt32(self.configuration.slots)
        hello.protocolVersion = WorkService.protocolVersions.upperBound
        hello.os = ProcessInfo.processInfo.operatingSystemVersionString
        hello.apps = self.configuration.apps
        hello.commands = self.commands?.configuration.accept ?? false
        if let free = (try? FileManager.default.attributesOfFileSystem(forPath: self.configuration.directory))?[.systemFreeSize] as? NSNumber {
            hello.diskBytes = free.uint64Value
        }
        let welcome = try await client.request(hello, as: Parley_Work_V1_WorkerWelcome.self, idempotent: true)
        // A master from before versions were negotiated answers 0, which means 1.
        let version = max(1, welcome.protocolVersion)
        guard WorkService.protocolVersions.contains(version) else {
            throw ParleyError(code: .unsupportedVersion, message: "the master chose work protocol version \(version); this worker speaks \(WorkService.protocolVersions)")
        }
        self.consider(rotation: welcome)
        self.preferences.withLockedValue { $0 = welcome.preferences }
        self.leaseTime.withLockedValue { $0 = Int64(welcome.leaseSeconds) * 1_000_000_000 }
        self.logger.info("working for \(welcome.master)", metadata: ["slots": "\(self.preferred.slots)", "lease": "\(welcome.leaseSeconds) s", "version": "\(version)"])
    }

    /// Errors that end the worker: the connection (and its session) is gone for good.
    static func isLasting(_ error: ParleyError) -> Bool {
        [.connectionClosed, .shuttingDown, .authenticationFailed, .permissionDenied, .clientOutOfDate].contains(error.code)
    }

    /// Verifies and runs one assignment; returns its report (never throws: every failure is
    /// a report).
    /// Returns the report, and whether to hand the job back instead (this worker is shutting
    /// down and did not run it, or killed it).
    /// `askedAt`: when the request that brought the assignment was sent (its lease started later).
    func execute(_ assignment: Parley_Work_V1_Assignment, askedAt: ContinuousClock.Instant) async -> (Parley_Work_V1_ReportResult, handBack: Bool) {
        var report = Parley_Work_V1_ReportResult()
        report.worker = self.configuration.name
        report.jobID = assignment.jobID
        report.leaseID = assignment.leaseID
        do {
            try WorkSigning.verify(job: Array(assignment.job.spec), signature: Array(assignment.job.signature), byAnyOf: self.trustedKeys)
        } catch {
            self.counts.withLockedValue { $0.refused += 1 }
            self.logger.warning("job refused: bad signature, not run", metadata: ["job": "\(assignment.jobID)", "error": "\(error.message)"])
            report.errorKind = .signature
            report.message = error.message
            return (report, false)
        }
        guard let spec = try? Parley_Work_V1_JobSpec(serializedBytes: assignment.job.spec), !spec.argv.isEmpty else {
            report.errorKind = .spec
            report.message = "the job's spec does not decode or names no program"
            return (report, false)
        }
        if !spec.app.isEmpty, !self.configuration.apps.contains(spec.app) {
            report.errorKind = .spec
            report.message = "the job needs application \(spec.app), which this worker does not run: not run"
            return (report, false)
        }
        if (spec.maxCpuSeconds > 0 || spec.maxMemoryBytes > 0), self.configuration.limiter == nil {
            report.errorKind = .compute
            report.message = "the job asks for CPU or memory limits, which this worker cannot apply: not run"
            return (report, false)
        }
        if self.isStopping { return (report, true) }
        self.counts.withLockedValue { $0.ran += 1 }
        let directory = "\(self.configuration.directory)/job-\(assignment.jobID)-\(assignment.leaseID)"
        let started = ContinuousClock.now
        let killedByShutdown = NIOLockedValueBox(false)
        let leaseLost = NIOLockedValueBox<String?>(nil)
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            defer {
                // Everything the report needs has been read from it by now.
                if !self.configuration.keepJobDirectories {
                    do {
                        try FileManager.default.removeItem(atPath: directory)
                    } catch {
                        self.logger.warning("a job's directory could not be removed", metadata: ["job": "\(assignment.jobID)", "directory": "\(directory)", "error": "\(error)"])
                    }
                }
            }
            // The lease is renewed from here, while inputs are fetched (which can take longer
            // than a lease) and while the job runs; a job whose lease cannot be kept is never
            // started, or stopped 5 s before it ends: another worker would get it meanwhile.
            let keeper = assignment.deadlineUnixMs > 0 ? self.keepLease(assignment, askedAt: askedAt, lost: leaseLost) : nil
            defer { keeper?.cancel() }
            // Fetched in a task of their own, stopped when the lease is lost meanwhile (a
            // server trickling an input would hold the worker's slot for ever).
            let fetching = Task { () async throws -> Void in try await WorkFiles.writeInputs(spec.inputs, into: directory) }
            let watch = Task {
                while !Task.isCancelled {
                    if leaseLost.withLockedValue({ $0 }) != nil { fetching.cancel(); return }
                    try? await Task.sleep(for: .milliseconds(250))
                }
            }
            defer { watch.cancel() }
            do {
                try await fetching.value
            } catch where leaseLost.withLockedValue({ $0 }) == nil {
                let message = (error as? WorkFiles.FileError)?.message ?? "\(error)"
                self.logger.warning("job not run: an input failed", metadata: ["job": "\(assignment.jobID)", "error": "\(message)"])
                report.errorKind = .download
                report.message = message
                return (report, false)
            } catch {
                // The lease was lost while the inputs came: reported below.
            }
            if let why = leaseLost.withLockedValue({ $0 }) {
                report.errorKind = .compute
                report.message = "not run: \(why)"
                return (report, false)
            }
            let jobID = assignment.jobID
            defer { self.running.withLockedValue { _ = $0.removeValue(forKey: jobID) } }
            let wall = spec.maxWallSeconds > 0 ? Duration.seconds(Int64(spec.maxWallSeconds)) : self.configuration.defaultMaxWall
            let outcome = try await JobRunner.run(
                spec, directory: directory, limiter: self.configuration.limiter,
                maxWall: wall,
                maxOutput: WorkService.tailLimit(spec, fallback: UInt64(max(0, self.configuration.defaultMaxOutput))),
                started: { pid in
                    let stopping = self.stopping.withLockedValue { stopping in
                        if !stopping { self.running.withLockedValue { $0[jobID] = pid } }
                        return stopping
                    }
                    if stopping {
                        killedByShutdown.withLockedValue { $0 = true }
                        JobRunner.killGroup(pid)
                    } else if leaseLost.withLockedValue({ $0 }) != nil {
                        // Lost between the check above and the start, when the keeper found no
                        // process to stop (it reads `running` after setting `lost`; this reads
                        // `lost` after setting `running`: one of the two sees the other).
                        JobRunner.killGroup(pid)
                    }
                }
            )
            if self.isStopping, outcome.signal == SIGKILL, !outcome.timedOut {
                // Killed by this worker's shutdown, not ended on its own: hand it back. A job
                // that finished (even during the shutdown) is reported.
                killedByShutdown.withLockedValue { $0 = true }
            }
            report.exitStatus = outcome.exitStatus
            report.signal = outcome.signal
            report.cpuMs = outcome.cpuMs
            report.stdoutTail = Data(outcome.stdout)
            report.stderrTail = Data(outcome.stderr)
            if let why = leaseLost.withLockedValue({ $0 }) {
                report.errorKind = .compute
                report.message = "stopped: \(why)"
            } else if outcome.timedOut {
                report.errorKind = .compute
                report.message = "wall-time limit reached: killed"
            } else if outcome.exitStatus == 0, outcome.signal == 0, !spec.outputs.isEmpty {
                do {
                    report.outputs = try WorkFiles.readOutputs(spec.outputs, from: directory)
                    Self.fitTails(&report)
                } catch {
                    report.errorKind = .upload
                    report.message = error.message
                }
            }
        } catch {
            report.errorKind = .compute
            report.message = "\(error)"
        }
        let elapsed = ContinuousClock.now - started
        report.wallMs = elapsed.wholeMilliseconds
        return (report, killedByShutdown.withLockedValue { $0 })
    }
}

extension WorkWorker {
    /// Outputs (at most 16 MiB together) and tails (at most 1 MiB each) in one report must
    /// fit one frame (16 MiB + 64 KiB by default), or no report could ever be sent: the
    /// tails give way (each keeps its end), the outputs being the job's product.
    static func fitTails(_ report: inout Parley_Work_V1_ReportResult) {
        // Each output also carries its name, size and SHA-256 (some 50 bytes of protobuf).
        let outputs = report.outputs.reduce(0) { $0 + $1.content.count + $1.name.utf8.count + 64 }
        let room = max(0, WorkFiles.maxOutputBytes + (32 << 10) - outputs)
        guard report.stdoutTail.count + report.stderrTail.count > room else { return }
        // Each tail gets half the room, and what the other leaves of its half.
        let stderr = min(report.stderrTail.count, max(room / 2, room - report.stdoutTail.count))
        let stdout = min(report.stdoutTail.count, room - stderr)
        report.stdoutTail = Data(report.stdoutTail.suffix(stdout))
        report.stderrTail = Data(report.stderrTail.suffix(stderr))
    }
}

/// Runs a job's program as a child process: no shell unless the spec asks for one, only the
/// spec's environment, in its directory, killed at its wall-time limit; keeps the last
/// `maxOutput` bytes of each output stream.
enum JobRunner {
    struct Outcome {
        var exitStatus: Int32
        var signal: Int32
        var timedOut: Bool
        var stdout: [UInt8]
        var stderr: [UInt8]
        var cpuMs: UInt64 = 0
    }

    static func run(
        _ spec: Parley_Work_V1_JobSpec, directory: String, limiter: [String]? = nil, maxWall: Duration, maxOutput: Int,
        onOutput: (@Sendable (_ stderr: Bool, Data) -> Void)? = nil, started: @Sendable (Int32) -> Void = { _ in }
    ) async throws -> Outcome {
        var command: [String]
        if spec.shell {
            command = ["/bin/sh", "-c", spec.argv.joined(separator: " ")]
        } else {
            let program = spec.argv[0]
            command = [program.hasPrefix("/") ? program : try Self.find(program, in: spec.env["PATH"])] + spec.argv.dropFirst()
        }
        if spec.maxCpuSeconds > 0 || spec.maxMemoryBytes > 0, let limiter, !limiter.isEmpty {
            command = limiter + ["--cpu", "\(spec.maxCpuSeconds)", "--memory", "\(spec.maxMemoryBytes)", "--"] + command
        }
        let child = try ChildProcess.spawn(arguments: command, environment: spec.env, directory: directory)
        let stdout = OutputTail(limit: maxOutput), stderr = OutputTail(limit: maxOutput)
        // Each output stream is read to its end by a thread of its own, with blocking reads:
        // FileHandle's readabilityHandler (a dispatch source) crashed a worker in libdispatch
        // once in 10,000 jobs when its pipe closed while the source was being cancelled.
        let abandon = NIOLockedValueBox(false)
        let outRead = Self.readToEnd(FileHandle(fileDescriptor: child.stdout, closeOnDealloc: true), into: stdout, abandon: abandon) { onOutput?(false, $0) }
        let errRead = Self.readToEnd(FileHandle(fileDescriptor: child.stderr, closeOnDealloc: true), into: stderr, abandon: abandon) { onOutput?(true, $0) }
        started(child.pid)
        let timedOut = NIOLockedValueBox(false)
        let ended = NIOLockedValueBox(false)
        let killer = Task {
            try await Task.sleep(for: maxWall)
            // Not reaped before `ended` is set: the pid is still the child's.
            if !ended.withLockedValue({ $0 }) {
                timedOut.withLockedValue { $0 = true }
                Self.killGroup(child.pid)
            }
        }
        await child.waitForEnd()
        ended.withLockedValue { $0 = true }
        killer.cancel()
        // The job ends with its program: what it left running in the background goes too
        // (it could otherwise change the outputs while they are read, or outlive the lease).
        // The child is not reaped yet, so its group id is still its own.
        Self.killGroup(child.pid)
        let (exitStatus, signal, cpuMs) = child.reap()
        // With the whole group gone, nothing holds the pipes open and both reach their end,
        // unless a process that left the group (setsid) holds them: what it writes within
        // 2 s is kept, then the pipes are given up (the job has ended).
        let giveUp = Task {
            try await Task.sleep(for: .seconds(2))
            abandon.withLockedValue { $0 = true }
        }
        await outRead.value
        await errRead.value
        giveUp.cancel()
        return Outcome(exitStatus: exitStatus, signal: signal, timedOut: timedOut.withLockedValue { $0 }, stdout: stdout.bytes, stderr: stderr.bytes, cpuMs: cpuMs)
    }

    /// Stops at the end of the stream, or once `abandon` is set and nothing more comes.
    static func readToEnd(
        _ handle: FileHandle, into tail: OutputTail, abandon: NIOLockedValueBox<Bool> = NIOLockedValueBox(false),
        each: @escaping @Sendable (Data) -> Void = { _ in }
    ) -> Task<Void, Never> {
        let done = NIOLockedValueBox<(finished: Bool, waiter: CheckedContinuation<Void, Never>?)>((false, nil))
        let thread = Thread {
            // read(2) returns what the pipe holds as soon as it holds something (FileHandle's
            // read(upToCount:) would wait for the whole count: no streaming); poll(2) first,
            // so that the thread can look at `abandon` every 100 ms.
            let fd = handle.fileDescriptor
            var buffer = [UInt8](repeating: 0, count: 64 << 10)
            while true {
                var ready = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                let polled = poll(&ready, 1, 100)
                if polled < 0, errno == EINTR { continue }
                if polled == 0 {
                    if abandon.withLockedValue({ $0 }) { break }
                    continue
                }
                let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
                if n < 0, errno == EINTR { continue }
                guard n > 0 else { break }
                let data = Data(buffer[0..<n])
                tail.append(data)
                each(data)
            }
            let waiter = done.withLockedValue { state -> CheckedContinuation<Void, Never>? in
                state.finished = true
                defer { state.waiter = nil }
                return state.waiter
            }
            waiter?.resume()
        }
        thread.start()
        return Task {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let finished = done.withLockedValue { state -> Bool in
                    if state.finished { return true }
                    state.waiter = c
                    return false
                }
                if finished { c.resume() }
            }
        }
    }

    /// Kills a job's child and everything it started: each child is the leader of its own
    /// process group (ChildProcess).
    static func killGroup(_ pid: Int32) {
        kill(-pid, SIGKILL)
        kill(pid, SIGKILL)
    }

    static func find(_ program: String, in path: String?) throws -> String {
        for dir in (path ?? "/usr/local/bin:/usr/bin:/bin").split(separator: ":") {
            let candidate = "\(dir)/\(program)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        throw ParleyError(code: .invalidArgument, message: "program \(program) not found")
    }
}

/// The last `limit` bytes written to a stream.
final class OutputTail: Sendable {
    private let box: NIOLockedValueBox<[UInt8]>
    let limit: Int

    init(limit: Int) {
        self.limit = limit
        self.box = NIOLockedValueBox([])
    }

    func append(_ data: Data) {
        guard !data.isEmpty else { return }
        self.box.withLockedValue { b in
            b.append(contentsOf: data.suffix(self.limit))
            // Trimmed once it holds twice the limit: amortised, not a move of the whole
            // buffer for every chunk.
            if b.count > 2 * self.limit { b.removeFirst(b.count - self.limit) }
        }
    }

    var bytes: [UInt8] { self.box.withLockedValue { Array($0.suffix(self.limit)) } }
}
