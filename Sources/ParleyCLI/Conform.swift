import ArgumentParser
import Foundation
import Parley
import ParleyConformance
import ParleyNIO
import ParleyWire

struct Conform: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check a Parley server against docs/protocol.md.",
        discussion: """
            Runs the conformance checks (ParleyConformance) against the server at
            ADDRESS: legal but unusual input (unknown optional feature bits, unknown
            ignorable tags, frames in one-byte writes, pipelined bursts, frames of the
            maximal size) and illegal input (wrong CRCs, oversized frames, frames in the
            wrong phase, required unknown features). Prints one line per check: its
            requirement id, PASS, FAIL (with what was expected and seen) or SKIP (with
            the reason), then a summary line. Exits 0 only when no check failed.
            With --keyring FILE --name ENTITY the checks of method secret and sealed
            frames run too, and the checks that need a session run in secure mode when
            the server allows no method-none crc session (or always, --secure-sessions).
            docs/conformance.md describes the checks.

            --client-test --listen ADDRESS tests a client instead: it listens, prints
            "listening on ADDRESS", and plays one scenario per connection (a demanding
            server, a request delay, no optional features, a 64 KiB frame limit, a
            refusal, a wrong AUTH_DONE, method secret in secure mode, method secret with
            a wrong server proof, a redirect); run the client once per scenario (nine
            times) with an echo workload (Ping, Echo, Count), with a key of the keyring
            given by --keyring FILE for the two scenarios of method secret (without
            --keyring they skip). It reports the client's checks the same way.
            """
    )

    @Argument(help: ArgumentHelp("Server address: HOST:PORT, [V6]:PORT, unix:PATH, tls://HOST:PORT, ws://HOST:PORT/PATH or wss://HOST:PORT/PATH.", valueName: "address"))
    var address: String?

    @Flag(name: .long, help: "Test a client: listen (--listen) and check the clients that connect.")
    var clientTest = false

    @Option(name: .long, help: ArgumentHelp("With --client-test: the address to listen on (port 0: any free port).", valueName: "address"))
    var listen: String?

    @Option(name: .long, help: "With --client-test: seconds to wait for each scenario's connection; a scenario whose client does not come in that time is skipped, and the next one waits again.")
    var idle: Double = 60

    @Option(name: .long, parsing: .upToNextOption, help: ArgumentHelp("Run only the checks of these requirement ids (e.g. R-4.4-1).", valueName: "id"))
    var only: [String] = []

    @Flag(name: .long, help: "Print the report as one JSON object instead of lines.")
    var json = false

    @Flag(name: .long, help: "List the checks (id and what each does) without running them.")
    var list = false

    @Option(name: .long, help: "Seconds a check waits for each answer it expects.")
    var timeout: Double = 5

    @Option(name: .long, help: ArgumentHelp("A keyring holding a key of the server's keyring (with --name): the checks of secure sessions run with it. With --client-test: the keyring of the test server, whose keys the client under test uses in the scenarios of method secret.", valueName: "file"))
    var keyring: String?

    @Option(name: .long, help: ArgumentHelp("The entity of --keyring to authenticate as, e.g. client.alice.", valueName: "name"))
    var name: String?

    @Flag(name: .long, help: "With --keyring and --name: run the checks that need a session in secure mode (method secret) even when the server allows method none. Without it they run in crc mode, or in secure mode when the server allows nothing else.")
    var secureSessions = false

    @Option(name: .long, help: ArgumentHelp("For tls:// and wss://: the certificate directory whose ca.pem the server's certificate is checked against (with --client-test: whose server.pem and server.key the test server uses).", valueName: "dir"))
    var cert: String?

    mutating func validate() throws {
        // `--only R-4.4-1 HOST:PORT`: the ids take every value up to the next option, so an
        // address written after them lands among them; it is no requirement id, so take it back.
        if !self.clientTest, self.address == nil, let last = self.only.last, !last.hasPrefix("R-"), (try? ParleyAddress(parsing: last)) != nil {
            self.address = self.only.removeLast()
        }
        if self.clientTest {
            guard self.address == nil, let listen = self.listen ?? (self.list ? "127.0.0.1:0" : nil) else {
                throw ValidationError("--client-test takes --listen ADDRESS and no server address")
            }
            do { _ = try ParleyAddress(parsing: listen) } catch { throw ValidationError(error.message) }
        } else {
            guard let address = self.address, self.listen == nil else { throw ValidationError("give the server's ADDRESS (or --client-test --listen ADDRESS)") }
            do { _ = try ParleyAddress(parsing: address) } catch { throw ValidationError(error.message) }
        }
        if self.clientTest {
            guard self.name == nil, !self.secureSessions else { throw ValidationError("--client-test takes --keyring FILE alone (the keys its clients may use)") }
        } else {
            guard (self.keyring == nil) == (self.name == nil) else { throw ValidationError("--keyring and --name go together") }
        }
        guard !self.secureSessions || self.keyring != nil else { throw ValidationError("--secure-sessions needs --keyring FILE --name ENTITY") }
        try checkSeconds(self.timeout, "--timeout", minimum: 0.001)
        try checkSeconds(self.idle, "--idle", minimum: 0.001)
    }

    func run() async throws {
        if self.clientTest { return try await self.runClientTest() }
        let address = try ParleyAddress(parsing: self.address!)
        var target = ConformanceTarget(address: address, secureSessions: self.secureSessions)
        if let cert = self.cert { target.tls = try ParleyTLS.client(directory: cert) }
        if let keyring = self.keyring, let name = self.name {
            do { target.secret = try ParleyKeyring.load(path: keyring).credentials(for: name, keyringPath: keyring) } catch { throw ValidationError(error.message) }
        }
        let runner = ConformanceRunner(target: target, timeout: .milliseconds(Int64(self.timeout * 1000)), only: self.only)
        let checks: [ConformanceCheck]
        do { checks = try runner.selected() } catch { throw ValidationError(error.message) }
        if self.list {
            for check in checks { emit("\(check.id) \(check.name)") }
            return
        }
        let json = self.json
        let report = try await runner.run { result in
            if !json { emit(result.line) }
        }
        emit(json ? report.json() : report.summary)
        if report.failed > 0 { throw ExitCode(1) }
    }

    private func runClientTest() async throws {
        if self.list {
            for check in ClientConformanceTester.checks where self.only.isEmpty || self.only.contains(check.id) { emit("\(check.id) \(check.name)") }
            return
        }
        let tls = try self.cert.map { try ParleyTLS.server(directory: $0) }
        var secrets: SecretDirectory?
        if let keyring = self.keyring {
            do { secrets = try ParleyKeyring.load(path: keyring).directory } catch { throw ValidationError(error.message) }
        }
        let tester = ClientConformanceTester(
            listen: try ParleyAddress(parsing: self.listen!), tls: tls, timeout: .milliseconds(Int64(self.timeout * 1000)),
            idle: .milliseconds(Int64(self.idle * 1000)), only: self.only, secrets: secrets
        )
        let address: ParleyAddress
        do { address = try await tester.start() } catch let error as ParleyError { throw ValidationError(error.message) }
        emit("listening on \(address)")
        let json = self.json
        let report = await tester.run(address: address) { result in
            if !json { emit(result.line) }
        }
        emit(json ? report.json() : report.summary)
        if report.failed > 0 { throw ExitCode(1) }
    }
}
