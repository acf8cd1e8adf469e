import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus

/// Serves a Prometheus registry in the text exposition format at `GET /metrics` (any other
/// path: 404) over NIO's HTTP/1.1 codec.
public final class MetricsEndpoint: Sendable {
    let registry: PrometheusCollectorRegistry
    let channel: any Channel

    public var localAddress: SocketAddress? { self.channel.localAddress }

    private init(registry: PrometheusCollectorRegistry, channel: any Channel) {
        self.registry = registry
        self.channel = channel
    }

    /// What the endpoint holds for its peers: a scraper needs one connection now and then,
    /// and the endpoint shares its process (and file descriptors) with the block server.
    public struct Limits: Sendable {
        /// Connections at once; one more is closed as it is accepted.
        public var maxConnections = 64
        /// A connection that sends nothing for this long is closed.
        public var idleTimeout: TimeAmount = .seconds(60)
        /// Every connection is closed this long after its accept (a request trickled a byte
        /// at a time is never idle).
        public var maxLifetime: TimeAmount = .minutes(10)
        public init() {}
    }

    public static func start(host: String, port: Int, registry: PrometheusCollectorRegistry, limits: Limits = Limits(),
                             group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) async throws -> MetricsEndpoint {
        let open = NIOLockedValueBox(0)
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let admitted = open.withLockedValue { n -> Bool in
                        guard n < limits.maxConnections else { return false }
                        n += 1
                        return true
                    }
                    guard admitted else {
                        channel.close(promise: nil)
                        return
                    }
                    let lifetime = channel.eventLoop.scheduleTask(in: limits.maxLifetime) { channel.close(promise: nil) }
                    channel.closeFuture.whenComplete { _ in
                        open.withLockedValue { $0 -= 1 }
                        lifetime.cancel()
                    }
                    try channel.pipeline.syncOperations.addHandler(IdleStateHandler(readTimeout: limits.idleTimeout))
                    try channel.pipeline.syncOperations.addHandler(CloseWhenIdle())
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(MetricsHTTPHandler(registry: registry))
                }
            }
            .bind(host: host, port: port).get()
        return MetricsEndpoint(registry: registry, channel: channel)
    }

    public func close() async {
        try? await self.channel.close()
    }
}

/// Closes the connection when `IdleStateHandler` says it has read nothing for its timeout.
final class CloseWhenIdle: ChannelInboundHandler {
    typealias InboundIn = NIOAny

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            context.close(promise: nil)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }
}

final class MetricsHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let registry: PrometheusCollectorRegistry
    private var head: HTTPRequestHead?

    init(registry: PrometheusCollectorRegistry) {
        self.registry = registry
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch self.unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
        case .body:
            break
        case .end:
            guard let head = self.head else { return }
            self.head = nil
            let found = head.method == .GET && (head.uri == "/metrics" || head.uri.hasPrefix("/metrics?"))
            let body: ByteBuffer
            var headers = HTTPHeaders()
            if found {
                body = ByteBuffer(bytes: self.registry.emitToBuffer())
                headers.add(name: "Content-Type", value: "text/plain; version=0.0.4; charset=utf-8")
            } else {
                body = ByteBuffer(string: "not found: the metrics are at /metrics\n")
                headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
            }
            headers.add(name: "Content-Length", value: "\(body.readableBytes)")
            let keepAlive = head.isKeepAlive
            if !keepAlive { headers.add(name: "Connection", value: "close") }
            context.write(self.wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: found ? .ok : .notFound, headers: headers))), promise: nil)
            context.write(self.wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
            let done = context.writeAndFlush(self.wrapOutboundOut(.end(nil)))
            if !keepAlive {
                done.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
            }
        }
    }
}
