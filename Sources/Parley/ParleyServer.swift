import Synchronization
import Foundation
import Logging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ParleyNIO
import ParleyWire
import ServiceLifecycle

#if canImport(Glibc)
import Glibc
#endif

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
        /// Connection modes allowed (`crc`, `secure` or both). `secure` needs method `secret`
        /// and its keyring; a server allowing only `secure` requires feature bit 8 in its
        /// banner, so that a client without secure mode is refused before anything is sent in
        /// the clear.
        public var modes: [ConnectionMode]
        /// The entities method `secret` accepts (and the capabilities of TLS certificates'
        /// entities); read again when the file changes.
        public var keyring: ParleyKeyringSource?
        /// Capabilities of clients no method identified (method `none`, server-only TLS).
        public var anonymousCapabilities: [String]
        /// Test hook: where secure-mode message counters start (0 on the wire).
        public var secureCounterStart: UInt64 = 0
        /// Lossless sessions (feature bit 9): how long a session whose connection broke is
        /// kept for the client to reconnect to; nil: no lossless sessions (bit 9 not offered).
        public var sessionRetention: Duration? = .seconds(30)
        /// How much a lossless session keeps for replay, per direction, before senders wait.
        public var replayBounds = SessionLedger.Bounds()
        /// At most this many sessions are kept waiting for their clients; beyond it the one
        /// detached the longest is forgotten (clients that vanish cannot pile up memory).
        public var maxDetachedSessions = 1024
        /// Each new connection's SERVER_IDENT lists the nucleus's redirects rotated by one
        /// more than the last one's: clients follow the first, so they are spread over the
        /// addresses in turn (a front door for several servers, §8.2).
        public var rotateRedirects = false
        /// Graceful shutdown waits this long for running handlers to finish and for each
        /// connection's CLOSE to be written; then it closes what is still open (a peer that
        /// stopped reading, a handler that never returns). nil: wait without limit.
        public var shutdownGracePeriod: Duration? = .seconds(30)
        /// Connections served at once; one more is closed as soon as it is accepted (a peer
        /// opening connections without end would otherwise take every file descriptor).
        public var maxConnections = ParleyServer.defaultMaxConnections
        /// The swift-metrics backend the connections record into (requests handled and
        /// failed, handler durations); nil: the one bootstrapped for the process
        /// (`MetricsSystem`). Set it to give one server a backend of its own beside others
        /// in the same process (as tests do).
        public var metricsFactory: (any MetricsFactory)? = nil

        public init(
            listen: [ParleyAddress] = [.tcp(host: "127.0.0.1", port: ParleyAddress.defaultPort)],
            supportedFeatures: ParleyFeatures = .implemented, requiredFeatures: ParleyFeatures = [],
            authMethods: [String] = ["none"], name: String = "parley", nucleus: ParleyNucleus = ParleyNucleus(),
            minimumClientVersion: String? = nil, maxFrameSize: Int = Frame.defaultMaxFrameSize,
            limits: ParleyConnectionLimits = .defaults, transport: any ParleyTransport = PosixTransport(),
            modes: [ConnectionMode] = [.crc], keyring: ParleyKeyringSource? = nil, anonymousCapabilities: [String] = ["*"]
        ) {
            self.modes = modes
            self.keyring = keyring
            self.anonymousCapabilities = anonymousCapabilities
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

        /// The banner's features: secure mode added when allowed, required when it is the only
        /// mode; lossless sessions when sessions are kept.
        var banner: Banner {
            var banner = Banner(supported: self.supportedFeatures, required: self.requiredFeatures, modes: self.modes)
            // Bit 9 goes with the machinery that honours it, never without.
            if self.sessionRetention != nil {
                banner.supported.insert(.reconnect)
            } else {
                banner.supported.remove(.reconnect)
                banner.required.remove(.reconnect)
            }
            return banner
        }

        /// Refuses contradictory security settings before the server starts.
        public func validateSecurity() throws(ParleyError) {
            try Frame.validateLimit(self.maxFrameSize)
            guard !self.modes.isEmpty else { throw ParleyError(code: .invalidArgument, message: "no connection mode allowed: give crc, secure or both") }
            for method in self.authMethods where !AuthMethod.all.contains(method) {
                throw ParleyError(code: .invalidArgument, message: "unknown authentication method \"\(method)\": use none, secret or tls")
            }
            if self.authMethods.contains(AuthMethod.secret), self.keyring == nil {
                throw ParleyError(code: .invalidArgument, message: "method secret needs a keyring (--keyring FILE)")
            }
            if self.modes.contains(.secure), !self.authMethods.contains(AuthMethod.secret) {
                throw ParleyError(code: .invalidArgument, message: "secure mode needs method secret: it derives its keys from the secret exchange")
            }
            if self.modes == [.secure], self.authMethods.contains(AuthMethod.none) {
                throw ParleyError(code: .invalidArgument, message: "method none cannot be used when only secure mode is allowed; drop it or allow crc")
            }
        }
    }

    public let configuration: Configuration
    let router: ParleyRouter
    let logger: Logger
    let group: any EventLoopGroup
    private let state = NIOLockedValueBox(State())
    /// The connections given a rotated redirect list so far (`rotateRedirects`).
    private let redirectTurn = NIOLockedValueBox(0)
    /// Random per server instance (SERVER_IDENT `server_nonce`), for future session reconnect.
    private let nonce = UInt64.random(in: 1...UInt64.max)
    private let connectionsAccepted = Counter(label: "parley_server_connections_total")
    private let connectionsRefused = Counter(label: "parley_server_connections_refused_total")

    /// Connections a server serves at once unless told otherwise: what the process's file
    /// descriptor limit leaves after 128 for everything else (at least 64, at most 65,536).
    public static let defaultMaxConnections: Int = {
        var limit = rlimit()
        guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 1024 }
        let soft = Int(clamping: limit.rlim_cur)  // RLIM_INFINITY is the largest value: clamped below
        return min(max(soft - 128, 64), 65_536)
    }()
    private let connectionErrors = Counter(label: "parley_server_connection_errors_total")
    /// The `global_id` of the next authenticated client.
    private let nextGlobalID = Atomic<UInt64>(0)

    private struct State {
        var bound: [ParleyAddress]?
        var boundWaiters: [CheckedContinuation<[ParleyAddress], any Error>] = []
        var listeners: [any Channel] = []
        /// Every open channel, established, in its handshake, or accepted and not yet given
        /// the Parley handlers (a WebSocket before its upgrade).
        var channels: [ObjectIdentifier: any Channel] = [:]
        /// Channels of `channels` not yet given the Parley handlers: nothing to drain, a
        /// graceful shutdown closes them at once.
        var unconfigured: Set<ObjectIdentifier> = []
        /// Connections closed at once for `maxConnections`, since the start.
        var refusedConnections = 0
        var connections: [ObjectIdentifier: ParleyConnection] = [:]
        /// Lossless sessions by token, attached or waiting for their client to reconnect.
        var sessions: [[UInt8]: (session: LosslessSession, connection: ParleyConnection, entity: String?)] = [:]
        /// Retention clocks of detached sessions; the generation tells a timer it is still the current one.
        var retentionTimers: [[UInt8]: (generation: UInt64, timer: Scheduled<Void>)] = [:]
        var nextTimerGeneration: UInt64 = 0
        /// Tokens of detached sessions, the longest detached first.
        var detachedOrder: [[UInt8]] = []

        /// The session is no longer waiting for its client (resumed, ended or expired).
        mutating func stopRetention(_ token: [UInt8]) {
            self.retentionTimers.removeValue(forKey: token)?.timer.cancel()
            self.detachedOrder.removeAll { $0 == token }
        }
        var shuttingDown = false
        /// Graceful shutdown's deadline, while it runs.
        var shutdownDeadline: Scheduled<Void>?
        var stoppedWaiters: [CheckedContinuation<Void, Never>] = []
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
    /// Number of open connections (sessions waiting for their client to reconnect have none).
    public var connectionCount: Int { self.state.withLockedValue { $0.connections.count - $0.retentionTimers.count } }

    public func run() async throws {
        var listeners: [any Channel] = []
        var bound: [ParleyAddress] = []
        do {
            // Every limit the pipeline takes (keepalive timing, handshake timeout), checked once here.
            _ = try self.configuration.limits.pipelineOptions(maxFrameSize: self.configuration.maxFrameSize)
            try self.configuration.validateSecurity()
            for address in self.configuration.listen {
                let (listener, actual) = try await self.configuration.transport.listen(
                    on: address, group: self.group, admit: { [self] channel in try self.admit(channel) },
                    initializer: { [self] channel in channel.eventLoop.makeCompletedFuture { try self.configurePipeline(channel) } }
                )
                listeners.append(listener)
                bound.append(actual)
            }
        } catch {
            for l in listeners { try? await l.close() }
            let waiters = self.state.withLockedValue { s in
                s.failed = error
                defer { s.boundWaiters = [] }
                return s.boundWaiters
            }
            let wrapped: ParleyError
            if let error = error as? ParleyError, error.code == .invalidArgument {
                wrapped = error  // a bad configuration, not a failure to listen
            } else {
                wrapped = ParleyError(code: .connectFailed, message: "cannot listen on \(self.configuration.listen.map(\.description)): \(error)", cause: error)
            }
            waiters.forEach { $0.resume(throwing: wrapped) }
            throw wrapped
        }
        let (waiters, stopping) = self.state.withLockedValue { s in
            s.bound = bound
            s.listeners = listeners
            defer { s.boundWaiters = [] }
            return (s.boundWaiters, s.shuttingDown)
        }
        waiters.forEach { $0.resume(returning: bound) }
        if stopping { for l in listeners { l.close(promise: nil) } }
        self.logger.info("listening", metadata: ["addresses": "\(bound.map(\.description))"])

        await withTaskCancellationHandler {
            await withGracefulShutdownHandler {
                await self.waitUntilStopped()
            } onGracefulShutdown: {
                self.shutDown()
            }
        } onCancel: {
            self.shutDown(abruptly: true)
        }
        for l in listeners { try? await l.closeFuture.get() }
        self.logger.info("stopped")
    }

    /// Stops accepting connections and drains the open ones (what graceful shutdown does).
    public func shutDown() {
        self.shutDown(abruptly: false)
    }

    private func shutDown(abruptly: Bool) {
        let (listeners, connections, channels, detached, unconfigured) = self.state.withLockedValue { s in
            s.shuttingDown = true
            let detached = s.sessions.values.filter { $0.session.isDetached }.map(\.connection)
            let unconfigured = s.unconfigured.compactMap { s.channels[$0] }
            return (s.listeners, Array(s.connections.values), Array(s.channels.values), detached, unconfigured)
        }
        // Sessions waiting for a reconnect have no connection to drain: they end now.
        for c in detached { c.finish(ParleyError(code: .shuttingDown, message: "server is shutting down")) }
        self.logger.info("shutting down", metadata: ["connections": "\(connections.count)"])
        for l in listeners { l.close(promise: nil) }
        if abruptly {
            for c in channels { c.close(promise: nil) }
        } else {
            for c in unconfigured { c.close(promise: nil) }
            for c in connections { Task { await c.drain() } }
            if let grace = self.configuration.shutdownGracePeriod, !channels.isEmpty {
                self.scheduleShutdownDeadline(after: grace)
            }
        }
        self.stopIfIdle()
    }

    /// The end of graceful shutdown's patience: connections still open are closed.
    private func scheduleShutdownDeadline(after grace: Duration) {
        let deadline = self.group.next().scheduleTask(in: .nanoseconds(grace.nanoseconds)) { [self] in
            let open = self.state.withLockedValue { s -> [any Channel] in
                s.shutdownDeadline = nil
                return Array(s.channels.values)
            }
            guard !open.isEmpty else { return }
            self.logger.warning(
                "graceful shutdown: closing connections still open after the grace period",
                metadata: ["connections": "\(open.count)", "grace": "\(grace)"]
            )
            for c in open { c.close(promise: nil) }
        }
        let previous = self.state.withLockedValue { s -> Scheduled<Void>? in
            defer { s.shutdownDeadline = deadline }
            return s.shutdownDeadline
        }
        previous?.cancel()
    }

    /// Returns once the server is shutting down and its last connection has closed.
    private func waitUntilStopped() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let stopped = self.state.withLockedValue { s -> Bool in
                if s.shuttingDown && s.channels.isEmpty { return true }
                s.stoppedWaiters.append(c)
                return false
            }
            if stopped { c.resume() }
        }
    }

    private func stopIfIdle() {
        let (waiters, deadline) = self.state.withLockedValue { s -> ([CheckedContinuation<Void, Never>], Scheduled<Void>?) in
            guard s.shuttingDown && s.channels.isEmpty else { return ([], nil) }
            defer { s.stoppedWaiters = []; s.shutdownDeadline = nil }
            return (s.stoppedWaiters, s.shutdownDeadline)
        }
        deadline?.cancel()
        waiters.forEach { $0.resume() }
    }

    /// Makes the server end of an in-process connection and serves it; returns the client end.
    func acceptInProcess(client: @escaping ParleyChannelInitializer) async throws -> any Channel {
        let stopped = self.state.withLockedValue { $0.shuttingDown }
        guard !stopped else { throw ParleyError(code: .shuttingDown, message: "server is shutting down") }
        let (clientEnd, _) = try await InProcessTransport.pair(group: self.group, client: client) { [self] channel in
            channel.eventLoop.makeCompletedFuture {
                try self.admit(channel)
                try self.configurePipeline(channel)
            }
        }
        return clientEnd
    }

    /// Takes on a just-accepted channel (before a WebSocket upgrade, if any), or refuses it:
    /// the server is shutting down, or has `maxConnections` already. Counted from here.
    private func admit(_ channel: any Channel) throws {
        let key = ObjectIdentifier(channel)
        let (stopping, refused) = self.state.withLockedValue { s -> (Bool, Int) in
            guard !s.shuttingDown else { return (true, 0) }
            guard s.channels.count < self.configuration.maxConnections else {
                s.refusedConnections += 1
                return (false, s.refusedConnections)
            }
            s.channels[key] = channel
            s.unconfigured.insert(key)
            return (false, 0)
        }
        guard !stopping else {
            throw ParleyError(code: .shuttingDown, message: "server is shutting down")
        }
        guard refused == 0 else {
            self.connectionsRefused.increment()
            // The first, then one in a thousand: a flood of connections is no flood of lines.
            if refused % 1000 == 1 {
                self.logger.warning("connection refused: \(self.configuration.maxConnections) connections already (\(refused) refused so far)", metadata: [
                    "peer": "\(channel.remoteAddress.map { "\($0)" } ?? "?")",
                ])
            }
            throw ParleyError(code: .connectionClosed, message: "server has \(self.configuration.maxConnections) connections already")
        }
        self.connectionsAccepted.increment()
        channel.closeFuture.whenComplete { _ in
            self.state.withLockedValue { s in
                s.channels.removeValue(forKey: key)
                s.unconfigured.remove(key)
            }
            self.stopIfIdle()
        }
    }

    private func configurePipeline(_ channel: any Channel) throws {
        let stopping = self.state.withLockedValue { s in
            s.unconfigured.remove(ObjectIdentifier(channel))
            return s.shuttingDown
        }
        // A WebSocket upgraded after the shutdown began: no new session.
        guard !stopping else { throw ParleyError(code: .shuttingDown, message: "server is shutting down") }
        var ident = Parley_V1_ServerIdent()
        ident.nucleus = self.configuration.nucleus.wire
        let redirects = ident.nucleus.redirects
        if self.configuration.rotateRedirects, redirects.count > 1 {
            let turn = self.redirectTurn.withLockedValue { turn -> Int in
                defer { turn &+= 1 }
                return turn
            }
            let k = turn % redirects.count
            ident.nucleus.redirects = Array(redirects[k...] + redirects[..<k])
        }
        ident.platform = ParleyBuild.platform
        ident.implementation = ParleyBuild.implementation
        ident.version = ParleyBuild.version
        ident.name = self.configuration.name
        ident.serverNonce = self.nonce
        let peer = ParleyPipeline.describe(channel.remoteAddress)
        let logger = { var l = self.logger; l[metadataKey: "peer"] = "\(peer)"; return l }()
        var secrets = SecretDirectory()
        if let source = self.configuration.keyring {
            let (directory, reloadError) = source.current()
            if let reloadError { logger.error("keyring changed but cannot be read; the previous one stays in force", metadata: ["error": "\(reloadError)"]) }
            secrets = directory
        }
        let machine = ServerHandshakeStateMachine(configuration: .init(
            banner: self.configuration.banner,
            maxFrameSize: UInt32(self.configuration.maxFrameSize), authMethods: self.configuration.authMethods,
            ident: ident, minimumClientVersion: self.configuration.minimumClientVersion,
            clientAddress: peer, modes: self.configuration.modes, secrets: secrets,
            now: Int64(Date().timeIntervalSince1970), randomness: self.configuration.authMethods.contains(AuthMethod.secret) ? .generate() : nil,
            globalID: self.nextGlobalID.wrappingAdd(1, ordering: .relaxed).newValue,
            anonymousCapabilities: self.configuration.anonymousCapabilities, sessionToken: Self.newSessionToken()
        ))
        let handler = ParleyConnectionHandler(role: .server(machine), eventLoop: channel.eventLoop) { [self] result, outlet in
            try self.established(result, channel: channel, outlet: outlet, peer: peer, logger: logger)
        }
        handler.resolveResume = { [self] request in self.resolveResume(request) }
        handler.secureCounterStart = self.configuration.secureCounterStart
        handler.established.whenFailure { error in
            self.logEnd(error as? ParleyError ?? ParleyError(code: .connectionClosed, message: "\(error)"), logger: logger, handshake: true)
        }
        let options = try self.configuration.limits.pipelineOptions(maxFrameSize: self.configuration.maxFrameSize)  // checked by run()
        try ParleyPipeline.configure(channel, options: options, handler: handler)
    }

    static func newSessionToken() -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        return (0..<SessionToken.size).map { _ in UInt8.random(in: 0...255, using: &generator) }
    }

    /// Number of lossless sessions kept (attached or waiting for a reconnect).
    public var sessionCount: Int { self.state.withLockedValue { $0.sessions.count } }

    /// A client's SESSION_RECONNECT (on the event loop of its new connection).
    private func resolveResume(_ request: SessionResumeRequest) -> ResumeDecision {
        guard request.serverNonce == self.nonce else {
            return .reset(reason: "the server restarted since the session began")
        }
        guard let known = self.state.withLockedValue({ $0.sessions[request.token] }) else {
            self.logger.debug("reconnect to an unknown session", metadata: [
                "token": "\(request.token.prefix(4).map { String($0, radix: 16) }.joined())", "sessions": "\(self.sessionCount)",
            ])
            return .reset(reason: "the server does not have this session (it expired, or was closed)")
        }
        guard known.entity == request.entity else {
            return .refuse(ParleyError(code: .permissionDenied, message: "the session belongs to another entity than \(request.entity ?? "anonymous")"))
        }
        do throws(ParleyError) {
            let (lastReceived, replaced) = try known.session.beginResume(connectSeq: request.connectSeq, peerLastReceived: request.lastReceivedSeq)
            // No longer waiting for its client: the retention clock stops.
            self.state.withLockedValue { s in
                s.stopRetention(request.token)
            }
            // The connection it replaces may still look alive to us (half-open): close it.
            replaced?.write(.close(ParleyError(code: .sessionSuperseded, message: "a newer connection of this session took over")))
            return .resume(lastReceivedSeq: lastReceived)
        } catch {
            // Ended as the reconnect arrived (its retention time ran out, or it was forgotten
            // for a newer one): gone, as if it had been removed a moment earlier.
            if known.session.isEnded {
                return .reset(reason: "the server does not have this session any more (\(error.message))")
            }
            return .refuse(error)
        }
    }

    /// The handshake completed (on the event loop): the connection is served from now on.
    private func established(_ result: HandshakeResult, channel: any Channel, outlet: ParleyConnectionHandler.Outlet,
                             peer: String, logger: Logger) throws -> EstablishedLink {
        if case .resumed(let token, let peerLastReceived, let connectSeq) = result.session {
            guard let known = self.state.withLockedValue({ $0.sessions[token] }) else {
                throw ParleyError(code: .sessionReset, message: "the session ended while it was being resumed")
            }
            let (link, replaced) = try known.session.attach(outlet, peerLastReceived: peerLastReceived, connectSeq: connectSeq)
            replaced?.write(.close(ParleyError(code: .sessionSuperseded, message: "a newer connection of this session took over")))
            known.connection.linkUp(outlet)
            logger.debug("session resumed", metadata: ["entity": "\(result.entity ?? "anonymous")"])
            return EstablishedLink(sink: ConnectionEventSink(known.connection), lossless: (known.session, link))
        }
        var lossless: LosslessSession?
        if case .started(let t) = result.session {
            lossless = LosslessSession(token: t, serverNonce: self.nonce, bounds: self.configuration.replayBounds)
        }
        let token = lossless?.token ?? []
        let retention = self.configuration.sessionRetention
        let connectionKey = NIOLockedValueBox<ObjectIdentifier?>(nil)
        let connection = ParleyConnection(
            session: ParleySession(result: result, role: .server, peerAddress: peer), role: .server,
            channel: channel, outlet: outlet, router: self.router, limits: self.configuration.limits, logger: logger,
            onClose: { reason in
                self.state.withLockedValue { s in
                    if let key = connectionKey.withLockedValue({ $0 }) { s.connections.removeValue(forKey: key) }
                    if !token.isEmpty {
                        s.sessions.removeValue(forKey: token)
                        s.stopRetention(token)
                    }
                }
                self.logEnd(reason, logger: logger, handshake: false)
            },
            lossless: lossless,
            onLinkLost: { [self] _ in
                guard let retention else { return }
                // Kept for the client to come back; forgotten after the retention time.
                let generation = self.state.withLockedValue { s in
                    s.nextTimerGeneration += 1
                    return s.nextTimerGeneration
                }
                let timer = channel.eventLoop.scheduleTask(in: .nanoseconds(retention.nanoseconds)) {
                    let reason = ParleyError(code: .connectionClosed, message: "the session expired: its client did not reconnect within \(retention)")
                    let expiring = self.state.withLockedValue { s -> (session: LosslessSession, connection: ParleyConnection)? in
                        guard s.retentionTimers[token]?.generation == generation else { return nil }
                        s.stopRetention(token)
                        return s.sessions[token].map { ($0.session, $0.connection) }
                    }
                    // Checked and ended in one step (outside the server's lock: it frees the
                    // replay ledger): a reconnect beginning now, on another event loop, either
                    // keeps the session or is told it is gone.
                    if let expiring, expiring.session.endIfDetached(reason) { expiring.connection.finish(reason) }
                }
                let forgotten = ParleyError(code: .connectionClosed, message: "forgotten: more than \(self.configuration.maxDetachedSessions) sessions were waiting for their clients")
                let evicted = self.state.withLockedValue { s -> [(session: LosslessSession, connection: ParleyConnection)] in
                    // A new connection may have resumed it already (on another event loop).
                    guard let known = s.sessions[token], known.session.isDetached else {
                        timer.cancel()
                        return []
                    }
                    s.stopRetention(token)
                    s.retentionTimers[token] = (generation, timer)
                    s.detachedOrder.append(token)
                    var evicted: [(session: LosslessSession, connection: ParleyConnection)] = []
                    while s.detachedOrder.count > self.configuration.maxDetachedSessions {
                        let oldest = s.detachedOrder.removeFirst()
                        s.retentionTimers.removeValue(forKey: oldest)?.timer.cancel()
                        if let old = s.sessions[oldest] { evicted.append((old.session, old.connection)) }
                    }
                    return evicted
                }
                for old in evicted where old.session.endIfDetached(forgotten) { old.connection.finish(forgotten) }
            },
            metricsFactory: self.configuration.metricsFactory
        )
        let key = ObjectIdentifier(connection)
        connectionKey.withLockedValue { $0 = key }
        var link: LosslessSession.LinkID?
        if let lossless {
            link = try lossless.attach(outlet, peerLastReceived: 0, connectSeq: 0).link
            logger.debug("session started", metadata: ["token": "\(token.prefix(4).map { String($0, radix: 16) }.joined())"])
        }
        let draining = self.state.withLockedValue { s -> Bool in
            s.connections[key] = connection
            if let lossless { s.sessions[token] = (lossless, connection, result.entity) }
            return s.shuttingDown
        }
        if draining { Task { await connection.drain() } }
        logger.debug("session established", metadata: [
            "client": "\(result.clientIdent.implementation) \(result.clientIdent.version) \(result.clientIdent.platform)",
            "features": "\(result.features)", "auth": "\(result.authMethod)", "mode": "\(result.connectionMode)",
            "entity": "\(result.entity ?? "anonymous")", "lossless": "\(lossless != nil)",
        ])
        return EstablishedLink(sink: ConnectionEventSink(connection), lossless: lossless.flatMap { l in link.map { (l, $0) } })
    }

    private func logEnd(_ reason: ParleyError, logger: Logger, handshake: Bool) {
        let securityFailure = [.authenticationFailed, .handshakeTampered, .badAuthTag, .permissionDenied].contains(reason.code)
        if !securityFailure, reason.code == .connectionClosed || reason.code == .shuttingDown || reason.closedByPeer {
            logger.debug(handshake ? "connection closed during handshake" : "connection closed", metadata: ["reason": "\(reason)"])
        } else {
            self.connectionErrors.increment()
            logger.warning("connection closed on error", metadata: ["error": "\(reason)"])
        }
    }
}
