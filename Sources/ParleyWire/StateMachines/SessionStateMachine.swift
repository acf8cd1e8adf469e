import NIOCore

/// The established phase of a connection, after SERVER_IDENT (docs/protocol.md, "Session").
///
/// It numbers outbound MESSAGE frames (seq 1, 2, 3, ...), piggybacks the highest seq received
/// (ack), checks that inbound seqs arrive in order, enforces which frames are allowed for the
/// negotiated features and for this side's role, and answers KEEPALIVE.
///
/// Invariants: no clock, channel or randomness inside; the keepalive timestamp is passed in.
/// After a violation or a peer CLOSE, the machine is closed and refuses everything.
public struct SessionStateMachine: Sendable {
    public enum Role: Sendable { case client, server }

    public enum Inbound: Equatable, Sendable {
        case message(WireMessage)
        /// Nucleus fields sent by the server after SERVER_IDENT (client side only).
        case notice(Parley_V1_Nucleus)
        /// Send this KEEPALIVE_ACK.
        case reply(Frame)
        /// Our keepalive came back; the value is the timestamp we sent.
        case keepaliveAck(UInt64)
        /// Lossless sessions: the peer acknowledged every message up to this seq (ACK frame).
        case ack(UInt64)
        /// A DIRECT frame (feature bit 4, enabled on this connection): a request on a server
        /// side, an answer on a client side; segment 0 holds at least its 8-byte id.
        case direct(DirectInbound)
        case ignore
        /// The peer closed the session with this reason.
        case peerClosed(ParleyError)
        /// The peer broke the protocol: send CLOSE with this error, then close.
        case violation(ParleyError)
    }

    public let role: Role
    public let features: ParleyFeatures
    public let maxPeerFrameSize: Int
    private(set) public var nextSeq: UInt64 = 1
    private(set) public var lastReceivedSeq: UInt64 = 0
    private(set) public var isClosed = false
    /// The type names of the peer's recent MESSAGEs (decoded once, then shared).
    private var typeNames = MessageTypeNames()
    /// Feature bit 9 was negotiated: `seq`s continue across the session's connections and
    /// are checked by the session's `SessionLedger`, not here; ACK frames are allowed.
    public var isLossless: Bool { self.features.contains(.reconnect) }
    /// DIRECT frames were enabled on this connection (`enableDirect`): before that a DIRECT
    /// received is `unexpectedFrame`.
    public private(set) var isDirectEnabled = false

    /// - Parameter sent: MESSAGEs this side already sent before the session began (a
    ///   client's early requests, R-6.1-5 and R-6.1-6): numbering goes on after them.
    public init(role: Role, features: ParleyFeatures, maxPeerFrameSize: Int = Frame.defaultMaxFrameSize, sent: UInt64 = 0) {
        self.role = role
        self.features = features
        self.maxPeerFrameSize = maxPeerFrameSize
        self.nextSeq = sent &+ 1
    }

    public mutating func received(_ inbound: WireInbound) -> Inbound {
        guard !self.isClosed else { return .ignore }
        guard case .frame(let frame) = inbound else {
            return self.violate(.protocolViolation, "second banner received")
        }
        switch frame.tag {
        case .message:
            let message: WireMessage
            do {
                message = try WireMessage(frame: frame, names: &self.typeNames)
            } catch {
                return self.violate(error)
            }
            let h = message.header
            guard self.isLossless || h.seq == self.lastReceivedSeq &+ 1 else {
                return self.violate(.protocolViolation, "MESSAGE seq \(h.seq) out of order: expected \(self.lastReceivedSeq &+ 1)")
            }
            guard h.kind.isKnown else {
                return self.violate(.protocolViolation, "MESSAGE kind \(h.kind.rawValue) is not defined")
            }
            if (h.kind == .streamItem || h.kind == .cancel) && !self.features.contains(.streams) {
                return self.violate(.protocolViolation, "MESSAGE kind \(h.kind) needs the streams feature, which was not negotiated")
            }
            if message.data != nil && !self.features.contains(.dataSegment) {
                return self.violate(.protocolViolation, "MESSAGE has a data segment but the dataSegment feature was not negotiated")
            }
            guard frame.flags == 0, h.flags == 0 else {
                return self.violate(.protocolViolation, "MESSAGE flags must be 0 in protocol version 1")
            }
            self.lastReceivedSeq = h.seq
            return .message(message)
        case .notice:
            guard self.role == .client, self.features.contains(.notice) else {
                return self.violate(.unexpectedFrame, "NOTICE frame \(self.role == .server ? "sent to a server" : "without the notice feature")")
            }
            do {
                return .notice(try Parley_V1_Notice(parleyPayload: frame.segments[0]).nucleus)
            } catch {
                return self.violate(error)
            }
        case .keepalive, .keepaliveAck:
            guard self.features.contains(.keepalive) else {
                return self.violate(.unexpectedFrame, "\(frame.tag) frame without the keepalive feature")
            }
            guard frame.segments[0].readableBytes == 8, let stamp = frame.segments[0].getInteger(at: frame.segments[0].readerIndex, endianness: .little, as: UInt64.self) else {
                return self.violate(.malformedPayload, "\(frame.tag) payload must be 8 bytes, got \(frame.segments[0].readableBytes)")
            }
            if frame.tag == .keepaliveAck { return .keepaliveAck(stamp) }
            return .reply(Self.keepaliveFrame(tag: .keepaliveAck, timestamp: stamp))
        case .direct:
            return self.received(direct: DirectInbound(frame))
        case .ack where self.isLossless:
            guard frame.segments[0].readableBytes == 8, let ack = frame.segments[0].getInteger(at: frame.segments[0].readerIndex, endianness: .little, as: UInt64.self) else {
                return self.violate(.malformedPayload, "ACK payload must be 8 bytes, got \(frame.segments[0].readableBytes)")
            }
            return .ack(ack)
        default:
            switch Negotiation.stray(frame, waitingFor: "MESSAGE, NOTICE, KEEPALIVE or CLOSE") {
            case .ignore:
                return .ignore
            case .peerClosed(let error):
                self.isClosed = true
                return .peerClosed(error)
            case .violation(let error):
                return self.violate(error)
            }
        }
    }

    /// A DIRECT frame, decoded whole or collected in pieces (`WireDecoder.decodeCollecting`).
    public mutating func received(direct: DirectInbound) -> Inbound {
        guard !self.isClosed else { return .ignore }
        // Decided on the tag, the features and the flags before segment 0 is looked at.
        guard self.isDirectEnabled else {
            let why = self.features.contains(.direct) ? "before a service enabled DIRECT on this connection" : "without the direct feature"
            return self.violate(.unexpectedFrame, "DIRECT frame \(why)")
        }
        guard direct.flags == 0 else {
            return self.violate(.protocolViolation, "DIRECT flags must be 0 in protocol version 1, got \(direct.flags)")
        }
        guard direct.segment0.readableBytes >= DirectFrame.idSize else {
            return self.violate(.malformedPayload, "DIRECT segment 0 must start with an 8-byte id, got \(direct.segment0.readableBytes) bytes")
        }
        return .direct(direct)
    }

    /// Stamps an outbound message with the next seq and the current ack; returns its frame.
    /// Refuses (without using a seq) what the peer would reject: kinds or a data segment the
    /// negotiated features do not allow, a type name over 1024 bytes, or a frame larger than
    /// the peer's announced `max_frame_size`.
    public mutating func frame(for message: WireMessage, allocator: ByteBufferAllocator) throws(ParleyError) -> Frame {
        try self.stamp(message).frame(allocator: allocator)
    }

    /// What `frame(for:allocator:)` does short of building the frame: checks the message and
    /// returns it with its seq and ack, for `WireMessage.encodeFrame(into:allocator:)`.
    public mutating func stamp(_ message: WireMessage) throws(ParleyError) -> WireMessage {
        try Self.check(message, features: self.features, maxPeerFrameSize: self.maxPeerFrameSize)
        var message = message
        message.header.seq = self.nextSeq
        message.header.ack = self.lastReceivedSeq
        self.nextSeq &+= 1
        return message
    }

    /// What `frame(for:allocator:)` refuses, checked without a machine: the async layer checks
    /// a message before handing it to the event loop, so that the sender gets the error.
    public static func check(_ message: WireMessage, features: ParleyFeatures, maxPeerFrameSize: Int) throws(ParleyError) {
        let h = message.header
        if (h.kind == .streamItem || h.kind == .cancel) && !features.contains(.streams) {
            throw ParleyError(code: .invalidArgument, message: "cannot send \(h.kind): the streams feature was not negotiated")
        }
        if message.data != nil && !features.contains(.dataSegment) {
            throw ParleyError(code: .invalidArgument, message: "cannot send a data segment: the dataSegment feature was not negotiated")
        }
        guard h.type.utf8.count <= MessageHeader.maxTypeNameLength else {
            throw ParleyError(code: .invalidArgument, message: "message type name of \(h.type.utf8.count) bytes exceeds 1024")
        }
        let size = MessageHeader.fixedSize + h.type.utf8.count + message.payload.readableBytes + (message.data?.readableBytes ?? 0)
        guard size <= maxPeerFrameSize else {
            throw ParleyError(code: .frameTooLarge, message: "a \(size)-byte \(h.type) message exceeds the peer's limit of \(maxPeerFrameSize) bytes")
        }
    }

    /// Enables DIRECT frames on this connection (a service's grant on the server side; the
    /// client's first DIRECT on the client side). Refused without feature bit 4 and in a
    /// lossless session (DIRECT frames are not numbered and would not survive a reconnect).
    public mutating func enableDirect() throws(ParleyError) {
        try Self.mayUseDirect(features: self.features)
        self.isDirectEnabled = true
    }

    /// Whether DIRECT frames may be used with these negotiated features.
    public static func mayUseDirect(features: ParleyFeatures) throws(ParleyError) {
        guard features.contains(.direct) else {
            throw ParleyError(code: .invalidArgument, message: "cannot use DIRECT frames: the direct feature was not negotiated")
        }
        guard !features.contains(.reconnect) else {
            throw ParleyError(code: .invalidArgument, message: "cannot use DIRECT frames in a lossless session (feature bit 9)")
        }
    }

    /// Checks a DIRECT frame this side is about to send: enabled, and within the peer's limit.
    public func checkDirect(payloadSize: Int) throws(ParleyError) {
        guard self.isDirectEnabled else {
            throw ParleyError(code: .invalidArgument, message: "cannot send DIRECT: it is not enabled on this connection")
        }
        guard payloadSize <= self.maxPeerFrameSize else {
            throw ParleyError(code: .frameTooLarge, message: "a \(payloadSize)-byte DIRECT frame exceeds the peer's limit of \(self.maxPeerFrameSize) bytes")
        }
    }

    /// Checks that a control frame may be sent with the negotiated features.
    public func mayControl(_ tag: FrameTag) throws(ParleyError) {
        switch tag {
        case .notice where !self.features.contains(.notice) || self.role != .server:
            throw ParleyError(code: .invalidArgument, message: "cannot send NOTICE: only a server sends it, with the notice feature")
        case .keepalive where !self.features.contains(.keepalive), .keepaliveAck where !self.features.contains(.keepalive):
            throw ParleyError(code: .invalidArgument, message: "cannot send \(tag): the keepalive feature was not negotiated")
        default:
            return
        }
    }

    /// An ACK frame (lossless sessions): the highest seq received.
    public static func ackFrame(_ ack: UInt64) -> Frame {
        self.keepaliveFrame(tag: .ack, timestamp: ack)
    }

    public static func keepaliveFrame(tag: FrameTag, timestamp: UInt64) -> Frame {
        var buffer = ByteBuffer()
        buffer.writeInteger(timestamp, endianness: .little)
        return Frame(tag: tag, segments: [buffer])
    }

    private mutating func violate(_ code: ParleyError.Code, _ message: String) -> Inbound {
        self.violate(ParleyError(code: code, message: message))
    }

    private mutating func violate(_ error: ParleyError) -> Inbound {
        self.isClosed = true
        return .violation(error)
    }
}
