import Foundation
import NIOCore
import NIOSSL
import NIOTLS
import ParleyWire

/// The TLS layer of `tls://` and `wss://` channels: NIOSSL's handler, then a
/// `TLSHandshakeHandler` that reports the handshake's outcome.
enum TLSPipeline {
    /// Adds the client side of TLS to a fresh channel; returns the handler whose `completed`
    /// future tells how the handshake went.
    /// - Parameters:
    ///   - host: the host dialled: sent as SNI and matched against the server's certificate
    ///     (an IP address is matched against the certificate's IP addresses, without SNI).
    ///   - peer: the address dialled, for error messages.
    static func addClient(
        to channel: any Channel, context: NIOSSLContext, host: String, peer: String, tls: ParleyTLS, timeout: TimeAmount
    ) throws -> TLSHandshakeHandler {
        let isIPAddress = (try? SocketAddress(ipAddress: host, port: 0)) != nil
        let ssl = try NIOSSLClientHandler(context: context, serverHostname: isIPAddress ? nil : host)
        let handshake = TLSHandshakeHandler(
            role: .client(host: host, peer: peer, trustRootsSource: tls.trustRootsSource), peerVerified: true, timeout: timeout
        )
        try channel.pipeline.syncOperations.addHandlers(ssl, handshake)
        return handshake
    }

    /// Adds the server side of TLS to an accepted channel.
    static func addServer(to channel: any Channel, context: NIOSSLContext, tls: ParleyTLS, timeout: TimeAmount) throws -> TLSHandshakeHandler {
        let handshake = TLSHandshakeHandler(
            role: .server, peerVerified: tls.trustRoots != nil && tls.clientCertificates != .none, timeout: timeout
        )
        try channel.pipeline.syncOperations.addHandlers(NIOSSLServerHandler(context: context), handshake)
        return handshake
    }
}

/// A TLS error in words (what NIOSSL reported is `underlying`).
struct TLSFailure: Error, CustomStringConvertible {
    var reason: String
    var underlying: any Error
    var description: String { "TLS: \(self.reason)" }
}

/// Placed right after NIOSSL's handler. When the TLS handshake completes it fires
/// `TransportSecurityEvent` (the protocol version and the verified peer's common name) down
/// the pipeline, where the Parley handler picks it up for the `tls` authentication method;
/// NIOSSL delivers no application byte before that, so the event always comes first.
///
/// It also completes `completed`, with the event or with a readable reason the handshake
/// failed (NIOSSL reports BoringSSL's error stack), so that a client's connect can fail with
/// that reason rather than with a generic "connection closed"; and it closes a channel whose
/// handshake has not completed within `timeout` (a peer that connects and says nothing).
final class TLSHandshakeHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny

    enum Role {
        case server
        /// `host` (dialled), `peer` (HOST:PORT) and `trustRootsSource` (the CA file) are
        /// named in errors.
        case client(host: String, peer: String, trustRootsSource: String?)
    }

    private let role: Role
    /// The peer's certificate was verified (a client always verifies the server's; a server
    /// only when it asks for client certificates): only then does it name an entity.
    private let peerVerified: Bool
    private let timeout: TimeAmount
    private var promise: EventLoopPromise<TransportSecurityEvent>?
    private var timer: Scheduled<Void>?
    /// The event fired, kept for pipelines that add the Parley handler later (WebSocket).
    private(set) var event: TransportSecurityEvent?

    init(role: Role, peerVerified: Bool, timeout: TimeAmount) {
        self.role = role
        self.peerVerified = peerVerified
        self.timeout = timeout
    }

    /// The handshake's outcome: the security event, or a `ParleyError` saying why it failed.
    /// Set once the handler is in a pipeline.
    private(set) var completed: EventLoopFuture<TransportSecurityEvent>!

    func handlerAdded(context: ChannelHandlerContext) {
        let promise = context.eventLoop.makePromise(of: TransportSecurityEvent.self)
        self.promise = promise
        self.completed = promise.futureResult
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        self.timer = context.eventLoop.scheduleTask(in: self.timeout) {
            let (handler, context) = loopBound.value
            let seconds = Double(handler.timeout.nanoseconds) / 1e9
            handler.fail(handler.error("no TLS handshake within \(seconds) s"))
            context.close(promise: nil)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.fail(self.error("the TLS handler was removed before the handshake completed"))
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let tlsEvent = event as? TLSUserEvent, case .handshakeCompleted = tlsEvent, self.event == nil {
            context.fireUserInboundEventTriggered(event)
            let ssl = try? context.pipeline.syncOperations.handler(type: NIOSSLHandler.self)
            let entity = self.peerVerified ? ssl?.peerCertificate?.subjectName.last(where: { $0.type == .commonName })?.value : nil
            let security = TransportSecurityEvent(protocolName: Self.name(ssl?.tlsVersion), peerEntity: entity)
            self.event = security
            self.timer?.cancel()
            self.timer = nil
            context.fireUserInboundEventTriggered(security)
            let promise = self.promise
            self.promise = nil
            promise?.succeed(security)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard error is NIOSSLError || error is NIOSSLExtraError || error is BoringSSLError else { return context.fireErrorCaught(error) }
        let reason = Self.reason(error, role: self.role)
        if self.promise != nil {
            self.fail(self.error(reason))
        }
        // The Parley handler reports it as the reason the connection closed: in words, not
        // as BoringSSL's error stack.
        context.fireErrorCaught(TLSFailure(reason: reason, underlying: error))
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.fail(self.error("the connection closed during the TLS handshake"))
        context.fireChannelInactive()
    }

    private func fail(_ error: ParleyError) {
        self.timer?.cancel()
        self.timer = nil
        let promise = self.promise
        self.promise = nil
        promise?.fail(error)
    }

    private func error(_ why: String) -> ParleyError {
        switch self.role {
        case .client(_, let peer, _):
            return ParleyError(code: .connectFailed, message: "TLS handshake with \(peer) failed: \(why)")
        case .server:
            return ParleyError(code: .authenticationFailed, message: "TLS handshake failed: \(why)")
        }
    }

    static func name(_ version: TLSVersion?) -> String {
        switch version {
        case .tlsv1: return "TLSv1.0"
        case .tlsv11: return "TLSv1.1"
        case .tlsv12: return "TLSv1.2"
        case .tlsv13: return "TLSv1.3"
        case nil: return "TLS"
        }
    }

    /// A readable reason for a failed handshake: BoringSSL's reason code in words, with what
    /// it usually means here.
    static func reason(_ error: any Error, role: Role) -> String {
        if let error = error as? NIOSSLExtraError, error == .failedToValidateHostname {
            if case .client(let host, _, _) = role {
                return "the server's certificate is not valid for \(host), the host dialled (hostname verification: it is not among the certificate's names)"
            }
            return "\(error)"
        }
        let stack: NIOBoringSSLErrorStack
        switch (error as? NIOSSLError, error as? BoringSSLError) {
        case (.handshakeFailed(.sslError(let s)), _), (.handshakeFailed(.unknownError(let s)), _),
            (_, .sslError(let s)), (_, .unknownError(let s)):
            stack = s
        case (.uncleanShutdown, _): return "the peer closed the connection without a TLS close"
        default: return "\(error)"
        }
        // "Error: 268435581 error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED at handshake.cc:393"
        let codes = stack.compactMap { e -> String? in
            let parts = "\(e)".split(separator: ":", maxSplits: 5)
            guard parts.count >= 6 else { return nil }
            return String(parts[5].split(separator: " ").first ?? parts[5])
        }
        guard let code = codes.first else { return "\(error)" }
        let words = code.lowercased().replacingOccurrences(of: "_", with: " ")
        var peerRole = "peer"
        var trust = ""
        if case .client(_, _, let source) = role {
            peerRole = "server"
            if let source { trust = " in \(source)" }
        }
        switch code {
        case "CERTIFICATE_VERIFY_FAILED":
            return "\(words) (untrusted certificate: the \(peerRole)'s certificate is not signed by a trusted CA\(trust), or has expired)"
        case "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_DECRYPT_ERROR":
            return "\(words) (the \(peerRole) refused our certificate)"
        case "TLSV1_CERTIFICATE_REQUIRED", "PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV1_ALERT_CERTIFICATE_REQUIRED":
            return "\(words) (the server requires a client certificate)"
        case "WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_RECORD":
            return "\(words) (the \(peerRole) does not speak TLS here)"
        case "UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION":
            return "\(words) (the \(peerRole) does not offer TLS 1.3)"
        default:
            return words
        }
    }
}
