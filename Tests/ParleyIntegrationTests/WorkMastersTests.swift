import Foundation
import ParleyTestSupport
import ParleyWork
import SwiftProtobuf
import Testing

/// Several `parley work serve` masters on one PostgreSQL store (PARLEY_TEST_POSTGRES; `.ci/run`
/// starts the server): workers spread over them through `parley chaos` proxies that cut their
/// connections, while one master is killed (SIGKILL) and restarted twice. Nothing is lost,
/// nothing accepted twice, and every lease either completed or was returned ([R-19.6-1]).
extension WorkProcessTests {
    /// Runs `psql` on the test database; returns its rows (unaligned, tab-separated).
    static func psql(_ url: String, _ sql: String) async throws -> [String] {
        let path = ["/usr/bin/psql", "/usr/local/bin/psql"].first { FileManager.default.isExecutableFile(atPath: $0) }
        let out = try await runProcess(try #require(path, "psql is not installed"), [url, "-X", "-q", "-t", "-A", "-F", "\t", "-c", sql], seconds: 30)
        guard out.status == 0 else { throw ParleyTestFailure("psql failed: \(out.combined)") }
        return out.stdout.split(separator: "\n").map(String.init)
    }

    static func freshPostgresDatabase() async throws -> String? {
        guard let base = ProcessInfo.processInfo.environment["PARLEY_TEST_POSTGRES"] else { return nil }
        let name = "parley_masters_\(UUID().uuidString.prefix(8).lowercased())"
        _ = try await Self.psql(base, "CREATE DATABASE \(name)")
        var parts = try #require(URLComponents(string: base))
        parts.path = "/" + name
        return parts.string
    }

    @Test(.enabled(if: ProcessInfo.processInfo.environment["PARLEY_TEST_POSTGRES"] != nil, "needs PARLEY_TEST_POSTGRES"))
    func threeMastersOnePostgresOneKilledTwiceWorkersCut() async throws {
        let url = try await #require(try Self.freshPostgresDatabase())
        let total = Int(ProcessInfo.processInfo.environment["PARLEY_WORK_MASTERS_JOBS"] ?? "") ?? 600
        let dir = freshTestDirectory("work-masters")
        #expect(try await parley(["work", "keygen", "--dir", dir + "/keys"]).status == 0)
        let serveArguments = ["--database", url, "--trust", dir + "/keys/work.pub", "--lease-seconds", "12"]
        var masters: [ServeProcess] = []
        for _ in 0..<3 {
            masters.append(try await ServeProcess.start(["--listen", "127.0.0.1:0"] + serveArguments, command: ["work", "serve"]))
        }
        // Each master behind a proxy that cuts a connection now and then.
        var proxies: [ChaosProcess] = []
        for (i, master) in masters.enumerated() {
            proxies.append(try await ChaosProcess.start(["--listen", "127.0.0.1:0", "--to", master.address, "--cut-probability", "0.01", "--seed", "\(41 + i)", "--quiet"]))
        }
        let log = dir + "/ran.log"
        let submit = try await parley(
            ["work", "submit", "--master", masters[0].address, "--key", dir + "/keys/work.key", "--count", "\(total)", "--", "/bin/sh", "-c", "echo ${PWD##*/} >> \(log); sleep 0.05"],
            seconds: 120
        )
        #expect(submit.status == 0, "\(submit.combined.suffix(300))")
        let workers = try Workers(count: 8, master: "", trust: dir + "/keys/work.pub", dir: dir, masters: proxies.map(\.address), slots: 3)
        defer { workers.stopBlocking() }
        // Master 1 is killed and restarted on its address twice, once a third and once two
        // thirds of the jobs are done: the first time it stays away longer than a worker's
        // reconnect timeout (5 s with several masters), so that its workers move to another
        // master; the second time it is back at once, and they resume with it.
        for fraction in [3, 3 * 2] {
            let target = total * (fraction == 3 ? 1 : 2) / 3
            let reached = try await eventually(seconds: 240) { await ((try? Self.status(masters[0].address)["succeeded"]) ?? 0) >= target }
            if !reached { Issue.record("stuck before \(target) jobs: \(String(describing: try? await Self.status(masters[0].address)))") }
            let address = masters[1].address
            kill(masters[1].process.processIdentifier, SIGKILL)
            masters[1].process.waitUntilExit()
            try await Task.sleep(for: fraction == 3 ? .seconds(8) : .milliseconds(300))
            masters[1] = try await ServeProcess.start(["--listen", address] + serveArguments, command: ["work", "serve"])
        }
        let done = try await eventually(seconds: 300) { await (try? Self.status(masters[2].address)["succeeded"]) == total }
        // No worker gave up: those of the killed master went on with another.
        let alive = workers.processes.filter(\.isRunning).count
        await workers.stop()
        #expect(alive == 8, "\(8 - alive) workers ended early")
        let failedOver = workers.logs.filter { path in
            String(decoding: FileManager.default.contents(atPath: path) ?? Data(), as: UTF8.self).contains("lost the master; trying the next")
        }.count
        #expect(failedOver > 0, "no worker moved to another master")
        if !done { Issue.record("status: \(String(describing: try? await Self.status(masters[2].address)))") }
        await #expect(try Self.status(masters[1].address) == ["queued": 0, "leased": 0, "succeeded": total, "failed": 0])
        var cuts = 0
        for proxy in proxies { cuts += await proxy.stop()?.cuts ?? 0 }
        for master in masters { await master.stop() }

        // Accepted exactly once: one result per job (checked below: from the lease the job
        // records), none for anything else.
        let results = try await Self.psql(url, "SELECT count(*), count(*) FILTER (WHERE job_id BETWEEN 1 AND \(total)) FROM result")
        #expect(results == ["\(total)\t\(total)"], "results: \(results)")
        // Every lease either completed (the accepted one, or a recorded failure) or was
        // returned (expired, recorded as such; handed back ones leave the record).
        var ranByJob: [UInt64: Set<UInt64>] = [:]
        for line in String(decoding: FileManager.default.contents(atPath: log) ?? Data(), as: UTF8.self).split(separator: "\n") {
            let parts = line.split(separator: "-")
            guard parts.count == 3, let job = UInt64(parts[1]), let lease = UInt64(parts[2]) else { continue }
            ranByJob[job, default: []].insert(lease)
        }
        let store = try await PostgresWorkStore(url: url, connectTimeout: .seconds(60))
        var unaccounted: [String] = []
        var reruns = 0
        var records = 0
        for id in 1...UInt64(total) {
            guard let (record, result) = try await store.job(id) else {
                unaccounted.append("job \(id) is missing")
                continue
            }
            records += 1
            guard case .succeeded(let accepted) = record.state, let result else {
                unaccounted.append("job \(id) is \(record.state)")
                continue
            }
            let report = try Parley_Work_V1_ReportResult(serializedBytes: result)
            if report.leaseID != accepted { unaccounted.append("job \(id): result of lease \(report.leaseID), accepted lease \(accepted)") }
            for lease in record.leases {
                let ended = lease.id == accepted || record.failedLeases.contains(lease.id)
                    || record.failures.contains { $0.hasPrefix("lease \(lease.id) ") && $0.hasSuffix("expired") }
                if !ended { unaccounted.append("job \(id) lease \(lease.id)") }
            }
            let ran = ranByJob[id] ?? []
            if !ran.contains(accepted) { unaccounted.append("job \(id): accepted lease \(accepted) never ran") }
            if !ran.isSubset(of: Set(record.leases.map(\.id))) { unaccounted.append("job \(id) ran under leases \(ran.sorted()), handed out \(record.leases.map(\.id))") }
            reruns += max(0, ran.count - 1)
        }
        await store.close()
        #expect(records == total)
        #expect(unaccounted.isEmpty, "\(unaccounted.count) leases unaccounted for: \(unaccounted.prefix(10))")
        print("parley work: \(total) jobs on 3 masters (one killed twice), \(cuts) cuts, \(failedOver) workers moved master, \(reruns) jobs ran again after a lease expired")
    }
}
