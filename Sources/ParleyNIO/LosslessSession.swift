import NIOConcurrencyHelpers
import NIOCore
import ParleyWire

/// The part of a lossless session (feature bit 9) that outlives its connections: the ledger
/// of numbered messages kept for replay, which connection ("link") is current, and the
/// senders waiting for room.
///
/// Every MESSAGE of the session goes through `submit`: it is numbered and kept at once, and
/// the current link, if any, is asked to transmit what it has not transmitted yet, in `seq`
/// order (so that messages submitted from several threads still leave in numbering order).
/// A link that is no longer current transmits and delivers nothing. Thread-safe: links may
/// run on different event loops (a server's reconnects are accepted on any of its loops).
public final class LosslessSession: Sendable {
    public let bounds: SessionLedger.Bounds
    private let state: NIOLockedValueBox<State>

    /// Identifies one connection of the session.
    public struct LinkID: Hashable, Sendable {
        let value: UInt64
    }

    struct State {
        var token: [UInt8]
        var serverNonce: UInt64
        var ledger = SessionLedger()
        var current: LinkID?
        var currentOutlet: ParleyConnectionHandler.Outlet?
        var nextLink: UInt64 = 1
        /// The highest connect_seq accepted (server) or sent (client).
        var connectSeq: UInt64 = 0
        /// The connect_seq of the link attached last: an older attempt may not attach after it.
        var attachedConnectSeq: UInt64 = 0
        /// Server side: a reconnect was accepted and its connection is being set up.
        var resuming = false
        var pumpScheduled = false
        var roomWaiters: [UInt64: CheckedContinuation<Void, any Error>] = [:]
        var nextWaiter: UInt64 = 0
        var ended: ParleyError?
        var duplicatesDropped = 0
    }

    public init(token: [UInt8], serverNonce: UInt64, bounds: SessionLedger.Bounds) {
        self.bounds = bounds
        self.state = NIOLockedValueBox(State(token: token, serverNonce: serverNonce))
    }

    // MARK: - The async layer's side

    /// Numbers and keeps a message sent without waiting for room (an answer, a CANCEL, a
    /// one-way reply sent at once: what [R-5.2-13]'s limit counts), and has the current link
    /// transmit it.
    public func submit(_ message: WireMessage) {
        self.enqueue(message, unwaited: true)?.pump()
    }

    /// Numbers and keeps a message; returns the outlet to `pump()` (after releasing any lock
    /// the caller holds), if the current link is not already about to transmit.
    public func enqueue(_ message: WireMessage, unwaited: Bool = false) -> ParleyConnectionHandler.Outlet? {
        self.state.withLockedValue { s -> ParleyConnectionHandler.Outlet? in
            s.ledger.append(message, unwaited: unwaited)
            guard let outlet = s.currentOutlet, !s.pumpScheduled, s.ended == nil else { return nil }
            s.pumpScheduled = true
            return outlet
        }
    }

    /// True if a message may be enqueued now (`waitForRoom` would not wait), and the session
    /// has not ended.
    public var hasRoom: Bool {
        self.state.withLockedValue { s in s.ended == nil && !s.ledger.isFull(self.bounds) }
    }

    /// Returns once the kept messages are below the bounds (at once if they are); throws the
    /// reason if the session ends meanwhile.
    public func waitForRoom() async throws {
        let full = try self.state.withLockedValue { s -> Result<Bool, ParleyError> in
            if let ended = s.ended { return .failure(ended) }
            return .success(s.ledger.isFull(self.bounds))
        }.get()
        guard full else { return }
        let id = self.state.withLockedValue { s -> UInt64 in
            s.nextWaiter += 1
            return s.nextWaiter
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
                let outcome = self.state.withLockedValue { s -> Result<Void, any Error>? in
                    if let ended = s.ended { return .failure(ended) }
                    if Task.isCancelled { return .failure(CancellationError()) }
                    if !s.ledger.isFull(self.bounds) { return .success(()) }
                    s.roomWaiters[id] = c
                    return nil
                }
                if let outcome { c.resume(with: outcome) }
            }
        } onCancel: {
            self.state.withLockedValue { $0.roomWaiters.removeValue(forKey: id) }?.resume(throwing: CancellationError())
        }
    }

    /// The link that is current, if any: where control frames go.
    public var currentOutlet: ParleyConnectionHandler.Outlet? { self.state.withLockedValue { $0.currentOutlet } }

    /// Messages kept for replay, and their bytes.
    public var kept: (count: Int, bytes: Int) { self.state.withLockedValue { ($0.ledger.keptCount, $0.ledger.keptBytes) } }

    /// Messages received again after a reconnect race, and dropped.
    public var duplicatesDropped: Int { self.state.withLockedValue { $0.duplicatesDropped } }

    /// The highest seq received: what a reconnect tells the server.
    public var lastReceivedSeq: UInt64 { self.state.withLockedValue { $0.ledger.lastReceivedSeq } }


    /// Client side: the offer of the next reconnect attempt. The current link, if any, stops
    /// delivering from now on: the server resends everything after the `seq` this offer
    /// names, so nothing the old link still delivers would be new.
    public func nextResumeOffer() -> SessionResumeOffer {
        self.state.withLockedValue { s in
            s.current = nil
            s.currentOutlet = nil
            s.pumpScheduled = false
            s.connectSeq = max(s.connectSeq, s.attachedConnectSeq) + 1
            return SessionResumeOffer(token: s.token, serverNonce: s.serverNonce, lastReceivedSeq: s.ledger.lastReceivedSeq, connectSeq: s.connectSeq)
        }
    }

    /// Server side: a SESSION_RECONNECT with `connectSeq` and the client's `peerLastReceived`
    /// asks for this session. Refuses an attempt not newer than one already accepted, and a
    /// `peerLastReceived` above what was ever sent; otherwise detaches the current link (it
    /// delivers nothing more), marks the session as resuming (so that it is not forgotten
    /// meanwhile) and returns the last seq received, for SESSION_RESUMED, and the link replaced.
    public func beginResume(connectSeq: UInt64, peerLastReceived: UInt64) throws(ParleyError) -> (lastReceivedSeq: UInt64, replaced: ParleyConnectionHandler.Outlet?) {
        try self.state.withLockedValue { s -> Result<(UInt64, ParleyConnectionHandler.Outlet?), ParleyError> in
            if let ended = s.ended { return .failure(ended) }
            guard connectSeq > s.connectSeq else {
                return .failure(ParleyError(code: .sessionSuperseded, message: "reconnect attempt \(connectSeq) is not newer than attempt \(s.connectSeq), already accepted"))
            }
            guard peerLastReceived <= s.ledger.everTransmittedSeq else {
                return .failure(ParleyError(
                    code: .protocolViolation,
                    message: "the client says it received up to seq \(peerLastReceived), but only \(s.ledger.everTransmittedSeq) were sent"
                ))
            }
            s.connectSeq = connectSeq
            s.resuming = true
            let replaced = s.currentOutlet
            s.current = nil
            s.currentOutlet = nil
            s.pumpScheduled = false
            return .success((s.ledger.lastReceivedSeq, replaced))
        }.get()
    }

    /// The exchange of reconnect attempt `connectSeq` is done: `outlet`'s link becomes
    /// current, and transmission restarts after `peerLastReceived`. Returns the new link's id
    /// and the link it replaced, if any (close it). Refuses (`sessionSuperseded`) an attempt
    /// older than one attached already: the highest connect_seq wins.
    public func attach(
        _ outlet: ParleyConnectionHandler.Outlet, peerLastReceived: UInt64, connectSeq: UInt64
    ) throws(ParleyError) -> (link: LinkID, replaced: ParleyConnectionHandler.Outlet?) {
        let (link, replaced, waiters) = try self.state.withLockedValue { s -> Result<(LinkID, ParleyConnectionHandler.Outlet?, [CheckedContinuation<Void, any Error>]), ParleyError> in
            if let ended = s.ended { return .failure(ended) }
            guard connectSeq >= s.attachedConnectSeq else {
                return .failure(ParleyError(code: .sessionSuperseded, message: "reconnect attempt \(connectSeq) came after attempt \(s.attachedConnectSeq) took over"))
            }
            do throws(ParleyError) {
                try s.ledger.resume(peerLastReceived: peerLastReceived)
            } catch {
                return .failure(error)
            }
            let link = LinkID(value: s.nextLink)
            s.nextLink += 1
            let replaced = s.currentOutlet
            s.current = link
            s.currentOutlet = outlet
            s.attachedConnectSeq = connectSeq
            s.resuming = false
            s.pumpScheduled = false
            return .success((link, replaced, self.takeWaitersIfRoom(&s)))
        }.get()
        waiters.forEach { $0.resume() }
        return (link, replaced)
    }

    /// Server side: the session waits for its client: no link, not ended, no reconnect in
    /// progress.
    public var isDetached: Bool { self.state.withLockedValue { $0.current == nil && !$0.resuming && $0.ended == nil } }

    /// The server did not have the session: empties the ledger and returns what it held;
    /// the new session the server started has `token`.
    public func reset(token: [UInt8], serverNonce: UInt64) -> SessionLedger.Abandoned {
        self.state.withLockedValue { s in
            s.connectSeq = 0
            s.token = token
            s.serverNonce = serverNonce
            return s.ledger.reset()
        }
    }

    public var token: [UInt8] { self.state.withLockedValue { $0.token } }
    /// Client side: the connect_seq of the attempt whose link was attached last (0: none yet).
    public var attachedConnectSeq: UInt64 { self.state.withLockedValue { $0.attachedConnectSeq } }
    public var serverNonce: UInt64 { self.state.withLockedValue { $0.serverNonce } }

    /// The session is over: waiting senders fail with `reason`, and the ledger is emptied
    /// once the current link has transmitted what was submitted. Returns the current link's
    /// outlet: send it `.close` (the handler transmits what is left, then CLOSE).
    @discardableResult
    public func end(_ reason: ParleyError) -> ParleyConnectionHandler.Outlet? {
        self.end(reason, onlyIfDetached: false).outlet
    }

    /// Server side: ends the session only if it is still waiting for its client (no link,
    /// no reconnect in progress), checked and done in one step: a reconnect that begins
    /// (`beginResume`) at the moment its retention time runs out either keeps the session
    /// or finds it ended, never a session ended under its feet. Returns false if the
    /// session was not waiting (resumed, resuming or ended already).
    public func endIfDetached(_ reason: ParleyError) -> Bool {
        self.end(reason, onlyIfDetached: true).ended
    }

    private func end(_ reason: ParleyError, onlyIfDetached: Bool) -> (ended: Bool, outlet: ParleyConnectionHandler.Outlet?) {
        let (ended, waiters, outlet) = self.state.withLockedValue { s -> (Bool, [CheckedContinuation<Void, any Error>], ParleyConnectionHandler.Outlet?) in
            guard s.ended == nil else { return (false, [], nil) }
            if onlyIfDetached, s.current != nil || s.resuming { return (false, [], nil) }
            s.ended = reason
            s.resuming = false
            defer { s.roomWaiters = [:] }
            return (true, Array(s.roomWaiters.values), s.currentOutlet)
        }
        waiters.forEach { $0.resume(throwing: reason) }
        // (`end` releases when there is no link even if the session had ended already.)
        if outlet == nil, ended || !onlyIfDetached { self.release() }
        return (ended, outlet)
    }

    /// Drops what the ended session still holds (its last link has closed).
    func release() {
        self.state.withLockedValue { s in
            guard s.ended != nil else { return }
            s.current = nil
            s.currentOutlet = nil
            _ = s.ledger.reset()
        }
    }

    public var isEnded: Bool { self.state.withLockedValue { $0.ended != nil } }

    // MARK: - The links' side (on their event loops)

    /// Moves what `link` has to transmit into `messages`; false if the link is not current.
    func takeForTransmission(_ link: LinkID, into messages: inout [WireMessage]) -> Bool {
        // An ended session's current link still transmits what was submitted before the end.
        self.state.withLockedValue { s in
            s.pumpScheduled = false
            guard s.current == link else { return false }
            while let next = s.ledger.nextToTransmit() { messages.append(next) }
            return true
        }
    }

    enum Reception {
        case deliver, duplicate, stale
        case violation(ParleyError)
    }

    /// A MESSAGE arrived on `link`.
    func received(_ header: MessageHeader, on link: LinkID) -> Reception {
        let (reception, waiters) = self.state.withLockedValue { s -> (Reception, [CheckedContinuation<Void, any Error>]) in
            guard s.current == link else { return (.stale, []) }
            if header.seq <= s.ledger.lastReceivedSeq, header.seq > 0 {
                // Sent again after a reconnect race (docs/protocol.md 5.2): already delivered.
                s.duplicatesDropped += 1
                do throws(ParleyError) {
                    try s.ledger.acknowledge(max(header.ack, s.ledger.peerAck))
                } catch {
                    return (.violation(error), [])
                }
                return (.duplicate, self.takeWaitersIfRoom(&s))
            }
            switch s.ledger.received(header) {
            case .deliver:
                if let error = s.ledger.overrun(self.bounds) { return (.violation(error), []) }
                return (.deliver, self.takeWaitersIfRoom(&s))
            case .violation(let error): return (.violation(error), [])
            }
        }
        waiters.forEach { $0.resume() }
        return reception
    }

    /// An ACK frame arrived on `link`.
    func acknowledged(_ ack: UInt64, on link: LinkID) throws(ParleyError) {
        let waiters = try self.state.withLockedValue { s -> Result<[CheckedContinuation<Void, any Error>], ParleyError> in
            guard s.current == link else { return .success([]) }
            do throws(ParleyError) {
                try s.ledger.acknowledge(ack)
            } catch {
                return .failure(error)
            }
            return .success(self.takeWaitersIfRoom(&s))
        }.get()
        waiters.forEach { $0.resume() }
    }

    /// The ack `link` should send alone (nothing it transmitted carried it), if any.
    func ackToSend(_ link: LinkID) -> UInt64? {
        self.state.withLockedValue { s in
            guard s.current == link, s.ledger.needsAck else { return nil }
            return s.ledger.ackTransmitted()
        }
    }

    /// How many received messages no transmitted frame acknowledged yet.
    func unacknowledgedReceived(_ link: LinkID) -> UInt64 {
        self.state.withLockedValue { s in s.current == link ? s.ledger.unacknowledgedReceived : 0 }
    }

    /// `link` closed: returns true if it was the current one (the session is now detached).
    func detach(_ link: LinkID) -> Bool {
        let (current, ended) = self.state.withLockedValue { s -> (Bool, Bool) in
            guard s.current == link else { return (false, s.ended != nil) }
            s.current = nil
            s.currentOutlet = nil
            s.pumpScheduled = false
            return (true, s.ended != nil)
        }
        if ended { self.release() }
        return current
    }

    private func takeWaitersIfRoom(_ s: inout State) -> [CheckedContinuation<Void, any Error>] {
        guard !s.roomWaiters.isEmpty, !s.ledger.isFull(self.bounds) else { return [] }
        defer { s.roomWaiters = [:] }
        return Array(s.roomWaiters.values)
    }
}
