import Crypto
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Code signing of jobs with Ed25519 (BOINC signs with 1024-bit RSA over an MD5 hex digest).
///
/// The project's private key stays off the master (`parley work submit` signs with it, as
/// BOINC keeps its code-signing key offline); workers hold the public key and refuse to run a
/// job whose signature does not verify. A signature covers the job's bytes exactly as they
/// travel, so that no canonical form is needed. A new key is introduced by a statement the
/// old key signs (BOINC's `code_sign_key_signature`): a worker that trusts the old key can
/// verify it and trust the new one.
public enum WorkSigning {
    /// Domain separation: a signature over a job can never be taken for one over a key
    /// rotation, or for anything else signed with the same key.
    static let jobContext = Array("parley-work job v1\0".utf8)
    static let rotationContext = Array("parley-work key rotation v1\0".utf8)

    public struct PrivateKey: Sendable {
        let key: Curve25519.Signing.PrivateKey
        public var publicKey: PublicKey { PublicKey(key: self.key.publicKey) }

        /// A new random key.
        public init() { self.key = Curve25519.Signing.PrivateKey() }

        public init(rawRepresentation: [UInt8]) throws(WorkSigningError) {
            do {
                self.key = try Curve25519.Signing.PrivateKey(rawRepresentation: rawRepresentation)
            } catch {
                throw WorkSigningError("a private key is 32 bytes, got \(rawRepresentation.count)")
            }
        }

        public var rawRepresentation: [UInt8] { Array(self.key.rawRepresentation) }

        /// Signs a job's bytes.
        public func sign(job: [UInt8]) throws(WorkSigningError) -> [UInt8] {
            try self.sign(WorkSigning.jobContext + job)
        }

        /// Signs the statement that `next` replaces this key.
        public func signRotation(to next: PublicKey) throws(WorkSigningError) -> [UInt8] {
            try self.sign(WorkSigning.rotationContext + next.rawRepresentation)
        }

        private func sign(_ bytes: [UInt8]) throws(WorkSigningError) -> [UInt8] {
            do {
                return Array(try self.key.signature(for: bytes))
            } catch {
                throw WorkSigningError("signing failed: \(error)")
            }
        }
    }

    public struct PublicKey: Sendable, Hashable {
        let key: Curve25519.Signing.PublicKey

        init(key: Curve25519.Signing.PublicKey) { self.key = key }

        public init(rawRepresentation: [UInt8]) throws(WorkSigningError) {
            do {
                self.key = try Curve25519.Signing.PublicKey(rawRepresentation: rawRepresentation)
            } catch {
                throw WorkSigningError("a public key is 32 bytes, got \(rawRepresentation.count)")
            }
        }

        public var rawRepresentation: [UInt8] { Array(self.key.rawRepresentation) }

        /// A short name of the key: the first 8 bytes of its SHA-256, in hex.
        public var id: String { SHA256.hash(data: self.rawRepresentation).prefix(8).map { String(format: "%02x", $0) }.joined() }

        /// Checks a job's signature; throws naming what is wrong.
        public func verify(job: [UInt8], signature: [UInt8]) throws(WorkSigningError) {
            guard !signature.isEmpty else { throw WorkSigningError("the job is not signed") }
            guard signature.count == 64 else { throw WorkSigningError("a job signature is 64 bytes, got \(signature.count)") }
            guard self.key.isValidSignature(signature, for: WorkSigning.jobContext + job) else {
                throw WorkSigningError("the job's signature does not verify with key \(self.id): the job was altered or signed with another key")
            }
        }

        /// Checks that this key signed the rotation to `next`.
        public func verifyRotation(to next: PublicKey, signature: [UInt8]) throws(WorkSigningError) {
            guard signature.count == 64, self.key.isValidSignature(signature, for: WorkSigning.rotationContext + next.rawRepresentation) else {
                throw WorkSigningError("key \(next.id) is not vouched for by key \(self.id)")
            }
        }

        public static func == (a: Self, b: Self) -> Bool { a.rawRepresentation == b.rawRepresentation }
        public func hash(into hasher: inout Hasher) { hasher.combine(self.rawRepresentation) }
    }

    // MARK: - Key files

    static let privateHeader = "parley-work-ed25519-private-key"
    static let publicHeader = "parley-work-ed25519-public-key"

    /// Writes `work.key` (mode 0600) and `work.pub` into `directory`; refuses to overwrite.
    public static func writeKeyPair(_ key: PrivateKey, directory: String) throws(WorkSigningError) {
        let privatePath = directory + "/work.key", publicPath = directory + "/work.pub"
        for path in [privatePath, publicPath] where FileManager.default.fileExists(atPath: path) {
            throw WorkSigningError("\(path) exists: not overwriting a key")
        }
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        } catch {
            throw WorkSigningError("cannot create \(directory): \(error)")
        }
        try self.create(privatePath, "\(privateHeader) \(Data(key.rawRepresentation).base64EncodedString())\n", mode: 0o600)
        try self.create(publicPath, "\(publicHeader) \(Data(key.publicKey.rawRepresentation).base64EncodedString())\n", mode: 0o644)
    }

    public static func readPrivateKey(_ path: String) throws(WorkSigningError) -> PrivateKey {
        guard let attributes = try? FileManager.default.attributesOfItem(atPath: path),
              let mode = (attributes[.posixPermissions] as? NSNumber)?.intValue else {
            throw WorkSigningError("cannot read \(path): no such file")
        }
        guard mode & 0o077 == 0 else {
            throw WorkSigningError("\(path) is readable by others (mode \(String(mode & 0o777, radix: 8))): chmod 600 it")
        }
        return try PrivateKey(rawRepresentation: try self.read(path, header: privateHeader))
    }

    public static func readPublicKey(_ path: String) throws(WorkSigningError) -> PublicKey {
        try PublicKey(rawRepresentation: try self.read(path, header: publicHeader))
    }

    private static func read(_ path: String, header: String) throws(WorkSigningError) -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path) else { throw WorkSigningError("cannot read \(path)") }
        let text = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        let parts = text.split(separator: " ")
        guard parts.count == 2, parts[0] == header else {
            throw WorkSigningError("\(path) is not a \(header) file (expected \"\(header) BASE64\")")
        }
        guard let raw = Data(base64Encoded: String(parts[1])) else { throw WorkSigningError("\(path): the key is not base64") }
        return Array(raw)
    }

    /// Verifies a job against several keys (the current one and a rotation's next); the
    /// error names the first key when none verifies.
    public static func verify(job: [UInt8], signature: [UInt8], byAnyOf keys: [PublicKey]) throws(WorkSigningError) {
        var first: WorkSigningError?
        for key in keys {
            do throws(WorkSigningError) {
                try key.verify(job: job, signature: signature)
                return
            } catch {
                if first == nil { first = error }
            }
        }
        throw first ?? WorkSigningError("no key to verify the job with")
    }

    static let rotationHeader = "parley-work-ed25519-rotation"

    /// A key rotation: the next public key and the old key's signature over it.
    public struct Rotation: Sendable, Hashable {
        public var next: PublicKey
        public var signature: [UInt8]
        public init(next: PublicKey, signature: [UInt8]) {
            self.next = next
            self.signature = signature
        }
    }

    /// Writes a rotation file (`parley-work-ed25519-rotation NEXT SIGNATURE`, base64), never
    /// over an existing file.
    public static func writeRotation(_ rotation: Rotation, to path: String) throws(WorkSigningError) {
        try self.create(path, "\(rotationHeader) \(Data(rotation.next.rawRepresentation).base64EncodedString()) \(Data(rotation.signature).base64EncodedString())\n", mode: 0o644)
    }

    public static func readRotation(_ path: String) throws(WorkSigningError) -> Rotation {
        guard let data = FileManager.default.contents(atPath: path) else { throw WorkSigningError("cannot read \(path)") }
        let parts = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines).split(separator: " ")
        guard parts.count == 3, parts[0] == rotationHeader, let next = Data(base64Encoded: String(parts[1])),
              let signature = Data(base64Encoded: String(parts[2])) else {
            throw WorkSigningError("\(path) is not a \(rotationHeader) file (expected \"\(rotationHeader) NEXT-KEY SIGNATURE\", base64)")
        }
        return Rotation(next: try PublicKey(rawRepresentation: Array(next)), signature: Array(signature))
    }

    /// Creates `path` with `mode` (never over an existing file) and writes `text`.
    private static func create(_ path: String, _ text: String, mode: mode_t) throws(WorkSigningError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL, mode)
        guard fd >= 0 else { throw WorkSigningError("cannot create \(path): errno \(errno)") }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        guard bytes.withUnsafeBytes({ Glibc.write(fd, $0.baseAddress, $0.count) }) == bytes.count else {
            throw WorkSigningError("cannot write \(path): errno \(errno)")
        }
    }
}

public struct WorkSigningError: Error, Sendable, Hashable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { self.message }
}
