import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Parley

/// `parley block map`: a remote device opened over a multipath session and served on a local
/// NBD endpoint (for nbd-client's /dev/nbdN, qemu, fio, nbdcopy), by the NBD server as it is,
/// over a `MultipathBlockStore`.
///
/// While it runs it writes its status (`BlockMap.Record`) to `STATE_DIR/SESSION.PID.json`
/// twice a second (the session and device are in the file; the process id keeps two maps'
/// files apart whatever their names); `parley block list` reads those files, and
/// `parley block unmap` sends the process named in one SIGTERM and waits for it to exit. A
/// clean unmap removes the file; one whose final flush failed leaves it with `failure` set,
/// for `parley block unmap` to report.
public final class BlockMap: Sendable {
    public struct Record: Sendable, Codable, Equatable {
        public var pid: Int32
        public var nbd: String
        /// NBD export names: the device path, and "" (the default export).
        public var exportName: String
        public var status: BlockMultipathDevice.Status
        public var updated: Double
        /// Why the map's unmap is not (or was not) clean: from the unmap's start "the map
        /// ended during its unmap" (what a map killed then leaves), then the final flush's
        /// failure if it fails; a clean unmap removes the file. nil while the map serves.
        public var failure: String?
        /// Seconds a clean unmap of this map may take by its own timeouts (its IO waiting
        /// for a path, then its final flush and Close): `parley block unmap`'s default wait.
        /// nil in a file of a map from before the field.
        public var unmapWithin: Double?
    }

    /// What `Record.unmapWithin` says: with no path up, IO waits `ioTimeout` (a path that
    /// does not answer, `answerTimeout` more), then the final flush and Close as long again
    /// on a path back just then; and a margin.
    public var unmapWithin: Double {
        let c = self.session.configuration
        return 2 * ((c.ioTimeout + (c.answerTimeout ?? .zero)) / .seconds(1)) + 30
    }

    public let session: BlockMultipathSession
    public let devicePath: String
    public let access: Parley_Block_V1_AccessMode
    public var readOnly: Bool { self.access == .readOnly }
    public let nbdAddress: ParleyAddress
    public let stateDirectory: String
    let logger: Logger
    /// Set when the unmap starts: what the status file says from then on (`Record.failure`).
    let unmapping = NIOLockedValueBox<String?>(nil)
    /// One status write at a time: the writer task and the unmap's own writes share one
    /// temporary file, and two writes interleaved could leave a mix of both.
    private let recordWrites = NIOLock()

    public init(session: BlockMultipathSession, device: String, access: Parley_Block_V1_AccessMode, nbd: ParleyAddress, stateDirectory: String,
                logger: Logger = Logger(label: "parley.block.map")) {
        self.session = session
        self.devicePath = device
        self.access = access
        self.nbdAddress = nbd
        self.stateDirectory = stateDirectory
        self.logger = logger
    }

    /// Where maps keep their status files unless told otherwise: $PARLEY_BLOCK_STATE_DIR, or
    /// /tmp/parley-block-UID.
    public static var defaultStateDirectory: String {
        if let d = ProcessInfo.processInfo.environment["PARLEY_BLOCK_STATE_DIR"], !d.isEmpty { return d }
        return "/tmp/parley-block-\(getuid())"
    }

    /// The status file of the map of `session` run by process `pid` (session names are
    /// 1-64 bytes of A-Z a-z 0-9 . _ -, so the name is always a valid, short file name).
    public static func recordFile(directory: String, session: String, pid: Int32) -> String {
        "\(directory)/\(session).\(pid).json"
    }

    public var recordFile: String {
        Self.recordFile(directory: self.stateDirectory, session: self.session.configuration.sessionName, pid: getpid())
    }

    /// Status files in `directory` whose process still runs (others are removed).
    ///
    /// Only a directory and files of this user that others cannot write count, and only
    /// records naming a running `parley block map`: the default directory is under /tmp, and
    /// `parley block unmap` signals the process a record names (a planted pid 0 or -1 would
    /// signal a process group or every process; a stale one, whatever now has that pid).
    public static func records(directory: String) -> [Record] {
        guard Self.isPrivate(directory, directory: true),
              let names = try? FileManager.default.contentsOfDirectory(atPath: directory) else { return [] }
        var out: [Record] = []
        for name in names.sorted() where name.hasSuffix(".json") || name.hasSuffix(".json.tmp") {
            let path = directory + "/" + name
            guard name.hasSuffix(".json"), let record = Self.readRecord(path), record.pid > 1 else {
                // A temporary file a map killed mid-write left, or a file that is no record:
                // removed once a minute old (a map's own are replaced twice a second).
                if Self.isPrivate(path, directory: false), let modified = Self.modified(path), Date().timeIntervalSince(modified) > 60 {
                    try? FileManager.default.removeItem(atPath: path)
                }
                continue
            }
            // Its map is gone (or the pid belongs to another process now): the file goes,
            // but one that reports a failed unmap stays a minute for `parley block unmap`.
            guard Self.isRunningMap(record.pid) else {
                if record.failure == nil || Date().timeIntervalSince1970 - record.updated > 60 {
                    try? FileManager.default.removeItem(atPath: path)
                }
                continue
            }
            out.append(record)
        }
        return out
    }

    static func modified(_ path: String) -> Date? {
        (try? FileManager.default.attributesOfItem(atPath: path))?[.modificationDate] as? Date
    }

    /// `path` (not a symbolic link) belongs to this user and no one else may write to it.
    static func isPrivate(_ path: String, directory: Bool) -> Bool {
        Self.ownPermissions(path, directory: directory).map { $0 & 0o022 == 0 } ?? false
    }

    /// The permission bits of `path` if it is a directory (or a regular file) of this user,
    /// not a symbolic link: FileManager's attributes are the link's own, as `lstat` gives them.
    static func ownPermissions(_ path: String, directory: Bool) -> Int? {
        guard let attributes = try? FileManager.default.attributesOfItem(atPath: path),
              (attributes[.ownerAccountID] as? NSNumber)?.uint32Value == geteuid(),
              attributes[.type] as? FileAttributeType == (directory ? .typeDirectory : .typeRegular) else { return nil }
        return (attributes[.posixPermissions] as? NSNumber)?.intValue
    }

    /// A record (its process gone) that the map left: `failure` says why its unmap failed;
    /// nil if there is none (the unmap was clean).
    public static func leftRecord(directory: String, session: String, pid: Int32) -> Record? {
        Self.readRecord(Self.recordFile(directory: directory, session: session, pid: pid))
    }

    /// The record at `path` if it is a file of this user that no one else may write to.
    static func readRecord(_ path: String) -> Record? {
        guard Self.isPrivate(path, directory: false), let data = FileManager.default.contents(atPath: path) else { return nil }
        return try? JSONDecoder().decode(Record.self, from: data)
    }

    /// Process `pid` runs `parley block map` (its arguments say so). False as well for a pid
    /// no process has, and for a process that has exited and not been reaped (a zombie's
    /// /proc/PID/cmdline is empty).
    public static func isRunningMap(_ pid: Int32) -> Bool {
        guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
        let arguments = data.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
        return zip(arguments, arguments.dropFirst()).contains { $0 == "block" && $1 == "map" }
    }

    /// Creates the status directory (mode 0700), or checks that the one there is this user's
    /// and that no one else may write to it.
    static func prepareStateDirectory(_ path: String) throws {
        let parent = (path as NSString).deletingLastPathComponent
        if !parent.isEmpty { try? FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true) }
        if mkdir(path, 0o700) != 0, errno != EEXIST {
            throw ParleyError(code: .invalidArgument, message: "cannot create the status directory \(path): \(String(cString: strerror(errno)))")
        }
        if let permissions = Self.ownPermissions(path, directory: true), permissions & 0o022 != 0 {
            // This user's, but others may write to it (made under umask 002, or by an older
            // version): made private.
            _ = chmod(path, 0o700)
        }
        guard Self.isPrivate(path, directory: true) else {
            throw ParleyError(code: .invalidArgument, message: "the status directory \(path) is not a directory of this user that only it may write to: give --state-dir")
        }
    }

    /// The running map: its device and NBD server, until `stop()`.
    public final class Running: Sendable {
        public let map: BlockMap
        public let device: BlockMultipathDevice
        public let nbd: NBDServer
        public let boundAddress: ParleyAddress
        let io: BlockIOExecutor
        let writer: Task<Void, Never>

        init(map: BlockMap, device: BlockMultipathDevice, nbd: NBDServer, bound: ParleyAddress, io: BlockIOExecutor, writer: Task<Void, Never>) {
            self.map = map
            self.device = device
            self.nbd = nbd
            self.boundAddress = bound
            self.io = io
            self.writer = writer
        }

        /// Unmaps: NBD clients finish their requests in flight and go, the device's IO drains,
        /// a final flush, the device is closed on every path; the status file is removed.
        public func stop() async throws {
            // Until the unmap is done its file says it is not, kept fresh by the writer: a
            // map killed while it waits (SIGKILL, a second Ctrl-C) leaves that for `parley
            // block unmap` to report, and `parley block list` keeps it a minute.
            let marker = "the map ended during its unmap, before its final flush was done"
            self.map.unmapping.withLockedValue { $0 = marker }
            try? self.map.writeRecord(device: self.device, bound: self.boundAddress, failure: marker)
            await self.nbd.shutDown()
            do {
                try await self.device.close()
            } catch {
                self.writer.cancel()
                await self.writer.value
                // Left for `parley block unmap`, which reports it.
                try? self.map.writeRecord(device: self.device, bound: self.boundAddress, failure: "the final flush failed: \(error)")
                try? await self.io.shutdown()
                throw error
            }
            self.writer.cancel()
            await self.writer.value  // no status write after the file's removal
            try? FileManager.default.removeItem(atPath: self.map.recordFile)
            try? await self.io.shutdown()
            self.map.logger.info("unmapped", metadata: ["session": "\(self.map.session.configuration.sessionName)", "device": "\(self.map.devicePath)"])
        }
    }

    /// Opens the device over every path and starts serving it over NBD.
    public func start() async throws -> Running {
        let device = try await self.session.open(self.devicePath, access: self.access)
        let store = MultipathBlockStore(device: device)
        let path = "/"  // the table's key for the one device; never opened as a file
        let catalog = try BlockExportCatalog(exports: [
            BlockExportSpec(name: self.devicePath, path: path, readOnly: self.readOnly),
            BlockExportSpec(name: "", path: path, readOnly: self.readOnly),
        ])
        let devices = BlockDeviceTable(openStore: { _, _ in store })
        // IO goes through the store's `start` and holds no thread; the IO threads serve the
        // few synchronous calls left (the flush when an NBD client disconnects).
        let io = BlockIOExecutor(threads: 8)
        var limits = NBDServer.Limits()
        limits.maxInFlight = 256
        // The NBD endpoint waits for its client's next request as long as the paths wait for
        // the server's answers: one setting for the map (`--poll-after-reply`).
        limits.replyPolling = .nanoseconds(self.session.configuration.client.limits.replyPolling.nanoseconds)
        let nbd = NBDServer(catalog: catalog, devices: devices, io: io, limits: limits, logger: self.logger, group: self.session.configuration.group)
        let bound: ParleyAddress
        do {
            bound = try await nbd.bind([self.nbdAddress])[0]
        } catch {
            try? await device.close()
            try? await io.shutdown()
            throw error
        }
        do {
            try Self.prepareStateDirectory(self.stateDirectory)
            // The first status is written before the map counts as mapped: a directory it
            // cannot write to is an error now, not a map `list` and `unmap` never see.
            try self.writeRecord(device: device, bound: bound)
        } catch {
            await nbd.shutDown()
            try? await device.close()
            try? await io.shutdown()
            throw error
        }
        let g = device.geometry
        self.logger.info("mapped", metadata: [
            "session": "\(self.session.configuration.sessionName)", "device": "\(self.devicePath)", "nbd": "\(bound)",
            "size": "\(g.sizeBytes)", "block_size": "\(g.logicalBlockSize)", "paths": "\(self.session.configuration.paths.count)",
            "access": "\(self.readOnly ? "ro" : self.access == .migration ? "migration" : "rw")",
        ])
        let writer = Task { [self] in
            var failing = false
            while !Task.isCancelled {
                try? await Task.sleep(for: .milliseconds(500))
                if Task.isCancelled { break }
                do {
                    try self.writeRecord(device: device, bound: bound, failure: self.unmapping.withLockedValue { $0 })
                    failing = false
                } catch {
                    if !failing { self.logger.error("\((error as? ParleyError)?.message ?? "\(error)"): `parley block list` shows stale counters for this map") }
                    failing = true
                }
            }
        }
        return Running(map: self, device: device, nbd: nbd, bound: bound, io: io, writer: writer)
    }

    /// Writes the status file (through a temporary file and a rename: a reader never sees
    /// half of it); a `ParleyError` naming the file if it cannot.
    func writeRecord(device: BlockMultipathDevice, bound: ParleyAddress, failure: String? = nil) throws {
        try self.recordWrites.withLock { try self.writeRecordNow(device: device, bound: bound, failure: failure) }
    }

    private func writeRecordNow(device: BlockMultipathDevice, bound: ParleyAddress, failure: String?) throws {
        let record = Record(pid: getpid(), nbd: "\(bound)", exportName: self.devicePath, status: device.status(),
                            updated: Date().timeIntervalSince1970, failure: failure, unmapWithin: self.unmapWithin)
        let data = try JSONEncoder().encode(record)
        let file = self.recordFile
        let tmp = file + ".tmp"
        func failed(_ what: String) -> ParleyError {
            ParleyError(code: .invalidArgument, message: "cannot write the status file \(file): \(what): \(String(cString: strerror(errno)))")
        }
        // Mode 0600 whatever the umask: `records` trusts no file others may write to.
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw failed("open") }
        let written = data.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) } == data.count && fchmod(fd, 0o600) == 0
        let error = written ? nil : failed("write")
        close(fd)
        if let error { unlink(tmp); throw error }
        guard rename(tmp, file) == 0 else { let e = failed("rename"); unlink(tmp); throw e }
    }
}
