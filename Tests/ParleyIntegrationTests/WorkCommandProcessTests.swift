import Foundation
import ParleyTestSupport
import Testing

/// Master-initiated commands between real processes (protocol.md 19.8): `parley work serve
/// --allow-commands`, `parley work worker --accept-commands`, and `parley work command`.
@Suite(.serialized, .timeLimit(.minutes(10))) struct WorkCommandProcessTests {
    @Test func commandsRunOnAWorkerThroughItsMaster() async throws {
        let dir = freshTestDirectory("work-commands")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        let master = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/jobs.sqlite", "--allow-commands"], command: ["work", "serve"])
        let worker = try WorkProcessTests.Workers(count: 1, master: master.address, trust: dir + "/keys/work.pub", dir: dir, names: ["builder"], extraArguments: ["--accept-commands"])
        let plain = try WorkProcessTests.Workers(count: 1, master: master.address, trust: dir + "/keys/work.pub", dir: dir, names: ["plain"])
        defer { worker.stopBlocking(); plain.stopBlocking() }
        let target = ["--master", master.address, "--worker", "builder"]
        let connected = try await eventually(seconds: 30) {
            let out = (try? await parley(["work", "workers", "--master", master.address]))?.stdout ?? ""
            return out.contains("builder") && out.contains("takes commands") && out.contains("plain")
        }
        if !connected { Issue.record("workers: \(String(describing: try? await parley(["work", "workers", "--master", master.address]).combined))") }

        // A program: its output streamed back, its exit status the command's.
        let run = try await parley(["work", "command", "run"] + target + ["--env", "PATH=/usr/bin:/bin", "--", "sh", "-c", "echo out; echo err >&2; exit 5"])
        #expect(run.status == 5 && run.stdout == "out\n" && run.stderr.contains("err"), "\(run.combined)")

        // A file there and back, byte for byte; its mode as asked.
        var generator = SystemRandomNumberGenerator()
        let content = Data((0..<1_000_003).map { _ in UInt8.random(in: 0...255, using: &generator) })
        try content.write(to: URL(fileURLWithPath: dir + "/original.bin"))
        let down = try await parley(["work", "command", "download"] + target + ["--file-mode", "600", dir + "/original.bin", "inbox/copy.bin"])
        #expect(down.status == 0 && down.stdout.contains("1000003 bytes"), "\(down.combined)")
        #expect(FileManager.default.contents(atPath: "\(dir)/builder/commands/inbox/copy.bin") == content)
        let stat = try await parley(["work", "command", "stat"] + target + ["inbox/copy.bin"])
        #expect(stat.status == 0 && stat.stdout.contains("file 1000003 bytes mode 600"), "\(stat.combined)")
        let up = try await parley(["work", "command", "upload"] + target + ["inbox/copy.bin", dir + "/back.bin"])
        #expect(up.status == 0 && FileManager.default.contents(atPath: dir + "/back.bin") == content, "\(up.combined)")
        // With --json too (the result's SHA-256 was not taken, and every upload refused as
        // "the bytes received do not match").
        let upJSON = try await parley(["work", "command", "upload", "--json"] + target + ["inbox/copy.bin", dir + "/back2.bin"])
        #expect(upJSON.status == 0 && upJSON.stdout.contains("sha256") && FileManager.default.contents(atPath: dir + "/back2.bin") == content, "\(upJSON.combined)")
        let glob = try await parley(["work", "command", "glob"] + target + ["inbox/*.bin"])
        #expect(glob.status == 0 && glob.stdout == "inbox/copy.bin\n", "\(glob.combined)")

        // An interrupt (the first Ctrl-C of `parley work command run`): the command's own
        // signal, which the script traps, and the status the script then exits with.
        let parleyPath = try #require(parleyExecutablePath())
        let long = Process()
        long.executableURL = URL(fileURLWithPath: parleyPath)
        long.arguments = ["work", "command", "run"] + target + ["--interrupt-signal", "15", "--", "/bin/sh", "-c", "trap 'echo got TERM; exit 7' TERM; echo ready; sleep 30 & wait"]
        let outPath = dir + "/long.out"
        _ = FileManager.default.createFile(atPath: outPath, contents: nil)
        long.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: outPath))
        long.standardError = FileHandle.nullDevice
        try long.run()
        defer { if long.isRunning { kill(long.processIdentifier, SIGKILL) } }
        let ready = try await eventually(seconds: 20) { String(decoding: FileManager.default.contents(atPath: outPath) ?? Data(), as: UTF8.self).contains("ready") }
        #expect(ready)
        kill(long.processIdentifier, SIGINT)
        for _ in 0..<1000 where long.isRunning { try await Task.sleep(for: .milliseconds(20)) }
        #expect(!long.isRunning)
        if !long.isRunning {
            let out = String(decoding: FileManager.default.contents(atPath: outPath) ?? Data(), as: UTF8.self)
            #expect(long.terminationStatus == 7 && out.contains("got TERM"), "status \(long.terminationStatus): \(out)")
        }

        // Refusals: a worker that takes no commands, a path out of the directory, a worker
        // that is not there, a master that does not relay.
        let refused = try await parley(["work", "command", "run", "--master", master.address, "--worker", "plain", "--", "/bin/true"])
        #expect(refused.status == 2 && refused.combined.contains("--accept-commands"), "\(refused.combined)")
        let escape = try await parley(["work", "command", "mkdir"] + target + ["../escaped"])
        #expect(escape.status == 2 && escape.combined.contains("'..'") && !FileManager.default.fileExists(atPath: "\(dir)/builder/escaped"), "\(escape.combined)")
        let absent = try await parley(["work", "command", "ls", "--master", master.address, "--worker", "nobody"])
        #expect(absent.status == 2 && absent.combined.contains("worker nobody is not connected"), "\(absent.combined)")
        let closed = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/other.sqlite"], command: ["work", "serve"])
        let noRelay = try await parley(["work", "command", "ls", "--master", closed.address, "--worker", "builder"])
        #expect(noRelay.status == 2 && noRelay.combined.contains("--allow-commands"), "\(noRelay.combined)")
        await closed.stop()
        await master.stop()
    }
}
