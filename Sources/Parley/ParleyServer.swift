import Logging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ParleyNIO
import ParleyWire
import ServiceLifecycle

/// A Parley server: listens on one or more addresses and serves each connection's requests
/// with its router. Run it in a `ServiceGroup`; on graceful shutdown it stops accepting
/// connections, answers requests that arrive from then on with `shuttingDown`, lets running
/// handlers finish and deliver their answers, then closes each connection with CLOSE.
public final class ParleyServer: Service, Sendable {
    public struct Configuration: Sendable {
        public var listen: [ParleyAddress]
        public var supportedFeatures: ParleyFeatures
        public var requiredFeatures: ParleyFeatures
        public var authMethods: [String]
        public var name: String
        /// Nucleus fields sent in every SERVER_IDENT.
        public var nucleus: ParleyNucleus
        /// Clients older than this are told they are out of date and refused.
        public var minimumClientVersion: String?
        public var maxFrameSize: Int
        public var limits: ParleyConnectionLimits
        public var transport: any ParleyTransport

        public init(
            listen: [ParleyAddress] = [.tcp(host: "127.0.0.1", port: ParleyAddress.defaultPort)],
            supportedFeatures: ParleyFeatures = .implemented, requiredFeatures: ParleyFeatures = [],
            authMethods: [String] = ["none"], name: String = "parley", nucleus: ParleyNucleus = ParleyNucleus(),
            minimumClientVersion: String? = nil, maxFrameSize: Int = Frame.defaultMaxFrameSize,
            limits: ParleyConnectionLimits = .defaults, transport: any ParleyTransport = PosixTransport()
        ) {
            self.listen = listen
            self.supportedFeatures = supportedFeatures
            self.requiredFeatures = requiredFeatures
            self.authMethods = authMethods
            self.name = name
            self.nucleus = nucleus
            self.minimumClientVersion = minimumClientVersion
            self.maxFrameSize = maxFrameSize
            self.limits = limits
            self.transport = transport
        }

        public static var defaults: Configuration { Configuration() }
    }

    public let configuration: Configuration
    let router: ParleyRouter
    let logger: Logger
    let group: any EventLoopGroup
    private let state = NIOLockedValueBox(State())
    private let stopped = AsyncStream<Never>.makeStream()
    /// Random per server instance (SERVER_IDENT `server_nonce`), for future session reconnect.
    private let nonce = UInt64.random(in: 1...UInt64.max)
    private let connectionsAccepted = Counter(label: "parley_server_connections_total")
    private let connectionErrors = Counter(label: "parley_server_connection_errors_total")

    private struct State {
        var bound: [ParleyAddress]?
        var boundWaiters: [CheckedContinuation<[ParleyAddress], any Error>] = []
        var listeners: [any Channel] = []
        var connections: [ObjectIdentifier: ParleyConnection] = [:]
        var shuttingDown = false
        var failed: (any Error)?
    }

    public init(configuration: Configuration = .defaults, router: ParleyRouter, logger: Logger = Logger(label: "parley.server"),
                group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) {
        self.configuration = configuration
        self.router = router
        self.logger = logger
        self.group = group
    }

    /// The addresses the server is listening on (port 0 resolved), once it is.
    public var listeningAddresses: [ParleyAddress] {
        get async throws {
            try await withCheckedThrowingContinuation { c in
                let ready = self.state.withLockedValue { s -> Result<[ParleyAddress], any Error>? in
                    if let bound = s.bound { return .success(bound) }
                    if let failed = s.failed { return .failure(failed) }
                    s.boundWaiters.append(c)
                    return nil
                }
                if let ready { c.resume(with: ready) }
            }
        }
    }

    /// Number of open connections.
    public var connectionCount: Int { self.state.withLockedValue { $0.connections.count } }

    public func run() async throws {
        var listeners: [NIOAsyncChannel<ParleyAsyncChannel, Never>] = []
        var bound: [ParleyAddress] = []
        do {
            for address in self.configuration.listen {
                let (listener, actual) = try await self.configuration.transport.listen(
                    on: address, group: self.group, initializer: { [self] channel in try self.makePipeline(channel) }
                )
                listeners.append(listener)
                bound.append(actual)
            }
        } catch {
            for l in listeners { try? await l.channel.close() }
            let waiters = self.state.withLockedValue { s in
                s.failed = error
                defer { s.boundWaiters = [] }
                return s.boundWaiters
            }
            let wrapped = ParleyError(code: .connectFailed, message: "cannot listen on \(self.configuration.listen.map(\.description)): \(error)", cause: error)
            waiters.forEach { $0.resume(throwing: wrapped) }
            throw wrapped
        }
        let waiters = self.state.withLockedValue { s in
            s.bound = bound
            s.listeners = listeners.map(\.channel)
            defer { s.boundWaiters = [] }
            return s.boundWaiters
        }
        waiters.forEach { $0.resume(returning: bound) }
        self.logger.info("listening", metadata: ["addresses": "\(bound.map(\.description))"])

        await withGracefulShutdownHandler {
            await withDiscardingTaskGroup { group in
                for listener in listeners {
                    group.addTask { await self.accept(on: listener) }
                }
                // Runs until shutdown even with no listener (in-process connections only).
                group.addTask { for await _ in self.stopped.stream {} }
            }
        } onGracefulShutdown: {
            self.shutDown()
        }
        self.logger.info("stopped")
    }

    /// Stops accepting connections and drains the open ones (what graceful shutdown does).
    public func shutDown() {
        let (listeners, connections) = self.state.withLockedValue { s in
            s.shuttingDown = true
            return (s.listeners, Array(s.connections.values))
        }
        self.logger.info("shutting down", metadata: ["connections": "\(connections.count)"])
        self.stopped.continuation.finish()
        for l in listeners { l.close(promise: nil) }
        for c in connections { Task { await c.drain() } }
    }

    /// Makes the server end of an in-process connection and serves it; returns the client end.
    func acceptInProcess(client: @escaping @Sendable (any Channel) throws -> ParleyAsyncChannel) async throws -> ParleyAsyncChannel {
        let stopped = self.state.withLockedValue { $0.shuttingDown }
        guard !stopped else { throw ParleyError(code: .shuttingDown, message: "server is shutting down") }
        let (clientEnd, serverEnd) = try await InProcessTransport.pair(group: self.group, client: client) { [self] channel in
            try self.makePipeline(channel)
        }
        self.connectionsAccepted.increment()
        Task { await self.serve(serverEnd) }
        return clientEnd
    }

    private func makePipeline(_ channel: any Channel) throws -> ParleyAsyncChannel {
        var ident = Parley_V1_ServerIdent()
        ident.nucleus = self.configuration.nucleus.wire
        ident.platform = ParleyBuild.platform
        ident.implementation = ParleyBuild.implementation
        ident.version = ParleyBuild.version
        ident.name = self.configuration.name
        ident.serverNonce = self.nonce
        let machine = ServerHandshakeStateMachine(configuration: .init(
            banner: Banner(supported: self.configuration.supportedFeatures, required: self.configuration.requiredFeatures),
            maxFrameSize: UInt32(self.configuration.maxFrameSize), authMethods: self.configuration.authMethods,
            ident: ident, minimumClientVersion: self.configuration.minimumClientVersion,
            clientAddress: ParleyPipeline.describe(channel.remoteAddress)
        ))
        return try ParleyPipeline.configure(channel, role: .server(machine), options: PipelineOptions(maxFrameSize: self.configuration.maxFrameSize))
    }

    private func accept(on listener: NIOAsyncChannel<ParleyAsyncChannel, Never>) async {
        do {
            try await listener.executeThenClose { inbound in
                try await withThrowingDiscardingTaskGroup { group in
                    for try await connection in inbound {
                        self.connectionsAccepted.increment()
                        group.addTask { await self.serve(connection) }
                    }
                }
            }
        } catch {
            self.logger.error("listener failed", metadata: ["error": "\(error)"])
        }
    }

    private func serve(_ channel: ParleyAsyncChannel) async {
        if self.configuration.limits.handlersOnEventLoop {
            await withTaskExecutorPreference(EventLoopTaskExecutor(channel.channel.eventLoop)) {
                await self.serveHere(channel)
            }
        } else {
            await self.serveHere(channel)
        }
    }

    private func serveHere(_ channel: ParleyAsyncChannel) async {
        let peer = ParleyPipeline.describe(channel.channel.remoteAddress)
        var logger = self.logger
        logger[metadataKey: "peer"] = "\(peer)"
        do {
            try await channel.executeThenClose { inbound, outbound in
                var iterator = inbound.makeAsyncIterator()
                guard case .established(let result)? = try await iterator.next() else {
                    logger.debug("connection closed during handshake")
                    return
                }
                let connection = ParleyConnection(
                    session: ParleySession(result: result, role: .server, peerAddress: peer), role: .server,
                    channel: channel, outbound: outbound, router: self.router, limits: self.configuration.limits, logger: logger
                )
                let key = ObjectIdentifier(connection)
                let draining = self.state.withLockedValue { s -> Bool in
                    s.connections[key] = connection
                    return s.shuttingDown
                }
                defer { self.state.withLockedValue { _ = $0.connections.removeValue(forKey: key) } }
                if draining { Task { await connection.drain() } }
                logger.debug("session established", metadata: [
                    "client": "\(result.clientIdent.implementation) \(result.clientIdent.version) \(result.clientIdent.platform)",
                    "features": "\(result.features)",
                ])
                let reason = await connection.runInbound(&iterator)
                if reason.code != .connectionClosed && reason.code != .shuttingDown && !reason.closedByPeer {
                    self.connectionErrors.increment()
                    logger.warning("connection closed on error", metadata: ["error": "\(reason)"])
                } else {
                    logger.debug("connection closed", metadata: ["reason": "\(reason)"])
                }
            }
        } catch let error as ParleyError where error.closedByPeer {
            logger.debug("peer closed the connection", metadata: ["reason": "\(error)"])
        } catch {
            self.connectionErrors.increment()
            logger.warning("connection closed on error", metadata: ["error": "\(error)"])
        }
    }
}
