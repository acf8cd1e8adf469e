import Logging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import NIOSSL
import NIOPosix
import Parley
import Synchronization
import CParleyBlockIO
#if canImport(Glibc)
import Glibc
#endif

/// Finds exports for one NBD connection and opens the chosen one.
struct NBDConnectionResolver: NBDExportResolver, Sendable {
    let catalog: BlockExportCatalog
    let devices: BlockDeviceTable
    /// The owner NBD connections share in the device table (multi-conn).
    static let owner = "nbd"
    private(set) var opened: (BlockDevice, BlockAccess)?

    init(catalog: BlockExportCatalog, devices: BlockDeviceTable) {
        self.catalog = catalog
        self.devices = devices
    }

    func listExports() -> [(name: String, description: String)] {
        self.catalog.exports.map { ($0.name, "") }
    }

    func info(_ device: BlockDevice, _ export: BlockExportCatalog.Resolved, readOnly: Bool) -> NBDExportInfo {
        let g = device.store.geometry
        var flags: NBD.TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendCache, .canMultiConn]
        if readOnly {
            flags.insert(.readOnly)
        } else {
            flags.formUnion([.sendWriteZeroes, .sendFastZero])
            if g.discard { flags.insert(.sendTrim) }
        }
        if g.rotational { flags.insert(.rotational) }
        let minimum = export.blockSize ?? (g.isBlockDevice ? g.logicalBlockSize : 1)
        return NBDExportInfo(name: export.name, size: g.size, flags: flags, minimumBlockSize: minimum,
                             preferredBlockSize: max(minimum, 4096), maximumPayload: NBDServer.maximumPayload)
    }

    /// NBD_OPT_INFO: what NBD_OPT_GO would answer now, refusals included (the NBD document:
    /// a GO right after a successful INFO answers the same), so the export is opened and
    /// closed as GO opens it (read-write if it is writable: a block session holding it
    /// read-write is a refusal here too).
    func describe(_ name: String) -> Result<NBDExportInfo, NBDRefusal> {
        do {
            let export = try self.catalog.resolveNamed(name)
            let access: BlockAccess = export.readOnly ? .readOnly : .readWrite
            let device = try self.devices.open(export, access: access, owner: Self.owner)
            defer { self.devices.close(device, access: access, owner: Self.owner) }
            return .success(self.info(device, export, readOnly: export.readOnly))
        } catch {
            return .failure(error.nbdRefusal)
        }
    }

    mutating func open(_ name: String) -> Result<NBDExportInfo, NBDRefusal> {
        do {
            let export = try self.catalog.resolveNamed(name)
            let access: BlockAccess = export.readOnly ? .readOnly : .readWrite
            let device = try self.devices.open(export, access: access, owner: Self.owner)
            self.opened = (device, access)
            return .success(self.info(device, export, readOnly: export.readOnly))
        } catch {
            return .failure(error.nbdRefusal)
        }
    }
}

/// A standard NBD server (fixed newstyle, structured replies, `base:allocation`) over the
/// block service's exports, for qemu, nbdinfo, nbdcopy, fio and the kernel's client.
public final class NBDServer: Sendable {
    public static let maximumPayload: UInt32 = 32 << 20
    /// Reply bytes queued for a client before its connection stops taking requests (high),
    /// and below which it takes them again (low).
    static let replyWaterMark = ChannelOptions.Types.WriteBufferWaterMark(low: 2 << 20, high: 8 << 20)
    /// Reads this server has sent with sendfile (`Limits.zeroCopyReads`).
    public var zeroCopyReadsSent: Int { self.zeroCopyReadCount.load(ordering: .relaxed) }
    let zeroCopyReadCount = Atomic<Int>(0)

    public struct Limits: Sendable {
        /// Requests in flight per connection before reading stops.
        public var maxInFlight: Int = 256
        /// Bytes of requests and replies in flight per connection before reading stops.
        public var maxInFlightBytes: Int = 128 << 20
        /// How long a client has from its connect to the end of the handshake (NBD_OPT_GO or
        /// NBD_OPT_EXPORT_NAME); then the connection is closed. nil: no limit.
        public var handshakeTimeout: TimeAmount? = .seconds(30)
        /// Connections served at once; one more is closed as soon as it is accepted.
        public var maxConnections = ParleyServer.defaultMaxConnections
        /// How long a connection busy-waits for its client's next request after flushing its
        /// answers with nothing else in flight (`NBDReplyPolling`); 0: it never does.
        public var replyPolling: TimeAmount = .microseconds(50)
        /// Reads of `NBDConnectionHandler.largeRead` bytes or more whose pages are
        /// all cached go from the page cache to the socket with sendfile (over TCP, and over a
        /// Unix socket whose send buffer was widened to 1 MiB or more (`unixSendBuffer`); not
        /// over TLS, not from block devices), without being copied into the process.
        public var zeroCopyReads = true
        /// Send buffer (`SO_SNDBUF`) a Unix-socket connection asks for at its first read of
        /// `NBDConnectionHandler.largeRead` bytes or more: the kernel's default (208 KiB
        /// here) cuts a 1 MiB reply into five waits for the client; the kernel doubles the
        /// value and caps it at `net.core.wmem_max`. 0 keeps the default. (TCP sizes its
        /// buffers itself.)
        public var unixSendBuffer = 4 << 20
        /// Over TCP, reply bytes a connection keeps in its socket unsent
        /// (`TCP_NOTSENT_LOWAT`), set at its first read of `NBDConnectionHandler.largeRead`
        /// bytes or more. Left at the system's default (no limit), a connection queues all its
        /// large replies at once and most of them then go out in the client's context, as its
        /// acknowledgements open the window: on two CPUs the client, not the server, became
        /// the bottleneck of 1 MiB reads (session 31 in docs/performance.md). With a small
        /// limit the server's event loop pushes its replies out itself, a part at a time. 0
        /// keeps the system's setting.
        public var tcpUnsentLimit = 64 << 10
        public init() {}
    }

    /// NBD_OPT_STARTTLS: the TLS context and whether TLS is offered or required.
    public struct TLS: Sendable {
        public var context: NIOSSLContext
        public var policy: NBDTLSPolicy
        public init(context: NIOSSLContext, policy: NBDTLSPolicy) {
            self.context = context
            self.policy = policy
        }
    }

    let catalog: BlockExportCatalog
    let devices: BlockDeviceTable
    let io: BlockIOExecutor
    let limits: Limits
    let tls: TLS?
    let logger: Logger
    let group: any EventLoopGroup
    private let state = NIOLockedValueBox(State())

    struct State {
        var listeners: [any Channel] = []
        var connections: [ObjectIdentifier: any Channel] = [:]
        var shuttingDown = false
        var refused = 0
    }

    public init(catalog: BlockExportCatalog, devices: BlockDeviceTable, io: BlockIOExecutor, limits: Limits = Limits(), tls: TLS? = nil,
                logger: Logger = Logger(label: "parley.block.nbd"), group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) {
        self.tls = tls
        self.catalog = catalog
        self.devices = devices
        self.io = io
        self.limits = limits
        self.logger = logger
        self.group = group
    }

    /// Starts listening; returns the bound addresses (port 0 becomes the real port).
    public func bind(_ addresses: [ParleyAddress]) async throws -> [ParleyAddress] {
        var bound: [ParleyAddress] = []
        for address in addresses {
            let bootstrap = ServerBootstrap(group: self.group)
                .serverChannelOption(.backlog, value: 256)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.maxMessagesPerRead, value: 16)
                // Up to 256 KiB per read (NIO's default stops at 64 KiB): a 1 MiB write takes
                // four system calls, not sixteen, and its pieces stay in the caches until the
                // IO thread copies them into the page cache. Reads of up to 1 MiB were slower
                // for 1 MiB writes over TCP (0.86x nbdkit against 1.04x, session 17 in
                // docs/performance.md), and 64 KiB slower still. The adaptive size falls back
                // for small IO.
                .childChannelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 2048, maximum: 1 << 18))
                // Replies waiting for the client to read them: past `high` the connection
                // takes no new request until they fall under `low` (a client that sends reads
                // and never reads the replies). High enough for eight 1 MiB reads in flight.
                .childChannelOption(.writeBufferWaterMark, value: NBDServer.replyWaterMark)
                .childChannelInitializer { [self] channel in
                    channel.eventLoop.makeCompletedFuture {
                        let handler = NBDConnectionHandler(server: self)
                        try channel.pipeline.syncOperations.addHandler(handler)
                        let refused = self.state.withLockedValue { s -> Int? in
                            if s.shuttingDown { return 0 }
                            if s.connections.count >= self.limits.maxConnections {
                                s.refused += 1
                                return s.refused
                            }
                            s.connections[ObjectIdentifier(channel)] = channel
                            return nil
                        }
                        if let refused {
                            // The first, then one in a thousand.
                            if refused % 1000 == 1 {
                                self.logger.warning("NBD connection refused: \(self.limits.maxConnections) connections already (\(refused) refused so far)")
                            }
                            channel.close(promise: nil)
                        }
                        channel.closeFuture.whenComplete { _ in
                            _ = self.state.withLockedValue { $0.connections.removeValue(forKey: ObjectIdentifier(channel)) }
                        }
                    }
                }
            let channel: any Channel
            do {
                switch address.kind {
                case .tcp(let host, let port):
                    channel = try await bootstrap.childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
                        .bind(host: host, port: port).get()
                case .unix(let path):
                    channel = try await UnixListenerPath.bind(path) { try await bootstrap.bind(unixDomainSocketPath: path).get() }
                default:
                    throw ParleyError(code: .invalidArgument, message: "NBD listens on HOST:PORT or unix:PATH only, not \(address)")
                }
            } catch let error as ParleyError {
                throw error
            } catch {
                throw ParleyError(code: .connectFailed, message: "cannot listen for NBD on \(address): \(error)", cause: error)
            }
            self.state.withLockedValue { $0.listeners.append(channel) }
            if case .tcp(let host, _) = address.kind, let port = channel.localAddress?.port {
                bound.append(.tcp(host: host, port: port))
            } else {
                bound.append(address)
            }
        }
        return bound
    }

    /// Stops accepting, lets every connection finish its requests in flight, then closes it.
    public func shutDown() async {
        let (listeners, connections) = self.state.withLockedValue { s in
            s.shuttingDown = true
            return (s.listeners, Array(s.connections.values))
        }
        for l in listeners { try? await l.close() }
        for c in connections {
            c.pipeline.fireUserInboundEventTriggered(NBDConnectionHandler.Drain())
        }
        for c in connections { try? await c.closeFuture.get() }
    }

    public var connectionCount: Int { self.state.withLockedValue { $0.connections.count } }
}

/// One NBD connection: the handshake, then requests decoded from the byte stream, answered
/// inline when the page cache allows (RWF_NOWAIT) and otherwise from the IO threads, in any order.
final class NBDConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// User event: finish what is in flight, then close.
    struct Drain {}

    private let server: NBDServer
    private var logger: Logger
    typealias Handshake = NBDHandshakeStateMachine<NBDConnectionResolver>
    private var handshake: Handshake?
    private var negotiated: NBDNegotiated?
    private var device: BlockDevice?
    private var access: BlockAccess = .readOnly
    private var decoder = NBDRequestDecoder(maximumWritePayload: NBDServer.maximumPayload)
    private var input: ByteBuffer?
    /// A large write whose payload is still arriving.
    private var gather: (request: NBDRequest, chunks: ReadPieceCollector, missing: Int)?
    /// Writes from this size on are gathered (`gather`) rather than copied into `input`.
    static let gatherMinimum = 128 * 1024
    /// Writes from this size on whose payload starts in the next read are gathered too.
    static let sliceMinimum = 1024
    private var inFlight = 0
    private var inFlightBytes = 0
    private var readHeld = false
    /// The handshake is on the blocking pool (its options may open files, which can take long on
    /// a stalled network file system): nothing more is read and no option is handled until
    /// it comes back.
    private var handshakeBusy = false
    private var inRead = false
    private var needsFlush = false
    private var flushScheduled = false
    private var stopping = false
    /// The server is shutting down (`Drain`): requests still arriving are answered
    /// NBD_ESHUTDOWN, as the NBD document asks, until what was in flight is done and the
    /// connection closes.
    private var draining = false
    private var inactive = false
    private var context: ChannelHandlerContext?
    private var handshakeTimer: Scheduled<Void>?
    /// Bytes of read data written since the last flush (see `wrote`).
    private var unflushedBytes = 0
    static let flushAfter = 1 << 20
    private var peerWait: PeerWait
    /// Requests taken from the last read burst (and the one being read). Only a connection
    /// whose last burst held one request waits after answering: a client with several
    /// requests in flight sends them in bursts, which a server that sleeps meanwhile reads
    /// in one go, and waiting would cut them into single requests.
    private var burstRequests = 0
    private var lastBurstRequests = 0
    /// The connection speaks TLS (NBD_OPT_STARTTLS): replies must be bytes, not file regions.
    private var tlsActive = false
    /// Reads sent with sendfile: decided at the first large read (see `zeroCopySource`).
    private var zeroCopy: ZeroCopy = .undecided
    enum ZeroCopy {
        case undecided
        case unavailable
        /// The export's file, and a descriptor of the connection's own on it: closed when the
        /// connection ends, after NIO has failed any region still waiting to be sent, so
        /// that no region is ever sent from a descriptor number reused for another file.
        case ready(FileBlockStore, NIOFileHandle)
    }
    /// Regions queued and not yet sent, and the furthest end of any queued on this
    /// connection: watched while some are queued (`watchRegions`).
    private var regionsQueued = 0
    private var regionsEnd = 0
    private var regionWatch: Scheduled<Void>?
    /// How often a connection with regions waiting checks that its file still holds them.
    static let regionWatchInterval = TimeAmount.seconds(1)
    /// Reads from this size on widen a Unix socket's send buffer (`Limits.unixSendBuffer`),
    /// limit a TCP socket's unsent bytes (`Limits.tcpUnsentLimit`) and then go out with
    /// sendfile when they can (`Limits.zeroCopyReads`): below it,
    /// copying is cheaper than a system call per read (small replies go out together in one
    /// writev). One size for both: over a Unix socket, whether sendfile is worth it is known
    /// only once the buffer is widened.
    static let largeRead = 64 * 1024
    /// What the connection runs over, from its local address (`handlerAdded`).
    private var socket: Socket = .other
    enum Socket { case tcp, unix, other }
    /// Whether the kernel granted a Unix socket a send buffer of 1 MiB or more
    /// (`prepareForLargeReads`); nil until the connection's first large read.
    private var sendBufferWidened: Bool?
    /// Reads sent with sendfile, in all servers (`parley_block_nbd_zero_copy_reads_total`).
    static let zeroCopyReads = Counter(label: "parley_block_nbd_zero_copy_reads_total")

    init(server: NBDServer) {
        self.server = server
        self.logger = server.logger
        self.peerWait = PeerWait(window: server.limits.replyPolling, label: "parley_block_nbd_reply_waits_total", seen: "request")
        self.handshake = NBDHandshakeStateMachine(resolver: NBDConnectionResolver(catalog: server.catalog, devices: server.devices))
        self.handshake!.tls = server.tls?.policy ?? .off
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        switch context.channel.localAddress {
        case .v4?, .v6?: self.socket = .tcp
        case .unixDomainSocket?: self.socket = .unix
        default: self.socket = .other
        }
        if let peer = context.channel.remoteAddress { self.logger[metadataKey: "peer"] = "\(peer)" }
    }

    func channelActive(context: ChannelHandlerContext) {
        if let timeout = self.server.limits.handshakeTimeout {
            // A client that connects and never finishes the handshake (or sends nothing) would
            // otherwise hold its connection, and a file descriptor, for ever.
            self.handshakeTimer = context.eventLoop.assumeIsolated().scheduleTask(in: timeout) {
                guard self.handshake != nil, !self.inactive else { return }
                self.logger.warning("NBD handshake did not complete within \(Double(timeout.nanoseconds) / 1e9) s; closing")
                self.handshake = nil
                self.stopping = true
                context.close(promise: nil)
            }
        }
        let greeting = self.handshake!.greeting()
        context.writeAndFlush(NIOAny(greeting), promise: nil)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = self.unwrapInboundIn(data)
        if self.stopping { return }
        // One event-loop turn's reads: inline writes in it read the thread's sleeps once.
        if !self.inRead { FileBlockStore.beginBurst() }
        self.inRead = true
        self.receive(&bytes, context: context)
    }

    private func receive(_ bytes: inout ByteBuffer, context: ChannelHandlerContext) {
        if var gather = self.gather {
            self.gather = nil  // unique again, so that appending into its own buffer does not copy it
            // The payload of a large write: kept as the reads' own buffers, not copied.
            let n = min(gather.missing, bytes.readableBytes)
            var piece = bytes.readSlice(length: n)!
            // Small pieces are copied into a buffer of the gather's own: a write trickled in
            // byte by byte would otherwise keep a buffer (and an array slot) per byte.
            gather.chunks.take(&piece, missing: gather.missing - n, allocator: context.channel.allocator)
            gather.missing -= n
            if gather.missing > 0 {
                self.gather = gather
                return
            }
            if let negotiated = self.negotiated, let device = self.device {
                self.burstRequests += 1
                self.dispatch(gather.request, payload: gather.chunks.pieces, negotiated: negotiated, device: device, context: context)
            }
            if bytes.readableBytes == 0 { return }
        }
        if var input = self.input, input.readableBytes > 0 {
            self.input = nil  // unique again, so appending does not copy
            if input.readerIndex >= 64 * 1024 { input.discardReadBytes() }
            if self.handshake == nil, var missing = self.decoder.bytesMissing(in: input), missing > 0, missing < Self.gatherMinimum {
                // The last read ended inside a request: only what that request lacks is
                // copied onto it (its header first, then a small write's payload), and the
                // rest of this read is taken as it is, not appended too (a 4 KiB write cut
                // by a read boundary used to cost a copy of the whole next read: 2% of the
                // server's samples at QD32, session 30 in docs/performance.md).
                while missing > 0, missing < Self.gatherMinimum, bytes.readableBytes > 0 {
                    var piece = bytes.readSlice(length: min(missing, bytes.readableBytes))!
                    input.writeBuffer(&piece)
                    missing = self.decoder.bytesMissing(in: input) ?? 0
                }
                self.input = input
                self.process(context: context)
                if bytes.readableBytes > 0, !self.stopping { self.receive(&bytes, context: context) }
                return
            }
            if let awaited = self.decoder.bytesAwaited(in: input), awaited > input.readableBytes + bytes.readableBytes {
                // A large write arrives in many reads: room for all of it now, one copy each.
                input.reserveCapacity(minimumWritableBytes: awaited - input.readableBytes)
            }
            input.writeBuffer(&bytes)
            self.input = input
        } else {
            self.input = bytes
        }
        self.process(context: context)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if self.inRead { FileBlockStore.endBurst() }
        self.inRead = false
        self.lastBurstRequests = self.burstRequests
        self.burstRequests = 0
        if let input = self.input, input.readableBytes == 0 { self.input = nil }
        if self.needsFlush { self.flushReplies(context: context) }
        context.fireChannelReadComplete()
    }

    func read(context: ChannelHandlerContext) {
        if !self.mayTakeRequests(context) {
            self.readHeld = true
            return
        }
        context.read()
    }

    /// Below the limits on requests in flight, and the client reads its replies: replies
    /// served at once from the page cache are not in flight, only queued to go out, and a
    /// client that never reads would have them pile up without end.
    private func mayTakeRequests(_ context: ChannelHandlerContext) -> Bool {
        !self.handshakeBusy && self.inFlight < self.server.limits.maxInFlight && self.inFlightBytes < self.server.limits.maxInFlightBytes
            && context.channel.isWritable
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable, !self.inactive { self.resume(context: context) }
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is Drain {
            self.logger.debug("draining NBD connection")
            if self.negotiated != nil { self.draining = true } else { self.stopping = true }
            self.closeIfIdle(context: context)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.inactive = true
        if self.inRead {
            // Closed during a read (a disconnect, bad input, a reset): NIO sends no read
            // complete then, and the thread's burst must not outlive this turn.
            FileBlockStore.endBurst()
            self.inRead = false
        }
        self.handshakeTimer?.cancel()
        if let reason = self.handshake?.endOfInput() {
            self.logger.debug("\(reason)")
        }
        self.releaseDeviceIfIdle()
        self.closeZeroCopy()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.closeZeroCopy()
    }

    private func closeZeroCopy() {
        if case .ready(_, let handle) = self.zeroCopy { try? handle.close() }
        self.zeroCopy = .unavailable
        self.regionWatch?.cancel()
        self.regionWatch = nil
    }

    /// While regions wait to be sent, checks once a second that the file still holds them:
    /// NIO's `sendfile` of a range the file no longer has writes nothing and waits for ever
    /// (the read would stay unanswered and the connection stuck), so a file truncated under
    /// its export ends the connection instead.
    private func watchRegions(context: ChannelHandlerContext) {
        guard self.regionWatch == nil else { return }
        self.regionWatch = context.eventLoop.assumeIsolated().scheduleTask(in: Self.regionWatchInterval) {
            self.regionWatch = nil
            guard self.regionsQueued > 0, case .ready(_, let handle) = self.zeroCopy else { return }
            let size = (try? handle.withUnsafeFileDescriptor { parley_file_size($0) }) ?? -1
            if size >= 0, size < self.regionsEnd {
                self.logger.error("NBD export file shrank to \(size) bytes under reads being sent (up to byte \(self.regionsEnd)); closing the connection")
                context.close(promise: nil)
                return
            }
            self.watchRegions(context: context)
        }
    }

    /// The file and descriptor to send reads from, if this connection can: TCP, or a Unix
    /// socket with a widened send buffer, without TLS; an export that is a regular file;
    /// zero-copy reads allowed.
    private func zeroCopySource(_ store: any BlockStore, context: ChannelHandlerContext) -> (FileBlockStore, NIOFileHandle)? {
        switch self.zeroCopy {
        case .ready(let file, let handle):
            return (file, handle)
        case .unavailable:
            return nil
        case .undecided:
            // TCP, or a Unix socket whose send buffer holds a whole large reply: with the
            // default 208 KiB, sendfile over a Unix socket made 1 MiB reads 0.85x as fast
            // (session 28 in docs/performance.md), with 8 MiB 1.32x (session 29).
            let worth: Bool
            switch self.socket {
            case .tcp: worth = true
            case .unix: worth = self.sendBufferWidened == true
            case .other: worth = false
            }
            guard self.server.limits.zeroCopyReads, worth, !self.tlsActive, !self.inactive, let file = store as? FileBlockStore,
                  let fd = file.zeroCopyDescriptor()
            else {
                self.zeroCopy = .unavailable
                return nil
            }
            let handle = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: fd)
            self.zeroCopy = .ready(file, handle)
            return (file, handle)
        }
    }

    /// Once, at the connection's first large read, so that connections that only ever do
    /// small IO keep the system's settings. Over TCP: `limitUnsentBytes`. Over a Unix
    /// socket a reply goes out only as far as the socket's send buffer takes it (208 KiB by
    /// default here): a 1 MiB read then waits for the client to read four times, each a
    /// wake-up on both sides; so the buffer is widened (session 29 in docs/performance.md:
    /// 1 MiB reads over a Unix socket 1.17x). Reads are then sent with sendfile over the
    /// Unix socket too, if the buffer the kernel granted holds 1 MiB.
    private func prepareForLargeReads(context: ChannelHandlerContext) {
        self.sendBufferWidened = false
        if self.socket == .tcp {
            self.limitUnsentBytes(context: context)
            return
        }
        let size = self.server.limits.unixSendBuffer
        guard size > 0, self.socket == .unix, let options = context.channel.syncOptions else { return }
        do {
            try options.setOption(.socketOption(.so_sndbuf), value: SocketOptionValue(clamping: size))
            self.sendBufferWidened = try options.getOption(.socketOption(.so_sndbuf)) >= 1 << 20
        } catch {
            self.logger.debug("could not set the connection's send buffer to \(size) bytes: \(error)")
        }
    }

    /// Over TCP, without a limit, a connection's large replies are all queued in its socket
    /// at once (a sendfile of 1 MiB returns at once) and what the client's receive window
    /// does not take goes out later, in the client's context, as its acknowledgements arrive:
    /// the client then pays for the server's transmissions. With `Limits.tcpUnsentLimit`
    /// the socket takes a reply only while less than that lies unsent, and the event loop
    /// sends the rest when the socket says it is writable again (session 31 in
    /// docs/performance.md: 1 MiB reads 1.27x).
    private func limitUnsentBytes(context: ChannelHandlerContext) {
        let limit = self.server.limits.tcpUnsentLimit
        guard limit > 0, let options = context.channel.syncOptions else { return }
        do {
            try options.setOption(Self.tcpNotSentLowat, value: SocketOptionValue(clamping: limit))
        } catch {
            self.logger.debug("could not limit the connection's unsent bytes to \(limit): \(error)")
        }
    }

    static let tcpNotSentLowat = ChannelOptions.Types.SocketOption(level: .tcp, name: .init(rawValue: TCP_NOTSENT_LOWAT))

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.logger.debug("NBD connection error: \(error)")
        context.close(promise: nil)
    }

    // MARK: - Input

    private func process(context: ChannelHandlerContext) {
        if self.handshake != nil {
            self.advanceHandshake(context: context)
            return
        }
        guard var input = self.input else { return }
        self.input = nil
        defer { self.input = input.readableBytes > 0 ? input : nil }
        guard let negotiated = self.negotiated, let device = self.device else { return }
        while !self.stopping, !self.inactive, self.mayTakeRequests(context) {
            let item: NBDRequestDecoder.Item?
            do {
                item = try self.decoder.next(&input)
            } catch {
                self.logger.warning("NBD client sent garbage, closing: \(error)")
                self.stopping = true
                self.closeIfIdle(context: context)
                return
            }
            guard let item else {
                // A write whose payload has not all arrived is gathered from the reads that
                // bring it, not copied into `input`, when it is large, or when none of its
                // payload is here yet: the read ended right after its header (libnbd sends
                // header and payload apart), and the next read's bytes become the payload as
                // they are. (Copying 4 KiB payloads cut so was 6% of the map's samples under
                // random writes, session 36 in docs/performance.md.)
                let minimum = input.readableBytes == NBD.requestHeaderSize ? Self.sliceMinimum : Self.gatherMinimum
                if let request = self.decoder.takeLargeWrite(&input, minimum: minimum) {
                    var first = input.readSlice(length: input.readableBytes)!
                    let missing = Int(request.length) - first.readableBytes
                    // The start of the payload, in the buffer `input` owns: kept as it is.
                    var chunks = ReadPieceCollector(minimumSlice: Self.sliceMinimum, halfTheBuffer: false)
                    chunks.take(&first, missing: missing, allocator: context.channel.allocator)
                    self.gather = (request, chunks, missing)
                }
                break
            }
            switch item {
            case .oversizedWrite(let request):
                let e = NBDRequestError(.inval, "write of \(request.length) bytes is larger than the maximum \(NBDServer.maximumPayload)")
                self.logger.warning("NBD request refused: \(e.message)")
                device.metrics(.write).record(bytes: 0, failed: true, nanoseconds: 0)
                self.reply(cookie: request.cookie, error: e, negotiated: negotiated, context: context)
            case .request(let request, let payload):
                self.burstRequests += 1
                self.dispatch(request, payload: payload.map { [$0] }, negotiated: negotiated, device: device, context: context)
            }
        }
    }

    /// Hands the handshake and the bytes read so far to the blocking pool (the resolver may
    /// open files: `BlockDeviceTable.runOpen`), then carries out what it decided back on the
    /// event loop.
    private func advanceHandshake(context: ChannelHandlerContext) {
        guard !self.handshakeBusy, let machine = self.handshake, let input = self.input else { return }
        self.input = nil
        self.handshakeBusy = true
        BlockDeviceTable.runOpen(on: context.eventLoop) { () -> (Handshake, ByteBuffer, [Handshake.Action]) in
            var machine = machine
            var input = input
            let actions = machine.receive(&input)
            return (machine, input, actions)
        }.assumeIsolated().whenComplete { result in
            self.handshakeBusy = false
            switch result {
            case .success(let (machine, rest, actions)):
                self.handshakeAdvanced(machine, rest: rest, actions: actions, context: context)
            case .failure(let error):  // the blocking pool is gone: the process is stopping
                self.logger.warning("NBD handshake cannot go on: \(error)")
                self.handshake = nil
                self.stopping = true
                context.close(promise: nil)
            }
        }
    }

    private func handshakeAdvanced(_ machine: Handshake, rest: ByteBuffer, actions: [Handshake.Action], context: ChannelHandlerContext) {
        if self.inactive || self.stopping || self.handshake == nil {
            // Gone meanwhile (closed by the client, the handshake timer or a drain): what the
            // handshake opened is closed again.
            if let (device, access) = machine.resolver.opened {
                self.server.devices.close(device, access: access, owner: NBDConnectionResolver.owner)
            }
            return
        }
        self.handshake = machine
        var input = rest
        var arrived = false  // read while the handshake was away
        if var more = self.input {
            arrived = more.readableBytes > 0
            input.writeBuffer(&more)
        }
        self.input = input.readableBytes > 0 ? input : nil
        for action in actions {
            switch action {
            case .send(let bytes):
                context.write(NIOAny(bytes), promise: nil)
                self.needsFlush = true
            case .startTLS:
                if let early = self.input?.readableBytes {
                    // Sent in the clear after NBD_OPT_STARTTLS without waiting for its reply:
                    // read later, they would pass for bytes protected by TLS.
                    self.logger.warning("NBD handshake ended: client sent \(early) bytes after NBD_OPT_STARTTLS without waiting for its reply")
                    self.handshake = nil
                    self.stopping = true
                    context.close(promise: nil)
                    return
                }
                // The acknowledgement goes out in the clear; everything after it is TLS.
                context.flush()
                self.needsFlush = false
                guard let tls = self.server.tls else { continue }
                do {
                    try context.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls.context), position: .first)
                    self.tlsActive = true
                    self.handshake?.tlsStarted()
                    self.logger.debug("NBD client started TLS")
                } catch {
                    self.logger.warning("NBD STARTTLS failed: \(error)")
                    context.close(promise: nil)
                    return
                }
            case .disconnect(let reason):
                self.logger.warning("NBD handshake ended: \(reason)")
                self.handshake = nil
                self.stopping = true
                context.writeAndFlush(NIOAny(ByteBuffer()), promise: nil)
                context.close(promise: nil)
                return
            case .transmission(let negotiated):
                guard let (device, access) = self.handshake!.resolver.opened else { continue }
                self.handshake = nil
                self.handshakeTimer?.cancel()
                self.negotiated = negotiated
                self.device = device
                self.access = access
                self.logger[metadataKey: "export"] = "\(negotiated.export.name)"
                self.logger.info("NBD client opened export", metadata: [
                    "access": "\(access)", "structured": "\(negotiated.structuredReplies)", "size": "\(negotiated.export.size)",
                ])
            }
        }
        if self.needsFlush, !self.inRead { self.flushReplies(context: context) }
        // Options that came while it was away, or the first requests of the transmission
        // phase (what is left of an option the handshake has seen waits for more bytes).
        if self.input != nil, arrived || self.negotiated != nil { self.process(context: context) }
        if self.readHeld, self.mayTakeRequests(context) {
            self.readHeld = false
            context.read()
        }
    }

    private func closeIfIdle(context: ChannelHandlerContext) {
        guard self.inFlight == 0 else { return }
        if self.access != .readOnly, let device = self.device {
            // Nothing acknowledged is lost: writes reach the disk before the socket closes.
            let store = device.store
            self.inFlight += 1
            self.server.io.run(on: context.eventLoop) { try store.flush() }.assumeIsolated().whenComplete { result in
                if case .failure(let error) = result {
                    // Said, not thrown: the client has gone (a map's final flush, at its unmap, reports it too).
                    self.logger.error("the flush at a connection's end failed: writes acknowledged on it may not be on stable storage", metadata: ["error": "\(error)"])
                }
                self.inFlight -= 1
                self.closeAfterReplies(context: context)
                // A client that closes its socket right after NBD_CMD_DISC (nbdinfo, qemu-img)
                // ends the connection during the flush, when the device could not go yet.
                self.releaseDeviceIfIdle()
            }
        } else {
            self.closeAfterReplies(context: context)
        }
    }

    /// Closes once the replies written so far have gone to the socket: a close drops writes
    /// not flushed yet (a reply completed outside a read burst has its flush queued) and
    /// flushed ones the socket has not taken. A client that stops reading gets 10 s.
    private func closeAfterReplies(context: ChannelHandlerContext) {
        let written = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(NIOAny(ByteBuffer()), promise: written)
        self.needsFlush = false
        let limit = context.eventLoop.assumeIsolated().scheduleTask(in: .seconds(10)) { context.close(promise: nil) }
        written.futureResult.assumeIsolated().whenComplete { _ in
            limit.cancel()
            context.close(promise: nil)
        }
    }

    private func releaseDeviceIfIdle() {
        guard self.inactive, self.inFlight == 0, let device = self.device else { return }
        self.device = nil
        self.server.devices.close(device, access: self.access, owner: NBDConnectionResolver.owner)
        self.logger.info("NBD client closed export")
    }

    // MARK: - Requests

    /// `payload`: a write's data, in one buffer or (a gathered large write) several.
    private func dispatch(_ request: NBDRequest, payload: [ByteBuffer]?, negotiated: NBDNegotiated, device: BlockDevice, context: ChannelHandlerContext) {
        if self.draining, request.command != .disconnect {
            // Counted as a failed request of its kind, as a refusal is (not carried out).
            if let kind = Self.kind(request.command) { device.metrics(kind).record(bytes: 0, failed: true, nanoseconds: 0) }
            self.reply(cookie: request.cookie, error: NBDRequestError(.shutdown, "the server is shutting down"), negotiated: negotiated, context: context)
            return
        }
        let operation: NBDOperation
        switch negotiated.validate(request) {
        case .failure(let e):
            self.logger.warning("NBD request refused: \(e.message)", metadata: ["cookie": "\(request.cookie)"])
            if let kind = Self.kind(request.command) { device.metrics(kind).record(bytes: 0, failed: true, nanoseconds: 0) }
            self.reply(cookie: request.cookie, error: e, negotiated: negotiated, context: context)
            return
        case .success(let op):
            operation = op
        }
        let store = device.store
        let started = NIODeadline.now()
        let cookie = request.cookie
        if let remote = device.completing,
           self.startCompleting(remote, operation, payload: payload, cookie: cookie, negotiated: negotiated, device: device, started: started, context: context) {
            return
        }
        switch operation {
        case .disconnect:
            self.logger.debug("NBD client disconnects")
            self.stopping = true
            self.closeIfIdle(context: context)
        case .read(let offset, let length):
            if Int(length) >= Self.largeRead, self.sendBufferWidened == nil { self.prepareForLargeReads(context: context) }
            let headerSize = negotiated.structuredReplies ? NBDReply.offsetDataHeaderSize : NBDReply.simpleHeaderSize
            // Not while replies back up (the pages could be evicted before the socket takes
            // them), and within the 56 bits NIO keeps of a region's offset.
            if Int(length) >= Self.largeRead, offset + UInt64(length) < 1 << 56, context.channel.isWritable,
               let (file, handle) = self.zeroCopySource(store, context: context), file.isCached(offset: offset, length: Int(length)) {
                // Every page is cached and read in: sendfile does not wait for the disk here
                // on the event loop. The bytes are taken when the socket has room, not now;
                // the client cannot tell, as it has not seen this answer (docs/protocol.md 18).
                var header = context.channel.allocator.buffer(capacity: headerSize)
                NBDReply.writeReadHeader(cookie: cookie, offset: offset, length: Int(length), structured: negotiated.structuredReplies, into: &header)
                let region = FileRegion(fileHandle: handle, readerIndex: Int(offset), endIndex: Int(offset) + Int(length))
                device.metrics(.read).record(bytes: Int(length), failed: false, nanoseconds: Self.elapsed(started))
                Self.zeroCopyReads.increment()
                self.server.zeroCopyReadCount.wrappingAdd(1, ordering: .relaxed)
                context.write(NIOAny(header), promise: nil)
                let sent = context.eventLoop.makePromise(of: Void.self)
                self.regionsQueued += 1
                self.regionsEnd = max(self.regionsEnd, Int(offset) + Int(length))
                sent.futureResult.assumeIsolated().whenComplete { _ in
                    self.regionsQueued -= 1
                    if self.regionsQueued == 0 { self.regionsEnd = 0 }
                }
                context.write(NIOAny(IOData.fileRegion(region)), promise: sent)
                self.watchRegions(context: context)
                self.wrote(Int(length), context: context)
                return
            }
            var out = context.channel.allocator.buffer(capacity: headerSize + Int(length))
            NBDReply.writeReadHeader(cookie: cookie, offset: offset, length: Int(length), structured: negotiated.structuredReplies, into: &out)
            do {
                let done = try out.writeWithUnsafeMutableBytes(minimumWritableBytes: Int(length)) { ptr in
                    try store.read(into: UnsafeMutableRawBufferPointer(rebasing: ptr[..<Int(length)]), at: offset, nowait: true) ? Int(length) : 0
                }
                if done == Int(length) {
                    device.metrics(.read).record(bytes: Int(length), failed: false, nanoseconds: Self.elapsed(started))
                    context.write(NIOAny(out), promise: nil)
                    self.wrote(Int(length), context: context)
                    return
                }
            } catch {
                self.failed(.read, error, cookie: cookie, negotiated: negotiated, device: device, started: started, context: context)
                return
            }
            let structured = negotiated.structuredReplies
            self.begin(bytes: Int(length))
            self.server.io.run(on: context.eventLoop) { () -> ByteBuffer in
                var out = ByteBufferAllocator().buffer(capacity: NBDReply.offsetDataHeaderSize + Int(length))
                NBDReply.writeReadHeader(cookie: cookie, offset: offset, length: Int(length), structured: structured, into: &out)
                _ = try out.writeWithUnsafeMutableBytes(minimumWritableBytes: Int(length)) { ptr in
                    _ = try store.read(into: UnsafeMutableRawBufferPointer(rebasing: ptr[..<Int(length)]), at: offset, nowait: false)
                    return Int(length)
                }
                return out
            }.assumeIsolated().whenComplete { result in
                self.end(bytes: Int(length))
                switch result {
                case .success(let out):
                    device.metrics(.read).record(bytes: Int(length), failed: false, nanoseconds: Self.elapsed(started))
                    context.write(NIOAny(out), promise: nil)
                    self.wrote(Int(length), context: context)
                case .failure(let error):
                    self.failed(.read, error, cookie: cookie, negotiated: negotiated, device: device, started: started, context: context)
                }
                self.resume(context: context)
            }
        case .write(let offset, let fua):
            guard let chunks = payload else { return }
            if chunks.count != 1 {
                // Gathered: written from the reads' buffers, 64 at a time in one call. Here, on
                // the event loop, if the store's inline-write policy takes it (no hand-off to an
                // IO thread and back, and the bytes are written from the CPU that just read
                // them); otherwise on an IO thread, where FUA then syncs the file once (RWF_DSYNC
                // on each call would sync each). Never inline over a Unix socket: there the
                // client may have only its send buffer (208 KiB by default) in flight, and it
                // would wait while the event loop writes instead of sending the next request
                // (1 MiB writes over Unix 1.19x on the IO threads, session 29 in
                // docs/performance.md; over TCP inline measured faster, session 21).
                let pieces = ByteBufferPieces(chunks)
                let bytes = pieces.readableBytes
                if !fua, self.socket != .unix, pieces.pieceCount <= ByteBufferPieces.batchSize, self.writtenInline(bytes: bytes, cookie: cookie, negotiated: negotiated, device: device, started: started, context: context, {
                    var inline = false
                    try pieces.forEachBatch { (batch, _) throws(BlockStoreError) in inline = try store.writeInline(gathered: batch, at: offset) }
                    return inline
                }) {
                    return
                }
                self.offload(.write, bytes: bytes, cookie: cookie, negotiated: negotiated, device: device, started: started, context: context) {
                    try pieces.forEachBatch { (batch, skipped) throws(BlockStoreError) in try store.write(gathered: batch, at: offset + UInt64(skipped)) }
                    if fua { try store.flush() }
                }
                return
            }
            let payload = chunks[0]
            if !fua, self.writtenInline(bytes: payload.readableBytes, cookie: cookie, negotiated: negotiated, device: device, started: started, context: context, {
                try payload.withUnsafeReadableBytes { try store.write($0, at: offset, durable: false, nowait: true) }
            }) {
                return
            }
            self.offload(.write, bytes: payload.readableBytes, cookie: cookie, negotiated: negotiated, device: device, started: started, context: context) {
                _ = try payload.withUnsafeReadableBytes { try store.write($0, at: offset, durable: fua, nowait: false) }
            }
        case .flush:
            self.offload(.flush, bytes: 0, cookie: cookie, negotiated: negotiated, device: device, started: started, context: context) {
                try store.flush()
            }
        case .trim(let offset, let length, let fua):
            self.offload(.discard, bytes: Int(length), cookie: cookie, negotiated: negotiated, device: device, started: started, context: context) {
                try store.discard(offset: offset, length: UInt64(length))
                if fua { try store.flush() }
            }
        case .writeZeroes(let offset, let length, let fua, let noHole, let fastZero):
            self.offload(.writeZeroes, bytes: Int(length), cookie: cookie, negotiated: negotiated, device: device, started: started, context: context) {
                try store.writeZeroes(offset: offset, length: UInt64(length), mayDeallocate: !noHole, fast: fastZero)
                if fua { try store.flush() }
            }
        case .cache(let offset, let length):
            // posix_fadvise(WILLNEED) starts the reads itself and may wait (for the device's
            // request slots, for metadata): on an IO thread, and counted in flight.
            self.begin(bytes: 0)
            self.server.io.run(on: context.eventLoop) { store.prefetch(offset: offset, length: UInt64(length)) }.assumeIsolated().whenComplete { _ in
                self.end(bytes: 0)
                device.metrics(.cache).record(bytes: Int(length), failed: false, nanoseconds: Self.elapsed(started))
                self.reply(cookie: cookie, error: nil, negotiated: negotiated, context: context)
                self.resume(context: context)
            }
        case .blockStatus(let offset, let length, let reqOne):
            self.begin(bytes: 0)
            self.server.io.run(on: context.eventLoop) { try store.extents(offset: offset, length: UInt64(length)) }.assumeIsolated().whenComplete { result in
                self.end(bytes: 0)
                switch result {
                case .success(var extents):
                    if extents.isEmpty { extents = [BlockExtent(length: length, isHole: false)] }
                    if reqOne { extents = [BlockExtent(length: min(extents[0].length, length), isHole: extents[0].isHole)] }
                    device.metrics(.blockStatus).record(bytes: 0, failed: false, nanoseconds: Self.elapsed(started))
                    var out = context.channel.allocator.buffer(capacity: 24 + 8 * extents.count)
                    NBDReply.writeBlockStatus(cookie: cookie, extents: extents, into: &out)
                    context.write(NIOAny(out), promise: nil)
                    self.wrote(context: context)
                case .failure(let error):
                    self.failed(.blockStatus, error, cookie: cookie, negotiated: negotiated, device: device, started: started, context: context)
                }
                self.resume(context: context)
            }
        }
    }

    /// Hands an operation to a store that completes it elsewhere (a remote device); false for
    /// operations it does not take (those go the usual way).
    private func startCompleting(_ store: any CompletingBlockStore, _ operation: NBDOperation, payload chunks: [ByteBuffer]?, cookie: UInt64,
                                 negotiated: NBDNegotiated, device: BlockDevice, started: NIODeadline, context: ChannelHandlerContext) -> Bool {
        let request: BlockStoreRequest
        let kind: BlockOpKind
        let bytes: Int
        switch operation {
        case .read(let offset, let length):
            request = .read(offset: offset, length: length)
            kind = .read
            bytes = Int(length)
        case .write(let offset, let fua):
            guard let chunks, let first = chunks.first else { return false }
            // A gathered large write stays the reads that brought it: the remote store sends
            // them on without joining them (that copy was 9% of the map's CPU under 1 MiB writes).
            let payload = chunks.count == 1 ? ByteBufferPieces(first) : ByteBufferPieces(chunks)
            request = .write(offset: offset, data: payload, fua: fua)
            kind = .write
            bytes = payload.readableBytes
        case .flush:
            request = .flush
            kind = .flush
            bytes = 0
        case .trim(let offset, let length, let fua):
            request = .discard(offset: offset, length: length, fua: fua)
            kind = .discard
            bytes = Int(length)
        case .writeZeroes(let offset, let length, let fua, let noHole, let fastZero):
            request = .writeZeroes(offset: offset, length: length, fua: fua, fast: fastZero, noHole: noHole)
            kind = .writeZeroes
            bytes = Int(length)
        default:
            return false
        }
        let counted = kind == .read || kind == .write ? bytes : 0
        self.begin(bytes: counted)
        // The answer usually comes on this event loop (the map's paths share it): handled at
        // once then, with no promise and no hop; from another thread, through one `execute`.
        let eventLoop = context.eventLoop
        let bound = NIOLoopBound((handler: self, context: context), eventLoop: eventLoop)
        store.start(request) { result in
            @Sendable func finish() {
                let (handler, context) = bound.value
                handler.completed(result, request: request, kind: kind, bytes: bytes, counted: counted, cookie: cookie,
                                  negotiated: negotiated, device: device, started: started, context: context)
            }
            if eventLoop.inEventLoop { finish() } else { eventLoop.execute(finish) }
        }
        return true
    }

    /// The answer of a `CompletingBlockStore` to a request `startCompleting` passed it.
    private func completed(_ result: Result<ByteBufferPieces?, BlockStoreError>, request: BlockStoreRequest, kind: BlockOpKind, bytes: Int,
                           counted: Int, cookie: UInt64, negotiated: NBDNegotiated, device: BlockDevice, started: NIODeadline,
                           context: ChannelHandlerContext) {
        self.end(bytes: counted)
        switch result {
        case .success(let data) where kind == .read:
            guard let data, data.readableBytes == bytes else {
                self.failed(kind, BlockStoreError(errno: EIO, operation: "read: \(data?.readableBytes ?? 0) bytes instead of \(bytes)"),
                            cookie: cookie, negotiated: negotiated, device: device, started: started, context: context)
                break
            }
            var header = context.channel.allocator.buffer(capacity: NBDReply.offsetDataHeaderSize)
            if negotiated.structuredReplies, case .read(let offset, _) = request {
                NBDReply.writeOffsetDataHeader(cookie: cookie, offset: offset, length: bytes, into: &header)
            } else {
                NBDReply.writeSimple(cookie: cookie, error: .ok, into: &header)
            }
            device.metrics(.read).record(bytes: bytes, failed: false, nanoseconds: Self.elapsed(started))
            context.write(NIOAny(header), promise: nil)
            if let one = data.single {
                context.write(NIOAny(one), promise: nil)
            } else {
                // A large read as the reads it arrived in on the path: written on as it is.
                for piece in data.pieces { context.write(NIOAny(piece), promise: nil) }
            }
            self.wrote(bytes, context: context)
        case .success:
            self.answered(kind, error: nil, bytes: bytes, cookie: cookie, negotiated: negotiated, device: device, started: started, context: context)
        case .failure(let error):
            self.answered(kind, error: error, bytes: bytes, cookie: cookie, negotiated: negotiated, device: device, started: started, context: context)
        }
        self.resume(context: context)
    }

    /// Answers an IO that sends no data back: done (recorded, an empty reply) or failed.
    private func answered(_ kind: BlockOpKind, error: (any Error)?, bytes: Int, cookie: UInt64, negotiated: NBDNegotiated, device: BlockDevice,
                          started: NIODeadline, context: ChannelHandlerContext) {
        if let error {
            self.failed(kind, error, cookie: cookie, negotiated: negotiated, device: device, started: started, context: context)
        } else {
            device.metrics(kind).record(bytes: bytes, failed: false, nanoseconds: Self.elapsed(started))
            self.reply(cookie: cookie, error: nil, negotiated: negotiated, context: context)
        }
    }

    /// Runs a storage call on the IO threads and answers with no data.
    private func offload(_ kind: BlockOpKind, bytes: Int, cookie: UInt64, negotiated: NBDNegotiated, device: BlockDevice, started: NIODeadline,
                         context: ChannelHandlerContext, _ body: @escaping @Sendable () throws -> Void) {
        let counted = kind == .write ? bytes : 0
        self.begin(bytes: counted)
        self.server.io.run(on: context.eventLoop, body).assumeIsolated().whenComplete { result in
            self.end(bytes: counted)
            var error: (any Error)?
            if case .failure(let e) = result { error = e }
            self.answered(kind, error: error, bytes: bytes, cookie: cookie, negotiated: negotiated, device: device, started: started, context: context)
            self.resume(context: context)
        }
    }

    /// Runs `write` here, on the event loop; true if it was done (answered) or failed
    /// (answered with the error), false if it must go to an IO thread (nothing written).
    private func writtenInline(bytes: Int, cookie: UInt64, negotiated: NBDNegotiated, device: BlockDevice, started: NIODeadline,
                               context: ChannelHandlerContext, _ write: () throws -> Bool) -> Bool {
        do {
            guard try write() else { return false }
            device.metrics(.write).record(bytes: bytes, failed: false, nanoseconds: Self.elapsed(started))
            self.reply(cookie: cookie, error: nil, negotiated: negotiated, context: context)
        } catch {
            self.failed(.write, error, cookie: cookie, negotiated: negotiated, device: device, started: started, context: context)
        }
        return true
    }

    private func failed(_ kind: BlockOpKind, _ error: any Error, cookie: UInt64, negotiated: NBDNegotiated, device: BlockDevice,
                        started: NIODeadline, context: ChannelHandlerContext) {
        let e: NBDRequestError
        if let s = error as? BlockStoreError {
            e = NBDRequestError(s.nbd, s.description)
        } else {
            e = NBDRequestError(.io, "\(error)")
        }
        self.logger.error("NBD \(kind.rawValue) failed: \(e.message)", metadata: ["cookie": "\(cookie)"])
        device.metrics(kind).record(bytes: 0, failed: true, nanoseconds: Self.elapsed(started))
        self.reply(cookie: cookie, error: e, negotiated: negotiated, context: context)
    }

    private func reply(cookie: UInt64, error: NBDRequestError?, negotiated: NBDNegotiated, context: ChannelHandlerContext) {
        var out = context.channel.allocator.buffer(capacity: 32 + (error?.message.utf8.count ?? 0))
        NBDReply.write(cookie: cookie, result: error, structured: negotiated.structuredReplies, into: &out)
        context.write(NIOAny(out), promise: nil)
        self.wrote(context: context)
    }

    /// A reply was written: it leaves with the others of the same read burst, or, for a
    /// completion outside a read, with those that complete in the same turn of the event loop
    /// (one flush, one wake-up of the client, for a burst of answers from the map's paths or
    /// the IO threads). Past `flushAfter` bytes of data it leaves at once, even in a read: a
    /// TLS handler keeps unflushed replies to itself, where the channel's writability (the
    /// back-pressure on a client that does not read) cannot see them.
    private func wrote(_ dataBytes: Int = 0, context: ChannelHandlerContext) {
        self.needsFlush = true
        self.unflushedBytes += dataBytes
        if self.unflushedBytes >= Self.flushAfter {
            self.flushReplies(context: context)
            return
        }
        guard !self.inRead, !self.flushScheduled else { return }
        self.flushScheduled = true
        context.eventLoop.assumeIsolated().execute {
            self.flushScheduled = false
            guard self.needsFlush, !self.inRead else { return }
            self.flushReplies(context: context)
        }
    }

    private func flushReplies(context: ChannelHandlerContext) {
        self.needsFlush = false
        self.unflushedBytes = 0
        context.flush()
        self.awaitNextRequest(context)
    }

    /// After answers are flushed with nothing left in flight, waits a little for the client's
    /// next request without sleeping (`ReplyPolling` says why and how long; counted in
    /// `parley_block_nbd_reply_waits_total`, labelled `outcome`). Not in the middle of a read
    /// burst, and never once the connection is ending.
    private func awaitNextRequest(_ context: ChannelHandlerContext) {
        guard self.inFlight == 0, !self.inRead, self.gather == nil, self.negotiated != nil, !self.stopping, !self.draining, !self.inactive,
              self.lastBurstRequests == 1, self.peerWait.isEnabled
        else { return }
        if case .unavailable(let errno) = self.peerWait.wait(on: context.channel) {
            self.logger.debug("cannot wait for this connection's next request (errno \(errno)); not waiting again")
        }
    }

    private func begin(bytes: Int) {
        self.inFlight += 1
        self.inFlightBytes += bytes
    }

    private func end(bytes: Int) {
        self.inFlight -= 1
        self.inFlightBytes -= bytes
    }

    /// After a completion: free the device if the connection is gone, finish a disconnect,
    /// or take up requests that were waiting for room.
    private func resume(context: ChannelHandlerContext) {
        if self.inactive {
            self.releaseDeviceIfIdle()
            return
        }
        if self.stopping || self.draining {
            self.closeIfIdle(context: context)
            if self.stopping { return }
        }
        if self.input != nil {
            self.process(context: context)
        }
        if self.readHeld, self.mayTakeRequests(context) {
            self.readHeld = false
            context.read()
        }
    }

    private static func elapsed(_ started: NIODeadline) -> Int64 {
        (NIODeadline.now() - started).nanoseconds
    }

    static func kind(_ command: NBD.Command?) -> BlockOpKind? {
        switch command {
        case .read: return .read
        case .write: return .write
        case .flush: return .flush
        case .trim: return .discard
        case .writeZeroes: return .writeZeroes
        case .cache: return .cache
        case .blockStatus: return .blockStatus
        default: return nil
        }
    }
}
