import Foundation
import ParleyTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

func boincClientInstalled() -> Bool {
    FileManager.default.isExecutableFile(atPath: "/usr/bin/boinc") && FileManager.default.isExecutableFile(atPath: "/usr/bin/boinccmd")
}

/// The real BOINC client (Debian's boinc-client 7.20, unmodified) against `parley work serve
/// --boinc`, as processes on 127.0.0.1, each stopped by PID. Skipped, saying so, where
/// `boinc` is not installed (CI installs it).
@Suite(.serialized, .enabled(if: boincClientInstalled(), "boinc and boinccmd are not installed (apt-get install boinc-client)"))
struct BOINCClientProcessTests {
    static let boinc = "/usr/bin/boinc", boinccmd = "/usr/bin/boinccmd"

    /// A program run in the background, its output in a file; stopped by PID.
    final class Background: @unchecked Sendable {
        let process = Process()
        let logPath: String

        init(_ executable: String, _ arguments: [String], log: String, directory: String? = nil) throws {
            self.logPath = log
            _ = FileManager.default.createFile(atPath: log, contents: nil)
            self.process.executableURL = URL(fileURLWithPath: executable)
            self.process.arguments = arguments
            if let directory { self.process.currentDirectoryURL = URL(fileURLWithPath: directory) }
            self.process.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
            self.process.standardError = self.process.standardOutput
            try self.process.run()
        }

        var log: String { (try? String(contentsOfFile: self.logPath, encoding: .utf8)) ?? "" }

        /// SIGTERM, then SIGKILL after 5 s.
        func stop() { stopProcessBlocking(self.process) }

        deinit { if self.process.isRunning { kill(self.process.processIdentifier, SIGKILL) } }
    }

    /// A port nobody listens on now.
    static func freePort() throws -> Int { try freeLoopbackPort() }

    static func parley(_ arguments: [String], seconds: Double = 60) async throws -> ProcessOutput {
        try await runProcess(try #require(parleyExecutablePath(), "parley executable not built"), arguments, seconds: seconds)
    }

    /// Polls `condition` every 0.5 s for at most `seconds`.
    static func eventually(seconds: Double, _ condition: () async throws -> Bool) async throws -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if try await condition() { return true }
            try await Task.sleep(for: .milliseconds(500))
        }
        return try await condition()
    }

    static func result(_ master: String, _ job: Int) async throws -> [String: Any] {
        let out = try await parley(["work", "results", "--master", master, "--json", "\(job)"])
        guard out.status == 0, let object = try JSONSerialization.jsonObject(with: Data(out.stdout.utf8)) as? [String: Any] else {
            throw ParleyTestFailure("results failed: \(out.combined)")
        }
        return object
    }

    /// The times of the scheduler RPCs the master's log records, in seconds since 1970.
    static func rpcTimes(_ log: String) -> [Double] {
        let formatter = ISO8601DateFormatter()
        return log.split(separator: "\n").filter { $0.contains("boinc scheduler rpc") }.compactMap { line in
            line.split(separator: " ").first.flatMap { formatter.date(from: String($0)) }?.timeIntervalSince1970
        }
    }

    /// An unmodified `boinc` attaches to `parley work serve --boinc`, fetches a job submitted
    /// with `parley work submit` (while a native worker on the same store runs another), runs it, uploads its output and reports it; the store shows
    /// it succeeded once with the right bytes, and the client drops the task once acked. The
    /// master page lists a dead scheduler URL too (the client fails over from it when it tries
    /// it first), and the client waits out the master's request delay before reporting. Then the master comes
    /// back with another BOINC key: the client, holding the first, refuses the next job's
    /// program (-120) and reports that, which the store records as the job's failure.
    @Test(.timeLimit(.minutes(5))) func anUnmodifiedClientRunsASignedJobAndRefusesABadlySignedOne() async throws {
        let dir = testScratchPath("parley-boinc-client-\(UUID().uuidString)")
        try FileManager.default.createDirectory(atPath: dir + "/client", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(try await Self.parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        #expect(try await Self.parley(["work", "keygen", "--boinc", "--dir", dir + "/boinc-a"]).status == 0)
        #expect(try await Self.parley(["work", "keygen", "--boinc", "--dir", dir + "/boinc-b"]).status == 0)
        let parleyPort = try Self.freePort(), boincPort = try Self.freePort(), guiPort = try Self.freePort()
        let master = "127.0.0.1:\(parleyPort)", url = "http://127.0.0.1:\(boincPort)/"
        let parley = try #require(parleyExecutablePath())
        let delay = 15.0
        func serve(_ key: String, _ extra: [String], log: String) throws -> Background {
            try Background(parley, [
                "work", "serve", "--listen", master, "--database", "sqlite:\(dir)/jobs.sqlite", "--trust", dir + "/keys/work.pub",
                "--max-attempts", "1", "--log-level", "debug", "--boinc", url, "--boinc-key", dir + "/\(key)/code_sign_private",
            ] + extra, log: dir + "/" + log)
        }
        // The master page lists first a scheduler nobody serves.
        let dead = "http://127.0.0.1:\(try Self.freePort())/scheduler"
        var server = try serve("boinc-a", [
            "--boinc-request-delay", "\(Int(delay))", "--boinc-notice", "Hello from Parley", "--boinc-scheduler", dead, "--boinc-scheduler", url + "scheduler",
            "--boinc-app", "boinc-only",
        ], log: "serve-a.log")
        defer { server.stop() }
        #expect(try await Self.eventually(seconds: 20) { server.log.contains("boinc front end listening") && server.log.contains("listening") }, "\(server.log)")

        try Data("the input\n".utf8).write(to: URL(fileURLWithPath: dir + "/in.txt"))
        let submitted = try await Self.parley([
            "work", "submit", "--master", master, "--key", dir + "/keys/work.key", "--input", "in.txt=\(dir)/in.txt", "--output", "out.txt", "--shell",
            "--app", "boinc-only", "--", "cat in.txt > out.txt; echo ran >> out.txt; echo to-stdout; echo to-stderr >&2",
        ])
        #expect(submitted.status == 0 && submitted.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "1", "\(submitted.combined)")
        // One job store: a native worker beside the BOINC client, each getting the job that
        // needs its application (the BOINC client runs "boinc-only", as the master says).
        let native = try await Self.parley(["work", "submit", "--master", master, "--key", dir + "/keys/work.key", "--app", "native-only", "--", "/bin/echo", "native"])
        #expect(native.status == 0 && native.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "2", "\(native.combined)")
        let worker = try Background(parley, [
            "work", "worker", "--master", master, "--trust", dir + "/keys/work.pub", "--dir", dir + "/native", "--worker-name", "native-1", "--app", "native-only",
        ], log: dir + "/native.log")
        defer { worker.stop() }

        // The client: its own directory, a GUI RPC password, and preferences that keep it
        // computing on a busy machine (by default it pauses when other programs use the CPU).
        let clientDir = dir + "/client"
        try Data("secret\n".utf8).write(to: URL(fileURLWithPath: clientDir + "/gui_rpc_auth.cfg"))
        try Data("""
            <global_preferences>
               <run_on_batteries>1</run_on_batteries>
               <run_if_user_active>1</run_if_user_active>
               <suspend_cpu_usage>0</suspend_cpu_usage>
               <cpu_usage_limit>100</cpu_usage_limit>
               <max_ncpus_pct>100</max_ncpus_pct>
            </global_preferences>

            """.utf8).write(to: URL(fileURLWithPath: clientDir + "/global_prefs_override.xml"))
        let client = try Background(Self.boinc, [
            "--dir", clientDir, "--skip_cpu_benchmarks", "--gui_rpc_port", "\(guiPort)", "--no_gpus", "--sched_retry_delay_min", "10",
        ], log: dir + "/client.log", directory: clientDir)
        defer { client.stop() }
        let cmd = ["--host", "127.0.0.1:\(guiPort)", "--passwd", "secret"]
        func boinccmd(_ arguments: [String]) async throws -> ProcessOutput { try await runProcess(Self.boinccmd, cmd + arguments, seconds: 20) }
        #expect(try await Self.eventually(seconds: 20) { try await boinccmd(["--get_cc_status"]).status == 0 }, "\(client.log)")
        let attached = try await boinccmd(["--project_attach", url, "any-authenticator"])
        #expect(attached.status == 0, "\(attached.combined)")

        // The job runs and is reported; the store has it once, with its bytes.
        let succeeded = try await Self.eventually(seconds: 120) { (try? await Self.result(master, 1)["state"] as? String) == "succeeded" }
        #expect(succeeded, "client:\n\(client.log)\nmaster:\n\(server.log)")
        let result = try await Self.result(master, 1)["result"] as? [String: Any]
        let outputs = result?["outputs"] as? [[String: Any]]
        #expect(outputs?.count == 1 && outputs?.first?["name"] as? String == "out.txt")
        #expect((outputs?.first?["content"] as? String).flatMap { Data(base64Encoded: $0) } == Data("the input\nran\n".utf8))
        #expect((result?["stdoutTail"] as? String).flatMap { Data(base64Encoded: $0) } == Data("to-stdout\n".utf8))
        #expect((result?["stderrTail"] as? String).flatMap { Data(base64Encoded: $0) }.map { String(decoding: $0, as: UTF8.self).contains("to-stderr") } == true)
        #expect((result?["worker"] as? String)?.hasPrefix("boinc:") == true)
        #expect(try await Self.eventually(seconds: 30) { !(try await boinccmd(["--get_tasks"]).stdout.contains("parley_j1_")) }, "the client forgets the task once acked")
        let reports = server.log.split(separator: "\n").filter { $0.contains("boinc report") && $0.contains("parley_j1_") }
        #expect(reports.count == 1 && reports.first?.contains("verdict=accepted") == true, "\(reports)")
        #expect(client.log.contains("Hello from Parley"), "the notice reaches the client")
        #expect(try await Self.eventually(seconds: 30) { (try? await Self.result(master, 2)["state"] as? String) == "succeeded" }, "\(worker.log)")
        await #expect((try Self.result(master, 2)["result"] as? [String: Any])?["worker"] as? String == "native-1")
        worker.stop()  // it would take the next job too (it needs no application)
        #expect(try String(contentsOfFile: clientDir + "/master_127.0.0.1_\(boincPort).xml", encoding: .utf8).contains(dead), "the client read both schedulers")
        // The client starts with either URL (it picks one at random, runs showed both); when it
        // picks the dead one, "Scheduler request failed: Couldn't connect to server" is followed,
        // in the same RPC, by the live one: "Scheduler request completed: got 1 new tasks".
        if let failed = client.log.range(of: "Scheduler request failed") {
            #expect(client.log[failed.upperBound...].contains("got 1 new tasks"), "\(client.log)")
        }
        // The request delay: the RPC that reported came no sooner than the delay after the one
        // that handed the job out (the job itself took a second or two).
        let times = Self.rpcTimes(server.log)
        #expect(times.count >= 2, "\(server.log)")
        let gaps = zip(times.dropFirst(), times).map { $0 - $1 }
        #expect(gaps.allSatisfy { $0 >= delay - 1 }, "scheduler RPCs \(gaps) s apart, with a request delay of \(delay) s")

        // The master again, with another BOINC key; the client holds the first.
        server.stop()
        server = try serve("boinc-b", [], log: "serve-b.log")
        #expect(try await Self.eventually(seconds: 20) { server.log.contains("boinc front end listening") }, "\(server.log)")
        let second = try await Self.parley(["work", "submit", "--master", master, "--key", dir + "/keys/work.key", "--shell", "--", "echo never"])
        #expect(second.status == 0 && second.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "3", "\(second.combined)")
        var polls = 0
        let refused = try await Self.eventually(seconds: 120) {
            if (try? await Self.result(master, 3)["state"] as? String) == "failed" { return true }
            // Past the client's back-off after the master's restart, every 5 s.
            if polls % 10 == 0 { _ = try? await boinccmd(["--project", url, "update"]) }
            polls += 1
            return false
        }
        #expect(refused, "client:\n\(client.log)\nmaster:\n\(server.log)")
        let failures = try await Self.result(master, 3)["failures"] as? [String] ?? []
        #expect(failures.count == 1 && failures[0].contains("-120") && failures[0].contains("bad signature"), "\(failures)")
        #expect(client.log.contains("Signature verification error"), "\(client.log)")
        client.stop()
        server.stop()
    }
}
