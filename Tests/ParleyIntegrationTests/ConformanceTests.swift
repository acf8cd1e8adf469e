import Foundation
import NIOCore
import Parley
import ParleyConformance
import ParleyNIO
import ParleyServices
import ParleyTestSupport
import ParleyWire
import Testing

/// What a program printed, and how it ended.
struct ProgramRun: Sendable {
    var status: Int32
    var stdout: String
    var stderr: String
    var combined: String { self.stdout + self.stderr }
}

/// Runs a program to completion without holding a thread of the cooperative pool (other
/// tests, and the in-process servers' handlers, need them; a blocked pool of two threads
/// deadlocks): it waits with `Task.sleep`, and kills the program by PID after `seconds`.
func runProgram(_ executable: String, _ arguments: [String], seconds: Double) async throws -> ProgramRun {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    let base = testScratchPath("run-\(UUID().uuidString.prefix(8))")
    let outPath = base + ".stdout", errPath = base + ".stderr"
    _ = FileManager.default.createFile(atPath: outPath, contents: nil)
    _ = FileManager.default.createFile(atPath: errPath, contents: nil)
    defer { for p in [outPath, errPath] { try? FileManager.default.removeItem(atPath: p) } }
    process.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: outPath))
    process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: errPath))
    process.standardInput = FileHandle.nullDevice
    try process.run()
    let deadline = ContinuousClock.now.advanced(by: .milliseconds(Int64(seconds * 1000)))
    while process.isRunning && ContinuousClock.now < deadline { try? await Task.sleep(for: .milliseconds(10)) }
    if process.isRunning { kill(process.processIdentifier, SIGKILL) }
    while process.isRunning { try? await Task.sleep(for: .milliseconds(10)) }
    process.waitUntilExit()
    return ProgramRun(
        status: process.terminationStatus,
        stdout: String(decoding: FileManager.default.contents(atPath: outPath) ?? Data(), as: UTF8.self),
        stderr: String(decoding: FileManager.default.contents(atPath: errPath) ?? Data(), as: UTF8.self)
    )
}

/// `parley ARGUMENTS`, run with `runProgram`.
func parleyRun(_ arguments: [String], seconds: Double = 120) async throws -> ProgramRun {
    try await runProgram(try #require(parleyExecutablePath(), "parley executable not built"), arguments, seconds: seconds)
}

/// `parley conform` (issue 13): the runner passes every check against the reference server,
/// and each deliberate fault of a test double makes exactly its one check fail.
@Suite(.serialized, .timeLimit(.minutes(5)))
struct ConformanceTests {
    /// `parley conform` against a real `parley serve` process (methods none and secret, and
    /// a key of its keyring, so that the checks of method secret and of secure sessions run
    /// too), over TCP and a Unix socket: every check passes, the output has one line per
    /// check and the summary, exit status 0.
    @Test func conformAgainstParleyServePassesEveryCheck() async throws {
        let socket = testScratchPath("conform-\(UUID().uuidString.prefix(8)).sock")
        let keyring = freshTestDirectory("conform") + "/server.keyring"
        try writeKeyring(keyring, [("client.alice", ["*"])])
        let serve = try await ServeProcess.start([
            "--listen", "127.0.0.1:0", "--listen", "unix:" + socket, "--auth", "none,secret", "--keyring", keyring, "--mode", "crc,secure",
        ])
        // Stopped at the end, or killed by PID when released if the test throws first.
        let checks = ConformanceRunner.checks
        let out = try await parleyRun(["conform", serve.address, "--keyring", keyring, "--name", "client.alice"], seconds: 180)
        #expect(out.status == 0, "\(out.combined)")
        let lines = out.stdout.split(separator: "\n").map(String.init)
        #expect(lines.last == "\(checks.count) checks: \(checks.count) passed, 0 failed, 0 skipped", "\(out.stdout)")
        for check in checks {
            #expect(lines.contains("\(check.id) PASS \(check.name)"), "no PASS line for \(check.id) \(check.name)")
        }
        // --only and --json, over the Unix socket.
        let json = try await parleyRun(["conform", "unix:" + socket, "--json", "--only", "R-7.12-1", "[R-4.4-1]"], seconds: 60)
        #expect(json.status == 0, "\(json.combined)")
        let report = try JSONDecoder().decode(ConformanceReport.self, from: Data(json.stdout.utf8))
        #expect(report.results.map(\.id) == ["R-4.4-1", "R-7.12-1"])
        #expect(report.results.allSatisfy { $0.status == .pass })
        #expect(json.stdout.contains("\"passed\":2") && json.stdout.contains("\"failed\":0"))
        let unknown = try await parleyRun(["conform", serve.address, "--only", "R-99-1"], seconds: 30)
        #expect(unknown.status != 0 && unknown.stderr.contains("no check has the id R-99-1"))
        await serve.stop()
    }

    /// A server that allows only method secret in secure mode: with a key, the checks that
    /// need a session run in secure mode, their frames sealed, rather than skipping. The only
    /// checks that skip are those of crc-mode framing (CRCs, which sealing replaces) and those
    /// writing the method-none handshake by hand; every session check of section 7 passes.
    /// `--secure-sessions` does the same against a server that also allows crc mode.
    @Test func conformRunsTheSessionChecksInSecureMode() async throws {
        let keyring = freshTestDirectory("conform-secure") + "/server.keyring"
        try writeKeyring(keyring, [("client.alice", ["*"])])
        let secureOnly = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--auth", "secret", "--keyring", keyring, "--mode", "secure"])
        let both = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--auth", "none,secret", "--keyring", keyring, "--mode", "crc,secure"])
        let sessionChecks = ConformanceRunner.checks.filter { $0.id.hasPrefix("R-7.") }
        #expect(sessionChecks.count >= 10)
        // Lossless sessions too: their reconnects authenticate and key anew, the SESSION_RECONNECT sealed.
        let losslessChecks = ConformanceRunner.checks.filter { $0.id.hasPrefix("R-5.2-") }
        #expect(losslessChecks.count >= 12)
        for (address, extra) in [(secureOnly.address, [String]()), (both.address, ["--secure-sessions"])] {
            let out = try await parleyRun(["conform", address, "--keyring", keyring, "--name", "client.alice", "--json"] + extra, seconds: 180)
            #expect(out.status == 0, "\(address) \(extra): \(out.combined)")
            let report = try JSONDecoder().decode(ConformanceReport.self, from: Data(out.stdout.utf8))
            #expect(report.failed == 0, "\(report.results.filter { $0.status == .fail }.map(\.line))")
            for result in report.results where result.status == .skip {
                let reason = result.reason ?? ""
                #expect(
                    reason.contains("crc-mode framing") || reason.contains("method-none handshake"),
                    "\(address) \(extra): \(result.line)"
                )
            }
            for check in sessionChecks + losslessChecks {
                #expect(report.results.contains { $0.id == check.id && $0.name == check.name && $0.status == .pass }, "\(address) \(extra): \(check.id) \(check.name) did not pass")
            }
            // The preamble rules of section 4.4 hold for sealed preambles too.
            #expect(report.results.filter { $0.id == "R-4.4-2" }.allSatisfy { $0.status == .pass })
        }
        // Without a key there is no secure session: the session checks skip, saying why.
        let keyless = try await parleyRun(["conform", secureOnly.address, "--only", "R-7.4-1"], seconds: 60)
        #expect(keyless.status == 0 && keyless.stdout.contains("SKIP") && keyless.stdout.contains("with a key of its keyring"), "\(keyless.combined)")
        let noKey = try await parleyRun(["conform", both.address, "--secure-sessions"], seconds: 30)
        #expect(noKey.status != 0 && noKey.stderr.contains("--secure-sessions needs --keyring"), "\(noKey.combined)")
        await secureOnly.stop()
        await both.stop()
    }

    /// The checks run over TLS and WebSocket too (the transport's byte stream), and the client
    /// test listens on TLS, serving method tls to a client with a certificate.
    @Test func conformOverTLSAndWebSocket() async throws {
        let certs = freshTestDirectory("conform-certs")
        #expect(try await parleyRun(["cert", "init", "--dir", certs], seconds: 60).status == 0)
        let serve = try await ServeProcess.start(["--listen", "tls://127.0.0.1:0", "--listen", "ws://127.0.0.1:0/parley", "--cert", certs, "--auth", "tls,none"])
        let ws = try #require(serve.log.range(of: #"ws://127\.0\.0\.1:[0-9]+/parley"#, options: .regularExpression).map { String(serve.log[$0]) })
        for (address, extra) in [(serve.address, ["--cert", certs]), (ws, [])] {
            let out = try await parleyRun(["conform", address] + extra, seconds: 120)
            #expect(out.status == 0, "\(address): \(out.stdout)")
            #expect(out.stdout.contains(" 0 failed"), "\(address): \(out.stdout)")
            #expect(!out.stdout.contains("FAIL"))
        }
        await serve.stop()
        let parleyPath = try #require(parleyExecutablePath())
        let keyring = certs + "/client.keyring"
        try writeKeyring(keyring, [("client.alice", ["*"])])
        let tester = ClientConformanceTester(
            listen: .tls(host: "127.0.0.1", port: 0), tls: try ParleyTLS.server(directory: certs), timeout: ClientConformanceTests.timeout, idle: .seconds(30),
            secrets: try ParleyKeyring.load(path: keyring).directory
        )
        let address = try await tester.start()
        let done = Signal()
        let clients = Task {
            for run in 0..<11 where !done.isRaised {
                let key = ClientConformanceTests.secretRuns.contains(run) ? ["--keyring", keyring, "--name", "client.alice"] : []
                _ = try? await runProgram(parleyPath, ["ping", address.description, "--cert", certs, "--count", "2"] + key, seconds: 30)
            }
        }
        let report = await tester.run(address: address)
        done.raise()
        await clients.value
        #expect(report.failed == 0 && report.skipped == 0, "\(report.results.filter { $0.status != .pass }.map(\.line))")
    }

    /// Every server check can fail. The checks run against blunt breakages of the server's
    /// answers (FaultyServer.Mutation: refusals unsaid and connections never closed; silence
    /// after the handshake), one after the other, each check until one makes it fail. A check
    /// that passes against all of them could not fail, and is reported. The runner's probe
    /// connection is spared, so that the checks run rather than skip; a check waits 2 s for
    /// an answer, which under a mutation does not come.
    ///
    ///
    /// The proxies close their connections when they stop: a mutation holds the client's side
    /// open, and the in-process server's graceful shutdown waited for those connections
    /// without limit (the test once hung there; the server's shutdown now also has a grace
    /// period). Under the full load of a CI run a check once skipped (the probe then waited
    /// only 2 s for the echo service; it now waits 10 s, and a skip is run again once).
    /// PARLEY_CONFORM_MUTATIONS=0 leaves it out.
    @Test(.enabled(if: ProcessInfo.processInfo.environment["PARLEY_CONFORM_MUTATIONS"] != "0"), .timeLimit(.minutes(10)))
    func everyServerCheckFailsAgainstSomeBreakage() async throws {
        try await FaultyServer.withUpstream("conform-mutations") { port, alice, group in
            // Checks are told apart by id and name (several checks share an id).
            var alive = Set(ConformanceRunner.checks.map { "\($0.id) \($0.name)" })
            var killedBy: [FaultyServer.Mutation: Int] = [:]
            for mutation in FaultyServer.Mutation.allCases where !alive.isEmpty {
                // The checks of the ids still alive, in four runners at once (most of the time
                // goes in waiting for answers that do not come), each through its own proxy.
                let ids = Set(alive.map { String($0.prefix { $0 != " " }) }).sorted()
                var results = try await Self.run(ids, against: mutation, upstreamPort: port, secret: alice, group: group)
                // While the probe is spared, no check may skip: each must get the chance to fail.
                // A skip is run again once (under a full parallel run the probe, which decides
                // what is offered, has been slow).
                let skipped = Set(results.filter { $0.status == .skip }.map(\.id)).sorted()
                if mutation.sparesProbe, !skipped.isEmpty {
                    let again = try await Self.run(skipped, against: mutation, upstreamPort: port, secret: alice, group: group)
                    results = results.filter { !skipped.contains($0.id) } + again
                    #expect(again.allSatisfy { $0.status != .skip }, "\(mutation): \(again.filter { $0.status == .skip }.map(\.line))")
                }
                for result in results where result.status == .fail && alive.contains("\(result.id) \(result.name)") {
                    alive.remove("\(result.id) \(result.name)")
                    killedBy[mutation, default: 0] += 1
                }
            }
            #expect(alive.isEmpty, "checks no breakage made fail:\n\(alive.sorted().joined(separator: "\n"))")
            print("conformance mutations: \(ConformanceRunner.checks.count) checks, failed by \(killedBy.map { "\($0.key): \($0.value)" }.sorted().joined(separator: ", "))")
        }
    }

    /// The checks of `ids` against one mutation, in four runners at once (most of the time
    /// goes in waiting for answers that do not come), each through its own proxy.
    static func run(
        _ ids: [String], against mutation: FaultyServer.Mutation, upstreamPort port: Int, secret: SecretCredentials, group loops: any EventLoopGroup
    ) async throws -> [CheckResult] {
        let shares = (0..<4).map { k in ids.enumerated().filter { $0.offset % 4 == k }.map(\.element) }.filter { !$0.isEmpty }
        return try await withThrowingTaskGroup(of: ConformanceReport.self) { group in
            for only in shares {
                group.addTask {
                    try await FaultyServer(fault: .none, upstreamPort: port, mutation: mutation, spared: mutation.sparesProbe ? 1 : 0, group: loops)
                        .conform(secret: secret, timeout: .seconds(2), only: only)
                }
            }
            return try await group.reduce(into: [CheckResult]()) { $0 += $1.results }
        }
    }

    /// A failing check: a FAIL line with what was expected and seen, and exit status 1.
    @Test func aFailedCheckIsPrintedAndGivesExitStatusOne() async throws {
        try await withServer { _, addresses in
            guard case .tcp(_, let port) = addresses[0].kind else { throw ParleyError(code: .invalidArgument, message: "not TCP") }
            let proxy = FaultyServer(fault: .ignoresRequiredUnknownFeatures, upstreamPort: port)
            let proxyPort = try await proxy.start()
            let out = try await parleyRun(["conform", "127.0.0.1:\(proxyPort)", "--only", "R-3-7", "R-3-8"], seconds: 60)
            await proxy.stop()
            #expect(out.status == 1, "\(out.combined)")
            #expect(out.stdout.contains("R-3-7 FAIL a client requiring an unknown feature bit (40) is refused\n    expected: the connection closed"), "\(out.stdout)")
            #expect(out.stdout.contains("    seen:     AUTH_DONE"), "\(out.stdout)")
            #expect(out.stdout.contains("R-3-8 PASS"))
            #expect(out.stdout.hasSuffix("2 checks: 1 passed, 1 failed, 0 skipped\n"))
        }
    }

    /// A server that cannot be reached fails every check, saying so.
    @Test func anUnreachableServerFailsEveryCheck() async throws {
        let report = try await ConformanceRunner(target: ConformanceTarget(address: .unix(path: testScratchPath("nobody.sock"))), only: ["R-3-1", "R-7.5-1"]).run()
        #expect(report.results.map(\.status) == [.fail, .fail])
        #expect(report.results.allSatisfy { ($0.seen ?? "").contains("onnect") || ($0.seen ?? "").contains("No such file") })
    }
}

/// `parley conform --client-test`: the reference client and the independent Python client
/// meet every client check, and a faulty client fails exactly the checks it breaks.
@Suite(.serialized, .timeLimit(.minutes(5)))
struct ClientConformanceTests {
    /// How long the tester waits for a client's next frame: the full suite runs in parallel on
    /// two cores, and a client starved for 5 s (the runner's default) once failed R-7.12-1;
    /// the Python client, starting under a load of 12, once more at 20 s.
    static let timeout = Duration.seconds(45)

    /// Starts a client test on 127.0.0.1 and runs `client` (given the tester's address) once
    /// per connection until the tester has played every scenario (at most `runs` times).
    /// Runs the client under test `runs` times (the number of the run given: 0, 1, ...)
    /// against the client test; `secrets` is the tester's keyring for the scenarios of method
    /// secret (the 7th and 8th).
    static func clientTest(
        only: [String] = [], idle: Duration = .seconds(30), runs: Int = 11, secrets: SecretDirectory? = nil,
        _ client: @escaping @Sendable (String, Int) async -> Void
    ) async throws -> ConformanceReport {
        let tester = ClientConformanceTester(listen: .tcp(host: "127.0.0.1", port: 0), timeout: Self.timeout, idle: idle, only: only, secrets: secrets)
        let address = try await tester.start()
        let done = Signal()
        let clients = Task {
            for run in 0..<runs where !done.isRaised { await client(address.description, run) }
        }
        let report = await tester.run(address: address)
        done.raise()
        await clients.value
        return report
    }

    /// The scenarios of method secret are the 7th and 8th: the client uses its key there.
    static let secretRuns = 6...7

    @Test func theReferenceClientMeetsEveryClientCheck() async throws {
        let parley = try #require(parleyExecutablePath(), "parley executable not built")
        let keyring = freshTestDirectory("client-test") + "/keyring"
        try writeKeyring(keyring, [("client.alice", ["*"])])
        let report = try await Self.clientTest(secrets: try ParleyKeyring.load(path: keyring).directory) { address, run in
            let key = Self.secretRuns.contains(run) ? ["--keyring", keyring, "--name", "client.alice"] : []
            _ = try? await runProgram(parley, ["ping", address, "--count", "3"] + key, seconds: 30)
        }
        #expect(report.results.count == 17)
        #expect(report.results.filter { $0.id.hasPrefix("R-5.1-") }.count == 3)
        #expect(report.failed == 0 && report.skipped == 0, "\(report.results.filter { $0.status != .pass }.map(\.line).joined(separator: "\n"))")
    }

    /// A client whose key is not the one the tester's keyring holds for its entity fails the
    /// checks of method secret (the proof does not check out), and the `parley conform
    /// --client-test --keyring` command line plays them.
    @Test func aClientWithTheWrongKeyFailsTheChecksOfMethodSecret() async throws {
        let parley = try #require(parleyExecutablePath(), "parley executable not built")
        let directory = freshTestDirectory("client-test-wrong-key")
        try writeKeyring(directory + "/tester.keyring", [("client.alice", ["*"])])
        try writeKeyring(directory + "/client.keyring", [("client.alice", ["*"])])
        let report = try await Self.clientTest(only: ["R-5.1-3", "R-5.1-5"], idle: .seconds(20), runs: 9, secrets: try ParleyKeyring.load(path: directory + "/tester.keyring").directory) { address, run in
            // One connection per scenario: the key (the wrong one) in those of method secret.
            let key = Self.secretRuns.contains(run) ? ["--keyring", directory + "/client.keyring", "--name", "client.alice"] : []
            _ = try? await runProgram(parley, ["ping", address, "--count", "1"] + key, seconds: 30)
        }
        #expect(report.results.map(\.status) == [.fail, .fail, .fail], "\(report.results.map(\.line))")
        #expect(report.results.first?.seen?.contains("authenticationFailed") == true, "\(report.results.map(\.line))")
        // Without --keyring the scenarios of method secret skip, saying why.
        let listed = try await parleyRun(["conform", "--client-test", "--listen", "127.0.0.1:0", "--list", "--only", "R-5.1-3"], seconds: 30)
        #expect(listed.status == 0 && listed.stdout.contains("R-5.1-3 the client's method secret checks out"), "\(listed.combined)")
        let bad = try await parleyRun(["conform", "--client-test", "--listen", "127.0.0.1:0", "--keyring", directory + "/tester.keyring", "--name", "client.alice"], seconds: 30)
        #expect(bad.status != 0 && bad.stderr.contains("--client-test takes --keyring FILE alone"), "\(bad.combined)")
    }

    /// A client that sends its first request with the handshake (`ParleyClient.connect(to:
    /// firstCall:)`: in the first flight in crc mode, R-6.1-5; right after CLIENT_IDENT in
    /// secure mode, R-6.1-6) meets every client check too: a request it sent before it could
    /// see SERVER_IDENT's request delay, refusal or redirect, or AUTH_DONE's server proof, is
    /// not held against it (R-8.2-2, R-8.4-1, R-8.2-1, R-5.1-5).
    @Test func aClientSendingItsFirstRequestWithTheHandshakeMeetsEveryClientCheck() async throws {
        let keyring = freshTestDirectory("client-test-first-call") + "/keyring"
        let keys = try writeKeyring(keyring, [("client.alice", ["*"])])
        let credentials = SecretCredentials(entity: "client.alice", key: keys["client.alice"]!)
        let report = try await Self.clientTest(secrets: try ParleyKeyring.load(path: keyring).directory) { address, run in
            let configuration = Self.secretRuns.contains(run) ? ParleyClient.Configuration(secret: credentials, modes: [.secure]) : .defaults
            var ping = Parley_Echo_V1_Ping()
            ping.sequence = 1
            guard let target = try? ParleyAddress(parsing: address),
                let (client, _) = try? await ParleyClient.connect(to: target, configuration: configuration, logger: quietLogger, firstCall: ping, as: Parley_Echo_V1_Pong.self)
            else { return }
            defer { client.close() }
            for n in UInt64(2)...3 {
                ping.sequence = n
                _ = try? await client.call(ping, as: Parley_Echo_V1_Pong.self, timeout: .seconds(30))
            }
        }
        #expect(report.results.count == 17)
        #expect(report.failed == 0 && report.skipped == 0, "\(report.results.filter { $0.status != .pass }.map(\.line).joined(separator: "\n"))")
    }

    /// A request that did not come with the handshake, sent as soon as SERVER_IDENT arrived
    /// without waiting for its 1 s request delay, still fails R-8.2-2. (The tester reads ahead
    /// before it sends SERVER_IDENT, so a request sent after it arrived is never taken for
    /// one sent with the handshake. An earlier version slept 0.8 s after the handshake
    /// instead: on a loaded machine the sleep overran and the request came after 1 s.)
    @Test func aRequestSentAfterTheHandshakeWithoutWaitingForTheDelayFails() async throws {
        let handshake = clientSessionBytes(messages: [])
        let whole = clientSessionBytes(messages: [pingMessage(id: 1)])
        let request = whole.getSlice(at: whole.readerIndex + handshake.readableBytes, length: whole.readableBytes - handshake.readableBytes)!
        // Scenarios are played in order: the first connection plays the demanding server. It
        // is closed at once, so that the second is waiting in the tester's queue however slow
        // the machine. The tester waits `idle` for each next connection: generously, since a
        // first connection that came after it (under CI's load) was played as the second
        // scenario; with `only`, no scenario after the request delay's waits at all.
        let report = try await Self.clientTest(only: ["R-8.2-2"], idle: .seconds(15), runs: 2) { address, run in
            guard let peer = try? await RawPeer.connect(try ParleyAddress(parsing: address)) else { return }
            if run == 0 {
                try? await peer.channel.executeThenClose { _, _ in }
                return
            }
            try? await peer.channel.executeThenClose { inbound, outbound in
                try await outbound.write(handshake)
                var received = ByteBuffer()
                var sent = false
                // Bounded: the tester closes the connection when the scenario ends (at once
                // after the half-close, or after its timeout).
                for try await var chunk in inbound {
                    received.writeBuffer(&chunk)
                    let tags = frames(in: received).map(\.tag)
                    if !sent, tags.contains(.serverIdent) {
                        try await outbound.write(request)
                        sent = true
                    } else if sent, tags.contains(.message) {
                        outbound.finish()  // the answer came: leave, and the scenario ends
                    }
                }
            }
        }
        #expect(report.results.map(\.status) == [.fail], "\(report.results.map(\.line))")
        #expect(report.results.first?.seen?.contains("after") == true, "\(report.results.map(\.line))")
    }

    /// The Python client of Tests/Interop, written from the document alone (CI runs it too):
    /// the defects this test found in it are fixed (a frame limit of 1 taken literally, a
    /// CLOSE sent when leaving a redirecting server). It speaks method secret too (section
    /// 5.1): with the key in the scenarios of method secret, as the reference client, it
    /// meets those three checks as well, and none skips.
    @Test func theIndependentPythonClientMeetsEveryClientCheck() async throws {
        let python = try #require(["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"].first { FileManager.default.isExecutableFile(atPath: $0) }, "python3 is needed (.ci/run installs it)")
        let script = ConformanceCoverageTests.root.appendingPathComponent("Tests/Interop/python/parley_client.py").path
        let keyring = freshTestDirectory("client-test-python") + "/keyring"
        try writeKeyring(keyring, [("client.alice", ["*"])])
        let report = try await Self.clientTest(secrets: try ParleyKeyring.load(path: keyring).directory) { address, run in
            let key = Self.secretRuns.contains(run) ? ["--keyring", keyring, "--name", "client.alice"] : []
            _ = try? await runProgram(python, [script, address, "--follow-redirects"] + key, seconds: 90)
        }
        #expect(report.results.count == 17)
        #expect(report.results.filter { $0.id.hasPrefix("R-5.1-") }.count == 3)
        #expect(report.failed == 0 && report.skipped == 0, "\(report.results.filter { $0.status != .pass }.map(\.line).joined(separator: "\n"))")
    }

    /// A client that sends a REQUEST with id 0 and skips a seq number fails those two checks
    /// and no other; scenarios no client connects for are skipped.
    @Test func aFaultyClientFailsExactlyTheChecksItBreaks() async throws {
        let bad = WireMessage(header: MessageHeader(seq: 3, id: 2, kind: .request, type: Parley_Echo_V1_Ping.protoMessageName), payload: ByteBuffer())
        let bytes = clientSessionBytes(messages: [pingMessage(id: 0)], trailingFrames: [bad.frame(allocator: ByteBufferAllocator())])
        let report = try await Self.clientTest(only: ["R-7.4-2", "R-7.3-2", "R-7.3-1", "R-4.9-2", "R-8.2-2"], idle: .seconds(1), runs: 1) { address, _ in
            if let peer = try? await RawPeer.connect(try ParleyAddress(parsing: address)) {
                _ = try? await peer.exchange(bytes, seconds: 10)
            }
        }
        let statuses = Dictionary(uniqueKeysWithValues: report.results.map { ($0.id, $0.status) })
        #expect(statuses == ["R-7.4-2": .fail, "R-7.3-2": .fail, "R-7.3-1": .pass, "R-4.9-2": .pass, "R-8.2-2": .skip], "\(report.results.map(\.line))")
    }
}

/// Every requirement id of docs/protocol.md sections 1-16 is covered: a `parley conform`
/// check tests it, a test under Tests/ names it, or docs/conformance.md says why it cannot
/// be tested; the coverage table there and the count in the document's appendix are right.
/// Every id of sections 17-19 (the services) is named by a test.
@Suite struct ConformanceCoverageTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static func ids(in text: String) -> [String] {
        let regex = try! NSRegularExpression(pattern: #"\[(R-[0-9]+(?:\.[0-9]+)*-[0-9]+)\]"#)
        let range = NSRange(text.startIndex..., in: text)
        return regex.matches(in: text, range: range).map { String(text[Range($0.range(at: 1), in: text)!]) }
    }

    /// Ids named by tests: every Swift file under Tests/ but this suite's own files.
    static func testedIds() throws -> Set<String> {
        var ids: Set<String> = []
        let tests = root.appendingPathComponent("Tests")
        let files = FileManager.default.enumerator(at: tests, includingPropertiesForKeys: nil)!
        for case let url as URL in files where url.pathExtension == "swift" && !url.lastPathComponent.hasPrefix("Conformance") {
            ids.formUnion(Self.ids(in: try String(contentsOf: url, encoding: .utf8)))
        }
        return ids
    }

    @Test func everyRequirementHasACheckATestOrAReason() throws {
        let protocolText = try String(contentsOf: Self.root.appendingPathComponent("docs/protocol.md"), encoding: .utf8)
        let conformanceText = try String(contentsOf: Self.root.appendingPathComponent("docs/conformance.md"), encoding: .utf8)
        let cut = try #require(protocolText.range(of: "\n## 17. "))
        let core = Self.ids(in: String(protocolText[..<cut.lowerBound]))
        let later = Set(Self.ids(in: String(protocolText[cut.lowerBound...])))
        var required: [String] = []
        for id in core where !required.contains(id) { required.append(id) }
        // In section order: R-2-1, R-3-1, ..., R-4.4-1, ..., R-10-1.
        func key(_ id: String) -> [Int] { id.dropFirst(2).split(whereSeparator: { $0 == "." || $0 == "-" }).map { Int($0) ?? 0 } }
        required.sort { key($0).lexicographicallyPrecedes(key($1)) }
        let checked = ConformanceRunner.checkedIds.union(ClientConformanceTester.checkedIds)
        let tested = try Self.testedIds()
        // `| R-x | untestable: reason |` rows of docs/conformance.md.
        var untestable: [String: String] = [:]
        for line in conformanceText.split(separator: "\n") {
            let cells = line.split(separator: "|").map { $0.trimmingCharacters(in: .whitespaces) }
            if cells.count >= 2, cells[0].hasPrefix("`R-"), cells[1].hasPrefix("untestable: ") {
                untestable[cells[0].trimmingCharacters(in: CharacterSet(charactersIn: "`"))] = String(cells[1].dropFirst("untestable: ".count))
            }
        }
        #expect(!required.isEmpty)
        var rows: [String] = []
        var (byCheck, byTest, unchecked) = (0, 0, 0)
        for id in required {
            let checks = ConformanceRunner.checks.filter { $0.id == id }.map { "conform: " + $0.name }
                + ClientConformanceTester.checks.filter { $0.id == id }.map { "client-test: " + $0.name }
            if !checks.isEmpty {
                byCheck += 1
                rows.append("| `\(id)` | \(checks.joined(separator: "; ")) |")
            } else if tested.contains(id) {
                byTest += 1
                rows.append("| `\(id)` | test |")
            } else if let reason = untestable[id], !reason.isEmpty {
                unchecked += 1
                rows.append("| `\(id)` | untestable: \(reason) |")
            } else {
                Issue.record("\(id) has no conformance check, no test names it, and docs/conformance.md gives no reason it is untestable")
            }
        }
        // Every check names an id of the document, and every untestable row is still one.
        for id in checked { #expect(required.contains(id) || later.contains(id), "check \(id) is not an id of docs/protocol.md") }
        for id in untestable.keys {
            #expect(required.contains(id), "docs/conformance.md marks \(id) untestable, but docs/protocol.md has no such id")
            #expect(!checked.contains(id) && !tested.contains(id), "\(id) is marked untestable but has a check or a test")
        }
        // The ids of sections 17-19 (the block and work services) are not part of this count:
        // `parley conform` does not check the services; a test names each of them.
        for id in later.sorted() where !tested.contains(id) {
            Issue.record("\(id) (sections 17-19) is named by no test under Tests/")
        }
        // The table in docs/conformance.md is this one.
        let table = (["| id | covered by |", "| --- | --- |"] + rows).joined(separator: "\n")
        let tableIsCurrent = conformanceText.contains(table)
        #expect(tableIsCurrent, "docs/conformance.md's coverage table differs; it should read:\n\(table)")
        // The appendix of docs/protocol.md gives the count.
        let count = "\(required.count) requirement ids in sections 1-16: \(byCheck) checked by `parley conform` "
            + "(\(ConformanceRunner.checks.count) checks of servers, \(ClientConformanceTester.checks.count) of clients), "
            + "\(byTest) by tests of the reference implementation only, \(unchecked) untestable"
        let countIsCurrent = protocolText.contains(count)
        #expect(countIsCurrent, "docs/protocol.md's appendix should say: \(count)")
    }
}

/// `parley conform` against servers that each break one requirement.
@Suite(.timeLimit(.minutes(10)))
struct FaultyServerConformanceTests {
    /// The test double: a proxy that breaks one requirement in front of a correct server.
    /// With no fault every check passes; with a fault exactly the checks of the broken
    /// requirement fail (`Fault.breaks`), so each of these checks is shown able to fail.
    ///
    /// Six faults at a time, each through its own proxy to one server: most of a run is the
    /// wait of the check whose answer does not come. All 60 at once (parameterized cases run
    /// in parallel) moved gigabytes through loopback and starved a full parallel run for over
    /// a minute (PostgreSQL and lossless-session tests timed out). A fault whose failures differ
    /// is run again once, alone: under load a check that passes can run out of time.
    @Test(.timeLimit(.minutes(10)))
    func aFaultyServerFailsExactlyTheMatchingChecks() async throws {
        try await FaultyServer.withUpstream("conform-faulty") { port, alice, group in
            @Sendable func run(_ fault: FaultyServer.Fault) async throws -> (fault: FaultyServer.Fault, report: ConformanceReport) {
                (fault, try await FaultyServer(fault: fault, upstreamPort: port, group: group).conform(secret: alice, timeout: .seconds(10)))
            }
            func matches(_ fault: FaultyServer.Fault, _ report: ConformanceReport) -> Bool {
                report.skipped == 0 && report.results.filter { $0.status == .fail }.map(\.id).sorted() == fault.breaks.sorted()
            }
            var mismatched: [FaultyServer.Fault] = []
            try await withThrowingTaskGroup(of: (fault: FaultyServer.Fault, report: ConformanceReport).self) { group in
                var pending = FaultyServer.Fault.allCases[...]
                for _ in 0..<6 { if let f = pending.popFirst() { group.addTask { try await run(f) } } }
                while let done = try await group.next() {
                    if !matches(done.fault, done.report) { mismatched.append(done.fault) }
                    if let f = pending.popFirst() { group.addTask { try await run(f) } }
                }
            }
            for fault in mismatched {
                let (_, report) = try await run(fault)
                let failed = report.results.filter { $0.status == .fail }
                #expect(report.skipped == 0, "\(fault): \(report.results.filter { $0.status == .skip }.map(\.line))")
                // Only the checks whose input reaches the fault: one, or for an ignored CANCEL
                // both checks that cancel, and so on (Fault.breaks).
                #expect(failed.map(\.id).sorted() == fault.breaks.sorted(), "\(fault):\n\(failed.map(\.line).joined(separator: "\n"))")
            }
            print("conformance faults: \(FaultyServer.Fault.allCases.count) faults, \(mismatched.count) run again (\(mismatched.map(\.rawValue).joined(separator: ", ")))")
        }
    }
}
