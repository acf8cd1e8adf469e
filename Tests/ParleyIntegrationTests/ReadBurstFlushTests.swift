import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
@testable import ParleyNIO
import ParleyWire
import Testing

/// How answers made during one read burst leave the connection handler: coalesced into one
/// flush at the burst's end, except that every `flushEvery` of them are flushed at once.
/// Two handlers in embedded channels, their bytes carried by the test, so that the test
/// decides where a read burst ends.
@Suite struct ReadBurstFlushTests {
    /// Counts the flushes that reach the socket's end of the pipeline.
    final class FlushCounter: ChannelOutboundHandler, @unchecked Sendable {
        typealias OutboundIn = ByteBuffer
        var flushes = 0
        func flush(context: ChannelHandlerContext) {
            self.flushes += 1
            context.flush()
        }
    }

    /// Answers every request at once, from inside the read that decoded it.
    final class EchoSink: ParleyEventSink, @unchecked Sendable {
        var outlet: ParleyConnectionHandler.Outlet?
        var received: [WireMessage] = []
        func received(_ event: ConnectionEvent) {
            guard case .message(let m) = event else { return }
            self.received.append(m)
            if m.header.kind == .request {
                let answer = WireMessage(header: MessageHeader(id: m.header.id, kind: .response, type: "t"), payload: m.payload)
                self.outlet?.write(.message(answer))
            }
        }
        func closed(_ reason: ParleyError) {}
    }

    struct Pair {
        let client: EmbeddedChannel
        let server: EmbeddedChannel
        let clientSink = EchoSink()
        let serverSink = EchoSink()
        let counter = FlushCounter()
    }

    /// A client and a server handler, handshake done, the server flushing every `flushEvery`.
    static func established(flushEvery: Int, replyPolling: TimeAmount = .zero) throws -> Pair {
        let banner = Banner(supported: .implemented, required: [], modes: [.crc])
        let size = UInt32(Frame.defaultMaxFrameSize)
        var clientIdent = Parley_V1_ClientIdent()
        clientIdent.version = "1.0.0"
        clientIdent.clientNonce = 7
        let clientMachine = ClientHandshakeStateMachine(configuration: .init(banner: banner, maxFrameSize: size, ident: clientIdent, serverAddress: "test"))
        let serverMachine = ServerHandshakeStateMachine(configuration: .init(banner: banner, maxFrameSize: size, ident: Parley_V1_ServerIdent(), clientAddress: "test"))
        let pair = Pair(client: EmbeddedChannel(), server: EmbeddedChannel())
        let clientHandler = ParleyConnectionHandler(role: .client(clientMachine), eventLoop: pair.client.eventLoop) { [sink = pair.clientSink] _, outlet in
            sink.outlet = outlet
            return EstablishedLink(sink: sink)
        }
        let serverHandler = ParleyConnectionHandler(role: .server(serverMachine), eventLoop: pair.server.eventLoop) { [sink = pair.serverSink] _, outlet in
            sink.outlet = outlet
            return EstablishedLink(sink: sink)
        }
        try pair.server.pipeline.syncOperations.addHandler(pair.counter)
        var serverOptions = PipelineOptions(flushEvery: flushEvery), clientOptions = PipelineOptions()
        serverOptions.replyPolling = replyPolling
        clientOptions.replyPolling = replyPolling
        try ParleyPipeline.configure(pair.server, options: serverOptions, handler: serverHandler)
        try ParleyPipeline.configure(pair.client, options: clientOptions, handler: clientHandler)
        let address = try SocketAddress(ipAddress: "127.0.0.1", port: 1)
        try pair.server.connect(to: address).wait()
        try pair.client.connect(to: address).wait()
        // Carry bytes both ways, one read burst per batch, until neither side sends more.
        for _ in 0..<20 {
            let toServer = try Self.take(pair.client), toClient = try Self.take(pair.server)
            if toServer == nil, toClient == nil { break }
            if let toServer { try Self.burst(toServer, into: pair.server) }
            if let toClient { try Self.burst(toClient, into: pair.client) }
        }
        try #require(pair.clientSink.outlet != nil && pair.serverSink.outlet != nil, "the handshake did not complete")
        return pair
    }

    /// Everything a channel has flushed so far, as one buffer (nil: nothing).
    static func take(_ channel: EmbeddedChannel) throws -> ByteBuffer? {
        channel.embeddedEventLoop.run()  // flushes scheduled for the end of the tick
        var all: ByteBuffer?
        while var part = try channel.readOutbound(as: ByteBuffer.self) {
            if all == nil { all = part } else { all!.writeBuffer(&part) }
        }
        return all
    }

    /// One read burst: one channelRead with all of `bytes`, then channelReadComplete, and
    /// then what the event loop was asked to do meanwhile (`writeInbound` ends the read burst
    /// itself, so the test could not look between the read and its end).
    static func burst(_ bytes: ByteBuffer, into channel: EmbeddedChannel) throws {
        channel.pipeline.fireChannelRead(bytes)
        channel.pipeline.fireChannelReadComplete()
        channel.embeddedEventLoop.run()
        try channel.throwIfErrorCaught()
    }

    /// Sends 40 requests from the client in one read of the server's; returns the server's
    /// flushes during that read (before its end) and in all.
    static func fortyRequests(_ pair: Pair, firstID: Int = 1) throws -> (duringRead: Int, total: Int, answers: Int) {
        for id in firstID..<(firstID + 40) {
            pair.clientSink.outlet!.write(.message(WireMessage(header: MessageHeader(id: UInt64(id), kind: .request, type: "t"), payload: ByteBuffer(bytes: [8, UInt8(id)]))))
        }
        let requests = try #require(try Self.take(pair.client))
        let before = pair.counter.flushes
        pair.server.pipeline.fireChannelRead(requests)
        let during = pair.counter.flushes - before
        pair.server.pipeline.fireChannelReadComplete()
        pair.server.embeddedEventLoop.run()
        try pair.server.throwIfErrorCaught()
        let total = pair.counter.flushes - before
        let answers = try #require(try Self.take(pair.server))
        try Self.burst(answers, into: pair.client)
        return (during, total, pair.clientSink.received.count)
    }

    @Test func answersOfALongReadBurstLeaveEverySixteenAndAllOfThemArrive() throws {
        let pair = try Self.established(flushEvery: 16)
        let result = try Self.fortyRequests(pair)
        #expect(pair.serverSink.received.count == 40)
        #expect(result.duringRead == 2, "answers 1-16 and 17-32 flushed while the read was still being handled")
        #expect(result.total == 3, "answers 33-40 flushed when the read burst ended")
        #expect(result.answers == 40)
        #expect(pair.clientSink.received.map(\.header.id) == (1...40).map(UInt64.init), "in order, none lost")
        // The count starts again with each read burst: the next 40 flush at 16 and 32 again.
        let again = try Self.fortyRequests(pair, firstID: 41)
        #expect(again.duringRead == 2)
        #expect(again.total == 3)
        #expect(pair.clientSink.received.map(\.header.id) == (1...80).map(UInt64.init))
    }

    /// A channel that is not a socket (here an embedded one, connected, so it has a remote
    /// address) is never asked for a socket cookie by the reply wait: an embedded channel
    /// traps on options it does not know. Lone requests and their answers go on as without
    /// a wait.
    @Test func theReplyWaitLeavesChannelsThatAreNotSocketsAlone() throws {
        let pair = try Self.established(flushEvery: 16, replyPolling: .milliseconds(1))
        for id in 1...3 {
            pair.clientSink.outlet!.write(.message(WireMessage(header: MessageHeader(id: UInt64(id), kind: .request, type: "t"), payload: ByteBuffer(bytes: [8, UInt8(id)]))))
            try Self.burst(try #require(try Self.take(pair.client)), into: pair.server)
            try Self.burst(try #require(try Self.take(pair.server)), into: pair.client)
        }
        #expect(pair.serverSink.received.map(\.header.id) == [1, 2, 3])
        #expect(pair.clientSink.received.map(\.header.id) == [1, 2, 3])
    }

    /// A server decodes no request while its channel is not writable (the peer does not read
    /// its answers), and takes up the ones already read when it is writable again; a client
    /// reads on (two sides that both write must not wait for each other).
    @Test func aServerDecodesNothingWhileThePeerDoesNotReadItsAnswers() throws {
        let pair = try Self.established(flushEvery: 16)
        for id in 1...10 {
            pair.clientSink.outlet!.write(.message(WireMessage(header: MessageHeader(id: UInt64(id), kind: .request, type: "t"), payload: ByteBuffer(bytes: [8, UInt8(id)]))))
        }
        let requests = try #require(try Self.take(pair.client))
        pair.server.isWritable = false
        try Self.burst(requests, into: pair.server)
        #expect(pair.serverSink.received.isEmpty, "decoded while the answers could not leave")
        pair.server.isWritable = true
        pair.server.pipeline.fireChannelWritabilityChanged()
        pair.server.embeddedEventLoop.run()
        #expect(pair.serverSink.received.map(\.header.id) == (1...10).map(UInt64.init))
        let answers = try #require(try Self.take(pair.server))
        // The client is not writable either: it still reads its answers.
        pair.client.isWritable = false
        try Self.burst(answers, into: pair.client)
        #expect(pair.clientSink.received.map(\.header.id) == (1...10).map(UInt64.init))
    }

    /// Before the handshake has completed, a server takes frames of at most 256 KiB (the
    /// handshake's are far smaller; early messages come after it): a peer that has not
    /// authenticated cannot make it buffer a 16 MiB HELLO. After it, the configured limit.
    @Test(arguments: [200 << 10, 300 << 10])
    func aServerTakesNoLargeFrameBeforeTheHandshakeEnds(size: Int) throws {
        let banner = Banner(supported: .implemented, required: [], modes: [.crc])
        let machine = ServerHandshakeStateMachine(configuration: .init(
            banner: banner, maxFrameSize: UInt32(Frame.defaultMaxFrameSize), ident: Parley_V1_ServerIdent(), clientAddress: "test"
        ))
        let server = EmbeddedChannel()
        let handler = ParleyConnectionHandler(role: .server(machine), eventLoop: server.eventLoop) { _, _ in EstablishedLink(sink: EchoSink()) }
        try ParleyPipeline.configure(server, options: PipelineOptions(), handler: handler)
        #expect(handler.maxFrameSize == Frame.defaultMaxFrameSize)
        try server.connect(to: try SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        var bytes = ByteBuffer()
        bytes.writeBanner(banner)
        bytes.writePreamble(Frame(tag: .hello, segments: [ByteBuffer(repeating: 0, count: size)]))
        server.pipeline.fireChannelRead(bytes)
        server.pipeline.fireChannelReadComplete()
        server.embeddedEventLoop.run()
        #expect(server.isActive == (size <= ParleyConnectionHandler.handshakeFrameLimit), "a HELLO of \(size) bytes")
        _ = try? server.finish()
    }

    @Test func withFlushEveryZeroAnswersWaitForTheEndOfTheReadBurst() throws {
        let pair = try Self.established(flushEvery: 0)
        let result = try Self.fortyRequests(pair)
        #expect(result.duringRead == 0)
        #expect(result.total == 1, "one flush for all 40 answers")
        #expect(pair.clientSink.received.map(\.header.id) == (1...40).map(UInt64.init))
    }
}
