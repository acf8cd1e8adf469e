/// Rules shared by both handshake machines: banner checks and what to do with a frame that
/// does not belong to the current state.
public enum Negotiation {
    /// Checks the peer's banner against ours and returns the features the connection uses.
    ///
    /// - The peer's version must be at least 1. A higher version is accepted: every later
    ///   version must be able to speak version 1 to a peer that announces 1; anything it cannot
    ///   do in version 1 it guards with a required feature bit instead.
    /// - Every feature the peer requires must be one we support, and every feature we require
    ///   must be one the peer supports.
    public static func check(ours: Banner, theirs: Banner) throws(ParleyError) -> ParleyFeatures {
        guard theirs.version >= 1 else {
            throw ParleyError(
                code: .unsupportedVersion,
                message: "peer speaks protocol version \(theirs.version); this side speaks version \(ours.version) and accepts 1 or later"
            )
        }
        let theyNeed = ParleyFeatures(rawValue: theirs.required.rawValue & ~ours.supported.rawValue)
        if !theyNeed.isEmpty {
            throw ParleyError(
                code: .missingFeatures,
                message: "peer (protocol version \(theirs.version)) requires features \(theyNeed) that this side (protocol version \(ours.version), supported \(ours.supported)) does not support"
            )
        }
        let weNeed = ParleyFeatures(rawValue: ours.required.rawValue & ~theirs.supported.rawValue)
        if !weNeed.isEmpty {
            throw ParleyError(
                code: .missingFeatures,
                message: "this side (protocol version \(ours.version)) requires features \(weNeed) that the peer (protocol version \(theirs.version), supported \(theirs.supported)) does not support"
            )
        }
        return ParleyFeatures(rawValue: ours.supported.rawValue & theirs.supported.rawValue)
    }

    /// What to do with a frame the current state does not expect.
    public enum Stray: Equatable {
        /// An unknown ignorable tag (0x80...0xFF): skip it.
        case ignore
        /// The peer closed with this status.
        case peerClosed(ParleyError)
        /// A protocol error: close with this error.
        case violation(ParleyError)
    }

    public static func stray(_ frame: Frame, waitingFor: String) -> Stray {
        if frame.tag == .close {
            if let status = try? Parley_V1_Status(parleyPayload: frame.segments[0]) {
                return .peerClosed(ParleyError(peerClose: status))
            }
            return .peerClosed(ParleyError(code: .connectionClosed, message: "peer closed the connection (unreadable CLOSE payload)", cause: PeerClosed()))
        }
        if !frame.tag.isKnown {
            if frame.tag.isIgnorable { return .ignore }
            return .violation(ParleyError(
                code: .unknownFrameTag,
                message: "unknown frame tag 0x\(String(frame.tag.rawValue, radix: 16)) (tags below 0x80 must be known) while waiting for \(waitingFor)"
            ))
        }
        return .violation(ParleyError(code: .unexpectedFrame, message: "unexpected \(frame.tag) frame while waiting for \(waitingFor)"))
    }

    /// Compares dotted version strings numerically ("0.10.0" > "0.9.1"); missing and empty
    /// parts are 0 (".9" is 0.9, "1..5" is 1.0.5), a non-numeric suffix of a part ("1-beta")
    /// is ignored, and only ASCII digits count, as numbers of any size (docs/protocol.md 8.4).
    public static func compareVersions(_ a: String, _ b: String) -> Int {
        /// The leading ASCII digits of each part, without leading zeros.
        func parts(_ s: String) -> [Substring.UTF8View] {
            s.split(separator: ".", omittingEmptySubsequences: false).map { part in
                let digits = part.utf8.prefix { $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }
                return digits.drop { $0 == UInt8(ascii: "0") }
            }
        }
        let x = parts(a), y = parts(b)
        for i in 0..<max(x.count, y.count) {
            let l = i < x.count ? Array(x[i]) : [], r = i < y.count ? Array(y[i]) : []
            // Without leading zeros, a longer number is larger; equal lengths compare digit by digit.
            if l.count != r.count { return l.count < r.count ? -1 : 1 }
            if l != r { return l.lexicographicallyPrecedes(r) ? -1 : 1 }
        }
        return 0
    }
}

/// What a handshake machine asks its driver to do after an event.
public struct HandshakeStep: Equatable, Sendable {
    public enum Outcome: Equatable, Sendable {
        case established(HandshakeResult)
        /// Close the connection after sending `send` (which holds a CLOSE frame when the
        /// failure is one to tell the peer about).
        case failed(ParleyError)
        /// Server side, feature bit 9: the client asks to resume a session. The driver looks
        /// it up and answers with `resume(_:)`, `reset(reason:)` or `refuseResume(_:)`.
        case resumeRequested(SessionResumeRequest)
    }

    public var send: [WireOutbound]
    public var outcome: Outcome?
    /// From the next inbound byte on, frames are sealed with these keys: the driver must
    /// switch its decoder before it decodes anything after the frame that caused this step.
    public var startOpening: SecureSwitch?
    /// Client side: the driver may send MESSAGE frames right after this step's frames (after
    /// CLIENT_IDENT; sealed in secure mode), numbered from seq 1, if they fit these terms,
    /// without waiting for SERVER_IDENT (docs/protocol.md, R-6.1-5 and R-6.1-6).
    public var earlyMessages: EarlyMessageTerms?

    public init(send: [WireOutbound] = [], outcome: Outcome? = nil, startOpening: SecureSwitch? = nil) {
        self.send = send
        self.outcome = outcome
        self.startOpening = startOpening
    }

    static func fail(_ error: ParleyError, tellPeer: Bool) -> HandshakeStep {
        HandshakeStep(send: tellPeer ? [.frame(error.status.frame(tag: .close))] : [], outcome: .failed(error))
    }
}

/// What a client's early MESSAGEs are sent under (R-6.1-6): the features the banners settled
/// and the largest frame the server's HELLO accepts.
public struct EarlyMessageTerms: Equatable, Sendable {
    public var features: ParleyFeatures
    public var peerMaxFrameSize: UInt32

    public init(features: ParleyFeatures, peerMaxFrameSize: UInt32) {
        self.features = features
        self.peerMaxFrameSize = peerMaxFrameSize
    }
}

/// Everything the handshake settled, as seen from one side.
public struct HandshakeResult: Equatable, Sendable {
    public var peerBanner: Banner
    public var features: ParleyFeatures
    public var peerHello: Parley_V1_Hello
    public var authMethod: String
    public var globalID: UInt64
    public var clientIdent: Parley_V1_ClientIdent
    public var serverIdent: Parley_V1_ServerIdent
    /// `crc`, or `secure` with `cipher`.
    public var connectionMode: ConnectionMode = .crc
    public var cipher: SecureCipher?
    /// The authenticated entity ("client.alice"), nil when anonymous.
    public var entity: String?
    /// What the entity may do (server side; from the keyring). "*" is everything.
    public var capabilities: [String] = []
    /// Lossy, or what became of the lossless session (feature bit 9).
    public var session: SessionOutcome = .lossy
    /// Client side: the handshake let the client send MESSAGEs right after CLIENT_IDENT
    /// (`HandshakeStep.earlyMessages`: secure mode, R-6.1-6; the first flight, R-6.1-5).
    public var earlyMessagesAllowed = false
    /// Client side: how many MESSAGEs the driver did send there (set by the driver, not by
    /// the state machine): their seqs come first, and their answers are awaited.
    public var earlyMessagesSent = 0

    public init(
        peerBanner: Banner, features: ParleyFeatures, peerHello: Parley_V1_Hello, authMethod: String, globalID: UInt64,
        clientIdent: Parley_V1_ClientIdent, serverIdent: Parley_V1_ServerIdent, connectionMode: ConnectionMode = .crc,
        cipher: SecureCipher? = nil, entity: String? = nil, capabilities: [String] = []
    ) {
        self.peerBanner = peerBanner
        self.features = features
        self.peerHello = peerHello
        self.authMethod = authMethod
        self.globalID = globalID
        self.clientIdent = clientIdent
        self.serverIdent = serverIdent
        self.connectionMode = connectionMode
        self.cipher = cipher
        self.entity = entity
        self.capabilities = capabilities
    }
}

/// What a handshake did with lossless sessions (feature bit 9; docs/protocol.md 5.2).
public enum SessionOutcome: Equatable, Sendable {
    /// Bit 9 was not negotiated: a lossy connection.
    case lossy
    /// A new session with this token.
    case started(token: [UInt8])
    /// The session with this token continues, on the connection of reconnect attempt
    /// `connectSeq`; the peer had received every MESSAGE up to `peerLastReceived`.
    case resumed(token: [UInt8], peerLastReceived: UInt64, connectSeq: UInt64)
    /// Client side: the server did not have the session it asked to resume (SESSION_RESET,
    /// for `reason`); a new session, with `token` (empty if the connection is lossy), started
    /// in its place.
    case reset(reason: String, token: [UInt8])
}

/// Client side: the session to resume, presented in SESSION_RECONNECT.
public struct SessionResumeOffer: Equatable, Sendable {
    public var token: [UInt8]
    public var serverNonce: UInt64
    public var lastReceivedSeq: UInt64
    public var connectSeq: UInt64

    public init(token: [UInt8], serverNonce: UInt64, lastReceivedSeq: UInt64, connectSeq: UInt64) {
        self.token = token
        self.serverNonce = serverNonce
        self.lastReceivedSeq = lastReceivedSeq
        self.connectSeq = connectSeq
    }
}

/// Server side: a client's SESSION_RECONNECT, after its authentication.
public struct SessionResumeRequest: Equatable, Sendable {
    public var token: [UInt8]
    public var serverNonce: UInt64
    public var lastReceivedSeq: UInt64
    public var connectSeq: UInt64
    public var clientIdent: Parley_V1_ClientIdent
    /// The entity this connection authenticated as (nil: anonymous).
    public var entity: String?
}

/// Session tokens are 16 bytes.
public enum SessionToken {
    public static let size = 16
}
