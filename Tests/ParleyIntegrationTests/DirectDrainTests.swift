import MetricsTestKit
import NIOConcurrencyHelpers
import NIOCore
import Parley
import ParleyServices
import ParleyWire
import Testing

/// DIRECT requests in flight and a server's drain (docs/protocol.md 7.16), with a service
/// that breaks the rule of one answer per request; and a client receiving answers for ids it
/// is not waiting for.
@Suite(.timeLimit(.minutes(1)))
struct DirectDrainTests {
    /// A server whose Ping grants DIRECT; each DIRECT request goes to `take` with an answer
    /// carrying back the request's kind (its header's first byte) in 8 bytes.
    static func startServer(
        metrics: TestMetrics? = nil,
        _ take: @escaping @Sendable (_ direct: ParleyDirectRequest, _ answer: DirectFrame, _ kind: UInt8?) -> Void
    ) async throws -> (server: ParleyServer, task: Task<Void, any Error>, address: ParleyAddress) {
        var router = ParleyRouter()
        router.on(Parley_Echo_V1_Ping.self) { request, context in
            // The grant: DIRECT requests go to this handler from now on.
            try? context.connection.enableDirect { direct in
                let kind = direct.header.getInteger(at: direct.header.readerIndex, as: UInt8.self)
                var answer = direct.answerFrame(headerLength: 8, dataLength: nil)
                answer.setHeader(UInt64(kind ?? 0), at: 8)
                take(direct, answer, kind)
            }
            var pong = Parley_Echo_V1_Pong()
            pong.sequence = request.sequence
            return pong
        }
        var configuration = ParleyServer.Configuration(listen: [.tcp(host: "127.0.0.1", port: 0)])
        configuration.metricsFactory = metrics
        let server = ParleyServer(configuration: configuration, router: router, logger: quietLogger)
        let task = Task { try await server.run() }
        return (server, task, try await server.listeningAddresses[0])
    }

    /// A DIRECT request of kind `kind`.
    static func request(_ kind: UInt8, on connection: ParleyConnection) -> DirectFrame {
        var frame = DirectFrame(allocator: connection.channelAllocator, headerLength: 8, dataLength: nil)
        frame.setHeader(UInt64(kind), at: 8)
        return frame
    }

    /// The kind an answer carries back (its header's first 8 bytes, after the id).
    static func kind(of answer: Frame) -> UInt64? {
        answer.segments[0].getInteger(at: answer.segments[0].readerIndex + 8, endianness: .little, as: UInt64.self)
    }

    /// [R-7.16-7] [R-7.16-8]: a service answers one DIRECT request twice (its mistake) while another is
    /// still being served. The second answer is dropped and does not count the other request
    /// out: a graceful shutdown waits for it, and its answer reaches the client before CLOSE.
    /// (Counted out when the service answered rather than when the connection took the
    /// answer, the request left in flight went uncounted, the drain closed the connection at
    /// once, and the client's request failed with `shuttingDown`.) Nor is it counted as a
    /// request handled: the server's metrics count the Ping and the two DIRECT requests, and
    /// time each of them.
    @Test func aSecondAnswerDoesNotCountAnotherRequestOut() async throws {
        let held = NIOLockedValueBox<ParleyDirectRequest?>(nil)
        let heldArrived = Signal()
        let metrics = TestMetrics()
        let (server, task, address) = try await Self.startServer(metrics: metrics) { direct, answer, kind in
            if kind == 1 {
                direct.answer(answer)
                direct.answer(answer)  // the mistake
            } else {
                held.withLockedValue { $0 = direct }
                heldArrived.raise()
            }
        }
        defer { server.shutDown() }
        let client = try await ParleyClient.connect(to: address, logger: quietLogger)
        #expect(try await ping(client, 1) == 1)
        let connection = client.connection
        #expect(connection.mayUseDirect)
        func request(_ kind: UInt8) -> DirectFrame { Self.request(kind, on: connection) }
        func kind(of answer: Frame) -> UInt64? { Self.kind(of: answer) }
        let answers = NIOLockedValueBox<[UInt8: Result<Frame, ParleyError>]>([:])
        let second = Signal()
        // The request the service holds first, then the one it answers twice.
        connection.sendDirect(request(2)) { result in
            answers.withLockedValue { $0[2] = result.map { $0.frame } }
            second.raise()
        }
        #expect(await heldArrived.wait(seconds: 10), "the service never got the request it holds")
        let first = await withCheckedContinuation { c in connection.sendDirect(request(1)) { c.resume(returning: $0.map { $0.frame }) } }
        guard case .success(let frame) = first else {
            Issue.record("the request answered twice failed: \(first)")
            return
        }
        #expect(kind(of: frame) == 1)
        // Drain: the held request is still unanswered, so no CLOSE yet. Given time to close
        // (it would, within milliseconds, had the second answer counted the held one out).
        server.shutDown()
        try await Task.sleep(for: .milliseconds(300))
        #expect(answers.withLockedValue { $0[2] } == nil, "the held request ended before its answer: \(String(describing: answers.withLockedValue { $0[2] }))")
        let heldRequest = try #require(held.withLockedValue { $0 })
        var heldAnswer = heldRequest.answerFrame(headerLength: 8, dataLength: nil)
        heldAnswer.setHeader(UInt64(2), at: 8)
        heldRequest.answer(heldAnswer)
        #expect(await second.wait(seconds: 10), "the held request's answer never came")
        guard case .success(let late)? = answers.withLockedValue({ $0[2] }) else {
            Issue.record("the held request failed: \(String(describing: answers.withLockedValue { $0[2] }))")
            return
        }
        #expect(kind(of: late) == 2)
        // Then the drain ends the connection with CLOSE and the server stops.
        #expect(await connection.closed().code == .shuttingDown)
        try await task.value
        let handled = metrics.counters(label: "parley_requests_handled_total").reduce(0) { $0 + $1.totalValue }
        #expect(handled == 3, "requests handled: the Ping and two DIRECT requests, one of them answered twice")
        let timed = metrics.timers(label: "parley_request_duration").reduce(0) { $0 + $1.values.count }
        #expect(timed == 3, "handler durations recorded")
    }

    /// [R-7.16-6]: a DIRECT answer whose id is not that of a request the client waits for is
    /// discarded: a proxy sends before each answer of the server a stray copy for an id the
    /// client never used, its header saying 99. The client's two requests in flight each get
    /// their own answer, the connection stays up, and it serves a ping and more DIRECT after.
    /// (A client that failed the connection on such an answer, or gave it to a request
    /// waiting for another id, fails this test.)
    @Test func anAnswerForAnIdNotWaitedForIsDiscarded() async throws {
        // The service answers each DIRECT request at once.
        let (server, task, serverAddress) = try await Self.startServer { direct, answer, _ in direct.answer(answer) }
        defer { server.shutDown() }
        let edits = Counter()
        let (proxy, address) = try await ManInTheMiddleTests.startProxy(to: serverAddress, edit: .strayDirectAnswers, edits: edits)
        let client = try await ParleyClient.connect(to: address, logger: quietLogger)
        #expect(try await ping(client, 1) == 1)
        let connection = client.connection
        #expect(connection.mayUseDirect)
        func send(_ kind: UInt8) async -> Result<Frame, ParleyError> {
            await withCheckedContinuation { c in connection.sendDirect(Self.request(kind, on: connection)) { c.resume(returning: $0.map { $0.frame }) } }
        }
        func kind(of result: Result<Frame, ParleyError>) -> UInt64? {
            guard case .success(let answer) = result else { return nil }
            return Self.kind(of: answer)
        }
        // Two in flight at once, so that a stray answer finds another request waiting.
        async let first = send(1)
        async let second = send(2)
        let (a, b) = await (first, second)
        #expect(kind(of: a) == 1, "\(a)")
        #expect(kind(of: b) == 2, "\(b)")
        #expect(kind(of: await send(3)) == 3)
        #expect(edits.count >= 3, "the proxy sent \(edits.count) stray answers")
        #expect(try await ping(client, 2) == 2, "the connection did not stay up")
        client.close()
        try? await proxy.close()
        server.shutDown()
        try await task.value
    }
}
