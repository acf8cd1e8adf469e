import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Parley
import ParleyServices
import ParleyWire
import SwiftProtobuf
import Testing

/// The compatibility matrix (docs/compatibility.md): for each released protocol version, a
/// recorded client stream and server stream of a session that uses every feature of that
/// version, kept in Tests/Fixtures/compat. The current server must answer every old client
/// stream as the old server did, and the current client must work against every old server
/// stream. `PARLEY_RECORD_COMPAT=VERSION swift test --filter recordFixture` records the
/// current implementation as a new version (only when a release changes the wire).
@Suite(.timeLimit(.minutes(10))) struct CompatibilityMatrixTests {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/compat")

    /// The versions with a fixture, oldest first ("v1", ...).
    static var versions: [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: fixtures.path)) ?? []
        return Set(names.compactMap { $0.hasSuffix("-client.bin") ? String($0.dropLast("-client.bin".count)) : nil }).sorted()
    }

    static func load(_ version: String, _ side: String) throws -> ByteBuffer {
        ByteBuffer(bytes: try Data(contentsOf: fixtures.appendingPathComponent("\(version)-\(side).bin")))
    }

    /// The client stream of a version-1 session: every MESSAGE kind, a stream, a cancelled
    /// stream, an unknown request type, a data segment, a one-way message and a KEEPALIVE.
    static func versionOneClientStream() -> ByteBuffer {
        clientSessionBytes(messages: versionOneMessages(), trailingFrames: [SessionStateMachine.keepaliveFrame(tag: .keepalive, timestamp: 1234)])
    }

    /// The client stream of a version-2 session (feature bit 4, DIRECT frames: docs/protocol.md
    /// 7.16): the version-1 session's messages, the echo service's grant of DIRECT
    /// (`EnableDirect`, request 7), then, once it is answered, the DIRECT requests of
    /// `directRequests` (ids 1, 2, ...) and a KEEPALIVE.
    static func versionTwoClientStream() -> ByteBuffer {
        var enable = Parley_Echo_V1_EnableDirect()
        enable.delayMs = 0
        let grant = WireMessage(header: MessageHeader(id: 7, kind: .request, type: Parley_Echo_V1_EnableDirect.protoMessageName), payload: enable.parleyPayload())
        let direct = directRequests.enumerated().map { i, r -> Frame in
            var segment0 = ByteBuffer()
            segment0.writeInteger(UInt64(i + 1), endianness: .little)
            segment0.writeBytes(r.header)
            return Frame(tag: .direct, segments: r.data.map { [segment0, $0] } ?? [segment0], alignments: r.data == nil ? .none : SegmentAlignments(0, DirectFrame.dataAlignment))
        }
        return clientSessionBytes(messages: versionOneMessages() + [grant], trailingFrames: direct + [SessionStateMachine.keepaliveFrame(tag: .keepalive, timestamp: 1234)])
    }

    /// The DIRECT requests of the version-2 session, in order (ids 1, 2, ...): the header
    /// after the id, and segment 1.
    static let directRequests: [(header: [UInt8], data: ByteBuffer?)] = [
        (header: Array(0..<24), data: nil),
        (header: [0xD1, 0x2E, 0xC7, 0, 0, 0, 0, 0], data: ByteBuffer(bytes: (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 13 + 5) })),
    ]

    /// The client stream a version's session is recorded from.
    static func clientStream(_ version: String) throws -> ByteBuffer {
        switch version {
        case "v1": return versionOneClientStream()
        case "v2": return versionTwoClientStream()
        default: throw ParleyError(code: .invalidArgument, message: "no client session is defined for \(version): add one to CompatibilityMatrixTests.clientStream")
        }
    }

    /// A recorded client stream in the parts a client sends, each once everything before it
    /// is answered: the grant of DIRECT (`EnableDirect`) goes once the session before it is
    /// done, so that the recorded server stream has its answers in the order a client that
    /// waits for each answer sees them; the first DIRECT frame goes once the grant is read
    /// (R-7.16-1). A stream without DIRECT frames is one part.
    static func parts(of client: ByteBuffer) -> [ByteBuffer] {
        var decoder = WireDecoder()
        var rest = client
        var start = rest.readerIndex
        var cuts: [Int] = []
        var sawDirect = false
        while let element = try? decoder.decode(buffer: &rest) {
            if case .frame(let f) = element {
                let grant = f.tag == .message && (try? WireMessage(frame: f))?.header.type == Parley_Echo_V1_EnableDirect.protoMessageName
                if grant || (f.tag == .direct && !sawDirect) { cuts.append(start) }
                if f.tag == .direct { sawDirect = true }
            }
            start = rest.readerIndex
        }
        let bounds = [client.readerIndex] + cuts + [client.writerIndex]
        return zip(bounds, bounds.dropFirst()).map { client.getSlice(at: $0, length: $1 - $0)! }
    }

    /// Whether a server stream has answered every request, one-way Ping, DIRECT request and
    /// KEEPALIVE of the client stream `client` (a whole stream, or the parts sent so far).
    /// The client stream is counted once, here; the check returned reads only what came.
    static func completion(answering client: ByteBuffer) -> @Sendable (ByteBuffer) -> Bool {
        let sent = frames(in: client)
        let messages = sent.filter { $0.tag == .message }.compactMap { try? WireMessage(frame: $0) }
        let wanted = messages.filter { $0.header.kind == .request || ($0.header.kind == .oneWay && $0.header.type == Parley_Echo_V1_Ping.protoMessageName) }.count
        let directs = sent.filter { $0.tag == .direct }.count
        let keepalive = sent.contains { $0.tag == .keepalive }
        return { received in
            let got = frames(in: received)
            let finals = got.filter { $0.tag == .message }.compactMap { try? WireMessage(frame: $0) }
                .filter { [.response, .error, .oneWay].contains($0.header.kind) }
            return finals.count >= wanted && got.filter { $0.tag == .direct }.count >= directs && (!keepalive || got.contains { $0.tag == .keepaliveAck })
        }
    }

    /// The messages of the version-1 session.
    static func versionOneMessages() -> [WireMessage] {
        func request<M: SwiftProtobuf.Message>(_ id: UInt64, _ m: M, data: ByteBuffer? = nil) -> WireMessage {
            WireMessage(header: MessageHeader(id: id, kind: .request, type: M.protoMessageName), payload: m.parleyPayload(), data: data)
        }
        var ping = Parley_Echo_V1_Ping()
        ping.sequence = 1
        var echo = Parley_Echo_V1_Echo()
        echo.payload = Data((0..<100).map { UInt8($0) })
        echo.text = "compat"
        var count = Parley_Echo_V1_Count()
        count.count = 3
        var slowCount = Parley_Echo_V1_Count()
        slowCount.count = 5
        slowCount.intervalMs = 60_000
        var oneWay = Parley_Echo_V1_Ping()
        oneWay.sequence = 7
        var sleep = Parley_Echo_V1_Sleep()
        sleep.delayMs = 10
        return [
            request(1, ping),
            request(2, echo, data: ByteBuffer(bytes: (0..<300).map { UInt8(truncatingIfNeeded: $0 * 7) })),
            request(3, count),
            request(4, slowCount),
            WireMessage(header: MessageHeader(id: 4, kind: .cancel, type: ""), payload: ByteBuffer()),
            WireMessage(header: MessageHeader(id: 5, kind: .request, type: "example.v1.Unknown"), payload: ByteBuffer()),
            WireMessage(header: MessageHeader(id: 0, kind: .oneWay, type: Parley_Echo_V1_Ping.protoMessageName), payload: oneWay.parleyPayload()),
            request(6, sleep),
        ]
    }

    /// Plays `client` to a server at `address` in its parts (`parts(of:)`, each once all
    /// before it is answered) and returns what the server sent until it answered everything,
    /// or until 10 s passed.
    static func play(_ client: ByteBuffer, to address: ParleyAddress) async throws -> ByteBuffer {
        let peer = try await RawPeer.connect(address)
        var sent = ByteBuffer()
        var steps: [(ByteBuffer, @Sendable (ByteBuffer) -> Bool)] = []
        for part in Self.parts(of: client) {
            var chunk = part
            sent.writeBuffer(&chunk)
            steps.append((part, Self.completion(answering: sent)))
        }
        return try await peer.converse(steps, seconds: 10)
    }

    @Test(.enabled(if: ProcessInfo.processInfo.environment["PARLEY_RECORD_COMPAT"] != nil))
    func recordFixture() async throws {
        let version = ProcessInfo.processInfo.environment["PARLEY_RECORD_COMPAT"]!
        let client = try Self.clientStream(version)
        try await withServer { _, addresses in
            let answer = try await Self.play(client, to: addresses[0])
            try #require(Self.completion(answering: client)(answer))
            try FileManager.default.createDirectory(at: Self.fixtures, withIntermediateDirectories: true)
            try Data(client.readableBytesView).write(to: Self.fixtures.appendingPathComponent("\(version)-client.bin"))
            try Data(answer.readableBytesView).write(to: Self.fixtures.appendingPathComponent("\(version)-server.bin"))
        }
    }

    /// What of a server stream must stay the same from version to version: the handshake's
    /// frame sequence, the nucleus and names of SERVER_IDENT, every answer's kind, id, type,
    /// payload and data (in any order: requests are answered as they finish), and KEEPALIVE_ACK.
    struct ServerAnswers: Equatable, CustomStringConvertible {
        var handshake: [String]
        var ident: String
        var answers: [String]
        var keepaliveAcks: [UInt64]
        /// DIRECT answers: their segments, in hex, in any order.
        var direct: [String]

        init(_ bytes: ByteBuffer) throws {
            let frames = frames(in: bytes)
            self.handshake = frames.prefix { $0.tag != .message && $0.tag != .keepaliveAck }.map(\.tag.description)
            var ident = try Parley_V1_ServerIdent(parleyPayload: try #require(frames.first { $0.tag == .serverIdent }).segments[0])
            ident.serverNonce = 0
            ident.version = ""
            ident.platform = ""
            ident.sessionToken = Data()
            self.ident = try ident.jsonString()
            self.answers = try frames.filter { $0.tag == .message }.map { frame in
                let m = try WireMessage(frame: frame)
                let data = m.data.map { Array($0.readableBytesView).hexString } ?? "-"
                return "\(m.header.kind) \(m.header.id) \(m.header.type) \(Array(m.payload.readableBytesView).hexString) \(data)"
            }.sorted()
            self.keepaliveAcks = frames.filter { $0.tag == .keepaliveAck }.compactMap { $0.segments[0].getInteger(at: $0.segments[0].readerIndex, endianness: .little, as: UInt64.self) }
            self.direct = frames.filter { $0.tag == .direct }.map { $0.segments.map { Array($0.readableBytesView).hexString }.joined(separator: " ") }.sorted()
        }

        var description: String {
            "handshake \(self.handshake), ident \(self.ident), answers:\n" + self.answers.joined(separator: "\n") + "\nkeepalive acks \(self.keepaliveAcks)"
                + "\nDIRECT answers:\n" + self.direct.joined(separator: "\n")
        }
    }

    @Test func everyRecordedClientGetsTheSameAnswersFromTheCurrentServer() async throws {
        let versions = Self.versions
        #expect(versions.contains("v1"), "no fixture for protocol version 1 in \(Self.fixtures.path)")
        for version in versions {
            let expected = try ServerAnswers(Self.load(version, "server"))
            try await withServer { _, addresses in
                let answer = try await Self.play(try Self.load(version, "client"), to: addresses[0])
                let got = try ServerAnswers(answer)
                #expect(got == expected, "the current server answers the \(version) client differently:\n\(got)\nrecorded:\n\(expected)")
            }
        }
    }

    @Test func theCurrentClientWorksAgainstEveryRecordedServer() async throws {
        for version in Self.versions {
            let recorded = frames(in: try Self.load(version, "server"))
            var banner = try Self.load(version, "server")
            let serverBanner = try #require(try banner.readBanner())
            let server = try await ReplayServer.start(banner: serverBanner, frames: recorded)
            let pongs = PongLog()
            let client = try await ParleyClient.connect(to: server.address, router: pongs.router, logger: quietLogger)
            // The same operations as the recorded client, in the same order (so the same ids).
            #expect(try await ping(client, 1) == 1, "\(version)")
            var echo = Parley_Echo_V1_Echo()
            echo.payload = Data((0..<100).map { UInt8($0) })
            echo.text = "compat"
            let data = ByteBuffer(bytes: (0..<300).map { UInt8(truncatingIfNeeded: $0 * 7) })
            let reply = try await client.call(echo, data: data, as: Parley_Echo_V1_EchoReply.self)
            #expect(reply.message.payload == echo.payload && reply.message.text == "compat" && reply.data == data, "\(version)")
            var count = Parley_Echo_V1_Count()
            count.count = 3
            var lines: [String] = []
            for try await event in try await client.stream(count, item: Parley_Echo_V1_CountItem.self, final: Parley_Echo_V1_CountDone.self) {
                if case .item(let item, _) = event { lines.append(item.line) }
            }
            #expect(lines == ["line 1 of 3", "line 2 of 3", "line 3 of 3"], "\(version)")
            count.count = 5
            count.intervalMs = 60_000
            // Cancelled at once, before any item: the client sends CANCEL.
            let slow = try await client.stream(count, item: Parley_Echo_V1_CountItem.self, final: Parley_Echo_V1_CountDone.self)
            let reader = Task { for try await _ in slow {} }
            reader.cancel()
            _ = await reader.result
            let unknown = await #expect(throws: ParleyError.self) {
                _ = try await client.request(Parley_V1_Status(), as: Parley_V1_Status.self)
            }
            #expect(unknown?.code == .unknownMessageType, "\(version): \(String(describing: unknown))")
            var oneWay = Parley_Echo_V1_Ping()
            oneWay.sequence = 7
            try await client.send(oneWay)
            var sleep = Parley_Echo_V1_Sleep()
            sleep.delayMs = 10
            #expect(try await client.request(sleep, as: Parley_Echo_V1_Slept.self).delayMs == 10, "\(version)")
            #expect(try await eventually { pongs.sequences.withLockedValue { $0 == [7] } }, "\(version): the one-way pong")
            if frames(in: try Self.load(version, "client")).contains(where: { $0.tag == .direct }) {
                // Version 2: the grant of DIRECT, then the same DIRECT requests (ids 1, 2).
                _ = try await client.request(Parley_Echo_V1_EnableDirect(), as: Parley_Echo_V1_DirectGranted.self)
                let connection = client.connection
                #expect(connection.mayUseDirect, "\(version)")
                for r in Self.directRequests {
                    var frame = DirectFrame(allocator: connection.channelAllocator, headerLength: r.header.count, dataLength: r.data?.readableBytes) {
                        $0.copyBytes(from: r.header)
                    }
                    if let data = r.data { frame.writeData(data) }
                    let result = await withCheckedContinuation { c in connection.sendDirect(frame) { c.resume(returning: $0.map { $0.frame }) } }
                    guard case .success(let answer) = result else {
                        Issue.record("\(version): DIRECT request failed: \(result)")
                        continue
                    }
                    #expect(Array(answer.segments[0].readableBytesView.dropFirst(DirectFrame.idSize)) == r.header, "\(version)")
                    #expect((answer.segments.count > 1 ? answer.segments[1] : nil) == r.data, "\(version)")
                }
            }
            client.close()
            await server.stop()
        }
    }
}

/// A server that plays a recorded server stream to one client: its banner, HELLO and AUTH_DONE
/// once the client's AUTH_REQUEST has come, SERVER_IDENT after CLIENT_IDENT, and each recorded
/// answer once the request it answers (same id) or the one-way message it echoes has arrived,
/// in recorded order.
final class ReplayServer: @unchecked Sendable {
    let channel: any Channel
    let address: ParleyAddress

    private init(channel: any Channel, address: ParleyAddress) {
        self.channel = channel
        self.address = address
    }

    static func start(banner: Banner, frames: [Frame]) async throws -> ReplayServer {
        let listener = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(ReplayHandler(banner: banner, frames: frames)) }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        return ReplayServer(channel: listener, address: .tcp(host: "127.0.0.1", port: listener.localAddress?.port ?? 0))
    }

    func stop() async { try? await self.channel.close() }
}

final class ReplayHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let banner: Banner
    var pending: [Frame]
    var decoder = WireDecoder()
    var buffer = ByteBuffer()
    var answered: Set<UInt64> = []
    var directAnswered: Set<UInt64> = []
    var oneWays = 0
    var handshakeSent = false
    var identReceived = false

    init(banner: Banner, frames: [Frame]) {
        self.banner = banner
        self.pending = frames
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = self.unwrapInboundIn(data)
        self.buffer.writeBuffer(&bytes)
        while let element = try? self.decoder.decode(buffer: &self.buffer) {
            guard case .frame(let frame) = element else { continue }
            switch frame.tag {
            case .clientIdent: self.identReceived = true
            case .direct:
                if let id = frame.directID { self.directAnswered.insert(id) }
            case .message:
                if let m = try? WireMessage(frame: frame) {
                    if m.header.kind == .request { self.answered.insert(m.header.id) }
                    if m.header.kind == .oneWay { self.oneWays += 1 }
                }
            default: break
            }
        }
        self.release(context: context)
    }

    private func release(context: ChannelHandlerContext) {
        if !self.handshakeSent {
            self.handshakeSent = true
            var out = context.channel.allocator.buffer(capacity: Banner.size)
            out.writeBanner(self.banner)
            context.write(self.wrapOutboundOut(out), promise: nil)
        }
        while let next = self.pending.first, self.mayRelease(next) {
            self.pending.removeFirst()
            var out = ByteBuffer()
            out.writeFrame(next)
            context.write(self.wrapOutboundOut(out), promise: nil)
        }
        context.flush()
    }

    private func mayRelease(_ frame: Frame) -> Bool {
        switch frame.tag {
        case .hello, .authDone: return true
        case .serverIdent: return self.identReceived
        case .message:
            guard let m = try? WireMessage(frame: frame) else { return true }
            if m.header.kind == .oneWay {
                guard self.oneWays > 0 else { return false }
                self.oneWays -= 1
                return true
            }
            return self.answered.contains(m.header.id)
        case .direct:
            guard let id = frame.directID else { return true }
            return self.directAnswered.contains(id)
        default: return true
        }
    }
}

extension RawPeer {
    /// Writes each part, then reads until its `until` holds of everything received so far;
    /// returns what was received (less if `seconds` ran out or the server closed first).
    func converse(_ parts: [(ByteBuffer, @Sendable (ByteBuffer) -> Bool)], seconds: Double) async throws -> ByteBuffer {
        try await withThrowingTaskGroup(of: Void.self) { group in
            let channel = self.channel.channel
            group.addTask {
                // In ticks, as `exchange` does; closing ends the reading below.
                for _ in 0..<max(1, Int(seconds * 10)) { try await Task.sleep(for: .milliseconds(100)) }
                channel.close(promise: nil)
            }
            defer { group.cancelAll() }
            return try await self.channel.executeThenClose { inbound, outbound in
                var received = ByteBuffer()
                var chunks = inbound.makeAsyncIterator()
                for (bytes, until) in parts {
                    // Closed by the deadline between two parts: what came is the answer.
                    guard (try? await outbound.write(bytes)) != nil else { return received }
                    while !until(received) {
                        guard var chunk = try? await chunks.next() else { return received }
                        received.writeBuffer(&chunk)
                    }
                }
                return received
            }
        }
    }
}
