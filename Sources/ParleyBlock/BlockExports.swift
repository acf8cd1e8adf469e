import Foundation
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// An export named on the command line: `NAME=PATH[,read-only][,shared]`.
public struct BlockExportSpec: Sendable, Equatable {
    public var name: String
    public var path: String
    public var readOnly: Bool
    /// Several read-write openers allowed.
    public var shared: Bool
    /// Requests must be aligned to this many bytes (a power of two, 512 to 65536); nil:
    /// the device's own (512 bytes for files on the block protocol, 1 byte on NBD).
    public var blockSize: UInt32?

    public init(name: String, path: String, readOnly: Bool = false, shared: Bool = false, blockSize: UInt32? = nil) {
        self.name = name
        self.path = path
        self.readOnly = readOnly
        self.shared = shared
        self.blockSize = blockSize
    }

    /// Parses `NAME=PATH[,read-only][,shared][,block-size=N]`.
    public init(parsing text: String) throws(BlockError) {
        let usage = "use NAME=PATH[,read-only][,shared][,block-size=N]"
        guard let eq = text.firstIndex(of: "="), eq != text.startIndex else {
            throw BlockError(.invalid, "bad export \"\(text)\": \(usage)")
        }
        self.name = String(text[..<eq])
        var parts = text[text.index(after: eq)...].split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        self.readOnly = false
        self.shared = false
        self.blockSize = nil
        while let last = parts.last, parts.count > 1, last == "read-only" || last == "shared" || last.hasPrefix("block-size=") {
            if last == "read-only" {
                self.readOnly = true
            } else if last == "shared" {
                self.shared = true
            } else {
                guard let n = UInt32(last.dropFirst("block-size=".count)), n >= 512, n <= 65536, n & (n - 1) == 0 else {
                    throw BlockError(.invalid, "bad export \"\(text)\": block-size must be a power of two from 512 to 65536")
                }
                self.blockSize = n
            }
            parts.removeLast()
        }
        self.path = parts.joined(separator: ",")
        guard !self.path.isEmpty else { throw BlockError(.invalid, "bad export \"\(text)\": empty path") }
        guard Self.validName(self.name) else {
            throw BlockError(.invalid, "bad export name \"\(self.name)\": use 1-256 bytes without '/', NUL or control characters")
        }
    }

    static func validName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 256 && !name.utf8.contains { $0 < 0x20 || $0 == 0x2f || $0 == 0x7f }
    }
}

/// A block-protocol error: a status and a message naming what was wrong.
public struct BlockError: Error, Sendable, Equatable, CustomStringConvertible {
    public var status: Parley_Block_V1_BlockStatus
    public var message: String
    public init(_ status: Parley_Block_V1_BlockStatus, _ message: String) {
        self.status = status
        self.message = message
    }
    public var description: String { "\(self.status): \(self.message)" }

    init(_ error: BlockStoreError) {
        switch error.nbd {
        case .perm: self.init(.readOnly, error.description)
        case .nospc: self.init(.noSpace, error.description)
        case .inval: self.init(.invalid, error.description)
        case .notsup: self.init(.notSupported, error.description)
        default: self.init(.ioError, error.description)
        }
    }

    /// The NBD form: the option reply during the handshake.
    var nbdRefusal: NBDRefusal {
        switch self.status {
        case .notFound: return NBDRefusal(.errUnknown, self.message)
        case .busy, .readOnly, .pathRefused: return NBDRefusal(.errPolicy, self.message)
        case .shuttingDown: return NBDRefusal(.errShutdown, self.message)
        case .invalid: return NBDRefusal(.errInvalid, self.message)
        default: return NBDRefusal(.errPlatform, self.message)
        }
    }
}

/// The server's exports: those named on the command line and, with a search path, any file
/// or block device under it, by relative path.
public struct BlockExportCatalog: Sendable {
    public var exports: [BlockExportSpec]
    /// A directory; `%SESSNAME%` in it is replaced by the session name.
    public var searchPath: String?
    /// Every export is read-only.
    public var readOnly: Bool

    public init(exports: [BlockExportSpec], searchPath: String? = nil, readOnly: Bool = false) throws(BlockError) {
        var seen: Set<String> = []
        for e in exports where !seen.insert(e.name).inserted {
            throw BlockError(.invalid, "export \"\(e.name)\" is given twice")
        }
        self.exports = exports
        self.searchPath = searchPath
        self.readOnly = readOnly
    }

    /// Where a name leads: the file to open and what the export allows.
    public struct Resolved: Sendable, Equatable {
        public var name: String
        /// The canonical path (symbolic links resolved): the device's identity.
        public var path: String
        public var readOnly: Bool
        public var shared: Bool
        public var blockSize: UInt32? = nil
    }

    /// Session names allowed in %SESSNAME%.
    public static func validSessionName(_ name: String) -> Bool {
        guard (1...64).contains(name.utf8.count), name.first != "." else { return false }
        return name.utf8.allSatisfy { c in
            (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || c == 0x2e || c == 0x5f || c == 0x2d
        }
    }

    /// Finds an export by name, or a path under the search path.
    /// - Parameter session: the session name, for `%SESSNAME%` (nil: no session name, as
    ///   for NBD clients; a search path with `%SESSNAME%` then finds nothing).
    public func resolve(_ name: String, session: String?) throws(BlockError) -> Resolved {
        if let named = try self.named(name) { return named }
        guard let search = self.searchPath else {
            throw BlockError(.notFound, "no export named \"\(name)\"")
        }
        var root = search
        if root.contains("%SESSNAME%") {
            guard let session else {
                throw BlockError(.notFound, "no export named \"\(name)\" (the search path needs a session name)")
            }
            guard Self.validSessionName(session) else {
                throw BlockError(.invalid, "session name \"\(session)\" cannot be used in a path")
            }
            root = root.replacingOccurrences(of: "%SESSNAME%", with: session)
        }
        guard !name.isEmpty, !name.hasPrefix("/") else {
            throw BlockError(.pathRefused, "path \"\(name)\" must be relative to the search path")
        }
        let components = name.split(separator: "/", omittingEmptySubsequences: true)
        guard !components.contains(where: { $0 == ".." }), !name.utf8.contains(0) else {
            throw BlockError(.pathRefused, "path \"\(name)\" may not contain \"..\"")
        }
        guard let realRoot = Self.realPath(root) else {
            throw BlockError(.notFound, "search path \(root) does not exist")
        }
        guard let real = Self.realPath(realRoot + "/" + components.joined(separator: "/")) else {
            throw BlockError(.notFound, "\"\(name)\" does not exist under the search path")
        }
        guard real.hasPrefix(realRoot == "/" ? "/" : realRoot + "/") else {
            throw BlockError(.pathRefused, "path \"\(name)\" leads out of the search path (a symbolic link to \(real))")
        }
        return Resolved(name: name, path: real, readOnly: self.readOnly, shared: false)
    }

    /// Finds a named export only, never a path under the search path: what NBD clients
    /// reach (docs/protocol.md 18), who have neither a session name nor rights checked.
    public func resolveNamed(_ name: String) throws(BlockError) -> Resolved {
        guard let named = try self.named(name) else {
            throw BlockError(.notFound, "no export named \"\(name)\"")
        }
        return named
    }

    private func named(_ name: String) throws(BlockError) -> Resolved? {
        guard let spec = self.exports.first(where: { $0.name == name }) else { return nil }
        guard let real = Self.realPath(spec.path) else {
            throw BlockError(.notFound, "export \"\(name)\": \(spec.path) does not exist")
        }
        return Resolved(name: name, path: real, readOnly: spec.readOnly || self.readOnly, shared: spec.shared, blockSize: spec.blockSize)
    }

    static func realPath(_ path: String) -> String? {
        guard let p = realpath(path, nil) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }
}

/// How an opener uses a device.
public enum BlockAccess: Sendable, Equatable {
    case readOnly, readWrite, migration
}

/// An open device, shared by every opener of the same path.
public final class BlockDevice: Sendable {
    public let name: String
    public let path: String
    public let store: any BlockStore
    /// `store` as a `CompletingBlockStore` (a remote device), if it is one: cast once here,
    /// not for every IO (a failed existential cast searches the conformance tables).
    public let completing: (any CompletingBlockStore)?
    public let metrics: BlockMetrics
    init(name: String, path: String, store: any BlockStore, metrics: BlockMetrics) {
        self.name = name
        self.path = path
        self.store = store
        self.completing = store as? any CompletingBlockStore
        self.metrics = metrics
    }
}

/// The open devices of a server and who has them open: at most one read-write opener per
/// device unless the export is shared (a migration open may be the second), any number of
/// read-only openers. A device's file stays open while anyone has it open.
public final class BlockDeviceTable: Sendable {
    struct Entry {
        var device: BlockDevice
        var openers: Int
        /// Owners holding it read-write, with how many opens each.
        var writers: [String: Int]
        var writable: Bool
    }

    private let state = NIOLockedValueBox<[String: Entry]>([:])
    private let openStore: @Sendable (String, Bool) throws(BlockStoreError) -> any BlockStore
    private let metricsFactory: (any MetricsFactory)?

    /// `metricsFactory`: where the devices' metrics go (nil: the bootstrapped backend).
    public init(openStore: @escaping @Sendable (String, Bool) throws(BlockStoreError) -> any BlockStore = { path, writable throws(BlockStoreError) in
        try FileBlockStore(path: path, writable: writable)
    }, metricsFactory: (any MetricsFactory)? = nil) {
        self.openStore = openStore
        self.metricsFactory = metricsFactory
    }

    /// Opens a resolved export for `owner` (a session; all NBD connections share one owner,
    /// which is what makes NBD multi-conn safe).
    ///
    /// The file is opened outside the table's lock: a slow open (a stalled network file
    /// system, a device that takes its time) holds up only its own caller, never the opens and
    /// closes of other devices. Two first opens of one path at once may both open the file;
    /// the second to reach the table joins the first's device and closes its own descriptor.
    public func open(_ export: BlockExportCatalog.Resolved, access: BlockAccess, owner: String) throws(BlockError) -> BlockDevice {
        let writes = access != .readOnly
        if writes, export.readOnly {
            throw BlockError(.readOnly, "export \"\(export.name)\" is read-only")
        }
        if let joined = self.state.withLockedValue({ table in Self.join(&table, export, writes: writes, access: access, owner: owner) }) {
            return try joined.get()
        }
        // A writable export is opened read-write even for a reader, so that a later writer
        // shares the descriptor (and its flushes cover everyone).
        var writable = !export.readOnly
        let store: any BlockStore
        do throws(BlockStoreError) {
            do throws(BlockStoreError) {
                store = try self.openStore(export.path, writable)
            } catch let error where !writes && (error.errno == EACCES || error.errno == EROFS || error.errno == EPERM) {
                // EPERM: an immutable or append-only file, readable all the same.
                writable = false
                store = try self.openStore(export.path, false)
            }
        } catch {
            if error.errno == ENOENT { throw BlockError(.notFound, error.description) }
            // A file this server may not read is no read-only device: a storage failure.
            if !writes, error.errno == EACCES || error.errno == EPERM { throw BlockError(.ioError, error.description) }
            throw BlockError(error)
        }
        let device = BlockDevice(name: export.name, path: export.path, store: store, metrics: BlockMetrics(export: export.name, factory: self.metricsFactory))
        let (result, spare) = self.state.withLockedValue { table -> (Result<BlockDevice, BlockError>, Bool) in
            if let held = table[export.path]?.device.store {
                // Another open of the same path came first: this one's store goes, unless it
                // is the very store the table holds (an `openStore` handing out one store).
                return (Self.join(&table, export, writes: writes, access: access, owner: owner)!, (held as AnyObject) !== (store as AnyObject))
            }
            table[export.path] = Entry(device: device, openers: 1, writers: writes ? [owner: 1] : [:], writable: writable)
            return (.success(device), false)
        }
        if spare { store.close() }
        return try result.get()
    }

    /// Adds one open to the table's entry for `export`, if it has one (nil: it has none).
    private static func join(_ table: inout [String: Entry], _ export: BlockExportCatalog.Resolved, writes: Bool, access: BlockAccess,
                             owner: String) -> Result<BlockDevice, BlockError>? {
        guard var entry = table[export.path] else { return nil }
        if writes {
            let others = entry.writers.filter { $0.key != owner }
            // An owner that writes already (another path of its session) adds no writer.
            if !others.isEmpty, entry.writers[owner] == nil, !export.shared, !(access == .migration && others.count == 1) {
                return .failure(BlockError(.busy, "\"\(export.name)\" is open read-write by \(others.keys.sorted().joined(separator: ", "))"))
            }
            if !entry.writable {
                return .failure(BlockError(.readOnly, "\(export.path) cannot be opened for writing"))
            }
            entry.writers[owner, default: 0] += 1
        }
        entry.openers += 1
        table[export.path] = entry
        return .success(entry.device)
    }

    /// Ends one open of `device` by `owner`.
    public func close(_ device: BlockDevice, access: BlockAccess, owner: String) {
        let toClose: (any BlockStore)? = self.state.withLockedValue { table in
            guard var entry = table[device.path] else { return nil }
            if access != .readOnly, let n = entry.writers[owner] {
                entry.writers[owner] = n > 1 ? n - 1 : nil
            }
            entry.openers -= 1
            if entry.openers <= 0 {
                table[device.path] = nil
                return entry.device.store
            }
            table[device.path] = entry
            return nil
        }
        toClose?.close()
    }

    /// Runs an open (which may take long: a stalled network file system) on NIO's shared
    /// blocking pool, not on the block IO threads, so that stalled opens never starve the
    /// data IO of devices already open.
    public static func runOpen<T: Sendable>(on eventLoop: any EventLoop, _ body: @escaping @Sendable () throws -> T) -> EventLoopFuture<T> {
        NIOThreadPool.singleton.runIfActive(eventLoop: eventLoop, body)
    }

    /// Devices open now, by path.
    public var openCount: Int { self.state.withLockedValue { $0.count } }

    /// Flushes every open device (at shutdown).
    public func flushAll() {
        let devices = self.state.withLockedValue { $0.values.map(\.device) }
        for d in devices { try? d.store.flush() }
    }
}
