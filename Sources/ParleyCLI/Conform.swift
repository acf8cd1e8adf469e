import ArgumentParser
import Foundation
import ParleyConformance
import ParleyNIO
import ParleyWire

struct Conform: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check a Parley server against docs/protocol.md.",
        discussion: """
            Runs the conformance checks (ParleyConformance) against the server at ADDRESS:
            legal but unusual input (unknown optional feature bits, unknown ignorable tags,
            frames in one-byte writes, pipelined bursts, frames of the maximal size) and
            illegal input (wrong CRCs, oversized frames, frames in the wrong phase, required
            unknown features). Prints one line per check: its requirement id, PASS, FAIL (with
            what was expected and seen) or SKIP (with the reason), then a summary line. Exits
            0 only when no check failed. docs/conformance.md describes the checks.
            """
    )

    @Argument(help: ArgumentHelp("Server address: HOST:PORT, [V6]:PORT, unix:PATH, tls://HOST:PORT, ws://HOST:PORT/PATH or wss://HOST:PORT/PATH.", valueName: "address"))
    var address: String

    @Option(name: .long, parsing: .upToNextOption, help: ArgumentHelp("Run only the checks of these requirement ids (e.g. R-4.4-1).", valueName: "id"))
    var only: [String] = []

    @Flag(name: .long, help: "Print the report as one JSON object instead of lines.")
    var json = false

    @Flag(name: .long, help: "List the checks (id and what each does) without running them.")
    var list = false

    @Option(name: .long, help: "Seconds a check waits for each answer it expects.")
    var timeout: Double = 5

    @Option(name: .long, help: ArgumentHelp("For tls:// and wss://: the certificate directory whose ca.pem the server's certificate is checked against.", valueName: "dir"))
    var cert: String?

    func validate() throws {
        do { _ = try ParleyAddress(parsing: self.address) } catch { throw ValidationError(error.message) }
        guard self.timeout > 0 else { throw ValidationError("--timeout must be more than 0") }
    }

    func run() async throws {
        let address = try ParleyAddress(parsing: self.address)
        var target = ConformanceTarget(address: address)
        if let cert = self.cert { target.tls = try ParleyTLS.client(directory: cert) }
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
}
