import Foundation
import NIOSSL
import ParleyWire

/// The TLS settings of a transport: which certificate this side presents, which CA it trusts
/// for the peer's, and how strictly the peer is checked. One value serves both roles: a
/// server's transport uses it to accept (`tls://`, `wss://` listeners), a client's to connect.
///
/// Only TLS 1.3 is offered. A server always presents its certificate; when it has trust roots
/// it also asks clients for theirs (`clientCertificates`), which makes the TLS session carry
/// the client's entity name (its certificate's common name) for the `tls` authentication
/// method. A client verifies the server's certificate against its trust roots and, by
/// default, that the certificate names the host it dialled (a DNS name or an IP address in
/// the subject alternative names).
///
/// `parley cert init` and `parley cert issue` write the files `server(directory:)` and
/// `client(directory:name:)` read.
public struct ParleyTLS: Sendable {
    /// Whether a server asks for and checks client certificates.
    public enum ClientCertificates: Sendable, Hashable {
        /// Not asked for: server-only TLS.
        case none
        /// Asked for and verified when presented; a client without one is still accepted
        /// (and has no TLS entity).
        case optional
        /// Asked for and verified; a client without one fails the handshake.
        case required
    }

    /// This side's certificate first, then any intermediates. Empty: present none (a client
    /// without an identity).
    public var certificateChain: [NIOSSLCertificate]
    /// The private key of `certificateChain[0]`.
    public var privateKey: NIOSSLPrivateKey?
    /// The CAs the peer's certificate must chain to; nil: the system's trust store (a client
    /// only; a server without trust roots asks for no client certificate).
    public var trustRoots: [NIOSSLCertificate]?
    /// Server side: whether clients are asked for certificates (ignored without `trustRoots`).
    public var clientCertificates: ClientCertificates
    /// Client side: check that the server's certificate names the host in the address.
    public var verifyHostname: Bool
    /// Where `trustRoots` were read from, named in verification errors.
    public var trustRootsSource: String?

    /// - Parameters:
    ///   - certificateChain: the certificate this side presents, then its intermediates.
    ///   - privateKey: the key of the first certificate; needed when a chain is given.
    ///   - trustRoots: the CAs trusted for the peer's certificate (nil: the system's, client only).
    ///   - clientCertificates: server side: whether to ask for client certificates.
    ///   - verifyHostname: client side: check the server's certificate names the host dialled.
    public init(
        certificateChain: [NIOSSLCertificate] = [], privateKey: NIOSSLPrivateKey? = nil, trustRoots: [NIOSSLCertificate]? = nil,
        clientCertificates: ClientCertificates = .optional, verifyHostname: Bool = true
    ) {
        self.certificateChain = certificateChain
        self.privateKey = privateKey
        self.trustRoots = trustRoots
        self.clientCertificates = clientCertificates
        self.verifyHostname = verifyHostname
    }

    /// A server's settings from a directory written by `parley cert init`: presents
    /// `server.pem` (key `server.key`) and, unless `clientCertificates` is `.none`, trusts
    /// `ca.pem` for client certificates.
    public static func server(directory: String, clientCertificates: ClientCertificates = .optional) throws(ParleyError) -> ParleyTLS {
        let dir = URL(fileURLWithPath: directory)
        var tls = ParleyTLS(
            certificateChain: try Self.loadCertificates(dir.appendingPathComponent("server.pem").path),
            privateKey: try Self.loadPrivateKey(dir.appendingPathComponent("server.key").path),
            clientCertificates: clientCertificates
        )
        if clientCertificates != .none {
            let ca = dir.appendingPathComponent("ca.pem").path
            tls.trustRoots = try Self.loadCertificates(ca)
            tls.trustRootsSource = ca
        }
        return tls
    }

    /// A client's settings from a directory written by `parley cert init`: trusts `ca.pem`,
    /// and presents `NAME.pem` (key `NAME.key`) when `name` is given and that certificate
    /// exists (`parley cert issue NAME`).
    public static func client(directory: String, name: String? = nil) throws(ParleyError) -> ParleyTLS {
        let dir = URL(fileURLWithPath: directory)
        let ca = dir.appendingPathComponent("ca.pem").path
        var tls = ParleyTLS(trustRoots: try Self.loadCertificates(ca))
        tls.trustRootsSource = ca
        if let name {
            let certificate = dir.appendingPathComponent("\(name).pem").path
            if FileManager.default.fileExists(atPath: certificate) {
                tls.certificateChain = try Self.loadCertificates(certificate)
                tls.privateKey = try Self.loadPrivateKey(dir.appendingPathComponent("\(name).key").path)
            }
        }
        return tls
    }

    /// Reads every certificate of a PEM file (a certificate, or a chain).
    public static func loadCertificates(_ path: String) throws(ParleyError) -> [NIOSSLCertificate] {
        let bytes = try Self.read(path, what: "certificate")
        do {
            let certificates = try NIOSSLCertificate.fromPEMBytes(bytes)
            guard !certificates.isEmpty else { throw ParleyError(code: .invalidArgument, message: "no PEM certificate in \(path)") }
            return certificates
        } catch let error as ParleyError {
            throw error
        } catch {
            throw ParleyError(code: .invalidArgument, message: "cannot parse the certificate in \(path): \(error)", cause: error)
        }
    }

    /// Reads a PEM private key (PKCS#8 or SEC1 EC, or RSA).
    public static func loadPrivateKey(_ path: String) throws(ParleyError) -> NIOSSLPrivateKey {
        let bytes = try Self.read(path, what: "private key")
        do {
            return try NIOSSLPrivateKey(bytes: bytes, format: .pem)
        } catch {
            throw ParleyError(code: .invalidArgument, message: "cannot parse the private key in \(path): \(error)", cause: error)
        }
    }

    private static func read(_ path: String, what: String) throws(ParleyError) -> [UInt8] {
        guard FileManager.default.fileExists(atPath: path) else {
            throw ParleyError(code: .invalidArgument, message: "\(what) file \(path) does not exist (`parley cert init` and `parley cert issue` make them)")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ParleyError(code: .invalidArgument, message: "cannot read \(what) file \(path) (permissions?)")
        }
        return Array(data)
    }

    /// The NIOSSL context that accepts connections with these settings.
    public func makeServerContext() throws(ParleyError) -> NIOSSLContext {
        guard !self.certificateChain.isEmpty, let key = self.privateKey else {
            throw ParleyError(code: .invalidArgument, message: "a TLS server needs a certificate and its private key")
        }
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: self.certificateChain.map { .certificate($0) }, privateKey: .privateKey(key)
        )
        configuration.minimumTLSVersion = .tlsv13
        if let roots = self.trustRoots {
            configuration.trustRoots = .certificates(roots)
            switch self.clientCertificates {
            case .none: configuration.certificateVerification = .none
            case .optional: configuration.certificateVerification = .optionalVerification
            // A client certificate names an entity, not a host: nothing to match it with.
            case .required: configuration.certificateVerification = .noHostnameVerification
            }
        } else {
            configuration.certificateVerification = .none
        }
        return try Self.context(configuration)
    }

    /// The NIOSSL context that connects with these settings.
    public func makeClientContext() throws(ParleyError) -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv13
        configuration.certificateVerification = self.verifyHostname ? .fullVerification : .noHostnameVerification
        if let roots = self.trustRoots { configuration.trustRoots = .certificates(roots) }
        if !self.certificateChain.isEmpty {
            guard let key = self.privateKey else {
                throw ParleyError(code: .invalidArgument, message: "a TLS client certificate needs its private key")
            }
            configuration.certificateChain = self.certificateChain.map { .certificate($0) }
            configuration.privateKey = .privateKey(key)
        }
        return try Self.context(configuration)
    }

    private static func context(_ configuration: TLSConfiguration) throws(ParleyError) -> NIOSSLContext {
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw ParleyError(code: .invalidArgument, message: "bad TLS configuration: \(error)", cause: error)
        }
    }
}
