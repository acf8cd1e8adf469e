import Foundation
import NIOSSL
import Parley
import ParleyNIO

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// What the secure systems need, made fresh in a temporary directory by the parent for one
/// invocation and removed at its end: a keyring with one entity (parley-secure) and a
/// development CA with a server certificate for 127.0.0.1 (parley-tls, tls-echo).
struct SecurityMaterial: Sendable {
    /// The temporary directory holding everything below.
    let directory: String
    /// The server's keyring (mode 0600), one entity.
    let keyring: String
    /// The directory of `DevelopmentCertificates.initialize`: ca.pem, server.pem, server.key.
    let certificates: String
    /// The client's entity and key (the keyring's only entity).
    let credentials: SecretCredentials

    static let entity = "bench.client"

    /// Makes the keyring and the certificates in a fresh temporary directory.
    static func make() throws -> SecurityMaterial {
        var template = Array((NSTemporaryDirectory() + "/parley-bench-XXXXXX").utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw BenchError("cannot make a temporary directory: errno \(errno)")
        }
        let directory = String(cString: made)
        do {
            var key = [UInt8](repeating: 0, count: 32)
            var rng = SystemRandomNumberGenerator()
            for i in key.indices { key[i] = rng.next() }
            let keyring = directory + "/server.keyring"
            try ParleyKeyring(entities: [.init(name: Self.entity, key: key, caps: ["*"], created: Date())]).save(path: keyring)
            let certificates = directory + "/certs"
            _ = try DevelopmentCertificates.initialize(directory: certificates)
            return SecurityMaterial(
                directory: directory, keyring: keyring, certificates: certificates,
                credentials: SecretCredentials(entity: Self.entity, key: key)
            )
        } catch {
            try? FileManager.default.removeItem(atPath: directory)
            throw error
        }
    }

    /// The arguments that hand it to a server child.
    var serverArguments: [String] { ["--keyring", self.keyring, "--cert", self.certificates] }

    func remove() {
        try? FileManager.default.removeItem(atPath: self.directory)
    }
}

/// The TLS echo's contexts: the same settings as Parley's `tls://` transport
/// (`ParleyTLS.server(directory:)` and `.client(directory:)`): TLS 1.3 only, the server
/// presents server.pem and asks for an optional client certificate checked against ca.pem,
/// the client verifies the server's certificate (its IP address) against ca.pem. The client
/// has no certificate, as Parley's benchmark client.
enum TLSEcho {
    static func serverContext(certificates: String) throws -> NIOSSLContext {
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: try ParleyTLS.loadCertificates(certificates + "/server.pem").map { .certificate($0) },
            privateKey: .privateKey(try ParleyTLS.loadPrivateKey(certificates + "/server.key"))
        )
        configuration.minimumTLSVersion = .tlsv13
        configuration.trustRoots = .certificates(try ParleyTLS.loadCertificates(certificates + "/ca.pem"))
        configuration.certificateVerification = .optionalVerification
        return try NIOSSLContext(configuration: configuration)
    }

    static func clientContext(certificates: String) throws -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv13
        configuration.certificateVerification = .fullVerification
        configuration.trustRoots = .certificates(try ParleyTLS.loadCertificates(certificates + "/ca.pem"))
        return try NIOSSLContext(configuration: configuration)
    }
}
