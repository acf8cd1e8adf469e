import Foundation
import Logging
import NIOConcurrencyHelpers
import Parley
import ParleyWire
import SwiftProtobuf

/// A worker's link to its masters: one lossless connection at a time, to the first master
/// that answers. A cut is the lossless session's business (it reconnects and replays); when
/// the connection is gone for good (the master died and stays away, or drains), the next
/// master is tried and the call sent again there. Every message a worker sends is idempotent
/// for the masters, which share the store: a report already accepted through the dead master
/// is acknowledged again, a lease taken there is still the worker's.
///
/// Workers start at a master chosen by their name, so that a fleet given the same list
/// spreads over the masters.
public final class WorkMasterLink: Sendable {
    public let masters: [ParleyAddress]
    /// The client configuration for each master (credentials and TLS can differ by address).
    let configuration: @Sendable (ParleyAddress) throws -> ParleyClient.Configuration
    let logger: Logger
    /// How long a call keeps trying masters before it fails.
    let failoverTimeout: Duration
    /// The worker's handlers for what its master sends it (master-initiated commands).
    let router: ParleyRouter
    /// Sent on every new connection before anything else (the worker's hello).
    private let onConnect: NIOLockedValueBox<@Sendable (ParleyClient) async throws -> Void>

    private struct State {
        var client: ParleyClient?
        var connecting: Task<ParleyClient, any Error>?
        var next: Int
        var closed = false
    }

    private let state: NIOLockedValueBox<State>

    public convenience init(
        masters: [ParleyAddress], configuration: ParleyClient.Configuration, name: String, failoverTimeout: Duration = .seconds(120),
        router: ParleyRouter = ParleyRouter(), logger: Logger = Logger(label: "parley.work.link"),
        onConnect: @escaping @Sendable (ParleyClient) async throws -> Void = { _ in }
    ) {
        self.init(masters: masters, configurationFor: { _ in configuration }, name: name, failoverTimeout: failoverTimeout, router: router, logger: logger, onConnect: onConnect)
    }

    public init(
        masters: [ParleyAddress], configurationFor: @escaping @Sendable (ParleyAddress) throws -> ParleyClient.Configuration, name: String,
        failoverTimeout: Duration = .seconds(120), router: ParleyRouter = ParleyRouter(), logger: Logger = Logger(label: "parley.work.link"),
        onConnect: @escaping @Sendable (ParleyClient) async throws -> Void = { _ in }
    ) {
        self.router = router
        precondition(!masters.isEmpty, "a worker needs at least one master")
        self.masters = masters
        self.configuration = configurationFor
        self.logger = logger
        self.failoverTimeout = failoverTimeout
        self.onConnect = NIOLockedValueBox(onConnect)
        // FNV-1a of the name: stable across processes (Swift's hashValue is not).
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in name.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
        self.state = NIOLockedValueBox(State(next: Int(hash % UInt64(masters.count))))
    }

    /// What to send on every new connection before anything else.
    public func setOnConnect(_ body: @escaping @Sendable (ParleyClient) async throws -> Void) {
        self.onConnect.withLockedValue { $0 = body }
    }

    /// The connection in use, connecting first if there is none.
    public func client() async throws -> ParleyClient {
        let task = try self.state.withLockedValue { state -> Task<ParleyClient, any Error> in
            guard !state.closed else { throw ParleyError(code: .connectionClosed, message: "the worker's link to its masters is closed") }
            if let client = state.client { return Task { client } }
            if let connecting = state.connecting { return connecting }
            let first = state.next
            let connecting = Task { try await self.connectToAny(startingAt: first) }
            state.connecting = connecting
            return connecting
        }
        do {
            let client = try await task.value
            let closed = self.state.withLockedValue { state -> Bool in
                if state.connecting == task {
                    state.connecting = nil
                    if !state.closed { state.client = client }
                }
                return state.closed
            }
            if closed {
                // Closed while this connection was being made: it is not kept.
                client.close()
                throw ParleyError(code: .connectionClosed, message: "the worker's link to its masters is closed")
            }
            return client
        } catch {
            self.state.withLockedValue { state in if state.connecting == task { state.connecting = nil } }
            throw error
        }
    }

    /// Sends `request` to the current master, failing over to the next ones while the
    /// connection is what fails, for up to `failoverTimeout`.
    public func request<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message & Sendable>(
        _ request: Request, as response: Response.Type = Response.self
    ) async throws -> Response {
        try await self.timedRequest(request, as: response).response
    }

    /// `request`, and when the request that was answered was handed to its master's
    /// connection (before the master saw it: what the master did for it came later).
    public func timedRequest<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message & Sendable>(
        _ request: Request, as response: Response.Type = Response.self
    ) async throws -> (response: Response, sentAt: ContinuousClock.Instant) {
        let deadline = ContinuousClock.now + self.failoverTimeout
        while true {
            let client: ParleyClient
            do {
                client = try await self.client()
            } catch let error as ParleyError where Self.isLinkFailure(error) && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(200))
                continue
            }
            let sentAt = ContinuousClock.now
            do {
                return (try await client.request(request, as: response, idempotent: true), sentAt)
            } catch let error as ParleyError where Self.isLinkFailure(error) {
                self.drop(client, because: error)
                guard ContinuousClock.now < deadline else { throw error }
            }
        }
    }

    /// The connection or its session is gone (not an answer about the request).
    static func isLinkFailure(_ error: ParleyError) -> Bool {
        // Not a request's timeout: that is about the request (a slow store), and the lossless
        // session says when the link itself is gone.
        [.connectionClosed, .connectFailed, .shuttingDown, .sessionSuperseded].contains(error.code)
    }

    /// Forgets a connection that failed; the next call connects to the next master.
    private func drop(_ client: ParleyClient, because error: ParleyError) {
        let dropped = self.state.withLockedValue { state -> Bool in
            guard state.client === client else { return false }
            state.client = nil
            return true
        }
        if dropped {
            self.logger.warning("lost the master; trying the next", metadata: ["master": "\(client.address)", "error": "\(error.message)"])
            client.close()
        }
    }

    /// The first connection, for a worker that may start before its masters: while no master
    /// answers at all (nothing listening yet, no route, a name that does not resolve yet, a
    /// master full or shutting down: `ParleyError.isWorthWaitingFor`), tries them all again with back-off
    /// (0.2 s, doubling up to 5 s) for up to `failoverTimeout`, logging a warning once; fails
    /// at once for anything else (an authentication or a certificate refused, a hello the
    /// master refused), which would fail the same way again.
    public func firstClient() async throws -> ParleyClient {
        let deadline = ContinuousClock.now + self.failoverTimeout
        var pause = Duration.milliseconds(200)
        var warned = false
        while true {
            do {
                return try await self.client()
            } catch let error as ParleyError where error.isWorthWaitingFor && ContinuousClock.now + pause < deadline {
                if !warned {
                    warned = true
                    self.logger.warning(
                        "no master answers yet; trying again for up to \(self.failoverTimeout)",
                        metadata: ["masters": "\(self.masters.map(\.description).joined(separator: ", "))", "error": "\(error.message)"]
                    )
                }
                try await Task.sleep(for: pause)
                pause = min(pause * 2, .seconds(5))
            }
        }
    }

    private func connectToAny(startingAt first: Int) async throws -> ParleyClient {
        var lastError: (any Error)?
        // The first error that is not "nobody there": what to report when no master took us.
        var refusal: (any Error)?
        for offset in 0..<self.masters.count {
            let index = (first + offset) % self.masters.count
            let address = self.masters[index]
            do {
                var configuration = try self.configuration(address)
                configuration.lossless = configuration.lossless ?? .init()
                let client = try await ParleyClient.connect(to: address, configuration: configuration, router: self.router, logger: self.logger)
                do {
                    let hello = self.onConnect.withLockedValue { $0 }
                    try await hello(client)
                } catch {
                    client.close()
                    throw error
                }
                // The next failover starts after this master.
                self.state.withLockedValue { $0.next = (index + 1) % self.masters.count }
                self.logger.info("connected to a master", metadata: ["master": "\(address)"])
                // The master's messages to its workers (its nucleus); its request delay and
                // redirects are the client's business and already applied.
                for message in client.serverMessages {
                    self.logger.notice("message from the master: \(message.text)", metadata: ["master": "\(client.address)", "priority": "\(message.priority)"])
                }
                return client
            } catch {
                lastError = error
                if refusal == nil, !((error as? ParleyError)?.isWorthWaitingFor ?? false) { refusal = error }
                self.logger.debug("master unreachable", metadata: ["master": "\(address)", "error": "\(error)"])
            }
        }
        throw refusal ?? lastError ?? ParleyError(code: .connectFailed, message: "no master")
    }

    /// Closes the connection; later calls fail.
    public func close() {
        let client = self.state.withLockedValue { state -> ParleyClient? in
            state.closed = true
            state.connecting?.cancel()
            defer { state.client = nil }
            return state.client
        }
        client?.close()
    }
}
