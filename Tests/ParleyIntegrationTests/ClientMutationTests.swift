import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Parley
import ParleyServices
import ParleyTestSupport
import ParleyWire
import SwiftProtobuf
import Testing

/// The client's side of `MutationTests`: corrupted variants of what real servers sent to a
/// real client, served back to `ParleyClient` by a malicious server.
///
/// First the bytes of four sessions are recorded through a relay in front of in-process
/// servers: `main` (a SERVER_IDENT with messages and a request delay, then a ping, a one-way
/// ping answered one-way, an echo with data, a stream, a request whose handler sends a NOTICE,
/// a one-way message and a request to the client, an ERROR, an unknown type, a DIRECT grant
/// and a DIRECT answer), `firstCall` (a request sent with the handshake), `redirect` (a
/// SERVER_IDENT that redirects) and `refusal` (a SERVER_IDENT that refuses an out-of-date
/// client). Each piece of a server's stream (its banner, each frame) is kept with the number
/// of client requests the server had received before sending it (its gate).
///
/// Then each variant is one of these streams mutated (seeded; the seed and the variant's
/// number repeat it): bits flipped, bytes replaced, inserted or cut (which CRCs catch), and
/// above all changes with the CRCs made right again, so that the client's logic past the
/// decoder sees them: segment bytes, message header fields, frames duplicated, dropped,
/// moved or added (NOTICEs, CLOSEs, KEEPALIVEs, answers to unknown ids, frames out of
/// phase), handshake fields (features, frame limit, auth mode, nucleus, refusal). A raw
/// listener serves it piece by piece, each piece once the client has sent as many requests
/// as when the server sent it (or 200 ms have passed), then half-closes. The client runs the
/// session's script against it. Each variant must end within 10 s (a variant left running is
/// tried again once the others are done, for 30 s: still running is a hang), and every call
/// must either succeed with an answer of its type or throw a `ParleyError` with a message,
/// of a known code or of one the server sent (reported by number, R-7.9-1).
/// Most variants must get past the handshake, so that more than the banner is tested.
@Suite(.timeLimit(.minutes(10)))
struct ClientMutationTests {
    // MARK: - The test

    @Test func corruptedServerStreamsNeverCrashOrHangTheClient() async throws {
        let environment = ProcessInfo.processInfo.environment
        let variants = Int(environment["PARLEY_CLIENT_MUTATIONS"] ?? "") ?? 2000
        let seed = UInt64(environment["PARLEY_CLIENT_MUTATION_SEED"] ?? "") ?? 0x5EED_C11E
        let only = Int(environment["PARLEY_CLIENT_MUTATION_ONLY"] ?? "")
        print("""
            client mutations: \(variants) variants, seed \(seed) (PARLEY_CLIENT_MUTATION_SEED=\(seed) PARLEY_CLIENT_MUTATION_ONLY=N repeats \
            variant N; PARLEY_CLIENT_MUTATION_VERBOSE=1 prints each variant's outcome)
            """)
        let started = ContinuousClock.now
        try await Self.withRecordedSeeds { seeds, target in
            let workers = 8
            let results = NIOLockedValueBox<[Outcome]>([])
            let slow = NIOLockedValueBox<[(n: Int, seed: Int, kind: String, elements: [Element])]>([])
            try await withThrowingTaskGroup(of: Void.self) { group in
                for w in 0..<workers {
                    group.addTask {
                        let current = NIOLockedValueBox<[Element]>([])
                        let server = try await ByteServer.start { await Self.replay(current.withLockedValue { $0 }, on: $0) }
                        var n = w
                        while n < variants {
                            defer { n += workers }
                            if let only, n != only { continue }
                            var dice = Dice(seed: seed, variant: n)
                            let (s, elements, kind) = Self.variant(seeds: seeds, target: target, dice: &dice)
                            current.withLockedValue { $0 = elements }
                            let script = seeds[s].script
                            let run = await Self.withDeadline(seconds: 10) { await Self.drive(script, to: server.address) }
                            guard let run else {
                                slow.withLockedValue { $0.append((n, s, kind, elements)) }
                                continue
                            }
                            results.withLockedValue { $0.append(Outcome(n: n, seed: seeds[s].name, kind: kind, run: run)) }
                        }
                        await server.stop()
                    }
                }
                try await group.waitForAll()
            }
            // A variant left running for 10 s is tried again once the others are done: a client
            // that hangs on it hangs again; one only slowed by a loaded machine ends now.
            let slowOnes = slow.withLockedValue { $0 }
            try await withThrowingTaskGroup(of: Void.self) { group in
                for (n, s, kind, elements) in slowOnes.prefix(20) {
                    group.addTask {
                        let server = try await ByteServer.start { await Self.replay(elements, on: $0) }
                        let script = seeds[s].script
                        let run = await Self.withDeadline(seconds: 30) { await Self.drive(script, to: server.address) }
                        print("variant \(n) (\(seeds[s].name), \(kind)) ran for 10 s; tried again it \(run == nil ? "ran for 30 s" : "ended")")
                        guard let run else {
                            Issue.record("the client hangs on variant \(n) (seed \(seed), \(seeds[s].name), \(kind)): it did not end within 10 s, nor again within 30 s")
                            return
                        }
                        await server.stop()
                        results.withLockedValue { $0.append(Outcome(n: n, seed: seeds[s].name, kind: kind, run: run)) }
                    }
                }
                try await group.waitForAll()
            }
            #expect(slowOnes.count <= 20, "\(slowOnes.count) variants ran for 10 s")
            let outcomes = results.withLockedValue { $0 }.sorted { $0.n < $1.n }
            if environment["PARLEY_CLIENT_MUTATION_VERBOSE"] != nil {
                for o in outcomes {
                    let errors = o.run.errors.map { "\($0.step): \(String("\($0.error)".prefix(200)))" }
                    print("variant \(o.n) \(o.seed) [\(o.kind)] connected=\(o.run.connected) ok=\(o.run.expected) altered=\(o.run.altered) errors=\(errors)")
                }
            }
            let elapsed = ContinuousClock.now - started
            Self.printSummary(outcomes, slow: slowOnes.count, elapsed: elapsed)
            var reported = 0
            for o in outcomes where !o.run.problems.isEmpty {
                reported += 1
                if reported <= 20 {
                    Issue.record("variant \(o.n) (seed \(seed), \(o.seed), \(o.kind)): \(String(o.run.problems.joined(separator: "; ").prefix(500)))")
                }
            }
            #expect(reported == 0, "\(reported) variants got a crash-free but wrong outcome")
            guard only == nil else { return }
            #expect(outcomes.count == variants, "\(variants - outcomes.count) variants did not end")
            // Most variants reach the client's logic past the handshake, and many of those
            // fail there: the test is not one of the banner alone.
            let connected = outcomes.filter(\.run.connected).count
            let failedAfter = outcomes.filter { $0.run.connected && !$0.run.errors.isEmpty }.count
            #expect(connected * 2 >= variants, "only \(connected) of \(variants) variants got past the handshake")
            #expect(failedAfter * 5 >= variants, "only \(failedAfter) of \(variants) variants failed after the handshake")
            let codes = Set(outcomes.compactMap { ($0.run.errors.first?.error as? ParleyError)?.code })
            #expect(codes.count >= 8, "variants end in only \(codes.count) different errors: \(codes)")
            #expect(outcomes.contains { $0.run.errors.isEmpty && $0.run.connected }, "some variants leave the session intact")
        }
    }

    /// A request waiting out a server's request delay ends when the connection does, with the
    /// connection's error: a server that asks for a day's delay (or a NOTICE that does) and
    /// then closes must not hold the call for a day.
    @Test func aCallWaitingForTheRequestDelayEndsWithTheConnection() async throws {
        // A hand-made server: handshake with a request delay of an hour, then EOF.
        var ident = Parley_V1_ServerIdent()
        ident.nucleus.requestDelaySeconds = 3600
        var done = Parley_V1_AuthDone()
        done.method = AuthMethod.none
        var hello = Parley_V1_Hello()
        hello.entityType = .server
        var banner = ByteBuffer()
        banner.writeBanner(Banner(supported: .implemented))
        let elements = [
            Element(bytes: Array(banner.readableBytesView), gate: 0), Element(bytes: Self.encode(hello.frame(tag: .hello)), gate: 0),
            Element(bytes: Self.encode(done.frame(tag: .authDone)), gate: 0), Element(bytes: Self.encode(ident.frame(tag: .serverIdent)), gate: 4),
        ]
        let server = try await ByteServer.start { await Self.replay(elements, on: $0) }
        let first = await Self.withDeadline(seconds: 10) { () -> Result<UInt64, ParleyError> in
            do {
                let client = try await ParleyClient.connect(to: server.address, logger: quietLogger)
                defer { client.close() }
                return .success(try await ping(client, 1))
            } catch {
                return .failure(error as? ParleyError ?? ParleyError(code: .unspecified, message: "\(error)"))
            }
        }
        await server.stop()
        guard case .failure(let error)? = first else {
            Issue.record("a request waiting for an hour's delay on a connection the server closed: \(first.map { "\($0)" } ?? "still waiting after 10 s")")
            return
        }
        #expect(error.code == .connectionClosed, "\(error)")
        // The same when the application closes the client while a call waits.
        try await withServer(configure: { $0.nucleus = ParleyNucleus(requestDelay: 3600) }) { _, addresses in
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            let call = Task { try await ping(client, 1) }
            try await Task.sleep(for: .milliseconds(100))
            client.close()
            let ended = await Self.withDeadline(seconds: 10) { await call.result }
            guard let ended, case .failure(let failure) = ended, let error = failure as? ParleyError else {
                Issue.record("a call waiting for an hour's delay after the client was closed: \(ended.map { "\($0)" } ?? "still waiting after 10 s")")
                return
            }
            #expect(error.code == .connectionClosed, "\(error)")
        }
    }

    /// An ERROR answer and a refusing SERVER_IDENT whose Status has no message still give an
    /// error that says what happened (as a CLOSE without one does: "no reason given").
    @Test func anErrorOrARefusalWithoutAMessageStillSaysWhatHappened() async throws {
        var hello = Parley_V1_Hello()
        hello.entityType = .server
        var done = Parley_V1_AuthDone()
        done.method = AuthMethod.none
        var banner = ByteBuffer()
        banner.writeBanner(Banner(supported: .implemented))
        func handshake(_ ident: Parley_V1_ServerIdent) -> [Element] {
            [
                Element(bytes: Array(banner.readableBytesView), gate: 0), Element(bytes: Self.encode(hello.frame(tag: .hello)), gate: 0),
                Element(bytes: Self.encode(done.frame(tag: .authDone)), gate: 0), Element(bytes: Self.encode(ident.frame(tag: .serverIdent)), gate: 4),
            ]
        }
        var status = Parley_V1_Status()
        status.code = 0
        var error = RawFrame(Self.message(kind: .error, id: 1, type: Parley_V1_Status.protoMessageName, payload: Self.bytes(status)))!
        Self.put64(&error.segments[0], 0, 1)  // seq 1
        var refusing = Parley_V1_ServerIdent()
        refusing.refusal.code = ParleyError.Code.clientOutOfDate.rawValue
        for (elements, what) in [
            (handshake(Parley_V1_ServerIdent()) + [Element(bytes: error.bytes, gate: 5)], "an ERROR"),
            (handshake(refusing), "a refusal"),
        ] {
            let server = try await ByteServer.start { await Self.replay(elements, on: $0) }
            let outcome = await Self.withDeadline(seconds: 10) { () -> ParleyError? in
                do {
                    let client = try await ParleyClient.connect(to: server.address, logger: quietLogger)
                    defer { client.close() }
                    _ = try await ping(client, 1)
                    return nil
                } catch {
                    return error as? ParleyError ?? ParleyError(code: .unspecified, message: "not a ParleyError: \(error)")
                }
            }
            await server.stop()
            guard let finished = outcome, let outcome = finished else {
                Issue.record("\(what) without a message: \(String(describing: outcome))")
                continue
            }
            #expect(outcome.code == (what == "a refusal" ? .clientOutOfDate : .unspecified), "\(what): \(outcome)")
            #expect(outcome.message.contains("no reason"), "\(what) without a message gave: \"\(outcome.message)\"")
        }
    }

    // MARK: - Outcomes

    /// What a client did with one server stream.
    struct Run: Sendable {
        /// `connect` returned: the variant got past the handshake.
        var connected = false
        /// Steps whose answer was the one the server first sent.
        var expected: [String] = []
        /// Steps answered with a well-formed answer of their type, but another one.
        var altered: [String] = []
        /// Steps that threw (on a connection still open, later steps were still run).
        var errors: [(step: String, error: any Error)] = []
        /// What was wrong (besides a hang): empty for a good outcome.
        var problems: [String] = []

        mutating func check(_ step: String, _ error: any Error) {
            self.errors.append((step, error))
            guard let e = error as? ParleyError else {
                self.problems.append("\(step) threw \(type(of: error)), not a ParleyError: \(error)")
                return
            }
            if e.message.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty {
                self.problems.append("\(step) threw \(e.code) with an empty message")
            }
            // A code no one defined can only be the server's (an ERROR, CLOSE or refusal): it is
            // accepted and reported by number (R-7.9-1).
            if !ParleyError.Code.allKnown.contains(e.code), !"\(e)".contains("\(e.code.rawValue)") {
                self.problems.append("\(step) threw code \(e.code.rawValue) without saying its number: \(e)")
            }
        }
    }

    struct Outcome: Sendable {
        var n: Int
        var seed: String
        var kind: String
        var run: Run

        /// `ok`, `altered`, or the first error's code.
        var label: String {
            guard let first = self.run.errors.first else { return self.run.altered.isEmpty ? "ok" : "ok, altered answer" }
            return (first.error as? ParleyError).map { "\($0.code)" } ?? "\(type(of: first.error))"
        }
    }

    static func printSummary(_ outcomes: [Outcome], slow: Int, elapsed: Duration) {
        let n = max(outcomes.count, 1)
        let connected = outcomes.filter(\.run.connected).count
        let failedAfter = outcomes.filter { $0.run.connected && !$0.run.errors.isEmpty }.count
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        var lines = ["client mutations: \(outcomes.count) variants in \(String(format: "%.1f", seconds)) s"]
        lines.append("  past the handshake: \(connected) (\(connected * 100 / n)%), of which \(failedAfter) then failed; \(slow) ran for 10 s")
        func table(_ title: String, _ key: (Outcome) -> String) {
            var counts: [String: (all: Int, connected: Int)] = [:]
            for o in outcomes {
                counts[key(o), default: (0, 0)].all += 1
                if o.run.connected { counts[key(o), default: (0, 0)].connected += 1 }
            }
            lines.append("  by \(title):")
            for (k, v) in counts.sorted(by: { $0.value.all > $1.value.all }) {
                lines.append("    \(String(v.all).leftPadded(5)) \(k) (past the handshake: \(v.connected))")
            }
        }
        table("outcome (the first error)", \.label)
        table("mutation", \.kind)
        table("session", \.seed)
        var steps: [String: Int] = [:]
        for o in outcomes {
            for e in o.run.errors { steps["\(e.step): \((e.error as? ParleyError).map { "\($0.code)" } ?? "?")", default: 0] += 1 }
        }
        lines.append("  errors by step (all of them):")
        for (k, v) in steps.sorted(by: { $0.value > $1.value }).prefix(40) { lines.append("    \(String(v).leftPadded(5)) \(k)") }
        print(lines.joined(separator: "\n"))
    }

    // MARK: - What the client does

    enum Script: String, Sendable {
        /// Connect, then the steps of the main session.
        case main
        /// Connect with a first call, then a few steps.
        case firstCall
        /// Connect, and close.
        case connectOnly
    }

    typealias Step = (name: String, run: @Sendable (ParleyClient) async throws -> Bool)

    /// The client's handlers for the server's requests and one-way messages.
    static let clientRouter: ParleyRouter = {
        var router = ParleyRouter()
        router.on(Parley_Echo_V1_Ping.self) { (ping: Parley_Echo_V1_Ping, _: ParleyRequestContext) throws -> Parley_Echo_V1_Pong in
            var pong = Parley_Echo_V1_Pong()
            pong.sequence = ping.sequence
            pong.serverName = "client"
            return pong
        }
        router.onMessage(Parley_Echo_V1_Pong.self) { (_: Parley_Echo_V1_Pong, _: ParleyRequestContext) throws in }
        return router
    }()

    /// The server's handlers of the recordings: the echo service, and `Work` sending a NOTICE,
    /// a one-way message and a request to the client, `Sleep` answering ERROR.
    static func serverRouter() -> ParleyRouter {
        var router = EchoService.router()
        router.on(Parley_Echo_V1_Work.self) { (work: Parley_Echo_V1_Work, context: ParleyRequestContext) async throws -> Parley_Echo_V1_WorkDone in
            try await context.connection.sendNotice(ParleyNucleus(
                messages: [ParleyServerMessage(priority: .high, text: "maintenance at noon")], requestDelay: 0.005, redirects: ["unix:/nonexistent/parley.sock"]
            ))
            var pong = Parley_Echo_V1_Pong()
            pong.sequence = work.key
            try context.connection.sendNow(pong)
            var ping = Parley_Echo_V1_Ping()
            ping.sequence = 7
            let answer = try await context.connection.request(ping, as: Parley_Echo_V1_Pong.self)
            var done = Parley_Echo_V1_WorkDone()
            done.key = work.key &+ answer.sequence
            return done
        }
        router.on(Parley_Echo_V1_Sleep.self) { (_: Parley_Echo_V1_Sleep, _: ParleyRequestContext) throws -> Parley_Echo_V1_Slept in
            throw ParleyError(code: .invalidArgument, message: "this server does not sleep")
        }
        return router
    }

    static func pingStep(_ name: String, _ n: UInt64) -> Step {
        (name, { client in try await ping(client, n) == n })
    }

    static let echoStep: Step = ("echo", { client in
        var echo = Parley_Echo_V1_Echo()
        echo.payload = Data(repeating: 0x5A, count: 100)
        echo.text = "hello"
        let reply = try await client.call(echo, data: ByteBuffer(repeating: 7, count: 300), as: Parley_Echo_V1_EchoReply.self)
        return reply.message.payload == echo.payload && reply.message.text == "hello" && reply.data == ByteBuffer(repeating: 7, count: 300)
    })

    static let streamStep: Step = ("stream", { client in
        var count = Parley_Echo_V1_Count()
        count.count = 3
        var items: [UInt32] = []
        var final: Parley_Echo_V1_CountDone?
        for try await event in try await client.stream(count, item: Parley_Echo_V1_CountItem.self, final: Parley_Echo_V1_CountDone.self) {
            switch event {
            case .item(let item, _): items.append(item.index)
            case .final(let done): final = done
            }
        }
        return items == [0, 1, 2] && final?.sent == 3
    })

    static let mainSteps: [Step] = [
        pingStep("ping", 1),
        ("one-way", { client in
            var p = Parley_Echo_V1_Ping()
            p.sequence = 2
            try await client.send(p)
            return true
        }),
        echoStep,
        streamStep,
        ("notice", { client in
            var work = Parley_Echo_V1_Work()
            work.key = 42
            return try await client.request(work, as: Parley_Echo_V1_WorkDone.self).key == 49
        }),
        ("error", { client in
            var sleep = Parley_Echo_V1_Sleep()
            sleep.delayMs = 1
            do {
                _ = try await client.request(sleep, as: Parley_Echo_V1_Slept.self)
                return false
            } catch let error as ParleyError where error.code == .invalidArgument && client.connection.endReason == nil {
                return error.message == "this server does not sleep"
            }
        }),
        ("unknown", { client in
            do {
                _ = try await client.request(Parley_Echo_V1_Slept(), as: Parley_Echo_V1_Pong.self)
                return false
            } catch let error as ParleyError where error.code == .unknownMessageType && client.connection.endReason == nil {
                return true
            }
        }),
        ("direct", { client in
            let granted = try await client.request(Parley_Echo_V1_EnableDirect(), as: Parley_Echo_V1_DirectGranted.self)
            let connection = client.connection
            var frame = DirectFrame(allocator: connection.channelAllocator, headerLength: 3, dataLength: 5)
            frame.setHeader(UInt8(7), at: DirectFrame.idSize + 2)
            frame.writeData(ByteBuffer(bytes: [1, 2, 3, 4, 5]))
            let result = await withCheckedContinuation { c in connection.sendDirect(frame) { c.resume(returning: $0.map { $0.frame }) } }
            let answer = try result.get()
            return granted.delayMs == 0 && Array(answer.segments[0].readableBytesView.dropFirst(DirectFrame.idSize)) == [0, 0, 7]
                && answer.segments.count == 2 && Array(answer.segments[1].readableBytesView) == [1, 2, 3, 4, 5]
        }),
        pingStep("ping-after", 3),
    ]

    static let firstCallSteps: [Step] = [streamStep, echoStep, pingStep("ping-after", 2)]

    /// Runs `script` against `address` (all of it, however it goes) and says how it went.
    static func drive(_ script: Script, to address: ParleyAddress, maxRedirects: Int = 4) async -> Run {
        var run = Run()
        let configuration = ParleyClient.Configuration(maxRedirects: maxRedirects)
        let client: ParleyClient
        do {
            if script == .firstCall {
                var p = Parley_Echo_V1_Ping()
                p.sequence = 1
                let (connected, reply) = try await ParleyClient.connect(
                    to: address, configuration: configuration, router: Self.clientRouter, logger: quietLogger, firstCall: p, as: Parley_Echo_V1_Pong.self
                )
                client = connected
                if reply.message.sequence == 1 { run.expected.append("first call") } else { run.altered.append("first call") }
            } else {
                client = try await ParleyClient.connect(to: address, configuration: configuration, router: Self.clientRouter, logger: quietLogger)
            }
        } catch {
            run.check("connect", error)
            return run
        }
        run.connected = true
        let steps = script == .main ? Self.mainSteps : script == .firstCall ? Self.firstCallSteps : []
        for step in steps {
            // Once the connection has ended every call fails at once with its error: one is enough.
            if client.connection.endReason != nil, !run.errors.isEmpty { break }
            if let at = client.requestAllowedAt, at > .now + .seconds(ParleyClient.maximumRequestDelay + 1) {
                run.problems.append("request delay beyond a day: \(at - .now)")
            }
            do {
                if try await step.run(client) { run.expected.append(step.name) } else { run.altered.append(step.name) }
            } catch {
                run.check(step.name, error)
            }
        }
        client.close()
        await client.closed()
        return run
    }

    /// Runs `body` for at most `seconds`: nil if it has not returned by then (it is cancelled
    /// and left running).
    static func withDeadline<T: Sendable>(seconds: Double, _ body: @escaping @Sendable () async -> T) async -> T? {
        let slot = NIOLockedValueBox<CheckedContinuation<T?, Never>?>(nil)
        return await withCheckedContinuation { (c: CheckedContinuation<T?, Never>) in
            slot.withLockedValue { $0 = c }
            let task = Task {
                let result = await body()
                slot.withLockedValue { s in defer { s = nil }; return s }?.resume(returning: result)
            }
            Task {
                // In ticks of 100 ms (see `RawPeer.exchange`), stopping early once done.
                for _ in 0..<max(1, Int(seconds * 10)) {
                    try? await Task.sleep(for: .milliseconds(100))
                    if slot.withLockedValue({ $0 == nil }) { return }
                }
                if let c = slot.withLockedValue({ s in defer { s = nil }; return s }) {
                    task.cancel()
                    c.resume(returning: nil)
                }
            }
        }
    }

    // MARK: - Recording

    /// A session's server bytes.
    struct Seed: Sendable {
        var name: String
        var elements: [Element]
        /// Elements up to and including SERVER_IDENT.
        var handshake: Int
        var script: Script
        var weight: Int
    }

    /// Records the seeds through a relay, checks that each replays as recorded, and runs
    /// `body` with them and the address redirects lead to (a listener replaying `main`).
    static func withRecordedSeeds(_ body: ([Seed], String) async throws -> Void) async throws {
        let path = testScratchPath("client-mutation-\(UUID().uuidString.prefix(8)).sock")
        let targetElements = NIOLockedValueBox<[Element]>([])
        let target = try await ByteServer.start(unixPath: path) { await Self.replay(targetElements.withLockedValue { $0 }, on: $0) }
        let recorder = Recorder()
        let relay = try await ByteServer.start { await Self.relay($0, recorder: recorder) }
        var seeds: [Seed] = []
        func record(
            _ name: String, _ script: Script, weight: Int, replayAs: Script? = nil, maxRedirects: Int = 4,
            configure: (inout ParleyServer.Configuration) -> Void
        ) async throws -> Run {
            try await withServer(configure: configure, router: Self.serverRouter()) { _, addresses in
                guard case .tcp(_, let port) = addresses[0].kind else { throw ParleyTestFailure("the server is not on TCP") }
                recorder.start(upstream: port)
                let run = await Self.drive(script, to: relay.address, maxRedirects: maxRedirects)
                // The relay forwards the end of the session once the client has closed.
                _ = try await eventually(seconds: 10) { recorder.finished }
                let (elements, tail) = recorder.elements()
                #expect(tail == 0, "\(name): \(tail) bytes after the last whole frame")
                let handshake = (elements.firstIndex { $0.bytes.count > 32 && $0.bytes[0] == FrameTag.serverIdent.rawValue } ?? elements.count - 1) + 1
                seeds.append(Seed(name: name, elements: elements, handshake: handshake, script: replayAs ?? script, weight: weight))
                return run
            }
        }
        let nucleus = ParleyNucleus(
            messages: [ParleyServerMessage(priority: .low, text: "welcome"), ParleyServerMessage(priority: .high, text: "read this")], requestDelay: 0.002
        )
        let main = try await record("main", .main, weight: 12) { $0.nucleus = nucleus }
        #expect(main.errors.isEmpty && main.altered.isEmpty && main.expected.count == Self.mainSteps.count, "main: \(main)")
        let firstCall = try await record("firstCall", .firstCall, weight: 5) { _ in }
        #expect(firstCall.errors.isEmpty && firstCall.altered.isEmpty && firstCall.expected.count == 4, "firstCall: \(firstCall)")
        let redirect = try await record("redirect", .connectOnly, weight: 2, replayAs: .main, maxRedirects: 0) {
            $0.nucleus = ParleyNucleus(messages: [ParleyServerMessage(priority: .high, text: "moved")], redirects: ["unix:" + path])
        }
        #expect(redirect.errors.isEmpty && redirect.connected, "redirect: \(redirect)")
        let refusal = try await record("refusal", .connectOnly, weight: 1) { $0.minimumClientVersion = "99.0" }
        #expect((refusal.errors.first?.error as? ParleyError)?.code == .clientOutOfDate, "refusal: \(refusal)")
        await relay.stop()
        targetElements.withLockedValue { $0 = seeds[0].elements }
        // Replayed unchanged, each seed gives the recorded outcome (the redirect's leads to main).
        for s in seeds {
            // Each piece waits for its gate as long as need be: a slow machine must not make
            // the server answer before it was asked.
            let server = try await ByteServer.start { await Self.replay(s.elements, on: $0, gateTimeout: .seconds(10)) }
            let run = await Self.withDeadline(seconds: 20) { await Self.drive(s.script, to: server.address) }
            await server.stop()
            let expectedSteps = s.script == .main ? Self.mainSteps.count : s.script == .firstCall ? 4 : 0
            if s.name == "refusal" {
                #expect((run?.errors.first?.error as? ParleyError)?.code == .clientOutOfDate, "refusal replayed: \(String(describing: run))")
            } else {
                #expect(run?.errors.isEmpty == true && run?.expected.count == expectedSteps, "\(s.name) replayed: \(String(describing: run))")
            }
            print("seed \(s.name): \(s.elements.count) pieces, \(s.elements.reduce(0) { $0 + $1.bytes.count }) bytes, handshake \(s.handshake), gates \(s.elements.map(\.gate))")
        }
        do {
            try await body(seeds, "unix:" + path)
        } catch {
            await target.stop()
            throw error
        }
        await target.stop()
    }

    /// What a relay saw: the server's bytes, each with the client's count when it came.
    final class Recorder: Sendable {
        private struct State {
            var upstream = 0
            var clientCount = 0
            var bytes: [UInt8] = []
            var gates: [Int] = []
            var finished = false
        }
        private let state = NIOLockedValueBox(State())

        func start(upstream: Int) { self.state.withLockedValue { $0 = State(upstream: upstream) } }
        var upstream: Int { self.state.withLockedValue { $0.upstream } }
        var finished: Bool { self.state.withLockedValue { $0.finished } }
        func finish() { self.state.withLockedValue { $0.finished = true } }
        func client(count: Int) { self.state.withLockedValue { $0.clientCount = count } }
        func server(_ chunk: ByteBuffer) {
            self.state.withLockedValue { s in
                s.bytes += chunk.readableBytesView
                s.gates += repeatElement(s.clientCount, count: chunk.readableBytes)
            }
        }

        /// The server's stream in pieces, and the bytes left after the last whole one.
        func elements() -> ([Element], tail: Int) {
            self.state.withLockedValue { s in
                let ranges = ClientMutationTests.split(s.bytes)
                let elements = ranges.map { Element(bytes: Array(s.bytes[$0]), gate: s.gates[$0].max() ?? 0) }
                return (elements, s.bytes.count - (ranges.last?.upperBound ?? 0))
            }
        }
    }

    /// Relays a connection to the recorder's server, recording what the server sends.
    static func relay(_ connection: NIOAsyncChannel<ByteBuffer, ByteBuffer>, recorder: Recorder) async {
        do {
            let upstream = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .channelOption(.allowRemoteHalfClosure, value: true)
                .connect(host: "127.0.0.1", port: recorder.upstream) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel, configuration: .init(isOutboundHalfClosureEnabled: true))
                    }
                }
            try await connection.executeThenClose { clientIn, clientOut in
                try await upstream.executeThenClose { serverIn, serverOut in
                    await withTaskGroup(of: Void.self) { group in
                        group.addTask {
                            var counter = ClientCounter()
                            do {
                                for try await chunk in clientIn {
                                    // Counted before the server can answer it.
                                    counter.feed(chunk)
                                    recorder.client(count: counter.count)
                                    try await serverOut.write(chunk)
                                }
                            } catch {}
                            serverOut.finish()
                        }
                        group.addTask {
                            do {
                                for try await chunk in serverIn {
                                    recorder.server(chunk)
                                    try await clientOut.write(chunk)
                                }
                            } catch {}
                            clientOut.finish()
                        }
                    }
                }
            }
        } catch {}
        recorder.finish()
    }

    // MARK: - Serving a stream

    /// The banner or one frame of a server's stream, with the number of counted client
    /// elements (`ClientCounter`) the server had received when it sent it.
    struct Element: Sendable {
        var bytes: [UInt8]
        var gate: Int
    }

    /// Counts what a client sends that a server answers: its banner and handshake frames, its
    /// requests, one-way messages and DIRECT requests; notes a CLOSE.
    struct ClientCounter {
        private var buffer: [UInt8] = []
        private var bannerSeen = false
        private(set) var count = 0
        private(set) var closed = false

        mutating func feed(_ chunk: ByteBuffer) {
            self.buffer += chunk.readableBytesView
            var at = 0
            defer { self.buffer.removeFirst(at) }
            if !self.bannerSeen {
                guard self.buffer.count >= 32 else { return }
                self.bannerSeen = true
                self.count += 1
                at = 32
            }
            while self.buffer.count - at >= 32 {
                let n = Int(self.buffer[at + 2])
                guard (1...4).contains(n) else { return }  // not a client's: stop counting
                var total = 0
                for i in 0..<n { total += Int(ClientMutationTests.le32(self.buffer, at + 4 + 6 * i)) }
                let size = 32 + total + 4 * n
                guard self.buffer.count - at >= size else { return }
                switch self.buffer[at] {
                case FrameTag.hello.rawValue, FrameTag.authRequest.rawValue, FrameTag.authRequestMore.rawValue, FrameTag.clientIdent.rawValue,
                     FrameTag.sessionReconnect.rawValue, FrameTag.direct.rawValue:
                    self.count += 1
                case FrameTag.message.rawValue:
                    let kind = ClientMutationTests.le32(self.buffer, at + 4) >= 25 ? self.buffer[at + 32 + 24] : 0
                    if kind == MessageKind.request.rawValue || kind == MessageKind.oneWay.rawValue { self.count += 1 }
                case FrameTag.close.rawValue:
                    self.closed = true
                default:
                    break
                }
                at += size
            }
        }
    }

    /// How far a client has got, for the server to wait on.
    final class ClientProgress: Sendable {
        private struct State {
            var count = 0
            var ended = false
            var waiters: [Int: (gate: Int, continuation: CheckedContinuation<Void, Never>)] = [:]
            var next = 0
        }
        private let state = NIOLockedValueBox(State())

        var ended: Bool { self.state.withLockedValue { $0.ended } }

        func update(count: Int, ended: Bool) {
            let ready = self.state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
                s.count = max(s.count, count)
                s.ended = s.ended || ended
                let done = s.waiters.filter { s.ended || s.count >= $0.value.gate }
                for key in done.keys { s.waiters.removeValue(forKey: key) }
                return done.values.map(\.continuation)
            }
            ready.forEach { $0.resume() }
        }

        /// Returns once the client has sent `gate` counted elements or closed, or after `timeout`.
        func wait(for gate: Int, timeout: TimeAmount, on loop: any EventLoop) async {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let key = self.state.withLockedValue { s -> Int? in
                    if s.ended || s.count >= gate { return nil }
                    s.next += 1
                    s.waiters[s.next] = (gate, c)
                    return s.next
                }
                guard let key else { return c.resume() }
                _ = loop.scheduleTask(in: timeout) {
                    self.state.withLockedValue { $0.waiters.removeValue(forKey: key) }?.continuation.resume()
                }
            }
        }
    }

    /// Serves `elements` on a connection, each once the client has sent as many counted
    /// elements as its gate (or `gateTimeout` has passed), then half-closes and waits (at most
    /// 15 s) for the client to close.
    static func replay(_ elements: [Element], on connection: NIOAsyncChannel<ByteBuffer, ByteBuffer>, gateTimeout: TimeAmount = .milliseconds(200)) async {
        let progress = ClientProgress()
        let loop = connection.channel.eventLoop
        try? await connection.executeThenClose { inbound, outbound in
            await withTaskGroup(of: Void.self) { group in
                group.addTask {
                    var counter = ClientCounter()
                    do {
                        for try await chunk in inbound {
                            counter.feed(chunk)
                            progress.update(count: counter.count, ended: counter.closed)
                        }
                    } catch {}
                    progress.update(count: counter.count, ended: true)
                }
                for element in elements {
                    await progress.wait(for: element.gate, timeout: gateTimeout, on: loop)
                    if progress.ended { break }
                    do { try await outbound.write(ByteBuffer(bytes: element.bytes)) } catch { break }
                }
                outbound.finish()
                await progress.wait(for: .max, timeout: .seconds(15), on: loop)
                group.cancelAll()
            }
        }
    }

    /// A listener on 127.0.0.1 (port 0) or a Unix socket whose connections `serve` takes.
    final class ByteServer: Sendable {
        let address: ParleyAddress
        private let listener: any Channel
        private let accepting: Task<Void, Never>

        private init(address: ParleyAddress, listener: any Channel, accepting: Task<Void, Never>) {
            self.address = address
            self.listener = listener
            self.accepting = accepting
        }

        static func start(unixPath: String? = nil, serve: @escaping @Sendable (NIOAsyncChannel<ByteBuffer, ByteBuffer>) async -> Void) async throws -> ByteServer {
            let bootstrap = ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .serverChannelOption(.backlog, value: 256)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            let initializer: @Sendable (any Channel) -> EventLoopFuture<NIOAsyncChannel<ByteBuffer, ByteBuffer>> = { channel in
                channel.eventLoop.makeCompletedFuture {
                    try NIOAsyncChannel(wrappingChannelSynchronously: channel, configuration: .init(isOutboundHalfClosureEnabled: true))
                }
            }
            let server: NIOAsyncChannel<NIOAsyncChannel<ByteBuffer, ByteBuffer>, Never>
            let address: ParleyAddress
            if let unixPath {
                server = try await bootstrap.bind(unixDomainSocketPath: unixPath, cleanupExistingSocketFile: true, childChannelInitializer: initializer)
                address = .unix(path: unixPath)
            } else {
                server = try await bootstrap.bind(host: "127.0.0.1", port: 0, childChannelInitializer: initializer)
                address = .tcp(host: "127.0.0.1", port: server.channel.localAddress?.port ?? 0)
            }
            let accepting = Task {
                do {
                    try await server.executeThenClose { inbound in
                        try await withThrowingDiscardingTaskGroup { group in
                            for try await connection in inbound {
                                group.addTask { await serve(connection) }
                            }
                        }
                    }
                } catch {}
            }
            return ByteServer(address: address, listener: server.channel, accepting: accepting)
        }

        /// Stops listening and waits for the connections being served.
        func stop() async {
            self.listener.close(promise: nil)
            await self.accepting.value
        }
    }

    // MARK: - Bytes

    static func le16(_ b: [UInt8], _ i: Int) -> UInt16 { UInt16(b[i]) | UInt16(b[i + 1]) << 8 }
    static func le32(_ b: [UInt8], _ i: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[i + $1]) << (8 * UInt32($1)) } }
    static func le64(_ b: [UInt8], _ i: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(b[i + $1]) << (8 * UInt64($1)) } }
    static func put16(_ b: inout [UInt8], _ i: Int, _ v: UInt16) { for k in 0..<2 { b[i + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt16(k))) } }
    static func put32(_ b: inout [UInt8], _ i: Int, _ v: UInt32) { for k in 0..<4 { b[i + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(k))) } }
    static func put64(_ b: inout [UInt8], _ i: Int, _ v: UInt64) { for k in 0..<8 { b[i + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(k))) } }

    static func encode(_ frame: Frame) -> [UInt8] {
        var b = ByteBuffer()
        b.writeFrame(frame)
        return Array(b.readableBytesView)
    }

    /// The banner and whole frames of a stream.
    static func split(_ bytes: [UInt8]) -> [Range<Int>] {
        guard bytes.count >= 32 else { return [] }
        var ranges = [0..<32]
        var at = 32
        while at + 32 <= bytes.count {
            let n = Int(bytes[at + 2])
            guard (1...4).contains(n) else { break }
            var total = 0
            for i in 0..<n { total += Int(Self.le32(bytes, at + 4 + 6 * i)) }
            let end = at + 32 + total + 4 * n
            guard end <= bytes.count else { break }
            ranges.append(at..<end)
            at = end
        }
        return ranges
    }

    /// A frame as its parts, to change and encode again with right CRCs.
    struct RawFrame {
        var tag: UInt8
        var flags: UInt8 = 0
        var segments: [[UInt8]]
        var alignments: [UInt16] = [0, 0, 0, 0]

        init(tag: UInt8, flags: UInt8 = 0, segments: [[UInt8]]) {
            self.tag = tag
            self.flags = flags
            self.segments = segments
        }

        /// Nil for the banner or bytes that are not exactly one frame.
        init?(_ b: [UInt8]) {
            guard b.count >= 36, b[0...7] != Banner.magic[...] else { return nil }
            let n = Int(b[2])
            guard (1...4).contains(n) else { return nil }
            var at = 32
            var segments: [[UInt8]] = []
            var alignments: [UInt16] = [0, 0, 0, 0]
            for i in 0..<n {
                let length = Int(ClientMutationTests.le32(b, 4 + 6 * i))
                guard at + length <= b.count else { return nil }
                segments.append(Array(b[at..<(at + length)]))
                alignments[i] = ClientMutationTests.le16(b, 8 + 6 * i)
                at += length
            }
            guard at + 4 * n == b.count else { return nil }
            self.tag = b[0]
            self.flags = b[1]
            self.segments = segments
            self.alignments = alignments
        }

        var bytes: [UInt8] {
            var out = [UInt8](repeating: 0, count: 32)
            out[0] = self.tag
            out[1] = self.flags
            out[2] = UInt8(self.segments.count)
            for (i, s) in self.segments.prefix(4).enumerated() {
                ClientMutationTests.put32(&out, 4 + 6 * i, UInt32(s.count))
                ClientMutationTests.put16(&out, 8 + 6 * i, self.alignments[i])
            }
            ClientMutationTests.put32(&out, 28, CRC32C.checksum(out[0..<28]))
            for s in self.segments { out += s }
            for s in self.segments {
                var crc = [UInt8](repeating: 0, count: 4)
                ClientMutationTests.put32(&crc, 0, CRC32C.checksum(s))
                out += crc
            }
            return out
        }

        var isMessage: Bool { self.tag == FrameTag.message.rawValue && self.segments.count >= 2 && self.segments[0].count >= 32 }
    }

    // MARK: - Mutations

    /// The variant's randomness: SplitMix seeded with the run's seed and the variant's number.
    struct Dice {
        var rng: SplitMix

        init(seed: UInt64, variant: Int) {
            self.rng = SplitMix(seed: seed ^ (UInt64(variant) &* 0x9E37_79B9_7F4A_7C15))
            _ = self.rng.next()
        }

        mutating func int(_ n: Int) -> Int { n <= 1 ? 0 : Int(self.rng.next() % UInt64(n)) }
        mutating func chance(_ one: Int, in n: Int) -> Bool { self.int(n) < one }
        mutating func byte() -> UInt8 { UInt8(truncatingIfNeeded: self.rng.next()) }
        mutating func bytes(_ n: Int) -> [UInt8] { (0..<n).map { _ in self.byte() } }
        mutating func pick<T>(_ choices: [T]) -> T { choices[self.int(choices.count)] }
        mutating func u64() -> UInt64 { self.rng.next() }
    }

    /// A variant: which seed, its mutated elements, and what was done.
    static func variant(seeds: [Seed], target: String, dice: inout Dice) -> (Int, [Element], String) {
        var pick = dice.int(seeds.reduce(0) { $0 + $1.weight })
        var s = 0
        while pick >= seeds[s].weight {
            pick -= seeds[s].weight
            s += 1
        }
        let seed = seeds[s]
        var e = seed.elements
        let kind: String
        switch dice.int(20) {
        case 0: kind = Self.rawBitFlips(&e, seed.handshake, &dice)
        case 1: kind = Self.rawBytes(&e, seed.handshake, &dice)
        case 2: kind = Self.rawTruncate(&e, seed.handshake, &dice)
        case 3: kind = Self.rawInsert(&e, seed.handshake, &dice)
        case 4: kind = Self.rawRange(&e, seed.handshake, &dice)
        case 5...7: kind = Self.segmentEdit(&e, seed.handshake, &dice)
        case 8...10: kind = Self.headerEdit(&e, seed.handshake, &dice)
        case 11: kind = Self.preambleEdit(&e, seed.handshake, &dice)
        case 12, 13: kind = Self.frameOrder(&e, seed.handshake, &dice)
        case 14...16: kind = Self.insertFrame(&e, seed.handshake, target: target, &dice)
        case 17: kind = Self.semanticEdit(&e, seed.handshake, target: target, &dice)
        case 18: kind = Self.nucleusEdit(&e, seed.handshake, target: target, &dice)
        default:
            if dice.chance(1, in: 2) {
                // The start of this session, the rest of another's.
                let other = seeds[dice.int(seeds.count)]
                let cut = seed.handshake + dice.int(max(1, e.count - seed.handshake))
                let from = other.handshake + dice.int(max(1, other.elements.count - other.handshake))
                e = Array(e.prefix(cut)) + Array(other.elements.dropFirst(from))
                if dice.chance(1, in: 2) { Self.renumber(&e) }
                kind = "splice"
            } else {
                var kinds: [String] = []
                for _ in 0..<(2 + dice.int(2)) {
                    switch dice.int(5) {
                    case 0: kinds.append(Self.segmentEdit(&e, seed.handshake, &dice))
                    case 1: kinds.append(Self.headerEdit(&e, seed.handshake, &dice))
                    case 2: kinds.append(Self.frameOrder(&e, seed.handshake, &dice))
                    case 3: kinds.append(Self.insertFrame(&e, seed.handshake, target: target, &dice))
                    default: kinds.append(Self.semanticEdit(&e, seed.handshake, target: target, &dice))
                    }
                }
                kind = "combined (\(kinds.count))"
            }
        }
        return (s, e, kind)
    }

    /// An element to change: mostly one of the session (after SERVER_IDENT), sometimes any.
    static func target(_ e: [Element], _ handshake: Int, _ dice: inout Dice, frames: Bool = false) -> Int {
        let first = frames ? 1 : 0
        if e.count > handshake, !dice.chance(1, in: 5) { return handshake + dice.int(e.count - handshake) }
        return first + dice.int(max(1, e.count - first))
    }

    static func rawBitFlips(_ e: inout [Element], _ handshake: Int, _ dice: inout Dice) -> String {
        let i = Self.target(e, handshake, &dice)
        for _ in 0..<(1 + dice.int(4)) {
            let k = dice.int(e[i].bytes.count)
            e[i].bytes[k] ^= UInt8(1) << UInt8(dice.int(8))
        }
        return "bit flips"
    }

    static func rawBytes(_ e: inout [Element], _ handshake: Int, _ dice: inout Dice) -> String {
        let i = Self.target(e, handshake, &dice)
        for _ in 0..<(1 + dice.int(8)) { e[i].bytes[dice.int(e[i].bytes.count)] = dice.byte() }
        return "bytes replaced"
    }

    static func rawTruncate(_ e: inout [Element], _ handshake: Int, _ dice: inout Dice) -> String {
        let i = Self.target(e, handshake, &dice)
        e[i].bytes = Array(e[i].bytes.prefix(dice.int(e[i].bytes.count)))
        e.removeSubrange((i + 1)...)
        return "truncated"
    }

    static func rawInsert(_ e: inout [Element], _ handshake: Int, _ dice: inout Dice) -> String {
        let i = Self.target(e, handshake, &dice)
        e[i].bytes.insert(contentsOf: dice.bytes(1 + dice.int(16)), at: dice.int(e[i].bytes.count + 1))
        return "bytes inserted"
    }

    /// A range of an element's bytes repeated in place, or moved within it (`ByteMutations`).
    static func rawRange(_ e: inout [Element], _ handshake: Int, _ dice: inout Dice) -> String {
        let i = Self.target(e, handshake, &dice)
        let at = dice.int(e[i].bytes.count)
        if dice.chance(1, in: 2) {
            ByteMutations.repeatRange(&e[i].bytes, at: at, maxLength: 64, times: 1 + dice.int(4), using: &dice.rng)
            return "range repeated"
        }
        ByteMutations.moveRange(&e[i].bytes, at: at, maxLength: 64, using: &dice.rng)
        return "range moved"
    }

    /// Bytes of a segment changed, the frame's CRCs made right (the banner's CRC for a banner).
    static func segmentEdit(_ e: inout [Element], _ handshake: Int, _ dice: inout Dice) -> String {
        let i = Self.target(e, handshake, &dice)
        guard var frame = RawFrame(e[i].bytes) else {
            guard e[i].bytes.count == 32 else { return Self.rawBitFlips(&e, handshake, &dice) }
            for _ in 0..<(1 + dice.int(3)) { e[i].bytes[8 + dice.int(20)] ^= UInt8(1) << UInt8(dice.int(8)) }
            Self.put32(&e[i].bytes, 28, CRC32C.checksum(e[i].bytes[0..<28]))
            return "banner fields (CRC fixed)"
        }
        let s = frame.isMessage && frame.segments.count > 1 && dice.chance(3, in: 5) ? 1 : dice.int(frame.segments.count)
        var seg = frame.segments[s]
        for _ in 0..<(1 + dice.int(3)) {
            switch dice.int(7) {
            case 0 where !seg.isEmpty: seg[dice.int(seg.count)] ^= UInt8(1) << UInt8(dice.int(8))
            case 1 where !seg.isEmpty: seg[dice.int(seg.count)] = dice.byte()
            case 2: seg.insert(contentsOf: dice.bytes(1 + dice.int(8)), at: dice.int(seg.count + 1))
            case 3 where !seg.isEmpty:
                let start = dice.int(seg.count)
                seg.removeSubrange(start..<min(seg.count, start + 1 + dice.int(8)))
            case 4: seg = Array(seg.prefix(dice.int(seg.count + 1)))
            case 5: seg += dice.bytes(1 + dice.int(16))
            default: if !seg.isEmpty { seg[dice.int(seg.count)] = dice.pick([0, 0x7F, 0x80, 0xFF]) }
            }
        }
        frame.segments[s] = seg
        e[i].bytes = frame.bytes
        return "segment bytes (CRC fixed)"
    }

    /// A field of a MESSAGE header changed, CRCs right.
    static func headerEdit(_ e: inout [Element], _ handshake: Int, _ dice: inout Dice) -> String {
        let messages = e.indices.filter { RawFrame(e[$0].bytes)?.isMessage == true }
        guard !messages.isEmpty else { return Self.segmentEdit(&e, handshake, &dice) }
        let i = dice.pick(messages)
        var frame = RawFrame(e[i].bytes)!
        var h = frame.segments[0]
        let ids = messages.map { Self.le64(RawFrame(e[$0].bytes)!.segments[0], 16) }
        let what: String
        switch dice.int(10) {
        case 0:
            Self.put64(&h, 16, dice.pick([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, UInt64.max, dice.u64(), dice.pick(ids)]))
            what = "id"
        case 1:
            h[24] = UInt8(dice.int(8))
            what = "kind"
        case 2:
            Self.put64(&h, 0, dice.pick([0, Self.le64(h, 0) &+ 1, Self.le64(h, 0) &- 1, UInt64.max, dice.u64()]))
            what = "seq"
        case 3:
            Self.put64(&h, 8, dice.pick([0, UInt64.max, dice.u64()]))
            what = "ack"
        case 4:
            h[25] = 1 << UInt8(dice.int(8))
            what = "flags"
        case 5:
            Self.put32(&h, 28, UInt32(1) << UInt32(dice.int(32)))
            what = "reserved"
        case 6:
            let names = [
                Parley_Echo_V1_Pong.protoMessageName, Parley_Echo_V1_EchoReply.protoMessageName, Parley_Echo_V1_CountItem.protoMessageName,
                Parley_Echo_V1_CountDone.protoMessageName, Parley_Echo_V1_WorkDone.protoMessageName, Parley_V1_Status.protoMessageName,
                Parley_Echo_V1_Ping.protoMessageName, Parley_Echo_V1_DirectGranted.protoMessageName, "", "x", String(repeating: "a", count: 1024),
            ]
            var name = Array(dice.pick(names).utf8)
            if dice.chance(1, in: 4) { name = [0xC3, 0x28] + name }  // not UTF-8
            if dice.chance(1, in: 8) { name = [UInt8](repeating: 0x61, count: 1025) }
            h = Array(h.prefix(32)) + name
            Self.put16(&h, 26, UInt16(name.count))
            what = "type name"
        case 7:
            Self.put16(&h, 26, Self.le16(h, 26) &+ dice.pick([1, 0xFFFF, 0x8000]))
            what = "name length"
        case 8:
            // The data segment added, dropped, or one segment more.
            if frame.segments.count == 3, dice.chance(1, in: 2) {
                frame.segments.removeLast()
            } else if frame.segments.count < 4 {
                frame.segments.append(dice.bytes(dice.int(600)))
                frame.alignments[frame.segments.count - 1] = 4096
            }
            what = "segments"
        default:
            frame.flags = 1 << UInt8(dice.int(8))
            what = "frame flags"
        }
        frame.segments[0] = h
        e[i].bytes = frame.bytes
        return "message \(what) (CRC fixed)"
    }

    /// A preamble field changed and only the preamble CRC made right: the tag, flags, segment
    /// count, reserved byte, lengths.
    static func preambleEdit(_ e: inout [Element], _ handshake: Int, _ dice: inout Dice) -> String {
        let i = Self.target(e, handshake, &dice, frames: true)
        guard RawFrame(e[i].bytes) != nil else { return Self.rawBytes(&e, handshake, &dice) }
        switch dice.int(5) {
        case 0: e[i].bytes[0] = dice.pick([dice.byte(), 0x01, 0x06, 0x08, 0x10, 0x11, 0x12, 0x14, 0x15, 0x16, 0x80])
        case 1: e[i].bytes[1] = dice.byte()
        case 2: e[i].bytes[2] = dice.pick([0, 1, 2, 3, 4, 5, 255])
        case 3: e[i].bytes[3] = dice.byte() | 1
        default:
            let length: UInt32 = dice.pick([UInt32.max, 1 << 31, UInt32(Frame.defaultMaxFrameSize + 1), 1 << 20, UInt32(dice.int(5000)), Self.le32(e[i].bytes, 4) &+ 1])
            Self.put32(&e[i].bytes, 4 + 6 * dice.int(4), length)
        }
        Self.put32(&e[i].bytes, 28, CRC32C.checksum(e[i].bytes[0..<28]))
        return "preamble (CRC fixed)"
    }

    /// A frame duplicated, dropped, swapped or moved; seqs mostly numbered again.
    static func frameOrder(_ e: inout [Element], _ handshake: Int, _ dice: inout Dice) -> String {
        guard e.count >= 3 else { return Self.segmentEdit(&e, handshake, &dice) }
        let i = Self.target(e, handshake, &dice, frames: true)
        let what: String
        switch dice.int(4) {
        case 0:
            e.insert(e[i], at: i + 1 + dice.int(e.count - i))
            what = "duplicated"
        case 1:
            e.remove(at: i)
            what = "dropped"
        case 2:
            if i + 1 < e.count { e.swapAt(i, i + 1) } else { e.swapAt(i - 1, i) }
            what = "swapped"
        default:
            let element = e.remove(at: i)
            e.insert(element, at: 1 + dice.int(e.count))
            what = "moved"
        }
        if dice.chance(3, in: 4) { Self.renumber(&e) }
        return "frame \(what)"
    }

    /// Numbers the MESSAGEs' seqs 1, 2, 3... again, as a server would have.
    static func renumber(_ e: inout [Element]) {
        var seq: UInt64 = 1
        for i in e.indices {
            guard var frame = RawFrame(e[i].bytes), frame.isMessage else { continue }
            Self.put64(&frame.segments[0], 0, seq)
            seq += 1
            e[i].bytes = frame.bytes
        }
    }

    static func message(kind: MessageKind, id: UInt64, type: String, payload: [UInt8], data: [UInt8]? = nil) -> [UInt8] {
        var header = ByteBuffer()
        header.writeMessageHeader(MessageHeader(id: id, kind: kind, type: type))
        var frame = RawFrame(tag: FrameTag.message.rawValue, segments: [Array(header.readableBytesView), payload] + (data.map { [$0] } ?? []))
        if data != nil { frame.alignments[2] = 4096 }
        return frame.bytes
    }

    static func bytes(_ m: some SwiftProtobuf.Message) -> [UInt8] {
        let bytes: [UInt8]? = try? m.serializedBytes()
        return bytes ?? []
    }

    /// A nucleus with values a client must cope with.
    static func nucleus(target: String, _ dice: inout Dice) -> Parley_V1_Nucleus {
        var n = Parley_V1_Nucleus()
        // Past the 1,000 messages a client keeps, or one past the 4 KiB of text it keeps.
        let count = dice.pick([0, 1, 2, 3, 1200])
        for k in 0..<count {
            var m = Parley_V1_ServerMessage()
            m.priority = dice.pick([.low, .high, .UNRECOGNIZED(7)])
            m.text = count > 3 ? "message \(k)" : dice.pick(["", "maintenance", String(repeating: "long ", count: 2000), "\u{0}\u{7}\u{1B}[31m red"])
            n.messages.append(m)
        }
        n.requestDelaySeconds = dice.pick([0, 0, 0.001, 0.02, -1, .nan, .infinity, -.infinity, 1e300, 86_401, 1e-300, .greatestFiniteMagnitude, .leastNonzeroMagnitude, 1.5])
        switch dice.int(8) {
        case 0: n.redirects = [target]
        case 1: n.redirects = ["unix:/nonexistent/parley.sock"]
        case 2: n.redirects = [dice.pick(["", "not an address", "127.0.0.1:1", "[::1]:1", "tls://127.0.0.1:1", "unix:", "127.0.0.1:99999", "ws://127.0.0.1:1/x y"])]
        case 3: n.redirects = Array(repeating: target, count: 100)
        default: break
        }
        return n
    }

    /// A MESSAGE's type and payload: of the session's types, or not.
    static func messagePayload(_ dice: inout Dice) -> (String, [UInt8]) {
        switch dice.int(7) {
        case 0:
            var pong = Parley_Echo_V1_Pong()
            pong.sequence = dice.pick([1, 2, 3, dice.u64()])
            return (Parley_Echo_V1_Pong.protoMessageName, Self.bytes(pong))
        case 1:
            var item = Parley_Echo_V1_CountItem()
            item.index = UInt32(dice.int(5))
            return (Parley_Echo_V1_CountItem.protoMessageName, Self.bytes(item))
        case 2:
            var status = Parley_V1_Status()
            status.code = dice.pick([0, 10, 16, 23, 99, UInt32.max])
            status.message = dice.pick(["", "failed"])
            return (Parley_V1_Status.protoMessageName, Self.bytes(status))
        case 3:
            var ping = Parley_Echo_V1_Ping()
            ping.sequence = dice.u64()
            return (Parley_Echo_V1_Ping.protoMessageName, Self.bytes(ping))
        case 4:
            return (Parley_Echo_V1_CountDone.protoMessageName, [])
        case 5:
            return (dice.pick(["", "parley.nothing.v1.Unknown", Parley_Echo_V1_Work.protoMessageName]), dice.bytes(dice.int(30)))
        default:
            return (Parley_Echo_V1_EchoReply.protoMessageName, dice.bytes(dice.int(30)))
        }
    }

    /// A frame put into the stream: control frames in and out of place, and MESSAGEs.
    static func insertFrame(_ e: inout [Element], _ handshake: Int, target: String, _ dice: inout Dice) -> String {
        let at = e.count > handshake && !dice.chance(1, in: 5) ? handshake + dice.int(e.count - handshake + 1) : 1 + dice.int(e.count)
        let frame: [UInt8]
        let what: String
        switch dice.int(16) {
        case 0:
            frame = Self.encode(SessionStateMachine.keepaliveFrame(tag: .keepalive, timestamp: dice.u64()))
            what = "KEEPALIVE"
        case 1:
            let tag = dice.pick([FrameTag.keepalive.rawValue, FrameTag.keepaliveAck.rawValue, FrameTag.ack.rawValue])
            frame = RawFrame(tag: tag, segments: [dice.bytes(dice.pick([0, 1, 7, 9, 16]))]).bytes
            what = "KEEPALIVE/ACK of a wrong size"
        case 2:
            frame = Self.encode(SessionStateMachine.keepaliveFrame(tag: dice.pick([.keepaliveAck, .ack]), timestamp: dice.u64()))
            what = "KEEPALIVE_ACK or ACK"
        case 3, 4:
            var notice = Parley_V1_Notice()
            notice.nucleus = Self.nucleus(target: target, &dice)
            frame = RawFrame(tag: FrameTag.notice.rawValue, segments: [Self.bytes(notice)]).bytes
            what = "NOTICE"
        case 5:
            frame = RawFrame(tag: FrameTag.notice.rawValue, segments: [dice.bytes(dice.int(40))]).bytes
            what = "NOTICE of garbage"
        case 6:
            var status = Parley_V1_Status()
            status.code = dice.pick([0, 1, 14, 18, 28, 29, 1000, UInt32.max])
            status.message = dice.pick(["", "go away", String(repeating: "x", count: 70_000)])
            frame = RawFrame(tag: FrameTag.close.rawValue, segments: [Self.bytes(status)]).bytes
            what = "CLOSE"
        case 7:
            let tag = 0x80 | dice.byte()
            let flags = dice.byte()
            var segments: [[UInt8]] = []
            for _ in 0...dice.int(4) { segments.append(dice.bytes(dice.int(100))) }
            frame = RawFrame(tag: tag, flags: flags, segments: segments).bytes
            what = "ignorable tag"
        case 8:
            frame = RawFrame(tag: dice.pick([0x00, 0x0C, 0x0F, 0x17, 0x42, 0x7F]), segments: [dice.bytes(dice.int(20))]).bytes
            what = "unknown critical tag"
        case 9:
            let tag = dice.pick([FrameTag.hello, .authBadMethod, .authReplyMore, .authDone, .serverIdent, .sessionResumed, .sessionReset, .clientIdent, .authRequest])
            frame = RawFrame(tag: tag.rawValue, segments: [dice.chance(1, in: 2) ? [] : dice.bytes(dice.int(30))]).bytes
            what = "handshake frame in the session"
        case 10:
            var segment0 = [UInt8](repeating: 0, count: dice.pick([0, 7, 8, 20]))
            if segment0.count >= 8 { Self.put64(&segment0, 0, dice.pick([1, 2, dice.u64()])) }
            let data: [[UInt8]] = dice.chance(1, in: 2) ? [dice.bytes(dice.int(50))] : []
            frame = RawFrame(tag: FrameTag.direct.rawValue, segments: [segment0] + data).bytes
            what = "DIRECT"
        default:
            let kind = MessageKind(rawValue: dice.pick([1, 2, 2, 3, 3, 4, 4, 5, 6, 6, 0, 7]))
            let id: UInt64 = kind == .oneWay ? 0 : dice.pick([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, UInt64.max, dice.u64()])
            let (type, body) = Self.messagePayload(&dice)
            let payload = dice.chance(1, in: 10) ? dice.bytes(dice.int(20)) : body
            let data = dice.chance(1, in: 4) ? dice.bytes(dice.int(300)) : nil
            frame = Self.message(kind: kind, id: id, type: type, payload: payload, data: data)
            what = "MESSAGE \(kind)"
        }
        e.insert(Element(bytes: frame, gate: e[min(at, e.count - 1)].gate), at: at)
        if dice.chance(3, in: 4) { Self.renumber(&e) }
        return "inserted \(what)"
    }

    /// The nucleus of the SERVER_IDENT or of a NOTICE (one put in, if there is none) replaced:
    /// messages, request delays and redirects a client must cope with.
    static func nucleusEdit(_ e: inout [Element], _ handshake: Int, target: String, _ dice: inout Dice) -> String {
        let tags = [FrameTag.serverIdent.rawValue, FrameTag.notice.rawValue]
        let candidates = e.indices.filter { RawFrame(e[$0].bytes).map { tags.contains($0.tag) } ?? false }
        guard !candidates.isEmpty, !dice.chance(1, in: 4) else {
            var notice = Parley_V1_Notice()
            notice.nucleus = Self.nucleus(target: target, &dice)
            let at = min(e.count, handshake + dice.int(max(1, e.count - handshake + 1)))
            e.insert(Element(bytes: RawFrame(tag: FrameTag.notice.rawValue, segments: [Self.bytes(notice)]).bytes, gate: e[min(at, e.count - 1)].gate), at: at)
            return "nucleus of an inserted NOTICE"
        }
        let i = dice.pick(candidates)
        var frame = RawFrame(e[i].bytes)!
        if frame.tag == FrameTag.serverIdent.rawValue {
            var ident = (try? Parley_V1_ServerIdent(serializedBytes: frame.segments[0])) ?? Parley_V1_ServerIdent()
            ident.nucleus = Self.nucleus(target: target, &dice)
            frame.segments[0] = Self.bytes(ident)
        } else {
            var notice = Parley_V1_Notice()
            notice.nucleus = Self.nucleus(target: target, &dice)
            frame.segments[0] = Self.bytes(notice)
        }
        e[i].bytes = frame.bytes
        return frame.tag == FrameTag.serverIdent.rawValue ? "nucleus of SERVER_IDENT" : "nucleus of a NOTICE"
    }

    /// A handshake frame's fields or a NOTICE's nucleus changed, as decoded protobuf, CRCs right.
    static func semanticEdit(_ e: inout [Element], _ handshake: Int, target: String, _ dice: inout Dice) -> String {
        let i = dice.chance(1, in: 3) ? dice.int(min(handshake, e.count)) : Self.target(e, handshake, &dice)
        guard var frame = RawFrame(e[i].bytes) else {
            // The banner: version and features, CRC right.
            guard e[i].bytes.count == 32 else { return Self.segmentEdit(&e, handshake, &dice) }
            switch dice.int(3) {
            case 0: Self.put16(&e[i].bytes, 8, dice.pick([0, 2, 0xFFFF]))
            case 1: Self.put64(&e[i].bytes, 12, Self.le64(e[i].bytes, 12) ^ (UInt64(1) << UInt64(dice.int(dice.chance(1, in: 2) ? 12 : 64))))
            default: Self.put64(&e[i].bytes, 20, Self.le64(e[i].bytes, 20) | (UInt64(1) << UInt64(dice.int(dice.chance(1, in: 2) ? 12 : 64))))
            }
            Self.put32(&e[i].bytes, 28, CRC32C.checksum(e[i].bytes[0..<28]))
            return "banner version or features"
        }
        let what: String
        switch frame.tag {
        case FrameTag.hello.rawValue:
            var hello = (try? Parley_V1_Hello(serializedBytes: frame.segments[0])) ?? Parley_V1_Hello()
            switch dice.int(3) {
            case 0: hello.entityType = dice.pick([.unspecified, .client, .UNRECOGNIZED(99)])
            case 1: hello.maxFrameSize = dice.pick([0, 1, 65_535, 65_536, UInt32.max, 100, 1 << 31])
            default: hello.peerAddress = dice.pick(["", String(repeating: "a", count: 5000)])
            }
            frame.segments[0] = Self.bytes(hello)
            what = "HELLO"
        case FrameTag.authDone.rawValue:
            var done = (try? Parley_V1_AuthDone(serializedBytes: frame.segments[0])) ?? Parley_V1_AuthDone()
            switch dice.int(5) {
            case 0: done.method = dice.pick(["", "secret", "tls", "nonE", "none\u{0}"])
            case 1: done.connectionMode = dice.pick(["secure", "bogus", "CRC"])
            case 2: done.cipher = dice.pick(["aes-256-gcm", "x"])
            case 3: done.entity = dice.pick(["client.admin", ""])
            default: done.globalID = dice.u64()
            }
            frame.segments[0] = Self.bytes(done)
            what = "AUTH_DONE"
        case FrameTag.serverIdent.rawValue:
            var ident = (try? Parley_V1_ServerIdent(serializedBytes: frame.segments[0])) ?? Parley_V1_ServerIdent()
            switch dice.int(5) {
            case 0, 1: ident.nucleus = Self.nucleus(target: target, &dice)
            case 2:
                var refusal = Parley_V1_Status()
                refusal.code = dice.pick([0, 13, 18, 77, UInt32.max])
                refusal.message = dice.pick(["", "too old"])
                ident.refusal = refusal
            case 3: ident.sessionToken = Data(dice.bytes(dice.pick([0, 15, 16, 17])))
            default:
                ident.platform = String(repeating: "p", count: dice.pick([0, 10_000]))
                ident.serverNonce = dice.u64()
            }
            frame.segments[0] = Self.bytes(ident)
            what = "SERVER_IDENT"
        case FrameTag.notice.rawValue:
            var notice = Parley_V1_Notice()
            notice.nucleus = Self.nucleus(target: target, &dice)
            frame.segments[0] = Self.bytes(notice)
            what = "NOTICE"
        case FrameTag.message.rawValue where frame.isMessage:
            // Another message of a well-formed type in the payload.
            var status = Parley_V1_Status()
            status.code = UInt32(dice.int(40))
            status.message = "changed"
            var pong = Parley_Echo_V1_Pong()
            pong.sequence = dice.u64()
            var item = Parley_Echo_V1_CountItem()
            item.index = UInt32(dice.int(10))
            frame.segments[1] = dice.pick([Self.bytes(status), Self.bytes(pong), Self.bytes(item), [], [0x08, 0xFF]])
            what = "MESSAGE payload"
        default:
            return Self.segmentEdit(&e, handshake, &dice)
        }
        e[i].bytes = frame.bytes
        return "\(what) fields"
    }
}

extension String {
    fileprivate func leftPadded(_ width: Int) -> String { String(repeating: " ", count: max(0, width - self.count)) + self }
}
