import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Parley
import ParleyServices
import ParleyWire
import Testing
import ParleyTestSupport

@Suite(.timeLimit(.minutes(2)))
struct MessagingTests {
    /// 10,000 requests in flight on one connection; the server answers them out of order.
    @Test func tenThousandConcurrentRequestsAnsweredOutOfOrderAndAllMatched() async throws {
        let order = Counter()
        let inversions = Counter()
        var router = ParleyRouter()
        router.on(Parley_Echo_V1_Echo.self) { request, _ in
            // Even-numbered requests wait a little, so later ones overtake them.
            let n = Int(request.text) ?? 0
            if n % 2 == 0 { try await Task.sleep(for: .milliseconds(2)) }
            let position = order.increment()
            if position < n { inversions.increment() }
            var reply = Parley_Echo_V1_EchoReply()
            reply.text = request.text
            reply.payload = request.payload
            return reply
        }
        try await withServer(router: router) { _, addresses in
            let client = try await ParleyClient.connect(to: addresses[0], configuration: .init(limits: .init(maxOutstandingRequests: 10_000)), logger: quietLogger)
            defer { client.close() }
            let mismatches = try await withThrowingTaskGroup(of: Int.self) { group in
                for i in 1...10_000 {
                    group.addTask {
                        var echo = Parley_Echo_V1_Echo()
                        echo.text = "\(i)"
                        echo.payload = Data("payload-\(i)".utf8)
                        let reply = try await client.request(echo, as: Parley_Echo_V1_EchoReply.self)
                        return reply.text == "\(i)" && reply.payload == echo.payload ? 0 : 1
                    }
                }
                return try await group.reduce(0, +)
            }
            #expect(mismatches == 0)
            #expect(order.count == 10_000)
            #expect(inversions.count > 0, "some answers overtook earlier requests")
            #expect(client.connection.outstandingRequests == 0)
        }
    }

    @Test func hundredClientsAtOnceOverUnixSocket() async throws {
        let path = testScratchPath("hundred.sock")
        try await withServer(listen: [.unix(path: path)]) { server, addresses in
            let total = try await withThrowingTaskGroup(of: Int.self) { group in
                for c in 0..<100 {
                    group.addTask {
                        let client = try await ParleyClient.connect(to: addresses[0], configuration: .init(name: "client-\(c)"), logger: quietLogger)
                        defer { client.close() }
                        var ok = 0
                        for i in 1...10 where try await ping(client, UInt64(c * 100 + i)) == UInt64(c * 100 + i) { ok += 1 }
                        return ok
                    }
                }
                return try await group.reduce(0, +)
            }
            #expect(total == 1000)
        }
    }

    @Test func inProcessTransport() async throws {
        let server = ParleyServer(configuration: .init(listen: []), router: EchoService.router(), logger: quietLogger)
        let run = Task { try await server.run() }
        _ = try await server.listeningAddresses
        let client = try await ParleyClient.connect(inProcessTo: server, logger: quietLogger)
        #expect(client.address.description == "in-process")
        #expect(try await ping(client, 77) == 77)
        var count = Parley_Echo_V1_Count()
        count.count = 3
        var items = 0
        for try await case .item in try await client.stream(count, item: Parley_Echo_V1_CountItem.self, final: Parley_Echo_V1_CountDone.self) { items += 1 }
        #expect(items == 3)
        // Many requests at once, and bulk data larger than the in-memory window.
        let answered = try await withThrowingTaskGroup(of: UInt64.self) { group in
            for i in 1...1000 { group.addTask { try await ping(client, UInt64(i)) } }
            return try await group.reduce(0, +)
        }
        #expect(answered == 500_500)
        let bulk = ByteBuffer(bytes: (0..<(3 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        let echoed = try await client.call(Parley_Echo_V1_Echo(), data: bulk, as: Parley_Echo_V1_EchoReply.self)
        #expect(echoed.data == bulk)
        #expect(server.connectionCount == 1)
        client.close()
        let gone = try await eventually { server.connectionCount == 0 }
        #expect(gone, "the server saw the in-process client leave")
        server.shutDown()
        try await run.value
    }

    @Test(arguments: [true, false])
    func handlersRunWhereConfigured(onEventLoop: Bool) async throws {
        @Sendable func whereAmI() -> String {
            let thread = MultiThreadedEventLoopGroup.currentEventLoop == nil ? "pool" : "event loop"
            let task = withUnsafeCurrentTask { $0 == nil } ? "no task" : "task"
            return "\(thread), \(task)"
        }
        var router = ParleyRouter()
        // Synchronous (the closure does not await).
        router.on(Parley_Echo_V1_Ping.self) { ping, _ in
            var pong = Parley_Echo_V1_Pong()
            pong.sequence = ping.sequence
            pong.serverName = whereAmI()
            return pong
        }
        // Asynchronous.
        router.on(Parley_Echo_V1_Echo.self) { _, _ in
            await Task.yield()
            var reply = Parley_Echo_V1_EchoReply()
            reply.text = whereAmI()
            return reply
        }
        try await withServer(configure: { $0.limits.handlersOnEventLoop = onEventLoop }, router: router) { _, addresses in
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { client.close() }
            let pong = try await client.request(Parley_Echo_V1_Ping(), as: Parley_Echo_V1_Pong.self)
            // On the event loop a synchronous handler runs inline, in the read: no task at all.
            #expect(pong.serverName == (onEventLoop ? "event loop, no task" : "pool, task"))
            let reply = try await client.request(Parley_Echo_V1_Echo(), as: Parley_Echo_V1_EchoReply.self)
            #expect(reply.text == (onEventLoop ? "event loop, task" : "pool, task"))
        }
    }

    /// Callers whose tasks run on the connection's event loop (`connection.taskExecutor`):
    /// each resumes there after its answer, and more callers than the connection's request
    /// slots wait for a slot without blocking the loop that frees it.
    @Test func callersOnTheConnectionsEventLoop() async throws {
        try await withServer { _, addresses in
            let client = try await ParleyClient.connect(
                to: addresses[0], configuration: .init(limits: .init(maxOutstandingRequests: 8)), logger: quietLogger
            )
            defer { client.close() }
            let connection = client.connection
            let (answered, offLoop) = try await withThrowingTaskGroup(of: (Int, Int).self) { group in
                for caller in 0..<64 {
                    group.addTask(executorPreference: connection.taskExecutor) {
                        var answered = 0, offLoop = 0
                        for i in 0..<20 {
                            if !connection.eventLoop.inEventLoop { offLoop += 1 }
                            var echo = Parley_Echo_V1_Echo()
                            echo.text = "\(caller).\(i)"
                            let reply = try await client.request(echo, as: Parley_Echo_V1_EchoReply.self)
                            if !connection.eventLoop.inEventLoop { offLoop += 1 }
                            if reply.text == echo.text { answered += 1 }
                        }
                        return (answered, offLoop)
                    }
                }
                return try await group.reduce((0, 0)) { ($0.0 + $1.0, $0.1 + $1.1) }
            }
            #expect(answered == 64 * 20)
            #expect(offLoop == 0)
        }
    }

    @Test func ipv6Loopback() async throws {
        try await withServer(listen: [.tcp(host: "::1", port: 0)]) { _, addresses in
            #expect(addresses[0].description.hasPrefix("[::1]:"))
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { client.close() }
            #expect(try await ping(client, 6) == 6)
            #expect(client.session.addressSeenByPeer.hasPrefix("[::1]:"))
        }
    }

    /// An address literal is connected to directly, a name through the resolver: both reach
    /// the server (that the literal skips the resolver is not observable here).
    @Test func aHostNameAndAnAddressBothConnect() async throws {
        try await withServer { _, addresses in
            guard case .tcp(_, let port) = addresses[0].kind else { Issue.record("\(addresses[0]) is not TCP"); return }
            for host in ["localhost", "127.0.0.1"] {
                let client = try await ParleyClient.connect(to: .tcp(host: host, port: port), logger: quietLogger)
                defer { client.close() }
                #expect(try await ping(client, 9) == 9)
            }
        }
    }

    @Test func serverInitiatedRequests() async throws {
        var serverRouter = ParleyRouter()
        // To answer an Echo, the server first asks the client a Ping of its own.
        serverRouter.on(Parley_Echo_V1_Echo.self) { request, context in
            var question = Parley_Echo_V1_Ping()
            question.sequence = 41
            let answer = try await context.connection.request(question, as: Parley_Echo_V1_Pong.self)
            var reply = Parley_Echo_V1_EchoReply()
            reply.text = "client answered \(answer.sequence) as \(answer.serverName)"
            return reply
        }
        var clientRouter = ParleyRouter()
        clientRouter.on(Parley_Echo_V1_Ping.self) { ping, _ in
            var pong = Parley_Echo_V1_Pong()
            pong.sequence = ping.sequence + 1
            pong.serverName = "the client"
            return pong
        }
        try await withServer(router: serverRouter) { _, addresses in
            let client = try await ParleyClient.connect(to: addresses[0], router: clientRouter, logger: quietLogger)
            defer { client.close() }
            let reply = try await client.request(Parley_Echo_V1_Echo(), as: Parley_Echo_V1_EchoReply.self)
            #expect(reply.text == "client answered 42 as the client")
        }
    }

    @Test func streamedResponse() async throws {
        try await withServer { _, addresses in
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { client.close() }
            var count = Parley_Echo_V1_Count()
            count.count = 5
            var items: [String] = []
            var final: Parley_Echo_V1_CountDone?
            for try await event in try await client.stream(count, item: Parley_Echo_V1_CountItem.self, final: Parley_Echo_V1_CountDone.self) {
                switch event {
                case .item(let item, _): items.append(item.line)
                case .final(let done): final = done
                }
            }
            #expect(items == (1...5).map { "line \($0) of 5" })
            #expect(final?.sent == 5 && final?.cancelled == false)
        }
    }

    @Test func cancelledStreamStopsTheServerHandler() async throws {
        let cancelled = Signal()
        var router = EchoService.router()
        router.onStream(Parley_Echo_V1_Count.self, item: Parley_Echo_V1_CountItem.self) { request, writer, _ in
            var done = Parley_Echo_V1_CountDone()
            do {
                for i in 0..<request.count {
                    try await Task.sleep(for: .milliseconds(5))
                    var item = Parley_Echo_V1_CountItem()
                    item.index = i
                    try await writer.send(item)
                    done.sent += 1
                }
            } catch {
                cancelled.raise()
                throw error
            }
            return done
        }
        try await withServer(router: router) { _, addresses in
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { client.close() }
            var count = Parley_Echo_V1_Count()
            count.count = 100_000
            var seen = 0
            do {
                let stream = try await client.stream(count, item: Parley_Echo_V1_CountItem.self, final: Parley_Echo_V1_CountDone.self)
                for try await case .item in stream {
                    seen += 1
                    if seen == 3 { break }
                }
            }
            #expect(seen == 3)
            #expect(await cancelled.wait(seconds: 10), "the server handler saw the cancellation")
            // The connection is still good.
            #expect(try await ping(client, 9) == 9)
        }
    }

    /// A stream whose items arrive faster than its consumer takes them is cancelled once
    /// `maxUnconsumedStreamBytes` of them wait: the consumer gets what was buffered, then
    /// `cancelled`; the server's handler is told (CANCEL); the connection goes on.
    @Test func aStreamNotConsumedIsCancelledPastItsBound() async throws {
        let cancelled = Signal()
        var router = ParleyRouter()
        router.onStream(Parley_Echo_V1_Count.self, item: Parley_Echo_V1_CountItem.self) { request, writer, _ in
            var done = Parley_Echo_V1_CountDone()
            do {
                for i in 0..<request.count {
                    // A pause now and then: a handler that only ever writes would keep its
                    // event loop (shared with the other tests) to itself until 8 MiB wait.
                    if i % 256 == 255 { try await Task.sleep(for: .microseconds(100)) }
                    var item = Parley_Echo_V1_CountItem()
                    item.index = i
                    try await writer.send(item)
                    done.sent = i + 1
                }
            } catch {
                cancelled.raise()
                throw error
            }
            return done
        }
        router.on(Parley_Echo_V1_Ping.self) { request, _ in
            var pong = Parley_Echo_V1_Pong()
            pong.sequence = request.sequence
            return pong
        }
        try await withServer(router: router) { _, addresses in
            // 64 KiB: about 480 items of this stream (each counts its bytes and 128 more).
            let limits = ParleyConnectionLimits(maxUnconsumedStreamBytes: 64 << 10)
            let client = try await ParleyClient.connect(to: addresses[0], configuration: .init(limits: limits), logger: quietLogger)
            defer { client.close() }
            var count = Parley_Echo_V1_Count()
            count.count = 1_000_000
            let stream = try await client.stream(count, item: Parley_Echo_V1_CountItem.self, final: Parley_Echo_V1_CountDone.self)
            // Nobody consumes while the server sends.
            #expect(await cancelled.wait(seconds: 20), "the server's handler was cancelled")
            var items = 0
            let error = await #expect(throws: ParleyError.self) {
                for try await case .item in stream { items += 1 }
            }
            #expect(error?.code == .cancelled)
            #expect(error?.message.contains("not yet taken by its consumer") == true, "\(String(describing: error))")
            #expect(items > 0 && items <= 512, "what was buffered is delivered first: \(items) items")
            #expect(try await ping(client, 7) == 7, "the connection goes on")
            // A stream within the bound, consumed late, arrives whole.
            count.count = 300
            let small = try await client.stream(count, item: Parley_Echo_V1_CountItem.self, final: Parley_Echo_V1_CountDone.self)
            try await Task.sleep(for: .milliseconds(300))
            var got = 0
            var final: Parley_Echo_V1_CountDone?
            for try await event in small {
                switch event {
                case .item: got += 1
                case .final(let done): final = done
                }
            }
            #expect(got == 300 && final?.sent == 300)
        }
    }

    @Test func cancellingTheCallingTaskCancelsTheRequest() async throws {
        let started = Signal()
        let cancelled = Signal()
        var router = ParleyRouter()
        router.on(Parley_Echo_V1_Sleep.self) { request, _ in
            started.raise()
            do {
                try await Task.sleep(for: .milliseconds(Int(request.delayMs)))
            } catch {
                cancelled.raise()
                throw error
            }
            return Parley_Echo_V1_Slept()
        }
        try await withServer(router: router) { _, addresses in
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { client.close() }
            let call = Task {
                var sleep = Parley_Echo_V1_Sleep()
                sleep.delayMs = 60_000
                return try await client.request(sleep, as: Parley_Echo_V1_Slept.self)
            }
            #expect(await started.wait(seconds: 10))
            call.cancel()
            let result = await call.result
            guard case .failure(let error as ParleyError) = result else {
                Issue.record("expected a cancelled error, got \(result)")
                return
            }
            #expect(error.code == .cancelled)
            #expect(await cancelled.wait(seconds: 10))
            #expect(client.connection.outstandingRequests == 0)
        }
    }

    @Test func unknownRequestTypeGetsAClearError() async throws {
        try await withServer(router: ParleyRouter()) { _, addresses in
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { client.close() }
            let error = await #expect(throws: ParleyError.self) { _ = try await ping(client, 1) }
            #expect(error?.code == .unknownMessageType)
            #expect(error?.message.contains("parley.echo.v1.Ping") == true)
        }
    }

    @Test func handlerErrorsTravelWithTheirCode() async throws {
        var router = ParleyRouter()
        router.on(Parley_Echo_V1_Ping.self) { _, _ -> Parley_Echo_V1_Pong in
            throw ParleyError(code: .invalidArgument, message: "sequence must be odd")
        }
        router.on(Parley_Echo_V1_Echo.self) { _, _ -> Parley_Echo_V1_EchoReply in
            struct Boom: Error {}
            throw Boom()
        }
        try await withServer(router: router) { _, addresses in
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { client.close() }
            let e1 = await #expect(throws: ParleyError.self) { _ = try await ping(client, 2) }
            #expect(e1 == ParleyError(code: .invalidArgument, message: "sequence must be odd"))
            let e2 = await #expect(throws: ParleyError.self) { _ = try await client.request(Parley_Echo_V1_Echo(), as: Parley_Echo_V1_EchoReply.self) }
            #expect(e2?.code == .handlerFailed)
        }
    }

    @Test func bulkDataTravelsInItsOwnSegment() async throws {
        try await withServer { _, addresses in
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { client.close() }
            var data = ByteBuffer()
            for i in 0..<(1 << 20) { data.writeInteger(UInt8(truncatingIfNeeded: i &* 31)) }
            let reply = try await client.call(Parley_Echo_V1_Echo(), data: data, as: Parley_Echo_V1_EchoReply.self)
            #expect(reply.data == data)
        }
    }

    @Test func oneWayMessages() async throws {
        let received = Counter()
        var router = ParleyRouter()
        router.onMessage(Parley_Echo_V1_Ping.self) { _, _ in received.increment() }
        router.onMessage(Parley_Echo_V1_Sleep.self) { _, _ in
            await Task.yield()
            received.increment()
        }
        router.on(Parley_Echo_V1_Echo.self) { _, _ in Parley_Echo_V1_EchoReply() }
        try await withServer(router: router) { _, addresses in
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { client.close() }
            for i in 1...20 {
                var p = Parley_Echo_V1_Ping()
                p.sequence = UInt64(i)
                try await client.send(p)
                try await client.send(Parley_Echo_V1_Sleep())
            }
            #expect(try await eventually { received.count == 40 })
        }
    }

    /// [R-7.15-1] A server at its handler limit does not take on more requests.
    @Test func backPressureBoundsTheServersWork() async throws {
        let started = Counter()
        let release = Signal()
        var router = ParleyRouter()
        router.on(Parley_Echo_V1_Sleep.self) { _, _ in
            started.increment()
            _ = await release.wait(seconds: 30)
            return Parley_Echo_V1_Slept()
        }
        try await withServer(configure: { $0.limits = .init(maxOutstandingRequests: 1024, maxConcurrentHandlers: 8) }, router: router) { _, addresses in
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { client.close() }
            let calls = Task {
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for _ in 0..<200 { group.addTask { _ = try await client.request(Parley_Echo_V1_Sleep(), as: Parley_Echo_V1_Slept.self) } }
                    try await group.waitForAll()
                }
            }
            #expect(try await eventually { started.count == 8 })
            try await Task.sleep(for: .milliseconds(200))
            #expect(started.count == 8, "200 requests sent, only the limit of 8 started")
            release.raise()
            try await calls.value
            #expect(started.count == 200)
        }
    }

    /// A completing handler is called on the event loop with no task, answers from another
    /// thread when it calls back, holds a handler slot until then (so the limit bounds it as
    /// it bounds task handlers), and a failure it reports is answered with ERROR.
    @Test func completingHandlersAnswerLaterAndHoldASlotUntilThen() async throws {
        let held = NIOLockedValueBox<[@Sendable () -> Void]>([])
        let calledWhere = NIOLockedValueBox<Set<String>>([])
        var router = ParleyRouter()
        router.onWithData(Parley_Echo_V1_Echo.self, completing: { (request: Parley_Echo_V1_Echo, _, respond: @escaping @Sendable (Result<ParleyReply<Parley_Echo_V1_EchoReply>, any Error>) -> Void) in
            let place = (MultiThreadedEventLoopGroup.currentEventLoop == nil ? "pool" : "event loop") + (withUnsafeCurrentTask { $0 == nil } ? ", no task" : ", task")
            calledWhere.withLockedValue { _ = $0.insert(place) }
            held.withLockedValue {
                $0.append {
                    if request.text == "fail" {
                        respond(.failure(ParleyError(code: .invalidArgument, message: "refused on purpose")))
                    } else {
                        var reply = Parley_Echo_V1_EchoReply()
                        reply.text = "done " + request.text
                        respond(.success(ParleyReply(reply)))
                    }
                }
            }
        })
        try await withServer(configure: { $0.limits = .init(maxOutstandingRequests: 1024, maxConcurrentHandlers: 8) }, router: router) { _, addresses in
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { client.close() }
            let calls = Task {
                try await withThrowingTaskGroup(of: String.self) { group in
                    for i in 0..<40 {
                        group.addTask {
                            var echo = Parley_Echo_V1_Echo()
                            echo.text = i == 7 ? "fail" : "\(i)"
                            do {
                                return try await client.request(echo, as: Parley_Echo_V1_EchoReply.self).text
                            } catch let error as ParleyError {
                                return "\(error.code): \(error.message)"
                            }
                        }
                    }
                    return try await group.reduce(into: [String]()) { $0.append($1) }
                }
            }
            #expect(try await eventually { held.withLockedValue { $0.count } == 8 })
            try await Task.sleep(for: .milliseconds(200))
            #expect(held.withLockedValue { $0.count } == 8, "40 requests sent, only the limit of 8 called")
            // Answer from this task's thread (not the event loop), a few at a time, until all were called.
            var answered = 0
            while answered < 40 {
                let batch = held.withLockedValue { h -> [@Sendable () -> Void] in
                    defer { h = [] }
                    return h
                }
                batch.forEach { $0() }
                answered += batch.count
                if answered < 40 {
                    try #require(try await eventually { held.withLockedValue { !$0.isEmpty } }, "\(answered) of 40 answered, and no more handler was called")
                }
            }
            let answers = try await calls.value
            #expect(answers.count == 40)
            #expect(Set(answers.filter { $0.hasPrefix("done ") }) == Set((0..<40).filter { $0 != 7 }.map { "done \($0)" }))
            #expect(answers.contains("invalidArgument: refused on purpose"))
            #expect(calledWhere.withLockedValue { $0 } == ["event loop, no task"])
        }
    }

    /// A ping router whose request with sequence 1 waits for `release` (holding a handler
    /// slot); every ping is recorded in `started` as its handler begins.
    static func pingRouterHoldingFirst(until release: Signal, started: NIOLockedValueBox<[UInt64]> = NIOLockedValueBox([])) -> ParleyRouter {
        var router = ParleyRouter()
        router.on(Parley_Echo_V1_Ping.self) { ping, _ in
            started.withLockedValue { $0.append(ping.sequence) }
            if ping.sequence == 1 { _ = await release.wait(seconds: 30) }
            var pong = Parley_Echo_V1_Pong()
            pong.sequence = ping.sequence
            return pong
        }
        return router
    }

    @Test func requestCancelledWhileQueuedForAHandlerSlotNeverRuns() async throws {
        let started = NIOLockedValueBox<[UInt64]>([])
        let release = Signal()
        let router = Self.pingRouterHoldingFirst(until: release, started: started)
        try await withServer(configure: { $0.limits = .init(maxConcurrentHandlers: 1) }, router: router) { _, addresses in
            // One write: request 1 takes the only handler slot, request 2 waits in the queue,
            // then its CANCEL arrives in the same read and takes it out, then request 3.
            let cancel = WireMessage(header: MessageHeader(id: 2, kind: .cancel, type: ""), payload: ByteBuffer())
            let bytes = clientSessionBytes(messages: [pingMessage(id: 1), pingMessage(id: 2), cancel, pingMessage(id: 3)])
            let releaser = Task {
                _ = try await eventually { started.withLockedValue { $0 } == [1] }
                try await Task.sleep(for: .milliseconds(100))
                release.raise()
            }
            let (reply, _) = try await RawPeer.connect(addresses[0]).exchange(bytes, halfClose: false) {
                frames(in: $0).filter { $0.tag == .message }.count == 2
            }
            try await releaser.value
            let answers = frames(in: reply).filter { $0.tag == .message }.compactMap { try? WireMessage(frame: $0) }
            #expect(answers.map(\.header.id) == [1, 3])
            #expect(started.withLockedValue { $0 } == [1, 3], "the cancelled request never reached its handler")
        }
    }

    /// A synchronous handler (run on the event loop, needing no slot) does not overtake
    /// requests queued for a handler slot before it: it waits its turn in the queue.
    @Test func aSynchronousHandlerWaitsBehindRequestsQueuedBeforeIt() async throws {
        let started = NIOLockedValueBox<[UInt64]>([])
        let release = Signal()
        var router = Self.pingRouterHoldingFirst(until: release, started: started)
        router.on(Parley_Echo_V1_Sleep.self) { sleep, _ in
            started.withLockedValue { $0.append(1000 + UInt64(sleep.delayMs)) }
            return Parley_Echo_V1_Slept()
        }
        try await withServer(configure: { $0.limits = .init(maxConcurrentHandlers: 1) }, router: router) { _, addresses in
            // One write: ping 1 takes the only slot, ping 2 waits in the queue, then the
            // synchronous Sleep (id 3) comes.
            var sleep = Parley_Echo_V1_Sleep()
            sleep.delayMs = 3
            let sync = WireMessage(header: MessageHeader(id: 3, kind: .request, type: Parley_Echo_V1_Sleep.protoMessageName), payload: sleep.parleyPayload())
            let bytes = clientSessionBytes(messages: [pingMessage(id: 1), pingMessage(id: 2), sync])
            let releaser = Task {
                _ = try await eventually { started.withLockedValue { $0 }.contains(1) }
                try await Task.sleep(for: .milliseconds(200))
                release.raise()
            }
            let (reply, _) = try await RawPeer.connect(addresses[0]).exchange(bytes, halfClose: false) {
                frames(in: $0).filter { $0.tag == .message }.count == 3
            }
            try await releaser.value
            let answers = frames(in: reply).filter { $0.tag == .message }.compactMap { try? WireMessage(frame: $0) }
            #expect(Set(answers.map(\.header.id)) == [1, 2, 3])
            #expect(started.withLockedValue { $0 } == [1, 2, 1003], "\(started.withLockedValue { $0 })")
        }
    }

    @Test func requestIdReusedWhileStillServedClosesTheConnection() async throws {
        try await withServer { _, addresses in
            // Sleep 1 runs for a minute; a second REQUEST with id 1 arrives meanwhile.
            var sleep = Parley_Echo_V1_Sleep()
            sleep.delayMs = 60_000
            let long = WireMessage(header: MessageHeader(id: 1, kind: .request, type: Parley_Echo_V1_Sleep.protoMessageName), payload: sleep.parleyPayload())
            let bytes = clientSessionBytes(messages: [long, pingMessage(id: 1)])
            let (reply, closed) = try await RawPeer.connect(addresses[0]).exchange(bytes, halfClose: false)
            #expect(closed)
            let received = frames(in: reply)
            #expect(!received.contains { $0.tag == .message }, "no ERROR with the id of the request still being served")
            let close = try #require(received.last)
            #expect(close.tag == .close)
            let status = try Parley_V1_Status(parleyPayload: close.segments[0])
            #expect(ParleyError.Code(rawValue: status.code) == .protocolViolation)
            #expect(status.message.contains("request id 1 is already in use"))
        }
    }

    /// A request id is in use while its request waits in the queue too (all handler slots
    /// taken), and free again once that request is cancelled there.
    @Test func requestIdReusedWhileQueuedClosesTheConnectionAndIsFreeAfterItsCancel() async throws {
        let release = Signal()
        let router = Self.pingRouterHoldingFirst(until: release)
        try await withServer(configure: { $0.limits = .init(maxConcurrentHandlers: 1) }, router: router) { _, addresses in
            // Request 1 holds the only slot; 2 is queued; a second 2 is a violation.
            let reused = clientSessionBytes(messages: [pingMessage(id: 1), pingMessage(id: 2), pingMessage(id: 2)])
            let (reply, closed) = try await RawPeer.connect(addresses[0]).exchange(reused, halfClose: false)
            #expect(closed)
            let close = try #require(frames(in: reply).last)
            #expect(close.tag == .close)
            let status = try Parley_V1_Status(parleyPayload: close.segments[0])
            #expect(status.message.contains("request id 2 is already in use"), "\(status.message)")
            release.raise()
        }
        let again = Signal()
        let started = NIOLockedValueBox<[UInt64]>([])
        let second = Self.pingRouterHoldingFirst(until: again, started: started)
        try await withServer(configure: { $0.limits = .init(maxConcurrentHandlers: 1) }, router: second) { _, addresses in
            // 2 and 3 are queued, 2 is cancelled there, and its id used again by the next request.
            let cancel = WireMessage(header: MessageHeader(id: 2, kind: .cancel, type: ""), payload: ByteBuffer())
            let bytes = clientSessionBytes(messages: [pingMessage(id: 1), pingMessage(id: 2), pingMessage(id: 3), cancel, pingMessage(id: 2)])
            let releaser = Task {
                _ = try await eventually { started.withLockedValue { $0 } == [1] }
                try await Task.sleep(for: .milliseconds(100))
                again.raise()
            }
            let (reply, _) = try await RawPeer.connect(addresses[0]).exchange(bytes, halfClose: false) {
                frames(in: $0).filter { $0.tag == .message }.count == 3
            }
            try await releaser.value
            let answers = frames(in: reply).filter { $0.tag == .message }.compactMap { try? WireMessage(frame: $0) }
            #expect(answers.map(\.header.id) == [1, 3, 2])
            #expect(!frames(in: reply).contains { $0.tag == .close }, "the reused id after its cancel is no violation")
        }
    }

    @Test func callCancelledWhileTheServerIsAtItsHandlerLimitFailsAtOnce() async throws {
        let release = Signal()
        let router = Self.pingRouterHoldingFirst(until: release)
        try await withServer(configure: { $0.limits = .init(maxConcurrentHandlers: 1) }, router: router) { _, addresses in
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { client.close() }
            func ping(_ n: UInt64) async throws -> UInt64 {
                var p = Parley_Echo_V1_Ping()
                p.sequence = n
                return try await client.request(p, as: Parley_Echo_V1_Pong.self).sequence
            }
            let first = Task { try await ping(1) }
            try await Task.sleep(for: .milliseconds(100))
            // The server has stopped reading: request 2 and its CANCEL wait in the socket.
            let second = Task { try await ping(2) }
            try await Task.sleep(for: .milliseconds(100))
            second.cancel()
            let error = await #expect(throws: ParleyError.self) { try await second.value }
            #expect(error?.code == .cancelled)
            release.raise()
            #expect(try await first.value == 1)
            // The late answer to request 2 (if any) is discarded; the connection goes on.
            #expect(try await ping(3) == 3)
            #expect(client.connection.outstandingRequests == 0)
        }
    }

    /// The callback form of `call`: answers and errors reach the callback once each, on the
    /// connection's event loop; beyond the request slots, calls wait and still complete, in
    /// order of the slots freed; those outstanding when the connection closes fail.
    @Test func callbackCallsCompleteOnceWithAnswersErrorsAndTheConnectionsEnd() async throws {
        let release = Signal()
        var router = ParleyRouter()
        router.on(Parley_Echo_V1_Ping.self) { ping, _ in
            if ping.sequence == 0 { throw ParleyError(code: .invalidArgument, message: "sequence 0") }
            if ping.sequence >= 100 { _ = await release.wait(seconds: 30) }
            var pong = Parley_Echo_V1_Pong()
            pong.sequence = ping.sequence
            return pong
        }
        // An event loop of its own: on NIO's shared two, a full parallel run on a loaded CI
        // machine once left this test's requests unanswered for its whole wait.
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        try await withServer(router: router, group: group) { _, addresses in
            let client = try await ParleyClient.connect(
                to: addresses[0], configuration: .init(limits: .init(maxOutstandingRequests: 4)), logger: quietLogger, group: group
            )
            defer { client.close() }
            let loop = client.connection.eventLoop
            let results = NIOLockedValueBox<[UInt64: [Result<UInt64, ParleyError>]]>([:])
            let offLoop = Counter()
            func ping(_ n: UInt64) {
                var p = Parley_Echo_V1_Ping()
                p.sequence = n
                client.call(p, as: Parley_Echo_V1_Pong.self) { result in
                    if !loop.inEventLoop { offLoop.increment() }
                    let r = result.map(\.message.sequence).mapError { $0 as? ParleyError ?? ParleyError(code: .unspecified, message: "\($0)") }
                    results.withLockedValue { $0[n, default: []].append(r) }
                }
            }
            // 40 calls through 4 slots: most wait for a slot, in a task.
            for n in 1...40 { ping(UInt64(n)) }
            ping(0)
            #expect(try await eventually(seconds: 60) { results.withLockedValue { $0.count } == 41 })
            results.withLockedValue { r in
                for n in UInt64(1)...40 { #expect(r[n] == [.success(n)]) }
                #expect(r[0] == [.failure(ParleyError(code: .invalidArgument, message: "sequence 0"))])
            }
            // Requests with a free slot were answered on the event loop, with no task.
            #expect(offLoop.count < 41)
            #expect(client.connection.outstandingRequests == 0)

            // Two held by the server when the connection closes: both fail, once.
            ping(100)
            ping(101)
            #expect(try await eventually(seconds: 60) { client.connection.outstandingRequests == 2 })
            client.close()
            #expect(try await eventually(seconds: 60) { results.withLockedValue { $0[100] != nil && $0[101] != nil } })
            try await Task.sleep(for: .milliseconds(50))
            results.withLockedValue { r in
                #expect(r[100]?.count == 1 && r[101]?.count == 1)
                #expect(r[100]?.first.flatMap { try? $0.get() } == nil)
                if case .failure(let e)? = r[100]?.first { #expect(e.code == .connectionClosed) }
            }
            release.raise()
        }
        try await group.shutdownGracefully()
    }

    @Test func handlerThatClosesItsConnectionWhileAnsweringDoesNotBreakTheServer() async throws {
        var router = ParleyRouter()
        router.on(Parley_Echo_V1_Ping.self) { ping, context in
            if ping.sequence == 13 { context.connection.close() }
            var pong = Parley_Echo_V1_Pong()
            pong.sequence = ping.sequence
            return pong
        }
        try await withServer(router: router) { _, addresses in
            let doomed = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            var p = Parley_Echo_V1_Ping()
            p.sequence = 13
            let error = await #expect(throws: ParleyError.self) { _ = try await doomed.request(p, as: Parley_Echo_V1_Pong.self) }
            #expect(error?.code == .connectionClosed)
            await doomed.closed()
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { client.close() }
            #expect(try await ping(client, 5) == 5)
        }
    }
}
