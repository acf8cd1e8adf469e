import Foundation
import Logging
import NIOCore
import Parley
import ParleyServices
import ParleyWire
import Testing
import ParleyTestSupport

@Suite(.timeLimit(.minutes(2)))
struct CompatibilityTests {
    @Test func peerAdvertisingUnknownOptionalFeaturesInteroperates() async throws {
        let unknown = ParleyFeatures(rawValue: 1 << 40 | 1 << 63)
        try await withServer { _, addresses in
            let client = try await ParleyClient.connect(
                to: addresses[0], configuration: .init(supportedFeatures: ParleyFeatures.implemented.union(unknown)), logger: quietLogger)
            defer { client.close() }
            #expect(client.session.features == .implemented)
            #expect(try await ping(client, 3) == 3)
        }
    }

    @Test func peerSendingUnknownIgnorableFrameTagsInteroperates() async throws {
        try await withServer { _, addresses in
            // A hand-written peer: unknown ignorable frames (0x80, 0xF0) during the handshake
            // and between messages; the server skips them and answers both pings.
            let odd1 = Frame(tag: FrameTag(rawValue: 0xF0), segments: [ByteBuffer(string: "from the future")])
            let odd2 = Frame(tag: FrameTag(rawValue: 0x80), segments: [ByteBuffer(), ByteBuffer(bytes: [1, 2, 3])])
            var bytes = clientSessionBytes(messages: [], extraFrames: [odd1])
            var session = SessionStateMachine(role: .client, features: .implemented)
            bytes.writeFrame(try session.frame(for: pingMessage(id: 1), allocator: ByteBufferAllocator()))
            bytes.writeFrame(odd2)
            bytes.writeFrame(try session.frame(for: pingMessage(id: 2), allocator: ByteBufferAllocator()))
            let peer = try await RawPeer.connect(addresses[0])
            // Not half-closed: a server stops answering a peer that has gone.
            let (reply, closed) = try await peer.exchange(bytes, halfClose: false) { frames(in: $0).filter { $0.tag == .message }.count == 2 }
            #expect(closed)
            let got = frames(in: reply)
            let answers = got.filter { $0.tag == .message }.compactMap { try? WireMessage(frame: $0) }
            #expect(answers.map(\.header.id) == [1, 2])
            #expect(answers.allSatisfy { $0.header.type == Parley_Echo_V1_Pong.protoMessageName })
            #expect(!got.contains { $0.tag == .close && (try? Parley_V1_Status(parleyPayload: $0.segments[0]))?.code != ParleyError.Code.shuttingDown.rawValue })
        }
    }

    @Test func peerSendingUnknownCriticalTagIsClosedWithAClearError() async throws {
        try await withServer { _, addresses in
            let bad = Frame(tag: FrameTag(rawValue: 0x42), segments: [ByteBuffer()])
            let bytes = clientSessionBytes(messages: [], extraFrames: [bad])
            let (reply, closed) = try await RawPeer.connect(addresses[0]).exchange(bytes, halfClose: false)
            #expect(closed, "the server closed the connection")
            let close = try #require(frames(in: reply).last)
            #expect(close.tag == .close)
            let status = try Parley_V1_Status(parleyPayload: close.segments[0])
            #expect(status.code == ParleyError.Code.unknownFrameTag.rawValue)
            #expect(status.message.contains("0x42"))
        }
    }

    @Test func peerRequiringAnUnknownFeatureIsRefusedOnBothSides() async throws {
        let logs = LogCollector()
        let unknown = ParleyFeatures(rawValue: 1 << 41)
        try await withServer(logger: logs.logger("server")) { _, addresses in
            let error = await #expect(throws: ParleyError.self) {
                _ = try await ParleyClient.connect(
                    to: addresses[0],
                    configuration: .init(supportedFeatures: ParleyFeatures.implemented.union(unknown), requiredFeatures: unknown),
                    logger: quietLogger)
            }
            #expect(error?.code == .missingFeatures)
            #expect(error?.message.contains("bit41") == true)
            #expect(error?.message.contains("protocol version 1") == true)
            let logged = try await eventually { logs.all.contains { $0.metadata.contains("missingFeatures") && $0.metadata.contains("bit41") } }
            #expect(logged, "the server logged the refusal naming the feature")
        }
    }

    @Test func garbageInsteadOfABannerIsRefused() async throws {
        let logs = LogCollector()
        try await withServer(logger: logs.logger("server")) { _, addresses in
            let (reply, closed) = try await RawPeer.connect(addresses[0]).exchange(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
            #expect(closed)
            let close = frames(in: reply).last
            #expect(close?.tag == .close)
            let logged = try await eventually { logs.all.contains { $0.level == .warning && $0.metadata.contains("badMagic") } }
            #expect(logged)
            // The server still serves others.
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { client.close() }
            #expect(try await ping(client, 1) == 1)
        }
    }

    @Test func framesSplitAcrossManyReadsAreReassembled() async throws {
        try await withServer { _, addresses in
            // Pieces of 13 bytes, 5 ms apart: every frame arrives over several reads.
            let bytes = clientSessionBytes(messages: (1...4).map { pingMessage(id: $0) })
            let (reply, _) = try await RawPeer.connect(addresses[0]).exchange(bytes, pieces: 13, pause: .milliseconds(5), halfClose: false) {
                frames(in: $0).filter { $0.tag == .message }.count == 4
            }
            let answers = frames(in: reply).filter { $0.tag == .message }.compactMap { try? WireMessage(frame: $0) }
            #expect(answers.map(\.header.id).sorted() == [1, 2, 3, 4])
        }
    }

    @Test func peerClosingInsideAFrameIsReportedAsTruncated() async throws {
        let logs = LogCollector()
        try await withServer(logger: logs.logger("server")) { _, addresses in
            // Two whole requests, then the first 40 bytes of a third, then the end of the stream.
            var bytes = clientSessionBytes(messages: (1...3).map { pingMessage(id: $0) })
            var third = ByteBuffer()
            var session = SessionStateMachine(role: .client, features: .implemented)
            for id in 1...3 { third.clear(); third.writeFrame(try session.frame(for: pingMessage(id: UInt64(id)), allocator: ByteBufferAllocator())) }
            bytes.moveWriterIndex(to: bytes.writerIndex - third.readableBytes + 40)
            let (reply, closed) = try await RawPeer.connect(addresses[0]).exchange(bytes)
            #expect(closed)
            let answers = frames(in: reply).filter { $0.tag == .message }.compactMap { try? WireMessage(frame: $0) }
            #expect(answers.map(\.header.id).sorted() == [1, 2], "the whole requests are answered")
            let logged = try await eventually {
                logs.all.contains { $0.metadata.contains("truncated") && $0.metadata.contains("connection ended inside a MESSAGE frame") }
            }
            #expect(logged, "\(logs.all.map { "\($0.message) \($0.metadata)" })")
        }
    }
}

@Suite(.timeLimit(.minutes(2)))
struct NucleusTests {
    /// A server that sends notices without end: the client keeps the last 1,000 messages,
    /// each cut at 4 KiB.
    @Test func aClientKeepsTheLastThousandServerMessages() async throws {
        var router = EchoService.router()
        router.on(Parley_Echo_V1_Sleep.self) { _, context in
            for batch in 0..<12 {
                let messages = (0..<100).map { ParleyServerMessage(priority: .low, text: "notice \(batch * 100 + $0)") }
                try await context.connection.sendNotice(ParleyNucleus(messages: messages))
            }
            // One long text: kept cut (1,000 of them whole would be 100 MiB).
            try await context.connection.sendNotice(ParleyNucleus(messages: [ParleyServerMessage(priority: .low, text: String(repeating: "x", count: 100_000))]))
            return Parley_Echo_V1_Slept()
        }
        try await withServer(router: router) { _, addresses in
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { client.close() }
            _ = try await client.request(Parley_Echo_V1_Sleep(), as: Parley_Echo_V1_Slept.self)
            #expect(try await eventually { client.serverMessages.last?.text.hasPrefix("xxx") == true })
            #expect(client.serverMessages.count == ParleyClient.maximumKeptServerMessages)
            #expect(client.serverMessages.first?.text == "notice 201")
            #expect(client.serverMessages.dropLast().last?.text == "notice 1199")
            let long = client.serverMessages.last?.text ?? ""
            #expect(long.utf8.count < 4200 && long.hasSuffix("[cut: 100000 bytes]"), "\(long.suffix(40))")
        }
    }

    /// [R-8.2-2] The client shows the nucleus's messages and sends no request before the
    /// request delay has passed.
    @Test func serverMessagesDelayAndNotices() async throws {
        var router = EchoService.router()
        router.on(Parley_Echo_V1_Sleep.self) { _, context in
            try await context.connection.sendNotice(ParleyNucleus(messages: [ParleyServerMessage(priority: .low, text: "later news")]))
            return Parley_Echo_V1_Slept()
        }
        try await withServer(configure: {
            $0.nucleus = ParleyNucleus(messages: [ParleyServerMessage(priority: .high, text: "upgrade soon")], requestDelay: 0.4)
        }, router: router) { _, addresses in
            let connected = ContinuousClock.now
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { client.close() }
            #expect(client.serverMessages == [ParleyServerMessage(priority: .high, text: "upgrade soon")])
            #expect(client.session.nucleus.requestDelay == 0.4)
            // The client obeys the delay: no request leaves before it has passed.
            #expect(try await ping(client, 1) == 1)
            #expect(ContinuousClock.now - connected >= .milliseconds(400))
            _ = try await client.request(Parley_Echo_V1_Sleep(), as: Parley_Echo_V1_Slept.self)
            let noticed = try await eventually { client.serverMessages.count == 2 }
            #expect(noticed)
            #expect(client.serverMessages.last == ParleyServerMessage(priority: .low, text: "later news"))
        }
    }

    /// docs/protocol.md 4.5: a side's limit is at least 64 KiB, and a smaller announced limit
    /// counts as 64 KiB (the handshake frames cannot know the peer's limit).
    @Test func frameSizeLimitsBelow64KiBAreRefusedOrRaised() async throws {
        #expect(Frame.peerLimit(announced: 40) == Frame.minimumMaxFrameSize)
        #expect(Frame.peerLimit(announced: 0) == Frame.defaultMaxFrameSize)
        #expect(Frame.peerLimit(announced: 100_000) == 100_000)
        try await withServer { _, addresses in
            let error = await #expect(throws: ParleyError.self) {
                _ = try await ParleyClient.connect(to: addresses[0], configuration: .init(maxFrameSize: 60), logger: quietLogger)
            }
            #expect(error?.code == .invalidArgument)
        }
        let server = ParleyServer(configuration: .init(listen: [.tcp(host: "127.0.0.1", port: 0)], maxFrameSize: 1000), router: EchoService.router(), logger: quietLogger)
        let error = await #expect(throws: ParleyError.self) { try await server.run() }
        #expect(error?.code == .invalidArgument)
    }

    /// docs/protocol.md 8.2: a later nucleus with a delay replaces the deadline, also while the
    /// client is already waiting for the old one (a defect the conformance issue 13 found).
    @Test func aNoticeShortensTheRequestDelayWhileTheClientWaits() async throws {
        var router = EchoService.router()
        router.onMessage(Parley_Echo_V1_Sleep.self) { _, context in
            try await Task.sleep(for: .milliseconds(200))
            try await context.connection.sendNotice(ParleyNucleus(requestDelay: 0.3))
        }
        // A long first delay, so that even a test run that starves this one for seconds (the
        // suites run in parallel on two cores) tells the new deadline from the old.
        try await withServer(configure: { $0.nucleus = ParleyNucleus(requestDelay: 60.0) }, router: router) { _, addresses in
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { client.close() }
            let start = ContinuousClock.now
            // Asks for the NOTICE (a one-way message is not held by the request delay).
            try await client.connection.send(Parley_Echo_V1_Sleep())
            #expect(try await ping(client, 1) == 1)
            let waited = ContinuousClock.now - start
            #expect(waited >= .milliseconds(450), "the new 0.3 s delay counts from the NOTICE")
            #expect(waited < .seconds(45), "the NOTICE replaced the 60 s delay; waited \(waited)")
        }
    }

    /// [R-8.2-3] A request delay too large for the clock (1e300, infinity) counts as a day,
    /// and one that is not a number as none: the client connects (it used to trap).
    @Test func anAbsurdRequestDelayIsCappedNotFatal() async throws {
        for (delay, capped) in [(1e300, true), (Double.infinity, true), (Double.nan, false), (90_000, true)] {
            try await withServer(configure: { $0.nucleus = ParleyNucleus(requestDelay: delay) }) { _, addresses in
                let before = ContinuousClock.now
                let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
                defer { client.close() }
                let after = ContinuousClock.now
                if capped {
                    // Set when SERVER_IDENT arrived, between `before` and `after`, one day on.
                    let at = try #require(client.requestAllowedAt, "delay \(delay)")
                    let day = Duration.seconds(ParleyClient.maximumRequestDelay)
                    #expect(at >= before + day && at <= after + day, "delay \(delay): \(at - before) after the connect began")
                } else {
                    #expect(client.requestAllowedAt == nil, "delay \(delay)")
                    #expect(try await ping(client, 1) == 1)
                }
            }
        }
    }

    @Test func clientFollowsRedirect() async throws {
        try await withServer { _, target in
            try await withServer(configure: { $0.nucleus = ParleyNucleus(redirects: [target[0].description]) }) { _, first in
                let client = try await ParleyClient.connect(to: first[0], logger: quietLogger)
                defer { client.close() }
                #expect(client.address == target[0])
                #expect(client.redirectedFrom == [first[0]])
                #expect(try await ping(client, 5) == 5)
            }
        }
    }

    /// A front door with `rotateRedirects` spreads its clients over its redirects in turn.
    @Test func rotatedRedirectsSpreadClients() async throws {
        try await withServer { _, a in
            try await withServer { _, b in
                let list = [a[0].description, b[0].description]
                try await withServer(configure: { $0.nucleus = ParleyNucleus(redirects: list); $0.rotateRedirects = true }) { _, door in
                    var landed: [ParleyAddress] = []
                    for _ in 0..<4 {
                        let client = try await ParleyClient.connect(to: door[0], logger: quietLogger)
                        landed.append(client.address)
                        client.close()
                    }
                    #expect(landed == [a[0], b[0], a[0], b[0]], "in turn: \(landed)")
                }
                // Without rotation, every client gets the same list.
                try await withServer(configure: { $0.nucleus = ParleyNucleus(redirects: list) }) { _, door in
                    for _ in 0..<3 {
                        let client = try await ParleyClient.connect(to: door[0], logger: quietLogger)
                        #expect(client.address == a[0])
                        client.close()
                    }
                }
            }
        }
    }

    @Test func redirectLoopIsDetected() async throws {
        let pathA = testScratchPath("loop-a.sock"), pathB = testScratchPath("loop-b.sock")
        try await withServer(listen: [.unix(path: pathA)], configure: { $0.nucleus = ParleyNucleus(redirects: ["unix:\(pathB)"]) }) { _, a in
            try await withServer(listen: [.unix(path: pathB)], configure: { $0.nucleus = ParleyNucleus(redirects: ["unix:\(pathA)"]) }) { _, _ in
                let error = await #expect(throws: ParleyError.self) { _ = try await ParleyClient.connect(to: a[0], logger: quietLogger) }
                #expect(error?.code == .redirectLoop)
            }
        }
    }

    /// [R-8.2-1] A redirect that does not parse fails the client with `invalidArgument`; it
    /// leaves the server by closing the byte stream, without CLOSE (the server did nothing
    /// wrong), so the server sees a plain end of stream and logs no error.
    @Test func anUnparsableRedirectFailsWithInvalidArgumentWithoutClose() async throws {
        let logs = LogCollector()
        try await withServer(configure: { $0.nucleus = ParleyNucleus(redirects: ["no port here"]) }, logger: logs.logger("server", level: .debug)) { _, addresses in
            let error = await #expect(throws: ParleyError.self) { _ = try await ParleyClient.connect(to: addresses[0], logger: quietLogger) }
            #expect(error?.code == .invalidArgument)
            let closed = try await eventually { logs.all.contains { $0.message == "connection closed" } }
            #expect(closed)
            #expect(!logs.all.contains { $0.level >= .warning }, "\(logs.all.filter { $0.level >= .warning }.map(\.metadata))")
        }
    }

    @Test func outOfDateClientIsToldSo() async throws {
        try await withServer(configure: { $0.minimumClientVersion = "9.0.0" }) { _, addresses in
            let error = await #expect(throws: ParleyError.self) {
                _ = try await ParleyClient.connect(to: addresses[0], configuration: .init(version: "1.2.0"), logger: quietLogger)
            }
            #expect(error?.code == .clientOutOfDate)
            #expect(error?.message.contains("1.2.0 is out of date") == true)
            #expect(error?.message.contains("9.0.0") == true)
        }
    }
}

@Suite(.timeLimit(.minutes(2)))
struct ShutdownTests {
    @Test func gracefulShutdownLosesNoAcceptedRequest() async throws {
        let accepted = Counter()
        var router = EchoService.router()
        router.on(Parley_Echo_V1_Sleep.self) { request, _ in
            accepted.increment()
            try await Task.sleep(for: .milliseconds(Int(request.delayMs)))
            var slept = Parley_Echo_V1_Slept()
            slept.delayMs = request.delayMs
            return slept
        }
        let server = ParleyServer(configuration: .init(listen: [.tcp(host: "127.0.0.1", port: 0)]), router: router, logger: quietLogger)
        let ended = Signal()
        let run = Task { defer { ended.raise() }; try await server.run() }
        let address = try await server.listeningAddresses[0]
        let client = try await ParleyClient.connect(to: address, logger: quietLogger)
        let calls = Task {
            try await withThrowingTaskGroup(of: UInt32.self) { group in
                for i in 0..<50 {
                    group.addTask {
                        var s = Parley_Echo_V1_Sleep()
                        s.delayMs = 300 + UInt32(i)
                        return try await client.request(s, as: Parley_Echo_V1_Slept.self).delayMs
                    }
                }
                return try await group.reduce(into: [UInt32]()) { $0.append($1) }
            }
        }
        let allAccepted = try await eventually { accepted.count == 50 }
        #expect(allAccepted)
        server.shutDown()
        let answered = try await calls.value
        #expect(answered.sorted() == (0..<50).map { 300 + UInt32($0) }, "every accepted request was answered")
        try await run.value
        // New connections are refused once the server has stopped.
        await #expect(throws: ParleyError.self) { _ = try await ParleyClient.connect(to: address, logger: quietLogger) }
        await client.closed()
    }

    /// A handler that does not return (here: one that ignores cancellation for a minute)
    /// would hold a graceful shutdown for ever; the grace period ends it, and says so.
    @Test func gracefulShutdownEndsAfterItsGracePeriod() async throws {
        let started = Signal()
        let release = Signal()
        var router = EchoService.router()
        router.on(Parley_Echo_V1_Sleep.self) { request, _ in
            started.raise()
            _ = await release.wait(seconds: 60)
            return Parley_Echo_V1_Slept()
        }
        defer { release.raise() }
        let logs = LogCollector()
        var configuration = ParleyServer.Configuration(listen: [.tcp(host: "127.0.0.1", port: 0)])
        configuration.shutdownGracePeriod = .milliseconds(500)
        let server = ParleyServer(configuration: configuration, router: router, logger: logs.logger("server"))
        let ended = Signal()
        let run = Task { defer { ended.raise() }; try await server.run() }
        let address = try await server.listeningAddresses[0]
        let client = try await ParleyClient.connect(to: address, logger: quietLogger)
        let call = Task { try await client.request(Parley_Echo_V1_Sleep(), as: Parley_Echo_V1_Slept.self) }
        #expect(await started.wait(seconds: 30))
        server.shutDown()
        // A hang detector, not a timing assertion: without the grace period run() waits for the
        // handler's whole minute.
        #expect(await ended.wait(seconds: 30), "the server stopped after the grace period")
        #expect(logs.all.contains { $0.message.contains("grace period") && $0.metadata.contains("\"connections\": 1") })
        await #expect(throws: ParleyError.self, "the unanswered call fails; it is not left waiting") { _ = try await call.value }
        release.raise()
        try await run.value
        await client.closed()
    }
}
