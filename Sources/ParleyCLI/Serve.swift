import ArgumentParser
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
            """
    )

    @Option(name: .long, help: ArgumentHelp("Address to listen on: HOST:PORT, [V6]:PORT or unix:PATH.", valueName: "address"))
    var listen: [String] = []

    @Option(name: .long, help: "Server name reported to clients.")
    var name: String = "parley"

    @Option(name: .long, help: "A low-priority message sent to every client (repeatable).")
    var message: [String] = []

    @Option(name: .long, help: "A high-priority message sent to every client (repeatable).")
    var highMessage: [String] = []

    @Option(name: .long, help: "Seconds a client must wait, from the handshake, before sending a request.")
    var requestDelay: Double = 0

    @Option(name: .long, help: ArgumentHelp("Redirect clients to this server (repeatable).", valueName: "address"))
    var redirect: [String] = []

    @Option(name: .long, help: "Refuse clients older than this version, telling them they are out of date.")
    var minClientVersion: String?

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        for a in self.listen + self.redirect {
            do { _ = try ParleyAddress(parsing: a) } catch { throw ValidationError(error.message) }
        }
        if self.requestDelay < 0 { throw ValidationError("--request-delay must be 0 or more seconds") }
    }

    func run() async throws {
        self.logging.bootstrap()
        let logger = Logger(label: "parley.serve")
        let addresses = try self.listen.isEmpty
            ? [ParleyAddress.tcp(host: "127.0.0.1", port: ParleyAddress.defaultPort)]
            : self.listen.map { try ParleyAddress(parsing: $0) }
        let nucleus = ParleyNucleus(
            messages: self.message.map { ParleyServerMessage(priority: .low, text: $0) }
                + self.highMessage.map { ParleyServerMessage(priority: .high, text: $0) },
            requestDelay: self.requestDelay, redirects: self.redirect
        )
        let server = ParleyServer(
            configuration: .init(listen: addresses, name: self.name, nucleus: nucleus, minimumClientVersion: self.minClientVersion),
            router: EchoService.router(name: self.name), logger: logger
        )
        let group = ServiceGroup(
            configuration: .init(services: [.init(service: server)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        )
        try await group.run()
    }
}
