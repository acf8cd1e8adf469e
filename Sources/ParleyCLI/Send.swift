import ArgumentParser
import Foundation
import Logging
import NIOConcurrencyHelpers
import Parley
import ParleyServices

/// `parley send`: one-way messages as fast as the server takes them, optionally over a
/// lossless session that survives broken connections; shows progress and what happened to
/// the link.
struct Send: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Send one-way messages to a Parley server as fast as it takes them.",
        discussion: """
            Sends COUNT one-way Echo messages of SIZE bytes (the built-in service accepts
            and drops them), then one Ping request, whose answer proves the server received
            everything before it. Prints progress every second and a summary. With
            --lossless the client asks for a lossless session (feature bit 9): a broken
            connection is reconnected and nothing is lost; link events are printed as they
            happen. Back-pressure bounds the memory used: at most --replay-bytes of sent,
            unacknowledged messages are kept.
            """
    )

    @Argument(help: ArgumentHelp("Server address: HOST:PORT, [V6]:PORT, unix:PATH, tls://HOST:PORT, ws://HOST:PORT/PATH or wss://HOST:PORT/PATH.", valueName: "address"))
    var address: String

    @Option(name: .shortAndLong, help: "Number of one-way messages.")
    var count: Int = 100_000

    @Option(name: .long, help: "Bytes of payload per message.")
    var size: Int = 64

    @Flag(name: .long, help: "Ask for a lossless session (reconnect and replay on a broken connection).")
    var lossless = false

    @Option(name: .long, help: ArgumentHelp("Lossless: bytes of unacknowledged messages kept before sending waits.", valueName: "bytes"))
    var replayBytes: Int = 8 << 20

    @Option(name: .long, help: ArgumentHelp("Send KEEPALIVE after this much silence from the server.", valueName: "seconds"))
    var keepaliveInterval: Double = 15

    @Option(name: .long, help: ArgumentHelp("Declare the server dead after this much silence.", valueName: "seconds"))
    var keepaliveTimeout: Double = 60

    @Flag(name: .long, help: "Print only the summary line.")
    var quiet = false

    @OptionGroup var security: ClientSecurityOptions

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        do { _ = try ParleyAddress(parsing: self.address) } catch { throw ValidationError(error.message) }
        guard self.count >= 1 else { throw ValidationError("--count must be at least 1") }
        guard (0...(16 << 20)).contains(self.size) else { throw ValidationError("--size must be 0...16777216") }
        guard self.replayBytes >= 64 << 10 else { throw ValidationError("--replay-bytes must be at least 65536") }
        try checkSeconds(self.keepaliveInterval, "--keepalive-interval", minimum: 0.001)
        try checkSeconds(self.keepaliveTimeout, "--keepalive-timeout", minimum: 0.001)
        guard self.keepaliveTimeout > self.keepaliveInterval else {
            throw ValidationError("--keepalive-timeout must be longer than --keepalive-interval, both positive")
        }
        try self.security.check(address: try ParleyAddress(parsing: self.address))
    }

    /// Progress and link events are written at once (`emit`), also when standard output
    /// is a file or a pipe.
    func run() async throws {
        self.logging.bootstrap()
        let address = try ParleyAddress(parsing: self.address)
        var configuration = ParleyClient.Configuration(name: "parley-send")
        configuration.limits.keepaliveInterval = .milliseconds(Int64(self.keepaliveInterval * 1000))
        configuration.limits.keepaliveTimeout = .milliseconds(Int64(self.keepaliveTimeout * 1000))
        if self.lossless {
            configuration.lossless = ParleyClient.LosslessOptions(replayBounds: .init(maxBytes: self.replayBytes, maxMessages: max(64, self.replayBytes / 64)))
        }
        let client: ParleyClient
        do {
            try self.security.apply(to: &configuration, address: address)
            client = try await ParleyClient.connect(to: address, configuration: configuration, logger: Logger(label: "parley.send"))
        } catch let error as ParleyError {
            emit("parley send: \(error.message) [\(error.code)]")
            throw ExitCode(2)
        }
        defer { client.close() }
        let lossless = client.connection.lossless != nil
        if !self.quiet {
            emit("connected to \(client.address): \(lossless ? "lossless session" : "lossy connection\(self.lossless ? " (the server does not offer lossless sessions)" : "")")")
        }
        let started = ContinuousClock.now
        let quiet = self.quiet
        let events = Task {
            for await event in client.connection.linkEvents where !quiet {
                emit(String(format: "%8.3f s  %@", (ContinuousClock.now - started).milliseconds / 1000, event.description))
            }
        }
        defer { events.cancel() }
        let sent = NIOLockedValueBox(0)
        let progress = Task {
            var last = 0
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(1))
                let now = sent.withLockedValue { $0 }
                if !quiet, !Task.isCancelled {
                    emit(String(format: "%8.3f s  sent %d of %d (%d/s)", (ContinuousClock.now - started).milliseconds / 1000, now, self.count, now - last))
                }
                last = now
            }
        }
        defer { progress.cancel() }
        var echo = Parley_Echo_V1_Echo()
        echo.payload = Data(repeating: 0x5A, count: self.size)
        do {
            for i in 1...self.count {
                try await client.send(echo)
                if i & 255 == 0 { sent.withLockedValue { $0 = i } }
            }
            sent.withLockedValue { $0 = self.count }
            var ping = Parley_Echo_V1_Ping()
            ping.sequence = UInt64(self.count)
            _ = try await client.request(ping, as: Parley_Echo_V1_Pong.self)
        } catch let error as ParleyError {
            emit("parley send: stopped after \(sent.withLockedValue { $0 }) messages: \(error.message) [\(error.code)]")
            throw ExitCode(2)
        }
        let elapsed = (ContinuousClock.now - started).milliseconds / 1000
        let reconnects = client.connection.reconnects
        emit(String(
            format: "sent %d messages of %d bytes to %@ in %.3f s (%.0f/s)%@", self.count, self.size, client.address.description, elapsed,
            Double(self.count) / elapsed, lossless ? ", \(reconnects) reconnect\(reconnects == 1 ? "" : "s")" : ""
        ))
    }
}
