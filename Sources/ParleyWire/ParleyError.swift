/// The one error type of Parley: a code that travels on the wire, a message, and an optional cause.
///
/// Codes are numbers so that they can be carried in `CLOSE` frames and error responses
/// (`parley.v1.Status`); a code this implementation does not know is kept as its number.
/// Two errors are equal when their codes and messages are equal.
public struct ParleyError: Error, Hashable, Sendable, CustomStringConvertible {
    /// An error code. The numbering is part of the protocol (docs/protocol.md, "Error codes").
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public var rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }

        /// A CLOSE or ERROR that gives no reason.
        public static let unspecified = Code(rawValue: 0)
        public static let protocolViolation = Code(rawValue: 1)
        public static let badMagic = Code(rawValue: 2)
        public static let unsupportedVersion = Code(rawValue: 3)
        public static let missingFeatures = Code(rawValue: 4)
        public static let frameTooLarge = Code(rawValue: 5)
        public static let badPreambleCRC = Code(rawValue: 6)
        public static let badSegmentCRC = Code(rawValue: 7)
        public static let unexpectedFrame = Code(rawValue: 8)
        public static let unknownFrameTag = Code(rawValue: 9)
        public static let malformedPayload = Code(rawValue: 10)
        public static let authenticationFailed = Code(rawValue: 11)
        public static let truncated = Code(rawValue: 12)
        public static let clientOutOfDate = Code(rawValue: 13)
        public static let shuttingDown = Code(rawValue: 14)
        public static let cancelled = Code(rawValue: 15)
        public static let unknownMessageType = Code(rawValue: 16)
        public static let handlerFailed = Code(rawValue: 17)
        public static let connectionClosed = Code(rawValue: 18)
        public static let timeout = Code(rawValue: 19)
        public static let invalidArgument = Code(rawValue: 20)
        public static let connectFailed = Code(rawValue: 21)
        public static let redirectLoop = Code(rawValue: 22)
        /// The authenticated entity lacks the capability a request needs.
        public static let permissionDenied = Code(rawValue: 23)
        /// A sealed frame failed authentication: altered, replayed, reordered, dropped or cut.
        public static let badAuthTag = Code(rawValue: 24)
        /// The handshake transcripts of the two sides differ: it was altered in transit.
        public static let handshakeTampered = Code(rawValue: 25)
        /// A secure-mode message counter reached its end.
        public static let keyExhausted = Code(rawValue: 26)
        /// A newer connection of the same lossless session took over this one.
        public static let sessionSuperseded = Code(rawValue: 27)
        /// The server no longer has the lossless session (it restarted or forgot it): a
        /// request sent before may or may not have run.
        public static let sessionReset = Code(rawValue: 28)

        static let names: [UInt32: String] = [
            0: "unspecified", 1: "protocolViolation", 2: "badMagic", 3: "unsupportedVersion", 4: "missingFeatures",
            5: "frameTooLarge", 6: "badPreambleCRC", 7: "badSegmentCRC", 8: "unexpectedFrame",
            9: "unknownFrameTag", 10: "malformedPayload", 11: "authenticationFailed", 12: "truncated",
            13: "clientOutOfDate", 14: "shuttingDown", 15: "cancelled", 16: "unknownMessageType",
            17: "handlerFailed", 18: "connectionClosed", 19: "timeout", 20: "invalidArgument",
            21: "connectFailed", 22: "redirectLoop", 23: "permissionDenied", 24: "badAuthTag",
            25: "handshakeTampered", 26: "keyExhausted", 27: "sessionSuperseded", 28: "sessionReset",
        ]
        /// Every code this implementation defines, in numeric order.
        public static var allKnown: [Code] { names.keys.sorted().map { Code(rawValue: $0) } }

        public var description: String { Self.names[self.rawValue] ?? "code\(self.rawValue)" }
    }

    public var code: Code
    public var message: String
    public var cause: (any Error)?

    public init(code: Code, message: String, cause: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }

    public static func == (lhs: Self, rhs: Self) -> Bool { lhs.code == rhs.code && lhs.message == rhs.message }
    public func hash(into hasher: inout Hasher) {
        hasher.combine(self.code)
        hasher.combine(self.message)
    }

    public var description: String {
        if let cause = self.cause { return "\(self.code) (\(self.code.rawValue)): \(self.message) (cause: \(cause))" }
        return "\(self.code) (\(self.code.rawValue)): \(self.message)"
    }
}

extension ParleyError {
    /// The wire form of this error (a `CLOSE` frame payload or an error response).
    public var status: Parley_V1_Status {
        var s = Parley_V1_Status()
        s.code = self.code.rawValue
        s.message = self.message
        return s
    }

    public init(status: Parley_V1_Status) {
        self.init(code: Code(rawValue: status.code), message: status.message)
    }

    /// The error for a CLOSE frame the peer sent: the peer's code and reason.
    public init(peerClose status: Parley_V1_Status) {
        let reason = status.message.isEmpty ? "no reason given" : status.message
        self.init(code: Code(rawValue: status.code), message: "peer closed the connection: \(reason)", cause: PeerClosed())
    }

    /// True when the peer ended the connection with CLOSE (not an error on this side).
    public var closedByPeer: Bool { self.cause is PeerClosed }
}

/// Marks a `ParleyError` made from the peer's CLOSE frame.
public struct PeerClosed: Error, Sendable {}
