import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ParleyNIO
import ParleyServices
import ParleyWire
import SwiftProtobuf

/// `parley conform --client-test`: a test server for a client under test. Each connection
/// the client makes plays the next scenario, a legal but demanding server (unknown feature
/// bits, ignorable tags, frames in one-byte writes, NOTICE and KEEPALIVE, answers out of
/// order, a request delay, a small frame limit, a refusal, a redirect), and the client's
/// frames are checked against the rules on clients and senders. The server answers the echo
/// service of section 12 (Ping, Echo, Count; other types ERROR `unknownMessageType`), so that
/// any client that runs an echo workload can be tested: run it once per scenario.
public final class ClientConformanceTester: Sendable {
    /// One connection's server behaviour, and the requirements it checks.
    enum Scenario: Int, CaseIterable, Sendable {
        case demanding, requestDelay, noFeatures, smallLimit, refusal, wrongAuthDone, secret, wrongServerProof, redirect

        var title: String {
            switch self {
            case .demanding: return "a demanding server (unknown feature bits, ignorable tags, one-byte writes, NOTICE, KEEPALIVE, answers out of order)"
            case .requestDelay: return "a request delay of 1 s"
            case .noFeatures: return "a server without optional features"
            case .smallLimit: return "a frame-size limit of 64 KiB"
            case .refusal: return "a refusal (clientOutOfDate)"
            case .wrongAuthDone: return "an AUTH_DONE for another method"
            case .secret: return "method secret in secure mode (a key of the tester's keyring)"
            case .wrongServerProof: return "method secret with a wrong server proof"
            case .redirect: return "a redirect to this server"
            }
        }

        /// The checks, in the order they are reported.
        var checks: [(id: String, name: String)] {
            switch self {
            case .demanding:
                return [
                    ("R-3-8", "the client accepts a server supporting unknown feature bits (20, 40)"),
                    ("R-4.8-1", "the client skips unknown ignorable tags in the handshake and the session"),
                    ("R-7.12-1", "the client answers KEEPALIVE with a KEEPALIVE_ACK of the same 8 bytes"),
                    ("R-7.3-2", "the client numbers its MESSAGEs 1, 2, 3, ..."),
                    ("R-7.3-1", "the client's ack never goes down nor past the server's last seq"),
                    ("R-7.4-2", "the client sends no REQUEST with id 0"),
                    ("R-4.9-2", "the client sends every frame with flags 0"),
                    ("R-4.7-2", "the client sends control frames of 1 segment and MESSAGEs of 2 or 3"),
                ]
            case .requestDelay: return [("R-8.2-2", "the client sends no request before the 1 s request delay has passed")]
            case .noFeatures: return [("R-3-9", "the client sends nothing that needs a feature the server lacks")]
            case .smallLimit: return [("R-4.5-2", "the client sends no frame larger than the server's 64 KiB limit")]
            case .refusal: return [("R-8.4-1", "a refused client sends nothing more")]
            case .wrongAuthDone: return [("R-6.1-2", "the client refuses an AUTH_DONE for another method (CLOSE authenticationFailed)")]
            case .secret:
                return [
                    ("R-5.1-3", "the client's method secret checks out: its proof and transcript MAC are right, and what follows AUTH_REQUEST_MORE is sealed"),
                    ("R-5.1-5", "the client accepts a right server proof and runs its session sealed"),
                ]
            case .wrongServerProof: return [("R-5.1-5", "the client refuses a wrong server proof (CLOSE authenticationFailed) and sends no MESSAGE")]
            case .redirect: return [("R-8.2-1", "a redirected client leaves without CLOSE")]
            }
        }
    }

    public let listen: ParleyAddress
    public let tls: ParleyTLS?
    /// How long the tester waits for each frame it expects from the client.
    public let timeout: Duration
    /// How long it waits for the client's next connection before giving up on the rest.
    public let idle: Duration
    public let only: [String]
    /// The entities whose keys the client under test may use in the scenarios of method
    /// secret; without them those scenarios skip.
    public let secrets: SecretDirectory?
    private let queue = AcceptQueue()
    private let listener = NIOLockedValueBox<(any Channel)?>(nil)

    public init(
        listen: ParleyAddress, tls: ParleyTLS? = nil, timeout: Duration = .seconds(5), idle: Duration = .seconds(60), only: [String] = [],
        secrets: SecretDirectory? = nil
    ) {
        self.secrets = secrets
        self.listen = listen
        self.tls = tls
        self.timeout = timeout
        self.idle = idle
        self.only = only.map { $0.trimmingCharacters(in: CharacterSet(charactersIn: "[]")) }
    }

    /// Every client check: its requirement id and what it checks, in the order of the scenarios.
    public static var checks: [(id: String, name: String)] { Scenario.allCases.flatMap(\.checks) }

    /// The requirement ids the client test checks.
    public static var checkedIds: Set<String> { Set(Self.checks.map(\.id)) }

    /// Starts listening; returns the address clients connect to (with the port chosen).
    public func start() async throws -> ParleyAddress {
        let unknown = Set(self.only).subtracting(Self.checkedIds)
        guard unknown.isEmpty else {
            throw ParleyError(code: .invalidArgument, message: "no client check has the id \(unknown.sorted().joined(separator: ", "))")
        }
        let queue = self.queue
        // One event loop for the listener and every connection: a connection's initializer
        // runs on its own loop, so with several loops two connections accepted together could
        // be queued in the other order (CI saw a scenario played with the next client's
        // connection, and the next with the first's, already closed).
        let (channel, bound) = try await PosixTransport(tls: self.tls).listen(on: self.listen, group: MultiThreadedEventLoopGroup.singleton.next()) { channel in
            channel.eventLoop.makeCompletedFuture {
                let inbox = Inbox()
                try channel.pipeline.syncOperations.addHandler(InboxHandler(inbox: inbox))
                queue.put(Accepted(channel: channel, inbox: inbox))
            }
        }
        self.listener.withLockedValue { $0 = channel }
        return bound
    }

    /// Stops listening and closes every connection not played: those queued, and any the
    /// listener accepts while it closes (a client following the last scenario's redirect
    /// reconnects just then; left open, it would wait for SERVER_IDENT for ever).
    public func stop() {
        self.listener.withLockedValue { l in
            l?.close(promise: nil)
            l = nil
        }
        self.queue.close()
    }

    /// Plays every scenario, one per connection, and returns what the client did. A scenario
    /// no client connected for within `idle` is skipped. With `only`, the run ends after the
    /// last scenario that has one of those checks (the earlier ones are still played: the
    /// client connects once per scenario, in order).
    public func run(address: ParleyAddress, progress: @Sendable (CheckResult) -> Void = { _ in }) async -> ConformanceReport {
        var results: [CheckResult] = []
        let wantedChecks = { (scenario: Scenario) in scenario.checks.filter { self.only.isEmpty || self.only.contains($0.id) } }
        let played = (Scenario.allCases.lastIndex { !wantedChecks($0).isEmpty } ?? -1) + 1
        for scenario in Scenario.allCases.prefix(played) {
            let wanted = wantedChecks(scenario)
            guard let accepted = await self.queue.take(self.idle) else {
                for check in wanted {
                    let r = CheckResult(id: check.id, name: check.name, status: .skip, reason: "no client connected for scenario \(scenario.rawValue + 1), \(scenario.title)", milliseconds: 0)
                    progress(r)
                    results.append(r)
                }
                continue
            }
            let start = ContinuousClock.now
            let peer = ConformancePeer(channel: accepted.channel, inbox: accepted.inbox, maxFrameSize: scenario == .smallLimit ? 65_536 : Frame.maximumOwnLimit)
            var play = ScenarioPlay(scenario: scenario, peer: peer, timeout: self.timeout, selfAddress: address.description)
            play.overTLS = address.usesTLS
            play.secrets = self.secrets
            let outcomes = await play.run()
            peer.close()
            let elapsed = ContinuousClock.now - start
            for check in wanted {
                var r = CheckResult(id: check.id, name: check.name, status: .pass, milliseconds: Int(elapsed.components.seconds * 1000 + elapsed.components.attoseconds / 1_000_000_000_000_000))
                switch outcomes[check.id] ?? .skip("the client did not get this far") {
                case .pass: break
                case .skip(let reason): r.status = .skip; r.reason = reason
                case .fail(let expected, let seen): r.status = .fail; r.expected = expected; r.seen = seen
                }
                progress(r)
                results.append(r)
            }
        }
        self.stop()
        return ConformanceReport(address: address.description, results: results)
    }
}

struct Accepted: Sendable {
    var channel: any Channel
    var inbox: Inbox
}

/// Connections accepted and not yet played.
final class AcceptQueue: Sendable {
    private struct State {
        var items: [Accepted] = []
        var waiter: CheckedContinuation<Void, Never>?
        var woken = false
        var closed = false
    }
    private let state = NIOLockedValueBox(State())

    /// Queues a connection, or closes it once the queue is closed.
    func put(_ item: Accepted) {
        let taken = self.state.withLockedValue { s -> Bool in
            guard !s.closed else { return false }
            s.items.append(item)
            return true
        }
        guard taken else { return item.channel.close(promise: nil) }
        self.wake()
    }

    /// Closes the connections queued and every one put from now on.
    func close() {
        let items = self.state.withLockedValue { s -> [Accepted] in
            s.closed = true
            defer { s.items = [] }
            return s.items
        }
        for item in items { item.channel.close(promise: nil) }
        self.wake()
    }

    private func wake() {
        let waiter = self.state.withLockedValue { s -> CheckedContinuation<Void, Never>? in
            defer { s.waiter = nil }
            if s.waiter == nil { s.woken = true }
            return s.waiter
        }
        waiter?.resume()
    }

    func take(_ timeout: Duration) async -> Accepted? {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while true {
            let (item, closed) = self.state.withLockedValue { s -> (Accepted?, Bool) in (s.items.isEmpty ? nil : s.items.removeFirst(), s.closed) }
            if let item { return item }
            let now = ContinuousClock.now
            if closed || now >= deadline { return nil }
            let timer = Task {
                try? await Task.sleep(for: deadline - now)
                if !Task.isCancelled { self.wake() }
            }
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let ready = self.state.withLockedValue { s -> Bool in
                    if !s.items.isEmpty || s.woken {
                        s.woken = false
                        return true
                    }
                    s.waiter = c
                    return false
                }
                if ready { c.resume() }
            }
            timer.cancel()
        }
    }
}

enum ClientOutcome {
    case pass
    case skip(String)
    case fail(String, String)
}

/// One scenario played against one connection of the client under test.
struct ScenarioPlay {
    typealias Scenario = ClientConformanceTester.Scenario
    let scenario: Scenario
    let peer: ConformancePeer
    let timeout: Duration
    let selfAddress: String
    /// The transport is TLS: method tls is served too.
    var overTLS = false
    /// The keyring of the scenarios of method secret.
    var secrets: SecretDirectory?
    var outcomes: [String: ClientOutcome] = [:]
    var features: ParleyFeatures = []
    var nextSeq: UInt64 = 1
    var lastReceivedSeq: UInt64 = 0
    var lastAck: UInt64 = 0
    /// Sender faults seen, by requirement id (the first of each).
    var faults: [String: (String, String)] = [:]
    var keepaliveAnswered = false
    /// REQUESTs the client sent after SERVER_IDENT (not with its handshake).
    var requests = 0
    /// Events read ahead by `readAhead`, handed out before the connection's next ones.
    var queued: [PeerEvent] = []
    /// MESSAGEs up to this seq arrived before the tester sent the frame that could change
    /// them (SERVER_IDENT's request delay, refusal or redirect; AUTH_DONE's server proof):
    /// the client sent them with its handshake (R-6.1-5, R-6.1-6), not after seeing it.
    var earlyThroughSeq: UInt64 = 0
    /// Count streams with an interval, sent an item at a time as the echo service does.
    var streams: [UInt64: (sent: UInt32, count: UInt32, interval: Duration, due: ContinuousClock.Instant)] = [:]

    static let keepaliveStamp: UInt64 = 0x0123_4567_89AB_CDEF
    /// How long `readAhead` waits for more of what the client sent with its handshake.
    static let earlyGrace = Duration.milliseconds(250)
    static let unknownBits = ParleyFeatures(rawValue: 1 << 20 | 1 << 40)

    init(scenario: Scenario, peer: ConformancePeer, timeout: Duration, selfAddress: String) {
        self.scenario = scenario
        self.peer = peer
        self.timeout = timeout
        self.selfAddress = selfAddress
    }

    var ours: ParleyFeatures {
        switch self.scenario {
        case .noFeatures: return []
        case .demanding: return ParleyFeatures.implemented.union(Self.unknownBits)
        default: return .implemented
        }
    }

    /// Writes frames (sealed in secure mode); in the demanding scenario small ones go out a
    /// byte at a time.
    func send(_ frames: [Frame]) async {
        let size = frames.reduce(0) { $0 + $1.wireSize }
        try? await self.peer.send(frames, pieces: self.scenario == .demanding ? (size <= 4096 ? 1 : 1000) : nil)
    }

    func ignorable() -> Frame { Frame(tag: FrameTag(rawValue: 0xC3), flags: 0x20, segments: [ByteBuffer(bytes: [1, 2, 3, 4, 5])]) }

    mutating func failAll(_ expected: String, _ seen: String) {
        for check in self.scenario.checks where self.outcomes[check.id] == nil { self.outcomes[check.id] = .fail(expected, seen) }
    }

    mutating func skipAll(_ reason: String) {
        for check in self.scenario.checks where self.outcomes[check.id] == nil { self.outcomes[check.id] = .skip(reason) }
    }

    /// The next frame from the client, checked against the rules on senders; nil when the
    /// connection ended, a timeout, or bytes that do not decode (recorded).
    mutating func nextFrame(_ timeout: Duration? = nil) async -> (Frame?, PeerEvent) {
        while true {
            let event = await self.nextEvent(timeout ?? self.timeout)
            switch event {
            case .frame(let f):
                if f.tag.isIgnorable && !f.tag.isKnown { continue }
                self.checkSender(f)
                return (f, event)
            case .undecodable(let e):
                let id = e.code == .frameTooLarge ? "R-4.5-2" : "R-4.7-2"
                if self.faults[id] == nil { self.faults[id] = ("frames that decode", "\(e.code): \(e.message)") }
                return (nil, event)
            default:
                return (nil, event)
            }
        }
    }

    /// The next event: one read ahead first, then the connection's.
    mutating func nextEvent(_ timeout: Duration) async -> PeerEvent {
        if !self.queued.isEmpty { return self.queued.removeFirst() }
        return await self.peer.next(timeout)
    }

    /// Takes in what the client has sent so far, before the tester sends a frame that tells
    /// the client something its next requests must heed: every MESSAGE that arrives within
    /// `earlyGrace` of the last (or completes a frame begun by then) was sent with the
    /// handshake, before the client could know (`earlyThroughSeq`). The events are queued
    /// for `nextEvent`, in order; a client that never pauses is read ahead for `timeout`
    /// at most.
    mutating func readAhead() async {
        let deadline = ContinuousClock.now.advanced(by: self.timeout)
        for _ in 0..<10_000 where ContinuousClock.now < deadline {
            let event = await self.peer.next(Self.earlyGrace)
            if case .timeout = event {
                if self.peer.holdsPartialFrame { continue }
                return
            }
            self.queued.append(event)
            guard case .frame(let f) = event else { return }
            if f.tag == .message, let m = try? WireMessage(frame: f) { self.earlyThroughSeq = max(self.earlyThroughSeq, m.header.seq) }
        }
    }

    /// A MESSAGE the client sent with its handshake (see `earlyThroughSeq`).
    func isEarly(_ f: Frame) -> Bool {
        f.tag == .message && (try? WireMessage(frame: f)).map { $0.header.seq <= self.earlyThroughSeq } == true
    }

    mutating func checkSender(_ f: Frame) {
        func fault(_ id: String, _ expected: String, _ seen: String) {
            if self.faults[id] == nil { self.faults[id] = (expected, seen) }
        }
        if f.flags != 0 { fault("R-4.9-2", "flags 0", "\(f.tag) with flags 0x\(String(f.flags, radix: 16))") }
        let segmentsOK = f.tag == .message ? (2...3).contains(f.segments.count) : f.segments.count == 1
        if !segmentsOK { fault("R-4.7-2", "the segment count section 4.7 lists", "\(f.tag) with \(f.segments.count) segments") }
        let needs: ParleyFeatures? = switch f.tag {
        case .keepalive, .keepaliveAck: .keepalive
        case .ack, .sessionReconnect: .reconnect
        default: nil
        }
        if let needs, !self.features.contains(needs) { fault("R-3-9", "nothing that needs \(needs)", describe(f)) }
        guard f.tag == .message, let m = try? WireMessage(frame: f) else { return }
        if m.header.seq != self.lastReceivedSeq &+ 1 { fault("R-7.3-2", "seq \(self.lastReceivedSeq &+ 1)", "seq \(m.header.seq)") }
        self.lastReceivedSeq = m.header.seq
        if m.header.ack < self.lastAck || m.header.ack >= self.nextSeq {
            fault("R-7.3-1", "an ack from \(self.lastAck) to \(self.nextSeq - 1)", "ack \(m.header.ack)")
        }
        self.lastAck = max(self.lastAck, m.header.ack)
        if m.header.kind == .request && m.header.id == 0 { fault("R-7.4-2", "a REQUEST id other than 0", "id 0") }
        if m.header.flags != 0 { fault("R-4.9-2", "header flags 0", "header flags 0x\(String(m.header.flags, radix: 16))") }
        if m.data != nil && !self.features.contains(.dataSegment) { fault("R-3-9", "no data segment without dataSegment", describe(f)) }
        if (m.header.kind == .streamItem || m.header.kind == .cancel) && !self.features.contains(.streams) {
            fault("R-3-9", "no \(m.header.kind) without streams", describe(f))
        }
    }

    mutating func run() async -> [String: ClientOutcome] {
        await self.play()
        // A sender rule broken anywhere in this scenario's session fails its check.
        for check in self.scenario.checks {
            guard let (expected, seen) = self.faults[check.id] else { continue }
            if case .fail = self.outcomes[check.id] { continue }
            self.outcomes[check.id] = .fail(expected, seen)
        }
        return self.outcomes
    }

    private mutating func play() async {
        if self.scenario == .secret || self.scenario == .wrongServerProof { return await self.playSecret() }
        // Banner and HELLO at once, without waiting for the client.
        var hello = Parley_V1_Hello()
        hello.entityType = .server
        hello.peerAddress = "conformance-server"
        hello.maxFrameSize = self.scenario == .smallLimit ? 1 : 0
        var first = ByteBuffer()
        first.writeBanner(Banner(supported: self.ours))
        await self.peer.send(first, pieces: self.scenario == .demanding ? 1 : nil)
        await self.send([hello.frame(tag: .hello)] + (self.scenario == .demanding ? [self.ignorable()] : []))
        let bannerEvent = await self.peer.next(self.timeout)
        guard case .banner(let theirs) = bannerEvent else { return self.failAll("the client's banner", bannerEvent.summary) }
        guard theirs.required.isSubset(of: self.ours) else { return self.skipAll("the client requires features \(theirs.required.subtracting(self.ours)) this server does not offer") }
        self.features = self.ours.intersection(theirs.supported)
        let (helloFrame, e1) = await self.nextFrame()
        guard helloFrame?.tag == .hello else { return self.failAll("the client's HELLO", helloFrame.map(describe) ?? e1.summary) }
        let (authFrame, e2) = await self.nextFrame()
        guard let authFrame, authFrame.tag == .authRequest, let auth = try? Parley_V1_AuthRequest(parleyPayload: authFrame.segments[0]) else {
            return self.failAll("the client's AUTH_REQUEST", e2.summary)
        }
        // Method none, and on a TLS transport method tls (the client then stays anonymous).
        let allowed = self.overTLS ? [AuthMethod.none, AuthMethod.tls] : [AuthMethod.none]
        guard allowed.contains(auth.method) else {
            return self.skipAll("the client authenticates with method \(auth.method); the client test serves \(allowed.joined(separator: " and "))")
        }
        var done = Parley_V1_AuthDone()
        done.method = self.scenario == .wrongAuthDone ? "conform-other-method" : auth.method
        done.connectionMode = "crc"
        await self.send([done.frame(tag: .authDone)] + (self.scenario == .demanding ? [self.ignorable()] : []))
        if self.scenario == .wrongAuthDone {
            // A client offering one method may have put CLIENT_IDENT (and MESSAGEs) in its
            // first flight (R-6.1-5), before it saw this AUTH_DONE.
            return await self.expectAuthRefusal(firstFlightAllowed: auth.offeredMethods.count <= 1)
        }
        let (identFrame, e3) = await self.nextFrame()
        guard identFrame?.tag == .clientIdent else { return self.failAll("the client's CLIENT_IDENT", identFrame.map(describe) ?? e3.summary) }
        if [.requestDelay, .refusal, .redirect].contains(self.scenario) {
            // Requests that came with CLIENT_IDENT (R-6.1-5) were sent before SERVER_IDENT
            // could tell the client of the delay, refusal or redirect.
            await self.readAhead()
        }
        if self.scenario == .demanding {
            // The client went past a banner with unknown bits and two ignorable frames.
            self.outcomes["R-3-8"] = .pass
        }
        var ident = Parley_V1_ServerIdent()
        ident.nucleus = Parley_V1_Nucleus()
        ident.platform = "any"
        ident.implementation = "parley-conform"
        ident.version = "1.0.0"
        ident.name = "parley conform --client-test"
        switch self.scenario {
        case .requestDelay: ident.nucleus.requestDelaySeconds = 1.0
        case .redirect: ident.nucleus.redirects = [self.selfAddress]
        case .refusal:
            var message = Parley_V1_ServerMessage()
            message.priority = .high
            message.text = "parley-conform: this client is out of date (a test of the refusal)"
            ident.nucleus.messages = [message]
            ident.refusal.code = ParleyError.Code.clientOutOfDate.rawValue
            ident.refusal.message = message.text
        case .demanding:
            var message = Parley_V1_ServerMessage()
            message.text = "parley conform --client-test: a demanding server"
            ident.nucleus.messages = [message]
        default: break
        }
        let identSent = ContinuousClock.now
        var flight = [ident.frame(tag: .serverIdent)]
        if self.scenario == .refusal {
            flight.append(ident.refusal.frame(tag: .close))
            await self.send(flight)
            return await self.expectSilence()
        }
        if self.scenario == .demanding {
            flight.append(self.ignorable())
            if self.features.contains(.notice) {
                var notice = Parley_V1_Notice()
                var message = Parley_V1_ServerMessage()
                message.text = "a NOTICE from parley conform"
                notice.nucleus.messages = [message]
                flight.append(notice.frame(tag: .notice))
            }
            if self.features.contains(.keepalive) { flight.append(SessionStateMachine.keepaliveFrame(tag: .keepalive, timestamp: Self.keepaliveStamp)) }
        }
        await self.send(flight)
        await self.session(identSent: identSent)
    }

    /// The scenarios of method secret: the server side of the handshake is the reference
    /// state machine's (secure mode only, the tester's keyring); in `wrongServerProof` the
    /// server proof of its AUTH_DONE is altered on the way out.
    private mutating func playSecret() async {
        guard let secrets = self.secrets else {
            return self.skipAll("the client test has no keyring (--keyring FILE) for the scenarios of method secret")
        }
        var ident = Parley_V1_ServerIdent()
        ident.platform = "any"
        ident.implementation = "parley-conform"
        ident.version = "1.0.0"
        ident.name = "parley conform --client-test"
        var machine = ServerHandshakeStateMachine(configuration: .init(
            banner: Banner(supported: ParleyFeatures.implemented.union(.secureMode)), maxFrameSize: 0, authMethods: [AuthMethod.secret], ident: ident,
            clientAddress: "conformance-client", modes: [.secure], secrets: secrets, now: Int64(Date().timeIntervalSince1970),
            randomness: .generate(), globalID: 1
        ))
        // In `wrongServerProof`, AUTH_DONE's server proof has one bit flipped.
        let tamper = self.scenario != .wrongServerProof ? { $0 } : { (frame: Frame) -> Frame in
            guard frame.tag == .authDone, var done = try? Parley_V1_AuthDone(parleyPayload: frame.segments[0]),
                var proof = try? Parley_V1_SecretAuthDone(serializedBytes: done.payload), !proof.serverProof.isEmpty
            else { return frame }
            proof.serverProof[proof.serverProof.startIndex] ^= 0x01
            done.payload = (try? proof.serializedData()) ?? done.payload
            return done.frame(tag: .authDone)
        }
        var sealer: SecureDirection?
        var step = machine.start()
        var method: String?
        while true {
            var out = ByteBuffer()
            do {
                try out.writeStep(step.send, sealer: &sealer, edit: tamper)
            } catch {
                return self.failAll("the tester's own handshake output", "\(error)")
            }
            if let opening = step.startOpening, let direction = try? SecureDirection(keys: opening.keys, sealing: false) {
                self.peer.startOpening(direction)
            }
            let sendsAuthDone = step.send.contains { if case .frame(let f) = $0 { f.tag == .authDone } else { false } }
            if self.scenario == .wrongServerProof && sendsAuthDone {
                // A MESSAGE sealed right after CLIENT_IDENT (R-6.1-6) left before the client
                // could check this AUTH_DONE's proof.
                await self.readAhead()
            }
            if out.readableBytes > 0 { await self.peer.send(out) }
            switch step.outcome {
            case .established(let result):
                if let sealer { self.peer.startSealing(sealer) }
                self.features = result.features
                if self.scenario == .secret { self.outcomes["R-5.1-3"] = .pass }
                return self.scenario == .secret ? await self.session(identSent: .now) : await self.expectProofRefusal()
            case .failed(let error):
                guard let method, method == AuthMethod.secret else {
                    return self.skipAll("the client authenticates with method \(method ?? "?") (\(error.code): \(error.message)); this scenario serves method secret only")
                }
                return self.failAll("a handshake of method secret that checks out (section 5.1)", "\(error.code): \(error.message)")
            case .resumeRequested:
                return self.failAll("CLIENT_IDENT", "SESSION_RECONNECT")
            case nil:
                break
            }
            let event = await self.nextEvent(self.timeout)
            switch event {
            case .banner(let banner): step = machine.received(.banner(banner))
            case .frame(let frame):
                if frame.tag == .authRequest, method == nil { method = (try? Parley_V1_AuthRequest(parleyPayload: frame.segments[0]))?.method }
                self.checkSender(frame)
                step = machine.received(.frame(frame))
            default:
                if let method, method != AuthMethod.secret {
                    return self.skipAll("the client authenticates with method \(method) and no other; this scenario serves method secret only")
                }
                return self.failAll("the client's handshake of method secret", event.summary)
            }
        }
    }

    /// After an AUTH_DONE with a wrong server proof: the client sends CLOSE
    /// authenticationFailed (sealed, as it already seals) and no MESSAGE.
    private mutating func expectProofRefusal() async {
        let expected = "CLOSE authenticationFailed (a wrong server proof), and no MESSAGE"
        while true {
            let (f, event) = await self.nextFrame()
            guard let f else {
                return self.outcomes["R-5.1-5"] = .fail(expected, event.summary)
            }
            if f.tag == .keepalive || f.tag == .keepaliveAck || self.isEarly(f) { continue }
            guard f.tag == .close, let status = try? Parley_V1_Status(parleyPayload: f.segments[0]), status.code == ParleyError.Code.authenticationFailed.rawValue else {
                return self.outcomes["R-5.1-5"] = .fail(expected, describe(f))
            }
            self.outcomes["R-5.1-5"] = .pass
            return
        }
    }

    private mutating func expectAuthRefusal(firstFlightAllowed: Bool) async {
        var (f, event) = await self.nextFrame()
        var sawIdent = false
        while firstFlightAllowed, let frame = f, (frame.tag == .clientIdent && !sawIdent) || (frame.tag == .message && sawIdent) {
            sawIdent = true
            (f, event) = await self.nextFrame()
        }
        guard let f else {
            if case .closed = event { return self.failAll("CLOSE authenticationFailed, then the connection closed", "the connection closed without CLOSE") }
            return self.failAll("CLOSE authenticationFailed", event.summary)
        }
        guard f.tag == .close, let status = try? Parley_V1_Status(parleyPayload: f.segments[0]), status.code == ParleyError.Code.authenticationFailed.rawValue else {
            return self.failAll("CLOSE authenticationFailed", describe(f))
        }
        self.outcomes["R-6.1-2"] = .pass
    }

    /// After a refusal: the client sends nothing more.
    private mutating func expectSilence() async {
        var (f, event) = await self.nextFrame(.seconds(1))
        // Requests sent with CLIENT_IDENT are not answered (R-6.1-7) and not held against it.
        for _ in 0..<10_000 {
            guard let early = f, self.isEarly(early) else { break }
            (f, event) = await self.nextFrame(.seconds(1))
        }
        if let f { return self.failAll("nothing more from the refused client", describe(f)) }
        if case .undecodable(let e) = event { return self.failAll("nothing more from the refused client", "\(e)") }
        self.outcomes["R-8.4-1"] = .pass
    }

    /// The session: answers the echo service until the client closes or falls silent.
    private mutating func session(identSent: ContinuousClock.Instant) async {
        var sawSessionFrame = false
        var held: [WireMessage] = []
        let end = ContinuousClock.now.advanced(by: .seconds(60))
        loop: while ContinuousClock.now < end {
            // In the demanding scenario, requests that arrived together are answered in
            // reverse order (after the rest of the read is taken in, without waiting).
            let now = ContinuousClock.now
            let due = self.streams.values.map(\.due).min()
            let wait: Duration = !held.isEmpty ? .zero : due.map { $0 > now ? $0 - now : .zero } ?? self.timeout
            let (f, event) = await self.nextFrame(wait)
            guard let f else {
                if case .timeout = event, !held.isEmpty {
                    await self.answer(held.reversed())
                    held = []
                    continue
                }
                if case .timeout = event, !self.streams.isEmpty {
                    let items = self.dueItems()
                    if !items.isEmpty { await self.send(items) }
                    continue
                }
                if !held.isEmpty { await self.answer(held.reversed()) }
                break loop
            }
            switch f.tag {
            case .message:
                guard let m = try? WireMessage(frame: f) else { break loop }
                sawSessionFrame = true
                if m.header.kind == .request && m.header.seq > self.earlyThroughSeq {
                    self.requests += 1
                    if self.requests == 1 && self.scenario == .requestDelay {
                        let waited = self.peer.lastArrival - identSent
                        self.outcomes["R-8.2-2"] = waited >= .seconds(1) ? .pass : .fail("the first REQUEST 1 s or more after SERVER_IDENT", "after \(waited)")
                    }
                    if self.scenario == .redirect {
                        self.outcomes["R-8.2-1"] = .skip("the client does not follow redirects (it sent a request)")
                    }
                }
                if self.scenario == .demanding && m.header.kind == .request {
                    held.append(m)
                } else {
                    await self.answer([m])
                }
            case .keepalive:
                var ack = f
                ack.tag = .keepaliveAck
                await self.send([ack])
            case .keepaliveAck:
                sawSessionFrame = true
                if f.segments[0].readableBytes == 8, f.segments[0].getInteger(at: f.segments[0].readerIndex, endianness: .little, as: UInt64.self) == Self.keepaliveStamp {
                    self.keepaliveAnswered = true
                } else {
                    self.outcomes["R-7.12-1"] = .fail("KEEPALIVE_ACK of 01 23 45 67 89 ab cd ef (as u64)", describe(f))
                }
            case .close:
                if self.scenario == .redirect { self.outcomes["R-8.2-1"] = .fail("the connection closed without CLOSE", describe(f)) }
                break loop
            default:
                continue
            }
        }
        switch self.scenario {
        case .demanding:
            if sawSessionFrame { self.outcomes["R-4.8-1"] = .pass }
            if self.features.contains(.keepalive) {
                if self.outcomes["R-7.12-1"] == nil {
                    self.outcomes["R-7.12-1"] = self.keepaliveAnswered ? .pass : .fail("KEEPALIVE_ACK", "no answer to the KEEPALIVE")
                }
            } else {
                self.outcomes["R-7.12-1"] = .skip("the client does not negotiate keepalive")
            }
            let sentMessages = self.lastReceivedSeq > 0
            for id in ["R-7.3-2", "R-7.3-1", "R-7.4-2"] where self.outcomes[id] == nil {
                self.outcomes[id] = sentMessages ? .pass : .skip("the client sent no MESSAGE")
            }
            for id in ["R-4.9-2", "R-4.7-2"] where self.faults[id] == nil { self.outcomes[id] = .pass }
        case .requestDelay:
            if self.outcomes["R-8.2-2"] == nil { self.outcomes["R-8.2-2"] = .skip("the client sent no REQUEST") }
        case .noFeatures:
            if self.faults["R-3-9"] == nil { self.outcomes["R-3-9"] = self.lastReceivedSeq > 0 ? .pass : .skip("the client sent no MESSAGE") }
        case .smallLimit:
            if self.faults["R-4.5-2"] == nil { self.outcomes["R-4.5-2"] = self.lastReceivedSeq > 0 ? .pass : .skip("the client sent no MESSAGE") }
        case .redirect:
            if self.outcomes["R-8.2-1"] == nil { self.outcomes["R-8.2-1"] = .pass }
        case .secret:
            if self.outcomes["R-5.1-5"] == nil { self.outcomes["R-5.1-5"] = self.lastReceivedSeq > 0 ? .pass : .skip("the client sent no MESSAGE") }
        case .refusal, .wrongAuthDone, .wrongServerProof:
            break
        }
    }

    /// The items of interval streams that are due, and the final answers of those that end.
    private mutating func dueItems() -> [Frame] {
        var frames: [Frame] = []
        let now = ContinuousClock.now
        for id in self.streams.keys.sorted() {
            guard var s = self.streams[id], s.due <= now else { continue }
            var item = Parley_Echo_V1_CountItem()
            item.index = s.sent
            item.line = "line \(s.sent + 1) of \(s.count)"
            frames.append(self.reply(.streamItem, id, Parley_Echo_V1_CountItem.protoMessageName, item.parleyPayload()))
            s.sent += 1
            s.due = now.advanced(by: s.interval)
            if s.sent == s.count {
                var done = Parley_Echo_V1_CountDone()
                done.sent = s.sent
                frames.append(self.reply(.response, id, Parley_Echo_V1_CountDone.protoMessageName, done.parleyPayload()))
                self.streams[id] = nil
            } else {
                self.streams[id] = s
            }
        }
        return frames
    }

    /// Answers requests as the echo service does.
    private mutating func answer(_ messages: [WireMessage]) async {
        var frames: [Frame] = []
        for m in messages {
            frames += self.answers(to: m)
            if self.scenario == .demanding { frames.append(self.ignorable()) }
        }
        if !frames.isEmpty { await self.send(frames) }
    }

    private mutating func reply(_ kind: MessageKind, _ id: UInt64, _ type: String, _ payload: ByteBuffer, data: ByteBuffer? = nil) -> Frame {
        defer { self.nextSeq += 1 }
        return WireMessage(header: MessageHeader(seq: self.nextSeq, ack: self.lastReceivedSeq, id: id, kind: kind, type: type), payload: payload, data: data)
            .frame(allocator: ByteBufferAllocator())
    }

    private mutating func error(_ id: UInt64, _ code: ParleyError.Code, _ text: String) -> Frame {
        var status = Parley_V1_Status()
        status.code = code.rawValue
        status.message = text
        return self.reply(.error, id, Parley_V1_Status.protoMessageName, status.parleyPayload())
    }

    private mutating func answers(to m: WireMessage) -> [Frame] {
        let h = m.header
        switch (h.kind, h.type) {
        case (.request, Parley_Echo_V1_Ping.protoMessageName):
            guard let ping = try? Parley_Echo_V1_Ping(parleyPayload: m.payload) else { return [self.error(h.id, .malformedPayload, "bad Ping")] }
            var pong = Parley_Echo_V1_Pong()
            pong.sequence = ping.sequence
            pong.serverName = "parley-conform"
            return [self.reply(.response, h.id, Parley_Echo_V1_Pong.protoMessageName, pong.parleyPayload())]
        case (.oneWay, Parley_Echo_V1_Ping.protoMessageName):
            guard let ping = try? Parley_Echo_V1_Ping(parleyPayload: m.payload) else { return [] }
            var pong = Parley_Echo_V1_Pong()
            pong.sequence = ping.sequence
            pong.serverName = "parley-conform"
            return [self.reply(.oneWay, 0, Parley_Echo_V1_Pong.protoMessageName, pong.parleyPayload())]
        case (.request, Parley_Echo_V1_Echo.protoMessageName):
            guard let echo = try? Parley_Echo_V1_Echo(parleyPayload: m.payload) else { return [self.error(h.id, .malformedPayload, "bad Echo")] }
            var reply = Parley_Echo_V1_EchoReply()
            reply.payload = echo.payload
            reply.text = echo.text
            return [self.reply(.response, h.id, Parley_Echo_V1_EchoReply.protoMessageName, reply.parleyPayload(), data: self.features.contains(.dataSegment) ? m.data : nil)]
        case (.request, Parley_Echo_V1_Count.protoMessageName):
            guard let count = try? Parley_Echo_V1_Count(parleyPayload: m.payload) else { return [self.error(h.id, .malformedPayload, "bad Count")] }
            guard self.features.contains(.streams) else {
                return [self.error(h.id, .invalidArgument, "cannot send STREAM_ITEM: the streams feature was not negotiated")]
            }
            if count.intervalMs > 0 && count.count > 0 {
                let interval = Duration.milliseconds(Int64(count.intervalMs))
                self.streams[h.id] = (0, min(count.count, 1000), interval, ContinuousClock.now.advanced(by: interval))
                return []
            }
            var frames: [Frame] = []
            for i in 0..<min(count.count, 1000) {
                var item = Parley_Echo_V1_CountItem()
                item.index = i
                item.line = "line \(i + 1) of \(count.count)"
                frames.append(self.reply(.streamItem, h.id, Parley_Echo_V1_CountItem.protoMessageName, item.parleyPayload()))
            }
            var done = Parley_Echo_V1_CountDone()
            done.sent = min(count.count, 1000)
            frames.append(self.reply(.response, h.id, Parley_Echo_V1_CountDone.protoMessageName, done.parleyPayload()))
            return frames
        case (.request, Parley_Echo_V1_Sleep.protoMessageName):
            // Answered at once (a test server need not sleep), with the delay asked for.
            var slept = Parley_Echo_V1_Slept()
            slept.delayMs = (try? Parley_Echo_V1_Sleep(parleyPayload: m.payload))?.delayMs ?? 0
            return [self.reply(.response, h.id, Parley_Echo_V1_Slept.protoMessageName, slept.parleyPayload())]
        case (.request, _):
            return [self.error(h.id, .unknownMessageType, "no handler for request type \"\(h.type)\"")]
        case (.cancel, _):
            // The stream stops; its final answer says so (the requester discards it).
            guard let s = self.streams.removeValue(forKey: h.id) else { return [] }
            var done = Parley_Echo_V1_CountDone()
            done.sent = s.sent
            done.cancelled = true
            return [self.reply(.response, h.id, Parley_Echo_V1_CountDone.protoMessageName, done.parleyPayload())]
        default:
            return []
        }
    }
}
