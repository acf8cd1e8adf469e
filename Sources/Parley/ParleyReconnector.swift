import Logging
import NIOConcurrencyHelpers
import NIOCore
import ParleyNIO
import ParleyWire

/// The client side of a lossless session's reconnects (docs/protocol.md 5.2): when the link
/// breaks, it dials again (the first attempt at once, then with exponential back-off and
/// jitter), presents the session in SESSION_RECONNECT and attaches the new connection, or,
/// after SESSION_RESET, sorts what the old session held (`ParleyConnection.sessionWasReset`).
/// It gives up after `reconnectTimeout`, or at once on an error no retry can mend
/// (authentication, a server that no longer offers sessions).
final class Reconnector: Sendable {
    struct Context: Sendable {
        var connection: ParleyConnection
        var session: LosslessSession
        var address: ParleyAddress
        var configuration: ParleyClient.Configuration
        var ident: Parley_V1_ClientIdent
        var nucleus: ParleyClient.Nucleus
        var logger: Logger
    }

    private struct State {
        var context: Context?
        var running = false
        /// The link broke again while a reconnect was finishing: go round once more.
        var again = false
    }

    private let state = NIOLockedValueBox(State())

    func start(_ context: Context) {
        self.state.withLockedValue { $0.context = context }
    }

    /// The connection ended: no more reconnects, and the connection is let go.
    func stop() {
        self.state.withLockedValue { $0.context = nil }
    }

    func linkLost() {
        let context = self.state.withLockedValue { s -> Context? in
            guard let context = s.context else { return nil }
            if s.running {
                s.again = true
                return nil
            }
            s.running = true
            return context
        }
        guard let context else { return }
        Task { await self.run(context) }
    }

    private func run(_ c: Context) async {
        while true {
            await self.reconnect(c)
            let again = self.state.withLockedValue { s -> Bool in
                if s.again, !c.session.isEnded, c.session.currentOutlet == nil {
                    s.again = false
                    return true
                }
                s.running = false
                s.again = false
                return false
            }
            if !again { return }
        }
    }

    /// How long one attempt (connection, TLS or WebSocket set-up, and handshake) may take.
    static let attemptTimeout = Duration.seconds(5)

    private func reconnect(_ c: Context) async {
        guard let options = c.configuration.lossless else { return }
        // No attempt and no back-off runs past this: the connect and the handshake of the
        // last attempt are cut short by it too.
        let giveUp = ContinuousClock.now + options.reconnectTimeout
        var attempt = 0
        var lastError = ParleyError(code: .connectionClosed, message: "the link broke")
        while !c.session.isEnded {
            if attempt > 0 {
                let delay = Self.backoff(attempt: attempt, base: options.backoffBase, max: options.backoffMax)
                try? await Task.sleep(until: min(ContinuousClock.now + delay, giveUp))
            }
            // After a failed attempt (every offer cleared the current link): a link attached
            // meanwhile by a racing attempt is the reconnect's success.
            if attempt > 0, c.session.currentOutlet != nil { return }
            if ContinuousClock.now >= giveUp {
                c.connection.finish(ParleyError(
                    code: .connectionClosed,
                    message: "could not reconnect to \(c.address) within \(options.reconnectTimeout) (\(attempt) attempts); last error: \(lastError.message)",
                    cause: lastError
                ))
                return
            }
            attempt += 1
            do {
                try await self.attemptAll(c, count: max(1, options.raceAttempts), deadline: min(ContinuousClock.now + Self.attemptTimeout, giveUp))
                return
            } catch let error as ParleyError {
                if Self.isFatal(error) {
                    c.logger.error("cannot resume the session", metadata: ["error": "\(error)"])
                    c.connection.finish(error)
                    return
                }
                lastError = error
                c.logger.debug("reconnect attempt failed", metadata: ["attempt": "\(attempt)", "error": "\(error.message)"])
            } catch {
                lastError = ParleyError(code: .connectFailed, message: "\(error)", cause: error)
            }
        }
    }

    /// Errors a new attempt cannot mend.
    static func isFatal(_ error: ParleyError) -> Bool {
        [.authenticationFailed, .handshakeTampered, .permissionDenied, .clientOutOfDate, .missingFeatures, .unsupportedVersion, .sessionReset, .invalidArgument]
            .contains(error.code)
    }

    /// The delay before attempt `attempt` (1 is the first retry): base × 2^(attempt−1), at
    /// most `max`, drawn at random between its half and itself.
    static func backoff(attempt: Int, base: Duration, max: Duration) -> Duration {
        let exponent = Swift.min(attempt - 1, 30)
        let full = Swift.min(Double(base.nanoseconds) * Double(1 << exponent), Double(max.nanoseconds))
        return .nanoseconds(Int64(full * Double.random(in: 0.5...1)))
    }

    /// One reconnect: `count` connections dialled at once (1 outside race tests); succeeds
    /// when one of them has attached.
    private func attemptAll(_ c: Context, count: Int, deadline: ContinuousClock.Instant) async throws {
        if count == 1 {
            let offer = c.session.nextResumeOffer()
            try await self.attempt(c, offer: offer, round: offer.connectSeq, deadline: deadline)
            return
        }
        let offers = (0..<count).map { _ in c.session.nextResumeOffer() }
        let round = offers[0].connectSeq
        let errors = await withTaskGroup(of: ParleyError?.self) { group in
            for offer in offers {
                group.addTask {
                    do {
                        try await self.attempt(c, offer: offer, round: round, deadline: deadline)
                        return nil
                    } catch {
                        return error as? ParleyError ?? ParleyError(code: .connectFailed, message: "\(error)")
                    }
                }
            }
            var errors: [ParleyError] = []
            for await result in group { if let result { errors.append(result) } }
            return errors
        }
        if errors.count == count { throw errors.first { Self.isFatal($0) } ?? errors[0] }
    }

    /// One attempt of the reconnect whose first attempt had connect_seq `round`, abandoned
    /// at `deadline`.
    private func attempt(_ c: Context, offer: SessionResumeOffer, round: UInt64, deadline: ContinuousClock.Instant) async throws {
        let configuration = c.configuration
        let machine = ParleyClient.handshake(configuration, address: c.address, ident: c.ident, resume: offer)
        let options = try configuration.limits.pipelineOptions(maxFrameSize: configuration.maxFrameSize)
        let established = ChannelKeyed<EventLoopFuture<Void>>()  // by channel: see ParleyClient.connectOnce
        let initialized = NIOLockedValueBox(false)
        let connection = c.connection
        let session = c.session
        let initializer: ParleyChannelInitializer = { channel in
            channel.eventLoop.makeCompletedFuture {
                let handler = ParleyConnectionHandler(role: .client(machine), eventLoop: channel.eventLoop) { result, outlet -> EstablishedLink in
                    let attached: (link: LosslessSession.LinkID, replaced: ParleyConnectionHandler.Outlet?)
                    switch result.session {
                    case .resumed(_, let peerLastReceived, let connectSeq):
                        attached = try session.attach(outlet, peerLastReceived: peerLastReceived, connectSeq: connectSeq)
                    case .reset(let reason, let token) where !token.isEmpty:
                        // Racing attempts that all find the session gone each get a new one:
                        // the first to arrive resets the client's session and carries on; a
                        // later one must not reset it again (it would report and re-send what
                        // the first had just sent, or, losing to a newer attempt, leave the
                        // session renumbered for a server session it is not attached to).
                        // The attempts' handlers share the connection's event loop, so this
                        // check and the reset cannot interleave with another attempt's.
                        guard session.attachedConnectSeq < round else {
                            // Not sessionSuperseded: this CLOSE ends the new session the
                            // server has just started for this attempt.
                            throw ParleyError(code: .connectionClosed, message: "another attempt of this reconnect already took over the session; the new session is not needed")
                        }
                        attached = try connection.sessionWasReset(reason: reason, token: token, serverNonce: result.serverIdent.serverNonce) { () throws(ParleyError) in
                            try session.attach(outlet, peerLastReceived: 0, connectSeq: offer.connectSeq)
                        }
                    default:
                        throw ParleyError(code: .sessionReset, message: "the server no longer offers lossless sessions: the session cannot continue")
                    }
                    // A racing attempt that attached before this one is done.
                    attached.replaced?.write(.close(ParleyError(code: .sessionSuperseded, message: "a newer connection of this session took over")))
                    // This connection's SERVER_IDENT is a later nucleus: its request delay
                    // starts again, its messages and redirects are the client's (R-8.2-2).
                    ParleyClient.apply(ParleyNucleus(result.serverIdent.nucleus), to: c.nucleus, logger: c.logger)
                    connection.linkUp(outlet)
                    return EstablishedLink(sink: ConnectionEventSink(connection), lossless: (session, attached.link))
                }
                handler.secureCounterStart = configuration.secureCounterStart
                established.set(handler.established, for: channel)
                try ParleyPipeline.configure(channel, options: options, handler: handler)
                // A server that accepts but never answers (stopped, overloaded) must not hold
                // the attempt past its deadline; nor a connect that never completes (closing
                // the channel fails it). Armed and cancelled on the event loop, where the
                // handshake completes: a timer cancelled later (when the waiting task resumed,
                // on a loaded machine after the deadline) closed the link that had just been
                // attached (a fresh-clone CI run lost its new session that way).
                let timer = channel.eventLoop.scheduleTask(in: Self.timeLeft(until: deadline)) { channel.close(promise: nil) }
                handler.established.whenComplete { _ in timer.cancel() }
                initialized.withLockedValue { $0 = true }
            }
        }
        let channel: any Channel
        do {
            // On the connection's own event loop: its handlers and timers stay where they were.
            channel = try await Self.connect(before: deadline, on: connection.eventLoop, unlessInitialized: { initialized.withLockedValue { $0 } }) {
                try await configuration.transport.connect(to: c.address, group: connection.eventLoop, initializer: initializer)
            }
        } catch {
            throw ParleyError(code: .connectFailed, message: "cannot reconnect to \(c.address): \((error as? ParleyError)?.message ?? "\(error)")", cause: error)
        }
        guard let future = established.value(for: channel) else {
            channel.close(promise: nil)
            throw ParleyError(code: .connectFailed, message: "the transport did not set up the channel")
        }
        do {
            try await future.get()
        } catch let error as ParleyError {
            throw error
        } catch {
            throw ParleyError(code: .connectionClosed, message: "\(error)", cause: error)
        }
    }

    static func timeLeft(until deadline: ContinuousClock.Instant) -> TimeAmount {
        .nanoseconds(max(0, (deadline - ContinuousClock.now).nanoseconds))
    }

    /// Runs `connect`, waiting for it at most until `deadline` unless the attempt's channel
    /// initializer has run by then (`initialized`, checked on `eventLoop`, the channel's):
    /// then the timer it armed governs, and ends the connect by closing the channel. Without
    /// this, a transport that runs the initializer only after a set-up of its own (a
    /// WebSocket upgrade, 10 s at most), or a connect that never calls it, would hold an
    /// attempt past its 5 s and a reconnect past its end. Giving up cancels the connect
    /// task; a channel it still brings later is closed.
    static func connect(
        before deadline: ContinuousClock.Instant, on eventLoop: any EventLoop, unlessInitialized initialized: @escaping @Sendable () -> Bool,
        _ connect: @escaping @Sendable () async throws -> any Channel
    ) async throws -> any Channel {
        let waiter = NIOLockedValueBox<CheckedContinuation<any Channel, any Error>?>(nil)
        let take: @Sendable () -> CheckedContinuation<any Channel, any Error>? = { waiter.withLockedValue { w -> CheckedContinuation<any Channel, any Error>? in defer { w = nil }; return w } }
        return try await withCheckedThrowingContinuation { continuation in
            waiter.withLockedValue { $0 = continuation }
            let connecting = Task {
                do {
                    let channel = try await connect()
                    if let waiting = take() { waiting.resume(returning: channel) } else { channel.close(promise: nil) }
                } catch {
                    take()?.resume(throwing: error)
                }
            }
            let timer = eventLoop.scheduleTask(in: Self.timeLeft(until: deadline)) {
                guard !initialized(), let waiting = take() else { return }
                connecting.cancel()
                waiting.resume(throwing: ParleyError(code: .timeout, message: "not connected within the attempt's time (\(Self.attemptTimeout) at most)"))
            }
            Task {
                _ = await connecting.result
                timer.cancel()
            }
        }
    }
}
