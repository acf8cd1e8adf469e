import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Parley
import ParleyChaos
import ParleyServices
import ParleyWire
import Testing

/// The fault proxy's plan (pure) and the proxy itself between a real client and server.
@Suite(.timeLimit(.minutes(10))) struct ChaosPlanTests {
    @Test func transparentPlanPassesChunksWhole() {
        var plan = ChaosPlan(settings: .init(), seed: 1)
        #expect(plan.settings.isTransparent)
        #expect(plan.plan(1000) == .init(pieces: [.init(offset: 0, length: 1000, delayMilliseconds: 0)], cut: false))
        #expect(plan.passed == 1000)
    }

    @Test func fragmentsCoverTheChunkInOrderWithinTheLimit() {
        var plan = ChaosPlan(settings: .init(fragment: 7), seed: 42)
        for size in [1, 7, 8, 1000, 65536] {
            let step = plan.plan(size)
            #expect(!step.cut)
            #expect(step.pieces.allSatisfy { (1...7).contains($0.length) })
            var offset = 0
            for piece in step.pieces {
                #expect(piece.offset == offset)
                offset += piece.length
            }
            #expect(offset == size)
        }
    }

    @Test func cutAfterBytesCutsAtExactlyThatByteAcrossChunks() {
        var plan = ChaosPlan(settings: .init(cutAfterBytes: 250), seed: 1)
        #expect(!plan.plan(100).cut)
        #expect(!plan.plan(100).cut)
        let step = plan.plan(100)
        #expect(step.cut && step.bytesBeforeCut == 50)
    }

    @Test func theSameSeedGivesTheSameFaults() {
        let settings = ChaosPlan.Settings(cutProbability: 0.05, fragment: 13, jitterMilliseconds: 5)
        func run(_ seed: UInt64) -> [ChaosPlan.Step] {
            var plan = ChaosPlan(settings: settings, seed: seed)
            return (0..<200).map { _ in plan.plan(500) }
        }
        #expect(run(9) == run(9))
        #expect(run(9) != run(10))
        #expect(run(9).contains { $0.cut }, "a 5% cut probability cuts within 200 chunks")
    }

    @Test func aStallDelaysThePieceThatCrossesTheMarkOnce() {
        var plan = ChaosPlan(settings: .init(stallAfterBytes: 150, stallMilliseconds: 500), seed: 1)
        let first = plan.plan(100)
        #expect(first.pieces.map(\.delayMilliseconds) == [0])
        let second = plan.plan(100)
        #expect(second.pieces == [.init(offset: 0, length: 50, delayMilliseconds: 0), .init(offset: 50, length: 50, delayMilliseconds: 500)])
        #expect(plan.plan(100).pieces.map(\.delayMilliseconds) == [0])
    }

    @Test func aRateGivesEachPieceTheTimeItsBytesTake() {
        var whole = ChaosPlan(settings: .init(rateBytesPerSecond: 1_000_000), seed: 1)
        #expect(whole.plan(5000).pieces == [.init(offset: 0, length: 5000, delayMilliseconds: 0, transmitNanoseconds: 5_000_000)])
        // Fragmented, the pieces together take what their bytes take: what each leaves over
        // when rounded down to nanoseconds is carried, across chunks too (at 3 bytes/s, a
        // byte takes 333,333,333.3 ns; at 3 GB/s, 0.33 ns: alone, each would be 0).
        for rate in [3, 3_000_000_000] {
            var split = ChaosPlan(settings: .init(fragment: 100, rateBytesPerSecond: rate), seed: 7)
            let pieces = split.plan(10_000).pieces + split.plan(5_000).pieces
            #expect(pieces.count > 2)
            #expect(pieces.reduce(0) { $0 + $1.transmitNanoseconds } == Int64(15_000) * 1_000_000_000 / Int64(rate))
        }
        #expect(!ChaosPlan.Settings(rateBytesPerSecond: 1).isTransparent)
        var free = ChaosPlan(settings: .init(), seed: 1)
        #expect(free.plan(5000).pieces.map(\.transmitNanoseconds) == [0])
    }
}

@Suite(.timeLimit(.minutes(10))) struct ChaosProxyTests {
    @Test func requestsGetThroughFragmentedAndDelayedBytes() async throws {
        try await withServer { _, addresses in
            let proxy = ChaosProxy(configuration: .init(
                listen: .tcp(host: "127.0.0.1", port: 0), target: addresses[0],
                toServer: .init(fragment: 5, jitterMilliseconds: 2), toClient: .init(fragment: 3), seed: 3
            ))
            let address = try await proxy.start()
            let client = try await ParleyClient.connect(to: address, logger: quietLogger)
            for i in 1...20 { #expect(try await ping(client, UInt64(i)) == UInt64(i)) }
            var echo = Parley_Echo_V1_Echo()
            echo.payload = Data((0..<3000).map { UInt8(truncatingIfNeeded: $0) })
            let reply = try await client.request(echo, as: Parley_Echo_V1_EchoReply.self)
            #expect(reply.payload == echo.payload)
            client.close()
            await proxy.stop()
            #expect(proxy.counts == (1, 0))
        }
    }

    /// A rate holds a direction to that many bytes per second: 256 KiB of echo at 1 MiB/s
    /// towards the client takes a quarter of a second at least (a bound below, which a slow
    /// machine cannot break), and arrives whole.
    @Test func aRateHoldsTheBytesBack() async throws {
        try await withServer { _, addresses in
            let proxy = ChaosProxy(configuration: .init(
                listen: .tcp(host: "127.0.0.1", port: 0), target: addresses[0], toClient: .init(rateBytesPerSecond: 1 << 20), seed: 1
            ))
            let address = try await proxy.start()
            let client = try await ParleyClient.connect(to: address, logger: quietLogger)
            var echo = Parley_Echo_V1_Echo()
            echo.payload = Data((0..<(256 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 7) })
            let started = ContinuousClock.now
            let reply = try await client.request(echo, as: Parley_Echo_V1_EchoReply.self)
            let took = ContinuousClock.now - started
            #expect(reply.payload == echo.payload)
            #expect(took >= .milliseconds(245), "256 KiB at 1 MiB/s: \(took)")
            client.close()
            await proxy.stop()
        }
    }

    @Test func aCutEndsTheClientsConnectionWithConnectionClosed() async throws {
        try await withServer { _, addresses in
            let lines = NIOLockedValueBox<[String]>([])
            let proxy = ChaosProxy(
                configuration: .init(listen: .tcp(host: "127.0.0.1", port: 0), target: addresses[0], toServer: .init(cutAfterBytes: 400), seed: 1),
                report: { line in lines.withLockedValue { $0.append(line) } }
            )
            let address = try await proxy.start()
            let client = try await ParleyClient.connect(to: address, logger: quietLogger)
            var failure: ParleyError?
            for i in 1...50 {
                do { _ = try await ping(client, UInt64(i)) } catch let error as ParleyError {
                    failure = error
                    break
                }
            }
            #expect(failure?.code == .connectionClosed)
            #expect(try await eventually { proxy.counts.cuts == 1 })
            #expect(lines.withLockedValue { $0 }.contains { $0.contains("c2s: cut after 400 bytes") })
            await proxy.stop()
        }
    }
}

/// How the proxy passes on the end of a side's stream: whole, after everything sent before it
/// (half-closed connections included), and to a target whose connect was still in progress.
@Suite(.timeLimit(.minutes(10))) struct ChaosProxyCloseTests {
    /// A sender that writes 32 MiB and closes, in front of a target that reads nothing for
    /// 1 s and then slowly (64 KiB every 4 ms, ~16 MB/s, 2 s for the lot): when the client's
    /// end of stream reaches the proxy, up to its high water (4 MiB) and more still wait in it
    /// to be written, and all of it must reach the target before its end.
    @Test func everythingSentBeforeAnEndOfStreamReachesASlowReceiver() async throws {
        let log = TargetLog()
        let target = try await startTarget(TargetBehaviour(readAfter: .seconds(1), readPace: .milliseconds(4)), log: log)
        let proxy = ChaosProxy(configuration: .init(listen: .tcp(host: "127.0.0.1", port: 0), target: target.address, seed: 1))
        let address = try await proxy.start()
        let replies = ClientLog()
        let client = try await connectClient(to: address, log: replies)
        var chunk = ByteBufferAllocator().buffer(capacity: 1 << 20)
        chunk.writeRepeatingByte(0x5A, count: 1 << 20)
        let written = client.eventLoop.makePromise(of: Void.self)
        for i in 0..<32 { client.writeAndFlush(chunk, promise: i == 31 ? written : nil) }
        try await written.futureResult.get()
        try await client.close()
        #expect(try await eventually(seconds: 120) { log.connections.values.contains { $0.ended } }, "the target's connection never ended")
        #expect(log.connections.values.map(\.received) == [32 << 20])
        await proxy.stop()
        try await target.listener.close()
    }

    /// A client that sends its request and shuts down its output (`nc -N`) gets the answer
    /// the target sends once it has seen the end of the request.
    @Test func aHalfClosingClientStillGetsTheAnswer() async throws {
        let log = TargetLog()
        let target = try await startTarget(TargetBehaviour(answer: { "answer to \($0)" }), log: log)
        let proxy = ChaosProxy(configuration: .init(listen: .tcp(host: "127.0.0.1", port: 0), target: target.address, seed: 1))
        let address = try await proxy.start()
        let replies = ClientLog()
        let client = try await connectClient(to: address, log: replies)
        try await client.writeAndFlush(ByteBuffer(string: "a request"))
        try await client.close(mode: .output)
        #expect(try await eventually(seconds: 30) { replies.state.withLockedValue { $0.ended } }, "the client's connection never ended")
        #expect(replies.state.withLockedValue { $0.text } == "answer to a request")
        try? await client.close()
        await proxy.stop()
        try await target.listener.close()
    }

    /// A client that sends a little and hangs up while the proxy is still connecting to the
    /// target: once connected, the proxy passes on the bytes and the end of stream (it must not
    /// hold the target's connection open for ever). The target's accept queue is kept full, so
    /// that the proxy's connect can only complete after the client has gone.
    @Test func aClientGoneBeforeTheTargetConnectCompletesEndsTheTargetConnection() async throws {
        let log = TargetLog()
        let target = try await startTarget(TargetBehaviour(backlog: 1, accepting: false), log: log)
        guard case .tcp(let host, let port) = target.address.kind else { return }
        // Fill the accept queue: a connect that does not complete within 500 ms means it is full.
        var blockers: [any Channel] = []
        var full = false
        for _ in 0..<8 {
            do {
                blockers.append(try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton).connectTimeout(.milliseconds(500))
                    .connect(host: host, port: port).get())
            } catch {
                full = true
                break
            }
        }
        try #require(full, "the target's accept queue did not fill")
        let blockerPorts = Set(blockers.compactMap { $0.localAddress?.port })
        let lines = NIOLockedValueBox<[String]>([])
        let proxy = ChaosProxy(
            configuration: .init(listen: .tcp(host: "127.0.0.1", port: 0), target: target.address, seed: 1),
            report: { line in lines.withLockedValue { $0.append(line) } }
        )
        let address = try await proxy.start()
        let client = try await connectClient(to: address, log: ClientLog())
        try await client.writeAndFlush(ByteBuffer(string: "early"))
        try await client.close()
        #expect(try await eventually(seconds: 30) { lines.withLockedValue { $0 }.contains { $0.contains("conn 1 c2s: closed by its sender") } })
        try #require(!lines.withLockedValue { $0 }.contains { $0.hasPrefix("conn 1: ") && $0.contains(" -> ") }, "the proxy connected before the client left")
        // Let the target accept: the proxy's connect completes at its next SYN.
        try await target.listener.setOption(.autoRead, value: true).get()
        let ended = try await eventually(seconds: 30) {
            log.connections.contains { !blockerPorts.contains($0.key) && $0.value.ended }
        }
        #expect(ended, "the target's connection from the proxy never ended: \(log.connections)")
        #expect(log.connections.filter { !blockerPorts.contains($0.key) }.map(\.value.received) == [5])
        for blocker in blockers { try? await blocker.close() }
        await proxy.stop()
        try await target.listener.close()
    }
}

/// What a test target does with its connections.
private struct TargetBehaviour: Sendable {
    /// Read nothing for this long after accepting.
    var readAfter: TimeAmount = .zero
    /// Then read (at most 64 KiB) once per this long (nil: as fast as it comes).
    var readPace: TimeAmount?
    /// Sent back (given the bytes received, as text) once the connection's input has ended.
    var answer: (@Sendable (String) -> String)?
    var backlog: Int32 = 256
    /// Whether the listener accepts at once (or only once its autoRead is set).
    var accepting = true
}

/// What a test target saw, per connection (by its peer's port).
private final class TargetLog: Sendable {
    struct Connection: Sendable {
        var received = 0
        var text = ""
        var ended = false
    }
    private let state = NIOLockedValueBox<[Int: Connection]>([:])
    func update(_ port: Int, _ body: (inout Connection) -> Void) { self.state.withLockedValue { body(&$0[port, default: Connection()]) } }
    var connections: [Int: Connection] { self.state.withLockedValue { $0 } }
}

private final class TargetHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let log: TargetLog
    let behaviour: TargetBehaviour
    var port = 0
    var text = ""
    var ended = false

    init(log: TargetLog, behaviour: TargetBehaviour) {
        self.log = log
        self.behaviour = behaviour
    }

    func channelActive(context: ChannelHandlerContext) {
        self.port = context.channel.remoteAddress?.port ?? 0
        self.log.update(self.port) { _ in }
        let channel = context.channel
        context.eventLoop.scheduleTask(in: self.behaviour.readAfter) { channel.setOption(.autoRead, value: true).whenComplete { _ in } }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = self.unwrapInboundIn(data)
        if self.text.utf8.count < 4096 { self.text += String(buffer: bytes) }
        let text = self.text
        self.log.update(self.port) { $0.received += bytes.readableBytes; $0.text = text }
        if let pace = self.behaviour.readPace {
            try? context.channel.syncOptions?.setOption(.autoRead, value: false)
            let channel = context.channel
            context.eventLoop.scheduleTask(in: pace) { channel.setOption(.autoRead, value: true).whenComplete { _ in } }
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed { self.end(context: context) }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.end(context: context)
        context.fireChannelInactive()
    }

    private func end(context: ChannelHandlerContext) {
        guard !self.ended else { return }
        self.ended = true
        self.log.update(self.port) { $0.ended = true }
        if let answer = self.behaviour.answer, context.channel.isActive {
            context.writeAndFlush(self.wrapOutboundOut(ByteBuffer(string: answer(self.text))), promise: nil)
        }
        context.close(promise: nil)
    }
}

private func startTarget(_ behaviour: TargetBehaviour, log: TargetLog) async throws -> (listener: any Channel, address: ParleyAddress) {
    let listener = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .serverChannelOption(.backlog, value: behaviour.backlog)
        .serverChannelOption(.autoRead, value: behaviour.accepting)
        .childChannelOption(.autoRead, value: false)
        .childChannelOption(.allowRemoteHalfClosure, value: true)
        .childChannelOption(.maxMessagesPerRead, value: 1)
        .childChannelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: 64 << 10))
        .childChannelInitializer { channel in
            channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(TargetHandler(log: log, behaviour: behaviour)) }
        }
        .bind(host: "127.0.0.1", port: 0).get()
    return (listener, .tcp(host: "127.0.0.1", port: listener.localAddress?.port ?? 0))
}

/// What a test client received, and whether its input ended.
private final class ClientLog: Sendable {
    let state = NIOLockedValueBox<(text: String, ended: Bool)>(("", false))
}

private final class ClientHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let log: ClientLog
    init(log: ClientLog) { self.log = log }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let text = String(buffer: self.unwrapInboundIn(data))
        self.log.state.withLockedValue { $0.text += text }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed { self.log.state.withLockedValue { $0.ended = true } }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.log.state.withLockedValue { $0.ended = true }
        context.fireChannelInactive()
    }
}

private func connectClient(to address: ParleyAddress, log: ClientLog) async throws -> any Channel {
    guard case .tcp(let host, let port) = address.kind else { throw ParleyError(code: .invalidArgument, message: "not TCP: \(address)") }
    return try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .channelOption(.allowRemoteHalfClosure, value: true)
        .channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(ClientHandler(log: log)) }
        }
        .connect(host: host, port: port).get()
}
