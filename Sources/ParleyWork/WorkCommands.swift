import Crypto
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Parley
import ParleyWire
#if canImport(Glibc)
import Glibc
#endif

/// The paths a master's commands may name on a worker (§19.8, [R-19.8-2]): relative to the
/// worker's command directory, by the rule of job file names ("" and "." name the directory
/// itself where a directory is meant), and never through a symbolic link that leads out.
public enum CommandPaths {
    /// The lexical rule alone (no file system): what a master can check before sending.
    public static func check(_ path: String, directoryItself: Bool = false) throws(WorkFiles.FileError) {
        if directoryItself, path.isEmpty || path == "." { return }
        do throws(WorkFiles.FileError) {
            try WorkFiles.check(name: path)
        } catch {
            throw WorkFiles.FileError(error.message.replacingOccurrences(of: "file name", with: "path").replacingOccurrences(of: "the job's directory", with: "the command directory"))
        }
    }

    /// The absolute path of `path` under `root` (itself without symbolic links): refused when
    /// the lexical rule refuses it, or when the deepest part of it that exists resolves,
    /// through symbolic links, to a place outside `root`. The last part itself is not
    /// followed: the commands act on a link, not on what it points to.
    public static func resolve(_ path: String, in root: String, directoryItself: Bool = false) throws(WorkFiles.FileError) -> String {
        try self.check(path, directoryItself: directoryItself)
        if path.isEmpty || path == "." { return root }
        let full = root + "/" + path
        var ancestor = (full as NSString).deletingLastPathComponent
        // Parts not there yet cannot be links; the first that is (lstat) is resolved whole.
        while ancestor.count > root.count, (try? FileManager.default.attributesOfItem(atPath: ancestor)) == nil {
            ancestor = (ancestor as NSString).deletingLastPathComponent
        }
        guard let resolved = Self.realpath(ancestor) else {
            throw WorkFiles.FileError("'\(path)' leads through a broken symbolic link")
        }
        guard resolved == root || resolved.hasPrefix(root + "/") else {
            throw WorkFiles.FileError("'\(path)' leads out of the command directory through a symbolic link")
        }
        return full
    }

    static func realpath(_ path: String) -> String? {
        guard let resolved = Glibc.realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }
}

/// The worker's side of master-initiated commands (§19.8): runs the `Command`s its master
/// sends on the worker's own connection (several at once), streams a shell command's output
/// as it comes, moves files in acknowledged chunks (`TransferWrite`, `TransferRead`, sent back
/// to the master on the same connection), and stops a command on `InterruptCommand` or when
/// the master cancels it. Nothing runs unless the worker accepts commands.
public final class WorkCommandExecutor: Sendable {
    public struct Configuration: Sendable {
        /// Where commands act: every path they name is inside it (created if missing).
        public var directory: String
        /// Whether commands run at all: a worker refuses them (`permissionDenied`) unless its
        /// owner said so (`parley work worker --accept-commands`).
        public var accept: Bool
        /// The most an upload or a download may move.
        public var maxTransferBytes: UInt64
        /// A shell command's time limit when it gives none.
        public var defaultMaxTime: Duration
        /// How long an interrupted command gets after its signal before SIGKILL.
        public var interruptGrace: Duration

        public init(directory: String, accept: Bool, maxTransferBytes: UInt64 = 1 << 30, defaultMaxTime: Duration = .seconds(3600), interruptGrace: Duration = .seconds(5)) {
            self.directory = directory
            self.accept = accept
            self.maxTransferBytes = maxTransferBytes
            self.defaultMaxTime = defaultMaxTime
            self.interruptGrace = interruptGrace
        }
    }

    /// A command being run: the child of a shell command once started, and whether (and with
    /// which signal) it was interrupted.
    private struct Running {
        var pid: Int32?
        var interruptSignal: Int32
        var interrupted: String?
        /// A signal asked for before the child started.
        var pending: Int32?
    }

    public let configuration: Configuration
    /// The command directory, without symbolic links.
    public let root: String
    let logger: Logger
    private let running = NIOLockedValueBox<[UInt64: Running]>([:])

    public static let defaultChunk = 64 << 10
    public static let maxChunk = 1 << 20

    public init(configuration: Configuration, logger: Logger = Logger(label: "parley.work.commands")) throws {
        self.configuration = configuration
        self.logger = logger
        try FileManager.default.createDirectory(atPath: configuration.directory, withIntermediateDirectories: true)
        guard let root = CommandPaths.realpath(configuration.directory) else {
            throw ParleyError(code: .invalidArgument, message: "the command directory \(configuration.directory) cannot be resolved")
        }
        self.root = root
    }

    /// Commands running now.
    public var runningCount: Int { self.running.withLockedValue { $0.count } }

    /// Registers the handlers of `Command` and `InterruptCommand` (for the worker's
    /// connection to its master).
    public func register(on router: inout ParleyRouter) {
        router.onStream(Parley_Work_V1_Command.self, item: Parley_Work_V1_CommandUpdate.self) { command, writer, ctx in
            try await self.run(command, writer: writer, connection: ctx.connection)
        }
        router.on(Parley_Work_V1_InterruptCommand.self) { (interrupt: Parley_Work_V1_InterruptCommand, _: ParleyRequestContext) -> Parley_Work_V1_InterruptReply in
            guard self.configuration.accept else { throw Self.refusal }
            var reply = Parley_Work_V1_InterruptReply()
            reply.found = self.interrupt(interrupt.commandID, signal: interrupt.signal, reason: interrupt.reason.isEmpty ? "interrupted by the master" : interrupt.reason)
            return reply
        }
    }

    static let refusal = ParleyError(code: .permissionDenied, message: "this worker does not take commands from its master (it was started without --accept-commands)")

    /// Interrupts every running command (the worker is shutting down).
    public func interruptAll(reason: String) {
        for id in self.running.withLockedValue({ Array($0.keys) }) { _ = self.interrupt(id, signal: SIGKILL, reason: reason) }
    }

    /// Sends a running command's child its interrupt signal (`signal`, or the command's own
    /// when 0), and SIGKILL after the grace time; a command without a child stops at its next
    /// step. Returns false when no such command runs.
    @discardableResult
    func interrupt(_ id: UInt64, signal: Int32, reason: String) -> Bool {
        let found = self.running.withLockedValue { running -> (found: Bool, pid: Int32?, signal: Int32) in
            guard var command = running[id] else { return (false, nil, 0) }
            let sig = signal != 0 ? signal : command.interruptSignal
            if command.interrupted == nil { command.interrupted = reason }
            if command.pid == nil { command.pending = sig }
            running[id] = command
            return (true, command.pid, sig)
        }
        guard found.found else { return false }
        self.logger.info("command interrupted", metadata: ["command": "\(id)", "reason": "\(reason)"])
        if let pid = found.pid {
            Self.signalGroup(pid, found.signal)
            if found.signal != SIGKILL {
                let grace = self.configuration.interruptGrace
                Task {
                    try? await Task.sleep(for: grace)
                    if self.running.withLockedValue({ $0[id]?.pid }) == pid { Self.signalGroup(pid, SIGKILL) }
                }
            }
        }
        return true
    }

    static func signalGroup(_ pid: Int32, _ signal: Int32) {
        kill(-pid, signal)
        kill(pid, signal)
    }

    private func begin(_ id: UInt64, interruptSignal: Int32 = SIGKILL) throws {
        try self.running.withLockedValue { running in
            guard running[id] == nil else {
                throw ParleyError(code: .invalidArgument, message: "command \(id) is already running on this worker: command ids must be unique")
            }
            running[id] = Running(interruptSignal: interruptSignal)
        }
    }

    private func end(_ id: UInt64) -> String? {
        self.running.withLockedValue { $0.removeValue(forKey: id)?.interrupted }
    }

    private func interruption(_ id: UInt64) -> String? { self.running.withLockedValue { $0[id]?.interrupted } }

    /// The result of a transfer interrupted before its next chunk, if it was.
    private func interrupted(_ id: UInt64, after offset: UInt64, _ tail: String = "") -> Parley_Work_V1_CommandResult? {
        guard let why = self.interruption(id) else { return nil }
        var result = Self.failure("\(why) after \(offset) bytes\(tail)")
        result.interrupted = true
        return result
    }

    /// Runs one command to its result. Paths that break the rules and malformed commands are
    /// refused (`invalidArgument`, nothing done); a command that fails while it runs ends with
    /// a result saying why.
    func run(_ command: Parley_Work_V1_Command, writer: ParleyStreamWriter<Parley_Work_V1_CommandUpdate>, connection: ParleyConnection) async throws -> Parley_Work_V1_CommandResult {
        guard self.configuration.accept else { throw Self.refusal }
        let id = command.commandID
        guard id != 0 else { throw ParleyError(code: .invalidArgument, message: "a command needs a command id other than 0") }
        let started = ContinuousClock.now
        var result: Parley_Work_V1_CommandResult
        do {
            switch command.kind {
            case .shell(let shell)?: result = try await self.shell(shell, id: id, writer: writer)
            case .upload(let upload)?: result = try await self.upload(upload, id: id, connection: connection)
            case .uploadDirectory(let upload)?: result = try await self.uploadDirectory(upload, id: id, connection: connection)
            case .download(let download)?: result = try await self.download(download, id: id, connection: connection)
            case .mkdir(let paths)?:
                result = try await self.each(paths, id: id) { path throws in
                    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
                }
            case .rmdir(let paths)?:
                result = try await self.each(paths, id: id) { path throws in
                    guard let type = try? FileManager.default.attributesOfItem(atPath: path)[.type] as? FileAttributeType else { return }
                    guard type == .typeDirectory else { throw WorkFiles.FileError("it is not a directory (rmfile removes files)") }
                    try FileManager.default.removeItem(atPath: path)
                }
            case .rmfile(let paths)?:
                result = try await self.each(paths, id: id) { path throws in
                    guard let type = try? FileManager.default.attributesOfItem(atPath: path)[.type] as? FileAttributeType else { return }
                    guard type != .typeDirectory else { throw WorkFiles.FileError("it is a directory (rmdir removes directories)") }
                    try FileManager.default.removeItem(atPath: path)
                }
            case .stat(let stat)?: result = try await self.stat(stat.path, id: id)
            case .glob(let glob)?: result = try await self.glob(glob.path, id: id)
            case .listdir(let list)?: result = try await self.listdir(list.path, id: id)
            case .cpdir(let copy)?: result = try await self.cpdir(copy, id: id)
            case nil:
                throw ParleyError(code: .invalidArgument, message: "command \(id) has no kind this worker knows (work protocol version \(WorkService.protocolVersions.upperBound)); nothing was done")
            }
        } catch let error as WorkFiles.FileError {
            throw ParleyError(code: .invalidArgument, message: "command \(id) refused: \(error.message); nothing was done")
        }
        result.commandID = id
        let elapsed = ContinuousClock.now - started
        result.elapsedMs = elapsed.wholeMilliseconds
        return result
    }

    static func failure(_ message: String, status: Int32 = 1) -> Parley_Work_V1_CommandResult {
        var result = Parley_Work_V1_CommandResult()
        result.exitStatus = status
        result.error = message
        return result
    }

    private func path(_ path: String, directoryItself: Bool = false) throws(WorkFiles.FileError) -> String {
        try CommandPaths.resolve(path, in: self.root, directoryItself: directoryItself)
    }

    private static func blocking<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await NIOThreadPool.singleton.runIfActive(body)
    }

    // MARK: - Shell

    private func shell(_ shell: Parley_Work_V1_ShellCommand, id: UInt64, writer: ParleyStreamWriter<Parley_Work_V1_CommandUpdate>) async throws -> Parley_Work_V1_CommandResult {
        guard !shell.argv.isEmpty, !shell.argv[0].isEmpty else { throw ParleyError(code: .invalidArgument, message: "command \(id) names no program; nothing was done") }
        let workdir = try self.path(shell.workdir, directoryItself: true)
        try self.begin(id, interruptSignal: shell.interruptSignal != 0 ? shell.interruptSignal : SIGKILL)
        defer { _ = self.end(id) }
        do {
            try await Self.blocking { try FileManager.default.createDirectory(atPath: workdir, withIntermediateDirectories: true) }
        } catch {
            return Self.failure("cannot make the working directory '\(shell.workdir)': \(error)")
        }
        var spec = Parley_Work_V1_JobSpec()
        spec.argv = shell.argv
        spec.env = shell.env
        spec.shell = shell.shell
        let maxTime = shell.maxTimeSeconds > 0 ? Duration.seconds(Int64(shell.maxTimeSeconds)) : self.configuration.defaultMaxTime
        var header = Parley_Work_V1_CommandUpdate()
        header.commandID = id
        header.header = "\(shell.shell ? "sh -c " : "")\(shell.argv.joined(separator: " "))\n in \(shell.workdir.isEmpty ? "." : shell.workdir)\n"
        try await writer.send(header)
        // The output goes out in the order it was read, by one task; a chunk that cannot be
        // sent (the master cancelled) is dropped, and the child is killed by the cancellation.
        let (updates, feed) = AsyncStream<Parley_Work_V1_CommandUpdate>.makeStream()
        let sender = Task {
            for await update in updates { try? await writer.send(update) }
        }
        // Log files: their new bytes, every 200 ms and once more at the end.
        var logs: [(name: String, path: String)] = []
        for (name, file) in shell.logfiles.sorted(by: { $0.key < $1.key }) {
            logs.append((name, try self.path(shell.workdir.isEmpty ? file : shell.workdir + "/" + file)))
        }
        let logOffsets = NIOLockedValueBox([String: UInt64]())
        let readLogs: @Sendable () -> Void = { [logs] in
            for (name, path) in logs {
                guard let handle = FileHandle(forReadingAtPath: path) else { continue }
                defer { try? handle.close() }
                let offset = logOffsets.withLockedValue { $0[name] ?? 0 }
                guard let end = try? handle.seekToEnd(), end > offset else { continue }
                try? handle.seek(toOffset: offset)
                let count = Int(min(end - offset, UInt64(Self.maxChunk)))
                guard let data = try? handle.read(upToCount: count), !data.isEmpty else { continue }
                logOffsets.withLockedValue { $0[name] = offset + UInt64(data.count) }
                var update = Parley_Work_V1_CommandUpdate()
                update.commandID = id
                update.logName = name
                update.log = data
                feed.yield(update)
            }
        }
        let tailer: Task<Void, Never>? = logs.isEmpty ? nil : Task {
            while !Task.isCancelled {
                try? await Task.sleep(for: .milliseconds(200))
                readLogs()
            }
        }
        let lastOutput = NIOLockedValueBox(ContinuousClock.now)
        let silent = NIOLockedValueBox(false)
        let watcher: Task<Void, Never>? = shell.timeoutSeconds == 0 ? nil : Task {
            let limit = Duration.seconds(Int64(shell.timeoutSeconds))
            while !Task.isCancelled {
                try? await Task.sleep(for: .milliseconds(100))
                if ContinuousClock.now - lastOutput.withLockedValue({ $0 }) > limit {
                    silent.withLockedValue { $0 = true }
                    if let pid = self.running.withLockedValue({ $0[id]?.pid }) { JobRunner.killGroup(pid) }
                    return
                }
            }
        }
        let outcome: JobRunner.Outcome
        do {
            outcome = try await withTaskCancellationHandler {
                try await JobRunner.run(
                    spec, directory: workdir, maxWall: maxTime, maxOutput: 0,
                    onOutput: { isError, data in
                        lastOutput.withLockedValue { $0 = ContinuousClock.now }
                        var update = Parley_Work_V1_CommandUpdate()
                        update.commandID = id
                        if isError { update.stderr = data } else { update.stdout = data }
                        feed.yield(update)
                    },
                    started: { pid in
                        let pending = self.running.withLockedValue { running -> Int32? in
                            running[id]?.pid = pid
                            return running[id]?.pending
                        }
                        if let pending { Self.signalGroup(pid, pending) }
                    }
                )
            } onCancel: {
                _ = self.interrupt(id, signal: SIGKILL, reason: "cancelled by the master")
            }
        } catch {
            watcher?.cancel()
            tailer?.cancel()
            feed.finish()
            await sender.value
            return Self.failure("cannot start \(shell.argv[0]): \(error)", status: 127)
        }
        watcher?.cancel()
        tailer?.cancel()
        await tailer?.value
        readLogs()
        feed.finish()
        await sender.value
        let interrupted = self.interruption(id)
        var result = Parley_Work_V1_CommandResult()
        result.exitStatus = outcome.exitStatus
        result.signal = outcome.signal
        if let interrupted {
            result.interrupted = true
            result.error = interrupted
        } else if silent.withLockedValue({ $0 }) {
            result.timedOut = true
            result.error = "no output for \(shell.timeoutSeconds) s: killed"
        } else if outcome.timedOut {
            result.timedOut = true
            result.error = "still running after \(maxTime.components.seconds) s: killed"
        }
        return result
    }

    // MARK: - Files

    private func limit(_ asked: UInt64) -> UInt64 {
        asked > 0 ? min(asked, self.configuration.maxTransferBytes) : self.configuration.maxTransferBytes
    }

    private static func chunk(_ asked: UInt32) -> Int {
        asked == 0 ? Self.defaultChunk : min(Int(asked), Self.maxChunk)
    }

    /// A worker's file to the master, a chunk per `TransferWrite`, each acknowledged before
    /// the next is read.
    private func upload(_ upload: Parley_Work_V1_UploadCommand, id: UInt64, connection: ParleyConnection) async throws -> Parley_Work_V1_CommandResult {
        let path = try self.path(upload.path)
        let limit = self.limit(upload.maxSize), chunk = Self.chunk(upload.chunkSize)
        try self.begin(id)
        defer { _ = self.end(id) }
        guard let attributes = try? FileManager.default.attributesOfItem(atPath: path) else { return Self.failure("'\(upload.path)' does not exist") }
        guard attributes[.type] as? FileAttributeType == .typeRegular else { return Self.failure("'\(upload.path)' is not a regular file") }
        let size = (attributes[.size] as? NSNumber)?.uint64Value ?? 0
        guard size <= limit else { return Self.failure("'\(upload.path)' is \(size) bytes, over the limit of \(limit): nothing was sent") }
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { return Self.failure("cannot open '\(upload.path)': \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var result = try await self.send(id: id, limit: limit, connection: connection, what: "'\(upload.path)'") {
            try await Self.blocking { () throws -> [UInt8] in
                var buffer = [UInt8](repeating: 0, count: chunk)
                let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
                guard n >= 0 else { throw WorkFiles.FileError("cannot read '\(upload.path)': \(String(cString: strerror(errno)))") }
                return Array(buffer[0..<n])
            }
        }
        guard result.error.isEmpty else { return result }
        let offset = result.size
        // The file's times go with it: the master's copy keeps them.
        result.stat.exists = true
        result.stat.kind = "file"
        result.stat.size = offset
        result.stat.mode = UInt32((attributes[.posixPermissions] as? NSNumber)?.uint32Value ?? 0o644)
        // Saturating: a file can carry any time (`touch -d @1e17` on tmpfs).
        result.stat.mtimeUnixMs = Int64(saturating: ((attributes[.modificationDate] as? Date)?.timeIntervalSince1970 ?? 0) * 1000)
        return result
    }

    /// A worker's directory to the master as a ustar stream (`WorkTarStream`), a chunk per
    /// `TransferWrite` as an upload's.
    private func uploadDirectory(_ upload: Parley_Work_V1_UploadDirectoryCommand, id: UInt64, connection: ParleyConnection) async throws -> Parley_Work_V1_CommandResult {
        let path = try self.path(upload.path, directoryItself: true)
        let limit = self.limit(upload.maxSize), chunk = Self.chunk(upload.chunkSize)
        try self.begin(id)
        defer { _ = self.end(id) }
        guard (try? FileManager.default.attributesOfItem(atPath: path)[.type] as? FileAttributeType) == .typeDirectory else {
            return Self.failure("'\(upload.path)' is not a directory")
        }
        let tar: WorkTarStream
        do {
            tar = try await Self.blocking { () throws -> WorkTarStream in try WorkTarStream(root: path) }
        } catch {
            return Self.failure("\(error)")
        }
        guard tar.expectedSize <= limit else { return Self.failure("'\(upload.path)' makes a tar stream of \(tar.expectedSize) bytes, over the limit of \(limit): nothing was sent") }
        return try await self.send(id: id, limit: limit, connection: connection, what: "'\(upload.path)'") {
            try await Self.blocking { () throws -> [UInt8] in try tar.next(max: chunk) }
        }
    }

    /// Sends what `next` gives (empty at the end) as `TransferWrite`s, each acknowledged before
    /// the next chunk is read; the result has the size and SHA-256 of what went, or says why it
    /// stopped.
    private func send(id: UInt64, limit: UInt64, connection: ParleyConnection, what: String, next: () async throws -> [UInt8]) async throws -> Parley_Work_V1_CommandResult {
        var hash = SHA256()
        var offset: UInt64 = 0
        while true {
            try Task.checkCancellation()
            if let stop = self.interrupted(id, after: offset) { return stop }
            let bytes = try await next()
            if bytes.isEmpty { break }
            guard offset + UInt64(bytes.count) <= limit else { return Self.failure("\(what) grew past the limit of \(limit) bytes while it was sent") }
            hash.update(data: bytes)
            var write = Parley_Work_V1_TransferWrite()
            write.commandID = id
            write.offset = offset
            do {
                _ = try await connection.call(write, data: ByteBuffer(bytes: bytes), as: Parley_Work_V1_TransferWritten.self)
            } catch let error as ParleyError where error.code != .cancelled {
                return Self.failure("the master refused the chunk at \(offset): \(error.message)")
            }
            offset += UInt64(bytes.count)
        }
        var result = Parley_Work_V1_CommandResult()
        result.size = offset
        result.sha256 = Data(hash.finalize())
        return result
    }

    /// The master's bytes to a worker's file, a chunk per `TransferRead`: written to a new
    /// file beside the destination, checked (size and SHA-256 when given), then renamed over
    /// it. A failed download leaves the destination as it was.
    private func download(_ download: Parley_Work_V1_DownloadCommand, id: UInt64, connection: ParleyConnection) async throws -> Parley_Work_V1_CommandResult {
        let path = try self.path(download.path)
        guard download.sha256.isEmpty || download.sha256.count == 32 else {
            throw ParleyError(code: .invalidArgument, message: "command \(id): a SHA-256 is 32 bytes, not \(download.sha256.count); nothing was done")
        }
        let limit = self.limit(download.maxSize), chunk = Self.chunk(download.chunkSize)
        try self.begin(id)
        defer { _ = self.end(id) }
        if (try? FileManager.default.attributesOfItem(atPath: path)[.type] as? FileAttributeType) == .typeDirectory {
            return Self.failure("'\(download.path)' is a directory")
        }
        let directory = (path as NSString).deletingLastPathComponent
        let temporary = "\(directory)/.parley-download-\(id)-\(UUID().uuidString)"
        let fd: Int32
        do {
            fd = try await Self.blocking { () throws -> Int32 in
                try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
                let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
                guard fd >= 0 else { throw WorkFiles.FileError(String(cString: strerror(errno))) }
                return fd
            }
        } catch {
            return Self.failure("cannot write '\(download.path)': \(error)")
        }
        var closed = false
        var renamed = false
        defer {
            if !closed { close(fd) }
            if !renamed { unlink(temporary) }
        }
        var hash = SHA256()
        var offset: UInt64 = 0
        while true {
            try Task.checkCancellation()
            if let stop = self.interrupted(id, after: offset, "; '\(download.path)' is unchanged") { return stop }
            var read = Parley_Work_V1_TransferRead()
            read.commandID = id
            read.offset = offset
            read.length = UInt32(chunk)
            let reply: ParleyReply<Parley_Work_V1_TransferData>
            do {
                reply = try await connection.call(read, as: Parley_Work_V1_TransferData.self)
            } catch let error as ParleyError where error.code != .cancelled {
                return Self.failure("the master refused the chunk at \(offset): \(error.message); '\(download.path)' is unchanged")
            }
            let bytes = reply.data.map { Array($0.readableBytesView) } ?? []
            guard bytes.count <= chunk else { return Self.failure("the master sent \(bytes.count) bytes for a chunk of at most \(chunk); '\(download.path)' is unchanged") }
            guard offset + UInt64(bytes.count) <= limit else { return Self.failure("the master sent more than the limit of \(limit) bytes; '\(download.path)' is unchanged") }
            if !bytes.isEmpty {
                do {
                    try await Self.blocking {
                        var done = 0
                        while done < bytes.count {
                            let n = bytes[done...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
                            guard n > 0 else { throw WorkFiles.FileError(String(cString: strerror(errno))) }
                            done += n
                        }
                    }
                } catch {
                    return Self.failure("cannot write '\(download.path)': \(error)")
                }
                hash.update(data: bytes)
                offset += UInt64(bytes.count)
            }
            if reply.message.eof { break }
            guard !bytes.isEmpty else { return Self.failure("the master sent an empty chunk that is not the last; '\(download.path)' is unchanged") }
        }
        let digest = Data(hash.finalize())
        if download.size != 0, download.size != offset {
            return Self.failure("'\(download.path)': \(offset) bytes came, \(download.size) were announced; the file is unchanged")
        }
        if !download.sha256.isEmpty, download.sha256 != digest {
            return Self.failure("'\(download.path)': the bytes that came do not match the announced SHA-256; the file is unchanged")
        }
        let mode = download.mode == 0 ? 0o644 : download.mode & 0o7777
        do {
            try await Self.blocking {
                guard fsync(fd) == 0, fchmod(fd, mode_t(mode)) == 0 else { throw WorkFiles.FileError(String(cString: strerror(errno))) }
            }
        } catch {
            return Self.failure("cannot write '\(download.path)': \(error)")
        }
        close(fd)
        closed = true
        guard rename(temporary, path) == 0 else { return Self.failure("cannot put '\(download.path)' in place: \(String(cString: strerror(errno)))") }
        renamed = true
        var result = Parley_Work_V1_CommandResult()
        result.size = offset
        result.sha256 = digest
        return result
    }

    /// Does `body` to each path in turn; the first that fails ends the command (the ones
    /// before it are done). Every path is checked before any is touched.
    private func each(_ paths: Parley_Work_V1_PathsCommand, id: UInt64, _ body: @escaping @Sendable (String) throws -> Void) async throws -> Parley_Work_V1_CommandResult {
        guard !paths.paths.isEmpty else { throw ParleyError(code: .invalidArgument, message: "command \(id) names no path; nothing was done") }
        let resolved = try paths.paths.map { (p: String) throws(WorkFiles.FileError) -> String in try self.path(p) }
        try self.begin(id)
        defer { _ = self.end(id) }
        for (given, path) in zip(paths.paths, resolved) {
            do {
                try await Self.blocking { try body(path) }
            } catch let error as WorkFiles.FileError {
                return Self.failure("'\(given)': \(error.message)")
            } catch {
                return Self.failure("'\(given)': \(Self.describe(error))")
            }
        }
        return Parley_Work_V1_CommandResult()
    }

    static func describe(_ error: any Error) -> String {
        let ns = error as NSError
        if let underlying = ns.userInfo[NSUnderlyingErrorKey] as? NSError, underlying.domain == NSPOSIXErrorDomain {
            return String(cString: strerror(Int32(underlying.code)))
        }
        return ns.localizedDescription
    }

    private func stat(_ path: String, id: UInt64) async throws -> Parley_Work_V1_CommandResult {
        let full = try self.path(path, directoryItself: true)
        try self.begin(id)
        defer { _ = self.end(id) }
        var result = Parley_Work_V1_CommandResult()
        guard let attributes = try? FileManager.default.attributesOfItem(atPath: full) else {
            result.exitStatus = 1
            result.error = "'\(path)' does not exist"
            result.stat.exists = false
            return result
        }
        var stat = Parley_Work_V1_FileStat()
        stat.exists = true
        switch attributes[.type] as? FileAttributeType {
        case .typeRegular?: stat.kind = "file"
        case .typeDirectory?: stat.kind = "directory"
        case .typeSymbolicLink?: stat.kind = "symlink"
        default: stat.kind = "other"
        }
        stat.size = (attributes[.size] as? NSNumber)?.uint64Value ?? 0
        stat.mode = (attributes[.posixPermissions] as? NSNumber)?.uint32Value ?? 0
        if let date = attributes[.modificationDate] as? Date { stat.mtimeUnixMs = Int64(saturating: date.timeIntervalSince1970 * 1000) }
        result.stat = stat
        return result
    }

    private func glob(_ pattern: String, id: UInt64) async throws -> Parley_Work_V1_CommandResult {
        // The pattern's parts follow the path rule; what it matches is filtered by it too.
        try CommandPaths.check(pattern)
        try self.begin(id)
        defer { _ = self.end(id) }
        let root = self.root
        let matches = try await Self.blocking { () -> [String] in
            var found = glob_t()
            defer { globfree(&found) }
            guard Glibc.glob(root + "/" + pattern, 0, nil, &found) == 0 else { return [] }
            var paths: [String] = []
            for i in 0..<Int(found.gl_pathc) {
                guard let p = found.gl_pathv[i] else { continue }
                let path = String(cString: p)
                guard path.hasPrefix(root + "/") else { continue }
                let relative = String(path.dropFirst(root.count + 1))
                if (try? CommandPaths.resolve(relative, in: root)) != nil { paths.append(relative) }
            }
            return paths.sorted()
        }
        var result = Parley_Work_V1_CommandResult()
        result.paths = matches
        return result
    }

    private func listdir(_ path: String, id: UInt64) async throws -> Parley_Work_V1_CommandResult {
        let full = try self.path(path, directoryItself: true)
        try self.begin(id)
        defer { _ = self.end(id) }
        do {
            let names = try await Self.blocking { try FileManager.default.contentsOfDirectory(atPath: full) }
            var result = Parley_Work_V1_CommandResult()
            result.paths = names.sorted()
            return result
        } catch {
            return Self.failure("'\(path.isEmpty ? "." : path)': \(Self.describe(error))")
        }
    }

    private func cpdir(_ copy: Parley_Work_V1_CopyCommand, id: UInt64) async throws -> Parley_Work_V1_CommandResult {
        let from = try self.path(copy.from), to = try self.path(copy.to)
        try self.begin(id)
        defer { _ = self.end(id) }
        guard (try? FileManager.default.attributesOfItem(atPath: from)[.type] as? FileAttributeType) == .typeDirectory else {
            return Self.failure("'\(copy.from)' is not a directory")
        }
        guard (try? FileManager.default.attributesOfItem(atPath: to)) == nil else { return Self.failure("'\(copy.to)' exists already") }
        do {
            try await Self.blocking {
                try FileManager.default.createDirectory(atPath: (to as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
                try FileManager.default.copyItem(atPath: from, toPath: to)
            }
        } catch {
            return Self.failure("cannot copy '\(copy.from)' to '\(copy.to)': \(Self.describe(error))")
        }
        return Parley_Work_V1_CommandResult()
    }
}
