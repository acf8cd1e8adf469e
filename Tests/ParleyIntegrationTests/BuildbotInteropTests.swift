import Foundation
import ParleyTestSupport
import Testing

/// The Buildbot front end with the real, unmodified `buildbot-worker` 4.3.0 (pip, installed
/// by .ci/run), as processes on 127.0.0.1: `parley work serve --buildbot`, the worker logging
/// in with a keyring entity, jobs from the store, commands, an interrupt, a master restart.
@Suite(.serialized, .timeLimit(.minutes(10))) struct BuildbotInteropTests {
    /// `buildbot-worker` on PATH, or beside the python3 that pip installed it for.
    static func workerProgram() async -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        for dir in path.split(separator: ":") where FileManager.default.isExecutableFile(atPath: "\(dir)/buildbot-worker") {
            return "\(dir)/buildbot-worker"
        }
        for python in path.split(separator: ":").map({ "\($0)/python3" }) where FileManager.default.isExecutableFile(atPath: python) {
            guard let out = try? await runProcess(python, ["-c", "import sys, os; print(os.path.dirname(os.path.realpath(sys.executable)))"], seconds: 30) else { continue }
            let candidate = out.stdout.trimmingCharacters(in: .whitespacesAndNewlines) + "/buildbot-worker"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    /// A port free now on 127.0.0.1 (the worker needs a fixed master address across restarts).
    static func freePort() throws -> Int { try freeLoopbackPort() }

    /// The worker process: created with `buildbot-worker create-worker`, run in the
    /// foreground, stopped by PID.
    final class WorkerProcess {
        let process = Process()
        let directory: String
        var log: String { String(decoding: FileManager.default.contents(atPath: self.directory + "/twistd.log") ?? Data(), as: UTF8.self) }

        init(program: String, directory: String, master: String, name: String, password: String) async throws {
            self.directory = directory
            let created = try await runProcess(program, ["create-worker", "--protocol=msgpack_experimental_v7", "--keepalive=10", directory, master, name, password], seconds: 60)
            try #require(created.status == 0, "create-worker: \(created.combined)")
            self.process.executableURL = URL(fileURLWithPath: program)
            self.process.arguments = ["start", "--nodaemon", directory]
            self.process.currentDirectoryURL = URL(fileURLWithPath: directory)
            self.process.standardOutput = FileHandle.nullDevice
            self.process.standardError = FileHandle.nullDevice
            try self.process.run()
        }

        func stop() { stopProcessBlocking(self.process) }

        deinit { self.stop() }
    }

    static func results(_ master: String, _ job: String) async -> String {
        (try? await parley(["work", "results", job, "--master", master]))?.stdout ?? ""
    }

    @Test func anUnmodifiedBuildbotWorkerRunsJobsAndCommands() async throws {
        guard let program = await Self.workerProgram() else {
            Issue.record("buildbot-worker is not installed (.ci/run installs it: pip install buildbot-worker==4.3.0)")
            return
        }
        let dir = freshTestDirectory("buildbot")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        let keyring = dir + "/keyring.json"
        #expect(try await parley(["keyring", "add", "bb1", "--keyring", keyring, "--caps", "work.worker"]).status == 0)
        let password = try await parley(["keyring", "key", "bb1", "--keyring", keyring]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let port = try Self.freePort()
        let serveArguments = [
            "--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/jobs.sqlite", "--buildbot", "ws://127.0.0.1:\(port)", "--keyring", keyring,
            "--allow-commands", "--trust", dir + "/keys/work.pub", "--max-attempts", "1", "--buildbot-keepalive", "5",
        ]
        var master = try await ServeProcess.start(serveArguments, command: ["work", "serve"])
        let worker = try await WorkerProcess(program: program, directory: dir + "/worker", master: "127.0.0.1:\(port)", name: "bb1", password: password)
        defer { worker.stop() }
        let connected = try await master.waitForLog("buildbot worker connected", "worker=bb1", seconds: 60)
        try #require(connected, "the worker did not log in: \(master.log)\n\(worker.log)")

        // A job from the store: its input sent down, its output streamed and recorded, its
        // output file fetched back.
        try Data("input-bytes\n".utf8).write(to: URL(fileURLWithPath: dir + "/in.txt"))
        let submit = try await parley(["work", "submit", "--master", master.address, "--key", dir + "/keys/work.key", "--shell", "--input", "in.txt=\(dir)/in.txt",
                                 "--output", "out.txt", "--", "echo to-stdout; echo to-stderr >&2; tr a-z A-Z < in.txt > out.txt"])
        #expect(submit.status == 0, "\(submit.combined)")
        let job = submit.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let done = try await eventually(seconds: 60) { await Self.results(master.address, job).contains("succeeded") }
        if !done { Issue.record("\(await Self.results(master.address, job))\n\(master.log)") }
        let json = try await parley(["work", "results", job, "--master", master.address, "--json", "--save-outputs", dir + "/outputs"])
        #expect(json.stdout.contains("\"worker\":\"bb1\"") && json.stdout.contains(Data("to-stdout\n".utf8).base64EncodedString())
                && json.stdout.contains(Data("to-stderr\n".utf8).base64EncodedString()), "\(json.combined)")
        #expect(FileManager.default.contents(atPath: dir + "/outputs/out.txt") == Data("INPUT-BYTES\n".utf8))

        // A failing job: its exit status recorded.
        let failing = try await parley(["work", "submit", "--master", master.address, "--key", dir + "/keys/work.key", "--", "sh", "-c", "exit 3"])
        let failed = failing.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let recorded = try await eventually(seconds: 60) { await Self.results(master.address, failed).contains("failed") }
        let failedResults = await Self.results(master.address, failed)
        #expect(recorded && failedResults.contains("exit status 3"), "\(failedResults)")

        // Commands: a file down and back, byte for byte, the copy keeping the worker file's
        // modification time (keepstamp, which the stock master cannot do).
        let target = ["--master", master.address, "--worker", "bb1"]
        var generator = SystemRandomNumberGenerator()
        let content = Data((0..<700_001).map { _ in UInt8.random(in: 0...255, using: &generator) })
        try content.write(to: URL(fileURLWithPath: dir + "/original.bin"))
        let down = try await parley(["work", "command", "download"] + target + [dir + "/original.bin", "copy.bin"])
        #expect(down.status == 0 && down.stdout.contains("700001 bytes"), "\(down.combined)")
        #expect(FileManager.default.contents(atPath: dir + "/worker/commands/copy.bin") == content)
        try FileManager.default.setAttributes([.modificationDate: Date(timeIntervalSince1970: 1_577_934_245)], ofItemAtPath: dir + "/worker/commands/copy.bin")
        let up = try await parley(["work", "command", "upload"] + target + ["copy.bin", dir + "/back.bin"])
        #expect(up.status == 0 && FileManager.default.contents(atPath: dir + "/back.bin") == content, "\(up.combined)")
        let modified = (try? FileManager.default.attributesOfItem(atPath: dir + "/back.bin")[.modificationDate] as? Date)?.timeIntervalSince1970
        #expect(modified == 1_577_934_245, "mtime \(String(describing: modified))")
        // Over the limit: refused, nothing written here.
        let tooBig = try await parley(["work", "command", "upload"] + target + ["--max-size", "1000", "copy.bin", dir + "/small.bin"])
        #expect(tooBig.status != 0 && tooBig.stderr.contains("Maximum filesize") && !FileManager.default.fileExists(atPath: dir + "/small.bin"), "\(tooBig.combined)")
        let run = try await parley(["work", "command", "run"] + target + ["--", "sh", "-c", "echo out; echo err >&2; exit 5"])
        #expect(run.status == 5 && run.stdout == "out\n" && run.stderr.contains("err"), "\(run.combined)")
        // A log file streamed while the command runs, then the directory it made as a tar.
        let logged = try await parley(["work", "command", "run"] + target + ["--logfile", "build=out/build.log", "--", "sh", "-c",
                                  "mkdir -p out/sub; for i in 1 2; do echo step $i >> out/build.log; sleep 1.2; done; echo deep > out/sub/x.txt"])
        #expect(logged.status == 0 && logged.stdout.contains("[build] step 1\n") && logged.stdout.contains("[build] step 2\n"), "\(logged.combined)")
        let tree = try await parley(["work", "command", "upload"] + target + ["--directory", "out", dir + "/out.tar"])
        #expect(tree.status == 0, "\(tree.combined)")
        let untarred = dir + "/untarred"
        try FileManager.default.createDirectory(atPath: untarred, withIntermediateDirectories: true)
        _ = try await runProcess("/bin/tar", ["-xf", dir + "/out.tar", "-C", untarred], seconds: 30)
        #expect(FileManager.default.contents(atPath: untarred + "/sub/x.txt") == Data("deep\n".utf8))
        #expect(FileManager.default.contents(atPath: untarred + "/build.log") == Data("step 1\nstep 2\n".utf8))
        let stat = try await parley(["work", "command", "stat"] + target + ["nothing-here"])
        #expect(stat.status == 1, "\(stat.combined)")

        // A long command, interrupted with Ctrl-C: killed on the worker, status 128 + 9.
        let parleyPath = try #require(parleyExecutablePath())
        let long = Process()
        long.executableURL = URL(fileURLWithPath: parleyPath)
        long.arguments = ["work", "command", "run"] + target + ["--", "sleep", "60"]
        let errPath = dir + "/long.err"
        _ = FileManager.default.createFile(atPath: errPath, contents: nil)
        long.standardOutput = FileHandle.nullDevice
        long.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: errPath))
        try long.run()
        defer { if long.isRunning { kill(long.processIdentifier, SIGKILL) } }
        let started = try await eventually(seconds: 30) { String(decoding: FileManager.default.contents(atPath: errPath) ?? Data(), as: UTF8.self).contains("argv") }
        #expect(started)
        kill(long.processIdentifier, SIGINT)
        for _ in 0..<1500 where long.isRunning { try await Task.sleep(for: .milliseconds(20)) }
        #expect(!long.isRunning)
        if !long.isRunning {
            let err = String(decoding: FileManager.default.contents(atPath: errPath) ?? Data(), as: UTF8.self)
            #expect(long.terminationStatus == 128 + 9 && err.contains("killed by signal 9"), "status \(long.terminationStatus): \(err)")
        }

        // A worker that stops answering (SIGSTOP) in the middle of a job: the keepalive times
        // out (5 s here), the connection is closed and the job handed back (the attempt does
        // not count). Woken (SIGCONT), the worker logs in again and the job runs to its end.
        // The job runs until the test releases it (a file), so it is still running when the
        // worker is stopped, however loaded the machine (a 3 s sleep once ended first).
        let release = dir + "/release-slow-job"
        let slow = try await parley(["work", "submit", "--master", master.address, "--key", dir + "/keys/work.key", "--", "sh", "-c",
                               "i=0; while [ ! -f \(release) ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; echo slow-done"])
        let slowJob = slow.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let leased = try await eventually(seconds: 30) { ((try? await parley(["work", "status", "--master", master.address]))?.stdout ?? "").contains("leased 1") }
        #expect(leased)
        // A relayed command too: its submitter is told when the worker is dropped.
        let waiting = Process()
        waiting.executableURL = URL(fileURLWithPath: parleyPath)
        waiting.arguments = ["work", "command", "run"] + target + ["--", "sleep", "60"]
        let waitingOut = dir + "/waiting.out"
        _ = FileManager.default.createFile(atPath: waitingOut, contents: nil)
        waiting.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: waitingOut))
        waiting.standardError = waiting.standardOutput
        try waiting.run()
        defer { if waiting.isRunning { kill(waiting.processIdentifier, SIGKILL) } }
        _ = try await eventually(seconds: 30) { String(decoding: FileManager.default.contents(atPath: waitingOut) ?? Data(), as: UTF8.self).contains("argv") }
        let beforeStop = master.logMark
        kill(worker.process.processIdentifier, SIGSTOP)
        let dropped = try await master.waitForLog("job handed back", "job=\(slowJob)", after: beforeStop, seconds: 30)
        for _ in 0..<500 where waiting.isRunning { try await Task.sleep(for: .milliseconds(20)) }
        kill(worker.process.processIdentifier, SIGCONT)
        #expect(dropped, "\(master.log)")
        let told = String(decoding: FileManager.default.contents(atPath: waitingOut) ?? Data(), as: UTF8.self)
        #expect(!waiting.isRunning && waiting.terminationStatus != 0 && told.contains("worker bb1 went away before command"), "\(told)")
        #expect(try await master.waitForLog("buildbot worker connected", "worker=bb1", after: beforeStop, seconds: 60))
        _ = FileManager.default.createFile(atPath: release, contents: nil)
        let slowDone = try await eventually(seconds: 60) { await Self.results(master.address, slowJob).contains("succeeded") }
        let slowResults = await Self.results(master.address, slowJob)
        #expect(slowDone && slowResults.contains("slow-done"), "\(slowResults)\n\(master.log)\n\(worker.log.suffix(4000))")

        // The master restarts: the worker logs in again by itself and takes the next job.
        #expect(await master.stop() == 0)
        master = try await ServeProcess.start(serveArguments, command: ["work", "serve"])
        let back = try await master.waitForLog("buildbot worker connected", "worker=bb1", seconds: 90)
        #expect(back, "\(master.log)\n\(worker.log.suffix(3000))")
        let again = try await parley(["work", "submit", "--master", master.address, "--key", dir + "/keys/work.key", "--", "echo", "after-restart"])
        let third = again.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let after = try await eventually(seconds: 60) { await Self.results(master.address, third).contains("succeeded") }
        let thirdResults = await Self.results(master.address, third)
        #expect(after && thirdResults.contains("after-restart"), "\(thirdResults)")

        // Its entity revoked: at the next keepalive (5 s here) the master tells it to shut
        // down, and the worker process exits.
        #expect(try await parley(["keyring", "revoke", "bb1", "--keyring", keyring]).status == 0)
        for _ in 0..<1500 where worker.process.isRunning { try await Task.sleep(for: .milliseconds(20)) }
        #expect(!worker.process.isRunning, "\(master.log)")
        #expect(try await master.waitForLog("told to shut down", "revoked", seconds: 5))
        await master.stop()
    }
}
