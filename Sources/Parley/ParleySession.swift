import ParleyWire

/// A message from the server to the user (the nucleus).
public struct ParleyServerMessage: Hashable, Sendable, CustomStringConvertible {
    public enum Priority: String, Hashable, Sendable { case low, high }
    public var priority: Priority
    public var text: String

    public init(priority: Priority, text: String) {
        self.priority = priority
        self.text = text
    }

    init(_ m: Parley_V1_ServerMessage) {
        self.priority = m.priority == .high ? .high : .low
        self.text = m.text
    }

    var wire: Parley_V1_ServerMessage {
        var m = Parley_V1_ServerMessage()
        m.priority = self.priority == .high ? .high : .low
        m.text = self.text
        return m
    }

    public var description: String { "[\(self.priority)] \(self.text)" }
}

/// The nucleus fields a server sends: messages, a request delay, redirects. Fixed forever.
public struct ParleyNucleus: Hashable, Sendable {
    public var messages: [ParleyServerMessage]
    /// Seconds the client must wait before its next request (0: none).
    public var requestDelay: Double
    /// Servers to use instead of this one (`HOST:PORT`, `[V6]:PORT`, `unix:PATH`).
    public var redirects: [String]

    public init(messages: [ParleyServerMessage] = [], requestDelay: Double = 0, redirects: [String] = []) {
        self.messages = messages
        self.requestDelay = requestDelay
        self.redirects = redirects
    }

    init(_ n: Parley_V1_Nucleus) {
        self.messages = n.messages.map(ParleyServerMessage.init)
        self.requestDelay = n.requestDelaySeconds
        self.redirects = n.redirects
    }

    var wire: Parley_V1_Nucleus {
        var n = Parley_V1_Nucleus()
        n.messages = self.messages.map(\.wire)
        n.requestDelaySeconds = self.requestDelay
        n.redirects = self.redirects
        return n
    }

    public var isEmpty: Bool { self.messages.isEmpty && self.requestDelay == 0 && self.redirects.isEmpty }
}

/// Who a peer says it is (from its CLIENT_IDENT or SERVER_IDENT).
public struct ParleyPeerIdentity: Hashable, Sendable {
    public var platform: String
    public var implementation: String
    public var version: String
    public var name: String
}

/// What the handshake settled, from this side's point of view.
public struct ParleySession: Hashable, Sendable {
    /// The protocol version this side speaks.
    public var localVersion: UInt16
    /// The protocol version the peer announced in its banner.
    public var peerVersion: UInt16
    /// Features both sides support: what this connection uses.
    public var features: ParleyFeatures
    public var peerSupportedFeatures: ParleyFeatures
    public var peerRequiredFeatures: ParleyFeatures
    public var authMethod: String
    public var peer: ParleyPeerIdentity
    /// The address at which the peer sees this side (from the peer's HELLO).
    public var addressSeenByPeer: String
    /// The socket address of the peer.
    public var peerAddress: String
    /// The nucleus of the SERVER_IDENT (on a server: what it sent).
    public var nucleus: ParleyNucleus
    /// The largest frame the peer accepts (its HELLO `max_frame_size`).
    public var peerMaxFrameSize: Int

    /// The most data bytes a message of `type` with a payload of `payloadBytes` can carry to
    /// the peer in its data segment: what of `peerMaxFrameSize` the message header, the type
    /// name and the payload leave (docs/protocol.md section 7; the check senders make).
    public func maxDataBytes(type: String, payloadBytes: Int = 0) -> Int {
        self.peerMaxFrameSize - MessageHeader.fixedSize - type.utf8.count - payloadBytes
    }
    /// `crc`, or `secure` (every frame sealed with `cipher`).
    public var connectionMode: ConnectionMode
    public var cipher: SecureCipher?
    /// The entity the server authenticated ("client.alice"); nil for an anonymous client.
    public var entity: String?
    /// On a server: what the client's entity may do (from the keyring); "*" is everything.
    public var capabilities: [String]
    /// The server-assigned id of the authenticated client (0 when anonymous).
    public var globalID: UInt64

    /// The entity's name for messages and logs.
    public var entityName: String { self.entity ?? "anonymous client" }

    /// Whether the capabilities allow `capability`: listed as is, `*`, or a prefix wildcard
    /// (`block.*` allows `block.read`).
    public func grants(_ capability: String) -> Bool {
        Self.capabilities(self.capabilities, grant: capability)
    }

    /// The rule of `grants`, for capabilities held elsewhere (a keyring entity's).
    public static func capabilities(_ capabilities: [String], grant capability: String) -> Bool {
        capabilities.contains { cap in
            cap == "*" || cap == capability || (cap.hasSuffix(".*") && capability.hasPrefix(cap.dropLast()))
        }
    }

    init(result: HandshakeResult, role: SessionStateMachine.Role, peerAddress: String) {
        self.localVersion = Banner.currentVersion
        self.peerVersion = result.peerBanner.version
        self.features = result.features
        self.peerSupportedFeatures = result.peerBanner.supported
        self.peerRequiredFeatures = result.peerBanner.required
        self.authMethod = result.authMethod
        switch role {
        case .client:
            let s = result.serverIdent
            self.peer = ParleyPeerIdentity(platform: s.platform, implementation: s.implementation, version: s.version, name: s.name)
        case .server:
            let c = result.clientIdent
            self.peer = ParleyPeerIdentity(platform: c.platform, implementation: c.implementation, version: c.version, name: c.name)
        }
        self.addressSeenByPeer = result.peerHello.peerAddress
        self.peerAddress = peerAddress
        self.nucleus = ParleyNucleus(result.serverIdent.nucleus)
        self.peerMaxFrameSize = Frame.peerLimit(announced: result.peerHello.maxFrameSize)
        self.connectionMode = result.connectionMode
        self.cipher = result.cipher
        self.entity = result.entity
        self.capabilities = result.capabilities
        self.globalID = result.globalID
    }
}

/// Values both ends put in their identity.
public enum ParleyBuild {
    /// The version of this implementation.
    public static let version = "0.1.0"
    public static let implementation = "parley-swift"
    public static var platform: String {
        #if arch(x86_64)
        let arch = "x86_64"
        #elseif arch(arm64)
        let arch = "aarch64"
        #else
        let arch = "unknown"
        #endif
        #if os(Linux)
        return "\(arch)-unknown-linux-gnu"
        #elseif os(macOS)
        return "\(arch)-apple-macosx"
        #else
        return "\(arch)-unknown"
        #endif
    }
}
