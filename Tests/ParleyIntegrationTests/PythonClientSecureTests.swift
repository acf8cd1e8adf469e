import Foundation
import ParleyTestSupport
import Testing

/// The independent Python client (Tests/Interop/python/parley_client.py, written from
/// docs/protocol.md alone) against a real `parley serve`: method secret (section 5.1) in crc
/// mode and in secure mode with each cipher, over TCP and a Unix socket, and the documented
/// refusals of a wrong key and an unknown entity; lossless sessions (section 5.2) that the
/// client cuts itself, or that `parley chaos` cuts, each Work request running exactly once;
/// and a key update at another interval than 2^32 (R-5.1-9), which a server that follows the
/// document refuses (nothing on the wire announces an update, so it cannot be exercised live
/// against a conforming peer: the 2^32 path is checked offline by the client's --self-test,
/// vector sealed-keepalive-after-key-update).
@Suite(.serialized, .timeLimit(.minutes(5)))
struct PythonClientSecureTests {
    static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Interop/python/parley_client.py").path

    static func python() throws -> String {
        try #require(CommandTests.onPath("python3"), "python3 is needed (.ci/run installs it, with the cryptography package)")
    }

    /// `python3 parley_client.py ARGUMENTS`, bounded.
    static func client(_ arguments: [String], seconds: Double = 120) async throws -> ProcessOutput {
        try await runProcess(try Self.python(), [Self.script] + arguments, seconds: seconds)
    }

    @Test func methodSecretInCrcAndSecureModeWithEachCipher() async throws {
        let dir = freshTestDirectory("python-secure")
        let keyring = dir + "/server.keyring", wrong = dir + "/wrong.keyring", socket = dir + "/s.sock"
        try writeKeyring(keyring, [("client.alice", ["*"])])
        try writeKeyring(wrong, [("client.alice", ["*"]), ("client.nobody", ["*"])])
        let server = try await ServeProcess.start([
            "--listen", "127.0.0.1:0", "--listen", "unix:\(socket)", "--auth", "none,secret", "--keyring", keyring, "--mode", "crc,secure",
        ])
        let key = ["--keyring", keyring, "--name", "client.alice"]
        let runs: [(address: String, options: [String], expect: String)] = [
            (server.address, ["--mode", "crc"], "method secret as client.alice, mode crc;"),
            (server.address, ["--cipher", "aes-256-gcm"], "method secret as client.alice, mode secure (aes-256-gcm)"),
            (server.address, ["--cipher", "chacha20-poly1305"], "method secret as client.alice, mode secure (chacha20-poly1305)"),
            (server.address, ["--mode", "secure"], "method secret as client.alice, mode secure ("),
            ("unix:\(socket)", [], "method secret as client.alice, mode secure ("),
            ("unix:\(socket)", ["--mode", "crc"], "method secret as client.alice, mode crc;"),
        ]
        for run in runs {
            let out = try await Self.client([run.address] + key + run.options)
            #expect(out.status == 0, Comment(rawValue: "\(run.options): \(out.combined)"))
            #expect(out.stdout.contains("OK: every check passed"), Comment(rawValue: out.combined))
            #expect(out.stdout.contains(run.expect), Comment(rawValue: out.combined))
        }
        // A wrong key and an unknown entity: CLOSE authenticationFailed (R-5.1-4 steps 6 and 3).
        let wrongKey = try await Self.client([server.address, "--keyring", wrong, "--name", "client.alice"])
        #expect(wrongKey.status != 0 && wrongKey.stdout.contains("authenticationFailed") && wrongKey.stdout.contains("wrong key"), Comment(rawValue: wrongKey.combined))
        let unknown = try await Self.client([server.address, "--keyring", wrong, "--name", "client.nobody"])
        #expect(unknown.status != 0 && unknown.stdout.contains("authenticationFailed") && unknown.stdout.contains("not in the server's keyring"), Comment(rawValue: unknown.combined))
        #expect(await server.stop() == 0)
    }

    /// A `parley serve` allowing `auth` and `mode` with a keyring holding client.alice, which
    /// logs the Work keys it runs (`executedKeys`).
    static func loggingServer(_ name: String, auth: String, mode: String) async throws -> (server: ServeProcess, keyring: String, log: String) {
        let dir = freshTestDirectory(name)
        let keyring = dir + "/server.keyring", log = dir + "/executed"
        try writeKeyring(keyring, [("client.alice", ["*"])])
        let server = try await ServeProcess.start([
            "--listen", "127.0.0.1:0", "--auth", auth, "--keyring", keyring, "--mode", mode, "--execution-log", log,
        ])
        return (server, keyring, log)
    }

    @Test func aLosslessSessionCutByTheClientLosesAndDoublesNothing() async throws {
        let (server, keyring, log) = try await Self.loggingServer("python-lossless", auth: "none,secret", mode: "crc,secure")
        let key = ["--keyring", keyring, "--name", "client.alice"]
        let runs: [(options: [String], firstKey: UInt64)] = [
            (key + ["--cipher", "aes-256-gcm"], 1000),
            (key + ["--cipher", "chacha20-poly1305"], 2000),
            (key + ["--mode", "crc"], 3000),
            ([], 4000),  // method none
        ]
        for run in runs {
            let out = try await Self.client([server.address, "--lossless", "--cut-every", "5", "--work", "30", "--work-key", "\(run.firstKey)"] + run.options)
            #expect(out.status == 0, Comment(rawValue: "\(run.options): \(out.combined)"))
            #expect(out.stdout.contains("OK: every check passed"), Comment(rawValue: out.combined))
            #expect(out.stdout.contains("SESSION_RESUMED"), Comment(rawValue: out.combined))
            #expect(!out.stdout.contains("SESSION_RESET"), Comment(rawValue: out.combined))
        }
        // Every Work request ran exactly once, though its session's connection was cut.
        let executed = executedKeys(log).sorted()
        let expected = runs.flatMap { run in (0..<UInt64(30)).map { run.firstKey + $0 } }
        #expect(executed == expected, Comment(rawValue: "\(executed)"))
        #expect(await server.stop() == 0)
    }

    @Test func aLosslessSessionThroughChaosCuttingEveryConnection() async throws {
        let (server, keyring, log) = try await Self.loggingServer("python-lossless-chaos", auth: "secret", mode: "secure")
        // Each connection is cut once 6000 bytes have passed in a direction: the handshake
        // (about 1 KB) gets through, the workload does not.
        let chaos = try await ChaosProcess.start(["--listen", "127.0.0.1:0", "--to", server.address, "--cut-after", "6000", "--seed", "7", "--quiet"])
        let out = try await Self.client([
            chaos.address, "--keyring", keyring, "--name", "client.alice", "--lossless", "--work", "40", "--work-key", "5000", "--data-size", "2048",
        ])
        #expect(out.status == 0, Comment(rawValue: out.combined))
        #expect(out.stdout.contains("OK: every check passed") && out.stdout.contains("SESSION_RESUMED"), Comment(rawValue: out.combined))
        #expect(executedKeys(log).sorted() == (0..<UInt64(40)).map { 5000 + $0 }, Comment(rawValue: "\(executedKeys(log))"))
        let cuts = await chaos.stop()
        #expect((cuts?.cuts ?? 0) > 0, Comment(rawValue: chaos.output))
        #expect(await server.stop() == 0)
    }

    /// R-5.1-9 fixes the key update at every 2^32 AEAD messages and announces nothing: a client
    /// that updates after 3 frames (--key-update-every 3) seals its 4th frame under a key the
    /// server does not use, and the server refuses it (badAuthTag, R-5.1-8).
    @Test func aKeyUpdateBeforeTwoToThe32IsRefused() async throws {
        let dir = freshTestDirectory("python-key-update")
        let keyring = dir + "/server.keyring"
        try writeKeyring(keyring, [("client.alice", ["*"])])
        let server = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--auth", "secret", "--keyring", keyring, "--mode", "secure"])
        let out = try await Self.client([server.address, "--keyring", keyring, "--name", "client.alice", "--key-update-every", "3"])
        #expect(out.status != 0, Comment(rawValue: out.combined))
        #expect(out.stdout.contains("badAuthTag"), Comment(rawValue: out.combined))
        #expect(try await server.waitForLog("badAuthTag"), Comment(rawValue: server.log))
        #expect(await server.stop() == 0)
    }
}
