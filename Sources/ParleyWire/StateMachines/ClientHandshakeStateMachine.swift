/// The client side of the handshake (docs/protocol.md, "Handshake").
///
/// The client's first flight is pipelined: banner, HELLO and AUTH_REQUEST go out together,
/// without waiting for the server. After AUTH_DONE the client sends CLIENT_IDENT; the
/// SERVER_IDENT that answers it establishes the connection.
///
/// ```
/// idle --start--> awaitingBanner --banner--> awaitingHello --HELLO--> awaitingAuth
/// awaitingAuth --AUTH_DONE--> awaitingServerIdent --SERVER_IDENT--> established
/// awaitingAuth --AUTH_BAD_METHOD--> failed (or retry with the next offered method)
/// any --CLOSE / error--> failed
/// ```
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

        public init(banner: Banner, maxFrameSize: UInt32, authMethods: [String] = ["none"], ident: Parley_V1_ClientIdent, serverAddress: String) {
            self.banner = banner
            self.maxFrameSize = maxFrameSize
            self.authMethods = authMethods
            self.ident = ident
            self.serverAddress = serverAddress
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
    }

    public let configuration: Configuration
    private var state: State = .idle

    public init(configuration: Configuration) {
        self.configuration = configuration
    }

    /// Produces the first flight: banner, HELLO, AUTH_REQUEST.
    public mutating func start() -> HandshakeStep {
        guard case .idle = self.state else { return self.poison("start called twice") }
        self.state = .awaitingBanner
        var hello = Parley_V1_Hello()
        hello.entityType = .client
        hello.peerAddress = self.configuration.serverAddress
        hello.maxFrameSize = self.configuration.maxFrameSize
        return HandshakeStep(send: [
            .banner(self.configuration.banner),
            .frame(hello.frame(tag: .hello)),
            .frame(self.authRequest(methodIndex: 0).frame(tag: .authRequest)),
        ])
    }

    private func authRequest(methodIndex: Int) -> Parley_V1_AuthRequest {
        var auth = Parley_V1_AuthRequest()
        auth.method = self.configuration.authMethods[methodIndex]
        auth.offeredMethods = self.configuration.authMethods
        return auth
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
                self.state = .awaitingAuth(Partial(banner: banner, features: features, hello: hello, methodIndex: 0))
                return HandshakeStep()
            } catch {
                return self.violation(error)
            }
        case (.awaitingAuth(var partial), .frame(let frame)) where frame.tag == .authDone:
            do {
                let done = try Parley_V1_AuthDone(parleyPayload: frame.segments[0])
                let asked = self.configuration.authMethods[partial.methodIndex]
                guard done.method == asked else {
                    return self.violation(ParleyError(code: .authenticationFailed, message: "server completed auth method \"\(done.method)\" but the client asked for \"\(asked)\""))
                }
                guard done.connectionMode == "crc" || done.connectionMode.isEmpty else {
                    return self.violation(ParleyError(code: .authenticationFailed, message: "server chose connection mode \"\(done.connectionMode)\"; this client supports \"crc\""))
                }
                partial.authDone = done
                self.state = .awaitingServerIdent(partial)
                return HandshakeStep(send: [.frame(self.configuration.ident.frame(tag: .clientIdent))])
            } catch {
                return self.violation(error)
            }
        case (.awaitingAuth(var partial), .frame(let frame)) where frame.tag == .authBadMethod:
            let bad = (try? Parley_V1_AuthBadMethod(parleyPayload: frame.segments[0])) ?? Parley_V1_AuthBadMethod()
            // Retry with the next offered method the server allows, if any.
            if let next = self.configuration.authMethods.indices.first(where: { $0 > partial.methodIndex && bad.allowedMethods.contains(self.configuration.authMethods[$0]) }) {
                partial.methodIndex = next
                self.state = .awaitingAuth(partial)
                return HandshakeStep(send: [.frame(self.authRequest(methodIndex: next).frame(tag: .authRequest))])
            }
            self.state = .failed
            return .fail(ParleyError(
                code: .authenticationFailed,
                message: "no common authentication method: client offers \(self.configuration.authMethods), server allows \(bad.allowedMethods)\(bad.reason.isEmpty ? "" : " (\(bad.reason))")"
            ), tellPeer: true)
        case (.awaitingServerIdent(let partial), .frame(let frame)) where frame.tag == .serverIdent:
            do {
                let ident = try Parley_V1_ServerIdent(parleyPayload: frame.segments[0])
                if ident.hasRefusal {
                    self.state = .failed
                    return HandshakeStep(outcome: .failed(ParleyError(status: ident.refusal)))
                }
                self.state = .established
                return HandshakeStep(outcome: .established(HandshakeResult(
                    peerBanner: partial.banner, features: partial.features, peerHello: partial.hello,
                    authMethod: partial.authDone?.method ?? "", globalID: partial.authDone?.globalID ?? 0,
                    clientIdent: self.configuration.ident, serverIdent: ident
                )))
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
            case .peerClosed(let error):
                self.state = .failed
                return HandshakeStep(outcome: .failed(error))
            case .violation(let error): return self.violation(error)
            }
        }
    }

    private var waitingFor: String {
        switch self.state {
        case .idle: return "start"
        case .awaitingBanner: return "the server banner"
        case .awaitingHello: return "HELLO"
        case .awaitingAuth: return "AUTH_DONE or AUTH_BAD_METHOD"
        case .awaitingServerIdent: return "SERVER_IDENT"
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
