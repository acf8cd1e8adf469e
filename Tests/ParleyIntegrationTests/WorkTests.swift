import Foundation
import ParleyTestSupport
import Testing

/// Parley Work between real processes: `parley work serve` on SQLite, `parley work worker`s,
/// `parley work submit`, `status` and `results`.
@Suite(.serialized, .timeLimit(.minutes(10))) struct WorkProcessTests {
    /// Starts `parley work worker` processes; stops them by PID.
    final class Workers {
        var processes: [Process] = []
        let logs: [String]

        /// Workers are named `names` (each working in DIR/NAME), or `worker-I` (in DIR/wI).
        init(count: Int, master: String, trust: String, dir: String, masters: [String] = [], slots: Int = 2,
             names: [String]? = nil, extraArguments: [String] = []) throws {
            let parley = try #require(parleyExecutablePath())
            var logs: [String] = []
            for i in 0..<(names?.count ?? count) {
                let p = Process()
                p.executableURL = URL(fileURLWithPath: parley)
                let masterOptions = (masters.isEmpty ? [master] : masters).flatMap { ["--master", $0] }
                let name = names?[i] ?? "worker-\(i)"
                let workDir = names == nil ? "\(dir)/w\(i)" : "\(dir)/\(name)"
                p.arguments = ["work", "worker"] + masterOptions + ["--trust", trust, "--slots", "\(slots)", "--dir", workDir, "--worker-name", name] + extraArguments
                let log = "\(dir)/\(name).log"
                _ = FileManager.default.createFile(atPath: log, contents: nil)
                p.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
                p.standardError = p.standardOutput
                try p.run()
                self.processes.append(p)
                logs.append(log)
            }
            self.logs = logs
        }

        /// SIGTERM to all, then SIGKILL to any left after 3 s; returns once all have ended.
        func stop() async {
            for p in self.processes where p.isRunning { kill(p.processIdentifier, SIGTERM) }
            for p in self.processes { await waitForExit(p, killAfter: 3) }
        }

        /// `stop` for a `defer`: blocks its thread, for up to 3 s per worker.
        func stopBlocking() {
            for p in self.processes where p.isRunning { kill(p.processIdentifier, SIGTERM) }
            for p in self.processes { stopProcessBlocking(p, grace: 3) }
        }

        deinit { for p in self.processes where p.isRunning { kill(p.processIdentifier, SIGKILL) } }
    }

    static func status(_ master: String) async throws -> [String: Int] {
        let out = try await parley(["work", "status", "--master", master, "--json"])
        guard out.status == 0, let object = try JSONSerialization.jsonObject(with: Data(out.stdout.utf8)) as? [String: Int] else {
            throw ParleyTestFailure("status failed: \(out.combined)")
        }
        return object
    }

    /// [R-19.2-3] A master's preferences reach its workers: with --max-slots 1, a worker
    /// started with three slots runs one job at a time (each job takes a lock directory and
    /// fails if another job holds it).
    @Test func aMastersPreferencesLimitItsWorkersSlots() async throws {
        let dir = freshTestDirectory("work-prefs")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        let master = try await ServeProcess.start(
            ["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/jobs.sqlite", "--max-slots", "1", "--idle-milliseconds", "50"], command: ["work", "serve"]
        )
        let lock = dir + "/lock"
        let submit = try await parley(["work", "submit", "--master", master.address, "--key", dir + "/keys/work.key", "--count", "6", "--", "/bin/sh", "-c",
                                 "mkdir \(lock) || exit 9; sleep 0.3; rmdir \(lock)"])
        #expect(submit.status == 0, "\(submit.combined)")
        let workers = try Workers(count: 1, master: master.address, trust: dir + "/keys/work.pub", dir: dir, slots: 3)
        let done = try await eventually(seconds: 60) { await (try? Self.status(master.address)["succeeded"]) == 6 }
        await workers.stop()
        if !done { Issue.record("status: \(String(describing: try? await Self.status(master.address)))") }
        for job in 1...6 {
            let result = try await parley(["work", "results", "\(job)", "--master", master.address])
            #expect(result.stdout.contains("succeeded") && !result.stdout.contains("attempt failed"), "job \(job) ran beside another: \(result.stdout)")
        }
        await master.stop()
    }

    /// [R-19.6-2] A front door (a master whose nucleus redirects, rotated per connection)
    /// spreads workers over the masters behind it.
    @Test func aFrontDoorSpreadsWorkersOverMasters() async throws {
        let dir = freshTestDirectory("work-spread")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        let a = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/a.sqlite"], command: ["work", "serve"])
        let b = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/b.sqlite"], command: ["work", "serve"])
        let door = try await ServeProcess.start(
            ["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/door.sqlite", "--redirect", a.address, "--redirect", b.address, "--rotate-redirects"],
            command: ["work", "serve"]
        )
        let workers = try Workers(count: 4, master: door.address, trust: dir + "/keys/work.pub", dir: dir, slots: 1)
        func names(_ master: String) async -> [String] {
            let out = (try? await parley(["work", "workers", "--master", master, "--json"]))?.stdout ?? ""
            return out.components(separatedBy: "\"worker\":\"").dropFirst().compactMap { $0.split(separator: "\"").first.map(String.init) }
        }
        let spread = try await eventually(seconds: 30) { await names(a.address).count == 2 ? await names(b.address).count == 2 : false }
        let (onA, onB) = (await names(a.address), await names(b.address))
        #expect(spread, "a: \(onA), b: \(onB)")
        await #expect(Set(names(a.address) + names(b.address)) == ["worker-0", "worker-1", "worker-2", "worker-3"])
        await workers.stop()
        await door.stop()
        await a.stop()
        await b.stop()
    }

    /// 200 jobs, 4 workers of 2 slots: every job runs exactly once (each appends its own
    /// directory name, which holds its job id, to a shared log) and is accepted once.
    @Test func everyJobRunsExactlyOnce() async throws {
        let dir = freshTestDirectory("work")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        let master = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/jobs.sqlite", "--trust", dir + "/keys/work.pub"], command: ["work", "serve"])
        let log = dir + "/ran.log"
        let submit = try await parley(["work", "submit", "--master", master.address, "--key", dir + "/keys/work.key", "--count", "200", "--", "/bin/sh", "-c", "basename \"$(pwd)\" >> \(log)"])
        #expect(submit.status == 0, "\(submit.combined)")
        #expect(submit.stdout.split(separator: "\n").count == 200)
        let workers = try Workers(count: 4, master: master.address, trust: dir + "/keys/work.pub", dir: dir)
        let done = try await eventually(seconds: 60) { await (try? Self.status(master.address)["succeeded"]) == 200 }
        await workers.stop()
        if !done { Issue.record("status: \(String(describing: try? await Self.status(master.address)))") }
        let lines = String(decoding: FileManager.default.contents(atPath: log) ?? Data(), as: UTF8.self).split(separator: "\n")
        let jobs = lines.compactMap { $0.split(separator: "-").dropFirst().first.flatMap { UInt64($0) } }
        #expect(jobs.count == 200 && Set(jobs) == Set(1...200), "ran \(jobs.count) times, \(Set(jobs).count) distinct jobs")
        let result = try await parley(["work", "results", "7", "--master", master.address])
        #expect(result.stdout.contains("job 7: succeeded") && result.stdout.contains("exit status 0"), "\(result.combined)")
        let ranPerWorker = workers.logs.map { String(decoding: FileManager.default.contents(atPath: $0) ?? Data(), as: UTF8.self) }
        #expect(ranPerWorker.filter { $0.contains("stopped: ran") }.count == 4, "\(ranPerWorker)")
        // Each job's directory went once its report was made: the workers' disks do not fill.
        for i in 0..<4 {
            let left = ((try? FileManager.default.contentsOfDirectory(atPath: "\(dir)/w\(i)")) ?? []).filter { $0.hasPrefix("job-") }
            #expect(left.isEmpty, "worker \(i) kept \(left.count) job directories: \(left.prefix(3))")
        }
        await master.stop()
    }

    /// A job signed with another key: the master with --trust refuses it and stores nothing;
    /// a master without --trust stores it, and the worker refuses to run it, reports why, and
    /// after its attempts the job fails with the reasons; the command never ran.
    /// [R-19.1-1]
    @Test func badlySignedJobsNeverRun() async throws {
        let dir = freshTestDirectory("work-bad")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        #expect(try await parley(["work", "keygen", "--dir", dir + "/other"]).status == 0)
        let marker = dir + "/ran"
        let guarded = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/a.sqlite", "--trust", dir + "/keys/work.pub"], command: ["work", "serve"])
        let refused = try await parley(["work", "submit", "--master", guarded.address, "--key", dir + "/other/work.key", "--", "/usr/bin/touch", marker])
        #expect(refused.status == 2 && refused.stdout.contains("does not verify") && refused.stdout.contains("nothing was stored"), "\(refused.combined)")
        await #expect(try Self.status(guarded.address) == ["queued": 0, "leased": 0, "succeeded": 0, "failed": 0])
        await guarded.stop()

        let open = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/b.sqlite", "--max-attempts", "2"], command: ["work", "serve"])
        let stored = try await parley(["work", "submit", "--master", open.address, "--key", dir + "/other/work.key", "--", "/usr/bin/touch", marker])
        #expect(stored.status == 0)
        let workers = try Workers(count: 1, master: open.address, trust: dir + "/keys/work.pub", dir: dir)
        let failed = try await eventually(seconds: 30) { await (try? Self.status(open.address)["failed"]) == 1 }
        await workers.stop()
        #expect(failed)
        #expect(!FileManager.default.fileExists(atPath: marker), "a badly signed job ran")
        let result = try await parley(["work", "results", "1", "--master", open.address])
        #expect(result.stdout.contains("job 1: failed") && result.stdout.contains("refused: bad signature"), "\(result.combined)")
        await open.stop()
    }
}

extension WorkProcessTests {
    /// SIGTERM to a worker running jobs: it stops them and hands them back; the master queues
    /// them again without counting the attempt.
    @Test func aStoppedWorkerHandsItsJobsBack() async throws {
        let dir = freshTestDirectory("work-handback")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        let master = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/jobs.sqlite", "--max-attempts", "1"], command: ["work", "serve"])
        #expect(try await parley(["work", "submit", "--master", master.address, "--key", dir + "/keys/work.key", "--count", "2", "--", "/bin/sleep", "30"]).status == 0)
        let workers = try Workers(count: 1, master: master.address, trust: dir + "/keys/work.pub", dir: dir)
        #expect(try await eventually(seconds: 20) { (try? await Self.status(master.address)["leased"]) == 2 })
        try await Task.sleep(for: .milliseconds(300))  // the jobs are running
        await workers.stop()
        let log = String(decoding: FileManager.default.contents(atPath: workers.logs[0]) ?? Data(), as: UTF8.self)
        #expect(log.contains("handed back 2"), "\(log)")
        await #expect(try Self.status(master.address) == ["queued": 2, "leased": 0, "succeeded": 0, "failed": 0])
        let result = try await parley(["work", "results", "1", "--master", master.address])
        #expect(result.stdout.contains("job 1: queued") && !result.stdout.contains("attempt failed"), "\(result.combined)")
        await master.stop()
    }
}

extension WorkProcessTests {
    /// One master on SQLite, 20 worker processes, 10,000 short jobs (PARLEY_WORK_JOBS changes
    /// it): each runs exactly once (the jobs' own log, one line per run) and its result is
    /// accepted exactly once (the store: all succeeded, none failed; the workers: the runs
    /// they report add up to the jobs).
    @Test func tenThousandJobsOnTwentyWorkersEachRunOnce() async throws {
        let total = Int(ProcessInfo.processInfo.environment["PARLEY_WORK_JOBS"] ?? "") ?? 10_000
        let dir = freshTestDirectory("work-many")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        let master = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/jobs.sqlite", "--trust", dir + "/keys/work.pub"], command: ["work", "serve"])
        let log = dir + "/ran.log"
        let submit = try await parley(["work", "submit", "--master", master.address, "--key", dir + "/keys/work.key", "--count", "\(total)", "--", "/bin/sh", "-c", "echo ${PWD##*/} >> \(log)"], seconds: 120)
        #expect(submit.status == 0, "\(submit.combined.suffix(300))")
        let started = ContinuousClock.now
        let workers = try Workers(count: 20, master: master.address, trust: dir + "/keys/work.pub", dir: dir)
        let done = try await eventually(seconds: 600) { await (try? Self.status(master.address)["succeeded"]) == total }
        let elapsed = ContinuousClock.now - started
        await workers.stop()
        if !done { Issue.record("status: \(String(describing: try? await Self.status(master.address)))") }
        await #expect(try Self.status(master.address) == ["queued": 0, "leased": 0, "succeeded": total, "failed": 0])
        let lines = String(decoding: FileManager.default.contents(atPath: log) ?? Data(), as: UTF8.self).split(separator: "\n")
        let jobs = lines.compactMap { $0.split(separator: "-").dropFirst().first.flatMap { UInt64($0) } }
        #expect(jobs.count == total, "\(jobs.count) runs for \(total) jobs")
        #expect(Set(jobs) == Set((1...total).map(UInt64.init)), "some job ran twice or never")
        let reported = workers.logs.compactMap { path -> Int? in
            let text = String(decoding: FileManager.default.contents(atPath: path) ?? Data(), as: UTF8.self)
            guard let range = text.range(of: "stopped: ran ") else { return nil }
            return Int(text[range.upperBound...].prefix { $0.isNumber })
        }
        #expect(reported.count == 20 && reported.reduce(0, +) == total, "workers say they ran \(reported)")
        print("parley work: \(total) jobs on 20 workers in \(elapsed) (\(Int(Double(total) / (Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18))) jobs/s, debug build, each job a /bin/sh)")
        await master.stop()
    }
}

extension WorkProcessTests {
    /// A master that requires authentication: a worker with its key runs jobs under its
    /// entity's name; a worker without one is refused before it can take anything.
    /// A worker started before its master waits for it (trying again with back-off for up
    /// to --failover-seconds, saying so once), then works; with nobody there for that long it
    /// gives up saying what it found ("Connection refused", not NIO's errno text).
    @Test func aWorkerStartedBeforeItsMasterWaitsForIt() async throws {
        let dir = freshTestDirectory("work-early-worker")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        let parleyPath = try #require(parleyExecutablePath())
        let nobody = "127.0.0.1:\(try freeLoopbackPort())"
        let alone = try await runProcess(parleyPath, ["work", "worker", "--master", nobody, "--trust", dir + "/keys/work.pub", "--dir", dir + "/alone",
                                                      "--failover-seconds", "2"], seconds: 30)
        #expect(alone.status == 2, "\(alone.combined)")
        #expect(alone.combined.contains("no master answers yet"), "\(alone.combined)")
        #expect(alone.combined.contains("cannot connect to \(nobody): Connection refused [connectFailed]"), "\(alone.combined)")

        let address = "127.0.0.1:\(try freeLoopbackPort())"
        let workers = try Workers(count: 1, master: address, trust: dir + "/keys/work.pub", dir: dir)
        defer { workers.stopBlocking() }
        let warned = try await eventually(seconds: 20) {
            ((try? String(contentsOfFile: workers.logs[0], encoding: .utf8)) ?? "").contains("no master answers yet")
        }
        #expect(warned, "the worker says it waits")
        #expect(workers.processes[0].isRunning, "the worker waits instead of exiting")
        let master = try await ServeProcess.start(["--listen", address, "--database", "sqlite:\(dir)/jobs.sqlite"], command: ["work", "serve"])
        let submitted = try await parley(["work", "submit", "--master", address, "--key", dir + "/keys/work.key", "--", "/bin/true"])
        #expect(submitted.status == 0, "\(submitted.combined)")
        let done = try await eventually(seconds: 30) { (try? await Self.status(address))?["succeeded"] == 1 }
        #expect(done, "the job ran on the worker that started first: \((try? String(contentsOfFile: workers.logs[0], encoding: .utf8)) ?? "")")
        await workers.stop()
        await master.stop()
    }

    @Test func aMasterRequiringAuthenticationServesOnlyKeyedWorkers() async throws {
        let dir = freshTestDirectory("work-auth")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        let keyring = dir + "/workers.keyring"
        #expect(try await parley(["keyring", "add", "worker.build-7", "--keyring", keyring]).status == 0)
        #expect(try await parley(["keyring", "add", "client.submitter", "--keyring", keyring]).status == 0)
        let master = try await ServeProcess.start(
            ["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/jobs.sqlite", "--auth", "secret", "--keyring", keyring], command: ["work", "serve"]
        )
        let submit = try await parley(["work", "submit", "--master", master.address, "--key", dir + "/keys/work.key", "--", "/bin/true"])
        #expect(submit.status == 2, "an anonymous submitter is refused: \(submit.combined)")
        let parleyPath = try #require(parleyExecutablePath())
        let anonymous = try await runProcess(parleyPath, ["work", "worker", "--master", master.address, "--trust", dir + "/keys/work.pub", "--dir", dir + "/anon"], seconds: 30)
        #expect(anonymous.status == 2 && anonymous.combined.contains("authenticationFailed"), "\(anonymous.combined)")
        let worker = Process()
        worker.executableURL = URL(fileURLWithPath: parleyPath)
        worker.arguments = ["work", "worker", "--master", master.address, "--trust", dir + "/keys/work.pub", "--dir", dir + "/keyed", "--keyring", keyring, "--name", "worker.build-7"]
        worker.standardOutput = FileHandle.nullDevice
        worker.standardError = FileHandle.nullDevice
        try worker.run()
        defer { if worker.isRunning { kill(worker.processIdentifier, SIGKILL) } }
        // Jobs submitted by an authenticated submitter run on the keyed worker, under its entity.
        let submitted = try await parley(["work", "submit", "--master", master.address, "--key", dir + "/keys/work.key", "--keyring", keyring, "--name", "client.submitter", "--", "/bin/true"])
        #expect(submitted.status == 0, "\(submitted.combined)")
        let done = try await eventually(seconds: 30) { (try? await parley(["work", "status", "--master", master.address, "--json", "--keyring", keyring, "--name", "client.submitter"]))?.stdout.contains("\"succeeded\":1") == true }
        #expect(done)
        let result = try await parley(["work", "results", "1", "--master", master.address, "--keyring", keyring, "--name", "client.submitter"])
        #expect(result.stdout.contains("accepted from worker.build-7"), "\(result.combined)")
        await stopProcess(worker)
        await master.stop()
    }
}

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

extension WorkProcessTests {
    static func httpGet(_ url: String) async throws -> (status: Int, body: String, type: String) {
        let (data, response) = try await URLSession.shared.data(from: try #require(URL(string: url)))
        let http = try #require(response as? HTTPURLResponse)
        return (http.statusCode, String(decoding: data, as: UTF8.self), http.value(forHTTPHeaderField: "Content-Type") ?? "")
    }

    /// `--http`: the same counts and results as the Work protocol, as JSON, and Prometheus
    /// metrics that count what happened; bad paths and ids get 404 and 400.
    @Test func theHTTPEndpointServesStatusResultsAndMetrics() async throws {
        let dir = freshTestDirectory("work-http")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        let master = try await ServeProcess.start(
            ["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/jobs.sqlite", "--http", "127.0.0.1:0"], command: ["work", "serve"]
        )
        #expect(try await master.waitForLog("http listening"))
        let line = try #require(master.log.split(separator: "\n").first { $0.contains("http listening") })
        let port = try #require(line.split(separator: ":").last.flatMap { Int($0.prefix { $0.isNumber }) })
        let base = "http://127.0.0.1:\(port)"
        #expect(try await parley(["work", "submit", "--master", master.address, "--key", dir + "/keys/work.key", "--count", "3", "--", "/bin/echo", "from-http"]).status == 0)
        let workers = try Workers(count: 1, master: master.address, trust: dir + "/keys/work.pub", dir: dir)
        let done = try await eventually(seconds: 60) { await (try? Self.status(master.address)["succeeded"]) == 3 }
        await workers.stop()
        #expect(done)
        let status = try await Self.httpGet(base + "/status")
        #expect(status.status == 200 && status.type.hasPrefix("application/json"))
        #expect(try JSONSerialization.jsonObject(with: Data(status.body.utf8)) as? [String: Int] == ["queued": 0, "leased": 0, "succeeded": 3, "failed": 0])
        let job = try await Self.httpGet(base + "/jobs/2")
        #expect(job.status == 200 && job.body.contains("\"state\": \"succeeded\"") || job.body.contains("\"state\":\"succeeded\""), "\(job.body)")
        #expect(job.body.contains(Data("from-http\n".utf8).base64EncodedString()), "the result's stdout: \(job.body)")
        #expect(try await Self.httpGet(base + "/jobs/99").status == 404)
        #expect(try await Self.httpGet(base + "/jobs/abc").status == 400)
        #expect(try await Self.httpGet(base + "/nothing").status == 404)
        let metrics = try await Self.httpGet(base + "/metrics")
        #expect(metrics.status == 200 && metrics.type.hasPrefix("text/plain"))
        #expect(metrics.body.contains("parley_work_jobs_submitted_total 3"), "\(metrics.body.prefix(2000))")
        #expect(metrics.body.contains("parley_work_jobs_assigned_total 3"))
        #expect(metrics.body.contains("parley_work_reports_total{verdict=\"accepted\"} 3"))
        await master.stop()
    }
}

extension WorkProcessTests {
    /// CPU and memory limits: a job that spins is stopped by SIGXCPU after its CPU seconds, a
    /// job that allocates past its memory limit fails its allocation; both fail (one attempt)
    /// with the reason recorded; a job under its limits succeeds.
    @Test func cpuAndMemoryLimitsStopJobs() async throws {
        let dir = freshTestDirectory("work-limits")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        let master = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/jobs.sqlite", "--max-attempts", "1"], command: ["work", "serve"])
        let key = dir + "/keys/work.key"
        let spin = try await parley(["work", "submit", "--master", master.address, "--key", key, "--max-cpu", "1", "--max-wall", "60", "--shell", "--", "while :; do :; done"])
        let hog = try await parley(["work", "submit", "--master", master.address, "--key", key, "--max-memory", "200000000", "--",
                              "/usr/bin/python3", "-c", "x = bytearray(400 * 1024 * 1024)"])
        let fits = try await parley(["work", "submit", "--master", master.address, "--key", key, "--max-memory", "400000000", "--max-cpu", "10", "--",
                               "/usr/bin/python3", "-c", "x = bytearray(50 * 1024 * 1024); print('fits')"])
        #expect(spin.status == 0 && hog.status == 0 && fits.status == 0, "\(spin.combined) \(hog.combined) \(fits.combined)")
        let workers = try Workers(count: 1, master: master.address, trust: dir + "/keys/work.pub", dir: dir)
        let done = try await eventually(seconds: 60) { await (try? Self.status(master.address)).map { $0["failed"] == 2 && $0["succeeded"] == 1 } ?? false }
        await workers.stop()
        if !done { Issue.record("status: \(String(describing: try? await Self.status(master.address)))") }
        let spun = try await parley(["work", "results", "1", "--master", master.address])
        #expect(spun.stdout.contains("failed") && spun.stdout.contains("CPU-time limit reached"), "\(spun.combined)")
        let hogged = try await parley(["work", "results", "2", "--master", master.address, "--json"])
        // Without the limit the allocation succeeds here; the failure's reason ends with the
        // job's last line of stderr.
        let reply = try JSONSerialization.jsonObject(with: Data(hogged.stdout.utf8)) as? [String: Any]
        #expect(reply?["state"] as? String == "failed" && (reply?["failures"] as? [String])?.first?.hasSuffix("exit status 1: MemoryError") == true, "\(hogged.combined)")
        let fitted = try await parley(["work", "results", "3", "--master", master.address])
        #expect(fitted.stdout.contains("succeeded") && fitted.stdout.contains("fits"), "\(fitted.combined)")
        await master.stop()
    }
}

extension WorkProcessTests {
    /// Input files (inline and fetched over HTTP, each checked against its signed SHA-256)
    /// and output files (sent back, saved byte for byte by `results --save-outputs`); an
    /// input whose content changed since it was signed is refused and the job never runs; an
    /// output that is a link out of the job's directory is refused.
    @Test func inputAndOutputFilesAreCheckedAndCarried() async throws {
        let dir = freshTestDirectory("work-files")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        try FileManager.default.createDirectory(atPath: dir + "/www", withIntermediateDirectories: true)
        let served = Data((0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        try served.write(to: URL(fileURLWithPath: dir + "/www/data.bin"))
        try Data("inline input\n".utf8).write(to: URL(fileURLWithPath: dir + "/local.txt"))
        // A static HTTP server on loopback (Python's), stopped by its PID.
        let http = Process()
        http.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        http.arguments = ["-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", dir + "/www"]
        let httpOut = Pipe()
        http.standardOutput = httpOut
        http.standardError = FileHandle.nullDevice
        try http.run()
        defer { kill(http.processIdentifier, SIGKILL); http.waitUntilExit() }
        let banner = String(decoding: httpOut.fileHandleForReading.availableData, as: UTF8.self)
        let port = try #require(banner.range(of: #"port (\d+)"#, options: .regularExpression).flatMap { Int(banner[$0].dropFirst(5)) }, "\(banner)")
        let master = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/jobs.sqlite", "--max-attempts", "1"], command: ["work", "serve"])
        let key = dir + "/keys/work.key"
        let good = try await parley(["work", "submit", "--master", master.address, "--key", key,
                               "--input", "in/local.txt=\(dir)/local.txt", "--input-url", "data.bin=http://127.0.0.1:\(port)/data.bin",
                               "--output", "out/copy.bin", "--output", "lines.txt", "--shell", "--",
                               "mkdir -p out && cp data.bin out/copy.bin && cat in/local.txt > lines.txt && echo ran >> \(dir)/ran.log"])
        #expect(good.status == 0, "\(good.combined)")
        let escape = try await parley(["work", "submit", "--master", master.address, "--key", key, "--output", "secret", "--", "/bin/ln", "-s", "/etc/passwd", "secret"])
        #expect(escape.status == 0, "\(escape.combined)")
        let workers = try Workers(count: 1, master: master.address, trust: dir + "/keys/work.pub", dir: dir)
        let firstDone = try await eventually(seconds: 60) { await (try? Self.status(master.address)).map { $0["succeeded"] == 1 && $0["failed"] == 1 } ?? false }
        if !firstDone { Issue.record("status: \(String(describing: try? await Self.status(master.address)))") }
        await workers.stop()
        // Signed with the file's hash, then the file changes on the server before a worker
        // takes the job.
        let stale = try await parley(["work", "submit", "--master", master.address, "--key", key, "--priority", "0",
                                "--input-url", "data.bin=http://127.0.0.1:\(port)/data.bin", "--shell", "--", "echo stale-ran >> \(dir)/ran.log"])
        #expect(stale.status == 0, "\(stale.combined)")
        let staleID = stale.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        // A second file that grows to 20 MB on the server after signing: the worker stops
        // reading at its signed size and a byte.
        try Data("small".utf8).write(to: URL(fileURLWithPath: dir + "/www/grows.bin"))
        let grows = try await parley(["work", "submit", "--master", master.address, "--key", key,
                                "--input-url", "grows.bin=http://127.0.0.1:\(port)/grows.bin", "--shell", "--", "echo grown-ran >> \(dir)/ran.log"])
        #expect(grows.status == 0, "\(grows.combined)")
        let growsID = grows.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        try Data(repeating: 1, count: 20 << 20).write(to: URL(fileURLWithPath: dir + "/www/grows.bin"))
        // Same size, other bytes: only the SHA-256 tells.
        try Data(repeating: 7, count: served.count).write(to: URL(fileURLWithPath: dir + "/www/data.bin"))
        try FileManager.default.createDirectory(atPath: dir + "/more", withIntermediateDirectories: true)
        let more = try Workers(count: 1, master: master.address, trust: dir + "/keys/work.pub", dir: dir + "/more")
        let done = try await eventually(seconds: 60) { await (try? Self.status(master.address))?["failed"] == 3 }
        await more.stop()
        if !done { Issue.record("status: \(String(describing: try? await Self.status(master.address)))") }
        let saved = try await parley(["work", "results", "1", "--master", master.address, "--save-outputs", dir + "/saved"])
        #expect(saved.status == 0 && saved.stdout.contains("output out/copy.bin: 100000 bytes"), "\(saved.combined)")
        #expect(FileManager.default.contents(atPath: dir + "/saved/out/copy.bin") == served)
        #expect(FileManager.default.contents(atPath: dir + "/saved/lines.txt") == Data("inline input\n".utf8))
        let staleResult = try await parley(["work", "results", staleID, "--master", master.address])
        #expect(staleResult.stdout.contains("failed") && staleResult.stdout.contains("input failed, not run") && staleResult.stdout.contains("SHA-256"), "\(staleResult.combined)")
        let grown = try await parley(["work", "results", growsID, "--master", master.address])
        #expect(grown.stdout.contains("input failed, not run") && grown.stdout.contains("is 6 bytes, not 5"), "\(grown.combined)")
        let escaped = try await parley(["work", "results", "2", "--master", master.address])
        #expect(escaped.stdout.contains("failed") && escaped.stdout.contains("leads out of the job's directory"), "\(escaped.combined)")
        let ran = String(decoding: FileManager.default.contents(atPath: dir + "/ran.log") ?? Data(), as: UTF8.self)
        #expect(ran == "ran\n", "the stale job must never run: \(ran)")
        await master.stop()
    }
}

extension WorkProcessTests {
    /// Key rotation on the wire: the master announces the next key, vouched for by the
    /// current one; a worker that trusts only the old key then runs jobs signed with the new
    /// one. A rotation signed by another key is refused by the master at startup, and a
    /// worker never trusts a next key its keys did not vouch for.
    /// [R-19.1-3]
    @Test func aKeyRotationVouchedForByTheOldKeyIsTrustedByWorkers() async throws {
        let dir = freshTestDirectory("work-rotation")
        for name in ["old", "new", "stranger"] { #expect(try await parley(["work", "keygen", "--dir", "\(dir)/\(name)"]).status == 0) }
        let rotate = try await parley(["work", "rotate", "--key", dir + "/old/work.key", "--to", dir + "/new/work.pub", "--out", dir + "/rotation"])
        #expect(rotate.status == 0 && rotate.stdout.contains("vouched for"), "\(rotate.combined)")
        let forged = try await parley(["work", "rotate", "--key", dir + "/stranger/work.key", "--to", dir + "/new/work.pub", "--out", dir + "/forged"])
        #expect(forged.status == 0)
        let refused = try await parley(["work", "serve", "--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/x.sqlite", "--trust", dir + "/old/work.pub", "--rotation", dir + "/forged"], seconds: 30)
        #expect(refused.status != 0 && refused.combined.contains("is not vouched for by key"), "\(refused.combined)")

        let master = try await ServeProcess.start(
            ["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/jobs.sqlite", "--trust", dir + "/old/work.pub", "--rotation", dir + "/rotation"],
            command: ["work", "serve"]
        )
        let newJob = try await parley(["work", "submit", "--master", master.address, "--key", dir + "/new/work.key", "--", "/bin/echo", "new-key"])
        #expect(newJob.status == 0, "the master accepts the next key's jobs: \(newJob.combined)")
        let oldJob = try await parley(["work", "submit", "--master", master.address, "--key", dir + "/old/work.key", "--", "/bin/echo", "old-key"])
        #expect(oldJob.status == 0, "\(oldJob.combined)")
        let strangerJob = try await parley(["work", "submit", "--master", master.address, "--key", dir + "/stranger/work.key", "--", "/bin/echo", "x"])
        #expect(strangerJob.status == 2 && strangerJob.combined.contains("refused"), "\(strangerJob.combined)")
        let workers = try Workers(count: 1, master: master.address, trust: dir + "/old/work.pub", dir: dir)
        let done = try await eventually(seconds: 60) { await (try? Self.status(master.address))?["succeeded"] == 2 }
        await workers.stop()
        if !done { Issue.record("status: \(String(describing: try? await Self.status(master.address)))") }
        let log = String(decoding: FileManager.default.contents(atPath: workers.logs[0]) ?? Data(), as: UTF8.self)
        #expect(log.contains("key rotation: now trusting"), "\(log)")
        await master.stop()

        // A master without the rotation: the same worker (trusting the old key only) refuses
        // the new key's job.
        let plain = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/plain.sqlite", "--max-attempts", "1"], command: ["work", "serve"])
        #expect(try await parley(["work", "submit", "--master", plain.address, "--key", dir + "/new/work.key", "--", "/bin/echo", "new-key"]).status == 0)
        try FileManager.default.createDirectory(atPath: dir + "/second", withIntermediateDirectories: true)
        let second = try Workers(count: 1, master: plain.address, trust: dir + "/old/work.pub", dir: dir + "/second")
        let failed = try await eventually(seconds: 60) { await (try? Self.status(plain.address))?["failed"] == 1 }
        await second.stop()
        #expect(failed)
        let result = try await parley(["work", "results", "1", "--master", plain.address])
        #expect(result.stdout.contains("bad signature"), "\(result.combined)")
        await plain.stop()
    }
}

extension WorkProcessTests {
    /// Applications: a job that needs one goes only to the worker started with `--app`; a
    /// bad application name is refused at submission and by the worker's own options.
    @Test func aJobNeedingAnApplicationGoesToAWorkerThatRunsIt() async throws {
        let dir = freshTestDirectory("work-apps")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        let master = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/jobs.sqlite"], command: ["work", "serve"])
        let key = dir + "/keys/work.key"
        #expect(try await parley(["work", "submit", "--master", master.address, "--key", key, "--app", "python3", "--count", "3", "--", "/bin/true"]).status == 0)
        let bad = try await parley(["work", "submit", "--master", master.address, "--key", key, "--app", "py thon", "--", "/bin/true"])
        #expect(bad.status != 0 && bad.combined.contains("is not up to 64 of"), "\(bad.combined)")
        let badWorker = try await parley(["work", "worker", "--master", master.address, "--trust", dir + "/keys/work.pub", "--app", "../x"])
        #expect(badWorker.status != 0 && badWorker.combined.contains("is not up to 64 of"), "\(badWorker.combined)")
        // A worker without the application: nothing for it.
        try FileManager.default.createDirectory(atPath: dir + "/plain", withIntermediateDirectories: true)
        let plain = try Workers(count: 1, master: master.address, trust: dir + "/keys/work.pub", dir: dir + "/plain")
        try await Task.sleep(for: .seconds(1))
        await #expect(try Self.status(master.address)["queued"] == 3)
        await plain.stop()
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try #require(parleyExecutablePath()))
        p.arguments = ["work", "worker", "--master", master.address, "--trust", dir + "/keys/work.pub", "--app", "python3", "--dir", dir + "/py", "--worker-name", "py-worker"]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; p.waitUntilExit() }
        let done = try await eventually(seconds: 30) { await (try? Self.status(master.address))?["succeeded"] == 3 }
        kill(p.processIdentifier, SIGTERM)
        if !done { Issue.record("status: \(String(describing: try? await Self.status(master.address)))") }
        #expect(try await parley(["work", "results", "2", "--master", master.address]).stdout.contains("accepted from py-worker"))
        await master.stop()
    }
}

extension WorkProcessTests {
    /// The nucleus applies to workers: a master's message is logged by each worker, its
    /// request delay is waited out, and work goes on.
    @Test func aMastersNucleusReachesItsWorkers() async throws {
        let dir = freshTestDirectory("work-nucleus")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        let master = try await ServeProcess.start(
            ["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/jobs.sqlite", "--message", "maintenance at noon", "--request-delay", "0.3"],
            command: ["work", "serve"]
        )
        #expect(try await parley(["work", "submit", "--master", master.address, "--key", dir + "/keys/work.key", "--", "/bin/true"]).status == 0)
        let workers = try Workers(count: 1, master: master.address, trust: dir + "/keys/work.pub", dir: dir)
        let done = try await eventually(seconds: 30) { await (try? Self.status(master.address))?["succeeded"] == 1 }
        await workers.stop()
        #expect(done)
        let log = String(decoding: FileManager.default.contents(atPath: workers.logs[0]) ?? Data(), as: UTF8.self)
        #expect(log.contains("message from the master: maintenance at noon"), "\(log)")
        await master.stop()
    }
}

extension WorkProcessTests {
    /// Lease renewal: a job that runs twice as long as the master's lease time keeps its lease
    /// (the worker renews it) and is accepted from its first and only lease, no attempt lost.
    /// [R-19.3-2]
    /// The same for a job whose input takes longer than a lease to fetch (an HTTP server that
    /// answers the worker after 9 s): its lease is renewed during the fetch too; before, it
    /// expired, and the job was handed to another worker while this one went on to run it.
    @Test func aLongJobKeepsItsLeaseByRenewingIt() async throws {
        let dir = freshTestDirectory("work-renew")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        // Answers its first request (the submitter's, which signs the input's hash) at once,
        // later ones (the worker's) after 9 s. Stopped by its PID.
        let http = Process()
        http.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        http.arguments = ["-u", "-c", """
            import http.server, time
            seen = [0]
            class H(http.server.BaseHTTPRequestHandler):
                def do_GET(self):
                    seen[0] += 1
                    if seen[0] > 1: time.sleep(9)
                    body = b"slow input\\n"
                    self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
                def log_message(self, *a): pass
            s = http.server.HTTPServer(("127.0.0.1", 0), H)
            print(f"port {s.server_port}", flush=True)
            s.serve_forever()
            """]
        let httpOut = Pipe()
        http.standardOutput = httpOut
        http.standardError = FileHandle.nullDevice
        try http.run()
        defer { kill(http.processIdentifier, SIGKILL); http.waitUntilExit() }
        // Read until the line is whole (an unbuffered print may come in pieces).
        var banner = ""
        for _ in 0..<50 where !banner.contains("\n") {
            banner += String(decoding: httpOut.fileHandleForReading.availableData, as: UTF8.self)
        }
        let port = try #require(banner.split(separator: " ").last.flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }, "\(banner)")
        let master = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/jobs.sqlite", "--lease-seconds", "4", "--max-attempts", "1"],
                                                  command: ["work", "serve"])
        #expect(try await parley(["work", "submit", "--master", master.address, "--key", dir + "/keys/work.key", "--", "/bin/sleep", "9"]).status == 0)
        let slow = try await parley(["work", "submit", "--master", master.address, "--key", dir + "/keys/work.key",
                                     "--input-url", "in.txt=http://127.0.0.1:\(port)/in.txt", "--", "/bin/cat", "in.txt"])
        #expect(slow.status == 0, "\(slow.combined)")
        let workers = try Workers(count: 1, master: master.address, trust: dir + "/keys/work.pub", dir: dir)
        let done = try await eventually(seconds: 90) { await (try? Self.status(master.address))?["succeeded"] == 2 }
        await workers.stop()
        if !done { Issue.record("status: \(String(describing: try? await Self.status(master.address)))") }
        for id in ["1", "2"] {
            let result = try await parley(["work", "results", id, "--master", master.address])
            #expect(result.stdout.contains("lease \(id):") && !result.stdout.contains("attempt failed") && result.stdout.contains("succeeded"), "\(result.combined)")
        }
        await master.stop()
    }
}

extension WorkProcessTests {
    /// A job that leaves the most output a report may carry (16 MiB) and writes 1 MiB to each
    /// of stdout and stderr: its report still fits one frame (the tails give way, keeping
    /// their ends), so the success is reported, not sent again and again until the lease
    /// expires.
    @Test func theLargestOutputsAndFullTailsFitOneReport() async throws {
        let dir = freshTestDirectory("work-full-report")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        let master = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/jobs.sqlite", "--max-attempts", "1"], command: ["work", "serve"])
        let submit = try await parley(["work", "submit", "--master", master.address, "--key", dir + "/keys/work.key", "--output", "out.bin", "--shell", "--",
                                       "head -c 16777216 /dev/zero > out.bin && head -c 1048576 /dev/zero | tr '\\0' o && head -c 1048576 /dev/zero | tr '\\0' e >&2"])
        #expect(submit.status == 0, "\(submit.combined)")
        let workers = try Workers(count: 1, master: master.address, trust: dir + "/keys/work.pub", dir: dir)
        let done = try await eventually(seconds: 90) { await (try? Self.status(master.address)).map { $0["succeeded"] == 1 || $0["failed"] == 1 } ?? false }
        await workers.stop()
        if !done { Issue.record("status: \(String(describing: try? await Self.status(master.address)))") }
        let saved = try await parley(["work", "results", "1", "--master", master.address, "--save-outputs", dir + "/saved"])
        #expect(saved.stdout.contains("succeeded") && saved.stdout.contains("output out.bin: 16777216 bytes"), "\(saved.combined.prefix(2000))")
        #expect(FileManager.default.contents(atPath: dir + "/saved/out.bin")?.count == 16 << 20)
        await master.stop()
    }
}

extension WorkProcessTests {
    /// `--require-caps`: a submitter's entity (work.submit) can submit but not take work; a
    /// worker's (work.worker) can work but not submit; each refusal names the capability.
    @Test func capabilitiesSeparateSubmittersFromWorkers() async throws {
        let dir = freshTestDirectory("work-caps")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        let keyring = dir + "/keyring"
        #expect(try await parley(["keyring", "add", "worker.a", "--keyring", keyring, "--caps", "work.worker"]).status == 0)
        #expect(try await parley(["keyring", "add", "client.ci", "--keyring", keyring, "--caps", "work.submit,work.read"]).status == 0)
        let master = try await ServeProcess.start(
            ["--listen", "127.0.0.1:0", "--database", "sqlite:\(dir)/jobs.sqlite", "--auth", "secret", "--keyring", keyring, "--require-caps"],
            command: ["work", "serve"]
        )
        let key = dir + "/keys/work.key"
        let byWorker = try await parley(["work", "submit", "--master", master.address, "--key", key, "--keyring", keyring, "--name", "worker.a", "--", "/bin/true"])
        #expect(byWorker.status == 2 && byWorker.combined.contains("work.submit"), "\(byWorker.combined)")
        let byClient = try await parley(["work", "submit", "--master", master.address, "--key", key, "--keyring", keyring, "--name", "client.ci", "--", "/bin/true"])
        #expect(byClient.status == 0, "\(byClient.combined)")
        let parleyPath = try #require(parleyExecutablePath())
        let clientAsWorker = try await runProcess(parleyPath, ["work", "worker", "--master", master.address, "--trust", dir + "/keys/work.pub", "--dir", dir + "/x",
                                                         "--keyring", keyring, "--name", "client.ci"], seconds: 30)
        #expect(clientAsWorker.status == 2 && clientAsWorker.combined.contains("work.worker"), "\(clientAsWorker.combined)")
        let worker = Process()
        worker.executableURL = URL(fileURLWithPath: parleyPath)
        worker.arguments = ["work", "worker", "--master", master.address, "--trust", dir + "/keys/work.pub", "--dir", dir + "/w", "--keyring", keyring, "--name", "worker.a"]
        worker.standardOutput = FileHandle.nullDevice
        worker.standardError = FileHandle.nullDevice
        try worker.run()
        defer { if worker.isRunning { kill(worker.processIdentifier, SIGKILL) }; worker.waitUntilExit() }
        let done = try await eventually(seconds: 30) {
            (try? await parley(["work", "status", "--master", master.address, "--json", "--keyring", keyring, "--name", "client.ci"]))?.stdout.contains("\"succeeded\":1") == true
        }
        #expect(done)
        kill(worker.processIdentifier, SIGTERM)
        await master.stop()
    }
}
