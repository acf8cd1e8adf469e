import Crypto
import Foundation
import SwiftASN1
import X509

/// A development certificate authority in a directory, and the certificates it signs: what
/// `parley cert init` and `parley cert issue` make, and what `ParleyTLS.server(directory:)`
/// and `ParleyTLS.client(directory:name:)` read.
///
/// Layout: `ca.pem`/`ca.key` (the CA), `server.pem`/`server.key` (the server's, for
/// localhost, 127.0.0.1 and ::1), `NAME.pem`/`NAME.key` (an entity's, common name NAME).
/// Keys are P-256 (PKCS#8 PEM), written mode 0600; every file is written to a temporary name
/// and renamed, so a reader never sees half a file and an interrupted run leaves the old one.
/// This is for development and tests: a production deployment brings its own PKI.
public enum DevelopmentCertificates {
    /// How long the CA is valid.
    public static let caValidity: TimeInterval = 10 * 365 * 86_400
    /// How long the certificates it issues are valid.
    public static let certificateValidity: TimeInterval = 2 * 365 * 86_400
    /// The hosts every server certificate names.
    public static let defaultServerHosts = ["localhost", "127.0.0.1", "::1"]

    /// A file written.
    public struct File: Sendable, CustomStringConvertible {
        public var path: String
        /// What it holds, e.g. "CA certificate".
        public var what: String
        public var description: String { "\(self.path) (\(self.what))" }
    }

    /// Makes a CA (`ca.pem`, `ca.key`) and a server certificate signed by it (`server.pem`,
    /// `server.key`, common name "server", for localhost, 127.0.0.1, ::1 and `hosts`) in
    /// `directory`, created (mode 0700) if missing.
    /// - Parameters:
    ///   - hosts: further DNS names or IP addresses for the server certificate.
    ///   - force: replace an existing CA (which invalidates every certificate it signed).
    /// - Returns: the files written.
    public static func initialize(directory: String, hosts: [String] = [], force: Bool = false, now: Date = Date()) throws(ParleyError) -> [File] {
        let dir = URL(fileURLWithPath: directory)
        let caCert = dir.appendingPathComponent("ca.pem").path, caKey = dir.appendingPathComponent("ca.key").path
        if !force, let existing = [caCert, caKey].first(where: { FileManager.default.fileExists(atPath: $0) }) {
            throw ParleyError(code: .invalidArgument, message: "\(existing) already exists; not replacing the CA (--force replaces it, and every certificate it signed stops being trusted)")
        }
        try Self.makeDirectory(directory)
        return try Self.wrap("cannot make the development CA in \(directory)") {
            let key = P256.Signing.PrivateKey()
            let name = try DistinguishedName {
                OrganizationName("Parley development")
                CommonName("Parley development CA")
            }
            let ca = try Certificate(
                version: .v3, serialNumber: Certificate.SerialNumber(),
                publicKey: Certificate.PublicKey(key.publicKey),
                notValidBefore: now.addingTimeInterval(-3600), notValidAfter: now.addingTimeInterval(Self.caValidity),
                issuer: name, subject: name, signatureAlgorithm: .ecdsaWithSHA256,
                extensions: try Certificate.Extensions {
                    Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                    Critical(KeyUsage(keyCertSign: true, cRLSign: true))
                    SubjectKeyIdentifier(hash: Certificate.PublicKey(key.publicKey))
                },
                issuerPrivateKey: Certificate.PrivateKey(key)
            )
            var files: [File] = []
            try Self.writeFile(key.pemRepresentation, to: caKey, mode: 0o600)
            files.append(File(path: caKey, what: "CA private key"))
            try Self.writeFile(try ca.serializeAsPEM().pemString + "\n", to: caCert, mode: 0o644)
            files.append(File(path: caCert, what: "CA certificate, valid until \(Self.day(now.addingTimeInterval(Self.caValidity)))"))
            // NBD clients (libnbd, qemu) look for the CA as ca-cert.pem in their directory.
            let nbdCA = dir.appendingPathComponent("ca-cert.pem").path
            try Self.writeFile(try ca.serializeAsPEM().pemString + "\n", to: nbdCA, mode: 0o644)
            files.append(File(path: nbdCA, what: "the CA certificate again, under the name NBD clients (libnbd, qemu) look for"))
            let server = try Self.issue(
                name: "server", commonName: "server", hosts: Self.defaultServerHosts + hosts, serverAuth: true,
                directory: dir, ca: (ca, key), now: now
            )
            return files + server
        }
    }

    /// Makes `NAME.pem` and `NAME.key` in `directory`, signed by its CA: common name `name` (an
    /// entity name such as "client.alice"), for client authentication, and for server
    /// authentication too when `hosts` are given (named in its subject alternative names).
    /// - Parameter force: replace an existing `NAME.pem`/`NAME.key`.
    /// - Returns: the files written.
    public static func issue(name: String, directory: String, hosts: [String] = [], force: Bool = false, now: Date = Date()) throws(ParleyError) -> [File] {
        guard !name.isEmpty, !name.hasPrefix("."), name != "ca",
            name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "." || $0 == "-" || $0 == "_") })
        else {
            throw ParleyError(code: .invalidArgument, message: "bad certificate name \"\(name)\": use letters, digits, '.', '-' and '_' (not starting with '.'), and not \"ca\"")
        }
        let dir = URL(fileURLWithPath: directory)
        let caCertPath = dir.appendingPathComponent("ca.pem").path, caKeyPath = dir.appendingPathComponent("ca.key").path
        for path in [caCertPath, caKeyPath] where !FileManager.default.fileExists(atPath: path) {
            throw ParleyError(code: .invalidArgument, message: "\(path) does not exist: make the CA first (parley cert init --dir \(directory))")
        }
        if !force, let existing = ["pem", "key"].map({ dir.appendingPathComponent("\(name).\($0)").path }).first(where: { FileManager.default.fileExists(atPath: $0) }) {
            throw ParleyError(code: .invalidArgument, message: "\(existing) already exists; not replacing it (--force does)")
        }
        let caCertText = try Self.readText(caCertPath), caKeyText = try Self.readText(caKeyPath)
        let ca: Certificate
        let caKey: P256.Signing.PrivateKey
        do {
            ca = try Certificate(pemEncoded: caCertText)
        } catch {
            throw ParleyError(code: .invalidArgument, message: "cannot parse the CA certificate \(caCertPath): \(error)", cause: error)
        }
        do {
            caKey = try P256.Signing.PrivateKey(pemRepresentation: caKeyText)
        } catch {
            throw ParleyError(code: .invalidArgument, message: "cannot parse the CA key \(caKeyPath) (a P-256 key is expected): \(error)", cause: error)
        }
        return try Self.wrap("cannot issue a certificate for \(name) in \(directory)") {
            try Self.issue(name: name, commonName: name, hosts: hosts, serverAuth: !hosts.isEmpty, directory: dir, ca: (ca, caKey), now: now)
        }
    }

    private static func issue(
        name: String, commonName: String, hosts: [String], serverAuth: Bool, directory: URL,
        ca: (certificate: Certificate, key: P256.Signing.PrivateKey), now: Date
    ) throws -> [File] {
        let key = P256.Signing.PrivateKey()
        let publicKey = Certificate.PublicKey(key.publicKey)
        var names: [GeneralName] = []
        for host in hosts {
            let general = try Self.generalName(host)
            if !names.contains(general) { names.append(general) }
        }
        let caKeyIdentifier = try ca.certificate.extensions.subjectKeyIdentifier?.keyIdentifier
            ?? SubjectKeyIdentifier(hash: ca.certificate.publicKey).keyIdentifier
        let notAfter = min(now.addingTimeInterval(Self.certificateValidity), ca.certificate.notValidAfter)
        let certificate = try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: publicKey,
            notValidBefore: now.addingTimeInterval(-3600), notValidAfter: notAfter,
            issuer: ca.certificate.subject, subject: try DistinguishedName { CommonName(commonName) },
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                try ExtendedKeyUsage(serverAuth ? [.serverAuth, .clientAuth] : [.clientAuth])
                SubjectKeyIdentifier(hash: publicKey)
                AuthorityKeyIdentifier(keyIdentifier: caKeyIdentifier)
                if !names.isEmpty { SubjectAlternativeNames(names) }
            },
            issuerPrivateKey: Certificate.PrivateKey(ca.key)
        )
        let keyPath = directory.appendingPathComponent("\(name).key").path
        let certPath = directory.appendingPathComponent("\(name).pem").path
        try Self.writeFile(key.pemRepresentation, to: keyPath, mode: 0o600)
        try Self.writeFile(try certificate.serializeAsPEM().pemString + "\n", to: certPath, mode: 0o644)
        let usage = serverAuth ? "server and client authentication" : "client authentication"
        let hostsText = hosts.isEmpty ? "" : " for \(hosts.joined(separator: ", "))"
        return [
            File(path: keyPath, what: "\(name) private key"),
            File(path: certPath, what: "certificate CN=\(commonName)\(hostsText), \(usage), valid until \(Self.day(notAfter))"),
        ]
    }

    /// A host for a subject alternative name: an IP address (v4 or v6) or a DNS name.
    private static func generalName(_ host: String) throws -> GeneralName {
        // Byte arrays, not in_addr/in6_addr: whose initializers a fresh build can take from
        // another module than this file imports (MemberImportVisibility).
        var v4 = [UInt8](repeating: 0, count: 4)
        if inet_pton(AF_INET, host, &v4) == 1 {
            return .ipAddress(ASN1OctetString(contentBytes: ArraySlice(v4)))
        }
        var v6 = [UInt8](repeating: 0, count: 16)
        if inet_pton(AF_INET6, host, &v6) == 1 {
            return .ipAddress(ASN1OctetString(contentBytes: ArraySlice(v6)))
        }
        guard !host.isEmpty, host.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "." || $0 == "-" || $0 == "*") }) else {
            throw ParleyError(code: .invalidArgument, message: "bad host \"\(host)\": give a DNS name or an IP address")
        }
        return .dnsName(host)
    }

    private static func makeDirectory(_ directory: String) throws(ParleyError) {
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory) {
            guard isDirectory.boolValue else { throw ParleyError(code: .invalidArgument, message: "\(directory) exists and is not a directory") }
            return
        }
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        } catch {
            throw ParleyError(code: .invalidArgument, message: "cannot create \(directory): \(error.localizedDescription)", cause: error)
        }
    }

    /// Writes `text` to a fresh temporary file with `mode` in the target's directory (so no
    /// other mode is ever visible), syncs it and renames it over `path`.
    private static func writeFile(_ text: String, to path: String, mode: mode_t) throws(ParleyError) {
        let temporary = path + ".tmp-\(UInt32.random(in: 0...UInt32.max))"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
        guard fd >= 0 else { throw Self.systemError("cannot create \(temporary)") }
        var ok = fchmod(fd, mode) == 0  // the umask may have narrowed `mode`
        let bytes = Array(text.utf8)
        var written = 0
        while ok && written < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + written, bytes.count - written) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { ok = false } else { written += n }
        }
        ok = ok && fsync(fd) == 0
        let error = ok ? nil : Self.systemError("cannot write \(temporary)")
        close(fd)
        if let error {
            unlink(temporary)
            throw error
        }
        guard rename(temporary, path) == 0 else {
            let error = Self.systemError("cannot rename \(temporary) to \(path)")
            unlink(temporary)
            throw error
        }
    }

    private static func readText(_ path: String) throws(ParleyError) -> String {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ParleyError(code: .invalidArgument, message: "cannot read \(path) (permissions?)")
        }
        return String(decoding: data, as: UTF8.self)
    }

    private static func systemError(_ what: String) -> ParleyError {
        ParleyError(code: .invalidArgument, message: "\(what): \(String(cString: strerror(errno)))")
    }

    private static func wrap<T>(_ what: String, _ body: () throws -> T) throws(ParleyError) -> T {
        do {
            return try body()
        } catch let error as ParleyError {
            throw error
        } catch {
            throw ParleyError(code: .invalidArgument, message: "\(what): \(error)", cause: error)
        }
    }

    private static func day(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withFullDate]
        return formatter.string(from: date)
    }
}
