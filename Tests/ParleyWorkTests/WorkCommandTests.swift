import Crypto
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Parley
import ParleyTestSupport
@testable import ParleyWork
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A master with a command center and workers connected to it in process; one worker runs a
/// real `WorkCommandExecutor`.
struct CommandRig {
    let center: WorkCommandCenter
    let server: ParleyServer
    let task: Task<Void, any Error>
    let worker: ParleyClient
    let executor: WorkCommandExecutor
    let directory: String
    let logger: Logger

    static func start(accept: Bool = true, relay: Bool = true, interruptGrace: Duration = .seconds(5)) async throws -> CommandRig {
        let dir = testScratchPath("work-commands-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let store = try SQLiteWorkStore(path: dir + "/jobs.sqlite")
        var quiet = Logger(label: "test")
        quiet.logLevel = .critical
        let center = WorkCommandCenter(logger: quiet)
        var configuration = WorkService.Configuration()
        configuration.relayCommands = relay
        var router = ParleyRouter()
        WorkService.register(on: &router, store: store, configuration: configuration, commands: center)
        let server = ParleyServer(configuration: .init(listen: []), router: router, logger: quiet)
        let task = Task { try await server.run() }
        _ = try await server.listeningAddresses
        let executor = try WorkCommandExecutor(configuration: .init(directory: dir + "/commands", accept: accept, interruptGrace: interruptGrace), logger: quiet)
        var workerRouter = ParleyRouter()
        executor.register(on: &workerRouter)
        let worker = try await ParleyClient.connect(inProcessTo: server, router: workerRouter, logger: quiet)
        var hello = Parley_Work_V1_WorkerHello()
        hello.worker = "w1"
        hello.commands = true
        _ = try await worker.request(hello, as: Parley_Work_V1_WorkerWelcome.self)
        return CommandRig(center: center, server: server, task: task, worker: worker, executor: executor, directory: dir + "/commands", logger: quiet)
    }

    func stop() {
        self.worker.close()
        self.server.shutDown()
        self.task.cancel()
    }

    /// Runs a command on w1 to its end: its updates and its result.
    func run(_ command: Parley_Work_V1_Command, transfer: (any WorkTransfer)? = nil) async throws -> (updates: [Parley_Work_V1_CommandUpdate], result: Parley_Work_V1_CommandResult) {
        let run = try await self.center.run(command, on: "w1", transfer: transfer)
        var updates: [Parley_Work_V1_CommandUpdate] = []
        for try await event in run.events {
            switch event {
            case .update(let u): updates.append(u)
            case .result(let r): return (updates, r)
            }
        }
        throw ParleyTestFailure("command \(run.id) ended without a result")
    }

    static func shell(_ argv: [String], timeout: UInt32 = 0, signal: Int32 = 0, workdir: String = "") -> Parley_Work_V1_Command {
        var command = Parley_Work_V1_Command()
        command.shell.argv = argv
        command.shell.env = ["PATH": "/usr/bin:/bin"]
        command.shell.timeoutSeconds = timeout
        command.shell.interruptSignal = signal
        command.shell.workdir = workdir
        return command
    }
}

/// A file in memory as a transfer's end, that can be told to misbehave.
final class MemoryTransfer: WorkTransfer {
    let bytes: NIOLockedValueBox<[UInt8]>
    let readBeyond: Bool

    init(_ bytes: [UInt8] = [], readBeyond: Bool = false) {
        self.bytes = NIOLockedValueBox(bytes)
        self.readBeyond = readBeyond
    }

    func write(command: UInt64, offset: UInt64, _ data: ByteBuffer) async throws {
        self.bytes.withLockedValue { $0 += Array(data.readableBytesView) }
    }

    func read(command: UInt64, offset: UInt64, length: Int) async throws -> (data: ByteBuffer, eof: Bool) {
        self.bytes.withLockedValue { bytes in
            let start = Int(offset)
            let end = min(bytes.count, start + length)
            return (ByteBuffer(bytes: bytes[start..<end]), !self.readBeyond && end == bytes.count)
        }
    }
}

@Suite struct CommandPathTests {
    /// [R-19.8-2] Paths are relative and stay inside the command directory.
    @Test func thePathRuleRefusesWhatCouldLeave() throws {
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\0b"] {
            #expect(throws: WorkFiles.FileError.self, "\(bad)") { try CommandPaths.check(bad) }
        }
        try CommandPaths.check("", directoryItself: true)
        try CommandPaths.check(".", directoryItself: true)
        try CommandPaths.check("a/b c/d.txt")
        try CommandPaths.check("build/*.o")
        let refused = #expect(throws: WorkFiles.FileError.self) { try CommandPaths.check("../x") }
        #expect(refused?.message.contains("command directory") == true, "\(String(describing: refused))")
    }

    @Test func symbolicLinksOutAreRefusedAndLinksInAreNot() throws {
        let root = testScratchPath("command-paths-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(atPath: root + "/inside", withIntermediateDirectories: true)
        let real = try #require(CommandPaths.realpath(root))
        try FileManager.default.createSymbolicLink(atPath: real + "/out", withDestinationPath: "/etc")
        try FileManager.default.createSymbolicLink(atPath: real + "/in", withDestinationPath: real + "/inside")
        try FileManager.default.createSymbolicLink(atPath: real + "/broken", withDestinationPath: "/nonexistent-\(UUID().uuidString)")
        let out = #expect(throws: WorkFiles.FileError.self) { _ = try CommandPaths.resolve("out/passwd", in: real) }
        #expect(out?.message.contains("leads out") == true)
        #expect(throws: WorkFiles.FileError.self) { _ = try CommandPaths.resolve("out/new/deeper", in: real) }
        let broken = #expect(throws: WorkFiles.FileError.self) { _ = try CommandPaths.resolve("broken/x", in: real) }
        #expect(broken?.message.contains("broken symbolic link") == true)
        #expect(try CommandPaths.resolve("in/x", in: real) == real + "/in/x")
        #expect(try CommandPaths.resolve("new/dirs/file", in: real) == real + "/new/dirs/file")
        // The link itself (its last part) is not followed: removing "out" removes the link.
        #expect(try CommandPaths.resolve("out", in: real) == real + "/out")
    }
}

@Suite struct WorkCommandTests {
    @Test func aShellCommandStreamsItsOutputAndEndsWithItsStatus() async throws {
        let rig = try await CommandRig.start()
        defer { rig.stop() }
        let (updates, result) = try await rig.run(CommandRig.shell(["sh", "-c", "echo out1; echo err1 >&2; echo out2; exit 4"], workdir: "build/one"))
        let out = String(decoding: updates.flatMap { Array($0.stdout) }, as: UTF8.self)
        let err = String(decoding: updates.flatMap { Array($0.stderr) }, as: UTF8.self)
        #expect(out == "out1\nout2\n" && err == "err1\n", "\(out) | \(err)")
        #expect(updates.first?.header.contains("sh -c") == true, "the first update says what runs")
        #expect(result.exitStatus == 4 && result.signal == 0 && !result.interrupted && !result.timedOut && result.error.isEmpty, "\(result)")
        #expect(result.commandID != 0 && updates.allSatisfy { $0.commandID == result.commandID })
        var isDirectory: ObjCBool = false
        #expect(FileManager.default.fileExists(atPath: rig.directory + "/build/one", isDirectory: &isDirectory) && isDirectory.boolValue, "the workdir was made")
        // A program that does not exist: a result saying so (127), not an error of the protocol.
        let (_, missing) = try await rig.run(CommandRig.shell(["no-such-program-\(UUID().uuidString.prefix(6))"]))
        #expect(missing.exitStatus == 127 && missing.error.contains("cannot start"), "\(missing)")
    }

    /// [R-19.8-3] Several commands run at once on one worker: three commands that each wait
    /// (boundedly) for the markers of all three succeed only if they overlap.
    @Test func severalCommandsRunAtOnce() async throws {
        let rig = try await CommandRig.start()
        defer { rig.stop() }
        let script = "touch m$0; n=0; while [ $(ls m* | wc -l) -lt 3 ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n+1)); done; [ $(ls m* | wc -l) -ge 3 ]"
        let results = try await withThrowingTaskGroup(of: Parley_Work_V1_CommandResult.self) { group in
            for i in 0..<3 { group.addTask { try await rig.run(CommandRig.shell(["sh", "-c", script, "\(i)"], workdir: "together")).result } }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(results.count == 3 && results.allSatisfy { $0.exitStatus == 0 }, "\(results)")
        #expect(Set(results.map(\.commandID)).count == 3)
    }

    /// An interrupt sends the command's signal (SIGTERM here, which the script
    /// traps); one without a signal of its own gets SIGKILL; a command that ignores its signal
    /// gets SIGKILL after the grace time.
    @Test func interruptsStopCommandsWithTheirSignal() async throws {
        let rig = try await CommandRig.start(interruptGrace: .milliseconds(500))
        defer { rig.stop() }
        func interrupted(_ command: Parley_Work_V1_Command) async throws -> Parley_Work_V1_CommandResult {
            let run = try await rig.center.run(command, on: "w1")
            for try await event in run.events {
                switch event {
                case .update(let u):
                    if String(decoding: u.stdout, as: UTF8.self).contains("ready") {
                        #expect(try await rig.center.interrupt(run.id, reason: "test interrupt"))
                    }
                case .result(let r): return r
                }
            }
            throw ParleyTestFailure("no result")
        }
        let trapped = try await interrupted(CommandRig.shell(["sh", "-c", "trap 'echo got TERM; exit 7' TERM; echo ready; sleep 30 & wait"], signal: SIGTERM))
        #expect(trapped.exitStatus == 7 && trapped.interrupted && trapped.error == "test interrupt", "\(trapped)")
        let killed = try await interrupted(CommandRig.shell(["sh", "-c", "echo ready; sleep 30"]))
        #expect(killed.signal == SIGKILL && killed.interrupted, "\(killed)")
        let stubborn = try await interrupted(CommandRig.shell(["sh", "-c", "trap '' TERM; echo ready; while true; do sleep 0.1; done"], signal: SIGTERM))
        #expect(stubborn.signal == SIGKILL && stubborn.interrupted, "SIGKILL after the grace time: \(stubborn)")
        #expect(try await rig.center.interrupt(999, reason: "none") == false, "no such command")
        #expect(rig.executor.runningCount == 0)
    }

    /// A program that leaves a process behind outside its group (setsid), holding its
    /// output open, still ends: its result comes (with what it wrote), the pipes given up.
    @Test(.timeLimit(.minutes(3))) func aProcessThatEscapesItsGroupDoesNotHoldTheCommand() async throws {
        let rig = try await CommandRig.start()
        defer { rig.stop() }
        let (updates, result) = try await rig.run(CommandRig.shell(["sh", "-c", "setsid sh -c 'echo $$ > escaped; sleep 300' & echo done"]))
        #expect(result.exitStatus == 0 && String(decoding: updates.flatMap { Array($0.stdout) }, as: UTF8.self).contains("done"), "\(result)")
        if let pid = Int32(String(decoding: FileManager.default.contents(atPath: rig.directory + "/escaped") ?? Data(), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)) {
            kill(pid, SIGKILL)
        }
    }

    /// A child starts with no signal blocked and none ignored (the runtime's threads block
    /// most signals and ignore SIGPIPE; a child inheriting that could not be stopped with
    /// SIGTERM, and would see EPIPE where a pipe's reader left).
    @Test func childrenStartWithDefaultSignals() async throws {
        let rig = try await CommandRig.start()
        defer { rig.stop() }
        let (updates, result) = try await rig.run(CommandRig.shell(["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"]))
        let out = String(decoding: updates.flatMap { Array($0.stdout) }, as: UTF8.self)
        // Signals 1 to 31 (glibc keeps 32 and 33 for itself; no program can use them).
        let masks = Dictionary(uniqueKeysWithValues: out.split(separator: "\n").compactMap { line -> (String, UInt64)? in
            let parts = line.split(separator: "\t")
            guard parts.count == 2, let value = UInt64(parts[1], radix: 16) else { return nil }
            return (String(parts[0]), value & 0x7fff_ffff)
        })
        #expect(result.exitStatus == 0 && masks["SigBlk:"] == 0 && masks["SigIgn:"] == 0, "\(out)")
    }

    /// A job's report carries its CPU time: a busy loop's is counted, a sleep's is not.
    @Test func theRunnerMeasuresCPUTime() async throws {
        let dir = testScratchRoot
        var busy = Parley_Work_V1_JobSpec()
        busy.argv = ["/bin/sh", "-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"]
        let spent = try await JobRunner.run(busy, directory: dir, maxWall: .seconds(60), maxOutput: 100)
        var idle = Parley_Work_V1_JobSpec()
        idle.argv = ["/bin/sleep", "0.3"]
        let slept = try await JobRunner.run(idle, directory: dir, maxWall: .seconds(60), maxOutput: 100)
        #expect(spent.exitStatus == 0 && spent.cpuMs >= 50, "\(spent.cpuMs) ms")
        #expect(slept.exitStatus == 0 && slept.cpuMs < spent.cpuMs, "\(slept.cpuMs) ms")
    }

    /// A command silent for longer than its timeout is killed and says so.
    @Test func aSilentCommandTimesOut() async throws {
        let rig = try await CommandRig.start()
        defer { rig.stop() }
        let (_, result) = try await rig.run(CommandRig.shell(["sh", "-c", "echo one; sleep 30"], timeout: 1))
        #expect(result.timedOut && result.signal == SIGKILL && result.error.contains("no output for 1 s"), "\(result)")
    }

    /// [R-19.8-3] Cancelling the command (its task, or `cancel()`) makes the worker kill its child.
    @Test(arguments: [false, true]) func aCancelledCommandIsKilled(byTask: Bool) async throws {
        let rig = try await CommandRig.start()
        defer { rig.stop() }
        let run = try await rig.center.run(CommandRig.shell(["sh", "-c", "echo $$ > pid; echo ready; sleep 30; echo never"]), on: "w1")
        let ready = AsyncStream<Void>.makeStream()
        let consumer = Task {
            var out = ""
            for try await event in run.events {
                if case .update(let u) = event { out += String(decoding: u.stdout, as: UTF8.self) }
                if out.contains("ready") { ready.continuation.yield() }
            }
            return out
        }
        for await _ in ready.stream { break }
        if byTask { consumer.cancel() } else { run.cancel() }
        let pid = try #require(Int32(String(decoding: FileManager.default.contents(atPath: rig.directory + "/pid") ?? Data(), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)))
        var gone = false
        for _ in 0..<200 where !gone {
            gone = kill(pid, 0) != 0
            if !gone { try await Task.sleep(for: .milliseconds(50)) }
        }
        #expect(gone, "the child \(pid) was killed")
        #expect((try? await consumer.value)?.contains("never") != true)
        for _ in 0..<100 where rig.executor.runningCount > 0 { try await Task.sleep(for: .milliseconds(20)) }
        #expect(rig.executor.runningCount == 0 && rig.center.runningCount == 0)
    }

    @Test func filesGoBothWaysByteForByteInAcknowledgedChunks() async throws {
        let rig = try await CommandRig.start()
        defer { rig.stop() }
        var generator = SystemRandomNumberGenerator()
        let content = (0..<300_001).map { _ in UInt8.random(in: 0...255, using: &generator) }
        var download = Parley_Work_V1_Command()
        download.download.path = "in/data.bin"
        download.download.size = UInt64(content.count)
        download.download.sha256 = Data(SHA256.hash(data: content))
        download.download.mode = 0o640
        download.download.chunkSize = 65_536
        let (_, written) = try await rig.run(download, transfer: MemoryTransfer(content))
        #expect(written.exitStatus == 0 && written.size == UInt64(content.count) && written.sha256 == Data(SHA256.hash(data: content)), "\(written)")
        #expect(FileManager.default.contents(atPath: rig.directory + "/in/data.bin") == Data(content))
        var stat = Parley_Work_V1_Command()
        stat.stat.path = "in/data.bin"
        let (_, stated) = try await rig.run(stat)
        #expect(stated.stat.exists && stated.stat.kind == "file" && stated.stat.size == UInt64(content.count) && stated.stat.mode == 0o640, "\(stated)")

        var upload = Parley_Work_V1_Command()
        upload.upload.path = "in/data.bin"
        upload.upload.chunkSize = 10_000
        let sink = MemoryTransfer()
        let (_, sent) = try await rig.run(upload, transfer: sink)
        #expect(sent.exitStatus == 0 && sent.size == UInt64(content.count) && sink.bytes.withLockedValue { $0 } == content, "\(sent.error)")
        // To a file on the master's side too.
        let local = testScratchPath("upload-\(UUID().uuidString.prefix(8))")
        _ = try await rig.run(upload, transfer: WorkFileTransfer(path: local))
        #expect(FileManager.default.contents(atPath: local) == Data(content))

        // Over its limit: refused before anything is sent.
        upload.upload.maxSize = 1000
        let small = MemoryTransfer()
        let (_, over) = try await rig.run(upload, transfer: small)
        #expect(over.exitStatus == 1 && over.error.contains("over the limit of 1000") && small.bytes.withLockedValue { $0 }.isEmpty, "\(over)")
    }

    /// A directory as one tar stream: what the system's tar lists and unpacks is the tree
    /// (files, directories, a symbolic link not followed); over its limit, nothing is sent.
    @Test func aDirectoryGoesAsATarStream() async throws {
        let rig = try await CommandRig.start()
        defer { rig.stop() }
        let root = rig.directory + "/tree"
        try FileManager.default.createDirectory(atPath: root + "/sub/deeper", withIntermediateDirectories: true)
        let big = (0..<70_001).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try Data(big).write(to: URL(fileURLWithPath: root + "/sub/big.bin"))
        try Data().write(to: URL(fileURLWithPath: root + "/empty"))
        let long = String(repeating: "n", count: 90) + "/" + String(repeating: "m", count: 90)
        try FileManager.default.createDirectory(atPath: root + "/sub/deeper/" + String(repeating: "n", count: 90), withIntermediateDirectories: true)
        try Data("long\n".utf8).write(to: URL(fileURLWithPath: root + "/sub/deeper/" + long))
        try FileManager.default.createSymbolicLink(atPath: root + "/link", withDestinationPath: "/etc/passwd")
        var command = Parley_Work_V1_Command()
        command.uploadDirectory.path = "tree"
        command.uploadDirectory.chunkSize = 4096
        let tarPath = testScratchPath("tree-\(UUID().uuidString.prefix(8)).tar")
        let (_, sent) = try await rig.run(command, transfer: WorkFileTransfer(path: tarPath))
        #expect(sent.exitStatus == 0 && sent.size % 512 == 0 && sent.size > 70_001, "\(sent)")
        let out = testScratchPath("untar-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        let untar = try await runProcess("/bin/tar", ["-xf", tarPath, "-C", out], seconds: 30)
        #expect(untar.status == 0, "\(untar.combined)")
        #expect(FileManager.default.contents(atPath: out + "/sub/big.bin") == Data(big))
        #expect(FileManager.default.contents(atPath: out + "/sub/deeper/" + long) == Data("long\n".utf8))
        #expect(FileManager.default.contents(atPath: out + "/empty") == Data())
        #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: out + "/link")) == "/etc/passwd")
        let listing = try await runProcess("/bin/tar", ["-tf", tarPath], seconds: 30).stdout.split(separator: "\n").map(String.init)
        #expect(listing.first == "empty" && listing.contains("sub/deeper/") && listing.contains("link"), "\(listing)")

        command.uploadDirectory.maxSize = 10_000
        let small = MemoryTransfer()
        let (_, over) = try await rig.run(command, transfer: small)
        #expect(over.exitStatus == 1 && over.error.contains("over the limit of 10000") && small.bytes.withLockedValue { $0 }.isEmpty, "\(over)")
        command.uploadDirectory.path = "tree/empty"
        let (_, notADirectory) = try await rig.run(command, transfer: MemoryTransfer())
        #expect(notADirectory.exitStatus == 1 && notADirectory.error.contains("not a directory"))
    }

    /// A shell command's log files: their new lines come back while it runs, named. The
    /// script writes its second line only once the master has received the first (it waits
    /// for a file the test makes then), so the test does not depend on timing.
    @Test func logFilesAreStreamedWhileTheCommandRuns() async throws {
        let rig = try await CommandRig.start()
        defer { rig.stop() }
        var command = Parley_Work_V1_Command()
        command.shell.argv = ["/bin/sh", "-c", "echo line 1 >> logs/build.log; i=0; while [ ! -f go ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; if [ -f go ]; then echo line 2; else echo never streamed; fi >> logs/build.log; echo tail >> other.log"]
        command.shell.workdir = "work"
        command.shell.logfiles = ["build": "logs/build.log", "other": "other.log"]
        try FileManager.default.createDirectory(atPath: rig.directory + "/work/logs", withIntermediateDirectories: true)
        let run = try await rig.center.run(command, on: "w1")
        var build = Data(), other = Data()
        var result = Parley_Work_V1_CommandResult()
        for try await event in run.events {
            switch event {
            case .update(let u) where u.logName == "build":
                if build.isEmpty { _ = FileManager.default.createFile(atPath: rig.directory + "/work/go", contents: nil) }
                build += u.log
            case .update(let u) where u.logName == "other": other += u.log
            case .update: break
            case .result(let r): result = r
            }
        }
        #expect(result.exitStatus == 0, "\(result)")
        #expect(String(decoding: build, as: UTF8.self) == "line 1\nline 2\n")
        #expect(String(decoding: other, as: UTF8.self) == "tail\n")
        var escape = command
        escape.shell.logfiles = ["x": "../../etc/passwd"]
        await #expect(throws: ParleyError.self) { _ = try await rig.run(escape) }
    }

    /// A download that does not match what was announced, or that sends more than its limit,
    /// fails and leaves the destination as it was; no partial file stays behind.
    @Test func aBadDownloadLeavesTheDestinationUnchanged() async throws {
        let rig = try await CommandRig.start()
        defer { rig.stop() }
        try Data("old".utf8).write(to: URL(fileURLWithPath: rig.directory + "/kept.txt"))
        var download = Parley_Work_V1_Command()
        download.download.path = "kept.txt"
        download.download.sha256 = Data(SHA256.hash(data: Data("something else".utf8)))
        let (_, mismatch) = try await rig.run(download, transfer: MemoryTransfer(Array("new content".utf8)))
        #expect(mismatch.exitStatus == 1 && mismatch.error.contains("do not match the announced SHA-256"), "\(mismatch)")
        download.download.sha256 = Data()
        download.download.maxSize = 5
        let (_, tooMuch) = try await rig.run(download, transfer: MemoryTransfer(Array("new content".utf8)))
        #expect(tooMuch.exitStatus == 1 && tooMuch.error.contains("the download is over its limit of 5 bytes") && tooMuch.error.contains("unchanged"), "\(tooMuch)")
        #expect(FileManager.default.contents(atPath: rig.directory + "/kept.txt") == Data("old".utf8))
        let left = try FileManager.default.contentsOfDirectory(atPath: rig.directory)
        #expect(left == ["kept.txt"], "no partial file: \(left)")
    }

    @Test func directoriesAndFilesAreManaged() async throws {
        let rig = try await CommandRig.start()
        defer { rig.stop() }
        func run(_ build: (inout Parley_Work_V1_Command) -> Void) async throws -> Parley_Work_V1_CommandResult {
            var command = Parley_Work_V1_Command()
            build(&command)
            return try await rig.run(command).result
        }
        #expect(try await run { $0.mkdir.paths = ["src/a", "src/b"] }.exitStatus == 0)
        for name in ["src/a/x.c", "src/a/y.c", "src/b/z.h"] { _ = FileManager.default.createFile(atPath: rig.directory + "/" + name, contents: Data(name.utf8)) }
        #expect(try await run { $0.glob.path = "src/*/*.c" }.paths == ["src/a/x.c", "src/a/y.c"])
        #expect(try await run { $0.glob.path = "nothing/*" }.paths == [])
        #expect(try await run { $0.listdir.path = "src" }.paths == ["a", "b"])
        #expect(try await run { $0.listdir.path = "" }.paths == ["src"])
        #expect(try await run { $0.cpdir.from = "src"; $0.cpdir.to = "copy/src" }.exitStatus == 0)
        #expect(FileManager.default.contents(atPath: rig.directory + "/copy/src/b/z.h") == Data("src/b/z.h".utf8))
        let again = try await run { $0.cpdir.from = "src"; $0.cpdir.to = "copy/src" }
        #expect(again.exitStatus == 1 && again.error.contains("exists already"), "\(again)")
        let dirAsFile = try await run { $0.rmfile.paths = ["src/a"] }
        #expect(dirAsFile.exitStatus == 1 && dirAsFile.error.contains("is a directory"), "\(dirAsFile)")
        #expect(try await run { $0.rmfile.paths = ["src/a/x.c", "src/a/missing.c"] }.exitStatus == 0)
        #expect(!FileManager.default.fileExists(atPath: rig.directory + "/src/a/x.c"))
        #expect(try await run { $0.rmdir.paths = ["copy", "never-was"] }.exitStatus == 0)
        #expect(!FileManager.default.fileExists(atPath: rig.directory + "/copy"))
        let missing = try await run { $0.stat.path = "copy" }
        #expect(missing.exitStatus == 1 && !missing.stat.exists, "\(missing)")
        // A link out is listed as what it is, and removing it leaves its target alone.
        try FileManager.default.createSymbolicLink(atPath: rig.directory + "/etc-link", withDestinationPath: "/etc")
        #expect(try await run { $0.stat.path = "etc-link" }.stat.kind == "symlink")
        #expect(try await run { $0.glob.path = "etc-link/*" }.paths == [], "nothing through a link out")
        #expect(try await run { $0.rmfile.paths = ["etc-link"] }.exitStatus == 0)
        #expect(FileManager.default.fileExists(atPath: "/etc/passwd"))
    }

    /// Bad commands are refused with a clear error and do nothing.
    @Test func badCommandsAreRefused() async throws {
        let rig = try await CommandRig.start()
        defer { rig.stop() }
        func refusal(_ command: Parley_Work_V1_Command, on worker: String = "w1", transfer: (any WorkTransfer)? = nil) async -> ParleyError? {
            await #expect(throws: ParleyError.self) { _ = try await rig.center.run(command, on: worker, transfer: transfer).events.reduce(into: 0) { n, _ in n += 1 } }
        }
        var escape = Parley_Work_V1_Command()
        escape.mkdir.paths = ["fine", "../outside"]
        let e1 = await refusal(escape)
        #expect(e1?.code == .invalidArgument && e1?.message.contains("'..'") == true && e1?.message.contains("nothing was done") == true, "\(String(describing: e1))")
        #expect(!FileManager.default.fileExists(atPath: rig.directory + "/fine"), "nothing of it was done")
        var absolute = Parley_Work_V1_Command()
        absolute.stat.path = "/etc/passwd"
        #expect(await refusal(absolute)?.message.contains("absolute") == true)
        try FileManager.default.createSymbolicLink(atPath: rig.directory + "/out", withDestinationPath: "/tmp")
        var through = Parley_Work_V1_Command()
        through.download.path = "out/planted"
        #expect(await refusal(through, transfer: MemoryTransfer([1]))?.message.contains("leads out") == true)
        var upload = Parley_Work_V1_Command()
        upload.upload.path = "../../etc/passwd"
        #expect(await refusal(upload, transfer: MemoryTransfer())?.message.contains("'..'") == true, "checked by the master too")
        upload.upload.path = "x"
        #expect(await refusal(upload)?.message.contains("needs the master's end") == true)
        #expect(await refusal(Parley_Work_V1_Command())?.message.contains("no kind") == true)
        #expect(await refusal(CommandRig.shell([]))?.message.contains("names no program") == true)
        let unknown = await refusal(CommandRig.shell(["true"]), on: "w9")
        #expect(unknown?.message.contains("worker w9 is not connected to this master (connected: w1)") == true, "\(String(describing: unknown))")
    }

    /// [R-19.8-1] A worker runs its master's commands only when its owner said so.
    @Test func aWorkerThatDoesNotAcceptCommandsRefusesThem() async throws {
        let rig = try await CommandRig.start(accept: false)
        defer { rig.stop() }
        let refused = await #expect(throws: ParleyError.self) { _ = try await rig.run(CommandRig.shell(["sh", "-c", "touch ran"])) }
        #expect(refused?.code == .permissionDenied && refused?.message.contains("--accept-commands") == true, "\(String(describing: refused))")
        #expect(!FileManager.default.fileExists(atPath: rig.directory + "/ran"))
        // A worker whose hello says it takes no commands is not even sent one.
        let plain = try await ParleyClient.connect(inProcessTo: rig.server, logger: rig.logger)
        defer { plain.close() }
        var hello = Parley_Work_V1_WorkerHello()
        hello.worker = "w2"
        _ = try await plain.request(hello, as: Parley_Work_V1_WorkerWelcome.self)
        let early = await #expect(throws: ParleyError.self) { _ = try await rig.center.run(CommandRig.shell(["true"]), on: "w2") }
        #expect(early?.code == .permissionDenied && early?.message.contains("worker w2 does not take commands") == true, "\(String(describing: early))")
        #expect(rig.center.workers.map(\.worker) == ["w1", "w2"] && rig.center.runningCount == 0)
        // A connection is one worker: hellos under new names replace its earlier one, rather
        // than piling up; and a name must be a name.
        for name in ["w3", "w4", "w5"] {
            hello.worker = name
            _ = try await plain.request(hello, as: Parley_Work_V1_WorkerWelcome.self)
        }
        #expect(rig.center.workers.map(\.worker) == ["w1", "w5"])
        hello.worker = String(repeating: "x", count: 300)
        let long = await #expect(throws: ParleyError.self) { _ = try await plain.request(hello, as: Parley_Work_V1_WorkerWelcome.self) }
        #expect(long?.code == .invalidArgument, "\(String(describing: long))")
        plain.close()
        for _ in 0..<500 where rig.center.workers.count > 1 { try await Task.sleep(for: .milliseconds(20)) }
        #expect(rig.center.workers.map(\.worker) == ["w1"], "the closed connection's worker is gone")
    }

    /// A submitter's RunWorkerCommand: relayed with the command's id first, its transfers
    /// relayed to the submitter; refused when the master does not relay.
    @Test func theMasterRelaysCommandsForSubmittersOnlyWhenAllowed() async throws {
        let rig = try await CommandRig.start()
        defer { rig.stop() }
        let received = MemoryTransfer()
        var submitterRouter = ParleyRouter()
        submitterRouter.onWithData(Parley_Work_V1_TransferWrite.self) { (w: Parley_Work_V1_TransferWrite, ctx: ParleyRequestContext) -> ParleyReply<Parley_Work_V1_TransferWritten> in
            try await received.write(command: w.commandID, offset: w.offset, ctx.data ?? ByteBuffer())
            return ParleyReply(Parley_Work_V1_TransferWritten())
        }
        let submitter = try await ParleyClient.connect(inProcessTo: rig.server, router: submitterRouter, logger: rig.logger)
        defer { submitter.close() }
        try Data("relayed bytes".utf8).write(to: URL(fileURLWithPath: rig.directory + "/r.txt"))
        var request = Parley_Work_V1_RunWorkerCommand()
        request.worker = "w1"
        request.command.upload.path = "r.txt"
        var first: Parley_Work_V1_CommandUpdate?
        var result: Parley_Work_V1_CommandResult?
        for try await event in try await submitter.stream(request, item: Parley_Work_V1_CommandUpdate.self, final: Parley_Work_V1_CommandResult.self) {
            switch event {
            case .item(let u, _): if first == nil { first = u }
            case .final(let r): result = r
            }
        }
        #expect(first?.commandID == result?.commandID && first?.header.contains("on worker w1") == true)
        #expect(result?.size == 13 && received.bytes.withLockedValue { $0 } == Array("relayed bytes".utf8))

        let closed = try await CommandRig.start(relay: false)
        defer { closed.stop() }
        let other = try await ParleyClient.connect(inProcessTo: closed.server, logger: rig.logger)
        defer { other.close() }
        request.command = CommandRig.shell(["true"])
        let refused = await #expect(throws: ParleyError.self) {
            for try await _ in try await other.stream(request, item: Parley_Work_V1_CommandUpdate.self, final: Parley_Work_V1_CommandResult.self) {}
        }
        #expect(refused?.code == .permissionDenied && refused?.message.contains("--allow-commands") == true)
    }

    /// A command whose output comes faster than its reader takes it (here: one update per
    /// 20 ms, where `yes` fills them as fast as the worker sends) is stopped once
    /// `maxBufferedEvents` updates wait, the reader told why after those, instead of the
    /// master keeping the output in memory without end.
    @Test func aReaderThatFallsBehindStopsTheCommand() async throws {
        let rig = try await CommandRig.start()
        defer { rig.stop() }
        let run = try await rig.center.run(CommandRig.shell(["yes"]), on: "w1")
        var updates = 0
        var failure: (any Error)?
        let started = ContinuousClock.now
        do {
            for try await event in run.events {
                if case .update = event { updates += 1 }
                if ContinuousClock.now - started > .seconds(120) { break }
                try await Task.sleep(for: .milliseconds(20))
            }
        } catch {
            failure = error
        }
        #expect((failure as? ParleyError)?.message.contains("faster than it was read") == true, "\(String(describing: failure)) after \(updates) updates")
        // And the worker's process goes: the stream's end tells the worker (CANCEL).
        var stopped = false
        for _ in 0..<1200 where !stopped {
            stopped = rig.executor.runningCount == 0
            if !stopped { try await Task.sleep(for: .milliseconds(50)) }
        }
        #expect(stopped, "the command still runs on the worker")
    }

    /// Updates are capped in bytes as well as in number: a worker whose updates are large
    /// (here 1 MiB each; a frame may carry 16 MiB) and a reader that reads nothing stop the
    /// command once 64 MiB wait, long before 1,024 updates. Before, only the count was
    /// capped: up to 1,025 updates of 16 MiB, some 16 GiB, per command.
    @Test func largeUpdatesAreCappedInBytes() async throws {
        final class FloodLink: WorkCommandLink {
            let interrupted = NIOLockedValueBox(false)
            func run(_ command: Parley_Work_V1_Command, transfer: (any WorkTransfer)?) async throws -> AsyncThrowingStream<WorkCommandCenter.Event, any Error> {
                let (events, continuation) = AsyncThrowingStream<WorkCommandCenter.Event, any Error>.makeStream()
                var update = Parley_Work_V1_CommandUpdate()
                update.commandID = command.commandID
                update.stdout = Data(count: 1 << 20)  // one buffer shared by every update
                for _ in 0..<200 { continuation.yield(.update(update)) }
                continuation.yield(.result(Parley_Work_V1_CommandResult()))
                continuation.finish()
                return events
            }
            func interrupt(_ commandID: UInt64, signal: Int32, reason: String) async throws -> Bool { false }
        }
        var quiet = Logger(label: "test")
        quiet.logLevel = .critical
        let center = WorkCommandCenter(logger: quiet)
        var hello = Parley_Work_V1_WorkerHello()
        hello.worker = "flood"
        hello.commands = true
        center.attach(hello, link: FloodLink())
        let run = try await center.run(CommandRig.shell(["true"]), on: "flood")
        // Nothing read until the pump has stopped (the command's entry goes when it ends).
        var gone = false
        for _ in 0..<200 where !gone {
            gone = center.runningCount == 0
            if !gone { try await Task.sleep(for: .milliseconds(25)) }
        }
        #expect(gone, "the command still runs")
        var updates = 0
        var failure: (any Error)?
        do {
            for try await event in run.events { if case .update = event { updates += 1 } }
        } catch {
            failure = error
        }
        #expect((failure as? ParleyError)?.message.contains("MiB waiting") == true, "\(String(describing: failure)) after \(updates) updates")
        #expect(updates > 0 && updates <= 65, "\(updates) updates of 1 MiB were kept")
    }

    /// [R-19.8-4] A rogue worker's transfers: out of order, past the limit, for a command it does not
    /// run, or for another worker's command: each refused, nothing written.
    @Test func transfersOutOfTheirCommandAreRefused() async throws {
        let rig = try await CommandRig.start()
        defer { rig.stop() }
        let seen = NIOLockedValueBox<[String]>([])
        let released = NIOLockedValueBox(false)
        var rogueRouter = ParleyRouter()
        rogueRouter.onStream(Parley_Work_V1_Command.self, item: Parley_Work_V1_CommandUpdate.self) { command, _, ctx in
            if command.upload.path == "hold" {
                for _ in 0..<200 where !released.withLockedValue({ $0 }) { try await Task.sleep(for: .milliseconds(25)) }
                return Parley_Work_V1_CommandResult()
            }
            func attempt(_ id: UInt64, offset: UInt64, bytes: Int) async {
                var w = Parley_Work_V1_TransferWrite()
                w.commandID = id
                w.offset = offset
                do {
                    _ = try await ctx.connection.call(w, data: ByteBuffer(repeating: 1, count: bytes), as: Parley_Work_V1_TransferWritten.self)
                    seen.withLockedValue { $0.append("accepted") }
                } catch let error as ParleyError {
                    seen.withLockedValue { $0.append(error.message) }
                } catch {}
            }
            await attempt(command.commandID, offset: 5, bytes: 1)          // not the next offset
            await attempt(command.commandID, offset: 0, bytes: 11)         // past the limit of 10
            await attempt(command.commandID + 100, offset: 0, bytes: 1)    // no such command
            await attempt(command.commandID, offset: 0, bytes: 4)          // fine
            await attempt(command.commandID, offset: 0, bytes: 4)          // a chunk sent twice
            var r = Parley_Work_V1_TransferRead()
            r.commandID = command.commandID
            r.length = 4
            do { _ = try await ctx.connection.call(r, as: Parley_Work_V1_TransferData.self) } catch let error as ParleyError { seen.withLockedValue { $0.append(error.message) } }
            return Parley_Work_V1_CommandResult()
        }
        let rogue = try await ParleyClient.connect(inProcessTo: rig.server, router: rogueRouter, logger: rig.logger)
        defer { rogue.close() }
        var hello = Parley_Work_V1_WorkerHello()
        hello.worker = "rogue"
        hello.commands = true
        _ = try await rogue.request(hello, as: Parley_Work_V1_WorkerWelcome.self)
        var upload = Parley_Work_V1_Command()
        upload.upload.path = "x"
        upload.upload.maxSize = 10
        let sink = MemoryTransfer()
        let run = try await rig.center.run(upload, on: "rogue", transfer: sink)
        for try await _ in run.events {}
        let messages = seen.withLockedValue { $0 }
        #expect(messages.count == 6, "\(messages)")
        if messages.count == 6 {
            #expect(messages[0].contains("offset 5 where 0 was next"))
            #expect(messages[1].contains("over its limit of 10"))
            #expect(messages[2].contains("no command"))
            #expect(messages[3] == "accepted")
            #expect(messages[4].contains("offset 0 where 4 was next"))
            #expect(messages[5].contains("is not a download"))
        }
        #expect(sink.bytes.withLockedValue { $0 } == [1, 1, 1, 1], "only the good chunk was written")

        // The real worker w1 cannot write into the rogue's command while it runs.
        upload.upload.path = "hold"
        let held = try await rig.center.run(upload, on: "rogue", transfer: sink)
        var w = Parley_Work_V1_TransferWrite()
        w.commandID = held.id
        let foreign = await #expect(throws: ParleyError.self) { _ = try await rig.worker.call(w, data: ByteBuffer(bytes: [9]), as: Parley_Work_V1_TransferWritten.self) }
        #expect(foreign?.message.contains("command \(held.id) is not this worker's") == true, "\(String(describing: foreign))")
        released.withLockedValue { $0 = true }
        for try await _ in held.events {}
        #expect(sink.bytes.withLockedValue { $0 } == [1, 1, 1, 1])
    }
}

/// Numbers from the file system that `Int64(_: Double)` traps on (a file touched to
/// `@1e17`): held to Int64's range, and to a tar header's field.
@Suite struct WorkNumbersTests {
    @Test func doublesBecomeInt64WithoutTrapping() {
        #expect(Int64(saturating: 1.9) == 1 && Int64(saturating: -1.9) == -1)
        #expect(Int64(saturating: .nan) == 0)
        #expect(Int64(saturating: .infinity) == .max && Int64(saturating: -Double.infinity) == .min)
        #expect(Int64(saturating: 1e17 * 1000) == .max && Int64(saturating: -1e300) == .min)
        #expect(Int64(saturating: 0x1p63) == .max && Int64(saturating: -0x1p63) == .min)
        #expect(Int64(ifRepresentable: 0x1p63) == nil && Int64(ifRepresentable: -0x1p63) == .min)
        #expect(Int64(ifRepresentable: .nan) == nil && Int64(ifRepresentable: .infinity) == nil && Int64(ifRepresentable: -Double.infinity) == nil)
        #expect(Int64(ifRepresentable: 9.2e18) == 9_200_000_000_000_000_000)
    }

    @Test func aTarHeaderHoldsTimesToItsField() throws {
        func mtimeField(_ mtime: Int64) throws -> String {
            let block = try WorkTarStream.header(.init(name: "f", path: "/f", kind: .file, size: 0, mode: 0o644, mtime: mtime, link: ""))
            return String(decoding: block[136..<147], as: UTF8.self)
        }
        #expect(try mtimeField(1_700_000_000) == "14524770400")
        #expect(try mtimeField(0o77777777777) == "77777777777")
        #expect(try mtimeField(15_032_385_535) == "77777777777")  // ext4's largest time
        #expect(try mtimeField(.max) == "77777777777")
        #expect(try mtimeField(-5) == "00000000000")
    }

    /// The file system keeps what it can of the time (tmpfs keeps 1e17, ext4 holds it to
    /// 2446, past what the tar field holds): no trap, and stat and upload report what it kept.
    @Test func aFileFromTheFarFutureIsStatedUploadedAndTarred() async throws {
        let rig = try await CommandRig.start()
        defer { rig.stop() }
        let root = rig.directory + "/far"
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        try Data("x".utf8).write(to: URL(fileURLWithPath: root + "/future"))
        var times = [timespec(tv_sec: 100_000_000_000_000_000, tv_nsec: 0), timespec(tv_sec: 100_000_000_000_000_000, tv_nsec: 0)]
        #expect(utimensat(AT_FDCWD, root + "/future", &times, 0) == 0)
        let date = try #require(try FileManager.default.attributesOfItem(atPath: root + "/future")[.modificationDate] as? Date)
        let kept = date.timeIntervalSince1970

        let tar = try WorkTarStream(root: root)
        let stream = try tar.next(max: 1 << 20)
        #expect(stream.count == 2048)
        if kept > Double(WorkTarStream.maxTarTime) {
            #expect(String(decoding: stream[136..<147], as: UTF8.self) == "77777777777", "\(kept)")
        }

        var stat = Parley_Work_V1_Command()
        stat.stat.path = "far/future"
        let (_, stated) = try await rig.run(stat)
        #expect(stated.stat.exists && stated.stat.mtimeUnixMs == Int64(saturating: kept * 1000), "\(kept): \(stated)")
        var upload = Parley_Work_V1_Command()
        upload.upload.path = "far/future"
        let (_, sent) = try await rig.run(upload, transfer: MemoryTransfer())
        #expect(sent.exitStatus == 0 && sent.stat.mtimeUnixMs == stated.stat.mtimeUnixMs, "\(sent)")
    }
}
