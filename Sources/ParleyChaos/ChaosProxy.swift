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
///
/// A side's end of stream is passed on as an end of stream (a half-close): the proxy stops
/// reading that side and, once everything it sent has been written to the other side, shuts
/// down the other side's output; the connection is closed once both directions have ended
/// (or a side is gone). A cut, by contrast, closes both sides at once, dropping whatever was
/// not written yet.
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
            .childChannelOption(.allowRemoteHalfClosure, value: true)
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
        let fromClient = ChaosForwarder(link: link, direction: .toServer, plan: toServer, highWater: self.configuration.highWater)
        let fromServer = ChaosForwarder(link: link, direction: .toClient, plan: toClient, highWater: self.configuration.highWater)
        do {
            try client.pipeline.syncOperations.addHandler(fromClient)
        } catch {
            client.close(promise: nil)
            return
        }
        let bootstrap = ClientBootstrap(group: client.eventLoop)
            .channelOption(.autoRead, value: true)
            .channelOption(.allowRemoteHalfClosure, value: true)
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
                guard !link.closed else {
                    server.close(promise: nil)
                    return
                }
                link.server = server
                self.report("conn \(number): \(ParleyPipeline.describe(client.remoteAddress)) -> \(target)")
                // What the client sent (and whether it ended) while the connect was under way
                // goes on now.
                fromClient.connected(to: server)
                fromServer.connected(to: client)
                client.setOption(.autoRead, value: true).whenComplete { _ in }
            case .failure(let error):
                self.report("conn \(number): cannot reach \(target): \(error)")
                link.closeBoth()
            }
        }
    }

    func countCut() { self.state.withLockedValue { $0.cuts += 1 } }
}

/// The two channels of one proxied connection and where each direction is.
final class ChaosLink: @unchecked Sendable {
    // Only touched on the connection's event loop (both channels share it).
    let number: Int
    let proxy: ChaosProxy
    let client: any Channel
    /// Set once the connect to the target has succeeded.
    var server: (any Channel)?
    /// Both channels have been closed (a cut, or both directions are done): nothing more is
    /// forwarded.
    var closed = false
    /// Per direction (`ChaosForwarder.Direction.rawValue`): everything its sender sent has been
    /// written and the receiver's output shut down, or the receiver is gone.
    var done = [false, false]

    init(number: Int, proxy: ChaosProxy, client: any Channel) {
        self.number = number
        self.proxy = proxy
        self.client = client
    }

    /// Closes both channels once both directions are done.
    func closeIfDone() {
        if self.done[0], self.done[1] { self.closeBoth() }
    }

    /// Closes both channels at once (what is not written yet is dropped), once.
    func closeBoth() {
        guard !self.closed else { return }
        self.closed = true
        self.client.close(promise: nil)
        self.server?.close(promise: nil)
    }
}

/// Reads one side and writes to the other as its plan says.
final class ChaosForwarder: ChannelInboundHandler, @unchecked Sendable {
    // Only touched on the connection's event loop.
    typealias InboundIn = ByteBuffer

    enum Direction: Int {
        case toServer = 0, toClient = 1
        var name: String { self == .toServer ? "c2s" : "s2c" }
        var reverse: Direction { self == .toServer ? .toClient : .toServer }
    }

    let link: ChaosLink
    let direction: Direction
    var plan: ChaosPlan
    let highWater: Int
    var partner: (any Channel)?
    /// What was read before the partner was connected: forwarded once it is.
    var early: [ByteBuffer] = []
    var earlyBytes = 0
    /// The sender's stream has ended (or the sender is gone): nothing more comes from it.
    var ended = false
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

    init(link: ChaosLink, direction: Direction, plan: ChaosPlan, highWater: Int) {
        self.link = link
        self.direction = direction
        self.plan = plan
        self.highWater = highWater
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    /// Whether what is read is still to be forwarded.
    private var forwarding: Bool { !self.link.closed && !self.cutPlanned && !self.link.done[self.direction.rawValue] }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let chunk = self.unwrapInboundIn(data)
        guard self.forwarding else { return }
        guard let partner = self.partner else {
            // The client's end of stream can be read before the target connect completes
            // (NIO drains a socket on its end of stream, even with autoRead off).
            self.early.append(chunk)
            self.earlyBytes += chunk.readableBytes
            return
        }
        self.forward(chunk, to: partner, loop: context.eventLoop)
    }

    /// The other side is connected: forwards what was read meanwhile, and its end if it ended.
    func connected(to partner: any Channel) {
        self.partner = partner
        let early = self.early
        self.early = []
        self.earlyBytes = 0
        for chunk in early where self.forwarding { self.forward(chunk, to: partner, loop: partner.eventLoop) }
        self.finishIfDrained()
    }

    private func forward(_ chunk: ByteBuffer, to partner: any Channel, loop: any EventLoop) {
        let step = self.plan.plan(chunk.readableBytes)
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
                if piece.delayMilliseconds >= 100 { self.link.proxy.report("conn \(self.link.number) \(self.direction.name): held \(piece.delayMilliseconds) ms at byte \(self.plan.passed)") }
            }
        }
        if step.cut {
            self.cutPlanned = true
            let at = self.nextWrite
            let bound = NIOLoopBound(self, eventLoop: loop)
            let cutAt = self.plan.passed
            loop.scheduleTask(deadline: at) { bound.value.cut(at: cutAt) }
        }
        if self.pending > self.highWater, !self.readsPaused, let channel = self.context?.channel {
            self.readsPaused = true
            channel.setOption(.autoRead, value: false).whenComplete { _ in }
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
            me.finishIfDrained()
        }
    }

    private func cut(at byte: Int) {
        guard !self.link.closed else { return }
        self.link.proxy.countCut()
        self.link.proxy.report("conn \(self.link.number) \(self.direction.name): cut after \(byte) bytes")
        self.link.closeBoth()
    }

    /// Once the sender has ended and all it sent has been written (handed to the kernel),
    /// passes the end on: shuts down the partner's output (a half-close).
    private func finishIfDrained() {
        guard self.ended, self.forwarding, self.pending == 0, self.scheduled == 0, let partner = self.partner else { return }
        self.link.done[self.direction.rawValue] = true
        // If the partner's input has ended too, NIO closes it altogether.
        partner.close(mode: .output, promise: nil)
        self.link.closeIfDone()
    }

    private func senderEnded() {
        guard !self.ended else { return }
        self.ended = true
        if !self.link.closed {
            self.link.proxy.report(
                "conn \(self.link.number) \(self.direction.name): closed by its sender after \(self.plan.passed + self.earlyBytes) bytes in \(self.writes) writes"
            )
        }
        self.finishIfDrained()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // The sender's end of stream (half-closure is allowed): NIO stops reading the channel.
        if let event = event as? ChannelEvent, event == .inputClosed { self.senderEnded() }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !self.link.closed {
            // Closed altogether (reset, an error, or by NIO once both its input and output
            // ended): nothing more comes from it, and nothing more can be written to it.
            self.link.done[self.direction.reverse.rawValue] = true
            self.senderEnded()
            self.link.closeIfDone()
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
