import Foundation
import NIOCore
import SwiftProtobuf

/// The server side of the handshake (docs/protocol.md, "Handshake").
///
/// The server sends its banner and HELLO as soon as the connection is accepted, then answers
/// AUTH_REQUEST with AUTH_DONE (or AUTH_BAD_METHOD, at most `maxAuthAttempts` times) and
/// CLIENT_IDENT with SERVER_IDENT, which establishes the connection. A client whose version
/// is below `minimumClientVersion` gets a SERVER_IDENT carrying a high-priority message that
/// says so, followed by CLOSE with code `clientOutOfDate`.
///
/// ```
/// idle --start--> awaitingBanner --banner--> awaitingHello --HELLO--> awaitingAuthRequest
/// awaitingAuthRequest --AUTH_REQUEST(ok)--> awaitingClientIdent --CLIENT_IDENT--> established
/// awaitingAuthRequest --AUTH_REQUEST(bad method)--> awaitingAuthRequest (AUTH_BAD_METHOD)
/// any --CLOSE / error--> failed
/// ```
public struct ServerHandshakeStateMachine: Sendable {
    public struct Configuration: Sendable {
        public var banner: Banner
        public var maxFrameSize: UInt32
        public var authMethods: [String]
        /// The SERVER_IDENT to send (nucleus included).
        public var ident: Parley_V1_ServerIdent
        /// Clients announcing an older version are told they are out of date and refused.
        public var minimumClientVersion: String?
        /// The address at which this server sees the client.
        public var clientAddress: String
        public var maxAuthAttempts: Int
        /// The connection modes this server allows. Methods `none` and `tls` give `crc` only
        /// (with `tls` the transport already protects every byte); `secure` needs `secret`.
        public var modes: [ConnectionMode]
        /// Ciphers for secure mode, most preferred first.
        public var ciphers: [SecureCipher]
        /// The entities method `secret` accepts.
        public var secrets: SecretDirectory
        /// The time, in seconds since 1970, against which key expiry is checked.
        public var now: Int64
        /// The challenge and key share of method `secret` (randomness comes from outside).
        public var randomness: HandshakeRandomness?
        /// The `global_id` to give an authenticated client.
        public var globalID: UInt64
        /// Capabilities of a client no method identified (`none`, server-only `tls`), and of a
        /// certificate's entity the keyring does not list.
        public var anonymousCapabilities: [String]
        /// With feature bit 9: the token of the session a CLIENT_IDENT starts (16 random
        /// bytes from outside; sent in SERVER_IDENT).
        public var sessionToken: [UInt8] = []

        public init(
            banner: Banner, maxFrameSize: UInt32, authMethods: [String] = ["none"], ident: Parley_V1_ServerIdent,
            minimumClientVersion: String? = nil, clientAddress: String, maxAuthAttempts: Int = 3,
            modes: [ConnectionMode] = [.crc], ciphers: [SecureCipher] = SecureCipher.preferred, secrets: SecretDirectory = SecretDirectory(),
            now: Int64 = 0, randomness: HandshakeRandomness? = nil, globalID: UInt64 = 0, anonymousCapabilities: [String] = ["*"],
            sessionToken: [UInt8] = []
        ) {
            self.sessionToken = sessionToken
            self.banner = banner
            self.maxFrameSize = maxFrameSize
            self.authMethods = authMethods
            self.ident = ident
            self.minimumClientVersion = minimumClientVersion
            self.clientAddress = clientAddress
            self.maxAuthAttempts = maxAuthAttempts
            self.modes = modes
            self.ciphers = ciphers
            self.secrets = secrets
            self.now = now
            self.randomness = randomness
            self.globalID = globalID
            self.anonymousCapabilities = anonymousCapabilities
        }
    }

    private enum State: Sendable {
        case idle
        case awaitingBanner
        case awaitingHello(Partial)
        case awaitingAuthRequest(Partial)
        /// Method `secret`: the challenge is out, the client's proof is awaited.
        case awaitingAuthProof(Partial, SecretRound)
        case awaitingClientIdent(Partial)
        /// SESSION_RECONNECT arrived; the driver decides.
        case awaitingResumeDecision(Partial, SessionResumeRequest)
        case established
        case failed
    }

    private struct Partial: Sendable {
        var banner: Banner
        var features: ParleyFeatures
        var hello = Parley_V1_Hello()
        var authAttempts = 0
        var method = ""
        var mode = ConnectionMode.crc
        var cipher: SecureCipher?
        var entity: String?
        var capabilities: [String] = []
        /// SESSION_RESET was sent: only CLIENT_IDENT may follow.
        var resetSent = false
    }

    /// Method `secret` after the challenge: what the client's proof is checked against.
    private struct SecretRound: Sendable {
        var clientChallenge: [UInt8]
        var serverChallenge: [UInt8]
        var sharedSecret: [UInt8]
        var mode: ConnectionMode
        var cipher: SecureCipher?
    }

    public let configuration: Configuration
    private var state: State = .idle
    private var transcript = HandshakeTranscript()
    /// What the transport authenticated (TLS), if anything.
    private var transportSecurity: (protocolName: String, peerEntity: String?)?

    /// The transport (TLS) completed its own handshake; method `tls` becomes possible.
    public mutating func transportSecured(protocolName: String, peerEntity: String?) {
        self.transportSecurity = (protocolName, peerEntity)
    }

    public init(configuration: Configuration) {
        self.configuration = configuration
    }

    /// Produces the server's first flight: banner and HELLO.
    public mutating func start() -> HandshakeStep {
        guard case .idle = self.state else { return self.fail(ParleyError(code: .protocolViolation, message: "internal: start called twice"), tellPeer: false) }
        self.state = .awaitingBanner
        var hello = Parley_V1_Hello()
        hello.entityType = .server
        hello.peerAddress = self.configuration.clientAddress
        hello.maxFrameSize = self.configuration.maxFrameSize
        let helloFrame = hello.frame(tag: .hello)
        self.transcript.serverBanner = HandshakeTranscript.bannerBytes(self.configuration.banner)
        self.transcript.serverHello = Array(helloFrame.segments[0].readableBytesView)
        return HandshakeStep(send: [.banner(self.configuration.banner), .frame(helloFrame)])
    }

    public mutating func received(_ inbound: WireInbound) -> HandshakeStep {
        switch (self.state, inbound) {
        case (.awaitingBanner, .banner(let banner)):
            do {
                let features = try Negotiation.check(ours: self.configuration.banner, theirs: banner)
                self.transcript.clientBanner = HandshakeTranscript.bannerBytes(banner)
                self.state = .awaitingHello(Partial(banner: banner, features: features))
                return HandshakeStep()
            } catch {
                return self.fail(error, tellPeer: false)
            }
        case (.awaitingHello(var partial), .frame(let frame)) where frame.tag == .hello:
            do {
                partial.hello = try Parley_V1_Hello(parleyPayload: frame.segments[0])
                guard partial.hello.entityType == .client else {
                    return self.fail(ParleyError(code: .protocolViolation, message: "peer HELLO names entity type \(partial.hello.entityType); a server expects a client"), tellPeer: true)
                }
                self.transcript.clientHello = Array(frame.segments[0].readableBytesView)
                self.state = .awaitingAuthRequest(partial)
                return HandshakeStep()
            } catch {
                return self.fail(error, tellPeer: true)
            }
        case (.awaitingAuthRequest(let partial), .frame(let frame)) where frame.tag == .clientIdent && partial.authAttempts > 0:
            // R-6.1-5: a client sure of its one method put CLIENT_IDENT in its first flight,
            // and this server refused the method. Still unexpectedFrame; said plainly.
            let allowed = self.configuration.authMethods.filter { self.refusal(of: $0) == nil }
            return self.fail(ParleyError(
                code: .unexpectedFrame,
                message: "CLIENT_IDENT after AUTH_BAD_METHOD: the client sent it with its only method, which this server refused (no common authentication method; server allows \(allowed))"
            ), tellPeer: true)
        case (.awaitingAuthRequest(var partial), .frame(let frame)) where frame.tag == .authRequest:
            do {
                let request = try Parley_V1_AuthRequest(parleyPayload: frame.segments[0])
                self.transcript.appendAuth(fromClient: true, frame: frame)
                partial.authAttempts += 1
                if let refusal = self.refusal(of: request.method) {
                    guard partial.authAttempts < self.configuration.maxAuthAttempts else {
                        return self.fail(ParleyError(
                            code: .authenticationFailed,
                            message: "authentication failed after \(partial.authAttempts) attempts: last method \"\(request.method)\" (\(refusal)), server allows \(self.configuration.authMethods)"
                        ), tellPeer: true)
                    }
                    self.state = .awaitingAuthRequest(partial)
                    var bad = Parley_V1_AuthBadMethod()
                    bad.method = request.method
                    // Only the methods this connection can use: not `tls` on a connection that
                    // is not TLS, not `none` when secure mode is required.
                    bad.allowedMethods = self.configuration.authMethods.filter { self.refusal(of: $0) == nil }
                    bad.reason = refusal
                    let badFrame = bad.frame(tag: .authBadMethod)
                    self.transcript.appendAuth(fromClient: false, frame: badFrame)
                    return HandshakeStep(send: [.frame(badFrame)])
                }
                partial.method = request.method
                if request.method != AuthMethod.secret, !request.offeredModes.isEmpty, !request.offeredModes.contains(ConnectionMode.crc.rawValue) {
                    // Methods none and tls give crc mode only: no mode in common.
                    return self.fail(ParleyError(
                        code: .authenticationFailed,
                        message: "method \"\(request.method)\" gives crc mode only, and the client offers \(request.offeredModes)"
                    ), tellPeer: true)
                }
                switch request.method {
                case AuthMethod.secret:
                    return self.secretRequest(request, partial: partial)
                case AuthMethod.tls:
                    let entity = self.transportSecurity?.peerEntity
                    // A certificate names an entity of the keyring: one revoked or expired
                    // there is refused, as with method secret (a certificate outlives a
                    // revocation in the keyring otherwise).
                    if let name = entity, let known = self.configuration.secrets.entities[name] {
                        if known.revoked {
                            return self.fail(ParleyError(code: .authenticationFailed, message: "the entity \"\(name)\" of the client's certificate has been revoked in the keyring"), tellPeer: true)
                        }
                        if let expires = known.expires, expires <= self.configuration.now {
                            return self.fail(ParleyError(code: .authenticationFailed, message: "the entity \"\(name)\" of the client's certificate has a key that expired at \(Self.date(expires)) in the keyring"), tellPeer: true)
                        }
                    }
                    partial.entity = entity
                    partial.capabilities = entity.flatMap { self.configuration.secrets.entities[$0]?.capabilities } ?? self.configuration.anonymousCapabilities
                default:
                    partial.capabilities = self.configuration.anonymousCapabilities
                }
                self.state = .awaitingClientIdent(partial)
                var done = Parley_V1_AuthDone()
                done.method = request.method
                done.connectionMode = "crc"
                done.entity = partial.entity ?? ""
                return HandshakeStep(send: [.frame(done.frame(tag: .authDone))])
            } catch {
                return self.fail(error, tellPeer: true)
            }
        case (.awaitingAuthProof(var partial, let round), .frame(let frame)) where frame.tag == .authRequestMore:
            return self.secretProof(frame, partial: &partial, round: round)
        case (.awaitingClientIdent(let partial), .frame(let frame)) where frame.tag == .clientIdent:
            do {
                let client = try Parley_V1_ClientIdent(parleyPayload: frame.segments[0])
                if let refused = self.refuseOutOfDate(client) { return refused }
                var ident = self.configuration.ident
                var session = SessionOutcome.lossy
                if partial.features.contains(.reconnect) {
                    guard self.configuration.sessionToken.count == SessionToken.size else {
                        return self.fail(ParleyError(code: .protocolViolation, message: "internal: a lossless session needs a 16-byte token"), tellPeer: false)
                    }
                    ident.sessionToken = Data(self.configuration.sessionToken)
                    session = .started(token: self.configuration.sessionToken)
                }
                self.state = .established
                return HandshakeStep(
                    send: [.frame(ident.frame(tag: .serverIdent))],
                    outcome: .established(self.result(partial, client: client, ident: ident, session: session))
                )
            } catch {
                return self.fail(error, tellPeer: true)
            }
        case (.awaitingClientIdent(let partial), .frame(let frame)) where frame.tag == .sessionReconnect && partial.features.contains(.reconnect) && !partial.resetSent:
            do {
                let reconnect = try Parley_V1_SessionReconnect(parleyPayload: frame.segments[0])
                guard reconnect.sessionToken.count == SessionToken.size else {
                    return self.fail(ParleyError(code: .malformedPayload, message: "SESSION_RECONNECT token must be 16 bytes, got \(reconnect.sessionToken.count)"), tellPeer: true)
                }
                guard reconnect.connectSeq > 0 else {
                    return self.fail(ParleyError(code: .malformedPayload, message: "SESSION_RECONNECT connect_seq must be 1 or more"), tellPeer: true)
                }
                if let refused = self.refuseOutOfDate(reconnect.ident) { return refused }
                let request = SessionResumeRequest(
                    token: Array(reconnect.sessionToken), serverNonce: reconnect.serverNonce,
                    lastReceivedSeq: reconnect.lastReceivedSeq, connectSeq: reconnect.connectSeq,
                    clientIdent: reconnect.ident, entity: partial.entity
                )
                self.state = .awaitingResumeDecision(partial, request)
                return HandshakeStep(outcome: .resumeRequested(request))
            } catch {
                return self.fail(error, tellPeer: true)
            }
        case (.idle, _), (.established, _), (.failed, _):
            return self.fail(ParleyError(code: .protocolViolation, message: "internal: \(inbound.summary) in a finished or unstarted server handshake"), tellPeer: false)
        case (_, .banner):
            return self.fail(ParleyError(code: .protocolViolation, message: "second banner received"), tellPeer: true)
        case (_, .frame(let frame)):
            switch Negotiation.stray(frame, waitingFor: self.waitingFor) {
            case .ignore: return HandshakeStep()
            case .peerClosed(let error):
                self.state = .failed
                return HandshakeStep(outcome: .failed(error))
            case .violation(let error): return self.fail(error, tellPeer: true)
            }
        }
    }

    /// Why the method of `request` cannot be used here, or nil if it can.
    /// Why `method` cannot be used on this connection, or nil if it can.
    private func refusal(of method: String) -> String? {
        guard self.configuration.authMethods.contains(method) else {
            return "method \"\(method)\" is not enabled on this server"
        }
        switch method {
        case AuthMethod.none:
            guard self.configuration.modes.contains(.crc) else {
                return "method \"none\" cannot key secure mode, and this server requires it"
            }
        case AuthMethod.tls:
            guard self.transportSecurity != nil else {
                return "method \"tls\" needs the TLS transport (tls://); this connection is not TLS"
            }
        case AuthMethod.secret:
            break
        default:
            return "method \"\(method)\" is not implemented by this server"
        }
        return nil
    }

    /// AUTH_REQUEST of method `secret`: looks the entity up, chooses mode and cipher, and
    /// answers with the server's challenge.
    private mutating func secretRequest(_ request: Parley_V1_AuthRequest, partial: Partial) -> HandshakeStep {
        guard let secret = try? Parley_V1_SecretAuthRequest(serializedBytes: request.payload),
              secret.clientChallenge.count == 32, secret.clientKeyShare.count == 32
        else {
            return self.fail(ParleyError(code: .malformedPayload, message: "AUTH_REQUEST payload of method secret must be a SecretAuthRequest with a 32-byte challenge and a 32-byte key share"), tellPeer: true)
        }
        let offered = request.offeredModes.isEmpty ? ["crc"] : request.offeredModes
        guard let mode = offered.compactMap(ConnectionMode.init(rawValue:)).first(where: {
            self.configuration.modes.contains($0) && ($0 != .secure || partial.features.contains(.secureMode))
        }) else {
            if offered.contains(ConnectionMode.secure.rawValue), !partial.features.contains(.secureMode), self.configuration.modes.contains(.secure) {
                // Both offer secure mode, yet the banners did not negotiate it: one was altered.
                return self.fail(ParleyError(
                    code: .handshakeTampered,
                    message: "the client offers secure mode but its banner does not support it: the banners were altered in transit (a man in the middle?)"
                ), tellPeer: true)
            }
            return self.fail(ParleyError(
                code: .authenticationFailed,
                message: "no common connection mode: the client accepts \(offered), this server allows \(self.configuration.modes.map(\.rawValue))\(partial.features.contains(.secureMode) ? "" : " (secure mode was not negotiated in the banners)")"
            ), tellPeer: true)
        }
        var cipher: SecureCipher?
        if mode == .secure {
            guard let chosen = self.configuration.ciphers.first(where: { request.offeredCiphers.contains($0.rawValue) }) else {
                return self.fail(ParleyError(code: .authenticationFailed, message: "no common cipher: the client accepts \(request.offeredCiphers), this server \(self.configuration.ciphers.map(\.rawValue))"), tellPeer: true)
            }
            cipher = chosen
        }
        guard let randomness = self.configuration.randomness, randomness.challenge.count == 32,
              let share = try? randomness.publicKey()
        else {
            return self.fail(ParleyError(code: .authenticationFailed, message: "internal: method secret needs 32 bytes of challenge and a key share"), tellPeer: true)
        }
        let shared: [UInt8]
        do {
            shared = try randomness.sharedSecret(peerPublicKey: Array(secret.clientKeyShare))
        } catch {
            return self.fail(error, tellPeer: true)
        }
        var challenge = Parley_V1_SecretAuthChallenge()
        challenge.serverChallenge = Data(randomness.challenge)
        challenge.serverKeyShare = Data(share)
        challenge.connectionMode = mode.rawValue
        challenge.cipher = cipher?.rawValue ?? ""
        var more = Parley_V1_AuthMore()
        more.payload = (try? challenge.serializedBytes()) ?? Data()
        let frame = more.frame(tag: .authReplyMore)
        self.transcript.appendAuth(fromClient: false, frame: frame)
        self.state = .awaitingAuthProof(partial, SecretRound(
            clientChallenge: Array(secret.clientChallenge), serverChallenge: randomness.challenge, sharedSecret: shared, mode: mode, cipher: cipher
        ))
        return HandshakeStep(send: [.frame(frame)])
    }

    /// AUTH_REQUEST_MORE of method `secret`: the sealed entity name, the client's proof of
    /// the entity's key and its MAC of the transcript; answered with AUTH_DONE carrying the
    /// server's, then secure mode starts.
    private mutating func secretProof(_ frame: Frame, partial: inout Partial, round: SecretRound) -> HandshakeStep {
        let t1 = self.transcript.digest()
        let proof: Parley_V1_SecretAuthProof
        do {
            let more = try Parley_V1_AuthMore(parleyPayload: frame.segments[0])
            proof = try Parley_V1_SecretAuthProof(serializedBytes: more.payload)
        } catch {
            return self.fail(ParleyError(code: .malformedPayload, message: "AUTH_REQUEST_MORE payload is not a SecretAuthProof"), tellPeer: true)
        }
        guard let name = SecretIdentity.open(
            Array(proof.sealedEntity), clientChallenge: round.clientChallenge, serverChallenge: round.serverChallenge, sharedSecret: round.sharedSecret
        ) else {
            return self.fail(ParleyError(
                code: .handshakeTampered,
                message: "the sealed entity name does not open: the key shares or challenges were altered in transit (a man in the middle?)"
            ), tellPeer: true)
        }
        guard let entity = self.configuration.secrets.entities[name] else {
            return self.fail(ParleyError(code: .authenticationFailed, message: "unknown entity \"\(name)\": it is not in the server's keyring"),
                             peer: "the entity is not in the server's keyring")
        }
        guard !entity.revoked else {
            return self.fail(ParleyError(code: .authenticationFailed, message: "the key of \"\(entity.name)\" has been revoked"),
                             peer: "the entity's key has been revoked")
        }
        if let expires = entity.expires, expires <= self.configuration.now {
            let when = "expired at \(Self.date(expires)) (now \(Self.date(self.configuration.now)))"
            return self.fail(ParleyError(code: .authenticationFailed, message: "the key of \"\(entity.name)\" \(when)"), peer: "the entity's key \(when)")
        }
        let schedule = SecretKeySchedule(
            entity: entity.name, key: entity.key, clientChallenge: round.clientChallenge,
            serverChallenge: round.serverChallenge, sharedSecret: round.sharedSecret
        )
        guard SecretKeySchedule.equal(Array(proof.clientProof), schedule.clientProof) else {
            return self.fail(ParleyError(
                code: .authenticationFailed,
                message: "wrong key for \"\(entity.name)\": the client's proof does not match the key in the server's keyring"
            ), peer: "wrong key: the client's proof does not match the entity's key in the server's keyring")
        }
        guard SecretKeySchedule.equal(Array(proof.transcriptMac), schedule.clientTranscriptMAC(t1)) else {
            return self.fail(ParleyError(
                code: .handshakeTampered,
                message: "the client's handshake transcript differs from ours: the banners, HELLOs or AUTH frames were altered in transit (a man in the middle?)"
            ), tellPeer: true)
        }
        self.transcript.appendAuth(fromClient: true, frame: frame)
        let t2 = self.transcript.digest()
        var payload = Parley_V1_SecretAuthDone()
        payload.serverProof = Data(schedule.serverProof)
        payload.transcriptMac = Data(schedule.serverTranscriptMAC(t2, globalID: self.configuration.globalID))
        var done = Parley_V1_AuthDone()
        done.method = AuthMethod.secret
        done.globalID = self.configuration.globalID
        done.connectionMode = round.mode.rawValue
        done.cipher = round.cipher?.rawValue ?? ""
        done.payload = (try? payload.serializedBytes()) ?? Data()
        partial.mode = round.mode
        partial.cipher = round.cipher
        partial.entity = entity.name
        partial.capabilities = entity.capabilities
        self.state = .awaitingClientIdent(partial)
        var step = HandshakeStep(send: [.frame(done.frame(tag: .authDone))])
        if let cipher = round.cipher {
            let keys = schedule.trafficKeys(cipher: cipher, transcript: t2)
            step.send.append(.startSealing(SecureSwitch(keys: keys.serverToClient)))
            step.startOpening = SecureSwitch(keys: keys.clientToServer)
        }
        return step
    }

    /// The session asked for exists and may continue: sends SESSION_RESUMED with the last
    /// `seq` this server received on it, and establishes the connection.
    public mutating func resume(lastReceivedSeq: UInt64) -> HandshakeStep {
        guard case .awaitingResumeDecision(let partial, let request) = self.state else {
            return self.fail(ParleyError(code: .protocolViolation, message: "internal: resume without a SESSION_RECONNECT"), tellPeer: false)
        }
        var ident = self.configuration.ident
        ident.sessionToken = Data(request.token)
        var resumed = Parley_V1_SessionResumed()
        resumed.ident = ident
        resumed.lastReceivedSeq = lastReceivedSeq
        self.state = .established
        return HandshakeStep(
            send: [.frame(resumed.frame(tag: .sessionResumed))],
            outcome: .established(self.result(
                partial, client: request.clientIdent, ident: ident,
                session: .resumed(token: request.token, peerLastReceived: request.lastReceivedSeq, connectSeq: request.connectSeq)
            ))
        )
    }

    /// The session asked for is unknown (forgotten, or from before a restart): sends
    /// SESSION_RESET and waits for the CLIENT_IDENT that starts a new session.
    public mutating func reset(reason: String) -> HandshakeStep {
        guard case .awaitingResumeDecision(var partial, _) = self.state else {
            return self.fail(ParleyError(code: .protocolViolation, message: "internal: reset without a SESSION_RECONNECT"), tellPeer: false)
        }
        var reset = Parley_V1_SessionReset()
        reset.reason = reason
        partial.resetSent = true
        self.state = .awaitingClientIdent(partial)
        return HandshakeStep(send: [.frame(reset.frame(tag: .sessionReset))])
    }

    /// The reconnect may not proceed (an older attempt than one already accepted, or a
    /// contradiction): sends CLOSE with the error.
    public mutating func refuseResume(_ error: ParleyError) -> HandshakeStep {
        self.fail(error, tellPeer: true)
    }

    private func result(_ partial: Partial, client: Parley_V1_ClientIdent, ident: Parley_V1_ServerIdent, session: SessionOutcome) -> HandshakeResult {
        var result = HandshakeResult(
            peerBanner: partial.banner, features: partial.features, peerHello: partial.hello,
            authMethod: partial.method, globalID: partial.method == AuthMethod.secret ? self.configuration.globalID : 0,
            clientIdent: client, serverIdent: ident, connectionMode: partial.mode, cipher: partial.cipher,
            entity: partial.entity, capabilities: partial.capabilities
        )
        result.session = session
        return result
    }

    /// A client below the minimum version gets SERVER_IDENT with a refusal, then CLOSE.
    private mutating func refuseOutOfDate(_ client: Parley_V1_ClientIdent) -> HandshakeStep? {
        guard let minimum = self.configuration.minimumClientVersion, Negotiation.compareVersions(client.version, minimum) < 0 else { return nil }
        var ident = self.configuration.ident
        var message = Parley_V1_ServerMessage()
        message.priority = .high
        message.text = "\(client.implementation.isEmpty ? "client" : client.implementation) \(client.version.isEmpty ? "(no version)" : client.version) is out of date: this server needs version \(minimum) or later; please upgrade"
        ident.nucleus.messages.append(message)
        self.state = .failed
        let error = ParleyError(code: .clientOutOfDate, message: message.text)
        ident.refusal = error.status
        return HandshakeStep(
            send: [.frame(ident.frame(tag: .serverIdent)), .frame(error.status.frame(tag: .close))],
            outcome: .failed(error)
        )
    }

    /// Seconds since 1970 as an ISO 8601 date, for messages.
    static func date(_ seconds: Int64) -> String {
        ISO8601DateFormatter().string(from: Date(timeIntervalSince1970: TimeInterval(seconds)))
    }

    private var waitingFor: String {
        switch self.state {
        case .idle: return "start"
        case .awaitingBanner: return "the client banner"
        case .awaitingHello: return "HELLO"
        case .awaitingAuthRequest: return "AUTH_REQUEST"
        case .awaitingAuthProof: return "AUTH_REQUEST_MORE"
        case .awaitingClientIdent: return "CLIENT_IDENT"
        case .awaitingResumeDecision: return "nothing (deciding on a SESSION_RECONNECT)"
        case .established: return "nothing (established)"
        case .failed: return "nothing (failed)"
        }
    }

    private mutating func fail(_ error: ParleyError, tellPeer: Bool) -> HandshakeStep {
        self.state = .failed
        return .fail(error, tellPeer: tellPeer)
    }

    /// Fails with `error` (what the server logs) and tells the peer `peer` instead: the CLOSE
    /// of a failed method secret travels in the clear, and the entity name, which the
    /// handshake otherwise keeps sealed, stays out of it. The client knows its own name.
    private mutating func fail(_ error: ParleyError, peer: String) -> HandshakeStep {
        self.state = .failed
        var told = error
        told.message = peer
        return HandshakeStep(send: [.frame(told.status.frame(tag: .close))], outcome: .failed(error))
    }
}
