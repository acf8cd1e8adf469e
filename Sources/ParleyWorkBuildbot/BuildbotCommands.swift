import Crypto
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import ParleyWork
import SwiftProtobuf

/// Parley Work's commands (§19.8) in Buildbot's terms, and back: pure translation.
enum BuildbotCommands {
    enum Direction { case upload, download, none }

    struct Translated {
        var name: String
        var args: MessagePack
        var direction: Direction = .none
        var limit: UInt64 = .max
    }

    /// Signal names Buildbot's `interruptSignal` takes (Python's `signal.SIG<NAME>`).
    static let signalNames: [Int32: String] = [1: "HUP", 2: "INT", 3: "QUIT", 9: "KILL", 10: "USR1", 12: "USR2", 15: "TERM"]

    /// `root/path`, after the lexical rule of command paths (relative, no "..").
    static func path(_ path: String, root: String, directoryItself: Bool = false) throws(WorkFiles.FileError) -> String {
        try CommandPaths.check(path, directoryItself: directoryItself)
        return path.isEmpty || path == "." ? root : root + "/" + path
    }

    static func shellArgs(argv: [String], shell: Bool, workdir: String, env: [String: String], timeout: UInt32, maxTime: UInt32, interruptSignal: Int32, logfiles: [String: String] = [:]) -> MessagePack {
        let command: MessagePack = shell ? .string(argv.joined(separator: " ")) : .array(argv.map { .string($0) })
        return .object([
            "workdir": .string(workdir),
            "command": command,
            "env": .map(env.sorted { $0.key < $1.key }.map { (.string($0.key), .string($0.value)) }),
            "want_stdout": true, "want_stderr": true,
            // Relative to workdir, as Buildbot's worker takes them.
            "logfiles": .map(logfiles.sorted { $0.key < $1.key }.map { (.string($0.key), .string($0.value)) }),
            "timeout": timeout > 0 ? .int(Int64(timeout)) : .nil,
            "maxTime": .int(Int64(maxTime > 0 ? maxTime : 3600)),
            "usePTY": false, "logEnviron": false,
            "interruptSignal": .string(Self.signalNames[interruptSignal] ?? "KILL"),
        ])
    }

    static func translate(_ command: Parley_Work_V1_Command, root: String) throws(WorkFiles.FileError) -> Translated {
        switch command.kind {
        case .shell(let shell)?:
            guard !shell.argv.isEmpty else { throw WorkFiles.FileError("the shell command has no argv") }
            return Translated(name: "shell", args: Self.shellArgs(
                argv: shell.argv, shell: shell.shell, workdir: try Self.path(shell.workdir, root: root, directoryItself: true), env: shell.env,
                timeout: shell.timeoutSeconds, maxTime: shell.maxTimeSeconds, interruptSignal: shell.interruptSignal,
                logfiles: try Self.logfiles(shell.logfiles)
            ))
        case .upload(let upload)?:
            let limit = upload.maxSize > 0 ? upload.maxSize : 1 << 30
            return Translated(name: "upload_file", args: .object([
                "path": .string(try Self.path(upload.path, root: root)), "workdir": .string(root), "workersrc": .string(upload.path),
                // Held to MessagePack's Int64: the adapter holds the command to `limit` itself.
                "maxsize": .int(Int64(clamping: limit)), "blocksize": .int(Int64(upload.chunkSize > 0 ? min(upload.chunkSize, 1 << 20) : 64 << 10)),
                "keepstamp": true,
            ]), direction: .upload, limit: limit)
        case .uploadDirectory(let upload)?:
            let limit = upload.maxSize > 0 ? upload.maxSize : 1 << 30
            return Translated(name: "upload_directory", args: .object([
                "path": .string(try Self.path(upload.path, root: root, directoryItself: true)), "workdir": .string(root), "workersrc": .string(upload.path),
                "maxsize": .int(Int64(clamping: limit)), "blocksize": .int(Int64(upload.chunkSize > 0 ? min(upload.chunkSize, 1 << 20) : 64 << 10)),
                "compress": .nil,
            ]), direction: .upload, limit: limit)
        case .download(let download)?:
            let limit = download.maxSize > 0 ? download.maxSize : 1 << 30
            return Translated(name: "download_file", args: .object([
                // The limit is held here (the adapter); the worker fails a file that reaches its
                // maxsize exactly.
                "path": .string(try Self.path(download.path, root: root)), "maxsize": .nil,
                "blocksize": .int(Int64(download.chunkSize > 0 ? min(download.chunkSize, 1 << 20) : 64 << 10)),
                "mode": .int(Int64(download.mode > 0 ? download.mode & 0o7777 : 0o644)),
            ]), direction: .download, limit: limit)
        case .mkdir(let paths)?, .rmdir(let paths)?:
            guard !paths.paths.isEmpty else { throw WorkFiles.FileError("no paths") }
            var absolute: [MessagePack] = []
            for p in paths.paths { absolute.append(.string(try Self.path(p, root: root))) }
            if case .mkdir? = command.kind { return Translated(name: "mkdir", args: .object(["paths": .array(absolute)])) }
            return Translated(name: "rmdir", args: .object(["paths": .array(absolute)]))
        case .rmfile(let paths)?:
            // Buildbot's rmfile takes one path: several are refused rather than half done.
            guard paths.paths.count == 1 else { throw WorkFiles.FileError("a Buildbot worker removes one file per command (\(paths.paths.count) given)") }
            return Translated(name: "rmfile", args: .object(["path": .string(try Self.path(paths.paths[0], root: root))]))
        case .stat(let p)?:
            return Translated(name: "stat", args: .object(["path": .string(try Self.path(p.path, root: root, directoryItself: true))]))
        case .glob(let p)?:
            return Translated(name: "glob", args: .object(["path": .string(try Self.path(p.path, root: root))]))
        case .listdir(let p)?:
            return Translated(name: "listdir", args: .object(["path": .string(try Self.path(p.path, root: root, directoryItself: true))]))
        case .cpdir(let copy)?:
            return Translated(name: "cpdir", args: .object([
                "from_path": .string(try Self.path(copy.from, root: root)), "to_path": .string(try Self.path(copy.to, root: root)), "logEnviron": false,
            ]))
        case nil:
            throw WorkFiles.FileError("the command has no kind")
        }
    }

    /// A shell command's log files, each path under the rule of command paths.
    static func logfiles(_ logfiles: [String: String]) throws(WorkFiles.FileError) -> [String: String] {
        for (name, path) in logfiles {
            guard !name.isEmpty, !["stdio", "header"].contains(name) else { throw WorkFiles.FileError("a log file cannot be named '\(name)'") }
            try CommandPaths.check(path)
        }
        return logfiles
    }

    /// The updates of one `update` message as CommandUpdates: the output and header in one, then
    /// one per log file's new text (nil and empty when there is nothing).
    static func updates(_ id: UInt64, _ updates: [BuildbotUpdate]) -> [Parley_Work_V1_CommandUpdate] {
        var out: [Parley_Work_V1_CommandUpdate] = []
        if let output = Self.update(id, updates) { out.append(output) }
        for case .log(let name, let text) in updates {
            var log = Parley_Work_V1_CommandUpdate()
            log.commandID = id
            log.logName = name
            log.log = Data(text.utf8)
            out.append(log)
        }
        return out
    }

    /// The output in one `update` as a CommandUpdate (nil when it holds none).
    static func update(_ id: UInt64, _ updates: [BuildbotUpdate]) -> Parley_Work_V1_CommandUpdate? {
        var update = Parley_Work_V1_CommandUpdate()
        update.commandID = id
        var stdout = Data(), stderr = Data()
        for u in updates {
            switch u {
            case .stdout(let t): stdout.append(contentsOf: Array(t.utf8))
            case .stderr(let t): stderr.append(contentsOf: Array(t.utf8))
            case .header(let t): update.header += t
            default: break
            }
        }
        update.stdout = stdout
        update.stderr = stderr
        return stdout.isEmpty && stderr.isEmpty && update.header.isEmpty ? nil : update
    }

    /// The signal a worker reports in its header ("process killed by signal 9").
    static func signal(in updates: [BuildbotUpdate]) -> Int32? {
        for case .header(let text) in updates {
            guard let range = text.range(of: "killed by signal ") else { continue }
            let digits = text[range.upperBound...].prefix { $0.isNumber }
            if let n = Int32(digits) { return n }
        }
        return nil
    }

    static func header(_ updates: [BuildbotUpdate]) -> String {
        updates.compactMap { if case .header(let h) = $0 { return h } else { return nil } }.joined()
    }

    /// A command's end as a CommandResult.
    static func result(_ id: UInt64, _ updates: [BuildbotUpdate], failure: String?, interrupted: Bool, root: String, kind: Parley_Work_V1_Command.OneOf_Kind?) -> Parley_Work_V1_CommandResult {
        var result = Parley_Work_V1_CommandResult()
        result.commandID = id
        result.interrupted = interrupted
        var rc: Int64?
        for case .rc(let r) in updates { rc = r }
        let header = Self.header(updates)
        result.timedOut = header.contains("command timed out")
        if case .shell? = kind {
            if let signal = Self.signal(in: updates) {
                result.signal = signal
                result.exitStatus = -1
            } else {
                result.exitStatus = Int32(clamping: rc ?? -1)
            }
        } else if let rc, rc != 0 {
            if case .stat? = kind {
                result.stat.exists = false
                result.exitStatus = 1
                result.error = "the path does not exist"
            } else {
                result.exitStatus = 1
                result.error = BuildbotWorkerSession.reason(updates) ?? "rc \(rc)"
            }
        }
        if let failure {
            result.error = failure
            if result.exitStatus == 0 { result.exitStatus = 1 }
        }
        for u in updates {
            switch u {
            case .stat(let values) where values.count >= 9:
                let mode = values[0]
                result.stat.exists = true
                switch mode & 0o170000 {
                case 0o100000: result.stat.kind = "file"
                case 0o040000: result.stat.kind = "directory"
                case 0o120000: result.stat.kind = "symlink"
                default: result.stat.kind = "other"
                }
                result.stat.mode = UInt32(mode & 0o7777)
                result.stat.size = UInt64(max(values[6], 0))
                // Seconds to milliseconds, held to Int64's range (a worker's time can be anything).
                let (ms, overflow) = values[8].multipliedReportingOverflow(by: 1000)
                result.stat.mtimeUnixMs = overflow ? (values[8] < 0 ? .min : .max) : ms
            case .files(let files):
                let prefix = root + "/"
                result.paths = files.map { $0.hasPrefix(prefix) ? String($0.dropFirst(prefix.count)) : $0 }.sorted()
            default: break
            }
        }
        return result
    }
}

/// Bytes held in memory as one end of a Buildbot transfer: a job's input going to the worker,
/// or its output coming back (at most `limit` bytes).
final class BuildbotMemoryTransfer: BuildbotTransfer {
    private struct State {
        var data: [UInt8]
        var position = 0
        var closed = false
    }
    private let state: NIOLockedValueBox<State>
    let limit: Int

    init(sending data: [UInt8] = [], limit: Int = .max) {
        self.state = NIOLockedValueBox(State(data: data))
        self.limit = limit
    }

    var bytes: [UInt8] { self.state.withLockedValue { $0.data } }
    var closed: Bool { self.state.withLockedValue { $0.closed } }

    func write(_ bytes: [UInt8]) async throws {
        try self.state.withLockedValue { state -> Result<Void, BuildbotProtocolError> in
            guard bytes.count <= self.limit - state.data.count else { return .failure(BuildbotProtocolError("the file is over its limit of \(self.limit) bytes")) }
            state.data += bytes
            return .success(())
        }.get()
    }

    func closeWrite() async throws { self.state.withLockedValue { $0.closed = true } }
    func setTimes(access: Double, modified: Double) async throws {}

    func read(length: Int) async throws -> [UInt8] {
        self.state.withLockedValue { state in
            let end = min(state.data.count, state.position + length)
            defer { state.position = end }
            return Array(state.data[state.position..<end])
        }
    }

    func closeRead() async throws { self.state.withLockedValue { $0.closed = true } }
}

/// One job of the store, run on a Buildbot worker: inputs down, the command, outputs up.
struct BuildbotJob {
    let session: BuildbotWorkerSession
    let job: ClaimedJob

    /// The report, and whether the job's command outlived its deadline (`max_wall_seconds`
    /// and the master's grace, then the grace again or the connection's end: the worker is
    /// then dropped); throws only when the worker went away before that deadline (the job
    /// is then handed back).
    func run() async throws -> (Parley_Work_V1_ReportResult, overdue: Bool) {
        var overdue = false
        let report = try await self.report(overdue: &overdue)
        return (report, overdue)
    }

    /// The report; sets `overdue` when the command outlived its deadline.
    private func report(overdue: inout Bool) async throws -> Parley_Work_V1_ReportResult {
        let configuration = self.session.frontEnd.configuration
        let started = ContinuousClock.now
        var result = Parley_Work_V1_ReportResult()
        result.worker = self.session.worker
        result.jobID = self.job.id
        result.leaseID = self.job.lease.id
        func refuse(_ kind: Parley_Work_V1_ErrorKind, _ message: String) -> Parley_Work_V1_ReportResult {
            var r = result
            r.errorKind = kind
            r.message = message
            r.wallMs = (ContinuousClock.now - started).wholeMilliseconds
            return r
        }
        if let trust = configuration.trust {
            do { try trust.verify(job: self.job.spec, signature: self.job.signature) } catch {
                return refuse(.signature, "the job's signature does not verify: \(error.message)")
            }
        }
        let spec: Parley_Work_V1_JobSpec
        do {
            spec = try Parley_Work_V1_JobSpec(serializedBytes: self.job.spec)
            try WorkFiles.check(spec: spec)
        } catch {
            return refuse(.spec, "the job's spec cannot run: \(error)")
        }
        guard !spec.argv.isEmpty else { return refuse(.spec, "the job's spec has no argv") }
        if !spec.app.isEmpty, !configuration.apps.contains(spec.app) { return refuse(.spec, "this worker does not run the application \(spec.app)") }
        if spec.maxCpuSeconds > 0 || spec.maxMemoryBytes > 0 {
            return refuse(.spec, "a Buildbot worker cannot hold a job to CPU or memory limits (max_cpu_seconds, max_memory_bytes)")
        }
        let directory = "\(self.session.basedir)/jobs/\(self.job.id)-\(self.job.lease.id)"
        // Each step the worker must complete in time: the call timeout, and for a transfer
        // as long again as its bytes take at 256 KiB/s.
        let step = configuration.listener.callTimeout
        func transferring(_ bytes: UInt64) -> Duration { step + .seconds(Int64(clamping: bytes / (256 << 10))) }
        do {
            try await self.session.simple("mkdir", .object(["paths": .array([.string(directory)]), "logEnviron": false]), deadline: step, forJob: true)
            defer {
                Task { [session] in _ = try? await session.simple("rmdir", .object(["paths": .array([.string(directory)]), "logEnviron": false]), deadline: step) }
            }
            for input in spec.inputs {
                guard !input.content.isEmpty || input.size == 0 else {
                    return refuse(.download, "the input '\(input.name)' is a URL, which this master does not fetch for Buildbot workers: put the content in the job")
                }
                let source = BuildbotMemoryTransfer(sending: Array(input.content))
                do {
                    try await self.session.simple("download_file", .object([
                        // No maxsize: the worker fails a file that reaches it exactly; the bytes are ours.
                        "path": .string(directory + "/" + input.name), "maxsize": .nil, "blocksize": .int(64 << 10), "mode": .int(0o644),
                    ]), transfer: source, deadline: transferring(UInt64(input.content.count)), forJob: true)
                } catch let error as BuildbotRemoteError {
                    return refuse(.download, "the input '\(input.name)' could not be written: \(error.message)")
                }
            }
            let keep = WorkService.tailLimit(spec, fallback: configuration.defaultMaxOutputBytes)
            let wall = spec.maxWallSeconds > 0 ? spec.maxWallSeconds : 3600
            let args = BuildbotCommands.shellArgs(
                argv: spec.argv, shell: spec.shell, workdir: directory, env: spec.env, timeout: 0, maxTime: wall, interruptSignal: 9
            )
            let (commandID, events) = try await self.session.startForJob("shell", args: args)
            let grace = configuration.commandGrace
            let watched = try await Self.watch(events, keep: keep, deadline: .seconds(Int64(wall)) + grace, grace: grace, interrupt: { [session] in
                try? await session.connection.interrupt(commandID, why: "over max_wall_seconds (\(wall) s) and the master's grace: the master's deadline")
            })
            let late = "the worker did not end the command within max_wall_seconds (\(wall) s) and the master's grace (\(grace)); "
            let ended: EndedCommand
            switch watched {
            case .ended(let e): ended = e
            case .outlived:
                overdue = true
                return refuse(.compute, late + "interrupted, it did not end within \(grace) more: the job failed and the worker was dropped")
            case .lostAfterDeadline:
                overdue = true
                return refuse(.compute, late + "its connection ended after the interrupt was due, the command not ended: the job failed")
            }
            result.stdoutTail = Data(ended.stdout.bytes)
            result.stderrTail = Data(ended.stderr.bytes)
            let updates = ended.kept.updates
            var rc: Int64?
            for case .rc(let r) in updates { rc = r }
            if let failure = ended.failure {
                return refuse(.compute, "the worker could not run the job: \(failure)").merging(tails: result)
            }
            if let signal = BuildbotCommands.signal(in: updates) {
                result.signal = signal
                result.errorKind = .compute
                result.message = "killed by signal \(signal)" + (BuildbotCommands.header(updates).contains("timed out") ? " (over max_wall_seconds)" : "")
            } else if rc == nil {
                return refuse(.compute, "the worker sent no exit status").merging(tails: result)
            } else {
                result.exitStatus = Int32(clamping: rc!)
            }
            if result.errorKind == .none, result.exitStatus == 0 {
                // The outputs together are held to what a native worker's report may carry
                // (WorkFiles.maxOutputBytes), each also to `maxOutputFileBytes`: every one is
                // kept in memory until the report is stored.
                var left = UInt64(WorkFiles.maxOutputBytes)
                for name in spec.outputs {
                    let limit = min(configuration.maxOutputFileBytes, left)
                    let sink = BuildbotMemoryTransfer(limit: Int(clamping: limit))
                    do {
                        try await self.session.simple("upload_file", .object([
                            "path": .string(directory + "/" + name), "workdir": .string(directory), "workersrc": .string(name),
                            "maxsize": .int(Int64(clamping: limit)), "blocksize": .int(256 << 10), "keepstamp": false,
                        ]), transfer: sink, deadline: transferring(limit), forJob: true)
                    } catch let error as BuildbotRemoteError {
                        result.errorKind = .upload
                        result.message = "the output '\(name)' could not be fetched: \(error.message)"
                        result.outputs = []
                        break
                    }
                    let bytes = sink.bytes
                    left -= min(left, UInt64(bytes.count))
                    var output = Parley_Work_V1_OutputFile()
                    output.name = name
                    output.content = Data(bytes)
                    output.size = UInt64(bytes.count)
                    output.sha256 = Data(SHA256.hash(data: bytes))
                    result.outputs.append(output)
                }
            }
        } catch let error as BuildbotRemoteError {
            return refuse(.compute, error.message)
        } catch let error as BuildbotStepOverdue {
            // The step may still run there: the job fails (an attempt counted) and the
            // worker is dropped, as for a command past its deadline.
            overdue = true
            return refuse(.compute, error.message + ": the job failed and the worker was dropped")
        } catch let error as WorkFiles.FileError {
            return refuse(.spec, error.message)
        }
        result.wallMs = (ContinuousClock.now - started).wholeMilliseconds
        return result
    }
}

/// What a job's command left once it ended.
struct EndedCommand: Sendable {
    var stdout: Tail
    var stderr: Tail
    var kept = BuildbotKeptUpdates()
    var failure: String?
}

extension BuildbotJob {
    /// How watching a command ended.
    enum Watched: Sendable {
        /// The worker ended it (or its events ended before the deadline).
        case ended(EndedCommand)
        /// It did not end by the deadline and the grace after the interrupt.
        case outlived
        /// The connection ended after the deadline (the interrupt due), the command not ended:
        /// a worker that leaves the interrupt unanswered is closed at the call timeout.
        case lostAfterDeadline
    }

    /// Reads a command's events until it ends, for at most `deadline`; past it calls
    /// `interrupt` (not awaited: it waits for the worker's answer, up to the call timeout)
    /// and waits `grace` more. Throws when the connection ends before the deadline (the job
    /// is then handed back). A command whose `complete` came is ended, whatever follows.
    static func watch(
        _ events: AsyncThrowingStream<BuildbotCommandEvent, any Error>, keep: Int, deadline: Duration, grace: Duration,
        interrupt: @escaping @Sendable () async -> Void
    ) async throws -> Watched {
        let flags = NIOLockedValueBox((due: false, completed: false))
        return try await withThrowingTaskGroup(of: Watched?.self) { group in
            group.addTask {
                var ended = EndedCommand(stdout: Tail(limit: keep), stderr: Tail(limit: keep))
                var cutShort: (any Error)?
                do {
                    for try await event in events {
                        switch event {
                        case .updates(let u):
                            ended.kept.add(u)
                            for case .stdout(let t) in u { ended.stdout.append(t) }
                            for case .stderr(let t) in u { ended.stderr.append(t) }
                        case .complete(let f):
                            ended.failure = f
                            flags.withLockedValue { $0.completed = true }
                        }
                    }
                } catch {
                    cutShort = error
                }
                // The events ended: completed, or cut short (by the connection, or cancelled).
                let (due, completed) = flags.withLockedValue { ($0.due, $0.completed) }
                if completed { return .ended(ended) }
                if due { return .lostAfterDeadline }
                if let cutShort { throw cutShort }
                try Task.checkCancellation()
                return .ended(ended)
            }
            group.addTask {
                // Cancelled (the command ended, or the connection did): the reader decides.
                do { try await Task.sleep(for: deadline) } catch { return nil }
                flags.withLockedValue { $0.due = true }
                Task { await interrupt() }
                try? await Task.sleep(for: grace)
                if Task.isCancelled || flags.withLockedValue({ $0.completed }) { return nil }
                return .outlived
            }
            defer { group.cancelAll() }
            while let next = try await group.next() {
                if let outcome = next { return outcome }
            }
            return .outlived  // not reached: the reader returns or throws
        }
    }
}

extension Parley_Work_V1_ReportResult {
    fileprivate func merging(tails other: Parley_Work_V1_ReportResult) -> Parley_Work_V1_ReportResult {
        var r = self
        r.stdoutTail = other.stdoutTail
        r.stderrTail = other.stderrTail
        return r
    }
}

/// What a command's updates leave to read once it ends, in place of every update: a command
/// that prints without end (`yes`), or a worker that sends updates without end, would
/// otherwise fill the master's memory. Kept: the last rc, the first failure reason, the last
/// stat and file list, and the last `textLimit` bytes of the header and of stderr (where
/// `signal(in:)`, `header(_:)` and `reason(_:)` look); stdout, logs and the rest are not
/// (whoever needs them takes them as they come).
struct BuildbotKeptUpdates: Sendable {
    static let textLimit = 64 << 10

    private var rc: Int64?
    private var failureReason: String?
    private var stat: [Int64]?
    private var files: [String]?
    private var header = Tail(limit: BuildbotKeptUpdates.textLimit)
    private var stderr = Tail(limit: BuildbotKeptUpdates.textLimit)

    mutating func add(_ updates: [BuildbotUpdate]) {
        for update in updates {
            switch update {
            case .rc(let rc): self.rc = rc
            case .failureReason(let reason): if self.failureReason == nil { self.failureReason = reason }
            case .stat(let values) where values.count >= 9: self.stat = values
            case .files(let files): self.files = files
            case .header(let text): self.header.append(text)
            case .stderr(let text): self.stderr.append(text)
            case .stdout, .log, .elapsed, .stat, .other: break
            }
        }
    }

    /// The kept updates, for what reads a command's updates once it ended.
    var updates: [BuildbotUpdate] {
        var updates: [BuildbotUpdate] = []
        if !self.header.bytes.isEmpty { updates.append(.header(String(decoding: self.header.bytes, as: UTF8.self))) }
        if !self.stderr.bytes.isEmpty { updates.append(.stderr(String(decoding: self.stderr.bytes, as: UTF8.self))) }
        if let failureReason = self.failureReason { updates.append(.failureReason(failureReason)) }
        if let stat = self.stat { updates.append(.stat(stat)) }
        if let files = self.files { updates.append(.files(files)) }
        if let rc = self.rc { updates.append(.rc(rc)) }
        return updates
    }
}

/// The last `limit` bytes of a stream of text.
struct Tail: Sendable {
    let limit: Int
    var bytes: [UInt8] = []
    mutating func append(_ text: String) {
        self.bytes += Array(text.utf8)
        if self.bytes.count > self.limit { self.bytes.removeFirst(self.bytes.count - self.limit) }
    }
}
