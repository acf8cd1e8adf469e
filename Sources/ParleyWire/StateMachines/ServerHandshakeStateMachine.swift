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

        public init(
            banner: Banner, maxFrameSize: UInt32, authMethods: [String] = ["none"], ident: Parley_V1_ServerIdent,
            minimumClientVersion: String? = nil, clientAddress: String, maxAuthAttempts: Int = 3
        ) {
            self.banner = banner
            self.maxFrameSize = maxFrameSize
            self.authMethods = authMethods
            self.ident = ident
            self.minimumClientVersion = minimumClientVersion
            self.clientAddress = clientAddress
            self.maxAuthAttempts = maxAuthAttempts
        }
    }

    private enum State: Sendable {
        case idle
        case awaitingBanner
        case awaitingHello(Partial)
        case awaitingAuthRequest(Partial)
        case awaitingClientIdent(Partial)
        case established
        case failed
    }

    private struct Partial: Sendable {
        var banner: Banner
        var features: ParleyFeatures
        var hello = Parley_V1_Hello()
        var authAttempts = 0
        var method = ""
    }

    public let configuration: Configuration
    private var state: State = .idle

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
        return HandshakeStep(send: [.banner(self.configuration.banner), .frame(hello.frame(tag: .hello))])
    }

    public mutating func received(_ inbound: WireInbound) -> HandshakeStep {
        switch (self.state, inbound) {
        case (.awaitingBanner, .banner(let banner)):
            do {
                let features = try Negotiation.check(ours: self.configuration.banner, theirs: banner)
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
                self.state = .awaitingAuthRequest(partial)
                return HandshakeStep()
            } catch {
                return self.fail(error, tellPeer: true)
            }
        case (.awaitingAuthRequest(var partial), .frame(let frame)) where frame.tag == .authRequest:
            do {
                let request = try Parley_V1_AuthRequest(parleyPayload: frame.segments[0])
                partial.authAttempts += 1
                guard self.configuration.authMethods.contains(request.method) else {
                    guard partial.authAttempts < self.configuration.maxAuthAttempts else {
                        return self.fail(ParleyError(
                            code: .authenticationFailed,
                            message: "authentication failed after \(partial.authAttempts) attempts: last method \"\(request.method)\", server allows \(self.configuration.authMethods)"
                        ), tellPeer: true)
                    }
                    self.state = .awaitingAuthRequest(partial)
                    var bad = Parley_V1_AuthBadMethod()
                    bad.method = request.method
                    bad.allowedMethods = self.configuration.authMethods
                    bad.reason = "method \"\(request.method)\" is not enabled on this server"
                    return HandshakeStep(send: [.frame(bad.frame(tag: .authBadMethod))])
                }
                partial.method = request.method
                self.state = .awaitingClientIdent(partial)
                var done = Parley_V1_AuthDone()
                done.method = request.method
                done.connectionMode = "crc"
                return HandshakeStep(send: [.frame(done.frame(tag: .authDone))])
            } catch {
                return self.fail(error, tellPeer: true)
            }
        case (.awaitingClientIdent(let partial), .frame(let frame)) where frame.tag == .clientIdent:
            do {
                let client = try Parley_V1_ClientIdent(parleyPayload: frame.segments[0])
                var ident = self.configuration.ident
                if let minimum = self.configuration.minimumClientVersion,
                   Negotiation.compareVersions(client.version, minimum) < 0 {
                    var message = Parley_V1_ServerMessage()
                    message.priority = .high
                    message.text = "\(client.implementation.isEmpty ? "client" : client.implementation) \(client.version) is out of date: this server needs version \(minimum) or later; please upgrade"
                    ident.nucleus.messages.append(message)
                    self.state = .failed
                    let error = ParleyError(code: .clientOutOfDate, message: message.text)
                    ident.refusal = error.status
                    return HandshakeStep(
                        send: [.frame(ident.frame(tag: .serverIdent)), .frame(error.status.frame(tag: .close))],
                        outcome: .failed(error)
                    )
                }
                self.state = .established
                return HandshakeStep(
                    send: [.frame(ident.frame(tag: .serverIdent))],
                    outcome: .established(HandshakeResult(
                        peerBanner: partial.banner, features: partial.features, peerHello: partial.hello,
                        authMethod: partial.method, globalID: 0, clientIdent: client, serverIdent: ident
                    ))
                )
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

    private var waitingFor: String {
        switch self.state {
        case .idle: return "start"
        case .awaitingBanner: return "the client banner"
        case .awaitingHello: return "HELLO"
        case .awaitingAuthRequest: return "AUTH_REQUEST"
        case .awaitingClientIdent: return "CLIENT_IDENT"
        case .established: return "nothing (established)"
        case .failed: return "nothing (failed)"
        }
    }

    private mutating func fail(_ error: ParleyError, tellPeer: Bool) -> HandshakeStep {
        self.state = .failed
        return .fail(error, tellPeer: tellPeer)
    }
}
