import Foundation
import Logging
import NIOCore
import Parley
import ParleyServices
import ParleyTestSupport
import ParleyWire
import Testing

/// Secure mode and authentication methods `none`/`secret`/`tls` end to end over real sockets:
/// the `parley` executable as a user runs it (`SecureProcessTests`), and the library in this
/// process where a test must see inside the server (`SecureLibraryTests`).
@Suite(.timeLimit(.minutes(3)))
struct SecureProcessTests {
    /// `parley ping ARGS` against `address`.
    static func ping(_ address: String, _ arguments: [String]) async throws -> ProcessOutput {
        try await parley(["ping", address, "--count", "1"] + arguments, seconds: 30)
    }

    /// Adds an entity with `parley keyring add`.
    static func keyringAdd(_ name: String, _ keyring: String, _ extra: [String] = []) async throws {
        let out = try await parley(["keyring", "add", name, "--keyring", keyring] + extra)
        #expect(out.status == 0, Comment(rawValue: out.combined))
        // A key that is expired from the start is added, with a warning that says so.
        let pastExpiry = extra.firstIndex(of: "--expires").map { extra[$0 + 1] < "2026" } ?? false
        #expect(out.stderr.contains("expires in the past") == pastExpiry, Comment(rawValue: out.combined))
    }

    /// The key of `name` in a keyring file, read from its JSON.
    static func key(of name: String, in keyring: String) throws -> [UInt8] {
        let object = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: keyring)))
        let json = try #require(object as? [String: Any])
        let entity = try #require((json["entities"] as? [[String: Any]])?.first { $0["name"] as? String == name })
        let text = try #require(entity["key"] as? String)
        return [UInt8](try #require(Data(base64Encoded: text)))
    }

    @Test func secretSecureSessionBetweenTwoProcesses() async throws {
        let dir = freshTestDirectory("secure-ok")
        let keyring = dir + "/server.keyring"
        try await Self.keyringAdd("client.alice", keyring, ["--caps", "echo"])
        let server = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--auth", "secret", "--keyring", keyring, "--mode", "secure"])
        let out = try await parley(["ping", server.address, "--keyring", keyring, "--name", "client.alice", "--count", "3", "--size", "100"], seconds: 30)
        #expect(out.status == 0, Comment(rawValue: out.combined + server.log))
        #expect(
            out.stdout.contains("auth secret as client.alice, mode secure (aes-256-gcm)")
                || out.stdout.contains("auth secret as client.alice, mode secure (chacha20-poly1305)"),
            Comment(rawValue: out.stdout)
        )
        #expect(out.stdout.contains("secureMode"))
        #expect(out.stdout.contains("3 round trips to"))
        #expect(await server.stop() == 0)
        #expect(!server.log.contains("connection closed on error"), Comment(rawValue: server.log))
    }

    /// Wrong key, unknown entity, expired key, revoked key (while the server runs: it reads
    /// its keyring again), a rotated key, a keyring changed into one that cannot be read, and
    /// a client offering only a method the server refuses: each a clear error on both sides.
    @Test func everyRefusalIsClearOnBothSides() async throws {
        let dir = freshTestDirectory("secure-refusals")
        let keyring = dir + "/server.keyring"
        try await Self.keyringAdd("client.alice", keyring, ["--caps", "echo"])
        try await Self.keyringAdd("client.carol", keyring, ["--caps", "echo", "--expires", "2001-01-01"])
        // Another key for client.alice, and an entity the server does not know.
        let wrong = dir + "/wrong.keyring", stranger = dir + "/stranger.keyring"
        try await Self.keyringAdd("client.alice", wrong)
        try await Self.keyringAdd("client.zed", stranger)
        #expect(try Self.key(of: "client.alice", in: wrong) != Self.key(of: "client.alice", in: keyring))

        let server = try await ServeProcess.start([
            "--listen", "127.0.0.1:0", "--auth", "secret", "--keyring", keyring, "--mode", "crc,secure", "--log-level", "debug",
        ])
        let address = server.address

        func refused(_ arguments: [String], client: String, server serverText: String, warning: Bool = true) async throws {
            let mark = server.logMark
            let out = try await Self.ping(address, arguments)
            #expect(out.status == 2, Comment(rawValue: "\(arguments): \(out.combined)"))
            #expect(out.stdout.contains(client), Comment(rawValue: "\(arguments): client said \(out.combined)"))
            #expect(!out.stdout.contains("round trips"))
            let logged = warning
                ? try await server.waitForLog("warning", "connection closed on error", serverText, after: mark)
                : try await server.waitForLog("connection closed during handshake", serverText, after: mark)
            #expect(logged, Comment(rawValue: "\(arguments): server log lacks \"\(serverText)\":\n\(server.log)"))
        }

        // It works to begin with.
        let ok = try await Self.ping(address, ["--keyring", keyring, "--name", "client.alice"])
        #expect(ok.status == 0, Comment(rawValue: ok.combined + server.log))
        #expect(ok.stdout.contains("auth secret as client.alice, mode secure"))

        try await refused(
            ["--keyring", wrong, "--name", "client.alice"],
            client: "as \"client.alice\": peer closed the connection: wrong key: the client's proof does not match the entity's key in the server's keyring [authenticationFailed]",
            server: "error=authenticationFailed (11): wrong key for \"client.alice\""
        )
        try await refused(
            ["--keyring", stranger, "--name", "client.zed"],
            client: "as \"client.zed\": peer closed the connection: the entity is not in the server's keyring [authenticationFailed]",
            server: "error=authenticationFailed (11): unknown entity \"client.zed\""
        )
        try await refused(
            ["--keyring", keyring, "--name", "client.carol"],
            client: "as \"client.carol\": peer closed the connection: the entity's key expired at",
            server: "error=authenticationFailed (11): the key of \"client.carol\" expired at"
        )
        // Method none only, against a server allowing secret only: AUTH_BAD_METHOD. The
        // client, sure of its one method, sent CLIENT_IDENT with it (R-6.1-5): the server
        // closes on it, saying no method was in common.
        try await refused(
            [],
            client: "no common authentication method: client offers [\"none\"], server allows [\"secret\"] (method \"none\" is not enabled on this server) [authenticationFailed]",
            server: "no common authentication method"
        )

        // Revoked while the server runs: the next connection is refused.
        let revoke = try await parley(["keyring", "revoke", "client.alice", "--keyring", keyring])
        #expect(revoke.status == 0, Comment(rawValue: revoke.combined))
        try await refused(
            ["--keyring", keyring, "--name", "client.alice"],
            client: "as \"client.alice\": peer closed the connection: the entity's key has been revoked [authenticationFailed]",
            server: "error=authenticationFailed (11): the key of \"client.alice\" has been revoked"
        )
        // Rotated: a new key (the revoked mark cleared) works at once; the old one does not.
        let oldKeyring = dir + "/alice-old.keyring"
        let exportOld = try await parley(["keyring", "export", "client.alice", "--keyring", keyring, "--out", oldKeyring])
        #expect(exportOld.status == 0, Comment(rawValue: exportOld.combined))
        let rotate = try await parley(["keyring", "rotate", "client.alice", "--keyring", keyring])
        #expect(rotate.status == 0, Comment(rawValue: rotate.combined))
        let rotated = try await Self.ping(address, ["--keyring", keyring, "--name", "client.alice"])
        #expect(rotated.status == 0, Comment(rawValue: rotated.combined + server.log))
        try await refused(
            ["--keyring", oldKeyring, "--name", "client.alice"],
            client: "as \"client.alice\": peer closed the connection: wrong key", server: "error=authenticationFailed (11): wrong key for \"client.alice\""
        )

        // A keyring changed into one that cannot be read (mode 0644): reported, and the
        // previous one stays in force.
        let alice = dir + "/alice.keyring"
        let export = try await parley(["keyring", "export", "client.alice", "--keyring", keyring, "--out", alice])
        #expect(export.status == 0, Comment(rawValue: export.combined))
        #expect(chmod(keyring, 0o644) == 0)
        let beforeLoose = server.logMark
        let stillServed = try await Self.ping(address, ["--keyring", alice, "--name", "client.alice"])
        #expect(stillServed.status == 0, Comment(rawValue: stillServed.combined + server.log))
        #expect(try await server.waitForLog("keyring changed but cannot be read", "mode 0644", after: beforeLoose), Comment(rawValue: server.log))
        #expect(chmod(keyring, 0o600) == 0)

        #expect(await server.stop() == 0)
    }

    @Test func looseKeyringIsRefusedByServeAndByPing() async throws {
        let dir = freshTestDirectory("secure-loose")
        let keyring = dir + "/loose.keyring"
        try await Self.keyringAdd("client.alice", keyring)
        #expect(chmod(keyring, 0o644) == 0)
        let serve = try await parley(["serve", "--listen", "127.0.0.1:0", "--auth", "secret", "--keyring", keyring], seconds: 30)
        #expect(serve.status != 0)
        #expect(serve.stderr.contains("keyring \(keyring) has mode 0644"), Comment(rawValue: serve.combined))
        #expect(serve.stderr.contains("chmod 600 \(keyring)"), Comment(rawValue: serve.combined))
        #expect(!serve.stderr.contains("listening"))
        let ping = try await parley(["ping", "127.0.0.1:1", "--keyring", keyring, "--name", "client.alice"], seconds: 30)
        #expect(ping.status == 2, Comment(rawValue: ping.combined))
        #expect(ping.stdout.contains("keyring \(keyring) has mode 0644"), Comment(rawValue: ping.combined))
        #expect(ping.stdout.contains("[invalidArgument]"), Comment(rawValue: ping.combined))
        // Readable by the group only is still too loose.
        #expect(chmod(keyring, 0o640) == 0)
        let group = try await parley(["ping", "127.0.0.1:1", "--keyring", keyring, "--name", "client.alice"], seconds: 30)
        #expect(group.stdout.contains("has mode 0640"), Comment(rawValue: group.combined))
    }

    @Test func tlsClientThatDoesNotTrustTheServerIsRefusedOnBothSides() async throws {
        let dir = freshTestDirectory("secure-tls")
        let a = dir + "/a", b = dir + "/b"
        for d in [a, b] {
            let out = try await parley(["cert", "init", "--dir", d], seconds: 60)
            #expect(out.status == 0, Comment(rawValue: out.combined))
        }
        let server = try await ServeProcess.start(["--listen", "tls://127.0.0.1:0", "--cert", a, "--log-level", "debug"])
        #expect(server.address.hasPrefix("tls://127.0.0.1:"))
        let out = try await parley(["ping", server.address, "--cert", b, "--count", "1"], seconds: 30)
        #expect(out.status == 2, Comment(rawValue: out.combined))
        #expect(out.stdout.contains("certificate verify failed"), Comment(rawValue: out.combined))
        #expect(out.stdout.contains(b + "/ca.pem"), "names the CA it trusted: \(out.combined)")
        #expect(out.stdout.contains("[connectFailed]"), Comment(rawValue: out.combined))
        // The server says why the connection went away: an authentication failure, a warning.
        #expect(
            try await server.waitForLog("warning", "authenticationFailed", "TLS: tlsv1 alert unknown ca (the peer refused our certificate)"),
            Comment(rawValue: server.log)
        )
        // A client that trusts the server's CA is served.
        let good = try await parley(["ping", server.address, "--cert", a, "--count", "1"], seconds: 30)
        #expect(good.status == 0, Comment(rawValue: good.combined))
        #expect(await server.stop() == 0)
    }

    /// A secure-only server and a client that allows only crc mode: refused at the banner,
    /// and nothing but the server's banner and HELLO ever reached the client.
    @Test func secureOnlyServerRefusesACrcOnlyClientAtTheBanner() async throws {
        let dir = freshTestDirectory("secure-banner")
        let keyring = dir + "/server.keyring"
        try await Self.keyringAdd("client.alice", keyring, ["--caps", "echo"])
        let server = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--auth", "secret", "--keyring", keyring, "--mode", "secure"])
        for (i, arguments) in [["--keyring", keyring, "--name", "client.alice", "--mode", "crc"], []].enumerated() {
            let captured = dir + "/in-\(i)"
            let mark = server.logMark
            let out = try await Self.ping(server.address, arguments + ["--capture-in", captured])
            #expect(out.status == 2, Comment(rawValue: out.combined))
            #expect(out.stdout.contains("peer (protocol version 1) requires features 0x100 [secureMode]"), Comment(rawValue: out.combined))
            #expect(out.stdout.contains("[missingFeatures]"), Comment(rawValue: out.combined))
            let decoded = try await parley(["decode", captured])
            #expect(decoded.status == 0, Comment(rawValue: decoded.combined))
            let lines = decoded.stdout.split(separator: "\n").filter { $0.hasPrefix("#=") }
            #expect(lines.count == 2, Comment(rawValue: decoded.stdout))
            #expect(lines.first?.contains("element=banner") == true && lines.first?.contains("required=\"0x100 [secureMode]\"") == true)
            #expect(lines.last?.contains("tag=HELLO") == true, Comment(rawValue: decoded.stdout))
            // The same, read with the library's decoder: banner, HELLO, and nothing else.
            var buffer = ByteBuffer(bytes: try Data(contentsOf: URL(fileURLWithPath: captured)))
            var decoder = WireDecoder()
            var elements: [WireInbound] = []
            while let e = try decoder.decodeLast(buffer: &buffer, seenEOF: true) { elements.append(e) }
            #expect(elements.count == 2)
            if case .frame(let hello)? = elements.last { #expect(hello.tag == .hello) } else { Issue.record("no HELLO: \(elements)") }
            #expect(
                try await server.waitForLog("connection closed on error", "missingFeatures (4): this side (protocol version 1) requires features 0x100 [secureMode]", after: mark),
                Comment(rawValue: server.log)
            )
        }
        #expect(await server.stop() == 0)
    }

    /// `--require-cap`: an entity without the capability gets permissionDenied, and the server
    /// logs its name; one with it is served.
    @Test func requiredCapabilityOverRealProcesses() async throws {
        let dir = freshTestDirectory("secure-caps")
        let keyring = dir + "/server.keyring"
        try await Self.keyringAdd("client.alice", keyring, ["--caps", "echo"])
        try await Self.keyringAdd("client.admin", keyring, ["--caps", "echo.*"])
        let server = try await ServeProcess.start([
            "--listen", "127.0.0.1:0", "--auth", "secret", "--keyring", keyring, "--mode", "secure", "--require-cap", "echo.admin",
        ])
        let denied = try await Self.ping(server.address, ["--keyring", keyring, "--name", "client.alice"])
        // (ping reports a refused request as ArgumentParser's "Error: ..." with status 1, not
        // as its own "parley ping: ... [code]" with status 2 as for a refused connection.)
        #expect(denied.status != 0, Comment(rawValue: denied.combined))
        #expect(denied.combined.contains("permissionDenied"), Comment(rawValue: denied.combined))
        #expect(denied.combined.contains("client.alice may not send parley.echo.v1.Ping: it needs capability \"echo.admin\""), Comment(rawValue: denied.combined))
        #expect(try await server.waitForLog("permission denied", "entity=client.alice"), Comment(rawValue: server.log))
        let allowed = try await Self.ping(server.address, ["--keyring", keyring, "--name", "client.admin"])
        #expect(allowed.status == 0, Comment(rawValue: allowed.combined))
        #expect(await server.stop() == 0)
    }

    /// What crosses the wire in secure mode: none of the entity name, the payloads, the key,
    /// or CLIENT_IDENT/SERVER_IDENT's strings appears in either direction. In crc mode (the
    /// control) the identities and payloads are there to see; the entity name is sealed even
    /// there.
    @Test func aSecureSessionCaptureRevealsNothing() async throws {
        let dir = freshTestDirectory("secure-capture")
        let keyring = dir + "/server.keyring"
        try await Self.keyringAdd("client.alice", keyring, ["--caps", "echo"])
        let key = try Self.key(of: "client.alice", in: keyring)
        let server = try await ServeProcess.start([
            "--listen", "127.0.0.1:0", "--auth", "secret", "--keyring", keyring, "--mode", "crc,secure", "--name", "capture-server-name",
        ])
        func capture(_ mode: String) async throws -> (sent: [UInt8], received: [UInt8]) {
            let captureIn = dir + "/\(mode).in", captureOut = dir + "/\(mode).out"
            let out = try await parley([
                "ping", server.address, "--keyring", keyring, "--name", "client.alice", "--mode", mode, "--count", "3", "--size", "64",
                "--capture-in", captureIn, "--capture-out", captureOut,
            ], seconds: 30)
            #expect(out.status == 0, Comment(rawValue: out.combined))
            #expect(out.stdout.contains("mode \(mode)"), Comment(rawValue: out.stdout))
            return ([UInt8](try Data(contentsOf: URL(fileURLWithPath: captureOut))), [UInt8](try Data(contentsOf: URL(fileURLWithPath: captureIn))))
        }
        let payloads = (1...3).map { [UInt8](repeating: UInt8($0), count: 64) }
        let identities = ["parley-ping", "parley-swift", ParleyBuild.platform, "capture-server-name", ParleyBuild.version].map { [UInt8]($0.utf8) }
        let entity = [UInt8]("client.alice".utf8)

        let secure = try await capture("secure")
        for (direction, bytes) in [("sent", secure.sent), ("received", secure.received)] {
            #expect(bytes.count > 500, "\(direction): \(bytes.count) bytes")
            #expect(!occurs(entity, in: bytes), "\(direction): the entity name is visible")
            #expect(!occurs(key, in: bytes) && !occurs(Array(key.prefix(8)), in: bytes), "\(direction): key bytes are visible")
            for p in payloads { #expect(!occurs(p, in: bytes), "\(direction): echo payload \(p[0]) is visible") }
            for i in identities { #expect(!occurs(i, in: bytes), "\(direction): \(String(decoding: i, as: UTF8.self)) is visible") }
        }
        // The control: in crc mode the same session shows its identities and payloads.
        let crc = try await capture("crc")
        #expect(occurs(identities[0], in: crc.sent), "parley-ping travels in the clear in crc mode")
        #expect(occurs(identities[1], in: crc.sent) && occurs(identities[1], in: crc.received))
        #expect(occurs([UInt8]("capture-server-name".utf8), in: crc.received))
        #expect(payloads.allSatisfy { occurs($0, in: crc.sent) && occurs($0, in: crc.received) })
        #expect(!occurs(entity, in: crc.sent) && !occurs(entity, in: crc.received), "the entity name is sealed in crc mode too")
        #expect(!occurs(key, in: crc.sent) && !occurs(key, in: crc.received))
        #expect(await server.stop() == 0)
    }

    /// A server allowing `none,secret` and `crc,secure` still serves the independent Python
    /// client (written from the document, before secure mode) and a client with the default
    /// configuration; a secure-only server refuses the Python client at the banner.
    @Test func compatibilityWithClientsThatPredateSecureMode() async throws {
        let python = try #require(CommandTests.onPath("python3"), "python3 is needed (.ci/run installs it)")
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Interop/python/parley_client.py").path
        let dir = freshTestDirectory("secure-compat")
        let keyring = dir + "/server.keyring"
        try await Self.keyringAdd("client.alice", keyring, ["--caps", "*"])
        let socket = dir + "/both.sock"
        let both = try await ServeProcess.start([
            "--listen", "unix:\(socket)", "--listen", "127.0.0.1:0", "--auth", "none,secret", "--keyring", keyring, "--mode", "crc,secure",
            "--message", "hello from a secure-capable server",
        ])
        let py = try await runProcess(python, [script, "unix:\(socket)"], seconds: 60)
        #expect(py.status == 0, Comment(rawValue: py.combined))
        #expect(py.stdout.contains("OK: every check passed"), Comment(rawValue: py.combined))
        #expect(py.stdout.contains("hello from a secure-capable server"))
        let plain = try await Self.ping("unix:\(socket)", [])
        #expect(plain.status == 0, Comment(rawValue: plain.combined))
        #expect(plain.stdout.contains("auth none, mode crc"), Comment(rawValue: plain.stdout))
        let keyed = try await Self.ping("unix:\(socket)", ["--keyring", keyring, "--name", "client.alice"])
        #expect(keyed.status == 0, Comment(rawValue: keyed.combined))
        #expect(keyed.stdout.contains("auth secret as client.alice, mode secure"), Comment(rawValue: keyed.stdout))
        #expect(await both.stop() == 0)
        #expect(!both.log.contains("connection closed on error"), Comment(rawValue: both.log))

        let secureSocket = dir + "/secure.sock"
        let secureOnly = try await ServeProcess.start(["--listen", "unix:\(secureSocket)", "--auth", "secret", "--keyring", keyring, "--mode", "secure"])
        let refused = try await runProcess(python, [script, "unix:\(secureSocket)"], seconds: 60)
        #expect(refused.status != 0)
        #expect(refused.stdout.contains("missingFeatures"), Comment(rawValue: refused.combined))
        #expect(try await secureOnly.waitForLog("connection closed on error", "missingFeatures (4)"), Comment(rawValue: secureOnly.log))
        #expect(await secureOnly.stop() == 0)
    }
}

/// In-process: capabilities and what the server logs about them.
@Suite(.timeLimit(.minutes(2)))
struct SecureLibraryTests {
    /// A server with method secret over a keyring file, in secure and crc mode.
    static func withSecretServer<T>(
        entities: [(name: String, caps: [String])], router: ParleyRouter, logs: LogCollector? = nil,
        _ body: ([String: [UInt8]], ParleyAddress) async throws -> T
    ) async throws -> T {
        let path = freshTestDirectory("secure-lib") + "/server.keyring"
        let keys = try writeKeyring(path, entities)
        let source = try ParleyKeyringSource(path: path)
        return try await withServer(
            configure: { $0.authMethods = [AuthMethod.secret]; $0.modes = [.crc, .secure]; $0.keyring = source },
            router: router, logger: logs?.logger("server", level: .debug) ?? quietLogger
        ) { _, addresses in try await body(keys, addresses[0]) }
    }

    @Test(arguments: [true, false])
    func aRequestWithoutItsCapabilityIsDeniedAndItsHandlerNeverRuns(byDefault: Bool) async throws {
        let ran = Counter()
        var router = ParleyRouter()
        router.on(Parley_Echo_V1_Ping.self) { request, _ in
            ran.increment()
            var pong = Parley_Echo_V1_Pong()
            pong.sequence = request.sequence
            return pong
        }
        if byDefault { router.requireByDefault("echo.admin") } else { router.require("echo.admin", for: Parley_Echo_V1_Ping.self) }
        let logs = LogCollector()
        try await Self.withSecretServer(
            entities: [("client.alice", ["echo"]), ("client.root", ["echo.*"]), ("client.all", ["*"])], router: router, logs: logs
        ) { keys, address in
            for mode in [ConnectionMode.secure, .crc] {
                let alice = try await ParleyClient.connect(
                    to: address, configuration: .init(secret: SecretCredentials(entity: "client.alice", key: keys["client.alice"]!), modes: [mode]),
                    logger: quietLogger
                )
                defer { alice.close() }
                #expect(alice.session.connectionMode == mode)
                let error = await #expect(throws: ParleyError.self) { try await ping(alice, 1) }
                #expect(error?.code == .permissionDenied)
                #expect(error?.message.contains("client.alice may not send parley.echo.v1.Ping: it needs capability \"echo.admin\"") == true, "\(String(describing: error))")
                #expect(ran.count == 0, "the handler never ran")
                // The connection stays usable: the refusal is an answer, not a close.
                let again = await #expect(throws: ParleyError.self) { try await ping(alice, 2) }
                #expect(again?.code == .permissionDenied)
            }
            #expect(ran.count == 0)
            let denials = logs.all.filter { $0.message == "permission denied" }
            #expect(denials.count == 4, "\(logs.all.map(\.message))")
            #expect(denials.allSatisfy { $0.metadata.contains("client.alice") && $0.metadata.contains("parley.echo.v1.Ping") && $0.level == .warning })
            for name in ["client.root", "client.all"] {
                let client = try await ParleyClient.connect(
                    to: address, configuration: .init(secret: SecretCredentials(entity: name, key: keys[name]!)), logger: quietLogger
                )
                defer { client.close() }
                #expect(client.session.entity == name)
                #expect(try await ping(client, 7) == 7)
            }
            #expect(ran.count == 2)
        }
    }

    /// Method none on a server that allows it: anonymous capabilities apply (none here).
    @Test func anonymousClientsGetTheAnonymousCapabilities() async throws {
        let ran = Counter()
        var router = ParleyRouter()
        router.on(Parley_Echo_V1_Ping.self) { request, _ in
            ran.increment()
            var pong = Parley_Echo_V1_Pong()
            pong.sequence = request.sequence
            return pong
        }
        router.requireByDefault("echo")
        let path = freshTestDirectory("secure-anon") + "/server.keyring"
        let keys = try writeKeyring(path, [("client.alice", ["echo"])])
        let source = try ParleyKeyringSource(path: path)
        let logs = LogCollector()
        try await withServer(
            configure: { $0.authMethods = [AuthMethod.none, AuthMethod.secret]; $0.modes = [.crc, .secure]; $0.keyring = source; $0.anonymousCapabilities = [] },
            router: router, logger: logs.logger("server", level: .debug)
        ) { _, addresses in
            let anonymous = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { anonymous.close() }
            #expect(anonymous.session.authMethod == AuthMethod.none)
            let error = await #expect(throws: ParleyError.self) { try await ping(anonymous, 1) }
            #expect(error?.code == .permissionDenied)
            #expect(logs.all.contains { $0.message == "permission denied" && $0.metadata.contains("anonymous client") })
            let alice = try await ParleyClient.connect(
                to: addresses[0], configuration: .init(secret: SecretCredentials(entity: "client.alice", key: keys["client.alice"]!)), logger: quietLogger
            )
            defer { alice.close() }
            #expect(alice.session.connectionMode == .secure)
            #expect(try await ping(alice, 3) == 3)
            #expect(ran.count == 1)
        }
    }
}
