import Crypto
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Parley
import ParleyWork
import ServiceLifecycle
import SwiftProtobuf
#if canImport(Glibc)
import CoreFoundation
import Glibc
#endif

/// Parley Work's Buildbot front end (issue 12, docs/buildbot.md): unmodified
/// `buildbot-worker`s (`--protocol=msgpack_experimental_v7`) connect over WebSocket, log in
/// with HTTP Basic authentication against the keyring (name: the entity, password: its key as
/// the keyring file shows it), and then
/// - run the store's jobs, as native workers do: each job claimed under a lease, its inputs
///   sent with `download_file`, its command run with `shell` (output streamed, kept as the
///   report's tails), its outputs fetched with `upload_file`, the report through the same
///   lease rules (exactly once);
/// - run the master's commands (`parley work command ... --worker NAME`, §19.8), translated
///   to Buildbot's: shell, upload, download, mkdir, rmdir, rmfile, stat, glob, listdir, cpdir,
///   with interrupts.
public final class BuildbotFrontEnd: Service, Sendable {
    public struct Configuration: Sendable {
        public var host: String
        public var port: Int
        /// The keyring whose entities may log in (read at every login: a revoked or expired
        /// entity is refused at once).
        public var keyringPath: String
        /// Whether an entity needs `work.worker` (or `work.*`) to log in.
        public var requireCapabilities = false
        /// The applications Buildbot workers run (JobSpec.app): they get those jobs and the
        /// jobs that need none.
        public var apps: [String] = ["buildbot"]
        public var leaseDuration: Duration = .seconds(600)
        var leaseNanoseconds: Int64 { Int64(self.leaseDuration.components.seconds) * 1_000_000_000 }
        /// When set, a job's signature is checked again before a worker gets it.
        public var trust: WorkSigning.PublicKey?
        /// A `keepalive` request this often; no answer within `keepaliveTimeout` closes the
        /// connection (the stock master waits an hour and never times out).
        public var keepaliveInterval: Duration = .seconds(30)
        public var keepaliveTimeout: Duration = .seconds(30)
        /// How long a worker with no job waits before asking the store again: this at first,
        /// doubling while the queue stays empty, up to `maxIdlePoll`.
        public var idlePoll: Duration = .milliseconds(250)
        public var maxIdlePoll: Duration = .seconds(4)
        /// Bytes kept of each of stdout and stderr when the job does not say.
        public var defaultMaxOutputBytes: UInt64 = 1 << 20
        /// Largest output file fetched from a worker.
        public var maxOutputFileBytes: UInt64 = 256 << 20
        /// How long past a job's `max_wall_seconds` (3600 when it says none) the master waits
        /// for the worker to end the job's command before it interrupts it, and as long again
        /// before it fails the job and closes the worker's connection. The worker enforces
        /// the limit itself (`maxTime`); this is for one that does not (the stock master
        /// waits for ever).
        public var commandGrace: Duration = .seconds(60)
        /// How many times a job whose worker goes away while it runs is handed back without
        /// the attempt counting (a worker restarted, a link lost); past it, each such loss
        /// counts as a failed attempt, so that a job that kills its worker (or the machine)
        /// cannot go from worker to worker for ever. Counted per master process.
        public var uncountedLosses = 2
        public var listener: BuildbotListener.Configuration

        public init(host: String, port: Int, keyringPath: String) {
            self.host = host
            self.port = port
            self.keyringPath = keyringPath
            self.listener = BuildbotListener.Configuration(host: host, port: port)
        }
    }

    public let configuration: Configuration
    let store: any WorkStore
    let commands: WorkCommandCenter?
    let logger: Logger
    let onListening: @Sendable (Int) -> Void
    private let sessions = NIOLockedValueBox<[String: BuildbotWorkerSession]>([:])
    /// Times each job's worker went away while it ran (since this master started), and
    /// whether the master is shutting down (then a job is always handed back uncounted).
    private let losses = NIOLockedValueBox<(byJob: [UInt64: Int], shuttingDown: Bool)>(([:], false))
    /// Jobs whose losses are remembered, at most (the oldest entries go first past it).
    static let maxRememberedLosses = 10_000

    /// A job's worker went away while it ran: how many times now (0 while shutting down).
    func workerWentAway(job: UInt64) -> Int {
        self.losses.withLockedValue { l in
            guard !l.shuttingDown else { return 0 }
            if l.byJob[job] == nil, l.byJob.count >= Self.maxRememberedLosses, let any = l.byJob.keys.min() {
                l.byJob[any] = nil  // job ids grow: the smallest is the oldest job
            }
            let n = (l.byJob[job] ?? 0) + 1
            l.byJob[job] = n
            return n
        }
    }

    /// A job was reported by its worker (done, whatever the outcome): its losses are forgotten.
    func forgetLosses(job: UInt64) {
        self.losses.withLockedValue { _ = $0.byJob.removeValue(forKey: job) }
    }

    public init(
        configuration: Configuration, store: any WorkStore, commands: WorkCommandCenter?, logger: Logger,
        onListening: @escaping @Sendable (Int) -> Void = { _ in }
    ) {
        self.configuration = configuration
        self.store = store
        self.commands = commands
        self.logger = logger
        self.onListening = onListening
    }

    /// Judges a worker's name and password against the keyring.
    public static func authenticate(name: String, password: String, keyringPath: String, requireCapabilities: Bool, now: Date = Date()) -> BuildbotAuthentication {
        let keyring: ParleyKeyring
        do {
            keyring = try ParleyKeyring.load(path: keyringPath)
        } catch {
            return .refused("the master cannot read its keyring: \(error.message)")
        }
        // One answer for every refusal of a name and password: no telling which was wrong.
        let refusal = BuildbotAuthentication.refused("unknown worker name or wrong password")
        guard let entity = keyring.entity(named: name), entity.keyMatches(password) else { return refusal }
        if let why = entity.refusal(needing: requireCapabilities ? "work.worker" : nil, now: now) { return .refused("worker \(name) \(why)") }
        return .accepted(name)
    }

    /// Why a logged-in worker may no longer work (its entity revoked, expired, removed or
    /// stripped of work.worker since), or nil.
    public static func withdrawn(name: String, keyringPath: String, requireCapabilities: Bool, now: Date = Date()) -> String? {
        guard let keyring = try? ParleyKeyring.load(path: keyringPath) else { return nil }  // unreadable now: judged at the next login
        guard let entity = keyring.entity(named: name) else { return "worker \(name) was removed from the keyring" }
        return entity.refusal(needing: requireCapabilities ? "work.worker" : nil, now: now).map { "worker \(name) \($0)" }
    }

    public func run() async throws {
        let configuration = self.configuration
        let listener = try await BuildbotListener.bind(
            configuration.listener, logger: self.logger,
            authenticate: { name, password in
                Self.authenticate(name: name, password: password, keyringPath: configuration.keyringPath, requireCapabilities: configuration.requireCapabilities)
            },
            onConnection: { [self] connection in self.accept(connection) }
        )
        self.logger.info("buildbot front end listening", metadata: ["address": "ws://\(configuration.host):\(listener.port)/"])
        self.onListening(listener.port)
        // Until a graceful shutdown (SIGTERM, SIGINT) or the task's cancellation.
        try? await gracefulShutdown()
        self.losses.withLockedValue { $0.shuttingDown = true }
        await listener.close()
        let sessions = self.sessions.withLockedValue { Array($0.values) }
        await withTaskGroup(of: Void.self) { group in
            for session in sessions { group.addTask { await session.stop(reason: "the master is shutting down") } }
        }
    }

    /// A worker logged in: a duplicate login replaces the old connection (a worker that lost
    /// its link without the master noticing comes back under the same name).
    private func accept(_ connection: BuildbotConnection) {
        let session = BuildbotWorkerSession(connection: connection, frontEnd: self)
        let old = self.sessions.withLockedValue { sessions -> BuildbotWorkerSession? in
            defer { sessions[connection.worker] = session }
            return sessions[connection.worker]
        }
        self.logger.info("buildbot worker connected", metadata: ["worker": "\(connection.worker)", "from": "\(connection.remoteAddress)"])
        Task {
            if let old { await old.stop(reason: "worker \(connection.worker) logged in again") }
            await session.run()
            self.sessions.withLockedValue { sessions in
                if sessions[connection.worker] === session { sessions[connection.worker] = nil }
            }
            self.logger.info("buildbot worker disconnected", metadata: ["worker": "\(connection.worker)", "reason": "\(connection.closeReason ?? "?")"])
        }
    }

    /// The workers connected now.
    public var connectedWorkers: [String] { self.sessions.withLockedValue { $0.keys.sorted() } }
}

/// One logged-in worker: the connect sequence, its job loop, keepalives, and the master's
/// commands for it (`WorkCommandLink`).
final class BuildbotWorkerSession: WorkCommandLink, Sendable {
    let connection: BuildbotConnection
    let frontEnd: BuildbotFrontEnd
    var worker: String { self.connection.worker }
    var logger: Logger { self.frontEnd.logger }

    private struct State {
        var basedir = ""
        /// Parley command id → Buildbot command id, and whether it was interrupted.
        var relayed: [UInt64: (id: String, interrupted: Bool)] = [:]
        /// The master ended the session (`stop`: the worker logged in again, its entity was
        /// withdrawn, the master shuts down): a job it ran is not the job's loss.
        var stoppedByMaster = false
        /// ... and the commands it interrupted, which were running then.
        var interruptedByMaster: Set<String> = []
        /// The Buildbot id of the last command the job in hand started (`startForJob`; its
        /// steps run one after another, and the first to fail ends it): the job's failure is
        /// the master's interruption's only if this one was interrupted, not a relayed
        /// command beside it, nor a step that completed before the one that failed.
        var lastJobCommand: String?
    }
    private let state = NIOLockedValueBox(State())

    init(connection: BuildbotConnection, frontEnd: BuildbotFrontEnd) {
        self.connection = connection
        self.frontEnd = frontEnd
    }

    var basedir: String { self.state.withLockedValue { $0.basedir } }
    /// Where the master's commands act, as `--command-dir` does for native workers.
    var commandDirectory: String { self.basedir + "/commands" }

    func run() async {
        let configuration = self.frontEnd.configuration
        do {
            // What the real master does on every connect.
            try await self.connection.call("print", [("message", "attached")])
            let info = try await self.connection.call("get_worker_info")
            guard let basedir = info["basedir"]?.stringValue, basedir.hasPrefix("/") else {
                throw BuildbotProtocolError("get_worker_info: no absolute basedir in \(info)")
            }
            self.state.withLockedValue { $0.basedir = basedir }
            try await self.connection.call("set_worker_settings", [("args", .object([
                "newline_re": .string(#"(\r\n|\r(?=.)|\033\[u|\033\[[0-9]+;[0-9]+[Hf]|\033\[2J|\x08+)"#),
                "max_line_length": 4096, "buffer_timeout": 1, "buffer_size": 65536,
            ]))])
            try await self.simple("mkdir", .object(["paths": .array([.string(basedir + "/jobs"), .string(self.commandDirectory)]), "logEnviron": false]),
                                  deadline: configuration.listener.callTimeout)
            try await self.connection.call("print", [("message", "attached")])
            var hello = Parley_Work_V1_WorkerHello()
            hello.worker = self.worker
            hello.platform = "buildbot-worker \(info["version"]?.stringValue ?? "?")"
            hello.os = info["os_pretty_name"]?.stringValue ?? info["system"]?.stringValue ?? ""
            hello.cpus = UInt32(clamping: info["numcpus"]?.intValue ?? 0)
            hello.slots = 1
            hello.apps = configuration.apps
            hello.commands = true
            self.frontEnd.commands?.attach(hello, link: self)
            defer { self.frontEnd.commands?.detach(self.worker, link: self) }
            await withTaskGroup(of: Void.self) { group in
                group.addTask { await self.keepalives() }
                group.addTask { await self.jobs() }
                await self.connection.closed()
                group.cancelAll()
            }
        } catch {
            self.logger.warning("buildbot worker session ended", metadata: ["worker": "\(self.worker)", "error": "\(error)"])
            self.connection.close(reason: "\(error)")
        }
    }

    /// Interrupts what the worker runs for us, then closes (a restarting master leaves no
    /// command running unwatched on its workers).
    func stop(reason: String, shutdown: Bool = false) async {
        // Every command of the connection: the master's and those of a job.
        let running = self.connection.runningCommands.filter { self.connection.isRunning($0) }
        self.state.withLockedValue { s in
            s.stoppedByMaster = true
            // A second stop (shutdown while a re-login's waits) adds to the first's.
            s.interruptedByMaster.formUnion(running)
        }
        for id in running {
            try? await self.connection.interrupt(id, why: reason)
        }
        // What the worker sent before its answers (a command's `complete`, a job's failing
        // step) is still served after the close, before `closed()` returns (see `finish`).
        // The worker exits 0.2 s after its answer.
        if shutdown { _ = try? await self.connection.call("shutdown") }
        self.connection.close(reason: reason)
    }

    /// A keepalive every interval; before each, the keyring is read again: a worker whose
    /// entity was revoked (expired, removed) gets `shutdown`, so that it stops instead of
    /// logging in again and again with a key that no longer works.
    private func keepalives() async {
        let configuration = self.frontEnd.configuration
        while !Task.isCancelled {
            do {
                try await Task.sleep(for: configuration.keepaliveInterval)
                if let why = BuildbotFrontEnd.withdrawn(name: self.worker, keyringPath: configuration.keyringPath, requireCapabilities: configuration.requireCapabilities) {
                    self.logger.notice("buildbot worker told to shut down", metadata: ["worker": "\(self.worker)", "reason": "\(why)"])
                    await self.stop(reason: why, shutdown: true)
                    return
                }
                try await self.connection.call("keepalive")
            } catch {
                // Ended with the session (cancelled), or a keepalive failed: unanswered
                // within the call timeout, or answered with an exception. A link whose
                // keepalive fails is dropped: going on without keepalives would also end the
                // keyring check above, and a revoked worker would keep taking jobs.
                if Task.isCancelled || self.connection.closeReason != nil { return }
                self.logger.warning("buildbot worker dropped: its keepalive failed", metadata: ["worker": "\(self.worker)", "error": "\(error)"])
                self.connection.close(reason: "keepalive failed: \(error)")
                return
            }
        }
    }

    /// A command with no output to keep: fails with the worker's failure text or a non-zero rc.
    /// Returns what `BuildbotKeptUpdates` keeps of its updates. With a `deadline`, a command
    /// the worker has not completed by then is interrupted and `BuildbotStepOverdue` thrown
    /// (a worker that answers keepalives but never completes a step would otherwise hold
    /// its job, whose lease is renewed meanwhile, for ever).
    /// `forJob`: a step of the job in hand (`startForJob`).
    @discardableResult
    func simple(_ name: String, _ args: MessagePack, transfer: (any BuildbotTransfer)? = nil, deadline: Duration? = nil, forJob: Bool = false) async throws -> [BuildbotUpdate] {
        let (id, events) = forJob
            ? try await self.startForJob(name, args: args, transfer: transfer)
            : try await self.connection.start(name, args: args, transfer: transfer)
        @Sendable func collect() async throws -> BuildbotKeptUpdates {
            var kept = BuildbotKeptUpdates()
            var completed = false
            for try await event in events {
                switch event {
                case .updates(let u): kept.add(u)
                case .complete(let failure?): throw BuildbotRemoteError(message: "\(name): \(failure)")
                case .complete(nil): completed = true
                }
            }
            // Events that end without `complete` were cut short (the task cancelled): not a success.
            guard completed else { throw CancellationError() }
            return kept
        }
        enum Outcome: Sendable { case kept(BuildbotKeptUpdates), due, cancelled }
        let kept: BuildbotKeptUpdates
        if let deadline {
            let first = try await withThrowingTaskGroup(of: Outcome.self) { group -> BuildbotKeptUpdates? in
                group.addTask { .kept(try await collect()) }
                group.addTask {
                    // Cancelled (the step completed, or the session ended): the reader decides,
                    // as a `complete` served before the session's end is the step's.
                    do { try await Task.sleep(for: deadline) } catch { return .cancelled }
                    return .due
                }
                defer { group.cancelAll() }
                while let next = try await group.next() {
                    switch next {
                    case .kept(let kept): return kept
                    case .due: return nil
                    case .cancelled: continue
                    }
                }
                throw CancellationError()  // not reached: the reader returns or throws
            }
            guard let first else {
                try? await self.connection.interrupt(id, why: "not completed within \(deadline)")
                throw BuildbotStepOverdue(message: "the worker did not complete \(name) within \(deadline)")
            }
            kept = first
        } else {
            kept = try await collect()
        }
        let updates = kept.updates
        for case .rc(let rc) in updates where rc != 0 {
            throw BuildbotRemoteError(message: "\(name) failed (rc \(rc))\(Self.reason(updates).map { ": \($0)" } ?? "")")
        }
        return updates
    }

    /// Starts a command as a step of the job in hand: if the master's `stop` interrupts it,
    /// the job's failure is the interruption's, and the job is handed back.
    func startForJob(_ name: String, args: MessagePack, transfer: (any BuildbotTransfer)? = nil) async throws -> (id: String, events: AsyncThrowingStream<BuildbotCommandEvent, any Error>) {
        let started = try await self.connection.start(name, args: args, transfer: transfer)
        self.state.withLockedValue { $0.lastJobCommand = started.id }
        return started
    }

    static func reason(_ updates: [BuildbotUpdate]) -> String? {
        for case .failureReason(let r) in updates { return r }
        let stderr = updates.compactMap { if case .stderr(let e) = $0 { return e } else { return nil } }.joined()
        if !stderr.isEmpty { return stderr.trimmingCharacters(in: .whitespacesAndNewlines) }
        let header = updates.compactMap { if case .header(let h) = $0 { return h } else { return nil } }.joined()
        return header.isEmpty ? nil : header.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    // MARK: Jobs from the store

    private func jobs() async {
        let configuration = self.frontEnd.configuration
        let store = self.frontEnd.store
        let leaseNanoseconds = configuration.leaseNanoseconds
        var idle = configuration.idlePoll
        while !Task.isCancelled, self.connection.closeReason == nil {
            let claimed: [ClaimedJob]
            do {
                claimed = try await store.claim(worker: self.worker, limit: 1, apps: configuration.apps, now: WorkService.now(), leaseDuration: leaseNanoseconds)
            } catch {
                self.logger.warning("cannot claim jobs", metadata: ["worker": "\(self.worker)", "error": "\(error)"])
                try? await Task.sleep(for: .seconds(1))
                continue
            }
            guard let job = claimed.first else {
                try? await Task.sleep(for: idle)
                idle = min(idle * 2, configuration.maxIdlePoll)
                continue
            }
            idle = configuration.idlePoll
            await self.execute(job)
        }
    }

    /// Runs one job on the worker and reports it; a job whose worker went away is handed
    /// back (queued again, the attempt not counted), the first `uncountedLosses` times.
    private func execute(_ job: ClaimedJob) async {
        let store = self.frontEnd.store
        let leaseNanoseconds = self.frontEnd.configuration.leaseNanoseconds
        let renewal = Task {
            while !Task.isCancelled {
                try? await Task.sleep(nanoseconds: UInt64(max(leaseNanoseconds / 3, 1_000_000_000)))
                if Task.isCancelled { return }
                _ = try? await store.renew(jobID: job.id, leaseID: job.lease.id, worker: self.worker, now: WorkService.now(), leaseDuration: leaseNanoseconds)
            }
        }
        defer { renewal.cancel() }
        self.state.withLockedValue { $0.lastJobCommand = nil }
        let result: Parley_Work_V1_ReportResult
        let overdue: Bool
        do {
            (result, overdue) = try await BuildbotJob(session: self, job: job).run()
        } catch {
            // In a task of its own: the session's tasks are cancelled when its connection ends,
            // and a cancelled store call would leave the job leased until its lease expires.
            let worker = self.worker
            // Counted only when the worker went away on its own, not when the master ended
            // the session (a duplicate login of a worker whose link was lost, a withdrawn
            // entity, shutdown).
            let losses = self.state.withLockedValue { $0.stoppedByMaster } ? 0 : self.frontEnd.workerWentAway(job: job.id)
            if losses > self.frontEnd.configuration.uncountedLosses {
                var result = Parley_Work_V1_ReportResult()
                result.worker = worker
                result.jobID = job.id
                result.leaseID = job.lease.id
                result.errorKind = .compute
                result.message = "worker \(worker) went away while the job ran (\(losses) times on this master): counted as a failed attempt (\(error))"
                let report = LeaseReport(leaseID: job.lease.id, worker: worker, outcome: .failure(result.message))
                do {
                    let bytes: [UInt8] = try result.serializedBytes()
                    // The count stays: each further loss counts too.
                    let verdict = try await Task { try await store.report(jobID: job.id, report, result: bytes, now: WorkService.now()) }.value
                    self.logger.notice("job failed: its worker went away again", metadata: ["worker": "\(worker)", "job": "\(job.id)", "losses": "\(losses)", "verdict": "\(verdict)"])
                } catch let refusal {
                    self.logger.warning("cannot report a job", metadata: ["worker": "\(worker)", "job": "\(job.id)", "error": "\(refusal)"])
                }
                return
            }
            await self.handBack(job, "job handed back: the worker went away", ["losses": "\(losses)", "error": "\(error)"])
            return
        }
        let outcome: LeaseReport.Outcome = result.errorKind == .none && result.exitStatus == 0 && result.signal == 0
            ? .success : .failure(result.message.isEmpty ? "exit status \(result.exitStatus)" : result.message)
        let interrupted = self.state.withLockedValue { s in s.lastJobCommand.map(s.interruptedByMaster.contains) ?? false }
        if case .failure = outcome, interrupted {
            // The master ended the session (a duplicate login, a withdrawn entity, shutdown)
            // and interrupted the job's command, which the worker then ended: not the job's
            // failure. Handed back, uncounted; a job that succeeded meanwhile is reported.
            await self.handBack(job, "job handed back: the master ended its worker's session while it ran")
            return
        }
        do {
            let bytes: [UInt8] = try result.serializedBytes()
            let report = LeaseReport(leaseID: job.lease.id, worker: self.worker, outcome: outcome)
            // Not cancelled with the session (see the hand-back above).
            let verdict = try await Task { try await store.report(jobID: job.id, report, result: bytes, now: WorkService.now()) }.value
            self.frontEnd.forgetLosses(job: job.id)
            self.logger.info("job reported", metadata: ["worker": "\(self.worker)", "job": "\(job.id)", "verdict": "\(verdict)"])
        } catch {
            self.logger.warning("cannot report a job", metadata: ["worker": "\(self.worker)", "job": "\(job.id)", "error": "\(error)"])
        }
        if overdue {
            // Its command still runs, or the worker no longer answers for it: no more jobs.
            self.logger.warning("buildbot worker dropped: a job's command outlived its deadline", metadata: ["worker": "\(self.worker)", "job": "\(job.id)"])
            self.connection.close(reason: "job \(job.id)'s command outlived its deadline")
        }
    }

    /// Queues `job` again, its attempt not counted, logging `why`. In a task of its own: the
    /// session's tasks are cancelled when its connection ends, and a cancelled store call
    /// would leave the job leased until its lease expires.
    private func handBack(_ job: ClaimedJob, _ why: Logger.Message, _ metadata: Logger.Metadata = [:]) async {
        let (store, worker) = (self.frontEnd.store, self.worker)
        do {
            try await Task { try await store.handBack(jobID: job.id, leaseID: job.lease.id, worker: worker) }.value
            self.logger.notice(why, metadata: metadata.merging(["worker": "\(worker)", "job": "\(job.id)"]) { $1 })
        } catch let refusal {
            self.logger.warning("cannot hand a job back", metadata: ["worker": "\(worker)", "job": "\(job.id)", "lease": "\(job.lease.id)", "error": "\(refusal)"])
        }
    }

    // MARK: The master's commands (WorkCommandLink)

    func run(_ command: Parley_Work_V1_Command, transfer: (any WorkTransfer)?) async throws -> AsyncThrowingStream<WorkCommandCenter.Event, any Error> {
        let translated = try BuildbotCommands.translate(command, root: self.commandDirectory)
        var adapter: BuildbotTransferAdapter?
        if let transfer, translated.direction != .none {
            adapter = BuildbotTransferAdapter(command: command.commandID, transfer: transfer, limit: translated.limit)
        }
        let started = ContinuousClock.now
        let (id, events) = try await self.connection.start(translated.name, args: translated.args, transfer: adapter)
        self.state.withLockedValue { $0.relayed[command.commandID] = (id, false) }
        let (stream, continuation) = AsyncThrowingStream<WorkCommandCenter.Event, any Error>.makeStream()
        let parleyID = command.commandID
        let root = self.commandDirectory
        let forward = Task {
            defer { _ = self.state.withLockedValue { $0.relayed.removeValue(forKey: parleyID) } }
            // The output goes on as it comes; only what the result needs is kept.
            var kept = BuildbotKeptUpdates()
            do {
                for try await event in events {
                    switch event {
                    case .updates(let updates):
                        kept.add(updates)
                        for update in BuildbotCommands.updates(parleyID, updates) { continuation.yield(.update(update)) }
                    case .complete(let failure):
                        let interrupted = self.state.withLockedValue { $0.relayed[parleyID]?.interrupted ?? false }
                        var result = BuildbotCommands.result(parleyID, kept.updates, failure: failure, interrupted: interrupted, root: root, kind: command.kind)
                        result.elapsedMs = (ContinuousClock.now - started).wholeMilliseconds
                        if let adapter {
                            let (size, digest) = adapter.moved
                            result.size = size
                            result.sha256 = Data(digest)
                            if let modified = adapter.modified {
                                result.stat.exists = true
                                result.stat.kind = "file"
                                result.stat.size = size
                                result.stat.mtimeUnixMs = Int64(saturating: modified * 1000)
                            }
                            if result.error.isEmpty, let problem = adapter.check(command) {
                                result.error = problem
                                result.exitStatus = 1
                            }
                        }
                        continuation.yield(.result(result))
                    }
                }
                continuation.finish()
            } catch let error as BuildbotConnectionError {
                // The worker went away: whoever waits for the command is told at once (the
                // stock master leaves its step waiting).
                continuation.finish(throwing: ParleyError(code: .connectionClosed, message: "worker \(error.worker) went away before command \(parleyID) ended: \(error.reason)"))
            } catch {
                continuation.finish(throwing: error)
            }
        }
        continuation.onTermination = { reason in
            forward.cancel()
            if case .cancelled = reason, self.connection.isRunning(id) {
                Task { try? await self.connection.interrupt(id, why: "cancelled by the master") }
            }
        }
        return stream
    }

    func interrupt(_ commandID: UInt64, signal: Int32, reason: String) async throws -> Bool {
        guard let id = self.state.withLockedValue({ $0.relayed[commandID]?.id }), self.connection.isRunning(id) else { return false }
        self.state.withLockedValue { $0.relayed[commandID]?.interrupted = true }
        try await self.connection.interrupt(id, why: reason.isEmpty ? "interrupted by the master" : reason)
        return true
    }
}

/// Adapts a Parley transfer (offsets, ByteBuffers) to Buildbot's chunk requests, counting
/// and hashing what moves and holding it to the command's limit.
final class BuildbotTransferAdapter: BuildbotTransfer {
    private struct State {
        var offset: UInt64 = 0
        var hash = SHA256()
        var eof = false
        var modified: Double?
    }
    let command: UInt64
    let transfer: any WorkTransfer
    let limit: UInt64
    private let state = NIOLockedValueBox(State())

    init(command: UInt64, transfer: any WorkTransfer, limit: UInt64) {
        self.command = command
        self.transfer = transfer
        self.limit = limit
    }

    var moved: (UInt64, [UInt8]) { self.state.withLockedValue { ($0.offset, Array($0.hash.finalize())) } }
    /// An upload's modification time, from `update_upload_file_utime`.
    var modified: Double? { self.state.withLockedValue { $0.modified } }

    /// A download's promised size and SHA-256, checked once it is complete.
    func check(_ command: Parley_Work_V1_Command) -> String? {
        guard case .download(let download)? = command.kind else { return nil }
        let (size, digest) = self.moved
        if download.size > 0, download.size != size { return "downloaded \(size) bytes where \(download.size) were promised" }
        if !download.sha256.isEmpty, Data(digest) != download.sha256 { return "the downloaded bytes do not match the promised SHA-256" }
        return nil
    }

    func write(_ bytes: [UInt8]) async throws {
        let offset = try self.state.withLockedValue { state -> Result<UInt64, BuildbotProtocolError> in
            guard UInt64(bytes.count) <= self.limit - min(state.offset, self.limit) else {
                return .failure(BuildbotProtocolError("the upload is over its limit of \(self.limit) bytes"))
            }
            return .success(state.offset)
        }.get()
        try await self.transfer.write(command: self.command, offset: offset, ByteBuffer(bytes: bytes))
        self.state.withLockedValue { state in
            state.offset += UInt64(bytes.count)
            state.hash.update(data: bytes)
        }
    }

    func closeWrite() async throws {}

    /// Refuses times that are no times (NaN, an infinity, milliseconds beyond Int64): the
    /// worker's upload then fails with that error.
    func setTimes(access: Double, modified: Double) async throws {
        for (name, time) in [("access", access), ("modification", modified)] where Int64(ifRepresentable: time * 1000) == nil {
            throw BuildbotProtocolError("update_upload_file_utime: the \(name) time \(time) is not a time in seconds since 1970")
        }
        self.state.withLockedValue { $0.modified = modified }
        if let timed = self.transfer as? any BuildbotTimestampedTransfer {
            try await timed.setTimes(command: self.command, access: access, modified: modified)
        }
    }

    func read(length: Int) async throws -> [UInt8] {
        let (offset, eof) = self.state.withLockedValue { ($0.offset, $0.eof) }
        if eof || length == 0 { return [] }
        let room = self.limit - min(offset, self.limit)
        // One byte past the room, to see a download over its limit; room + 1 overflows when
        // the limit is UInt64.max, and is only needed when the room is below the length.
        let ask = room < UInt64(length) ? room + 1 : UInt64(length)
        let (data, end) = try await self.transfer.read(command: self.command, offset: offset, length: Int(ask))
        let bytes = Array(data.readableBytesView)
        guard UInt64(bytes.count) <= room else { throw BuildbotProtocolError("the download is over its limit of \(self.limit) bytes") }
        self.state.withLockedValue { state in
            state.offset += UInt64(bytes.count)
            state.hash.update(data: bytes)
            state.eof = end
        }
        return bytes
    }

    func closeRead() async throws {}
}

/// A transfer that can also set the file's times (Buildbot's `keepstamp`).
public protocol BuildbotTimestampedTransfer: WorkTransfer {
    func setTimes(command: UInt64, access: Double, modified: Double) async throws
}

extension WorkFileTransfer: BuildbotTimestampedTransfer {
    /// An upload's file keeps the worker's access and modification times (seconds since 1970;
    /// NaN, an infinity or a time beyond time_t is refused).
    public func setTimes(command: UInt64, access: Double, modified: Double) async throws {
        func time(_ seconds: Double) throws(WorkFiles.FileError) -> timespec {
            let whole = seconds.rounded(.down)
            guard let tvSec = Int64(ifRepresentable: whole).flatMap({ Int(exactly: $0) }) else {
                throw WorkFiles.FileError("cannot set the times of \(self.path): \(seconds) is not a time in seconds since 1970")
            }
            return timespec(tv_sec: tvSec, tv_nsec: min(999_999_999, Int((seconds - whole) * 1e9)))
        }
        var times = try [time(access), time(modified)]
        guard utimensat(AT_FDCWD, self.path, &times, 0) == 0 else {
            throw WorkFiles.FileError("cannot set the times of \(self.path): \(String(cString: strerror(errno)))")
        }
    }
}
