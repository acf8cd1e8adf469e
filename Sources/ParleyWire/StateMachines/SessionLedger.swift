import NIOCore

/// The numbering, acknowledgement and replay of one side of a lossless session (feature bit 9;
/// docs/protocol.md, "Lossless sessions").
///
/// It outlives connections: every MESSAGE this side sends is appended here (numbered 1, 2, 3,
/// ... for the whole session, not per connection) and kept until the peer's `ack` covers it;
/// the connection that is current transmits what it has not transmitted yet, in `seq` order;
/// after a reconnect, transmission restarts after the last `seq` the peer says it received.
/// Inbound, it checks that `seq`s arrive without gaps or repeats and that `ack`s only grow and
/// only cover what was transmitted.
///
/// Invariants: `kept` holds exactly the messages `peerAck + 1 ..< nextSeq`, in order;
/// `peerAck <= transmittedSeq <= everTransmittedSeq < nextSeq`; no clock, channel or
/// randomness inside.
public struct SessionLedger: Sendable {
    /// How much unacknowledged data a side keeps before its senders wait.
    public struct Bounds: Sendable, Hashable {
        public var maxBytes: Int
        public var maxMessages: Int
        public init(maxBytes: Int = 8 << 20, maxMessages: Int = 4096) {
            self.maxBytes = maxBytes
            self.maxMessages = maxMessages
        }
    }

    public enum Reception: Equatable, Sendable {
        /// In order: hand it to the application.
        case deliver
        /// The peer broke the rules: fail the connection with this error.
        case violation(ParleyError)
    }

    /// The `seq` of the next message appended.
    public private(set) var nextSeq: UInt64 = 1
    /// The highest `seq` received from the peer: every message up to it was delivered once.
    public private(set) var lastReceivedSeq: UInt64 = 0
    /// The highest of this side's `seq`s the peer has acknowledged.
    public private(set) var peerAck: UInt64 = 0
    /// The highest `seq` transmitted on the current connection (after a resume: the peer's
    /// last received, so that transmission restarts right after it).
    public private(set) var transmittedSeq: UInt64 = 0
    /// The highest `seq` ever transmitted, on any connection.
    public private(set) var everTransmittedSeq: UInt64 = 0
    /// The `ack` carried by the last frame transmitted (MESSAGE or ACK).
    public private(set) var ackSent: UInt64 = 0
    /// The kept messages, each marked if it was appended without waiting for room.
    private var kept = CircularBuffer<(message: WireMessage, unwaited: Bool)>()
    /// Bytes of the kept messages (header, type name, payload and data).
    public private(set) var keptBytes = 0
    /// Kept messages appended without waiting for room (answers, CANCELs, one-way replies
    /// sent at once), and their bytes: what `overrun` counts.
    public private(set) var keptUnwaited = 0
    public private(set) var keptUnwaitedBytes = 0

    public init() {}

    /// Messages kept for a possible replay.
    public var keptCount: Int { self.kept.count }

    /// True when the kept messages reach either bound: senders that can wait should.
    public func isFull(_ bounds: Bounds) -> Bool {
        self.kept.count >= bounds.maxMessages || self.keptBytes >= bounds.maxBytes
    }

    /// Most requests either side of a lossless session keeps outstanding ([R-5.2-13]).
    public static let maxOutstandingRequests = 8192

    /// Most messages appended without waiting for room (answers, CANCELs, one-way replies
    /// sent at once: `append(_:unwaited:)`) a side keeps for a peer that goes on sending
    /// ([R-5.2-13]): 16,384, or four times the count bound if that is larger. A peer that
    /// acknowledges what it receives and keeps to `maxOutstandingRequests` leaves at most
    /// that many unread answers plus its ack delay, well under it. What this side sends by
    /// waiting for room is not counted: the peer does not control how much of it there is.
    public static func unacknowledgedLimit(_ bounds: Bounds) -> Int {
        max(16_384, bounds.maxMessages.multipliedReportingOverflow(by: 4).overflow ? .max : 4 * bounds.maxMessages)
    }

    /// Most bytes of messages appended without waiting a side keeps for a peer that goes on
    /// sending ([R-5.2-13]): 1 GiB, or 128 times the byte bound if that is larger. The count alone let a peer that never
    /// acknowledges have 16,384 answers of up to a frame each kept (the block server's 8 MiB
    /// reads: 128 GiB); a peer that acknowledges leaves unacknowledged only the answers on
    /// their way to it, which the writability pause of the answering side holds to the
    /// answers of the handlers running then.
    public static func unacknowledgedByteLimit(_ bounds: Bounds) -> Int {
        // Saturating: the bounds are public and `parley send --replay-bytes` takes any Int.
        max(1 << 30, bounds.maxBytes.multipliedReportingOverflow(by: 128).overflow ? .max : 128 * bounds.maxBytes)
    }

    /// When a message arrives: the error that ends the session if this side keeps more
    /// messages appended without waiting (answers, one-way replies sent at once) for the peer
    /// than `unacknowledgedLimit`, or bytes of them than `unacknowledgedByteLimit` (a peer
    /// that sends requests, or one-way messages a handler answers at once, and never
    /// acknowledges would otherwise make it keep every answer); nil otherwise.
    public func overrun(_ bounds: Bounds) -> ParleyError? {
        let limit = Self.unacknowledgedLimit(bounds)
        let byteLimit = Self.unacknowledgedByteLimit(bounds)
        guard self.keptUnwaited > limit || self.keptUnwaitedBytes > byteLimit else { return nil }
        return ParleyError(
            code: .protocolViolation,
            message: "the peer goes on sending but has left \(self.keptUnwaited) answers unacknowledged (\(self.keptUnwaitedBytes) bytes), "
                + "more than the \(limit) answers or \(byteLimit) bytes kept for it: "
                + "a lossless peer acknowledges what it receives and keeps at most \(Self.maxOutstandingRequests) requests outstanding"
        )
    }

    /// True when messages were received that no transmitted frame has acknowledged yet.
    public var needsAck: Bool { self.lastReceivedSeq > self.ackSent }

    /// Unacknowledged received messages: how many arrived since the last `ack` sent.
    public var unacknowledgedReceived: UInt64 { self.lastReceivedSeq - self.ackSent }

    /// True when appended messages wait for transmission.
    public var hasUntransmitted: Bool { self.transmittedSeq &+ 1 < self.nextSeq }

    /// Numbers a message and keeps it; returns its `seq`. Its `ack` is set when transmitted.
    /// `unwaited`: it was sent without waiting for room (an answer, a CANCEL, a one-way reply
    /// sent at once), which is what `overrun` counts.
    @discardableResult
    public mutating func append(_ message: WireMessage, unwaited: Bool = false) -> UInt64 {
        var message = message
        let seq = self.nextSeq
        message.header.seq = seq
        self.kept.append((message, unwaited))
        let size = Self.size(message)
        self.keptBytes += size
        if unwaited {
            self.keptUnwaited += 1
            self.keptUnwaitedBytes += size
        }
        self.nextSeq &+= 1
        return seq
    }

    /// The next message to transmit on the current connection, stamped with the current
    /// `ack`; nil when everything appended has been transmitted.
    public mutating func nextToTransmit() -> WireMessage? {
        guard self.hasUntransmitted else { return nil }
        let seq = self.transmittedSeq &+ 1
        // kept[0] has seq peerAck + 1, and peerAck <= transmittedSeq.
        var message = self.kept[self.kept.index(self.kept.startIndex, offsetBy: Int(seq - self.peerAck - 1))].message
        message.header.ack = self.lastReceivedSeq
        self.transmittedSeq = seq
        self.everTransmittedSeq = max(self.everTransmittedSeq, seq)
        self.ackSent = self.lastReceivedSeq
        return message
    }

    /// An ACK frame is being transmitted: returns the `ack` it carries.
    public mutating func ackTransmitted() -> UInt64 {
        self.ackSent = self.lastReceivedSeq
        return self.lastReceivedSeq
    }

    /// A MESSAGE arrived: checks its `seq` (exactly one more than the last) and its `ack`.
    public mutating func received(_ header: MessageHeader) -> Reception {
        guard header.seq == self.lastReceivedSeq &+ 1 else {
            let what = header.seq <= self.lastReceivedSeq ? "was already received" : "leaves a gap"
            return .violation(ParleyError(
                code: .protocolViolation,
                message: "MESSAGE seq \(header.seq) \(what): expected \(self.lastReceivedSeq &+ 1) (lossless session)"
            ))
        }
        do {
            try self.acknowledge(header.ack)
        } catch {
            return .violation(error)
        }
        self.lastReceivedSeq = header.seq
        return .deliver
    }

    /// The peer acknowledged every message up to `ack`: they are dropped. Returns true if any
    /// was (room may have freed up).
    @discardableResult
    public mutating func acknowledge(_ ack: UInt64) throws(ParleyError) -> Bool {
        guard ack >= self.peerAck else {
            throw ParleyError(code: .protocolViolation, message: "ack \(ack) is below the earlier ack \(self.peerAck): acks never go back")
        }
        guard ack <= self.everTransmittedSeq else {
            throw ParleyError(code: .protocolViolation, message: "ack \(ack) acknowledges a message never sent (the last sent is \(self.everTransmittedSeq))")
        }
        guard ack > self.peerAck else { return false }
        for _ in 0..<(ack - self.peerAck) {
            let dropped = self.kept.removeFirst()
            let size = Self.size(dropped.message)
            self.keptBytes -= size
            if dropped.unwaited {
                self.keptUnwaited -= 1
                self.keptUnwaitedBytes -= size
            }
        }
        self.peerAck = ack
        // A new connection may still be transmitting what the peer now acknowledges.
        self.transmittedSeq = max(self.transmittedSeq, ack)
        return true
    }

    /// A new connection of the session: the peer says it received everything up to
    /// `peerLastReceived`. Acknowledges that much and restarts transmission after it.
    ///
    /// A value below an `ack` the peer already sent comes from a reconnect race (an attempt
    /// that took its snapshot before a racing attempt delivered more): the peer has what it
    /// acknowledged, so transmission restarts after the acknowledged `seq`. A value above
    /// what was ever sent is a `protocolViolation`.
    public mutating func resume(peerLastReceived: UInt64) throws(ParleyError) {
        let resumeAfter = max(peerLastReceived, self.peerAck)
        try self.acknowledge(resumeAfter)
        self.transmittedSeq = resumeAfter
    }

    /// What the session held when it was reset, oldest first.
    public struct Abandoned: Sendable {
        /// Transmitted at least once and not acknowledged: the peer may have received them.
        public var transmitted: [WireMessage]
        /// Never transmitted: the peer cannot have them.
        public var untransmitted: [WireMessage]
    }

    /// The session is gone on the peer's side (SESSION_RESET): returns the kept messages the
    /// peer may have received (transmitted) and those it certainly did not (never transmitted),
    /// and starts a new numbering (the next session's first `seq` is 1).
    public mutating func reset() -> Abandoned {
        var abandoned = Abandoned(transmitted: [], untransmitted: [])
        for (message, _) in self.kept {
            if message.header.seq <= self.everTransmittedSeq {
                abandoned.transmitted.append(message)
            } else {
                abandoned.untransmitted.append(message)
            }
        }
        self = SessionLedger()
        return abandoned
    }

    static func size(_ message: WireMessage) -> Int {
        message.payload.readableBytes + (message.data?.readableBytes ?? 0) + MessageHeader.fixedSize + message.header.type.utf8.count
    }
}
