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

    /// Starts `python3 parley_server.py LISTEN` and waits (at most `seconds`) until it prints
    /// a whole `listening on ADDRESS` line.
    static func start(_ listen: String, seconds: Double = 30) async throws -> PythonServerProcess {
        let python = try #require(PythonServerConformanceTests.python, "python3 is needed (.ci/run installs it)")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: python)
        process.arguments = [PythonServerConformanceTests.script, listen]
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
/// too, over TCP and a Unix socket. Every check passes, except those of the two features the
/// Python server does not offer, secure mode (bit 8: method secret, sealed frames) and
/// lossless sessions (bit 9), which skip and say so.
@Suite(.serialized, .timeLimit(.minutes(5)))
struct PythonServerConformanceTests {
    static let python: String? = ["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"].first { FileManager.default.isExecutableFile(atPath: $0) }
    static var script: String { ConformanceCoverageTests.root.appendingPathComponent("Tests/Interop/python/parley_server.py").path }
    static var client: String { ConformanceCoverageTests.root.appendingPathComponent("Tests/Interop/python/parley_client.py").path }

    /// A skip that a server without secure mode and lossless sessions is entitled to: a check
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
}
