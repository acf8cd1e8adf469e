import ArgumentParser
import Foundation
import Logging

@main
struct ParleyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "parley",
        abstract: "Parley: a session protocol for distributed systems.",
        discussion: """
            Start a server with the built-in echo/ping service and ping it:
              parley serve &
              parley ping 127.0.0.1:7420
            Addresses are HOST:PORT, [V6]:PORT or unix:PATH. The default port is 7420.
            """,
        subcommands: [Serve.self, Ping.self, Send.self, Decode.self, Block.self, Work.self, Keyring.self, Cert.self, Chaos.self, Conform.self]
    )
}

struct LoggingOptions: ParsableArguments {
    @Option(name: .long, help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: Logger.Level = .info

    func bootstrap() {
        let level = self.logLevel
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}

/// The longest time an option in seconds may give: a year. Checked before the value becomes
/// a `Duration` or a count of milliseconds, where 1e300 (or any value past about 1e13 s)
/// would trap.
let maximumOptionSeconds: Double = 31_536_000

/// Checks an option in seconds: a finite number from `minimum` to a year.
func checkSeconds(_ value: Double, _ option: String, minimum: Double) throws {
    guard value.isFinite, value >= minimum, value <= maximumOptionSeconds else {
        func text(_ x: Double) -> String { x.isFinite && x == x.rounded() && abs(x) < 1e15 ? "\(Int64(x))" : "\(x)" }
        throw ValidationError("\(option) must be from \(text(minimum)) to \(text(maximumOptionSeconds)) seconds (a year), not \(text(value))")
    }
}

/// One line on standard output, at once, also when it is a file or a pipe (a test or a
/// script reads it as it comes): for commands that report progress while they run.
func emit(_ line: String) {
    writeStandardOutput(Data((line + "\n").utf8))
}

/// Writes to standard output; when its reader has gone (`parley ... | head`), leaves quietly
/// with status 141, as a program killed by SIGPIPE would (the runtime ignores SIGPIPE, and
/// FileHandle's non-throwing `write` would crash on the EPIPE).
func writeStandardOutput(_ data: Data) {
    do {
        try FileHandle.standardOutput.write(contentsOf: data)
    } catch {
        exit(141)
    }
}
