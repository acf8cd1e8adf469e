import NIOCore
import NIOPosix
import ParleyWire


/// Options that shape every connection's pipeline.
public struct PipelineOptions: Sendable {
    public var maxFrameSize: Int
    /// Write the bytes read from the peer to this file (for `parley decode`).
    public var captureInbound: String?
    /// Write the bytes sent to the peer to this file.
    public var captureOutbound: String?

    /// When to send KEEPALIVE and give up on a silent peer; nil: never.
    public var keepalive: KeepaliveStateMachine.Configuration?

    /// Messages written while a read burst is handled leave when it ends, or after this many
    /// (0: only when it ends). See `ParleyConnectionLimits.flushEvery`.
    public var flushEvery: Int
    public static let defaultFlushEvery = 16

    /// A handshake not completed this long after the connection became active ends it
    /// (`timeout`, without CLOSE); nil: never.
    public var handshakeTimeout: TimeAmount?

    /// After a read burst of one message whose end flushed an answer or a next request, wait
    /// this long for the peer's next bytes without sleeping (`ReplyPolling`); zero: never.
    public var replyPolling: TimeAmount = .zero

    /// Server side: DIRECT requests in flight at which the connection stops reading until one
    /// is answered. See `ParleyConnectionLimits.maxDirectInFlight`.
    public var maxDirectInFlight = 1024

    public init(
        maxFrameSize: Int = Frame.defaultMaxFrameSize, captureInbound: String? = nil, captureOutbound: String? = nil,
        keepalive: KeepaliveStateMachine.Configuration? = nil, flushEvery: Int = PipelineOptions.defaultFlushEvery,
        handshakeTimeout: TimeAmount? = nil
    ) {
        self.handshakeTimeout = handshakeTimeout
        self.flushEvery = max(0, flushEvery)
        self.maxFrameSize = maxFrameSize
        self.keepalive = keepalive
        self.captureInbound = captureInbound
        self.captureOutbound = captureOutbound
    }
}

public enum ParleyPipeline {
    /// Adds the Parley handlers to a fresh channel: (capture) → `handler`, which decodes
    /// frames of at most `options.maxFrameSize` bytes.
    /// Must run on the channel's event loop (it does, inside bootstrap initializers).
    public static func configure(_ channel: any Channel, options: PipelineOptions, handler: ParleyConnectionHandler) throws {
        let sync = channel.pipeline.syncOperations
        if options.captureInbound != nil || options.captureOutbound != nil {
            try sync.addHandler(CaptureHandler(inboundPath: options.captureInbound, outboundPath: options.captureOutbound))
        }
        handler.maxFrameSize = options.maxFrameSize
        handler.keepaliveConfiguration = options.keepalive
        handler.flushEvery = options.flushEvery
        handler.handshakeTimeout = options.handshakeTimeout
        handler.replyPolling = options.replyPolling
        handler.maxDirectInFlight = options.maxDirectInFlight
        try sync.addHandler(handler)
    }

    /// The text form of a socket address, as sent in HELLO.
    public static func describe(_ address: SocketAddress?) -> String {
        guard let address else { return "unknown" }
        switch address {
        case .v4(let a): return "\(a.host):\(address.port ?? 0)"
        case .v6(let a): return "[\(a.host)]:\(address.port ?? 0)"
        case .unixDomainSocket: return "unix:" + (address.pathname ?? "")
        }
    }
}

/// Sets up a fresh channel's pipeline, on its event loop.
public typealias ParleyChannelInitializer = @Sendable (any Channel) -> EventLoopFuture<Void>

/// How channels for an address are made. `PosixTransport` makes every kind but the
/// in-process one.
public protocol ParleyTransport: Sendable {
    /// Connects and runs `initializer` on the new channel before it becomes active.
    func connect(to address: ParleyAddress, group: any EventLoopGroup, initializer: @escaping ParleyChannelInitializer) async throws -> any Channel

    /// Binds a listener whose accepted channels are set up by `initializer`; returns it and
    /// the address actually bound (port 0 resolved).
    func listen(
        on address: ParleyAddress, group: any EventLoopGroup, initializer: @escaping ParleyChannelInitializer
    ) async throws -> (listener: any Channel, bound: ParleyAddress)

    /// As `listen(on:group:initializer:)`, and calls `admit` on every accepted channel the
    /// moment it is accepted, before anything is read from it (a throw closes it). Where
    /// `initializer` runs only after a handshake of the transport's own (a WebSocket
    /// upgrade), this is how a server counts a connection from the start, and refuses one
    /// over its limit before it may hold a socket for the whole upgrade timeout. The default
    /// runs `admit` just before `initializer`, which is right for a transport that runs
    /// `initializer` at accept; a transport that wraps another should pass `admit` on.
    func listen(
        on address: ParleyAddress, group: any EventLoopGroup, admit: @escaping ParleyChannelAdmission,
        initializer: @escaping ParleyChannelInitializer
    ) async throws -> (listener: any Channel, bound: ParleyAddress)
}

/// Decides, on its event loop, whether a just-accepted channel may stay; throws to close it.
public typealias ParleyChannelAdmission = @Sendable (any Channel) throws -> Void

extension ParleyTransport {
    public func listen(
        on address: ParleyAddress, group: any EventLoopGroup, admit: @escaping ParleyChannelAdmission,
        initializer: @escaping ParleyChannelInitializer
    ) async throws -> (listener: any Channel, bound: ParleyAddress) {
        try await self.listen(on: address, group: group) { channel in
            channel.eventLoop.makeCompletedFuture { try admit(channel) }.flatMap { initializer(channel) }
        }
    }
}

/// TCP over IPv4 and IPv6, Unix domain sockets, TLS 1.3 over TCP (`tls://`), and WebSocket,
/// plain or inside TLS (`ws://`, `wss://`).
///
/// A TLS connect returns once the TLS handshake has completed, and a WebSocket connect once
/// the upgrade has: their failures are reported by `connect`, with the reason, rather than
/// as a connection that closes during Parley's handshake. For WebSocket, `initializer` runs
/// after the upgrade, on an active channel (the Parley handlers start their handshake when
/// they are added); for the others, before the channel becomes active.
public struct PosixTransport: ParleyTransport {
    public var connectTimeout: TimeAmount
    public var backlog: Int32
    /// Certificates and trust for `tls://` and `wss://` addresses; without it they are refused.
    public var tls: ParleyTLS?
    /// How long a TLS handshake or a WebSocket upgrade may take, on either side.
    public var handshakeTimeout: TimeAmount
    /// The largest WebSocket frame accepted from the peer (whole frames are buffered; Parley
    /// itself sends frames of at most 64 KiB).
    public var webSocketMaxFrameSize: Int
    /// Web origins (`Origin` header values such as `https://app.example.com`) whose pages may
    /// open a `ws://` or `wss://` connection; `*` allows any. An upgrade request without an
    /// `Origin` header (every client that is not a browser, Parley's own included) is always
    /// accepted; one with an origin not listed gets 403 (RFC 6455 10.2): a web page a user
    /// visits cannot reach a Parley server behind their firewall through their browser.
    public var webSocketAllowedOrigins: Set<String> = []

    /// - Parameters:
    ///   - tls: certificates and trust for `tls://` and `wss://` (`ParleyTLS.server(directory:)`,
    ///     `ParleyTLS.client(directory:name:)`); nil: those addresses are refused.
    public init(
        connectTimeout: TimeAmount = .seconds(10), backlog: Int32 = 256, tls: ParleyTLS? = nil,
        handshakeTimeout: TimeAmount = .seconds(10), webSocketMaxFrameSize: Int = Frame.defaultMaxFrameSize
    ) {
        self.connectTimeout = connectTimeout
        self.backlog = backlog
        self.tls = tls
        self.handshakeTimeout = handshakeTimeout
        self.webSocketMaxFrameSize = webSocketMaxFrameSize
    }

    private var webSocketOptions: WebSocketPipeline.Options {
        .init(maxFrameSize: self.webSocketMaxFrameSize, upgradeTimeout: self.handshakeTimeout, allowedOrigins: Set(self.webSocketAllowedOrigins.map(WebSocketPipeline.Options.normalized)))
    }

    private func requireTLS(_ address: ParleyAddress) throws(ParleyError) -> ParleyTLS {
        guard let tls = self.tls else {
            throw ParleyError(code: .invalidArgument, message: "\(address) needs TLS certificates, and none were given (PosixTransport(tls:), ParleyTLS.server(directory:) or .client(directory:name:))")
        }
        return tls
    }

    private func tcpClient(_ group: any EventLoopGroup) -> ClientBootstrap {
        ClientBootstrap(group: group).connectTimeout(self.connectTimeout).channelOption(.tcpOption(.tcp_nodelay), value: 1)
    }

    /// The send buffer of a Unix-socket connection (the kernel doubles it and caps it at
    /// `net.core.wmem_max`): with the default (208 KiB here) a 1 MiB frame goes out in
    /// five pieces, each a wait for the peer to read. TCP sizes its own buffers.
    static let unixSendBuffer = SocketOptionValue(4 << 20)

    /// Connects to `host`: an IP address literal straight away, a name through NIO's resolver
    /// (getaddrinfo on a Dispatch thread, then Happy Eyeballs). The resolver's two thread
    /// hops cost a connect about a tenth of its time on loopback, for nothing when the
    /// address is already one.
    private func connectTCP<Output: Sendable>(
        _ group: any EventLoopGroup, host: String, port: Int, initializer: @escaping @Sendable (any Channel) -> EventLoopFuture<Output>
    ) async throws -> Output {
        if let literal = try? SocketAddress(ipAddress: host, port: port) {
            return try await self.tcpClient(group).connect(to: literal, channelInitializer: initializer)
        }
        return try await self.tcpClient(group).connect(host: host, port: port, channelInitializer: initializer)
    }

    private func tcpServer(_ group: any EventLoopGroup) -> ServerBootstrap {
        ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: self.backlog)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelOption(.writeBufferWaterMark, value: Self.answerWaterMark)
    }

    /// Answers queued for a peer before a server connection decodes no more of its requests
    /// (high), and below which it decodes them again (low): `ParleyConnectionHandler` pauses
    /// while the channel is not writable. Eight 1 MiB answers fit.
    public static let answerWaterMark = ChannelOptions.Types.WriteBufferWaterMark(low: 2 << 20, high: 8 << 20)

    public func connect(to address: ParleyAddress, group: any EventLoopGroup, initializer: @escaping ParleyChannelInitializer) async throws -> any Channel {
        switch address.kind {
        case .tcp(let host, let port):
            return try await self.connectTCP(group, host: host, port: port) { channel in initializer(channel).map { channel } }
        case .unix(let path):
            return try await ClientBootstrap(group: group).connectTimeout(self.connectTimeout)
                .channelOption(.socketOption(.so_sndbuf), value: Self.unixSendBuffer)
                .channelInitializer(initializer)
                .connect(unixDomainSocketPath: path).get()
        case .tls(let host, let port):
            let tls = try self.requireTLS(address)
            let context = try tls.makeClientContext()
            let peer = ParleyAddress.tcp(host: host, port: port).description
            let timeout = self.handshakeTimeout
            let (channel, handshake) = try await self.connectTCP(group, host: host, port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try TLSPipeline.addClient(to: channel, context: context, host: host, peer: peer, tls: tls, timeout: timeout).completed!
                }.flatMap { handshake in initializer(channel).map { (channel, handshake) } }
            }
            try await Self.wait(for: handshake, channel: channel)
            return channel
        case .webSocket(let host, let port, let path, let useTLS):
            let tls = useTLS ? try self.requireTLS(address) : nil
            let context = try tls?.makeClientContext()
            let peer = ParleyAddress.tcp(host: host, port: port).description
            let (timeout, options) = (self.handshakeTimeout, self.webSocketOptions)
            let (channel, handshake, upgraded) = try await self.connectTCP(group, host: host, port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    let security = try tls.map { tls in
                        try TLSPipeline.addClient(to: channel, context: context!, host: host, peer: peer, tls: tls, timeout: timeout)
                    }
                    let upgraded = try WebSocketPipeline.configureClient(
                        channel, host: host, port: port, path: path, address: address.description, options: options,
                        security: security, initializer: initializer
                    )
                    return (channel, security?.completed, upgraded)
                }
            }
            if let handshake { try await Self.wait(for: handshake, channel: channel) }
            try await Self.wait(for: upgraded, channel: channel)
            return channel
        case .inProcess:
            throw ParleyError(code: .invalidArgument, message: "an in-process connection is made by the server (ParleyClient.connect(inProcessTo:)), not by address")
        }
    }

    /// Waits for a TLS handshake or a WebSocket upgrade; closes the channel if it fails.
    private static func wait<T: Sendable>(for future: EventLoopFuture<T>, channel: any Channel) async throws {
        do {
            _ = try await future.get()
        } catch {
            channel.close(promise: nil)
            throw error
        }
    }

    public func listen(
        on address: ParleyAddress, group: any EventLoopGroup, initializer: @escaping ParleyChannelInitializer
    ) async throws -> (listener: any Channel, bound: ParleyAddress) {
        try await self.listen(on: address, group: group, admit: { _ in }, initializer: initializer)
    }

    public func listen(
        on address: ParleyAddress, group: any EventLoopGroup, admit: @escaping ParleyChannelAdmission,
        initializer plain: @escaping ParleyChannelInitializer
    ) async throws -> (listener: any Channel, bound: ParleyAddress) {
        // Admitted first, before any handler is added: a refused channel costs no TLS or HTTP set-up.
        let initializer: ParleyChannelInitializer = { channel in
            channel.eventLoop.makeCompletedFuture { try admit(channel) }.flatMap { plain(channel) }
        }
        switch address.kind {
        case .tcp(let host, let port):
            let listener = try await self.tcpServer(group).childChannelInitializer(initializer).bind(host: host, port: port).get()
            return (listener, .tcp(host: host, port: listener.localAddress?.port ?? port))
        case .unix(let path):
            let bootstrap = ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: self.backlog)
                .childChannelOption(.writeBufferWaterMark, value: Self.answerWaterMark)
                .childChannelOption(.socketOption(.so_sndbuf), value: Self.unixSendBuffer)
                .childChannelInitializer(initializer)
            let listener = try await UnixListenerPath.bind(path) { try await bootstrap.bind(unixDomainSocketPath: path).get() }
            return (listener, address)
        case .tls(let host, let port):
            let tls = try self.requireTLS(address)
            let context = try tls.makeServerContext()
            let timeout = self.handshakeTimeout
            let listener = try await self.tcpServer(group)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try admit(channel)
                        _ = try TLSPipeline.addServer(to: channel, context: context, tls: tls, timeout: timeout)
                    }.flatMap { plain(channel) }
                }
                .bind(host: host, port: port).get()
            return (listener, .tls(host: host, port: listener.localAddress?.port ?? port))
        case .webSocket(let host, let port, let path, let useTLS):
            let tls = useTLS ? try self.requireTLS(address) : nil
            let context = try tls?.makeServerContext()
            let (timeout, options) = (self.handshakeTimeout, self.webSocketOptions)
            let listener = try await self.tcpServer(group)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        // Admitted at accept: `plain` runs only once the upgrade has completed.
                        try admit(channel)
                        let security = try tls.map { tls in try TLSPipeline.addServer(to: channel, context: context!, tls: tls, timeout: timeout) }
                        try WebSocketPipeline.configureServer(channel, path: path, options: options, security: security, initializer: plain)
                    }
                }
                .bind(host: host, port: port).get()
            return (listener, .webSocket(host: host, port: listener.localAddress?.port ?? port, path: path, tls: useTLS))
        case .inProcess:
            throw ParleyError(code: .invalidArgument, message: "a server does not listen in-process; in-process clients are made with ParleyClient.connect(inProcessTo:)")
        }
    }
}

/// Two connected ends in one process, with no listener, no address and no socket: the bytes
/// go from one `InMemoryChannel` to the other without leaving memory. For tests and for
/// embedding a server and its client in one program.
public enum InProcessTransport {
    public static func pair(
        group: any EventLoopGroup, client: @escaping ParleyChannelInitializer, server: @escaping ParleyChannelInitializer
    ) async throws -> (client: any Channel, server: any Channel) {
        let (clientEnd, serverEnd) = InMemoryChannel.pair(group: group)
        do {
            try await serverEnd.eventLoop.flatSubmit { server(serverEnd) }.get()
            try await clientEnd.eventLoop.flatSubmit { client(clientEnd) }.get()
        } catch {
            clientEnd.close(promise: nil)
            serverEnd.close(promise: nil)
            throw error
        }
        try await serverEnd.activate().get()
        try await clientEnd.activate().get()
        return (clientEnd, serverEnd)
    }
}
