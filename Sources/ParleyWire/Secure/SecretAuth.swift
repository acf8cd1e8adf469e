import Crypto
import NIOCore

/// The connection modes a server chooses from (AUTH_DONE `connection_mode`).
public enum ConnectionMode: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    /// Frames protected by CRCs against accidents, not against attackers.
    case crc
    /// Every frame after AUTH_DONE sealed with an AEAD cipher (docs/protocol.md, "Secure mode").
    case secure

    public var description: String { self.rawValue }

    /// Parses a policy such as `crc`, `secure` or `crc,secure`.
    public static func parseList(_ text: String) throws(ParleyError) -> [ConnectionMode] {
        var modes: [ConnectionMode] = []
        for part in text.split(separator: ",") {
            let name = part.trimmingCharacters(in: " ")
            guard let mode = ConnectionMode(rawValue: name) else {
                throw ParleyError(code: .invalidArgument, message: "unknown connection mode \"\(name)\": use crc, secure or crc,secure")
            }
            if !modes.contains(mode) { modes.append(mode) }
        }
        guard !modes.isEmpty else { throw ParleyError(code: .invalidArgument, message: "no connection mode given: use crc, secure or crc,secure") }
        return modes
    }
}

extension Substring {
    fileprivate func trimmingCharacters(in set: Character) -> String {
        String(self.drop { $0 == set }.reversed().drop { $0 == set }.reversed())
    }
}

extension Banner {
    /// A banner for a side whose connection modes are `modes`: secure mode is added to the
    /// supported features when allowed, and to the required ones when it is the only mode.
    public init(supported: ParleyFeatures, required: ParleyFeatures, modes: [ConnectionMode]) {
        var supported = supported
        var required = required
        if modes.contains(.secure) { supported.insert(.secureMode) }
        if modes == [.secure] { required.insert(.secureMode) }
        self.init(supported: supported, required: required)
    }
}

/// The names of the authentication methods.
public enum AuthMethod {
    public static let none = "none"
    public static let secret = "secret"
    public static let tls = "tls"
    public static let all = [none, secret, tls]
}

/// The handshake transcript that the `secret` method's MACs and the secure keys cover
/// (docs/protocol.md, "Transcript").
///
/// Records, in this order whatever the order of arrival: the client's banner, the server's
/// banner, the client's HELLO, the server's HELLO, then every AUTH frame in the order the
/// exchange makes them (they strictly alternate). A record is
/// `direction (1: 'C' or 'S') | tag (1: 0 for a banner) | length (u32 LE) | bytes`, where the
/// bytes are a banner re-encoded from its fields or a frame's segment 0 as sent or received.
public struct HandshakeTranscript: Sendable, Hashable {
    public struct Record: Sendable, Hashable {
        public var fromClient: Bool
        public var tag: UInt8
        public var bytes: [UInt8]

        public init(fromClient: Bool, tag: UInt8, bytes: [UInt8]) {
            self.fromClient = fromClient
            self.tag = tag
            self.bytes = bytes
        }
    }

    public var clientBanner: [UInt8] = []
    public var serverBanner: [UInt8] = []
    public var clientHello: [UInt8] = []
    public var serverHello: [UInt8] = []
    public var auth: [Record] = []

    public init() {}

    public static func bannerBytes(_ banner: Banner) -> [UInt8] {
        var buffer = ByteBuffer()
        buffer.writeBanner(banner)
        return Array(buffer.readableBytesView)
    }

    public mutating func appendAuth(fromClient: Bool, frame: Frame) {
        self.auth.append(Record(fromClient: fromClient, tag: frame.tag.rawValue, bytes: Array(frame.segments[0].readableBytesView)))
    }

    /// SHA-256 of the records so far.
    public func digest() -> [UInt8] {
        var hash = SHA256()
        func add(_ fromClient: Bool, _ tag: UInt8, _ bytes: [UInt8]) {
            var head: [UInt8] = [fromClient ? 0x43 : 0x53, tag]
            withUnsafeBytes(of: UInt32(bytes.count).littleEndian) { head.append(contentsOf: $0) }
            hash.update(data: head)
            hash.update(data: bytes)
        }
        add(true, 0, self.clientBanner)
        add(false, 0, self.serverBanner)
        add(true, FrameTag.hello.rawValue, self.clientHello)
        add(false, FrameTag.hello.rawValue, self.serverHello)
        for record in self.auth { add(record.fromClient, record.tag, record.bytes) }
        return Array(hash.finalize())
    }
}

/// The key schedule of method `secret` (docs/protocol.md, "Key schedule"). Pure functions of
/// the shared key, both challenges, the X25519 shared secret and the transcript.
public struct SecretKeySchedule: Sendable {
    public let entity: String
    let key: SymmetricKey
    let challenges: [UInt8]
    let handshakeSecret: SymmetricKey

    /// - Parameters:
    ///   - key: the entity's 32-byte key from the keyring.
    ///   - sharedSecret: the X25519 result of both key shares.
    public init(entity: String, key: [UInt8], clientChallenge: [UInt8], serverChallenge: [UInt8], sharedSecret: [UInt8]) {
        self.entity = entity
        self.key = SymmetricKey(data: key)
        self.challenges = clientChallenge + serverChallenge
        // handshake_secret = HKDF-Extract(salt: client_challenge | server_challenge, ikm: key | shared)
        self.handshakeSecret = SymmetricKey(data: HKDF<SHA256>.extract(inputKeyMaterial: SymmetricKey(data: key + sharedSecret), salt: self.challenges).withUnsafeBytes { Array($0) })
    }

    private func proof(_ label: String) -> [UInt8] {
        var message = Array(label.utf8)
        message.append(UInt8(truncatingIfNeeded: self.entity.utf8.count))  // names are at most 255 bytes
        message += Array(self.entity.utf8)
        message += self.challenges
        return Array(HMAC<SHA256>.authenticationCode(for: message, using: self.key))
    }

    /// HMAC(key, "parley v1 client proof" | len(entity) | entity | challenges): proves the key.
    public var clientProof: [UInt8] { self.proof("parley v1 client proof") }
    /// HMAC(key, "parley v1 server proof" | len(entity) | entity | challenges).
    public var serverProof: [UInt8] { self.proof("parley v1 server proof") }

    private func expand(_ label: String, _ context: [UInt8], _ count: Int) -> [UInt8] {
        HKDF<SHA256>.expand(pseudoRandomKey: self.handshakeSecret, info: Array(label.utf8) + context, outputByteCount: count)
            .withUnsafeBytes { Array($0) }
    }

    private var macKey: SymmetricKey { SymmetricKey(data: self.expand("parley v1 transcript mac", [], 32)) }

    /// HMAC(mac_key, "parley v1 client transcript" | T1), T1 = transcript through AUTH_REPLY_MORE.
    public func clientTranscriptMAC(_ transcript: [UInt8]) -> [UInt8] {
        Array(HMAC<SHA256>.authenticationCode(for: Array("parley v1 client transcript".utf8) + transcript, using: self.macKey))
    }

    /// HMAC(mac_key, "parley v1 server transcript" | T2 | global_id u64 LE), T2 = transcript
    /// through AUTH_REQUEST_MORE.
    public func serverTranscriptMAC(_ transcript: [UInt8], globalID: UInt64) -> [UInt8] {
        var message = Array("parley v1 server transcript".utf8) + transcript
        withUnsafeBytes(of: globalID.littleEndian) { message.append(contentsOf: $0) }
        return Array(HMAC<SHA256>.authenticationCode(for: message, using: self.macKey))
    }

    /// The traffic keys of both directions, bound to T2.
    public func trafficKeys(cipher: SecureCipher, transcript: [UInt8]) -> (clientToServer: SecureDirectionKeys, serverToClient: SecureDirectionKeys) {
        (
            SecureDirectionKeys(cipher: cipher, key: self.expand("parley v1 c2s key", transcript, 32), iv: self.expand("parley v1 c2s iv", transcript, 12)),
            SecureDirectionKeys(cipher: cipher, key: self.expand("parley v1 s2c key", transcript, 32), iv: self.expand("parley v1 s2c iv", transcript, 12))
        )
    }

    /// Constant-time comparison of two MACs.
    public static func equal(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for i in 0..<a.count { difference |= a[i] ^ b[i] }
        return difference == 0
    }
}

/// The identity key of method `secret`: `HKDF-Expand(HKDF-Extract(salt: challenges, ikm:
/// shared), "parley v1 identity", 32)`, from the X25519 result alone (the server does not know
/// which key to use before it knows the entity). It seals the entity name with
/// ChaCha20-Poly1305 under an all-zero nonce: the key is fresh per connection and used once.
public enum SecretIdentity {
    static func key(clientChallenge: [UInt8], serverChallenge: [UInt8], sharedSecret: [UInt8]) -> SymmetricKey {
        let prk = HKDF<SHA256>.extract(inputKeyMaterial: SymmetricKey(data: sharedSecret), salt: clientChallenge + serverChallenge)
        return HKDF<SHA256>.expand(pseudoRandomKey: prk, info: Array("parley v1 identity".utf8), outputByteCount: 32)
    }

    static let nonce = try! ChaChaPoly.Nonce(data: [UInt8](repeating: 0, count: 12))

    public static func seal(entity: String, clientChallenge: [UInt8], serverChallenge: [UInt8], sharedSecret: [UInt8]) -> [UInt8] {
        let key = self.key(clientChallenge: clientChallenge, serverChallenge: serverChallenge, sharedSecret: sharedSecret)
        let box = try! ChaChaPoly.seal(Array(entity.utf8), using: key, nonce: self.nonce)  // cannot fail with a 32-byte key
        return Array(box.ciphertext) + Array(box.tag)
    }

    /// The entity name, or nil if the sealed bytes do not open. A name that opens but is empty
    /// or not UTF-8 comes back as it is (empty, or with U+FFFD for the bad bytes): it did open,
    /// so it is the keyring that refuses it (`authenticationFailed`), not the transcript.
    public static func open(_ sealed: [UInt8], clientChallenge: [UInt8], serverChallenge: [UInt8], sharedSecret: [UInt8]) -> String? {
        guard sealed.count >= SecureCipher.tagSize else { return nil }
        let key = self.key(clientChallenge: clientChallenge, serverChallenge: serverChallenge, sharedSecret: sharedSecret)
        guard let box = try? ChaChaPoly.SealedBox(nonce: self.nonce, ciphertext: sealed.dropLast(SecureCipher.tagSize), tag: sealed.suffix(SecureCipher.tagSize)),
              let plain = try? ChaChaPoly.open(box, using: key)
        else { return nil }
        return String(decoding: Array(plain), as: UTF8.self)
    }
}

/// X25519, as the `secret` method uses it: the private key comes from outside (randomness is
/// not the state machines' business).
public enum SecretKeyShare {
    public static func publicKey(privateKey: [UInt8]) throws(ParleyError) -> [UInt8] {
        do {
            return Array(try Curve25519.KeyAgreement.PrivateKey(rawRepresentation: privateKey).publicKey.rawRepresentation)
        } catch {
            throw ParleyError(code: .invalidArgument, message: "bad X25519 private key: \(error)")
        }
    }

    public static func sharedSecret(privateKey: [UInt8], peerPublicKey: [UInt8]) throws(ParleyError) -> [UInt8] {
        let mine: Curve25519.KeyAgreement.PrivateKey
        do { mine = try Curve25519.KeyAgreement.PrivateKey(rawRepresentation: privateKey) } catch {
            throw ParleyError(code: .invalidArgument, message: "bad X25519 private key: \(error)")
        }
        return try self.sharedSecret(privateKey: mine, peerPublicKey: peerPublicKey)
    }

    /// X25519 with the peer's share. A share of low order (RFC 7748 section 6.1) gives an
    /// all-zero secret whatever the private key, which would leave the session's keys to the
    /// entity's key alone (no forward secrecy): refused (docs/protocol.md R-5.1-2, R-5.1-3).
    static func sharedSecret(privateKey: Curve25519.KeyAgreement.PrivateKey, peerPublicKey: [UInt8]) throws(ParleyError) -> [UInt8] {
        let shared: [UInt8]
        do {
            let theirs = try Curve25519.KeyAgreement.PublicKey(rawRepresentation: peerPublicKey)
            shared = try privateKey.sharedSecretFromKeyAgreement(with: theirs).withUnsafeBytes { Array($0) }
        } catch {
            throw ParleyError(code: .authenticationFailed, message: "bad X25519 key share: \(error)")
        }
        guard shared.reduce(0, |) != 0 else {
            throw ParleyError(code: .authenticationFailed, message: "bad X25519 key share: a point of low order (the shared secret is all zeros)")
        }
        return shared
    }
}

/// What the server knows of an entity, looked up in its keyring when a client names it.
public struct SecretEntity: Sendable, Hashable {
    public var name: String
    public var key: [UInt8]
    public var capabilities: [String]
    /// Seconds since 1970; nil: never.
    public var expires: Int64?
    public var revoked: Bool

    public init(name: String, key: [UInt8], capabilities: [String] = [], expires: Int64? = nil, revoked: Bool = false) {
        self.name = name
        self.key = key
        self.capabilities = capabilities
        self.expires = expires
        self.revoked = revoked
    }
}

/// The entities a server accepts with method `secret` (a snapshot of its keyring).
public struct SecretDirectory: Sendable {
    public var entities: [String: SecretEntity]
    public init(_ entities: [SecretEntity] = []) {
        self.entities = Dictionary(entities.map { ($0.name, $0) }, uniquingKeysWith: { _, last in last })
    }
}

/// The credentials a client authenticates with, with method `secret`.
public struct SecretCredentials: Sendable, Hashable {
    public var entity: String
    public var key: [UInt8]
    public init(entity: String, key: [UInt8]) {
        self.entity = entity
        self.key = key
    }
}

/// Per-connection randomness the handshake machines are given (they draw none themselves).
public struct HandshakeRandomness: Sendable {
    /// 32 bytes.
    public var challenge: [UInt8]
    /// The X25519 key share: its private key, and the public key computed once from it.
    let keyShare: Curve25519.KeyAgreement.PrivateKey?

    /// - Parameter keySharePrivateKey: an X25519 private key, 32 bytes (anything else makes
    ///   method `secret` fail).
    public init(challenge: [UInt8], keySharePrivateKey: [UInt8]) {
        self.challenge = challenge
        self.keyShare = try? Curve25519.KeyAgreement.PrivateKey(rawRepresentation: keySharePrivateKey)
    }

    init(challenge: [UInt8], keyShare: Curve25519.KeyAgreement.PrivateKey) {
        self.challenge = challenge
        self.keyShare = keyShare
    }

    /// Fresh randomness from BoringSSL's generator (one call per value).
    public static func generate() -> HandshakeRandomness {
        HandshakeRandomness(challenge: SymmetricKey(size: .bits256).withUnsafeBytes { Array($0) }, keyShare: Curve25519.KeyAgreement.PrivateKey())
    }

    /// The key share to send.
    public func publicKey() throws(ParleyError) -> [UInt8] {
        guard let keyShare = self.keyShare else { throw ParleyError(code: .invalidArgument, message: "bad X25519 private key") }
        return Array(keyShare.publicKey.rawRepresentation)
    }

    /// X25519 of our key share and the peer's.
    public func sharedSecret(peerPublicKey: [UInt8]) throws(ParleyError) -> [UInt8] {
        guard let keyShare = self.keyShare else { throw ParleyError(code: .invalidArgument, message: "bad X25519 private key") }
        return try SecretKeyShare.sharedSecret(privateKey: keyShare, peerPublicKey: peerPublicKey)
    }
}
