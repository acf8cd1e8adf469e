import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ParleyNIO
import ParleyWire

/// A TCP (or Unix socket) proxy that does bad things to the bytes on purpose: cuts
/// connections at random or after N bytes, delays, fragments bytes into small writes, stalls
/// a direction, holds a direction to a bandwidth. `parley chaos` runs it; tests put it
/// between a client and a server.
///
/// Each accepted connection gets its own connection to the target, on the same event loop,
/// and one `ChaosPlan` per direction seeded from the run's seed, the connection's number and
/// the direction: the same seed and the same traffic give the same faults. Everything it does
/// is reported, one line per event, through `report`.
public final class ChaosProxy: Sendable {
    public struct Configuration: Sendable {
        public var listen: ParleyAddress
        public var target: ParleyAddress
        /// What to do client to server, and server to client.
        public var toServer: ChaosPlan.Settings
        public var toClient: ChaosPlan.Settings
        public var seed: UInt64
        /// Stop reading from a side while this many bytes wait to be written to the other.
        public var highWater: Int

        public init(listen: ParleyAddress, target: ParleyAddress, toServer: ChaosPlan.Settings = .init(), toClient: ChaosPlan.Settings = .init(),
                    seed: UInt64 = 1, highWater: Int = 4 << 20) {
            self.listen = listen
            self.target = target
            self.toServer = toServer
            self.toClient = toClient
            self.seed = seed
            self.highWater = highWater
        }
    }

    public let configuration: Configuration
    let group: any EventLoopGroup
    let report: @Sendable (String) -> Void
    private let state = NIOLockedValueBox(State())

    struct State {
        var listener: (any Channel)?
        var connections = 0
        var cuts = 0
    }

    public init(configuration: Configuration, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
                report: @escaping @Sendable (String) -> Void = { _ in }) {
        self.configuration = configuration
        self.group = group
        self.report = report
    }

    /// Connections accepted and connections cut so far.
    public var counts: (connections: Int, cuts: Int) { self.state.withLockedValue { ($0.connections, $0.cuts) } }

    /// Binds the listener; returns the address bound (port 0 resolved).
    public func start() async throws -> ParleyAddress {
        let bootstrap = ServerBootstrap(group: self.group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.autoRead, value: false)
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture { self.accepted(channel) }
            }
        let listener: any Channel
        var bound = self.configuration.listen
        switch self.configuration.listen.kind {
        case .tcp(let host, let port):
            listener = try await bootstrap.childChannelOption(.tcpOption(.tcp_nodelay), value: 1).bind(host: host, port: port).get()
            bound = .tcp(host: host, port: listener.localAddress?.port ?? port)
        case .unix(let path):
            listener = try await UnixListenerPath.bind(path) { try await bootstrap.bind(unixDomainSocketPath: path).get() }
        default:
            throw ParleyError(code: .invalidArgument, message: "the chaos proxy listens on HOST:PORT or unix:PATH, not \(self.configuration.listen)")
        }
        self.state.withLockedValue { $0.listener = listener }
        return bound
    }

    /// Closes the listener; connections in progress go on until they end.
    public func stop() async {
        let listener = self.state.withLockedValue { s in defer { s.listener = nil }; return s.listener }
        try? await listener?.close()
    }

    private func accepted(_ client: any Channel) {
        let number = self.state.withLockedValue { s in s.connections += 1; return s.connections }
        let seed = self.configuration.seed
        let toServer = ChaosPlan(settings: self.configuration.toServer, seed: SplitMix64.derive(seed, UInt64(number), 0))
        let toClient = ChaosPlan(settings: self.configuration.toClient, seed: SplitMix64.derive(seed, UInt64(number), 1))
        let link = ChaosLink(number: number, proxy: self, client: client)
        let fromClient = ChaosForwarder(link: link, direction: "c2s", plan: toServer, highWater: self.configuration.highWater)
        let fromServer = ChaosForwarder(link: link, direction: "s2c", plan: toClient, highWater: self.configuration.highWater)
        do {
            try client.pipeline.syncOperations.addHandler(fromClient)
        } catch {
            client.close(promise: nil)
            return
        }
        let bootstrap = ClientBootstrap(group: client.eventLoop)
            .channelOption(.autoRead, value: true)
            .connectTimeout(.seconds(10))
            .channelInitializer { server in
                server.eventLoop.makeCompletedFuture { try server.pipeline.syncOperations.addHandler(fromServer) }
            }
        let connecting: EventLoopFuture<any Channel>
        switch self.configuration.target.kind {
        case .tcp(let host, let port): connecting = bootstrap.channelOption(.tcpOption(.tcp_nodelay), value: 1).connect(host: host, port: port)
        case .unix(let path): connecting = bootstrap.connect(unixDomainSocketPath: path)
        default: connecting = client.eventLoop.makeFailedFuture(ParleyError(code: .invalidArgument, message: "target must be HOST:PORT or unix:PATH"))
        }
        let target = self.configuration.target
        connecting.whenComplete { result in
            switch result {
            case .success(let server):
                fromClient.partner = server
                fromServer.partner = client
                client.setOption(.autoRead, value: true).whenComplete { _ in }
                self.report("conn \(number): \(ParleyPipeline.describe(client.remoteAddress)) -> \(target)")
            case .failure(let error):
                self.report("conn \(number): cannot reach \(target): \(error)")
                client.close(promise: nil)
            }
        }
    }

    func countCut() { self.state.withLockedValue { $0.cuts += 1 } }
}

/// The two channels of one proxied connection; closing one closes both, once.
final class ChaosLink: @unchecked Sendable {
    // Only touched on the connection's event loop (both channels share it).
    let number: Int
    let proxy: ChaosProxy
    let client: any Channel
    var closed = false

    init(number: Int, proxy: ChaosProxy, client: any Channel) {
        self.number = number
        self.proxy = proxy
        self.client = client
    }
}

/// Reads one side and writes to the other as its plan says.
final class ChaosForwarder: ChannelInboundHandler, @unchecked Sendable {
    // Only touched on the connection's event loop.
    typealias InboundIn = ByteBuffer

    let link: ChaosLink
    let direction: String
    var plan: ChaosPlan
    let highWater: Int
    var partner: (any Channel)?
    /// When the last scheduled write happens: pieces stay in order however they are delayed.
    var nextWrite = NIODeadline.uptimeNanoseconds(0)
    var pending = 0
    var writes = 0
    var readsPaused = false
    var context: ChannelHandlerContext?
    /// A cut is planned: nothing read after it may be forwarded (the cut itself happens once
    /// the writes before it have been made).
    var cutPlanned = false
    /// Writes scheduled for later and not made yet: while there are any, a piece due now is
    /// scheduled too (behind them), or it would overtake them.
    var scheduled = 0

    init(link: ChaosLink, direction: String, plan: ChaosPlan, highWater: Int) {
        self.link = link
        self.direction = direction
        self.plan = plan
        self.highWater = highWater
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let chunk = self.unwrapInboundIn(data)
        guard let partner = self.partner, !self.link.closed, !self.cutPlanned else { return }
        let step = self.plan.plan(chunk.readableBytes)
        let loop = context.eventLoop
        for piece in step.pieces {
            let bytes = chunk.getSlice(at: chunk.readerIndex + piece.offset, length: piece.length)!
            let at = max(NIODeadline.now(), self.nextWrite) + .milliseconds(Int64(piece.delayMilliseconds)) + .nanoseconds(piece.transmitNanoseconds)
            self.nextWrite = at
            self.pending += bytes.readableBytes
            self.writes += 1
            if at <= NIODeadline.now(), self.scheduled == 0 {
                self.write(bytes, to: partner)
            } else {
                // NIO runs tasks due at the same time in the order they were scheduled.
                let bound = NIOLoopBound(self, eventLoop: loop)
                self.scheduled += 1
                loop.scheduleTask(deadline: at) {
                    bound.value.scheduled -= 1
                    bound.value.write(bytes, to: partner)
                }
                if piece.delayMilliseconds >= 100 { self.link.proxy.report("conn \(self.link.number) \(self.direction): held \(piece.delayMilliseconds) ms at byte \(self.plan.passed)") }
            }
        }
        if step.cut {
            self.cutPlanned = true
            let at = self.nextWrite
            let bound = NIOLoopBound(self, eventLoop: loop)
            let cutAt = self.plan.passed
            loop.scheduleTask(deadline: at) { bound.value.cut(at: cutAt, partner: partner) }
        }
        if self.pending > self.highWater, !self.readsPaused {
            self.readsPaused = true
            context.channel.setOption(.autoRead, value: false).whenComplete { _ in }
        }
    }

    private func write(_ bytes: ByteBuffer, to partner: any Channel) {
        guard !self.link.closed else { return }
        let count = bytes.readableBytes
        let bound = NIOLoopBound(self, eventLoop: partner.eventLoop)
        partner.writeAndFlush(bytes).whenComplete { _ in
            let me = bound.value
            me.pending -= count
            if me.readsPaused, me.pending < me.highWater / 4, let channel = me.context?.channel {
                me.readsPaused = false
                channel.setOption(.autoRead, value: true).whenComplete { _ in }
            }
        }
    }

    private func cut(at byte: Int, partner: any Channel) {
        guard !self.link.closed else { return }
        self.link.proxy.countCut()
        self.link.proxy.report("conn \(self.link.number) \(self.direction): cut after \(byte) bytes")
        self.closeBoth(partner: partner)
    }

    private func closeBoth(partner: any Channel) {
        guard !self.link.closed else { return }
        self.link.closed = true
        self.context?.channel.close(promise: nil)
        partner.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !self.link.closed {
            self.link.proxy.report("conn \(self.link.number) \(self.direction): closed by its sender after \(self.plan.passed) bytes in \(self.writes) writes")
            // Let what is already scheduled go out, then close the other side.
            if let partner = self.partner {
                let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
                context.eventLoop.scheduleTask(deadline: self.nextWrite) { bound.value.closeBoth(partner: partner) }
            } else {
                self.link.closed = true
            }
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
