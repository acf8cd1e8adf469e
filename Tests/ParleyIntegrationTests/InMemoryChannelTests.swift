import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ParleyNIO
import Testing

/// Collects what a channel reads, and counts the reads the pipeline asked for.
final class Collector: ChannelDuplexHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    let received = NIOLockedValueBox<[UInt8]>([])
    let inactive = NIOLockedValueBox(false)
    /// While true, `read()` is held back, like a connection at its handler limit.
    let holdReads = NIOLockedValueBox(false)
    private var heldRead = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = self.unwrapInboundIn(data)
        self.received.withLockedValue { $0.append(contentsOf: buffer.readableBytesView) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.inactive.withLockedValue { $0 = true }
        context.fireChannelInactive()
    }

    func read(context: ChannelHandlerContext) {
        if self.holdReads.withLockedValue({ $0 }) {
            self.heldRead = true
        } else {
            context.read()
        }
    }

    func release(context: ChannelHandlerContext) {
        self.holdReads.withLockedValue { $0 = false }
        if self.heldRead {
            self.heldRead = false
            context.read()
        }
    }
}

@Suite(.timeLimit(.minutes(3)))
struct InMemoryChannelTests {
    func connectedPair() async throws -> (InMemoryChannel, Collector, InMemoryChannel, Collector) {
        let (a, b) = InMemoryChannel.pair(group: MultiThreadedEventLoopGroup.singleton)
        let ca = Collector(), cb = Collector()
        try await a.pipeline.addHandler(ca).get()
        try await b.pipeline.addHandler(cb).get()
        try await a.activate().get()
        try await b.activate().get()
        return (a, ca, b, cb)
    }

    @Test func bytesArriveInOrderInBothDirections() async throws {
        let (a, ca, b, cb) = try await connectedPair()
        #expect(a.isActive && b.isActive)
        #expect(a.remoteAddress == nil, "an in-memory channel has no address")
        for i in 0..<100 {
            try await a.writeAndFlush(ByteBuffer(bytes: [UInt8(i)])).get()
            try await b.writeAndFlush(ByteBuffer(bytes: [UInt8(255 - i)])).get()
        }
        #expect(cb.received.withLockedValue { $0 } == (0..<100).map { UInt8($0) })
        #expect(ca.received.withLockedValue { $0 } == (0..<100).map { UInt8(255 - $0) })
        try await a.close().get()
    }

    @Test func unflushedWritesAreNotDelivered() async throws {
        let (a, _, _, cb) = try await connectedPair()
        let written = a.eventLoop.makePromise(of: Void.self)
        a.write(ByteBuffer(bytes: [1, 2, 3]), promise: written)
        try await Task.sleep(for: .milliseconds(50))
        #expect(cb.received.withLockedValue { $0 }.isEmpty)
        a.flush()
        try await written.futureResult.get()
        #expect(cb.received.withLockedValue { $0 } == [1, 2, 3])
        try await a.close().get()
    }

    @Test func bytesWaitWhileTheReaderHoldsItsReadsAndTheWriterSeesBackPressure() async throws {
        let (a, _, b, cb) = try await connectedPair()
        cb.holdReads.withLockedValue { $0 = true }
        // One delivery consumes the read that was already requested; later bytes must wait.
        try await a.writeAndFlush(ByteBuffer(bytes: [0])).get()
        let big = ByteBuffer(repeating: 7, count: InMemoryChannel.highWatermark + 1)
        let bigWritten = a.eventLoop.makePromise(of: Void.self)
        a.writeAndFlush(big, promise: bigWritten)
        #expect(try await eventuallyTrue { !a.isWritable }, "the writer sees the unread bytes")
        try await Task.sleep(for: .milliseconds(50))
        #expect(cb.received.withLockedValue { $0.count } == 1, "nothing more is read while reads are held")
        try await b.eventLoop.submit { cb.release(context: try b.pipeline.syncOperations.context(handler: cb)) }.get()
        try await bigWritten.futureResult.get()
        #expect(cb.received.withLockedValue { $0.count } == 1 + big.readableBytes)
        #expect(try await eventuallyTrue { a.isWritable }, "reading frees the writer's window")
        try await a.close().get()
    }

    @Test func closingOneEndClosesTheOtherAfterItHasReadEverything() async throws {
        let (a, _, b, cb) = try await connectedPair()
        a.write(ByteBuffer(bytes: [9, 8, 7]), promise: nil)
        a.flush()
        try await a.close().get()
        try await b.closeFuture.get()
        #expect(cb.received.withLockedValue { $0 } == [9, 8, 7])
        #expect(cb.inactive.withLockedValue { $0 })
        await #expect(throws: ChannelError.self) { try await a.writeAndFlush(ByteBuffer(bytes: [1])).get() }
        await #expect(throws: ChannelError.self) { try await b.writeAndFlush(ByteBuffer(bytes: [1])).get() }
        await #expect(throws: ChannelError.self) { try await a.close().get() }
    }

    @Test func addressesAndSocketOperationsAreRefused() async throws {
        let (a, _, _, _) = try await connectedPair()
        await #expect(throws: ChannelError.self) { try await a.bind(to: SocketAddress(ipAddress: "127.0.0.1", port: 0)).get() }
        await #expect(throws: ChannelError.self) { try await a.getOption(.socketOption(.so_reuseaddr)).get() }
        #expect(try await a.getOption(.autoRead).get())
        try await a.close().get()
    }
}

private func eventuallyTrue(_ condition: @escaping @Sendable () -> Bool) async throws -> Bool {
    for _ in 0..<200 {
        if condition() { return true }
        try await Task.sleep(for: .milliseconds(10))
    }
    return condition()
}
