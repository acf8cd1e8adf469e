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

    public init(
        maxFrameSize: Int = Frame.defaultMaxFrameSize, captureInbound: String? = nil, captureOutbound: String? = nil,
        keepalive: KeepaliveStateMachine.Configuration? = nil
    ) {
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

/// How channels for an address are made. TCP and Unix sockets come with Parley; TLS and
/// WebSocket transports will be further conformances.
public protocol ParleyTransport: Sendable {
    /// Connects and runs `initializer` on the new channel before it becomes active.
    func connect(to address: ParleyAddress, group: any EventLoopGroup, initializer: @escaping ParleyChannelInitializer) async throws -> any Channel

    /// Binds a listener whose accepted channels are set up by `initializer`; returns it and
    /// the address actually bound (port 0 resolved).
    func listen(
        on address: ParleyAddress, group: any EventLoopGroup, initializer: @escaping ParleyChannelInitializer
    ) async throws -> (listener: any Channel, bound: ParleyAddress)
}

/// TCP over IPv4 and IPv6, and Unix domain sockets.
public struct PosixTransport: ParleyTransport {
    public var connectTimeout: TimeAmount
    public var backlog: Int32

    public init(connectTimeout: TimeAmount = .seconds(10), backlog: Int32 = 256) {
        self.connectTimeout = connectTimeout
        self.backlog = backlog
    }

    public func connect(to address: ParleyAddress, group: any EventLoopGroup, initializer: @escaping ParleyChannelInitializer) async throws -> any Channel {
        switch address.kind {
        case .tcp(let host, let port):
            return try await ClientBootstrap(group: group)
                .connectTimeout(self.connectTimeout)
                .channelOption(.tcpOption(.tcp_nodelay), value: 1)
                .channelInitializer(initializer)
                .connect(host: host, port: port).get()
        case .unix(let path):
            return try await ClientBootstrap(group: group).connectTimeout(self.connectTimeout)
                .channelInitializer(initializer)
                .connect(unixDomainSocketPath: path).get()
        case .inProcess:
            throw ParleyError(code: .invalidArgument, message: "an in-process connection is made by the server (ParleyClient.connect(inProcessTo:)), not by address")
        }
    }

    public func listen(
        on address: ParleyAddress, group: any EventLoopGroup, initializer: @escaping ParleyChannelInitializer
    ) async throws -> (listener: any Channel, bound: ParleyAddress) {
        switch address.kind {
        case .tcp(let host, let port):
            let listener = try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: self.backlog)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
                .childChannelInitializer(initializer)
                .bind(host: host, port: port).get()
            let bound = listener.localAddress?.port ?? port
            return (listener, .tcp(host: host, port: bound))
        case .unix(let path):
            let listener = try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: self.backlog)
                .childChannelInitializer(initializer)
                .bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
            return (listener, address)
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
