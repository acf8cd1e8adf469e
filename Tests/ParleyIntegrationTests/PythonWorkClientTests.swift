import Foundation
import ParleyTestSupport
import Testing

/// The independent Parley Work submitter and worker of Tests/Interop
/// (`parley_work_client.py`, written from docs/protocol.md section 19 alone, on the codec of
/// `parley_client.py`) against real `parley work serve` processes: its self-test of the
/// vectors of 19.5 and 19.8, its live scenario (submission refusals, N jobs each accepted
/// once, a failing job's attempts, renewals, an expired lease handed to another worker and the
/// late reports, HandBack, a worker refusing a badly signed job), and both cross-checks:
/// the reference submitter with the Python worker, the Python submitter with the reference
/// worker. [R-19.1-1] [R-19.1-2] [R-19.3-1] [R-19.3-2]
@Suite(.serialized, .timeLimit(.minutes(10))) struct PythonWorkClientTests {
    /// The python3 on PATH, where .ci/run installs the `cryptography` package (Ed25519).
    static var python: String? { CommandTests.onPath("python3") }
    static var script: String { ConformanceCoverageTests.root.appendingPathComponent("Tests/Interop/python/parley_work_client.py").path }

    /// Runs the script with `arguments`, bounded by `seconds`.
    static func run(_ arguments: [String], seconds: Double) async throws -> ProcessOutput {
        let python = try #require(Self.python, "python3 is needed (.ci/run installs it, with the cryptography package)")
        return try await runProcess(python, [Self.script] + arguments, seconds: seconds)
    }

    /// A `parley work serve` on a port of its own with a 10 s lease and SQLite in `dir`,
    /// checking signatures against `dir/keys/work.pub` when `trusting`.
    static func master(_ dir: String, database: String, trusting: Bool = true) async throws -> ServeProcess {
        try await ServeProcess.start(
            ["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/\(database)", "--lease-seconds", "10"] + (trusting ? ["--trust", dir + "/keys/work.pub"] : []),
            command: ["work", "serve"]
        )
    }

    @Test func theSelfTestMatchesEveryWorkVector() async throws {
        let out = try await Self.run(["--self-test"], seconds: 120)
        #expect(out.status == 0, "\(out.combined)")
        #expect(out.stdout.contains("0 checks failed"), "\(out.combined)")
        #expect(out.stdout.contains("vector work-assignments encodes"), "\(out.combined)")
    }

    /// The scenario needs a master that checks signatures (--trust) with a short lease (10 s,
    /// so that the expiry checks take seconds; about 50 s in all), and a second one without --trust, where the
    /// Python worker must refuse a job signed by another key.
    @Test func theLiveScenarioPassesAgainstTheReferenceMaster() async throws {
        let dir = freshTestDirectory("py-work-scenario")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        let master = try await Self.master(dir, database: "a.sqlite")
        let open = try await Self.master(dir, database: "b.sqlite", trusting: false)
        let out = try await Self.run(
            ["scenario", "--master", master.address, "--key", dir + "/keys/work.key", "--untrusting-master", open.address],
            seconds: 300
        )
        await master.stop()
        await open.stop()
        #expect(out.status == 0, "\(out.combined)\nmaster log:\n\(master.log)")
        #expect(out.stdout.contains("scenario: every check passed"), "\(out.combined)")
    }

    /// Master-initiated commands (19.8): the Python worker started with `--commands` (and one
    /// without) on a master started with `--allow-commands`, driven by the reference client
    /// `parley work command`: output streamed and exit statuses, signals, timeouts, logfiles,
    /// several at once, interrupts (and SIGKILL 5 s later), CANCEL, downloads, uploads of a file
    /// and of a directory as ustar, mkdir/stat/ls/glob/cp/rmfile/rmdir, the refusals of
    /// [R-19.8-2], and the master refusing a worker whose hello says no commands. [R-19.8-1]
    /// [R-19.8-2]
    @Test func theCommandsScenarioPassesAgainstTheReferenceMaster() async throws {
        let dir = freshTestDirectory("py-work-commands")
        let parleyPath = try #require(parleyExecutablePath())
        let master = try await ServeProcess.start(
            ["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/commands.sqlite", "--allow-commands"],
            command: ["work", "serve"]
        )
        let out = try await Self.run(["commands-scenario", "--master", master.address, "--parley", parleyPath], seconds: 300)
        await master.stop()
        #expect(out.status == 0, "\(out.combined)\nmaster log:\n\(master.log)")
        #expect(out.stdout.contains("commands scenario: every check passed"), "\(out.combined)")
    }

    /// The reference submitter's jobs (one with an input and an output, one outliving its
    /// lease) run on the Python worker; the Python submitter's jobs run on the reference worker.
    @Test func theReferenceAndThePythonSidesWorkTogether() async throws {
        let dir = freshTestDirectory("py-work-cross")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        let master = try await Self.master(dir, database: "jobs.sqlite")
        let key = dir + "/keys/work.key", pub = dir + "/keys/work.pub"
        try Data("abc\n".utf8).write(to: URL(fileURLWithPath: dir + "/in.txt"))
        #expect(try await parley(["work", "submit", "--master", master.address, "--key", key, "--count", "3", "--", "/bin/echo", "from-ref"]).status == 0)
        #expect(try await parley(["work", "submit", "--master", master.address, "--key", key, "--input", "in.txt=\(dir)/in.txt", "--output", "out.txt",
                                  "--shell", "--", "wc -c < in.txt > out.txt"]).status == 0)
        #expect(try await parley(["work", "submit", "--master", master.address, "--key", key, "--shell", "--max-wall", "60", "--", "sleep 14; echo slept"]).status == 0)
        let worker = try await Self.run(["work", "--master", master.address, "--trust", pub, "--name", "py-worker", "--max-jobs", "5", "--idle-exit", "20"], seconds: 120)
        #expect(worker.status == 0 && worker.stdout.contains("ran 5 jobs (VERDICT_ACCEPTED)"), "\(worker.combined)")
        for job in 1...5 {
            let result = try await parley(["work", "results", "\(job)", "--master", master.address, "--save-outputs", dir + "/saved"])
            #expect(result.stdout.contains("job \(job): succeeded") && result.stdout.contains("accepted from py-worker"), "\(result.combined)")
        }
        let saved = String(decoding: FileManager.default.contents(atPath: dir + "/saved/out.txt") ?? Data(), as: UTF8.self)
        #expect(saved.trimmingCharacters(in: .whitespacesAndNewlines) == "4", "out.txt: \(saved)")

        let p = Process()
        p.executableURL = URL(fileURLWithPath: try #require(parleyExecutablePath()))
        p.arguments = ["work", "worker", "--master", master.address, "--trust", pub, "--dir", dir + "/ref", "--worker-name", "ref-worker"]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; p.waitUntilExit() }
        let submitted = try await Self.run(["submit", "--master", master.address, "--key", key, "--count", "3", "--wait", "90", "--", "/bin/echo", "from-py"], seconds: 120)
        await stopProcess(p)
        #expect(submitted.status == 0, "\(submitted.combined)")
        #expect(submitted.stdout.components(separatedBy: "succeeded worker=ref-worker exit=0 stdout=b'from-py\\n'").count == 4, "\(submitted.combined)")
        await master.stop()
    }
}
