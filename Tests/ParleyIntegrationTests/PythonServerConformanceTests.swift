import Foundation
import ParleyConformance
import ParleyTestSupport
import ParleyWire
import Testing

/// The independent Python server of Tests/Interop (`parley_server.py`, written from
/// docs/protocol.md alone), started by a test: its stdout and stderr go to files, its address
/// is read from its `listening on ADDRESS` line (start it on port 0), and it is stopped by PID
/// (SIGTERM, then SIGKILL) by `stop()` or, failing that, when released.
final class PythonServerProcess {
    let process: Process
    let outPath: String
    let errPath: String
    /// The address the server printed, e.g. `127.0.0.1:40123` or `unix:/tmp/.../x.sock`.
    private(set) var address = ""

    private init(process: Process, outPath: String, errPath: String) {
        self.process = process
        self.outPath = outPath
        self.errPath = errPath
    }

    deinit {
        if self.process.isRunning { kill(self.process.processIdentifier, SIGKILL) }
    }

    /// What the server printed so far, and its log (stderr).
    var output: String { String(decoding: FileManager.default.contents(atPath: self.outPath) ?? Data(), as: UTF8.self) }
    var log: String { String(decoding: FileManager.default.contents(atPath: self.errPath) ?? Data(), as: UTF8.self) }

    /// Starts `python3 parley_server.py LISTEN ARGUMENTS` (e.g. `--keyring FILE`) and waits (at
    /// most `seconds`) until it prints a whole `listening on ADDRESS` line.
    static func start(_ listen: String, _ arguments: [String] = [], seconds: Double = 30) async throws -> PythonServerProcess {
        let python = try #require(PythonServerConformanceTests.python, "python3 is needed (.ci/run installs it)")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: python)
        process.arguments = [PythonServerConformanceTests.script, listen] + arguments
        let base = testScratchPath("pyserver-\(UUID().uuidString.prefix(8))")
        let outPath = base + ".stdout", errPath = base + ".stderr"
        _ = FileManager.default.createFile(atPath: outPath, contents: nil)
        _ = FileManager.default.createFile(atPath: errPath, contents: nil)
        process.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: outPath))
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: errPath))
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let server = PythonServerProcess(process: process, outPath: outPath, errPath: errPath)
        let prefix = "listening on "
        let deadline = ContinuousClock.now.advanced(by: .milliseconds(Int64(seconds * 1000)))
        while ContinuousClock.now < deadline, process.isRunning {
            // Only whole lines: the last piece, after the last newline, may still be written.
            let lines = server.output.split(separator: "\n", omittingEmptySubsequences: false).dropLast()
            if let line = lines.first(where: { $0.hasPrefix(prefix) }) {
                server.address = String(line.dropFirst(prefix.count))
                return server
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        let printed = server.output + server.log
        _ = await server.stop()
        throw ParleyError(code: .connectFailed, message: "parley_server.py \(listen) did not start listening: \(printed)")
    }

    /// Stops the server by PID (SIGTERM, then SIGKILL after 10 s) and returns its exit status
    /// (0: it drained and stopped on SIGTERM).
    @discardableResult
    func stop() async -> Int32 {
        if self.process.isRunning { kill(self.process.processIdentifier, SIGTERM) }
        for _ in 0..<1000 where self.process.isRunning { try? await Task.sleep(for: .milliseconds(10)) }
        if self.process.isRunning { kill(self.process.processIdentifier, SIGKILL) }
        self.process.waitUntilExit()
        return self.process.terminationStatus
    }
}

/// Issue 13: `parley conform` runs against the independent Python server of Tests/Interop
/// too, over TCP and a Unix socket. Started without `--keyring`, the Python server offers
/// neither secure mode (bit 8: method secret, sealed frames) nor lossless sessions (bit 9),
/// as a version 1 server without them: every check passes except theirs, which skip and say
/// so. Started with `--keyring FILE` (methods none and secret, modes crc and secure, lossless
/// sessions kept 30 s), it offers both, and with a key of that keyring every check runs and
/// passes, none skips; `--secure-sessions` (and a Python server whose only mode is secure)
/// runs the session checks sealed.
@Suite(.serialized, .timeLimit(.minutes(10)))
struct PythonServerConformanceTests {
    static let python: String? = ["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"].first { FileManager.default.isExecutableFile(atPath: $0) }
    static var script: String { ConformanceCoverageTests.root.appendingPathComponent("Tests/Interop/python/parley_server.py").path }
    static var client: String { ConformanceCoverageTests.root.appendingPathComponent("Tests/Interop/python/parley_client.py").path }

    /// A skip that a server started without `--keyring` (no secure mode, no lossless
    /// sessions) is entitled to: a check
    /// of section 5.1 (method secret, secure sessions) or of R-6.1-6 (early requests, secure
    /// mode only) whose reason names method secret, secure mode or a key, or of section 5.2
    /// (lossless sessions) whose reason names them, or the check of section 7.16 that needs a
    /// lossless session (the Python server offers DIRECT frames, and every other DIRECT check
    /// must pass).
    static func isExpectedSkip(_ result: CheckResult) -> Bool {
        guard result.status == .skip, let reason = result.reason?.lowercased() else { return false }
        // R-6.1-6 (requests right after CLIENT_IDENT) needs secure mode too.
        if result.id.hasPrefix("R-5.1-") || result.id == "R-6.1-6" {
            return reason.contains("secret") || reason.contains("secure mode") || reason.contains("keyring")
        }
        if result.id.hasPrefix("R-5.2-") { return reason.contains("lossless") }
        if result.id.hasPrefix("R-7.16-") { return reason.contains("lossless") }
        return false
    }

    /// Runs every check against `address` (a check waits up to 15 s for each answer: the
    /// Python server computes CRC-32C in Python, and a full parallel run on two cores is slow)
    /// and expects no FAIL and only the skips of secure mode and lossless sessions.
    static func conform(_ address: String) async throws -> ConformanceReport {
        let target = ConformanceTarget(address: try ParleyAddress(parsing: address))
        let report = try await ConformanceRunner(target: target, timeout: .seconds(15)).run()
        let failed = report.results.filter { $0.status == .fail }
        #expect(failed.isEmpty, "\(address): \(report.summary)\n\(failed.map(\.line).joined(separator: "\n"))")
        let unexpected = report.results.filter { $0.status == .skip && !Self.isExpectedSkip($0) }
        #expect(unexpected.isEmpty, "\(address): skips not due to secure mode or lossless sessions:\n\(unexpected.map(\.line).joined(separator: "\n"))")
        #expect(report.results.count == ConformanceRunner.checks.count)
        // The checks that need only the handshake, the session and the echo service ran.
        #expect(report.passed + report.skipped == report.results.count && report.passed >= report.results.count / 2, "\(report.summary)")
        return report
    }

    @Test func conformAgainstThePythonServerOverTCP() async throws {
        let server = try await PythonServerProcess.start("127.0.0.1:0")
        #expect(server.address.hasPrefix("127.0.0.1:") && !server.address.hasSuffix(":0"), "\(server.address)")
        _ = try await Self.conform(server.address)
        // The reference client and the independent Python client against the Python server.
        let python = try #require(Self.python)
        let client = try await runProgram(python, [Self.client, server.address], seconds: 90)
        #expect(client.status == 0 && client.stdout.contains("OK: every check passed"), "\(client.combined)")
        if let parley = parleyExecutablePath() {
            let ping = try await runProgram(parley, ["ping", server.address, "--count", "3"], seconds: 60)
            #expect(ping.status == 0, "\(ping.combined)")
        }
        let status = await server.stop()
        #expect(status == 0, "the Python server did not stop cleanly on SIGTERM: \(server.log)")
    }

    @Test func conformAgainstThePythonServerOverAUnixSocket() async throws {
        let path = testScratchPath("pyserver-\(UUID().uuidString.prefix(8)).sock")
        let server = try await PythonServerProcess.start("unix:" + path)
        #expect(server.address == "unix:" + path)
        _ = try await Self.conform(server.address)
        let status = await server.stop()
        #expect(status == 0, "the Python server did not stop cleanly on SIGTERM: \(server.log)")
        #expect(!FileManager.default.fileExists(atPath: path), "the socket file is left behind")
    }

    /// A keyring of one entity, client.alice (every capability), made by `parley keyring add`
    /// as a user makes one: the Python server reads it with `--keyring`, the checks and the
    /// clients authenticate with it (method secret).
    static func makeKeyring(_ name: String) async throws -> String {
        let keyring = freshTestDirectory(name) + "/server.keyring"
        let out = try await parley(["keyring", "add", "client.alice", "--keyring", keyring, "--caps", "*"])
        #expect(out.status == 0, Comment(rawValue: out.combined))
        return keyring
    }

    /// `parley conform ADDRESS --keyring KEYRING --name client.alice --json EXTRA` (a check waits
    /// up to 15 s for each answer, as in `conform`): no check fails, and every check ran.
    static func conformWithKey(_ address: String, keyring: String, _ extra: [String] = []) async throws -> ConformanceReport {
        let out = try await parleyRun(
            ["conform", address, "--keyring", keyring, "--name", "client.alice", "--timeout", "15", "--json"] + extra, seconds: 240
        )
        #expect(out.status == 0, "\(address) \(extra): \(out.combined)")
        let report = try JSONDecoder().decode(ConformanceReport.self, from: Data(out.stdout.utf8))
        let failed = report.results.filter { $0.status == .fail }
        #expect(failed.isEmpty, "\(address) \(extra): \(report.summary)\n\(failed.map(\.line).joined(separator: "\n"))")
        #expect(report.results.count == ConformanceRunner.checks.count)
        return report
    }

    /// With `--keyring` the Python server offers secure mode and lossless sessions, so nothing
    /// skips: every check of method secret, sealed frames, R-6.1-6 (sealed requests before
    /// SERVER_IDENT), lossless sessions (tokens, ACK, resume, reset, the race rule) and the
    /// check of section 7.16 that needs a lossless session passes, over TCP and a Unix socket.
    @Test func conformWithAKeyringAgainstThePythonServerRunsEveryCheck() async throws {
        let keyring = try await Self.makeKeyring("pyserver-keyring")
        let tcp = try await PythonServerProcess.start("127.0.0.1:0", ["--keyring", keyring])
        let path = testScratchPath("pyserver-\(UUID().uuidString.prefix(8)).sock")
        let unix = try await PythonServerProcess.start("unix:" + path, ["--keyring", keyring])
        #expect(unix.address == "unix:" + path)
        for server in [tcp, unix] {
            let report = try await Self.conformWithKey(server.address, keyring: keyring)
            let skipped = report.results.filter { $0.status == .skip }
            #expect(skipped.isEmpty, "\(server.address): \(report.summary)\n\(skipped.map(\.line).joined(separator: "\n"))")
            #expect(report.passed == report.results.count, "\(server.address): \(report.summary)")
        }
        // The reference client in secure mode, and in crc mode after method secret.
        for (mode, shown) in [("secure", "mode secure ("), ("crc", "mode crc")] {
            let ping = try await parley(["ping", tcp.address, "--keyring", keyring, "--name", "client.alice", "--mode", mode, "--count", "3"], seconds: 60)
            #expect(ping.status == 0 && ping.combined.contains("auth secret as client.alice, " + shown), "\(ping.combined)")
            #expect(ping.combined.contains("3 round trips to"), "\(ping.combined)")
        }
        // The Python server reads its keyring again when it changes: a revoked key is refused.
        #expect(try await parley(["keyring", "revoke", "client.alice", "--keyring", keyring]).status == 0)
        let revoked = try await parley(["ping", tcp.address, "--keyring", keyring, "--name", "client.alice", "--count", "1"], seconds: 60)
        #expect(revoked.status != 0 && revoked.combined.contains("authenticationFailed"), "\(revoked.combined)")
        #expect(await tcp.stop() == 0, "the Python server did not stop cleanly on SIGTERM: \(tcp.log)")
        #expect(await unix.stop() == 0, "the Python server did not stop cleanly on SIGTERM: \(unix.log)")
        #expect(!FileManager.default.fileExists(atPath: path), "the socket file is left behind")
    }

    /// The session checks sealed: `--secure-sessions` against the Python server that allows
    /// both modes, and a Python server whose only mode is secure (it requires bit 8). The only
    /// skips are those of crc-mode framing and of the method-none handshake written by hand;
    /// every check of sections 5.1, 5.2 and 7 passes.
    @Test func conformRunsTheSessionChecksSealedAgainstThePythonServer() async throws {
        let keyring = try await Self.makeKeyring("pyserver-secure")
        let both = try await PythonServerProcess.start("127.0.0.1:0", ["--keyring", keyring])
        let secureOnly = try await PythonServerProcess.start("127.0.0.1:0", ["--keyring", keyring, "--auth", "secret", "--mode", "secure"])
        let sealed = ConformanceRunner.checks.filter { $0.id.hasPrefix("R-5.1-") || $0.id.hasPrefix("R-5.2-") || $0.id.hasPrefix("R-7.") }
        for (server, extra) in [(both, ["--secure-sessions"]), (secureOnly, [String]())] {
            let report = try await Self.conformWithKey(server.address, keyring: keyring, extra)
            for result in report.results where result.status == .skip {
                let reason = result.reason ?? ""
                #expect(reason.contains("crc-mode framing") || reason.contains("method-none handshake"), "\(server.address) \(extra): \(result.line)")
            }
            for check in sealed where !report.results.contains(where: { $0.id == check.id && $0.name == check.name && $0.status == .pass }) {
                // R-5.1-11's method-none check needs a method-none crc session: it skips, saying so.
                let skip = report.results.first { $0.id == check.id && $0.name == check.name && $0.status == .skip }
                #expect(skip?.reason?.contains("method-none handshake") == true, "\(server.address) \(extra): \(check.id) \(check.name) did not pass")
            }
        }
        // Without bit 8 a client cannot reach the secure-only server: missingFeatures at the banner.
        let plain = try await parley(["ping", secureOnly.address, "--count", "1"], seconds: 60)
        #expect(plain.status != 0 && plain.combined.contains("missingFeatures"), "\(plain.combined)")
        #expect(await both.stop() == 0, "\(both.log)")
        #expect(await secureOnly.stop() == 0, "\(secureOnly.log)")
    }

    /// A lossless session with the Python server resumes through `parley chaos` cutting every
    /// connection after 300 KB: `parley send --lossless` (method secret, secure mode) delivers
    /// every one-way message and its final Ping is answered, across the reconnects.
    @Test func aLosslessSessionWithThePythonServerSurvivesCuts() async throws {
        let keyring = try await Self.makeKeyring("pyserver-lossless")
        let server = try await PythonServerProcess.start("127.0.0.1:0", ["--keyring", keyring])
        let chaos = try await ChaosProcess.start(["--listen", "127.0.0.1:0", "--to", server.address, "--cut-after", "300000", "--seed", "20261207"])
        let send = try await parley(
            ["send", chaos.address, "--lossless", "--count", "20000", "--size", "64", "--keyring", keyring, "--name", "client.alice"], seconds: 120
        )
        #expect(send.status == 0, "\(send.combined)\n\(server.log)")
        #expect(send.combined.contains("sent 20000 messages"), "\(send.combined)")
        #expect(send.combined.contains("link up (reconnect"), "no reconnect happened: \(send.combined)")
        let cuts = await chaos.stop()
        #expect((cuts?.cuts ?? 0) >= 1, "\(chaos.output)")
        #expect(await server.stop() == 0, "\(server.log)")
    }
}
