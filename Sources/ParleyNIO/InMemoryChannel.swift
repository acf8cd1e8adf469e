import NIOConcurrencyHelpers
import NIOCore

/// Two connected channels in one process whose bytes never leave memory: no socket, no kernel,
/// no address. What one end flushes is read by the other on its own event loop, in order.
///
/// Behaves like a stream socket as far as Parley needs: reads are delivered only when the
/// pipeline asks for them (`read()`, or automatically with `autoRead`, the default), so a
/// connection that stops reading makes the bytes wait; a write completes once the peer has
/// read it; `isWritable` turns false while more than `highWatermark` bytes wait unread at the
/// peer; closing one end closes the other after it has read what was already sent.
///
/// Create a pair with `InMemoryChannel.pair(group:)`, configure both pipelines, then
/// `activate()` both (which is what `InMemoryTransport` does).
public final class InMemoryChannel: Channel, ChannelCore, @unchecked Sendable {
    // All mutable state is confined to `eventLoop`, except `unreadAtPeer`, which is shared
    // with the peer's loop and guarded by its lock.

    public let eventLoop: any EventLoop
    public let allocator = ByteBufferAllocator()
    public var parent: (any Channel)? { nil }
    public var localAddress: SocketAddress? { nil }
    public var remoteAddress: SocketAddress? { nil }
    public var _channelCore: any ChannelCore { self }
    public var closeFuture: EventLoopFuture<Void> { self.closePromise.futureResult }
    public var pipeline: ChannelPipeline { self._pipeline }

    /// Bytes above which `isWritable` is false while they wait unread at the peer.
    public static let highWatermark = 1 << 20

    private var _pipeline: ChannelPipeline!
    private let closePromise: EventLoopPromise<Void>
    /// The other end; cleared once both ends have closed.
    private var peer: InMemoryChannel?
    private let active = NIOLockedValueBox(false)
    private var isOpen = true
    private var autoRead = true
    private var readRequested = false
    /// Written but not yet flushed.
    private var pendingWrites: [(ByteBuffer, EventLoopPromise<Void>?)] = []
    /// Flushed by the peer, not yet read by this end's pipeline.
    private var inbound: [(ByteBuffer, EventLoopPromise<Void>?)] = []
    /// The peer has closed: once `inbound` is read, this end closes too.
    private var peerClosed = false
    /// Bytes this end has flushed that the peer has not read yet.
    private let unreadAtPeer = NIOLockedValueBox(0)

    private init(eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
        self.closePromise = eventLoop.makePromise()
        self._pipeline = ChannelPipeline(channel: self)
    }

    /// Makes two connected ends, each on an event loop of `group`.
    public static func pair(group: any EventLoopGroup) -> (InMemoryChannel, InMemoryChannel) {
        let a = InMemoryChannel(eventLoop: group.next())
        let b = InMemoryChannel(eventLoop: group.next())
        a.peer = b
        b.peer = a
        return (a, b)
    }

    /// Registers the channel and makes it active (`channelActive` fires), on its event loop.
    public func activate() -> EventLoopFuture<Void> {
        self.eventLoop.submit {
            self.active.withLockedValue { $0 = true }
            self.pipeline.syncOperations.fireChannelRegistered()
            self.pipeline.syncOperations.fireChannelActive()
            if self.autoRead { self.pipeline.syncOperations.read() }
        }
    }

    public var isActive: Bool { self.active.withLockedValue { $0 } }
    public var isWritable: Bool { self.unreadAtPeer.withLockedValue { $0 } < Self.highWatermark }

    public var syncOptions: (any NIOSynchronousChannelOptions)? { nil }

    public func setOption<Option: ChannelOption>(_ option: Option, value: Option.Value) -> EventLoopFuture<Void> {
        self.eventLoop.submit {
            if option is ChannelOptions.Types.AutoReadOption {
                self.autoRead = value as! Bool
                if self.autoRead { self.pipeline.syncOperations.read() }
            }
            // Socket options (TCP_NODELAY, buffer sizes, ...) mean nothing here.
        }
    }

    public func getOption<Option: ChannelOption>(_ option: Option) -> EventLoopFuture<Option.Value> {
        self.eventLoop.submit {
            if option is ChannelOptions.Types.AutoReadOption { return self.autoRead as! Option.Value }
            if option is ChannelOptions.Types.AllowRemoteHalfClosureOption { return false as! Option.Value }
            throw ChannelError.operationUnsupported
        }
    }

    // MARK: - ChannelCore (on the event loop)

    public func localAddress0() throws -> SocketAddress { throw ChannelError.operationUnsupported }
    public func remoteAddress0() throws -> SocketAddress { throw ChannelError.operationUnsupported }
    public func register0(promise: EventLoopPromise<Void>?) { promise?.succeed(()) }
    public func registerAlreadyConfigured0(promise: EventLoopPromise<Void>?) { promise?.succeed(()) }
    public func bind0(to: SocketAddress, promise: EventLoopPromise<Void>?) { promise?.fail(ChannelError.operationUnsupported) }
    public func connect0(to: SocketAddress, promise: EventLoopPromise<Void>?) { promise?.fail(ChannelError.operationUnsupported) }
    public func triggerUserOutboundEvent0(_ event: Any, promise: EventLoopPromise<Void>?) { promise?.fail(ChannelError.operationUnsupported) }
    public func channelRead0(_ data: NIOAny) {}
    public func errorCaught0(error: any Error) {}

    public func write0(_ data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard self.isOpen else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        let buffer: ByteBuffer = self.unwrapData(data)
        self.pendingWrites.append((buffer, promise))
    }

    public func flush0() {
        guard self.isOpen, !self.pendingWrites.isEmpty, let peer = self.peer else { return }
        let batch = self.pendingWrites
        self.pendingWrites = []
        let bytes = batch.reduce(0) { $0 + $1.0.readableBytes }
        let wasWritable = self.unreadAtPeer.withLockedValue { n -> Bool in
            defer { n += bytes }
            return n < Self.highWatermark
        }
        if wasWritable && !self.isWritable { self.pipeline.syncOperations.fireChannelWritabilityChanged() }
        peer.eventLoop.execute { peer.received(batch) }
    }

    public func read0() {
        self.readRequested = true
        self.deliver()
    }

    public func close0(error: any Error, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        guard self.isOpen else {
            promise?.fail(ChannelError.alreadyClosed)
            return
        }
        guard mode == .all else {
            promise?.fail(ChannelError.operationUnsupported)
            return
        }
        self.isOpen = false
        self.active.withLockedValue { $0 = false }
        let unsent = self.pendingWrites
        self.pendingWrites = []
        unsent.forEach { $0.1?.fail(ChannelError.ioOnClosedChannel) }
        let unread = self.inbound
        self.inbound = []
        unread.forEach { $0.1?.fail(ChannelError.ioOnClosedChannel) }
        if let peer = self.peer {
            peer.eventLoop.execute { peer.peerDidClose() }
        }
        self.peer = nil
        promise?.succeed(())
        self.pipeline.syncOperations.fireChannelInactive()
        self.pipeline.syncOperations.fireChannelUnregistered()
        let loopBound = NIOLoopBound(self, eventLoop: self.eventLoop)
        self.eventLoop.execute {
            // Later, as the caller's code may still be walking the pipeline.
            let this = loopBound.value
            this.removeHandlers(pipeline: this.pipeline)
            this.closePromise.succeed(())
        }
    }

    // MARK: - From the peer (on this end's event loop)

    private func received(_ batch: [(ByteBuffer, EventLoopPromise<Void>?)]) {
        guard self.isOpen else {
            batch.forEach { $0.1?.fail(ChannelError.ioOnClosedChannel) }
            return
        }
        self.inbound.append(contentsOf: batch)
        self.deliver()
    }

    private func peerDidClose() {
        self.peerClosed = true
        self.peer = nil
        self.deliver()
    }

    /// Hands what has arrived to the pipeline if it asked for a read; closes after the last
    /// bytes of a peer that has closed.
    private func deliver() {
        guard self.isOpen, self.readRequested else { return }
        if !self.inbound.isEmpty {
            self.readRequested = false
            var batch: [(ByteBuffer, EventLoopPromise<Void>?)] = []
            swap(&batch, &self.inbound)
            for (buffer, _) in batch {
                self.pipeline.syncOperations.fireChannelRead(NIOAny(buffer))
            }
            self.pipeline.syncOperations.fireChannelReadComplete()
            self.acknowledge(batch)
            if self.isOpen && self.autoRead { self.pipeline.syncOperations.read() }
        }
        if self.isOpen && self.peerClosed && self.inbound.isEmpty {
            self.close0(error: ChannelError.eof, mode: .all, promise: nil)
        }
    }

    /// Completes the sender's write promises and frees its window, on the sender's loop.
    private func acknowledge(_ batch: [(ByteBuffer, EventLoopPromise<Void>?)]) {
        let bytes = batch.reduce(0) { $0 + $1.0.readableBytes }
        batch.forEach { $0.1?.succeed(()) }
        guard let sender = self.peer else { return }
        sender.eventLoop.execute { sender.peerRead(bytes) }
    }

    private func peerRead(_ bytes: Int) {
        let wasWritable = self.isWritable
        self.unreadAtPeer.withLockedValue { $0 -= bytes }
        if !wasWritable && self.isWritable && self.isOpen {
            self.pipeline.syncOperations.fireChannelWritabilityChanged()
        }
    }
}
