import Foundation
#if canImport(Glibc)
// stat and its fields: a release build with MemberImportVisibility wants their modules named.
import CoreFoundation
import Glibc
#endif
import NIOConcurrencyHelpers
import ParleyWire

/// A keyring file: named entities (`client.alice`, `worker.build-7`) with their 32-byte keys,
/// capabilities, an optional expiry and a revoked mark (docs/security.md, "Keyrings").
///
/// The file is JSON, written with mode 0600 through a temporary file and a rename, so that a
/// crash never leaves half a keyring. A keyring that others may read or write is refused, as
/// ssh refuses a private key with loose permissions.
public struct ParleyKeyring: Sendable, Hashable {
    public struct Entity: Codable, Sendable, Hashable {
        public var name: String
        /// Base64 of 32 random bytes.
        public var key: String
        public var caps: [String]
        public var created: Date
        public var expires: Date?
        public var revoked: Bool

        public init(name: String, key: [UInt8], caps: [String], created: Date, expires: Date? = nil, revoked: Bool = false) {
            self.name = name
            self.key = Data(key).base64EncodedString()
            self.caps = caps
            self.created = created
            self.expires = expires
            self.revoked = revoked
        }

        public var keyBytes: [UInt8]? {
            guard let data = Data(base64Encoded: self.key), data.count == 32 else { return nil }
            return Array(data)
        }

        /// Whether `text` is this entity's key as the file shows it (base64), compared in a
        /// time that does not depend on where they differ: for programs that log in with a
        /// password (Buildbot workers) or an account key (BOINC clients).
        public func keyMatches(_ text: String) -> Bool {
            let given = Array(text.utf8), expected = Array(self.key.utf8)
            var difference = UInt8(given.count == expected.count ? 0 : 1)
            for (i, byte) in expected.enumerated() { difference |= byte ^ (i < given.count ? given[i] : 0) }
            return difference == 0
        }

        /// Whether its capabilities allow `capability` (the rule of `ParleySession.grants`).
        public func grants(_ capability: String) -> Bool {
            ParleySession.capabilities(self.caps, grant: capability)
        }

        /// Why it may not act now (its key revoked or expired, or, when `capability` is given,
        /// without that capability), as the end of a sentence about it; nil when it may.
        public func refusal(needing capability: String? = nil, now: Date = Date()) -> String? {
            if self.revoked { return "is revoked in the keyring" }
            if let expires = self.expires, expires <= now { return "has a key that expired at \(expires)" }
            if let capability, !self.grants(capability) { return "lacks the capability \(capability)" }
            return nil
        }
    }

    public static let format = "parley-keyring-1"

    public var entities: [Entity]

    public init(entities: [Entity] = []) {
        self.entities = entities
    }

    private struct File: Codable {
        var format: String
        var entities: [Entity]
    }

    /// Entity names: 1 to 255 bytes of letters, digits and `._-@`, such as `client.alice`.
    public static func validate(name: String) throws(ParleyError) {
        let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")
        guard (1...255).contains(name.utf8.count), name.allSatisfy({ allowed.contains($0) }) else {
            throw ParleyError(code: .invalidArgument, message: "bad entity name \"\(name)\": use 1 to 255 letters, digits and . _ - @ (for example client.alice)")
        }
    }

    public func entity(named name: String) -> Entity? { self.entities.first { $0.name == name } }

    // MARK: - Files

    /// Reads a keyring, refusing one that others may read or write. The checks apply to the
    /// file that is read: it is opened first, then checked and read through one descriptor
    /// (checking the path and then opening it again let a file swapped in between be read).
    public static func load(path: String) throws(ParleyError) -> ParleyKeyring {
        // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else {
            throw ParleyError(code: .invalidArgument, message: "cannot read keyring \(path): \(String(cString: strerror(errno)))")
        }
        let handle = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            throw ParleyError(code: .invalidArgument, message: "cannot read keyring \(path): \(String(cString: strerror(errno)))")
        }
        guard info.st_mode & S_IFMT == S_IFREG else {
            throw ParleyError(code: .invalidArgument, message: "keyring \(path) is not a regular file")
        }
        let loose = info.st_mode & 0o077
        guard loose == 0 else {
            throw ParleyError(
                code: .invalidArgument,
                message: "keyring \(path) has mode 0\(String(info.st_mode & 0o777, radix: 8)): others may read or change its keys; it must be 0600 (chmod 600 \(path))"
            )
        }
        guard info.st_uid == getuid() || getuid() == 0 else {
            throw ParleyError(code: .invalidArgument, message: "keyring \(path) belongs to another user (uid \(info.st_uid)); refusing to use it")
        }
        guard info.st_size <= Self.maximumFileBytes else {
            throw ParleyError(code: .invalidArgument, message: "keyring \(path) is \(info.st_size) bytes; a keyring is at most \(Self.maximumFileBytes)")
        }
        let data: Data
        do { data = try handle.readToEnd() ?? Data() } catch {
            throw ParleyError(code: .invalidArgument, message: "cannot read keyring \(path): \(error.localizedDescription)")
        }
        let file: File
        do { file = try Self.decoder.decode(File.self, from: data) } catch {
            throw ParleyError(code: .invalidArgument, message: "keyring \(path) is not a Parley keyring: \(Self.describe(error))")
        }
        guard file.format == Self.format else {
            throw ParleyError(code: .invalidArgument, message: "keyring \(path) has format \"\(file.format)\"; this version reads \"\(Self.format)\"")
        }
        var seen = Set<String>()
        for entity in file.entities {
            do { try Self.validate(name: entity.name) } catch {
                throw ParleyError(code: .invalidArgument, message: "keyring \(path): \(error.message)")
            }
            guard seen.insert(entity.name).inserted else {
                throw ParleyError(code: .invalidArgument, message: "keyring \(path) lists \(entity.name) twice")
            }
            guard entity.keyBytes != nil else {
                throw ParleyError(code: .invalidArgument, message: "keyring \(path): the key of \(entity.name) is not base64 of 32 bytes")
            }
        }
        return ParleyKeyring(entities: file.entities)
    }

    /// The largest keyring file read (some 100,000 entities).
    public static let maximumFileBytes = 64 << 20

    /// Reads a keyring, or returns an empty one if the file does not exist.
    public static func loadOrEmpty(path: String) throws(ParleyError) -> ParleyKeyring {
        if access(path, F_OK) != 0, errno == ENOENT { return ParleyKeyring() }
        return try self.load(path: path)
    }

    /// Writes the keyring with mode 0600: a temporary file in the same directory, flushed to
    /// disk, then renamed over the old one.
    public func save(path: String) throws(ParleyError) {
        let data: Data
        do { data = try Self.encoder.encode(File(format: Self.format, entities: self.entities)) } catch {
            throw ParleyError(code: .invalidArgument, message: "cannot encode keyring: \(error)")
        }
        let directory = (path as NSString).deletingLastPathComponent
        let temporary = (directory.isEmpty ? "." : directory) + "/.\((path as NSString).lastPathComponent).\(getpid()).tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw ParleyError(code: .invalidArgument, message: "cannot write keyring \(path): \(temporary): \(String(cString: strerror(errno)))")
        }
        var ok = data.withUnsafeBytes { bytes -> Bool in
            var offset = 0
            while offset < bytes.count {
                let n = write(fd, bytes.baseAddress! + offset, bytes.count - offset)
                if n < 0 { if errno == EINTR { continue }; return false }
                offset += n
            }
            return true
        }
        ok = ok && fsync(fd) == 0
        let error = errno
        close(fd)
        guard ok, rename(temporary, path) == 0 else {
            let why = String(cString: strerror(ok ? errno : error))
            unlink(temporary)
            throw ParleyError(code: .invalidArgument, message: "cannot write keyring \(path): \(why)")
        }
        let dirfd = open(directory.isEmpty ? "." : directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dirfd >= 0 {
            fsync(dirfd)
            close(dirfd)
        }
    }

    // MARK: - What the handshake needs

    /// The entities method `secret` accepts (revoked and expired ones included: the handshake
    /// refuses them with an error that says so).
    public var directory: SecretDirectory {
        SecretDirectory(self.entities.compactMap { e in
            e.keyBytes.map {
                SecretEntity(
                    name: e.name, key: $0, capabilities: e.caps,
                    expires: e.expires.map { Int64($0.timeIntervalSince1970.rounded(.down)) }, revoked: e.revoked
                )
            }
        })
    }

    /// A client's credentials for `name`.
    public func credentials(for name: String, keyringPath: String) throws(ParleyError) -> SecretCredentials {
        guard let entity = self.entity(named: name), let key = entity.keyBytes else {
            throw ParleyError(code: .invalidArgument, message: "keyring \(keyringPath) has no entity \(name) (it has: \(self.entities.map(\.name).joined(separator: ", ")))")
        }
        return SecretCredentials(entity: name, key: key)
    }

    // MARK: - JSON

    static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        e.dateEncodingStrategy = .iso8601
        return e
    }()

    /// Dates as RFC 3339, with or without fractional seconds or an offset (another
    /// implementation may write them so; the reference writes whole seconds in UTC). A date
    /// that is not one is refused naming its field and its text.
    static let decoder: JSONDecoder = {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .custom { decoder in
            let text = try decoder.singleValueContainer().decode(String.self)
            let whole = ISO8601DateFormatter()
            let fractional = ISO8601DateFormatter()
            fractional.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
            guard let date = whole.date(from: text) ?? fractional.date(from: text) else {
                throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "\"\(text)\" is not an RFC 3339 date (like 2027-06-30T00:00:00Z)"))
            }
            return date
        }
        return d
    }()

    static func describe(_ error: any Error) -> String {
        switch error {
        case DecodingError.keyNotFound(let key, let context):
            return "missing field \"\(key.stringValue)\" at \(context.codingPath.map(\.stringValue).joined(separator: "."))"
        case DecodingError.typeMismatch(_, let context), DecodingError.valueNotFound(_, let context), DecodingError.dataCorrupted(let context):
            return "\(context.debugDescription) at \(context.codingPath.map(\.stringValue).joined(separator: "."))"
        default:
            return "\(error)"
        }
    }
}

/// A server's keyring, read again when the file changes: a key added, revoked or rotated with
/// `parley keyring` applies to the next connection without a restart. If the changed file
/// cannot be read, the last good keyring stays in force (and the error is reported once).
public final class ParleyKeyringSource: Sendable {
    public let path: String
    private struct State {
        var stamp: [Int]
        /// What the handshake needs of the keyring, decoded once per version of the file.
        var directory: SecretDirectory
    }
    private let state: NIOLockedValueBox<State>

    /// Reads the keyring now: a server refuses to start with a bad one.
    public init(path: String) throws(ParleyError) {
        self.path = path
        let keyring = try ParleyKeyring.load(path: path)
        self.state = NIOLockedValueBox(State(stamp: Self.stamp(path), directory: keyring.directory))
    }

    private static func stamp(_ path: String) -> [Int] {
        var info = stat()
        guard stat(path, &info) == 0 else { return [] }
        // truncatingIfNeeded: inode numbers use all 64 bits on some file systems (overlayfs xino).
        return [Int(truncatingIfNeeded: info.st_ino), Int(info.st_size), Int(info.st_mtim.tv_sec), Int(info.st_mtim.tv_nsec), Int(info.st_mode)]
    }

    /// The entities of the current keyring, and the error of a reload that failed (once).
    public func current() -> (directory: SecretDirectory, reloadError: String?) {
        let stamp = Self.stamp(self.path)
        return self.state.withLockedValue { (s: inout State) -> (directory: SecretDirectory, reloadError: String?) in
            guard stamp != s.stamp else { return (s.directory, nil) }
            s.stamp = stamp
            do {
                s.directory = try ParleyKeyring.load(path: self.path).directory
                return (s.directory, nil)
            } catch {
                return (s.directory, (error as? ParleyError)?.message ?? "\(error)")
            }
        }
    }
}
