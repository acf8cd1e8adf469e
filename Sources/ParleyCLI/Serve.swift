import ArgumentParser
import Foundation
import Logging
import Parley
import ParleyServices
import ServiceLifecycle
import UnixSignals

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a Parley server with the built-in echo/ping service.",
        discussion: """
            Listens on 127.0.0.1:7420 unless --listen is given (repeat it to listen on several
            addresses). Serves Echo, Ping, Count (a streamed response) and Sleep requests
            (Protos/parley/echo/v1/echo.proto). Stops gracefully on SIGINT or SIGTERM: running
            requests finish and are answered before connections close.

            The nucleus options make the server send user messages, a request delay and
            redirects in every SERVER_IDENT, or refuse clients older than a version.

            Security (docs/security.md): --auth secret --keyring FILE authenticates clients
            by a key neither side sends; --mode secure then seals every frame with
            AES-256-GCM or ChaCha20-Poly1305:
              parley keyring add client.alice --keyring demo.keyring --caps echo
              parley serve --auth secret --keyring demo.keyring --mode secure &
              parley ping 127.0.0.1:7420 --keyring demo.keyring --name client.alice

            TLS (--listen tls://HOST:PORT --cert DIR, after `parley cert init --dir DIR`) and
            WebSocket (--listen ws://HOST:PORT/PATH) carry the same protocol; --auth tls takes
            the client's entity from its certificate.
            """
    )

    @Option(name: .long, help: ArgumentHelp("Address to listen on: HOST:PORT, [V6]:PORT, unix:PATH, tls://HOST:PORT, ws://HOST:PORT/PATH or wss://HOST:PORT/PATH (repeatable).", valueName: "address"))
    var listen: [String] = []

    @Option(name: .long, help: "Server name reported to clients.")
    var name: String = "parley"

    @OptionGroup var nucleus: NucleusOptions

    @Option(name: .long, help: ArgumentHelp("Capability every echo request needs (from the client's keyring entry); none by default.", valueName: "capability"))
    var requireCap: String?

    @Option(name: .long, help: ArgumentHelp("Seconds a lossless session whose connection broke is kept for its client to reconnect; 0 turns lossless sessions (feature bit 9) off.", valueName: "seconds"))
    var sessionRetention: Double = 30

    @Option(name: .long, help: ArgumentHelp("On SIGTERM or SIGINT, seconds to wait for running requests to finish and each client to be told before closing what is still open; 0 waits without limit.", valueName: "seconds"))
    var shutdownGrace: Double = 30

    @Option(name: .long, help: ArgumentHelp("Seconds a client may take to finish its handshake before the server closes the connection, so that silent or very slow clients do not hold connections open; counted from when the connection is open (over tls:// the TLS handshake counts; over ws:// and wss:// from the end of the HTTP upgrade).", valueName: "seconds"))
    var handshakeTimeout: Double = 30

    @Option(name: .long, help: ArgumentHelp("Seconds after which a connection without keepalive (its client did not negotiate it) is closed when no message has come from it and nothing has been in progress for that long; 0: never.", valueName: "seconds"))
    var idleTimeout: Double = 300

    @Option(name: .long, help: ArgumentHelp("Connections served at once; more are closed as soon as they are accepted. Default: the file descriptor limit less 128 (\(ParleyServer.defaultMaxConnections) here).", valueName: "n"))
    var maxConnections: Int = ParleyServer.defaultMaxConnections

    @Option(name: .long, help: ArgumentHelp("Append the key of each Work request to this file when it starts running (for tests of session resets).", valueName: "file"))
    var executionLog: String?

    @OptionGroup var security: ServerSecurityOptions

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        for a in self.listen {
            do { _ = try ParleyAddress(parsing: a) } catch { throw ValidationError(error.message) }
        }
        try checkSeconds(self.sessionRetention, "--session-retention", minimum: 0)
        try checkSeconds(self.shutdownGrace, "--shutdown-grace", minimum: 0)
        try checkSeconds(self.handshakeTimeout, "--handshake-timeout", minimum: 0.001)
        try checkSeconds(self.idleTimeout, "--idle-timeout", minimum: 0)
        guard self.idleTimeout == 0 || self.idleTimeout >= 0.001 else {
            throw ValidationError("--idle-timeout must be 0 (never) or at least 0.001 seconds")
        }
        guard self.maxConnections >= 1 else { throw ValidationError("--max-connections must be at least 1") }
        try self.security.check(listen: try self.listen.map { try ParleyAddress(parsing: $0) })
    }

    func run() async throws {
        self.logging.bootstrap()
        let logger = Logger(label: "parley.serve")
        let addresses = try self.listen.isEmpty
            ? [ParleyAddress.tcp(host: "127.0.0.1", port: ParleyAddress.defaultPort)]
            : self.listen.map { try ParleyAddress(parsing: $0) }
        var executionLog: FileHandle?
        if let path = self.executionLog {
            if !FileManager.default.fileExists(atPath: path) { _ = FileManager.default.createFile(atPath: path, contents: nil) }
            guard let handle = FileHandle(forWritingAtPath: path) else { throw ValidationError("cannot open --execution-log \(path) for writing") }
            _ = try? handle.seekToEnd()  // appends to a file; a pipe or terminal cannot seek
            executionLog = handle
        }
        var router = EchoService.router(name: self.name, executionLog: executionLog)
        if let cap = self.requireCap { router.requireByDefault(cap) }
        var configuration = ParleyServer.Configuration(
            listen: addresses, name: self.name, nucleus: self.nucleus.nucleus, minimumClientVersion: self.nucleus.minClientVersion
        )
        self.nucleus.apply(to: &configuration)
        configuration.sessionRetention = self.sessionRetention > 0 ? .milliseconds(Int64(self.sessionRetention * 1000)) : nil
        configuration.shutdownGracePeriod = self.shutdownGrace > 0 ? .milliseconds(Int64(self.shutdownGrace * 1000)) : nil
        configuration.limits.handshakeTimeout = .microseconds(Int64(self.handshakeTimeout * 1_000_000))
        configuration.limits.idleTimeout = self.idleTimeout > 0 ? .microseconds(Int64(self.idleTimeout * 1_000_000)) : nil
        configuration.maxConnections = self.maxConnections
        do { try self.security.apply(to: &configuration) } catch let error as ParleyError { throw ValidationError(error.message) }
        let server = ParleyServer(configuration: configuration, router: router, logger: logger)
        let group = ServiceGroup(
            configuration: .init(services: [.init(service: server)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        )
        try await group.run()
    }
}

/// What a server says in every SERVER_IDENT's nucleus (`parley serve`, `parley work serve`).
struct NucleusOptions: ParsableArguments {
    @Option(name: .long, help: "A low-priority message sent to every client (repeatable).")
    var message: [String] = []

    @Option(name: .long, help: "A high-priority message sent to every client (repeatable).")
    var highMessage: [String] = []

    @Option(name: .long, help: "Seconds a client must wait, from the handshake, before sending a request.")
    var requestDelay: Double = 0

    @Option(name: .long, help: ArgumentHelp("Redirect clients to this server (repeatable).", valueName: "address"))
    var redirect: [String] = []

    @Flag(name: .long, help: "Rotate the --redirect list for each new client (clients follow the first): spreads clients over the addresses, a front door for several servers.")
    var rotateRedirects = false

    @Option(name: .long, help: ArgumentHelp("Refuse clients older than this version (dotted numbers, e.g. 1.4.0; a suffix such as -beta is ignored), telling them they are out of date.", valueName: "version"))
    var minClientVersion: String?

    func validate() throws {
        if let v = self.minClientVersion {
            // Versions compare part by part by their leading digits (docs/protocol.md 8.4): a
            // minimum whose first part has none compares as 0 and would refuse no one.
            guard let first = v.utf8.first, first >= UInt8(ascii: "0"), first <= UInt8(ascii: "9") else {
                throw ValidationError("--min-client-version \"\(v)\": give a version that starts with a number, such as 1.4.0")
            }
        }
        for a in self.redirect {
            do { _ = try ParleyAddress(parsing: a) } catch { throw ValidationError(error.message) }
        }
        try checkSeconds(self.requestDelay, "--request-delay", minimum: 0)
        if self.rotateRedirects, self.redirect.count < 2 { throw ValidationError("--rotate-redirects needs at least two --redirect addresses") }
    }

    /// Applies what is not in the nucleus itself.
    func apply(to configuration: inout ParleyServer.Configuration) {
        configuration.rotateRedirects = self.rotateRedirects
    }

    var nucleus: ParleyNucleus {
        ParleyNucleus(
            messages: self.message.map { ParleyServerMessage(priority: .low, text: $0) }
                + self.highMessage.map { ParleyServerMessage(priority: .high, text: $0) },
            requestDelay: self.requestDelay, redirects: self.redirect
        )
    }
}
