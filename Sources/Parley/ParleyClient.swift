import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ParleyNIO
import ParleyWire
import SwiftProtobuf
import Synchronization

/// A connection to a Parley server that obeys the nucleus: it surfaces the server's
/// messages, waits out request delays before each new request, and follows redirects.
public final class ParleyClient: Sendable {
    public struct Configuration: Sendable {
        public var supportedFeatures: ParleyFeatures
        public var requiredFeatures: ParleyFeatures
        public var authMethods: [String]
        public var platform: String
        public var implementation: String
        public var version: String
        public var name: String
        public var maxFrameSize: Int
        public var limits: ParleyConnectionLimits
        /// Follow redirects in SERVER_IDENT, up to this many hops (0: never follow).
        public var maxRedirects: Int
        public var transport: any ParleyTransport
        /// Record the raw bytes of the connection (for `parley decode`).
        public var captureInbound: String?
        public var captureOutbound: String?
        /// The entity and key of method `secret`.
        public var secret: SecretCredentials?
        /// Connection modes accepted, most preferred first. Without `crc` the client requires
        /// secure mode (and feature bit 8 in its banner).
        public var modes: [ConnectionMode]
        /// Test hook: where secure-mode message counters start (0 on the wire).
        public var secureCounterStart: UInt64 = 0
        /// Ask for a lossless session (feature bit 9): messages survive broken connections,
        /// the client reconnects by itself. Nil (the default): a lossy connection.
        public var lossless: LosslessOptions?

        public init(
            supportedFeatures: ParleyFeatures = .implemented, requiredFeatures: ParleyFeatures = [],
            authMethods: [String]? = nil, platform: String = ParleyBuild.platform,
            implementation: String = ParleyBuild.implementation, version: String = ParleyBuild.version,
            name: String = "", maxFrameSize: Int = Frame.defaultMaxFrameSize, limits: ParleyConnectionLimits = .defaults,
            maxRedirects: Int = 4, transport: any ParleyTransport = PosixTransport(),
            captureInbound: String? = nil, captureOutbound: String? = nil,
            secret: SecretCredentials? = nil, modes: [ConnectionMode]? = nil
        ) {
            self.secret = secret
            // With a key, prefer secure mode and fall back to crc; without one, crc.
            self.modes = modes ?? (secret == nil ? [.crc] : [.secure, .crc])
            self.supportedFeatures = supportedFeatures
            self.requiredFeatures = requiredFeatures
            // With a key, method secret only: a client that holds a key never falls back to
            // an unauthenticated method a man in the middle could push it to.
            self.authMethods = authMethods ?? (secret == nil ? [AuthMethod.none] : [AuthMethod.secret])
            self.platform = platform
            self.implementation = implementation
            self.version = version
            self.name = name
            self.maxFrameSize = maxFrameSize
            self.limits = limits
            self.maxRedirects = maxRedirects
            self.transport = transport
            self.captureInbound = captureInbound
            self.captureOutbound = captureOutbound
        }

        public static var defaults: Configuration { Configuration() }

        /// The banner's features: secure mode added when accepted, required when it is the
        /// only mode; lossless sessions when asked for.
        var banner: Banner {
            var banner = Banner(supported: self.supportedFeatures, required: self.requiredFeatures, modes: self.modes)
            // Bit 9 goes with the machinery that honours it, never without.
            if self.lossless != nil {
                banner.supported.insert(.reconnect)
            } else {
                banner.supported.remove(.reconnect)
                banner.required.remove(.reconnect)
            }
            return banner
        }
    }

    /// How a lossless session behaves (docs/protocol.md 5.2).
    public struct LosslessOptions: Sendable {
        /// How much is kept for replay before senders wait.
        public var replayBounds: SessionLedger.Bounds
        /// The first reconnect attempt is immediate; then the delay doubles from this one...
        public var backoffBase: Duration
        /// ...up to this one, each delay drawn at random between its half and itself (jitter).
        public var backoffMax: Duration
        /// Give up reconnecting this long after the link broke (an attempt still connecting
        /// then is abandoned): the connection ends with the last error.
        public var reconnectTimeout: Duration
        /// Test hook: each reconnect dials this many connections at once (a connection race).
        public var raceAttempts: Int = 1

        public init(
            replayBounds: SessionLedger.Bounds = SessionLedger.Bounds(), backoffBase: Duration = .milliseconds(10),
            backoffMax: Duration = .seconds(2), reconnectTimeout: Duration = .seconds(60)
        ) {
            self.replayBounds = replayBounds
            self.backoffBase = backoffBase
            self.backoffMax = backoffMax
            self.reconnectTimeout = reconnectTimeout
        }
    }

    public let connection: ParleyConnection
    /// The address this client ended up connected to.
    public let address: ParleyAddress
    /// Addresses that redirected this client here, in order.
    public let redirectedFrom: [ParleyAddress]
    private let nucleusState: Nucleus
    private let logger: Logger

    struct NucleusState {
        var messages: [ParleyServerMessage] = []
        var notBefore: ContinuousClock.Instant?
        var redirects: [String] = []
    }

    /// What the server's nucleus asked of this client, and whether a request delay may still
    /// be running: a call looks at the flag only (no lock, no clock) once the delay is over.
    final class Nucleus: Sendable {
        let box = NIOLockedValueBox(NucleusState())
        /// Set with `notBefore`, cleared (under the lock) once it has passed.
        let delayPending = Atomic<Bool>(false)

        func withLockedValue<T>(_ body: (inout NucleusState) throws -> T) rethrows -> T {
            try self.box.withLockedValue(body)
        }
    }

    public var session: ParleySession { self.connection.session }

    /// The messages the server has sent (SERVER_IDENT and later notices), oldest first: the
    /// last `maximumKeptServerMessages` of them.
    public var serverMessages: [ParleyServerMessage] { self.nucleusState.withLockedValue { $0.messages } }
    /// The latest redirect list from the server (empty: none).
    public var redirects: [String] { self.nucleusState.withLockedValue { $0.redirects } }
    /// When the next request may be sent, if the server asked for a delay.
    public var requestAllowedAt: ContinuousClock.Instant? { self.nucleusState.withLockedValue { $0.notBefore } }

    private init(connection: ParleyConnection, address: ParleyAddress, redirectedFrom: [ParleyAddress],
                 nucleus: Nucleus, logger: Logger) {
        self.connection = connection
        self.address = address
        self.redirectedFrom = redirectedFrom
        self.nucleusState = nucleus
        self.logger = logger
    }

    /// Connects, runs the handshake and follows redirects.
    ///
    /// - Parameters:
    ///   - address: the server to connect to.
    ///   - configuration: features, identity, limits, transport.
    ///   - router: handlers for requests the server sends to this client.
    /// - Throws: `ParleyError` (`connectFailed`, `missingFeatures`, `clientOutOfDate`, ...).
    public static func connect(
        to address: ParleyAddress, configuration: Configuration = .defaults, router: ParleyRouter = ParleyRouter(),
        logger: Logger = Logger(label: "parley.client"), group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    ) async throws -> ParleyClient {
        let client = try await self.connectOnce(to: address, redirectedFrom: [], configuration: configuration, router: router, logger: logger, group: group).client
        return try await self.followRedirects(of: client, configuration: configuration, router: router, logger: logger, group: group)
    }

    /// Connects and makes a first call, sent with the handshake when it can be: in secure
    /// mode the request follows CLIENT_IDENT at once, sealed, and its answer comes right
    /// after SERVER_IDENT, a round trip sooner than `connect` then `call` (docs/protocol.md,
    /// R-6.1-6); with method `none` (or `tls`) in crc mode it goes in the first flight, and
    /// its answer comes one round trip after connecting (R-6.1-5), if it needs no feature
    /// and fits 64 KiB. Otherwise (method `secret` in crc mode, a lossless session, a data
    /// segment or a larger request in the first flight) it is an ordinary call made once
    /// connected (after any redirects and request delay).
    ///
    /// A request sent with the handshake goes before the server's request delay is known,
    /// and to the server that answered the handshake. If that server's SERVER_IDENT
    /// redirects, its answer is awaited there: a reply is returned with the client connected
    /// to where the redirects lead; an ERROR saying nothing of it ran there
    /// (`unknownMessageType`, `permissionDenied`: a server that only redirects) makes it an
    /// ordinary call where the redirects lead; any other ERROR is thrown. If the server
    /// refuses the client (its proof, or SERVER_IDENT with a refusal) the request did not run.
    ///
    /// - Returns: the connected client and the first call's reply.
    /// - Throws: what `connect` and `call` throw; when the call fails, the connection is
    ///   closed before the error is thrown. A request sent with the handshake may have run
    ///   when the error is one of the connection (it broke after the server sent
    ///   SERVER_IDENT, following a redirect failed after the first server answered, or the
    ///   client refused a crc-mode AUTH_DONE or SERVER_IDENT the server sent after running
    ///   it): retry only an idempotent request blindly.
    public static func connect<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message & Sendable>(
        to address: ParleyAddress, configuration: Configuration = .defaults, router: ParleyRouter = ParleyRouter(),
        logger: Logger = Logger(label: "parley.client"), group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        firstCall request: Request, data: ByteBuffer? = nil, as response: Response.Type = Response.self
    ) async throws -> (client: ParleyClient, reply: ParleyReply<Response>) {
        var early: WireMessage?
        if configuration.lossless == nil {
            early = WireMessage(
                header: MessageHeader(id: 1, kind: .request, type: Request.protoMessageName),
                payload: request.parleyPayload(allocator: ByteBufferAllocator()), data: data
            )
        }
        let connected = try await self.connectOnce(to: address, redirectedFrom: [], configuration: configuration, router: router, logger: logger, group: group, early: early)
        if let answer = connected.earlyAnswer {
            let outcome: Result<ParleyReply<Response>, any Error>
            do {
                outcome = .success(try ParleyConnection.decodeAnswer(try await answer.get(), as: Response.self))
            } catch {
                outcome = .failure(error)
            }
            let redirected = !connected.client.session.nucleus.redirects.isEmpty && configuration.maxRedirects > 0
            switch outcome {
            case .success(let reply):
                do {
                    return (try await self.followRedirects(of: connected.client, configuration: configuration, router: router, logger: logger, group: group), reply)
                } catch let error as ParleyError {
                    throw ParleyError(
                        code: error.code, message: "the first call ran on \(address), but following its redirect failed: \(error.message)", cause: error
                    )
                }
            case .failure(let error as ParleyError) where redirected && [.unknownMessageType, .permissionDenied].contains(error.code):
                // Nothing of it ran on the server that redirects: the call goes where the
                // redirects lead, as in crc mode.
                logger.debug("first call not run by a redirecting server", metadata: ["server": "\(address)", "error": "\(error)"])
            case .failure(let error):
                connected.client.close()
                throw error
            }
        }
        let client = try await self.followRedirects(of: connected.client, configuration: configuration, router: router, logger: logger, group: group)
        do {
            return (client, try await client.call(request, data: data, as: Response.self))
        } catch {
            client.close()
            throw error
        }
    }

    /// Follows the redirects of `client`'s SERVER_IDENT (docs/protocol.md 8.2), closing each
    /// server it leaves; returns the client connected to where they lead.
    private static func followRedirects(
        of first: ParleyClient, configuration: Configuration, router: ParleyRouter, logger: Logger, group: any EventLoopGroup
    ) async throws -> ParleyClient {
        var client = first
        var target = first.address
        var visited: [ParleyAddress] = []
        while true {
            let redirects = client.session.nucleus.redirects
            guard !redirects.isEmpty, configuration.maxRedirects > 0 else { return client }
            client.close()
            visited.append(target)
            guard visited.count <= configuration.maxRedirects else {
                throw ParleyError(code: .redirectLoop, message: "more than \(configuration.maxRedirects) redirects: \(visited.map(\.description))")
            }
            let next = try ParleyAddress(parsing: redirects[0])
            guard !visited.contains(next) else {
                throw ParleyError(code: .redirectLoop, message: "redirect loop: \(visited.map(\.description)) -> \(next)")
            }
            logger.info("following redirect", metadata: ["from": "\(target)", "to": "\(next)"])
            target = next
            client = try await self.connectOnce(to: target, redirectedFrom: visited, configuration: configuration, router: router, logger: logger, group: group).client
        }
    }

    /// Connects to a server in the same process, with no listener and no address: the
    /// in-memory transport (`InMemoryChannel`: no socket, the bytes never leave the process). The server must be running.
    public static func connect(
        inProcessTo server: ParleyServer, configuration: Configuration = .defaults, router: ParleyRouter = ParleyRouter(),
        logger: Logger = Logger(label: "parley.client")
    ) async throws -> ParleyClient {
        // An in-process connection cannot be dialled again: it is always lossy.
        var configuration = configuration
        configuration.lossless = nil
        return try await self.connectOnce(to: ParleyAddress(kind: .inProcess), redirectedFrom: [], configuration: configuration, router: router, logger: logger, group: server.group) {
            try await server.acceptInProcess(client: $0)
        }.client
    }

    static func handshake(_ configuration: Configuration, address: ParleyAddress, ident: Parley_V1_ClientIdent, resume: SessionResumeOffer?) -> ClientHandshakeStateMachine {
        var machineConfiguration = ClientHandshakeStateMachine.Configuration(
            banner: configuration.banner,
            maxFrameSize: UInt32(configuration.maxFrameSize), authMethods: configuration.authMethods, ident: ident,
            serverAddress: address.description, secret: configuration.secret, modes: configuration.modes,
            randomness: configuration.authMethods.contains(AuthMethod.secret) ? .generate() : nil
        )
        machineConfiguration.resume = resume
        // One method without further rounds, crc mode: CLIENT_IDENT goes in the first flight.
        machineConfiguration.identInFirstFlight = true
        return ClientHandshakeStateMachine(configuration: machineConfiguration)
    }

    private static func connectOnce(
        to address: ParleyAddress, redirectedFrom: [ParleyAddress], configuration: Configuration, router: ParleyRouter,
        logger: Logger, group: any EventLoopGroup, early: WireMessage? = nil,
        open: ((@escaping ParleyChannelInitializer) async throws -> any Channel)? = nil
    ) async throws -> (client: ParleyClient, earlyAnswer: EventLoopFuture<WireMessage>?) {
        try Frame.validateLimit(configuration.maxFrameSize)
        var ident = Parley_V1_ClientIdent()
        ident.platform = configuration.platform
        ident.implementation = configuration.implementation
        ident.version = configuration.version
        ident.name = configuration.name
        ident.clientNonce = UInt64.random(in: 1...UInt64.max)
        let machine = Self.handshake(configuration, address: address, ident: ident, resume: nil)
        let clientIdent = ident
        let options = try configuration.limits.pipelineOptions(
            maxFrameSize: configuration.maxFrameSize, captureInbound: configuration.captureInbound, captureOutbound: configuration.captureOutbound
        )
        let nucleus = Nucleus()
        // By channel: a transport may run the initializer on several channels, of which it
        // returns one (NIO's Happy Eyeballs, for a host name with several addresses, sets up a
        // channel per attempt and closes the losers).
        let established = ChannelKeyed<EventLoopPromise<ParleyConnection>>()
        let reconnector = Reconnector()
        // The answer to `early`, when the handshake sent it (R-6.1-5, R-6.1-6).
        let earlyAnswer = NIOLockedValueBox<EventLoopFuture<WireMessage>?>(nil)
        let initializer: ParleyChannelInitializer = { channel in
            channel.eventLoop.makeCompletedFuture {
                let promise = channel.eventLoop.makePromise(of: ParleyConnection.self)
                let handler = ParleyConnectionHandler(role: .client(machine), eventLoop: channel.eventLoop) { result, outlet in
                    var lossless: LosslessSession?
                    if case .started(let token) = result.session, let options = configuration.lossless {
                        lossless = LosslessSession(token: token, serverNonce: result.serverIdent.serverNonce, bounds: options.replayBounds)
                    }
                    var sentEarly: ParleyConnection.SentEarly?
                    if let early, result.earlyMessagesSent > 0 {
                        let answer = channel.eventLoop.makePromise(of: WireMessage.self)
                        sentEarly = ParleyConnection.SentEarly(id: early.header.id) { answer.completeWith($0) }
                        earlyAnswer.withLockedValue { $0 = answer.futureResult }
                    }
                    let connection = ParleyConnection(
                        session: ParleySession(result: result, role: .client, peerAddress: address.description), role: .client,
                        channel: channel, outlet: outlet, router: router, limits: configuration.limits, logger: logger,
                        onNotice: { n in Self.apply(n, to: nucleus, logger: logger) },
                        // The reconnector holds the connection: it lets go when the connection ends.
                        onClose: { _ in reconnector.stop() },
                        lossless: lossless,
                        onLinkLost: { _ in reconnector.linkLost() },
                        sentEarly: sentEarly
                    )
                    Self.apply(connection.session.nucleus, to: nucleus, logger: logger)
                    var link: LosslessSession.LinkID?
                    if let lossless {
                        link = try lossless.attach(outlet, peerLastReceived: 0, connectSeq: 0).link
                        reconnector.start(Reconnector.Context(
                            connection: connection, session: lossless, address: address, configuration: configuration,
                            ident: clientIdent, nucleus: nucleus, logger: logger
                        ))
                    }
                    promise.succeed(connection)
                    return EstablishedLink(sink: ConnectionEventSink(connection), lossless: lossless.flatMap { l in link.map { (l, $0) } })
                }
                handler.secureCounterStart = configuration.secureCounterStart
                if let early { handler.earlyMessages = [early] }
                handler.established.whenFailure { promise.fail($0) }
                established.set(promise, for: channel)
                try ParleyPipeline.configure(channel, options: options, handler: handler)
            }
        }
        let channel: any Channel
        do {
            if let open {
                channel = try await open(initializer)
            } else {
                channel = try await configuration.transport.connect(to: address, group: group, initializer: initializer)
            }
        } catch {
            throw ParleyError(code: .connectFailed, message: "cannot connect to \(address): \(ConnectFailure.describe(error))", cause: error)
        }
        guard let promise = established.value(for: channel) else {
            channel.close(promise: nil)
            throw ParleyError(code: .connectFailed, message: "cannot connect to \(address): the transport did not set up the channel")
        }
        let connection: ParleyConnection
        do {
            connection = try await promise.futureResult.get()
        } catch let error as ParleyError where error.code == .connectionClosed && error.cause == nil && !error.closedByPeer {
            throw ParleyError(code: .connectionClosed, message: "\(address) closed the connection during the handshake")
        }
        let client = ParleyClient(connection: connection, address: address, redirectedFrom: redirectedFrom, nucleus: nucleus, logger: logger)
        return (client, earlyAnswer.withLockedValue { $0 })
    }

    /// The longest request delay a client waits (docs/protocol.md 8.2): a larger one, or an
    /// infinite one, counts as this; one that is not a number counts as none.
    public static let maximumRequestDelay: Double = 86_400

    /// Server messages a client keeps (`serverMessages`): a server that sends notices without
    /// end cannot grow a client's memory without end.
    public static let maximumKeptServerMessages = 1000

    /// Bytes of a server message's text kept (and logged); past it the text is cut, so that
    /// the kept messages stay within 1,000 × 4 KiB however long the server's are.
    public static let maximumServerMessageBytes = 4096

    /// Takes in a nucleus the server sent: SERVER_IDENT's (of every connection of the
    /// client, resumed ones included) or a NOTICE's.
    static func apply(_ n: ParleyNucleus, to state: Nucleus, logger: Logger) {
        let messages = n.messages.map { m -> ParleyServerMessage in
            guard m.text.utf8.count > Self.maximumServerMessageBytes else { return m }
            let cut = String(decoding: m.text.utf8.prefix(Self.maximumServerMessageBytes), as: UTF8.self)
            return ParleyServerMessage(priority: m.priority, text: cut + " [cut: \(m.text.utf8.count) bytes]")
        }
        for m in messages {
            logger.log(level: m.priority == .high ? .warning : .info, "server message: \(m.text)")
        }
        state.withLockedValue { s in
            s.messages.append(contentsOf: messages)
            if s.messages.count > Self.maximumKeptServerMessages {
                s.messages.removeFirst(s.messages.count - Self.maximumKeptServerMessages)
            }
            if n.requestDelay > 0 {
                // Capped before the conversion: a server's 1e300 or infinity must not trap here.
                let delay = min(n.requestDelay, Self.maximumRequestDelay)
                s.notBefore = ContinuousClock.now.advanced(by: .milliseconds(Int64(delay * 1000)))
                state.delayPending.store(true, ordering: .releasing)
            }
            if !n.redirects.isEmpty { s.redirects = n.redirects }
        }
    }

    /// Waits until the server's request delay (if any) has passed.
    /// - Throws: the connection's error if it ends meanwhile (nothing is sent on it any more).
    public func waitForRequestDelay() async throws {
        // A NOTICE may replace the deadline while we wait (docs/protocol.md 8.2), shorter or
        // longer: wait in slices of at most 10 ms and look at the deadline again after each.
        while self.nucleusState.delayPending.load(ordering: .acquiring) {
            // A server that asks for a day and closes (or a client closed meanwhile) does not
            // hold the call for the rest of the day: it fails now, as it would after the wait.
            if let ended = self.connection.endReason { throw ended }
            let wait = self.nucleusState.withLockedValue { s -> ContinuousClock.Instant? in
                let now = ContinuousClock.now
                guard let notBefore = s.notBefore, notBefore > now else {
                    // Over: later calls need not look again until a NOTICE sets a new delay.
                    self.nucleusState.delayPending.store(false, ordering: .releasing)
                    return nil
                }
                return min(notBefore, now.advanced(by: .milliseconds(10)))
            }
            guard let wait else { return }
            try await Task.sleep(until: wait, clock: .continuous)
        }
    }

    /// Sends a request (after any request delay) and returns the response and its data.
    /// `timeout` (if any) counts from when the request is sent; see `ParleyConnection.call`.
    public func call<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message & Sendable>(
        _ request: Request, data: ByteBuffer? = nil, as response: Response.Type = Response.self, timeout: Duration? = nil,
        idempotent: Bool = false
    ) async throws -> ParleyReply<Response> {
        try await self.waitForRequestDelay()
        return try await self.connection.call(request, data: data, as: response, timeout: timeout, idempotent: idempotent)
    }

    /// Sends a request (after any request delay); `completion` runs once with its answer,
    /// without a task per request unless a delay may still be running (see the same method
    /// of `ParleyConnection`).
    public func call<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message & Sendable>(
        _ request: Request, data: ByteBuffer? = nil, as response: Response.Type = Response.self, idempotent: Bool = false,
        completion: @escaping @Sendable (Result<ParleyReply<Response>, any Error>) -> Void
    ) {
        guard !self.nucleusState.delayPending.load(ordering: .acquiring) else {
            Task {
                do {
                    try await self.waitForRequestDelay()
                } catch {
                    return completion(.failure(error))
                }
                self.connection.call(request, data: data, as: response, idempotent: idempotent, completion: completion)
            }
            return
        }
        self.connection.call(request, data: data, as: response, idempotent: idempotent, completion: completion)
    }

    /// Sends a request (after any request delay) and returns the response.
    /// `idempotent`: see `ParleyConnection.call`.
    public func request<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message & Sendable>(
        _ request: Request, as response: Response.Type = Response.self, timeout: Duration? = nil, idempotent: Bool = false
    ) async throws -> Response {
        try await self.call(request, as: response, timeout: timeout, idempotent: idempotent).message
    }

    /// Sends a streamed request (after any request delay).
    public func stream<Request: SwiftProtobuf.Message, Item: SwiftProtobuf.Message & Sendable, Final: SwiftProtobuf.Message & Sendable>(
        _ request: Request, data: ByteBuffer? = nil, item: Item.Type, final: Final.Type
    ) async throws -> ParleyResponseStream<Item, Final> {
        try await self.waitForRequestDelay()
        return try await self.connection.stream(request, data: data, item: item, final: final)
    }

    /// Sends a one-way message.
    public func send<Message: SwiftProtobuf.Message>(_ message: Message, data: ByteBuffer? = nil) async throws {
        try await self.connection.send(message, data: data)
    }

    /// Closes the connection.
    public func close() {
        self.connection.close()
    }

    /// Waits until the connection has ended (closed by either side).
    public func closed() async {
        await self.connection.closed()
    }
}

/// Values set up for channels, one per channel, found again by the channel a transport
/// returned. A transport that set up exactly one channel but returned another object for it
/// (a wrapper) gets that one's value.
final class ChannelKeyed<Value: Sendable>: Sendable {
    private let values = NIOLockedValueBox<[ObjectIdentifier: Value]>([:])

    func set(_ value: Value, for channel: any Channel) {
        self.values.withLockedValue { $0[ObjectIdentifier(channel)] = value }
    }

    func value(for channel: any Channel) -> Value? {
        self.values.withLockedValue { values in
            values[ObjectIdentifier(channel)] ?? (values.count == 1 ? values.first?.value : nil)
        }
    }
}
