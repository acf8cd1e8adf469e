import Foundation
import NIOCore
import SwiftProtobuf

/// The client side of the handshake (docs/protocol.md, "Handshake").
///
/// The client's first flight is pipelined: banner, HELLO and AUTH_REQUEST go out together,
/// without waiting for the server (with CLIENT_IDENT too when `identInFirstFlight` and the
/// method is sure, R-6.1-5). Otherwise after AUTH_DONE the client sends CLIENT_IDENT; the
/// SERVER_IDENT that answers it establishes the connection.
///
/// ```
/// idle --start--> awaitingBanner --banner--> awaitingHello --HELLO--> awaitingAuth
/// awaitingAuth --AUTH_DONE--> awaitingServerIdent --SERVER_IDENT--> established
/// awaitingAuth --AUTH_BAD_METHOD--> failed (or retry with the next offered method)
/// any --CLOSE / error--> failed
/// ```
///
/// With method `secret` (docs/protocol.md, "Authentication method secret") AUTH_REPLY_MORE
/// carries the server's challenge; the client answers AUTH_REQUEST_MORE and sends CLIENT_IDENT
/// right after it (sealed in secure mode); AUTH_DONE must then prove the server's key.
///
/// Invariants: the machine owns no clock, channel or randomness (the nonce is passed in);
/// once `failed` or `established`, every further event is refused.
public struct ClientHandshakeStateMachine: Sendable {
    public struct Configuration: Sendable {
        public var banner: Banner
        public var maxFrameSize: UInt32
        public var authMethods: [String]
        public var ident: Parley_V1_ClientIdent
        /// The address at which this client sees the server.
        public var serverAddress: String
        /// The key of method `secret`.
        public var secret: SecretCredentials?
        /// Connection modes this client accepts, most preferred first. Without `crc` the
        /// client refuses any other outcome than secure mode.
        public var modes: [ConnectionMode]
        /// Ciphers for secure mode, most preferred first.
        public var ciphers: [SecureCipher]
        /// The challenge and key share of method `secret` (randomness comes from outside).
        public var randomness: HandshakeRandomness?
        /// The lossless session to resume (SESSION_RECONNECT in place of CLIENT_IDENT), if
        /// feature bit 9 is negotiated.
        public var resume: SessionResumeOffer?
        /// Put CLIENT_IDENT in the first flight when the outcome of the authentication is
        /// known in advance: one method without further rounds (`none`, `tls`), crc mode
        /// only, no session to resume (R-6.1-5). Without bit 9 in the banner the driver may
        /// then also send MESSAGEs in the first flight (`HandshakeStep.earlyMessages`).
        public var identInFirstFlight = false

        public init(
            banner: Banner, maxFrameSize: UInt32, authMethods: [String] = ["none"], ident: Parley_V1_ClientIdent, serverAddress: String,
            secret: SecretCredentials? = nil, modes: [ConnectionMode] = [.crc], ciphers: [SecureCipher] = SecureCipher.preferred,
            randomness: HandshakeRandomness? = nil
        ) {
            self.banner = banner
            self.maxFrameSize = maxFrameSize
            self.authMethods = authMethods
            self.ident = ident
            self.serverAddress = serverAddress
            self.secret = secret
            self.modes = modes
            self.ciphers = ciphers
            self.randomness = randomness
        }
    }

    private enum State: Sendable {
        case idle
        case awaitingBanner
        case awaitingHello(features: ParleyFeatures, banner: Banner)
        case awaitingAuth(Partial)
        case awaitingServerIdent(Partial)
        case established
        case failed
    }

    private struct Partial: Sendable {
        var banner: Banner
        var features: ParleyFeatures
        var hello: Parley_V1_Hello
        var methodIndex: Int
        var authDone: Parley_V1_AuthDone?
        /// Method `secret`, after AUTH_REPLY_MORE.
        var secret: SecretRound?
        var identSent = false
        /// MESSAGEs may follow CLIENT_IDENT at once (secure mode; R-6.1-6).
        var earlyMessagesAllowed = false
        /// SESSION_RECONNECT was sent in place of CLIENT_IDENT.
        var reconnectSent = false
        /// The server answered SESSION_RESET for this reason; CLIENT_IDENT followed.
        var resetReason: String?
    }

    /// What method `secret` settled when the server's challenge came.
    private struct SecretRound: Sendable {
        var schedule: SecretKeySchedule
        /// The transcript through AUTH_REQUEST_MORE (T2).
        var transcript: [UInt8]
        var mode: ConnectionMode
        var cipher: SecureCipher?
        var serverToClient: SecureDirectionKeys?
    }

    public let configuration: Configuration
    private var state: State = .idle
    /// CLIENT_IDENT went in the first flight (MESSAGEs may follow it without bit 9).
    private var identSentFirst = false
    /// Method secret's proof (AUTH_REQUEST_MORE) was sent: a refusal from here is of the
    /// entity this client authenticates as.
    private var secretProofSent = false
    /// MESSAGEs may follow a first-flight CLIENT_IDENT: not with bit 9 (a lossless session
    /// numbers its own messages).
    private var firstFlightMessagesAllowed: Bool {
        self.identSentFirst && !self.configuration.banner.supported.contains(.reconnect)
    }
    private var transcript = HandshakeTranscript()
    /// The X25519 public key sent with method `secret`.
    private var keyShare: [UInt8]?

    public init(configuration: Configuration) {
        self.configuration = configuration
    }

    /// Produces the first flight: banner, HELLO, AUTH_REQUEST (and CLIENT_IDENT, see
    /// `Configuration.identInFirstFlight`).
    public mutating func start() -> HandshakeStep {
        guard case .idle = self.state else { return self.poison("start called twice") }
        self.state = .awaitingBanner
        var hello = Parley_V1_Hello()
        hello.entityType = .client
        hello.peerAddress = self.configuration.serverAddress
        hello.maxFrameSize = self.configuration.maxFrameSize
        let helloFrame = hello.frame(tag: .hello)
        self.transcript.clientBanner = HandshakeTranscript.bannerBytes(self.configuration.banner)
        self.transcript.clientHello = Array(helloFrame.segments[0].readableBytesView)
        if self.configuration.authMethods.contains(AuthMethod.secret) {
            guard self.configuration.secret != nil, let randomness = self.configuration.randomness,
                  randomness.challenge.count == 32, let share = try? randomness.publicKey()
            else { return self.poison("method secret needs credentials and 32 bytes of challenge and a key share") }
            self.keyShare = share
        }
        var step = HandshakeStep(send: [
            .banner(self.configuration.banner),
            .frame(helloFrame),
            .frame(self.authRequestFrame(methodIndex: 0)),
        ])
        let methods = self.configuration.authMethods
        if self.configuration.identInFirstFlight, methods.count == 1, [AuthMethod.none, AuthMethod.tls].contains(methods[0]),
           self.configuration.modes == [.crc], self.configuration.resume == nil {
            // Nothing to wait for: AUTH_DONE can only confirm (or AUTH_BAD_METHOD end) it.
            step.send.append(.frame(self.configuration.ident.frame(tag: .clientIdent)))
            self.identSentFirst = true
            if self.firstFlightMessagesAllowed {
                // The server's features and limit are not known yet: MESSAGEs that need no
                // feature and fit any server's limit.
                step.earlyMessages = EarlyMessageTerms(features: [], peerMaxFrameSize: UInt32(Frame.minimumMaxFrameSize))
            }
        }
        return step
    }

    private mutating func authRequestFrame(methodIndex: Int) -> Frame {
        var auth = Parley_V1_AuthRequest()
        auth.method = self.configuration.authMethods[methodIndex]
        auth.offeredMethods = self.configuration.authMethods
        // Version 1 clients send no modes: a client that only accepts crc sends none either,
        // so that its bytes stay those of version 1.
        if self.configuration.modes != [.crc] {
            auth.offeredModes = self.configuration.modes.map(\.rawValue)
            if self.configuration.modes.contains(.secure) { auth.offeredCiphers = self.configuration.ciphers.map(\.rawValue) }
        }
        if auth.method == AuthMethod.secret, let secret = self.configuration.secret, let randomness = self.configuration.randomness {
            _ = secret
            var request = Parley_V1_SecretAuthRequest()
            request.clientChallenge = Data(randomness.challenge)
            request.clientKeyShare = Data(self.keyShare ?? (try? randomness.publicKey()) ?? [])
            auth.payload = (try? request.serializedBytes()) ?? Data()
        }
        let frame = auth.frame(tag: .authRequest)
        self.transcript.appendAuth(fromClient: true, frame: frame)
        return frame
    }

    public mutating func received(_ inbound: WireInbound) -> HandshakeStep {
        switch (self.state, inbound) {
        case (.awaitingBanner, .banner(let banner)):
            do {
                let features = try Negotiation.check(ours: self.configuration.banner, theirs: banner)
                self.state = .awaitingHello(features: features, banner: banner)
                return HandshakeStep()
            } catch {
                self.state = .failed
                return .fail(error, tellPeer: false)
            }
        case (.awaitingHello(let features, let banner), .frame(let frame)) where frame.tag == .hello:
            do {
                let hello = try Parley_V1_Hello(parleyPayload: frame.segments[0])
                guard hello.entityType == .server else {
                    return self.violation(ParleyError(code: .protocolViolation, message: "peer HELLO names entity type \(hello.entityType); a client expects a server"))
                }
                self.transcript.serverBanner = HandshakeTranscript.bannerBytes(banner)
                self.transcript.serverHello = Array(frame.segments[0].readableBytesView)
                var partial = Partial(banner: banner, features: features, hello: hello, methodIndex: 0)
                partial.identSent = self.identSentFirst
                partial.earlyMessagesAllowed = self.firstFlightMessagesAllowed
                self.state = .awaitingAuth(partial)
                return HandshakeStep()
            } catch {
                return self.violation(error)
            }
        case (.awaitingAuth(var partial), .frame(let frame)) where frame.tag == .authReplyMore:
            return self.secretChallenge(frame, partial: &partial)
        case (.awaitingAuth(var partial), .frame(let frame)) where frame.tag == .authDone:
            do {
                let done = try Parley_V1_AuthDone(parleyPayload: frame.segments[0])
                let asked = self.configuration.authMethods[partial.methodIndex]
                guard done.method == asked else {
                    return self.violation(ParleyError(code: .authenticationFailed, message: "server completed auth method \"\(done.method)\" but the client asked for \"\(asked)\""))
                }
                var step = HandshakeStep()
                if let round = partial.secret {
                    if let error = Self.checkSecretDone(done, round: round) { return self.violation(error) }
                    if let keys = round.serverToClient { step.startOpening = SecureSwitch(keys: keys) }
                } else {
                    if asked == AuthMethod.secret {
                        return self.violation(ParleyError(code: .authenticationFailed, message: "server sent AUTH_DONE for method secret without a challenge: it did not authenticate itself"))
                    }
                    guard done.connectionMode == "crc" || done.connectionMode.isEmpty else {
                        return self.violation(ParleyError(code: .authenticationFailed, message: "server chose connection mode \"\(done.connectionMode)\" with method \"\(asked)\", which cannot provide it"))
                    }
                    guard self.configuration.modes.contains(.crc) || asked == AuthMethod.tls else {
                        return self.violation(ParleyError(code: .authenticationFailed, message: "server completed method \"\(asked)\" in crc mode, but this client requires secure mode"))
                    }
                }
                partial.authDone = done
                if !partial.identSent {
                    step.send.append(.frame(self.identFrame(&partial)))
                }
                self.state = .awaitingServerIdent(partial)
                return step
            } catch {
                return self.violation(error)
            }
        case (.awaitingAuth(var partial), .frame(let frame)) where frame.tag == .authBadMethod:
            self.secretProofSent = false  // another method is tried: its refusals are not of the entity
            let bad: Parley_V1_AuthBadMethod
            do {
                bad = try Parley_V1_AuthBadMethod(parleyPayload: frame.segments[0])
            } catch {
                // R-4.7-3: a payload that does not decode is malformedPayload.
                return self.violation(error)
            }
            // Retry with the next offered method the server allows, if any.
            if let next = self.configuration.authMethods.indices.first(where: { $0 > partial.methodIndex && bad.allowedMethods.contains(self.configuration.authMethods[$0]) }) {
                partial.methodIndex = next
                self.state = .awaitingAuth(partial)
                self.transcript.appendAuth(fromClient: false, frame: frame)
                return HandshakeStep(send: [.frame(self.authRequestFrame(methodIndex: next))])
            }
            self.state = .failed
            return .fail(ParleyError(
                code: .authenticationFailed,
                message: "no common authentication method: client offers \(self.configuration.authMethods), server allows \(bad.allowedMethods)\(bad.reason.isEmpty ? "" : " (\(bad.reason))")"
            ), tellPeer: true)
        case (.awaitingServerIdent(var partial), .frame(let frame)) where frame.tag == .sessionReset && partial.reconnectSent && partial.resetReason == nil:
            do {
                let reset = try Parley_V1_SessionReset(parleyPayload: frame.segments[0])
                partial.resetReason = reset.reason.isEmpty ? "the server does not have the session" : reset.reason
                self.state = .awaitingServerIdent(partial)
                return HandshakeStep(send: [.frame(self.configuration.ident.frame(tag: .clientIdent))])
            } catch {
                return self.violation(error)
            }
        case (.awaitingServerIdent(let partial), .frame(let frame)) where frame.tag == .sessionResumed && partial.reconnectSent && partial.resetReason == nil:
            do {
                let resumed = try Parley_V1_SessionResumed(parleyPayload: frame.segments[0])
                guard let offer = self.configuration.resume, Array(resumed.ident.sessionToken) == offer.token else {
                    return self.violation(ParleyError(code: .protocolViolation, message: "SESSION_RESUMED names another session than the one asked for"))
                }
                return self.establish(partial, ident: resumed.ident, session: .resumed(token: offer.token, peerLastReceived: resumed.lastReceivedSeq, connectSeq: offer.connectSeq))
            } catch {
                return self.violation(error)
            }
        case (.awaitingServerIdent(let partial), .frame(let frame)) where frame.tag == .serverIdent:
            do {
                let ident = try Parley_V1_ServerIdent(parleyPayload: frame.segments[0])
                if ident.hasRefusal {
                    // Also in answer to SESSION_RECONNECT: the server refuses an out-of-date
                    // client before it looks the session up (docs/protocol.md 5.2, check 1).
                    self.state = .failed
                    // The refusing SERVER_IDENT's other messages are shown too (docs/protocol.md 8.4).
                    var error = ParleyError(status: ident.refusal)
                    if error.message.allSatisfy(\.isWhitespace) {
                        error.message = "the server refused this client: no reason given"
                    }
                    for m in ident.nucleus.messages where m.text != error.message {
                        error.message += "\nserver message [\(m.priority == .high ? "high" : "low")]: \(m.text)"
                    }
                    return HandshakeStep(outcome: .failed(error))
                }
                guard !partial.reconnectSent || partial.resetReason != nil else {
                    return self.violation(ParleyError(code: .unexpectedFrame, message: "SERVER_IDENT without a refusal in answer to SESSION_RECONNECT (expected SESSION_RESUMED or SESSION_RESET)"))
                }
                var session = SessionOutcome.lossy
                if partial.features.contains(.reconnect) {
                    guard ident.sessionToken.count == SessionToken.size else {
                        return self.violation(ParleyError(code: .malformedPayload, message: "SERVER_IDENT of a lossless session must carry a 16-byte session token, got \(ident.sessionToken.count) bytes"))
                    }
                    session = .started(token: Array(ident.sessionToken))
                }
                if let reason = partial.resetReason {
                    session = .reset(reason: reason, token: Array(ident.sessionToken))
                } else if self.configuration.resume != nil {
                    // A session was to be resumed but the server no longer offers bit 9.
                    session = .reset(reason: "the server no longer offers lossless sessions (feature bit 9)", token: Array(ident.sessionToken))
                }
                return self.establish(partial, ident: ident, session: session)
            } catch {
                return self.violation(error)
            }
        case (.idle, _), (.established, _), (.failed, _):
            return self.poison("event \(inbound.summary) in a finished or unstarted client handshake")
        case (_, .banner):
            return self.violation(ParleyError(code: .protocolViolation, message: "second banner received"))
        case (_, .frame(let frame)):
            switch Negotiation.stray(frame, waitingFor: self.waitingFor) {
            case .ignore: return HandshakeStep()
            case .peerClosed(var error):
                self.state = .failed
                // The server leaves the entity name out of a refusal sent in the clear: the
                // client names the entity it authenticated as.
                if error.code == .authenticationFailed, self.secretProofSent, let secret = self.configuration.secret {
                    error.message = "as \"\(secret.entity)\": " + error.message
                }
                return HandshakeStep(outcome: .failed(error))
            case .violation(let error): return self.violation(error)
            }
        }
    }

    /// The frame that identifies the client: SESSION_RECONNECT when a session is to be
    /// resumed and bit 9 was negotiated, CLIENT_IDENT otherwise.
    private func identFrame(_ partial: inout Partial) -> Frame {
        partial.identSent = true
        guard let offer = self.configuration.resume, partial.features.contains(.reconnect) else {
            return self.configuration.ident.frame(tag: .clientIdent)
        }
        partial.reconnectSent = true
        var reconnect = Parley_V1_SessionReconnect()
        reconnect.ident = self.configuration.ident
        reconnect.sessionToken = Data(offer.token)
        reconnect.serverNonce = offer.serverNonce
        reconnect.lastReceivedSeq = offer.lastReceivedSeq
        reconnect.connectSeq = offer.connectSeq
        return reconnect.frame(tag: .sessionReconnect)
    }

    private mutating func establish(_ partial: Partial, ident: Parley_V1_ServerIdent, session: SessionOutcome) -> HandshakeStep {
        self.state = .established
        let done = partial.authDone ?? Parley_V1_AuthDone()
        var result = HandshakeResult(
            peerBanner: partial.banner, features: partial.features, peerHello: partial.hello,
            authMethod: done.method, globalID: done.globalID,
            clientIdent: self.configuration.ident, serverIdent: ident,
            connectionMode: partial.secret?.mode ?? .crc, cipher: partial.secret?.cipher,
            entity: partial.secret?.schedule.entity ?? (done.entity.isEmpty ? nil : done.entity)
        )
        result.session = session
        result.earlyMessagesAllowed = partial.earlyMessagesAllowed
        return HandshakeStep(outcome: .established(result))
    }

    /// AUTH_REPLY_MORE of method `secret`: checks the server's choices, proves the key,
    /// MACs the transcript and, since the keys are now known, sends CLIENT_IDENT at once
    /// (sealed in secure mode) without waiting for AUTH_DONE.
    private mutating func secretChallenge(_ frame: Frame, partial: inout Partial) -> HandshakeStep {
        let method = self.configuration.authMethods[partial.methodIndex]
        guard method == AuthMethod.secret, partial.secret == nil, let secret = self.configuration.secret,
              let randomness = self.configuration.randomness
        else {
            return self.violation(ParleyError(code: .unexpectedFrame, message: "unexpected AUTH_REPLY_MORE frame: method \"\(method)\" has no further rounds"))
        }
        let challenge: Parley_V1_SecretAuthChallenge
        do {
            let more = try Parley_V1_AuthMore(parleyPayload: frame.segments[0])
            challenge = try Parley_V1_SecretAuthChallenge(serializedBytes: more.payload)
        } catch {
            return self.violation(ParleyError(code: .malformedPayload, message: "AUTH_REPLY_MORE payload is not a SecretAuthChallenge"))
        }
        guard challenge.serverChallenge.count == 32, challenge.serverKeyShare.count == 32 else {
            return self.violation(ParleyError(code: .malformedPayload, message: "secret challenge must carry a 32-byte challenge and a 32-byte key share (got \(challenge.serverChallenge.count) and \(challenge.serverKeyShare.count))"))
        }
        guard let mode = ConnectionMode(rawValue: challenge.connectionMode), self.configuration.modes.contains(mode) else {
            return self.violation(ParleyError(code: .authenticationFailed, message: "server chose connection mode \"\(challenge.connectionMode)\"; this client accepts \(self.configuration.modes.map(\.rawValue))"))
        }
        var cipher: SecureCipher?
        if mode == .secure {
            guard partial.features.contains(.secureMode) else {
                return self.violation(ParleyError(code: .handshakeTampered, message: "server chose secure mode although the banners did not negotiate it: the handshake was altered"))
            }
            guard let chosen = SecureCipher(rawValue: challenge.cipher), self.configuration.ciphers.contains(chosen) else {
                return self.violation(ParleyError(code: .authenticationFailed, message: "server chose cipher \"\(challenge.cipher)\"; this client accepts \(self.configuration.ciphers.map(\.rawValue))"))
            }
            cipher = chosen
        }
        let shared: [UInt8]
        do {
            shared = try randomness.sharedSecret(peerPublicKey: Array(challenge.serverKeyShare))
        } catch {
            return self.violation(error)
        }
        self.transcript.appendAuth(fromClient: false, frame: frame)
        let schedule = SecretKeySchedule(
            entity: secret.entity, key: secret.key, clientChallenge: randomness.challenge,
            serverChallenge: Array(challenge.serverChallenge), sharedSecret: shared
        )
        var proof = Parley_V1_SecretAuthProof()
        proof.sealedEntity = Data(SecretIdentity.seal(
            entity: secret.entity, clientChallenge: randomness.challenge, serverChallenge: Array(challenge.serverChallenge), sharedSecret: shared
        ))
        proof.clientProof = Data(schedule.clientProof)
        proof.transcriptMac = Data(schedule.clientTranscriptMAC(self.transcript.digest()))
        var more = Parley_V1_AuthMore()
        more.payload = (try? proof.serializedBytes()) ?? Data()
        let moreFrame = more.frame(tag: .authRequestMore)
        self.secretProofSent = true
        self.transcript.appendAuth(fromClient: true, frame: moreFrame)
        let t2 = self.transcript.digest()
        var round = SecretRound(schedule: schedule, transcript: t2, mode: mode, cipher: cipher)
        var step = HandshakeStep(send: [.frame(moreFrame)])
        if let cipher {
            let keys = schedule.trafficKeys(cipher: cipher, transcript: t2)
            round.serverToClient = keys.serverToClient
            step.send.append(.startSealing(SecureSwitch(keys: keys.clientToServer)))
        }
        step.send.append(.frame(self.identFrame(&partial)))
        // Sealed under keys only the holder of the entity's key can derive, to a server that
        // has checked the client's proof and transcript before it opens them: MESSAGEs may
        // follow at once (R-6.1-6). Not in crc mode (they would travel in the clear before
        // AUTH_DONE proves nobody forced crc mode) and not with bit 9 (a lossless session
        // numbers and keeps its messages itself; SESSION_RECONNECT goes only with bit 9).
        if cipher != nil, !partial.features.contains(.reconnect) {
            partial.earlyMessagesAllowed = true
            step.earlyMessages = EarlyMessageTerms(features: partial.features, peerMaxFrameSize: partial.hello.maxFrameSize)
        }
        partial.secret = round
        self.state = .awaitingAuth(partial)
        return step
    }

    /// Checks the AUTH_DONE of method `secret`: the server's proof of the key, its MAC of the
    /// transcript and AUTH_DONE's own fields, and that it repeats the challenge's choices.
    private static func checkSecretDone(_ done: Parley_V1_AuthDone, round: SecretRound) -> ParleyError? {
        guard let payload = try? Parley_V1_SecretAuthDone(serializedBytes: done.payload) else {
            return ParleyError(code: .malformedPayload, message: "AUTH_DONE payload is not a SecretAuthDone")
        }
        guard SecretKeySchedule.equal(Array(payload.serverProof), round.schedule.serverProof) else {
            return ParleyError(
                code: .authenticationFailed,
                message: "the server did not prove it holds the key of \(round.schedule.entity): its keyring has another key, or it is not the server it claims to be"
            )
        }
        guard SecretKeySchedule.equal(Array(payload.transcriptMac), round.schedule.serverTranscriptMAC(round.transcript, globalID: done.globalID)) else {
            return ParleyError(code: .handshakeTampered, message: "the server's handshake transcript differs from ours: the handshake was altered in transit (a man in the middle?)")
        }
        guard done.connectionMode == round.mode.rawValue, done.cipher == (round.cipher?.rawValue ?? "") else {
            return ParleyError(
                code: .handshakeTampered,
                message: "AUTH_DONE says mode \"\(done.connectionMode)\" cipher \"\(done.cipher)\" but the authenticated challenge said \"\(round.mode)\" \"\(round.cipher?.rawValue ?? "")\": the handshake was altered"
            )
        }
        return nil
    }

    private var waitingFor: String {
        switch self.state {
        case .idle: return "start"
        case .awaitingBanner: return "the server banner"
        case .awaitingHello: return "HELLO"
        case .awaitingAuth: return "AUTH_DONE or AUTH_BAD_METHOD"
        case .awaitingServerIdent(let p): return p.reconnectSent && p.resetReason == nil ? "SESSION_RESUMED or SESSION_RESET" : "SERVER_IDENT"
        case .established: return "nothing (established)"
        case .failed: return "nothing (failed)"
        }
    }

    private mutating func violation(_ error: ParleyError) -> HandshakeStep {
        self.state = .failed
        return .fail(error, tellPeer: true)
    }

    /// Our own misuse of the machine (not the peer's fault): fail without blaming the peer.
    private mutating func poison(_ what: String) -> HandshakeStep {
        self.state = .failed
        return .fail(ParleyError(code: .protocolViolation, message: "internal: \(what)"), tellPeer: false)
    }
}

extension WireInbound {
    var summary: String {
        switch self {
        case .banner: return "banner"
        case .frame(let f): return "\(f.tag) frame"
        }
    }
}
