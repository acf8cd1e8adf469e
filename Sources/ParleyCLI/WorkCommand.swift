import ArgumentParser
import Crypto
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import Parley
import ParleyWork
import SwiftProtobuf
import UnixSignals

/// `parley work workers` and `parley work command`: master-initiated commands (§19.8),
/// relayed by a master started with --allow-commands to a worker started with
/// --accept-commands.
extension Work {
    struct Workers: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The workers connected to a master now.")

        @Option(name: .long, help: ArgumentHelp("The master's address.", valueName: "address"))
        var master = Work.defaultMaster

        @Flag(name: .long, help: "Print JSON.")
        var json = false

        @OptionGroup var security: ClientSecurityOptions

        func run() async throws {
            try await Work.withMaster(self.master, command: "workers", security: self.security) { client in
                let list = try await client.request(Parley_Work_V1_ListWorkers(), as: Parley_Work_V1_WorkerList.self)
                if self.json {
                    print(try list.jsonString())
                } else {
                    for w in list.workers {
                        print("\(w.worker)  \(w.platform)  \(w.cpus) CPUs  \(w.slots) slots\(w.apps.isEmpty ? "" : "  apps: \(w.apps.joined(separator: ","))")\(w.commands ? "  takes commands" : "")")
                    }
                    if list.workers.isEmpty { print("no worker is connected") }
                }
            }
        }
    }

    struct Command: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a command on a connected worker, through its master.",
            discussion: """
                The master (started with --allow-commands) sends the command on the worker's own \
                connection; the worker (started with --accept-commands) runs it in its command \
                directory, which every path stays inside. Several commands can run on one worker \
                at once.
                """,
            subcommands: [Run.self, Upload.self, Download.self, Mkdir.self, Rmdir.self, Rmfile.self, Stat.self, Glob.self, List.self, Copy.self, CommandBench.self]
        )
    }

    /// Where a command goes: the master, the worker, and how to reach the master.
    struct CommandTarget: ParsableArguments {
        @Option(name: .long, help: ArgumentHelp("The master's address.", valueName: "address"))
        var master = Work.defaultMaster

        @Option(name: .long, help: ArgumentHelp("The worker's name (parley work workers lists them).", valueName: "name"))
        var worker: String

        @Flag(name: .long, help: "Print the command's result as JSON.")
        var json = false

        @OptionGroup var security: ClientSecurityOptions

        /// Sends `command` and prints what comes back; exits with the command's status, else
        /// returns its result.
        @discardableResult
        func send(_ command: Parley_Work_V1_Command, name: String, router: ParleyRouter = ParleyRouter(),
                  describe: @escaping (Parley_Work_V1_CommandResult) -> String? = { _ in nil }) async throws -> Parley_Work_V1_CommandResult {
            var request = Parley_Work_V1_RunWorkerCommand()
            request.worker = self.worker
            request.command = command
            var result = Parley_Work_V1_CommandResult()
            try await Work.withMaster(self.master, command: "command \(name)", security: self.security, router: router) { client in
                let events = try await client.stream(request, item: Parley_Work_V1_CommandUpdate.self, final: Parley_Work_V1_CommandResult.self)
                let id = NIOLockedValueBox<UInt64>(0)
                // The first Ctrl-C interrupts the command on the worker (its result follows);
                // the second leaves.
                let signals = await UnixSignalsSequence(trapping: .sigint, .sigterm)
                let interrupter = Task {
                    var interrupts = 0
                    for await _ in signals {
                        interrupts += 1
                        let commandID = id.withLockedValue { $0 }
                        if interrupts > 1 || commandID == 0 { Foundation.exit(130) }
                        Self.standardError("parley work command: interrupting command \(commandID) on \(self.worker)...\n")
                        var interrupt = Parley_Work_V1_InterruptWorkerCommand()
                        interrupt.worker = self.worker
                        interrupt.interrupt.commandID = commandID
                        interrupt.interrupt.reason = "interrupted from parley work command"
                        _ = try? await client.request(interrupt, as: Parley_Work_V1_InterruptReply.self)
                    }
                }
                defer { interrupter.cancel() }
                for try await event in events {
                    switch event {
                    case .item(let update, _):
                        if update.commandID != 0 { id.withLockedValue { $0 = update.commandID } }
                        if !update.stdout.isEmpty { writeStandardOutput(update.stdout) }
                        if !update.stderr.isEmpty { try? FileHandle.standardError.write(contentsOf: update.stderr) }
                        if !update.header.isEmpty, !self.json { Self.standardError(update.header.split(separator: "\n").map { "| \($0)\n" }.joined()) }
                        if !update.log.isEmpty {
                            let text = String(decoding: update.log, as: UTF8.self)
                            writeStandardOutput(Data(text.split(separator: "\n", omittingEmptySubsequences: false).dropLast(text.hasSuffix("\n") ? 1 : 0).map { "[\(update.logName)] \($0)\n" }.joined().utf8))
                        }
                    case .final(let final):
                        result = final
                    }
                }
            }
            if self.json {
                print(try result.jsonString())
            } else {
                if result.error.isEmpty, result.exitStatus == 0, let text = describe(result) { print(text) }
                if !result.error.isEmpty { Self.standardError("parley work command \(name): \(result.error)\n") }
            }
            if result.signal != 0 { throw ExitCode(128 + result.signal) }
            if result.exitStatus != 0 { throw ExitCode(result.exitStatus) }
            return result
        }

        /// A glob's or a listing's paths, a line each (nothing when there are none).
        static func lines(_ result: Parley_Work_V1_CommandResult) -> String? {
            result.paths.isEmpty ? nil : result.paths.joined(separator: "\n")
        }

        static func standardError(_ text: String) {
            try? FileHandle.standardError.write(contentsOf: Data(text.utf8))
        }
    }

    struct Run: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a program on the worker, its output streamed here; exits with its status (128 + the signal when killed).",
            discussion: "Ctrl-C interrupts it on the worker (with --interrupt-signal) and waits for its end; a second Ctrl-C leaves at once."
        )

        @OptionGroup var target: CommandTarget

        @Option(name: .long, help: ArgumentHelp("The working directory, inside the worker's command directory (created if missing).", valueName: "dir"))
        var workdir = ""

        @Option(name: .long, help: ArgumentHelp("An environment variable, NAME=VALUE (repeatable; nothing else is inherited).", valueName: "name=value"))
        var env: [String] = []

        @Flag(name: .long, help: "Run the words through /bin/sh -c.")
        var shell = false

        @Option(name: .long, help: ArgumentHelp("Kill it after this long without output (0: never).", valueName: "seconds"))
        var timeout: UInt32 = 0

        @Option(name: .long, help: ArgumentHelp("Kill it after this long in all (0: the worker's default).", valueName: "seconds"))
        var maxTime: UInt32 = 0

        @Option(name: .long, help: ArgumentHelp("The signal an interrupt sends (a number; 0: SIGKILL); SIGKILL follows after 5 s.", valueName: "signal"))
        var interruptSignal: Int32 = 0

        @Option(name: .long, help: ArgumentHelp("A file (relative to --workdir) whose new lines are printed as [NAME] lines while it runs (repeatable).", valueName: "name=path"))
        var logfile: [String] = []

        @Argument(parsing: .captureForPassthrough, help: "The program and its arguments (after --).")
        var command: [String] = []

        var words: [String] { self.command.first == "--" ? Array(self.command.dropFirst()) : self.command }

        func validate() throws {
            guard !self.words.isEmpty else { throw ValidationError("give the program to run after --") }
            for e in self.env where !e.contains("=") { throw ValidationError("--env \(e): use NAME=VALUE") }
            for l in self.logfile where !l.contains("=") { throw ValidationError("--logfile \(l): use NAME=PATH") }
        }

        func run() async throws {
            var shell = Parley_Work_V1_ShellCommand()
            shell.argv = self.words
            shell.shell = self.shell
            shell.workdir = self.workdir
            for e in self.env {
                let parts = e.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                shell.env[String(parts[0])] = String(parts[1])
            }
            shell.timeoutSeconds = self.timeout
            shell.maxTimeSeconds = self.maxTime
            shell.interruptSignal = self.interruptSignal
            for l in self.logfile {
                let parts = l.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                shell.logfiles[String(parts[0])] = String(parts[1])
            }
            var command = Parley_Work_V1_Command()
            command.shell = shell
            try await self.target.send(command, name: "run")
        }
    }

    /// `parley work command bench`: the same program run COUNT times, one after another, on
    /// one worker through one connection to its master; commands per second and latency.
    struct CommandBench: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "bench",
            abstract: "Run a program COUNT times on a worker, one after another, and print commands per second and latency (p50, p99).",
            discussion: """
                Each run is a whole command: sent through the master, run by the worker (a native \
                worker or a Buildbot worker of `work serve --buildbot`), its output and status back. \
                Progress is shown on a terminal. Exits with status 1 if any run did not exit with 0.
                """
        )

        @Option(name: .long, help: ArgumentHelp("The master's address.", valueName: "address"))
        var master = Work.defaultMaster

        @Option(name: .long, help: ArgumentHelp("The worker's name.", valueName: "name"))
        var worker: String

        @Option(name: .long, help: "How many times to run the program.")
        var count: Int = 1000

        @Flag(name: .long, help: "Print the result as JSON.")
        var json = false

        @OptionGroup var security: ClientSecurityOptions

        @Argument(parsing: .captureForPassthrough, help: "The program and its arguments (after --; default: true).")
        var command: [String] = []

        func validate() throws {
            guard self.count >= 1 else { throw ValidationError("--count must be at least 1") }
        }

        func run() async throws {
            let words = self.command.first == "--" ? Array(self.command.dropFirst()) : self.command
            var request = Parley_Work_V1_RunWorkerCommand()
            request.worker = self.worker
            request.command.shell.argv = words.isEmpty ? ["true"] : words
            request.command.shell.env = ["PATH": "/usr/local/bin:/usr/bin:/bin"]
            var latencies: [Double] = []
            var failures = 0
            let terminal = isatty(2) != 0
            let started = ContinuousClock.now
            try await Work.withMaster(self.master, command: "command bench", security: self.security) { client in
                for i in 0..<self.count {
                    let t0 = ContinuousClock.now
                    let events = try await client.stream(request, item: Parley_Work_V1_CommandUpdate.self, final: Parley_Work_V1_CommandResult.self)
                    var result = Parley_Work_V1_CommandResult()
                    for try await event in events { if case .final(let r) = event { result = r } }
                    let elapsed = ContinuousClock.now - t0
                    latencies.append(Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18)
                    if result.exitStatus != 0 || result.signal != 0 || !result.error.isEmpty { failures += 1 }
                    if terminal, (i + 1) % 50 == 0 || i + 1 == self.count { CommandTarget.standardError("\rran \(i + 1)/\(self.count)") }
                }
            }
            if terminal { CommandTarget.standardError("\n") }
            let total = ContinuousClock.now - started
            let seconds = Double(total.components.seconds) + Double(total.components.attoseconds) / 1e18
            let sorted = latencies.sorted()
            func percentile(_ p: Double) -> Double { sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))] * 1000 }
            let rate = Double(self.count) / seconds
            if self.json {
                print("{\"commands\":\(self.count),\"seconds\":\(seconds),\"commands_per_second\":\(rate),\"p50_ms\":\(percentile(0.5)),\"p99_ms\":\(percentile(0.99)),\"failures\":\(failures)}")
            } else {
                print(String(format: "%d commands on %@ in %.2f s: %.1f commands/s, latency p50 %.2f ms, p99 %.2f ms, %d failed", self.count, self.worker, seconds, rate, percentile(0.5), percentile(0.99), failures))
            }
            if failures > 0 { throw ExitCode(1) }
        }
    }

    struct Upload: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Copy a file of the worker here (written whole, or not at all).",
            discussion: "With --directory, REMOTE is a directory and LOCAL the tar file (ustar, or what a Buildbot worker makes) it arrives as: tar -xf LOCAL unpacks it."
        )

        @OptionGroup var target: CommandTarget

        @Option(name: .long, help: ArgumentHelp("Refuse a file larger than this (0: the worker's limit).", valueName: "bytes"))
        var maxSize: UInt64 = 0

        @Flag(name: .long, help: "Copy a directory, as a tar stream written to LOCAL.")
        var directory = false

        @Argument(help: ArgumentHelp("The worker's file, relative to its command directory.", valueName: "remote"))
        var remote: String

        @Argument(help: ArgumentHelp("The file to write here.", valueName: "local"))
        var local: String

        func run() async throws {
            let partial = "\(self.local).parley-partial-\(ProcessInfo.processInfo.processIdentifier)"
            let hash = NIOLockedValueBox(SHA256())
            let progress = Progress(label: "received")
            var router = ParleyRouter()
            let file = WorkFileTransfer(path: partial)
            router.onWithData(Parley_Work_V1_TransferWrite.self) { (write: Parley_Work_V1_TransferWrite, ctx: ParleyRequestContext) -> ParleyReply<Parley_Work_V1_TransferWritten> in
                let data = ctx.data ?? ByteBuffer()
                try await file.write(command: write.commandID, offset: write.offset, data)
                hash.withLockedValue { $0.update(data: Array(data.readableBytesView)) }
                progress.advance(to: write.offset + UInt64(data.readableBytes))
                return ParleyReply(Parley_Work_V1_TransferWritten())
            }
            var command = Parley_Work_V1_Command()
            if self.directory {
                var upload = Parley_Work_V1_UploadDirectoryCommand()
                upload.path = self.remote
                upload.maxSize = self.maxSize
                command.uploadDirectory = upload
            } else {
                var upload = Parley_Work_V1_UploadCommand()
                upload.path = self.remote
                upload.maxSize = self.maxSize
                command.upload = upload
            }
            let result: Parley_Work_V1_CommandResult
            do {
                result = try await self.target.send(command, name: "upload", router: router) { result in
                    progress.end()
                    return "\(result.size) bytes, sha256 \(result.sha256.map { String(format: "%02x", $0) }.joined())"
                }
            } catch {
                try? FileManager.default.removeItem(atPath: partial)
                throw error
            }
            // What came must be what the worker says it sent; then it is put in place.
            if !FileManager.default.fileExists(atPath: partial) { _ = FileManager.default.createFile(atPath: partial, contents: nil) }
            guard Data(hash.withLockedValue { $0.finalize() }) == result.sha256 else {
                try? FileManager.default.removeItem(atPath: partial)
                CommandTarget.standardError("parley work command upload: the bytes received do not match the worker's SHA-256; \(self.local) not written\n")
                throw ExitCode(1)
            }
            // The copy keeps the worker file's modification time (keepstamp).
            let mtime = result.stat.mtimeUnixMs
            if mtime > 0 {
                // The access time stays (UTIME_OMIT, a macro Swift does not import).
                var times = [timespec(tv_sec: 0, tv_nsec: (1 << 30) - 2), timespec(tv_sec: Int(mtime / 1000), tv_nsec: Int(mtime % 1000) * 1_000_000)]
                _ = utimensat(AT_FDCWD, partial, &times, 0)
            }
            guard rename(partial, self.local) == 0 else {
                CommandTarget.standardError("parley work command upload: cannot put \(self.local) in place: \(String(cString: strerror(errno)))\n")
                throw ExitCode(1)
            }
        }
    }

    struct Download: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Copy a file from here to the worker (checked by size and SHA-256 there, then put in place).")

        @OptionGroup var target: CommandTarget

        @Option(name: .long, help: ArgumentHelp("The new file's permission bits, in octal.", valueName: "mode"))
        var fileMode = "644"

        @Argument(help: ArgumentHelp("The file here.", valueName: "local"))
        var local: String

        @Argument(help: ArgumentHelp("The worker's file to write, relative to its command directory.", valueName: "remote"))
        var remote: String

        func validate() throws {
            guard let m = UInt32(self.fileMode, radix: 8), m <= 0o7777 else { throw ValidationError("--file-mode \(self.fileMode): give octal permission bits, such as 644") }
        }

        func run() async throws {
            guard let bytes = FileManager.default.contents(atPath: self.local) else { throw ValidationError("cannot read \(self.local)") }
            let file = WorkFileTransfer(path: self.local)
            let progress = Progress(label: "sent")
            var router = ParleyRouter()
            router.onWithData(Parley_Work_V1_TransferRead.self) { (read: Parley_Work_V1_TransferRead, _: ParleyRequestContext) -> ParleyReply<Parley_Work_V1_TransferData> in
                let (data, eof) = try await file.read(command: read.commandID, offset: read.offset, length: Int(min(read.length, UInt32(WorkCommandExecutor.maxChunk))))
                progress.advance(to: read.offset + UInt64(data.readableBytes))
                var reply = Parley_Work_V1_TransferData()
                reply.eof = eof
                return ParleyReply(reply, data: data)
            }
            var download = Parley_Work_V1_DownloadCommand()
            download.path = self.remote
            download.size = UInt64(bytes.count)
            download.sha256 = Data(SHA256.hash(data: bytes))
            download.mode = UInt32(self.fileMode, radix: 8) ?? 0o644
            var command = Parley_Work_V1_Command()
            command.download = download
            try await self.target.send(command, name: "download", router: router) { result in
                progress.end()
                return "\(result.size) bytes, sha256 \(result.sha256.map { String(format: "%02x", $0) }.joined())"
            }
        }
    }

    /// Progress of a transfer on standard error, when it is a terminal: every 4 MiB.
    final class Progress: Sendable {
        let label: String
        let shown = NIOLockedValueBox<UInt64>(0)
        let terminal = isatty(2) != 0

        init(label: String) { self.label = label }

        func advance(to bytes: UInt64) {
            guard self.terminal else { return }
            let show = self.shown.withLockedValue { shown -> Bool in
                guard bytes >= shown + (4 << 20) else { return false }
                shown = bytes
                return true
            }
            if show { CommandTarget.standardError("\r\(self.label) \(bytes >> 20) MiB") }
        }

        func end() {
            if self.terminal, self.shown.withLockedValue({ $0 }) > 0 { CommandTarget.standardError("\n") }
        }
    }

    /// The worker and the paths of mkdir, rmdir and rmfile.
    struct PathsOptions: ParsableArguments {
        @OptionGroup var target: CommandTarget
        @Argument(help: "Paths relative to the worker's command directory.") var paths: [String]

        func send(_ kind: WritableKeyPath<Parley_Work_V1_Command, Parley_Work_V1_PathsCommand>, name: String) async throws {
            var command = Parley_Work_V1_Command()
            command[keyPath: kind].paths = self.paths
            try await self.target.send(command, name: name)
        }
    }

    struct Mkdir: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Make directories on the worker (with their parents).")
        @OptionGroup var options: PathsOptions
        func run() async throws { try await self.options.send(\.mkdir, name: "mkdir") }
    }

    struct Rmdir: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove directories on the worker, with everything in them (a missing one is no error).")
        @OptionGroup var options: PathsOptions
        func run() async throws { try await self.options.send(\.rmdir, name: "rmdir") }
    }

    struct Rmfile: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove files on the worker (a missing one is no error).")
        @OptionGroup var options: PathsOptions
        func run() async throws { try await self.options.send(\.rmfile, name: "rmfile") }
    }

    struct Stat: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "A file's kind, size, mode and modification time on the worker (status 1 when it does not exist).")
        @OptionGroup var target: CommandTarget
        @Argument(help: "A path relative to the worker's command directory.") var path: String

        func run() async throws {
            var command = Parley_Work_V1_Command()
            command.stat.path = self.path
            try await self.target.send(command, name: "stat") { result in
                guard result.stat.exists else { return nil }
                let s = result.stat
                let when = ISO8601DateFormatter().string(from: Date(timeIntervalSince1970: Double(s.mtimeUnixMs) / 1000))
                return "\(s.kind) \(s.size) bytes mode \(String(s.mode, radix: 8)) modified \(when)"
            }
        }
    }

    struct Glob: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The worker's paths that match a pattern (*, ?, [...]).")
        @OptionGroup var target: CommandTarget
        @Argument(help: "A pattern relative to the worker's command directory.") var pattern: String

        func run() async throws {
            var command = Parley_Work_V1_Command()
            command.glob.path = self.pattern
            try await self.target.send(command, name: "glob", describe: CommandTarget.lines)
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "The names in a directory of the worker.")
        @OptionGroup var target: CommandTarget
        @Argument(help: "A directory relative to the worker's command directory (default: the directory itself).") var path = ""

        func run() async throws {
            var command = Parley_Work_V1_Command()
            command.listdir.path = self.path
            try await self.target.send(command, name: "ls", describe: CommandTarget.lines)
        }
    }

    struct Copy: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "cp", abstract: "Copy a directory tree on the worker (the destination must not exist).")
        @OptionGroup var target: CommandTarget
        @Argument(help: "The directory to copy.") var from: String
        @Argument(help: "Where the copy goes.") var to: String

        func run() async throws {
            var command = Parley_Work_V1_Command()
            command.cpdir.from = self.from
            command.cpdir.to = self.to
            try await self.target.send(command, name: "cp")
        }
    }
}
