import NIOCore
import NIOPosix
import ParleyWire

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A connection as the async layer sees it: events in, commands out.
public typealias ParleyAsyncChannel = NIOAsyncChannel<ConnectionEvent, ConnectionCommand>

/// Options that shape every connection's pipeline.
public struct PipelineOptions: Sendable {
    public var maxFrameSize: Int
    /// Write the bytes read from the peer to this file (for `parley decode`).
    public var captureInbound: String?
    /// Write the bytes sent to the peer to this file.
    public var captureOutbound: String?
    /// Inbound events buffered before the connection stops reading from the socket.
    public var inboundHighWatermark: Int
    public var inboundLowWatermark: Int

    public init(maxFrameSize: Int = Frame.defaultMaxFrameSize, captureInbound: String? = nil, captureOutbound: String? = nil,
                inboundHighWatermark: Int = 256, inboundLowWatermark: Int = 64) {
        self.maxFrameSize = maxFrameSize
        self.captureInbound = captureInbound
        self.captureOutbound = captureOutbound
        self.inboundHighWatermark = inboundHighWatermark
        self.inboundLowWatermark = inboundLowWatermark
    }
}

public enum ParleyPipeline {
    /// Adds the Parley handlers to a fresh channel and wraps it for async use.
    /// Must run on the channel's event loop (it does, inside bootstrap initializers).
    public static func configure(
        _ channel: any Channel, role: ParleyConnectionHandler.Role, options: PipelineOptions
    ) throws -> ParleyAsyncChannel {
        let sync = channel.pipeline.syncOperations
        if options.captureInbound != nil || options.captureOutbound != nil {
            try sync.addHandler(CaptureHandler(inboundPath: options.captureInbound, outboundPath: options.captureOutbound))
        }
        try sync.addHandler(ByteToMessageHandler(WireDecoder(maxFrameSize: options.maxFrameSize)))
        try sync.addHandler(ParleyConnectionHandler(role: role))
        return try ParleyAsyncChannel(
            wrappingChannelSynchronously: channel,
            configuration: .init(
                backPressureStrategy: .init(lowWatermark: options.inboundLowWatermark, highWatermark: options.inboundHighWatermark),
                isOutboundHalfClosureEnabled: false
            )
        )
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

/// How channels for an address are made. TCP and Unix sockets come with Parley; TLS and
/// WebSocket transports will be further conformances.
public protocol ParleyTransport: Sendable {
    func connect(
        to address: ParleyAddress, group: any EventLoopGroup,
        initializer: @escaping @Sendable (any Channel) throws -> ParleyAsyncChannel
    ) async throws -> ParleyAsyncChannel

    /// Binds a listener; returns it and the address actually bound (port 0 resolved).
    func listen(
        on address: ParleyAddress, group: any EventLoopGroup,
        initializer: @escaping @Sendable (any Channel) throws -> ParleyAsyncChannel
    ) async throws -> (NIOAsyncChannel<ParleyAsyncChannel, Never>, ParleyAddress)
}

/// TCP over IPv4 and IPv6, and Unix domain sockets.
public struct PosixTransport: ParleyTransport {
    public var connectTimeout: TimeAmount
    public var backlog: Int32

    public init(connectTimeout: TimeAmount = .seconds(10), backlog: Int32 = 256) {
        self.connectTimeout = connectTimeout
        self.backlog = backlog
    }

    public func connect(
        to address: ParleyAddress, group: any EventLoopGroup,
        initializer: @escaping @Sendable (any Channel) throws -> ParleyAsyncChannel
    ) async throws -> ParleyAsyncChannel {
        let bootstrap = ClientBootstrap(group: group)
            .connectTimeout(self.connectTimeout)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
        let wrapped: @Sendable (any Channel) -> EventLoopFuture<ParleyAsyncChannel> = { channel in
            channel.eventLoop.makeCompletedFuture { try initializer(channel) }
        }
        switch address.kind {
        case .tcp(let host, let port):
            return try await bootstrap.connect(host: host, port: port, channelInitializer: wrapped)
        case .unix(let path):
            return try await ClientBootstrap(group: group).connectTimeout(self.connectTimeout)
                .connect(unixDomainSocketPath: path, channelInitializer: wrapped)
        case .inProcess:
            throw ParleyError(code: .invalidArgument, message: "an in-process connection is made by the server (ParleyClient.connect(inProcessTo:)), not by address")
        }
    }

    public func listen(
        on address: ParleyAddress, group: any EventLoopGroup,
        initializer: @escaping @Sendable (any Channel) throws -> ParleyAsyncChannel
    ) async throws -> (NIOAsyncChannel<ParleyAsyncChannel, Never>, ParleyAddress) {
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: self.backlog)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
        let wrapped: @Sendable (any Channel) -> EventLoopFuture<ParleyAsyncChannel> = { channel in
            channel.eventLoop.makeCompletedFuture { try initializer(channel) }
        }
        switch address.kind {
        case .tcp(let host, let port):
            let listener = try await bootstrap.bind(host: host, port: port, childChannelInitializer: wrapped)
            let bound = listener.channel.localAddress?.port ?? port
            return (listener, .tcp(host: host, port: bound))
        case .unix(let path):
            let unixBootstrap = ServerBootstrap(group: group).serverChannelOption(.backlog, value: self.backlog)
            let listener = try await unixBootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true, childChannelInitializer: wrapped)
            return (listener, address)
        case .inProcess:
            throw ParleyError(code: .invalidArgument, message: "a server does not listen in-process; in-process clients are made with ParleyClient.connect(inProcessTo:)")
        }
    }
}

/// Two connected ends in one process, with no listener and no address: a `socketpair(2)`.
/// For tests and for embedding a server and its client in one program.
public enum InProcessTransport {
    public static func pair(
        group: any EventLoopGroup,
        client: @escaping @Sendable (any Channel) throws -> ParleyAsyncChannel,
        server: @escaping @Sendable (any Channel) throws -> ParleyAsyncChannel
    ) async throws -> (client: ParleyAsyncChannel, server: ParleyAsyncChannel) {
        var fds: [Int32] = [-1, -1]
        #if canImport(Glibc)
        let type = Int32(SOCK_STREAM.rawValue)
        #else
        let type = SOCK_STREAM
        #endif
        guard socketpair(AF_UNIX, type, 0, &fds) == 0 else {
            throw ParleyError(code: .connectFailed, message: "socketpair failed: errno \(errno)")
        }
        let serverEnd = try await ClientBootstrap(group: group).withConnectedSocket(fds[1]) { channel in
            channel.eventLoop.makeCompletedFuture { try server(channel) }
        }
        let clientEnd = try await ClientBootstrap(group: group).withConnectedSocket(fds[0]) { channel in
            channel.eventLoop.makeCompletedFuture { try client(channel) }
        }
        return (clientEnd, serverEnd)
    }
}
