import Foundation
import NIOCore
import NIOPosix
import Parley
import CParleyBlockIO
@testable import ParleyBlock
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
import ParleyTestSupport
#endif

/// Unit tests of export specifications, the export catalog, the device table and the file
/// store, on real temporary files. No sockets, no processes.
///
/// Every helper is nested in this type so nothing clashes with other files of the target.
@Suite struct BlockExportsTests {}

// MARK: - Fixtures

extension BlockExportsTests {
    /// A fresh directory under the system's temporary directory (its canonical path), removed
    /// with everything in it when dropped.
    final class TempDir {
        let path: String

        init() throws {
            let base = testScratchPath("parley-exports-\(UUID().uuidString)")
            try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
            self.path = try #require(TempDir.realPath(base))
        }

        deinit { try? FileManager.default.removeItem(atPath: self.path) }

        func at(_ relative: String) -> String { self.path + "/" + relative }

        @discardableResult
        func directory(_ relative: String) throws -> String {
            try FileManager.default.createDirectory(atPath: self.at(relative), withIntermediateDirectories: true)
            return self.at(relative)
        }

        /// A file of `size` bytes (sparse), or holding `contents`.
        @discardableResult
        func file(_ relative: String, size: Int = 4096, contents: [UInt8]? = nil) throws -> String {
            let p = self.at(relative)
            let parent = (p as NSString).deletingLastPathComponent
            try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true)
            let fd = open(p, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            try #require(fd >= 0, "open \(p): errno \(errno)")
            defer { close(fd) }
            if let contents {
                let n = contents.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
                try #require(n == contents.count)
            } else {
                try #require(ftruncate(fd, off_t(size)) == 0)
            }
            return p
        }

        @discardableResult
        func symlink(_ relative: String, to target: String) throws -> String {
            try #require(Glibc.symlink(target, self.at(relative)) == 0, "symlink: errno \(errno)")
            return self.at(relative)
        }

        static func realPath(_ path: String) -> String? {
            guard let p = realpath(path, nil) else { return nil }
            defer { free(p) }
            return String(cString: p)
        }
    }

    static func status(of body: () throws(BlockError) -> Void) -> Parley_Block_V1_BlockStatus? {
        do throws(BlockError) {
            try body()
            return nil
        } catch {
            return error.status
        }
    }

    static func error(of body: () throws(BlockError) -> Void) -> BlockError? {
        do throws(BlockError) {
            try body()
            return nil
        } catch {
            return error
        }
    }

    /// A resolved export, through a catalog (the only public way to make one).
    static func resolved(_ path: String, name: String = "disk", readOnly: Bool = false, shared: Bool = false) throws -> BlockExportCatalog.Resolved {
        let catalog = try BlockExportCatalog(exports: [BlockExportSpec(name: name, path: path, readOnly: readOnly, shared: shared)])
        return try catalog.resolve(name, session: nil)
    }

    /// How many of this process's descriptors are open on `path`.
    static func descriptors(on path: String) -> Int {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return entries.filter { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + $0)) == path }.count
    }

    static func read(_ store: FileBlockStore, at offset: UInt64, count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0xee, count: count)
        let done = try out.withUnsafeMutableBytes { buffer in try store.read(into: buffer, at: offset, nowait: false) }
        #expect(done)
        return out
    }

    static func write(_ store: FileBlockStore, _ bytes: [UInt8], at offset: UInt64, durable: Bool = false) throws {
        let done = try bytes.withUnsafeBytes { buffer in try store.write(buffer, at: offset, durable: durable, nowait: false) }
        #expect(done)
    }

    static func data(_ length: UInt32) -> BlockExtent { BlockExtent(length: length, isHole: false) }
    static func hole(_ length: UInt32) -> BlockExtent { BlockExtent(length: length, isHole: true) }
}

// MARK: - BlockExportSpec

extension BlockExportsTests {
    @Suite struct Spec {
        static let good: [(String, BlockExportSpec)] = [
            ("disk=/srv/disk.img", BlockExportSpec(name: "disk", path: "/srv/disk.img")),
            ("disk=/srv/disk.img,read-only", BlockExportSpec(name: "disk", path: "/srv/disk.img", readOnly: true)),
            ("disk=/srv/disk.img,shared", BlockExportSpec(name: "disk", path: "/srv/disk.img", shared: true)),
            ("disk=/srv/disk.img,block-size=4096", BlockExportSpec(name: "disk", path: "/srv/disk.img", blockSize: 4096)),
            ("d=/x,read-only,shared,block-size=512", BlockExportSpec(name: "d", path: "/x", readOnly: true, shared: true, blockSize: 512)),
            ("d=/x,block-size=65536,shared,read-only", BlockExportSpec(name: "d", path: "/x", readOnly: true, shared: true, blockSize: 65536)),
            ("d=relative/disk.img", BlockExportSpec(name: "d", path: "relative/disk.img")),
            ("d=/tmp/a,b.img", BlockExportSpec(name: "d", path: "/tmp/a,b.img")),
            ("d=/tmp/a,b,read-only", BlockExportSpec(name: "d", path: "/tmp/a,b", readOnly: true)),
            ("d=/tmp/x,read-only,y", BlockExportSpec(name: "d", path: "/tmp/x,read-only,y")),
            ("d=/tmp/x,,", BlockExportSpec(name: "d", path: "/tmp/x,,")),
            ("d=/p=q", BlockExportSpec(name: "d", path: "/p=q")),
            ("d=read-only", BlockExportSpec(name: "d", path: "read-only")),
            ("my disk.v2=/x", BlockExportSpec(name: "my disk.v2", path: "/x")),
            (String(repeating: "n", count: 256) + "=/x", BlockExportSpec(name: String(repeating: "n", count: 256), path: "/x")),
        ]

        @Test(arguments: 0..<BlockExportsTests.Spec.good.count)
        func parsesGoodForms(index: Int) throws {
            let (text, expected) = Self.good[index]
            #expect(try BlockExportSpec(parsing: text) == expected, "\(text)")
        }

        static let bad: [(String, String)] = [
            ("disk", "NAME=PATH"),
            ("", "NAME=PATH"),
            ("=/x", "NAME=PATH"),
            ("d=", "empty path"),
            ("d=,read-only", "empty path"),
            ("d=,shared,block-size=4096", "empty path"),
            ("a/b=/x", "bad export name"),
            ("a\tb=/x", "bad export name"),
            (String(repeating: "n", count: 257) + "=/x", "bad export name"),
            ("d=/x,block-size=1000", "block-size"),
            ("d=/x,block-size=128", "block-size"),
            ("d=/x,block-size=256", "block-size"),
            ("d=/x,block-size=131072", "block-size"),
            ("d=/x,block-size=0", "block-size"),
            ("d=/x,block-size=", "block-size"),
            ("d=/x,block-size=abc", "block-size"),
            ("d=/x,block-size=-512", "block-size"),
        ]

        @Test(arguments: 0..<BlockExportsTests.Spec.bad.count)
        func refusesBadForms(index: Int) {
            let (text, fragment) = Self.bad[index]
            let error = BlockExportsTests.error { () throws(BlockError) in _ = try BlockExportSpec(parsing: text) }
            #expect(error?.status == .invalid, "\(text)")
            #expect(error?.message.contains(fragment) == true, "\(text): \(error?.message ?? "no error")")
        }

        @Test func catalogRefusesDuplicateNames() throws {
            let a = BlockExportSpec(name: "a", path: "/x")
            let error = BlockExportsTests.error { () throws(BlockError) in
                _ = try BlockExportCatalog(exports: [a, BlockExportSpec(name: "b", path: "/y"), BlockExportSpec(name: "a", path: "/z")])
            }
            #expect(error?.status == .invalid)
            #expect(error?.message.contains("\"a\"") == true)
            _ = try BlockExportCatalog(exports: [a, BlockExportSpec(name: "b", path: "/x")])  // same path, other name: fine
        }
    }
}

// MARK: - BlockExportCatalog.resolve

extension BlockExportsTests {
    @Suite struct Resolve {
        typealias T = BlockExportsTests

        @Test func namedExport() throws {
            let dir = try TempDir()
            let file = try dir.file("disks/a.img")
            try dir.symlink("link.img", to: file)
            let catalog = try BlockExportCatalog(exports: [
                BlockExportSpec(name: "a", path: file, shared: true, blockSize: 4096),
                BlockExportSpec(name: "viaLink", path: dir.at("link.img"), readOnly: true),
            ])
            let a = try catalog.resolve("a", session: nil)
            #expect(a.name == "a" && a.path == file)
            #expect(!a.readOnly && a.shared && a.blockSize == 4096)
            let link = try catalog.resolve("viaLink", session: "whoever")
            #expect(link.path == file, "the canonical path is the device's identity")
            #expect(link.readOnly && !link.shared && link.blockSize == nil)
        }

        @Test func namedExportWhoseFileIsMissingAndUnknownNames() throws {
            let dir = try TempDir()
            let catalog = try BlockExportCatalog(exports: [BlockExportSpec(name: "gone", path: dir.at("gone.img"))])
            let missing = T.error { () throws(BlockError) in _ = try catalog.resolve("gone", session: nil) }
            #expect(missing?.status == .notFound)
            #expect(missing?.message.contains(dir.at("gone.img")) == true)
            #expect(T.status { () throws(BlockError) in _ = try catalog.resolve("other", session: nil) } == .notFound)
        }

        @Test func searchPathFindsRelativeFiles() throws {
            let dir = try TempDir()
            let file = try dir.file("search/sub/b.img")
            try dir.file("search/c.img")
            let catalog = try BlockExportCatalog(exports: [], searchPath: dir.at("search"))
            for name in ["sub/b.img", "sub//b.img", "./sub/b.img", "sub/./b.img"] {
                let r = try catalog.resolve(name, session: nil)
                #expect(r.path == file, "\(name)")
                #expect(r.name == name && !r.readOnly && !r.shared && r.blockSize == nil)
            }
            #expect(try catalog.resolve("c.img", session: nil).path == dir.at("search/c.img"))
        }

        /// NBD clients (no session name, no rights checked) reach named exports only: a file
        /// under the search path is unknown to them, as docs/protocol.md 18 says.
        @Test func nbdClientsReachNamedExportsOnly() throws {
            let dir = try TempDir()
            try dir.file("search/c.img")
            let named = try dir.file("named.img")
            let catalog = try BlockExportCatalog(exports: [BlockExportSpec(name: "n", path: named)], searchPath: dir.at("search"))
            #expect(T.status { () throws(BlockError) in _ = try catalog.resolveNamed("c.img") } == .notFound)
            #expect(T.status { () throws(BlockError) in _ = try catalog.resolveNamed("") } == .notFound)
            #expect(try catalog.resolveNamed("n").path == named)
            let resolver = NBDConnectionResolver(catalog: catalog, devices: BlockDeviceTable())
            guard case .failure(let refusal) = resolver.describe("c.img") else {
                Issue.record("an NBD client found a file under the search path")
                return
            }
            #expect(refusal.reply == .errUnknown, "\(refusal)")
            var opener = resolver
            guard case .failure = opener.open("c.img") else {
                Issue.record("an NBD client opened a file under the search path")
                return
            }
        }

        /// NBD_OPT_INFO answers what NBD_OPT_GO would: an export a block session holds
        /// read-write is refused by both (INFO opened it read-only and answered writable
        /// flags, then GO was refused; found by a review against the NBD document).
        @Test func nbdInfoRefusesWhatGoWouldRefuse() throws {
            let dir = try TempDir()
            let named = try dir.file("named.img")
            let catalog = try BlockExportCatalog(exports: [BlockExportSpec(name: "n", path: named)])
            let devices = BlockDeviceTable()
            let held = try devices.open(try catalog.resolveNamed("n"), access: .readWrite, owner: "session alice")
            let resolver = NBDConnectionResolver(catalog: catalog, devices: devices)
            var opener = resolver
            guard case .failure(let go) = opener.open("n") else {
                Issue.record("GO opened an export held read-write by a session")
                return
            }
            guard case .failure(let info) = resolver.describe("n") else {
                Issue.record("INFO described an export GO refuses")
                return
            }
            #expect(info.reply == go.reply && go.reply == .errPolicy, "\(info) \(go)")
            devices.close(held, access: .readWrite, owner: "session alice")
            guard case .success(let described) = resolver.describe("n") else {
                Issue.record("INFO refused a free export")
                return
            }
            #expect(!described.flags.contains(.readOnly))
            #expect(devices.openCount == 0, "INFO leaves nothing open")
        }

        @Test func searchPathThroughASymlinkedRoot() throws {
            let dir = try TempDir()
            let file = try dir.file("real/b.img")
            try dir.symlink("root", to: dir.at("real"))
            let catalog = try BlockExportCatalog(exports: [], searchPath: dir.at("root"))
            #expect(try catalog.resolve("b.img", session: nil).path == file)
        }

        @Test func dotDotAbsoluteAndEmptyPathsAreRefused() throws {
            let dir = try TempDir()
            try dir.file("outside.img")
            try dir.file("search/sub/b.img")
            let catalog = try BlockExportCatalog(exports: [], searchPath: dir.at("search"))
            for name in ["../outside.img", "sub/../sub/b.img", "..", "sub/..", "/etc/hostname", dir.at("search/sub/b.img"), ""] {
                #expect(T.status { () throws(BlockError) in _ = try catalog.resolve(name, session: nil) } == .pathRefused, "\(name)")
            }
        }

        @Test func symlinksLeadingOutOfTheSearchPathAreRefused() throws {
            let dir = try TempDir()
            let outside = try dir.file("outside.img")
            try dir.directory("search")
            try dir.symlink("search/escape.img", to: outside)
            try dir.symlink("search/escape-relative.img", to: "../outside.img")
            try dir.symlink("search/parent", to: dir.path)
            try dir.symlink("search/root", to: "/")
            let catalog = try BlockExportCatalog(exports: [], searchPath: dir.at("search"))
            for name in ["escape.img", "escape-relative.img", "parent/outside.img", "root" + outside] {
                let error = T.error { () throws(BlockError) in _ = try catalog.resolve(name, session: nil) }
                #expect(error?.status == .pathRefused, "\(name): \(error?.message ?? "no error")")
            }
        }

        @Test func symlinksInsideTheSearchPathAreFollowed() throws {
            let dir = try TempDir()
            let target = try dir.file("search/sub/b.img")
            try dir.symlink("search/alias.img", to: "sub/b.img")
            try dir.symlink("search/absolute.img", to: target)
            try dir.symlink("search/subdir", to: "sub")
            let catalog = try BlockExportCatalog(exports: [], searchPath: dir.at("search"))
            for name in ["alias.img", "absolute.img", "subdir/b.img"] {
                #expect(try catalog.resolve(name, session: nil).path == target, "\(name)")
            }
        }

        @Test func missingFilesAndSearchPathAreNotFound() throws {
            let dir = try TempDir()
            try dir.directory("search")
            try dir.symlink("search/dangling.img", to: dir.at("nowhere.img"))
            let catalog = try BlockExportCatalog(exports: [], searchPath: dir.at("search"))
            for name in ["nope.img", "sub/nope.img", "dangling.img"] {
                #expect(T.status { () throws(BlockError) in _ = try catalog.resolve(name, session: nil) } == .notFound, "\(name)")
            }
            let noRoot = try BlockExportCatalog(exports: [], searchPath: dir.at("missing"))
            #expect(T.status { () throws(BlockError) in _ = try noRoot.resolve("x.img", session: nil) } == .notFound)
        }

        @Test func sessionNameSubstitution() throws {
            let dir = try TempDir()
            let alice = try dir.file("sessions/alice/disk.img", size: 4096)
            let bob = try dir.file("sessions/bob/disk.img", size: 8192)
            let catalog = try BlockExportCatalog(exports: [], searchPath: dir.at("sessions/%SESSNAME%"))
            let a = try catalog.resolve("disk.img", session: "alice")
            let b = try catalog.resolve("disk.img", session: "bob")
            #expect(a.path == alice)
            #expect(b.path == bob)
            #expect(a.path != b.path)
            // Without a session name (NBD) or for a session without a directory: nothing.
            #expect(T.status { () throws(BlockError) in _ = try catalog.resolve("disk.img", session: nil) } == .notFound)
            #expect(T.status { () throws(BlockError) in _ = try catalog.resolve("disk.img", session: "carol") } == .notFound)
            // Alice cannot reach Bob's directory.
            #expect(T.status { () throws(BlockError) in _ = try catalog.resolve("../bob/disk.img", session: "alice") } == .pathRefused)

            // Every occurrence is replaced.
            let twice = try dir.file("x/alice/alice.d/disk.img")
            let c2 = try BlockExportCatalog(exports: [], searchPath: dir.at("x/%SESSNAME%/%SESSNAME%.d"))
            #expect(try c2.resolve("disk.img", session: "alice").path == twice)
        }

        static let invalidSessions = ["", ".", "..", ".hidden", "a/b", "a b", "a\u{0}b", "é", "a%b", String(repeating: "s", count: 65)]

        @Test(arguments: BlockExportsTests.Resolve.invalidSessions)
        func invalidSessionNamesAreRefused(session: String) throws {
            let dir = try TempDir()
            try dir.file("sessions/a/disk.img")
            let catalog = try BlockExportCatalog(exports: [], searchPath: dir.at("sessions/%SESSNAME%"))
            #expect(!BlockExportCatalog.validSessionName(session))
            let error = T.error { () throws(BlockError) in _ = try catalog.resolve("disk.img", session: session) }
            #expect(error?.status == .invalid, "\(error?.message ?? "no error")")
        }

        @Test func validSessionNames() throws {
            let long = String(repeating: "s", count: 64)
            for name in ["a", "alice", "A-b_c.d", "0", "a..b", long] {
                #expect(BlockExportCatalog.validSessionName(name), "\(name)")
            }
            let dir = try TempDir()
            let file = try dir.file("sessions/\(long)/disk.img")
            let catalog = try BlockExportCatalog(exports: [], searchPath: dir.at("sessions/%SESSNAME%"))
            #expect(try catalog.resolve("disk.img", session: long).path == file)
        }

        @Test func readOnlyCatalogMakesEveryExportReadOnly() throws {
            let dir = try TempDir()
            let file = try dir.file("search/a.img")
            let specs = [BlockExportSpec(name: "a", path: file, shared: true)]
            let ro = try BlockExportCatalog(exports: specs, searchPath: dir.at("search"), readOnly: true)
            let rw = try BlockExportCatalog(exports: specs, searchPath: dir.at("search"))
            #expect(try ro.resolve("a", session: nil).readOnly)
            #expect(try ro.resolve("a", session: nil).shared)
            #expect(try ro.resolve("a.img", session: nil).readOnly)
            #expect(try !rw.resolve("a", session: nil).readOnly)
            #expect(try !rw.resolve("a.img", session: nil).readOnly)
        }
    }
}

// MARK: - BlockDeviceTable

extension BlockExportsTests {
    @Suite struct DeviceTable {
        typealias T = BlockExportsTests

        @Test func readersShareOneDevice() throws {
            let dir = try TempDir()
            let export = try T.resolved(try dir.file("a.img"))
            let table = BlockDeviceTable()
            let a = try table.open(export, access: .readOnly, owner: "alice")
            let b = try table.open(export, access: .readOnly, owner: "bob")
            #expect(a === b)
            #expect(table.openCount == 1)
            #expect(a.name == "disk" && a.path == export.path)
            table.close(a, access: .readOnly, owner: "alice")
            #expect(table.openCount == 1)
            table.close(b, access: .readOnly, owner: "bob")
            #expect(table.openCount == 0)
        }

        @Test func aSecondWriterFromAnotherOwnerIsBusy() throws {
            let dir = try TempDir()
            let export = try T.resolved(try dir.file("a.img"))
            let table = BlockDeviceTable()
            let a = try table.open(export, access: .readWrite, owner: "alice")
            let error = T.error { () throws(BlockError) in _ = try table.open(export, access: .readWrite, owner: "bob") }
            #expect(error?.status == .busy)
            #expect(error?.message.contains("alice") == true, "\(error?.message ?? "")")
            // Bob may still read.
            let reader = try table.open(export, access: .readOnly, owner: "bob")
            #expect(reader === a)
            table.close(reader, access: .readOnly, owner: "bob")
            table.close(a, access: .readWrite, owner: "alice")
            #expect(table.openCount == 0)
        }

        @Test func theSameOwnerMayOpenTwice() throws {
            let dir = try TempDir()
            let export = try T.resolved(try dir.file("a.img"))
            let table = BlockDeviceTable()
            let first = try table.open(export, access: .readWrite, owner: "alice")
            let second = try table.open(export, access: .readWrite, owner: "alice")
            #expect(first === second)
            table.close(first, access: .readWrite, owner: "alice")
            #expect(T.status { () throws(BlockError) in _ = try table.open(export, access: .readWrite, owner: "bob") } == .busy,
                    "alice still holds one open")
            table.close(second, access: .readWrite, owner: "alice")
            #expect(table.openCount == 0)
            let bob = try table.open(export, access: .readWrite, owner: "bob")
            table.close(bob, access: .readWrite, owner: "bob")
        }

        @Test func sharedExportsAllowSeveralWriters() throws {
            let dir = try TempDir()
            let export = try T.resolved(try dir.file("a.img"), shared: true)
            let table = BlockDeviceTable()
            let devices = try ["alice", "bob", "carol"].map { owner in (owner, try table.open(export, access: .readWrite, owner: owner)) }
            #expect(table.openCount == 1)
            for (owner, d) in devices { table.close(d, access: .readWrite, owner: owner) }
            #expect(table.openCount == 0)
        }

        @Test func migrationAllowsExactlyOneExtraWriter() throws {
            let dir = try TempDir()
            let export = try T.resolved(try dir.file("a.img"))
            let table = BlockDeviceTable()
            let a = try table.open(export, access: .readWrite, owner: "alice")
            let b = try table.open(export, access: .migration, owner: "bob")
            #expect(a === b)
            let third = T.error { () throws(BlockError) in _ = try table.open(export, access: .migration, owner: "carol") }
            #expect(third?.status == .busy)
            #expect(third?.message.contains("alice, bob") == true, "\(third?.message ?? "")")
            #expect(T.status { () throws(BlockError) in _ = try table.open(export, access: .readWrite, owner: "carol") } == .busy)
            // A writer's own further opens (another path of its session reconnecting during
            // the move) are no new writer: allowed (they were BUSY, naming the other).
            let again = try table.open(export, access: .readWrite, owner: "alice")
            table.close(again, access: .readWrite, owner: "alice")
            let moving = try table.open(export, access: .migration, owner: "bob")
            table.close(moving, access: .migration, owner: "bob")
            // Once the migration target closes, another migration may start.
            table.close(b, access: .migration, owner: "bob")
            let c = try table.open(export, access: .migration, owner: "carol")
            table.close(c, access: .migration, owner: "carol")
            table.close(a, access: .readWrite, owner: "alice")
            #expect(table.openCount == 0)
        }

        @Test(arguments: [BlockAccess.readWrite, .migration])
        func writingOpensOfAReadOnlyExportAreRefused(access: BlockAccess) throws {
            let dir = try TempDir()
            let export = try T.resolved(try dir.file("a.img"), readOnly: true)
            let table = BlockDeviceTable()
            let error = T.error { () throws(BlockError) in _ = try table.open(export, access: access, owner: "alice") }
            #expect(error?.status == .readOnly)
            #expect(table.openCount == 0, "nothing opened")
            let reader = try table.open(export, access: .readOnly, owner: "alice")
            #expect((reader.store as? FileBlockStore)?.writable == false, "a read-only export is opened read-only")
            table.close(reader, access: .readOnly, owner: "alice")
        }

        @Test func closingTheWriterLetsAnotherWriterOpen() throws {
            let dir = try TempDir()
            let export = try T.resolved(try dir.file("a.img"))
            let table = BlockDeviceTable()
            let aliceWrites = try table.open(export, access: .readWrite, owner: "alice")
            let aliceReads = try table.open(export, access: .readOnly, owner: "alice")
            #expect(T.status { () throws(BlockError) in _ = try table.open(export, access: .readWrite, owner: "bob") } == .busy)
            table.close(aliceWrites, access: .readWrite, owner: "alice")
            #expect(table.openCount == 1, "alice still reads")
            let bob = try table.open(export, access: .readWrite, owner: "bob")
            #expect(bob === aliceReads, "the same device, still open")
            table.close(bob, access: .readWrite, owner: "bob")
            table.close(aliceReads, access: .readOnly, owner: "alice")
            #expect(table.openCount == 0)
        }

        @Test func aReaderOfAWritableExportSharesItsDescriptorWithALaterWriter() throws {
            let dir = try TempDir()
            let export = try T.resolved(try dir.file("a.img"))
            let table = BlockDeviceTable()
            let reader = try table.open(export, access: .readOnly, owner: "alice")
            #expect((reader.store as? FileBlockStore)?.writable == true)
            let writer = try table.open(export, access: .readWrite, owner: "bob")
            #expect(writer === reader)
            table.close(writer, access: .readWrite, owner: "bob")
            table.close(reader, access: .readOnly, owner: "alice")
        }

        @Test func theDescriptorIsClosedWhenTheLastOpenerCloses() throws {
            let dir = try TempDir()
            let path = try dir.file("a.img")
            let export = try T.resolved(path)
            let table = BlockDeviceTable()
            #expect(T.descriptors(on: path) == 0)
            let a = try table.open(export, access: .readWrite, owner: "alice")
            let b = try table.open(export, access: .readOnly, owner: "bob")
            let c = try table.open(export, access: .readOnly, owner: "carol")
            #expect(T.descriptors(on: path) == 1, "one descriptor for every opener")
            table.close(a, access: .readWrite, owner: "alice")
            table.close(b, access: .readOnly, owner: "bob")
            #expect(table.openCount == 1)
            #expect(T.descriptors(on: path) == 1)
            table.close(c, access: .readOnly, owner: "carol")
            #expect(table.openCount == 0)
            #expect(T.descriptors(on: path) == 0, "closed although the device object is still referenced")
            withExtendedLifetime(c) {}
        }

        @Test func aFileThatDisappearedIsNotFound() throws {
            let dir = try TempDir()
            let path = try dir.file("a.img")
            let export = try T.resolved(path)
            #expect(unlink(path) == 0)
            let table = BlockDeviceTable()
            #expect(T.status { () throws(BlockError) in _ = try table.open(export, access: .readWrite, owner: "alice") } == .notFound)
            #expect(table.openCount == 0)
        }
    }
}

// MARK: - FileBlockStore

extension BlockExportsTests {
    @Suite struct FileStore {
        typealias T = BlockExportsTests
        static let size = 1 << 20

        @Test func geometryOfARegularFile() throws {
            let dir = try TempDir()
            let store = try FileBlockStore(path: try dir.file("a.img", size: Self.size), writable: true)
            #expect(store.geometry.size == UInt64(Self.size))
            #expect(!store.geometry.isBlockDevice)
            #expect(store.geometry.logicalBlockSize == 512)
            #expect(store.writable)
        }

        /// A FIFO (under a search path, say) is refused at once: opening it read-only used to
        /// wait for a writer while holding the device table's lock, and every later open and
        /// close of the server waited behind it.
        @Test(arguments: [false, true])
        func aFIFOIsRefusedWithoutWaitingForAWriter(writable: Bool) async throws {
            let dir = try TempDir()
            let path = dir.at("pipe")
            #expect(mkfifo(path, 0o600) == 0)
            let outcome = Task.detached { () -> String in
                do {
                    _ = try FileBlockStore(path: path, writable: writable)
                    return "opened"
                } catch {
                    return "\(error)"
                }
            }
            // Bounded: a blocked open is released by a writer after 10 s, and the test fails.
            let released = Task.detached {
                try await Task.sleep(for: .seconds(10))
                let w = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC)
                if w >= 0 { close(w) }
                return w >= 0
            }
            let message = await outcome.value
            released.cancel()
            #expect(await (try? released.value) == nil, "the open waited for a writer")
            #expect(message.contains("neither a regular file nor a block device"), "\(message)")
        }

        @Test(arguments: [false, true])
        func readWriteRoundTrip(durable: Bool) throws {
            let dir = try TempDir()
            let store = try FileBlockStore(path: try dir.file("a.img", size: Self.size), writable: true)
            let pattern = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
            try T.write(store, pattern, at: 4096, durable: durable)
            #expect(try T.read(store, at: 4096, count: 8192) == pattern)
            // Across the edge of what was written: zeroes, then the pattern.
            let edge = try T.read(store, at: 4000, count: 200)
            #expect(Array(edge[..<96]) == [UInt8](repeating: 0, count: 96))
            #expect(Array(edge[96...]) == Array(pattern[..<104]))
            // Unaligned, odd-sized.
            try T.write(store, [1, 2, 3], at: 12345)
            #expect(try T.read(store, at: 12344, count: 5) == [0, 1, 2, 3, 0])
            try store.flush()
        }

        /// A gathered write (one large NBD write from several network reads) lands each piece
        /// after the one before, empty pieces and more pieces than one pwritev takes included;
        /// the NBD server's batching of buffers gives the store every piece, in order.
        @Test func gatheredWritesLandPieceAfterPiece() throws {
            let dir = try TempDir()
            let store = try FileBlockStore(path: try dir.file("a.img", size: Self.size), writable: true)
            let pattern = (0..<3000).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
            // 1,500 pieces of 0 to 3 bytes (IOV_MAX is 1,024).
            var cuts: [Range<Int>] = []
            var at = 0
            while at < pattern.count {
                let n = min(cuts.count % 4, pattern.count - at)
                cuts.append(at..<at + n)
                at += n
            }
            #expect(cuts.count > 1024)
            try pattern.withUnsafeBytes { all in
                try store.write(gathered: cuts.map { UnsafeRawBufferPointer(rebasing: all[$0]) }, at: 5000)
            }
            #expect(try T.read(store, at: 5000, count: pattern.count) == pattern)
            #expect(try T.read(store, at: 4999, count: 1) == [0] && T.read(store, at: 8000, count: 1) == [0])
            // In batches, as the NBD and block servers write pieces: 70 buffers, batches of 64,
            // each batch where the ones before it end.
            let buffers = (0..<70).map { ByteBuffer(bytes: pattern[($0 * 40)..<($0 * 40 + 40)]) }
            var written: [UInt8] = []
            var batches: [(count: Int, skipped: Int)] = []
            ByteBufferPieces(buffers).forEachBatch { (pieces, skipped) in
                batches.append((pieces.count, skipped))
                for piece in pieces { written += piece }
            }
            #expect(written == Array(pattern[..<2800]))
            #expect(batches.map(\.count) == [64, 6] && batches.map(\.skipped) == [0, 64 * 40])
        }

        /// A read with `nowait` of a range whose start only is in the page cache returns false
        /// (the caller reads it all on an IO thread) instead of finishing on the caller's
        /// thread, an event loop, by waiting for the disk for the rest.
        @Test func aNowaitReadPartlyCachedIsLeftToAnIOThread() throws {
            let dir = try TempDir()
            let path = try dir.file("cold.img", size: 64 << 20)
            let fd = open(path, O_RDWR | O_CLOEXEC)
            try #require(fd >= 0)
            defer { close(fd) }
            guard parley_fs_type(fd) != 0x0102_1994 else { return }  // tmpfs: every page is in memory
            let chunk = [UInt8](repeating: 0x5a, count: 1 << 20)
            for i in 0..<64 { try #require(chunk.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(i << 20)) } == chunk.count) }
            try #require(fsync(fd) == 0)
            try #require(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0)
            let store = try FileBlockStore(path: path, writable: false)
            #expect(try T.read(store, at: 0, count: 4096) == Array(chunk[..<4096]), "the start is read, and read ahead")
            #expect(!store.isCached(offset: 0, length: 32 << 20), "the rest is not in the page cache")
            var buffer = [UInt8](repeating: 0, count: 32 << 20)
            let inline = try buffer.withUnsafeMutableBytes { try store.read(into: $0, at: 0, nowait: true) }
            #expect(!inline, "a read partly cached is not finished from the disk on the caller's thread")
            #expect(try T.read(store, at: (32 << 20) - 4096, count: 4096) == Array(chunk[..<4096]))
        }

        /// Where the file system refuses RWF_NOWAIT writes, an inline write slower than the
        /// policy's bound during which the thread slept pauses inline writes (counted), and the
        /// next one is left to the caller. One that was only preempted (the thread never
        /// slept) pauses nothing and is counted apart.
        @Test func aSlowInlineWritePausesInlineWritesAndIsCounted() throws {
            let dir = try TempDir()
            let policy = InlineWritePolicy(largest: 65536, alignment: 4096, slowNanoseconds: -1, pauseNanoseconds: 600_000_000_000)
            // Each reading of the thread's sleeps is one more: every write slept.
            let sleeps = Atomic<Int64>(0)
            let store = try FileBlockStore(path: try dir.file("a.img", size: Self.size), writable: true, inlineWrites: policy,
                                           threadSleeps: { sleeps.add(1, ordering: .relaxed).newValue })
            let page = [UInt8](repeating: 0x22, count: 4096)
            let first = try page.withUnsafeBytes { try store.write($0, at: 0, durable: false, nowait: true) }
            let second = try page.withUnsafeBytes { try store.write($0, at: 4096, durable: false, nowait: true) }
            guard !first else { return }  // RWF_NOWAIT honoured: the policy is not used
            // The first call learned that RWF_NOWAIT is refused; the second was inline, "slow"
            // (any time is over -1 ns), slept, and paused inline writes for ten minutes.
            #expect(second && store.inlineWritePauses == 1 && store.inlineWritesPreempted == 0)
            let third = try page.withUnsafeBytes { try store.write($0, at: 8192, durable: false, nowait: true) }
            #expect(!third, "paused: left to the IO threads")
            #expect(store.inlineWritePauses == 1)
            #expect(try T.read(store, at: 8192, count: 4096) == [UInt8](repeating: 0, count: 4096), "nothing written while paused")

            // The thread's sleeps never change: every slow write was preempted, none pauses.
            let preempted = try FileBlockStore(path: try dir.file("b.img", size: Self.size), writable: true, inlineWrites: policy,
                                               threadSleeps: { 7 })
            _ = try page.withUnsafeBytes { try preempted.write($0, at: 0, durable: false, nowait: true) }
            for i in 1...3 {
                #expect(try page.withUnsafeBytes { try preempted.write($0, at: UInt64(i) * 4096, durable: false, nowait: true) })
            }
            #expect(preempted.inlineWritePauses == 0 && preempted.inlineWritesPreempted == 3)
            #expect(try T.read(preempted, at: 4096, count: 3 * 4096) == [UInt8](repeating: 0x22, count: 3 * 4096))
        }

        /// What tells a blocked write from a preempted one: the thread's sleeps in the kernel
        /// go up when it sleeps, and not while it only computes.
        @Test func aThreadsSleepsCountOnlySleeping() {
            let before = FileBlockStore.threadSleeps()
            usleep(2000)
            let after = FileBlockStore.threadSleeps()
            #expect(before >= 0 && after > before)
            var x: UInt64 = 1
            for i in 0..<100_000 { x = x &* 6364136223846793005 &+ UInt64(i) }
            #expect(x != 0)
            #expect(FileBlockStore.threadSleeps() - after <= 1, "computing is not sleeping (one sleep allowed for a page fault or a log write)")
        }

        /// Within a burst (one event-loop turn's requests) the thread's sleeps are read at the
        /// first inline write only, and stand for later ones for a bounded time; outside a
        /// burst they are read before every write.
        @Test func withinABurstTheThreadsSleepsAreReadOnce() {
            FileBlockStore.beginBurst()
            let first = FileBlockStore.threadSleepsBefore(now: 1_000_000)
            usleep(2000)
            #expect(FileBlockStore.threadSleepsBefore(now: 1_500_000) == first, "read once in the burst")
            #expect(FileBlockStore.threadSleepsBefore(now: 1_000_000 + FileBlockStore.burstSleepsValid + 1) > first, "read again when that reading is too old")
            FileBlockStore.endBurst()
            let outside = FileBlockStore.threadSleepsBefore(now: 0)
            usleep(2000)
            #expect(FileBlockStore.threadSleepsBefore(now: 0) > outside, "outside a burst: read every time")
        }

        /// A handler on an event loop that does not see where the turn's reads end joins a
        /// burst that the loop ends after the turn: within it the count is read once, in the
        /// loop's next task it is read every time again.
        @Test func aBurstJoinedOnAnEventLoopEndsWithTheTurn() async throws {
            let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
            let loop = group.next()
            let inTurn = try await loop.submit {
                FileBlockStore.joinBurst(on: loop)
                FileBlockStore.joinBurst(on: loop)  // already under way: nothing more to end
                let first = FileBlockStore.threadSleepsBefore(now: 1_000)
                usleep(300)
                return (first, FileBlockStore.threadSleepsBefore(now: 2_000))
            }.get()
            #expect(inTurn.0 == inTurn.1, "read once in the turn")
            let nextTurn = try await loop.submit {
                let first = FileBlockStore.threadSleepsBefore(now: 3_000)
                usleep(300)
                return (first, FileBlockStore.threadSleepsBefore(now: 4_000))
            }.get()
            #expect(nextTurn.1 > nextTurn.0, "the burst ended with its turn")
            FileBlockStore.joinBurst(on: loop)  // not on the loop: no burst
            let outside = FileBlockStore.threadSleepsBefore(now: 0)
            usleep(300)
            #expect(FileBlockStore.threadSleepsBefore(now: 0) > outside)
            try await group.shutdownGracefully()
        }

        /// In a burst, a slow inline write whose count was read at an earlier write and has
        /// changed since is not judged (the thread slept between the writes, maybe not in this
        /// one): it pauses nothing, and the next inline write reads the count afresh and is
        /// judged on its own. (`writeInline(gathered:)` goes through the policy on any file system.)
        @Test func aSlowWriteInABurstAfterASleepBetweenWritesIsNotJudged() throws {
            let dir = try TempDir()
            let policy = InlineWritePolicy(largest: 65536, alignment: 4096, slowNanoseconds: -1, pauseNanoseconds: 600_000_000_000)
            let store = try FileBlockStore(path: try dir.file("a.img", size: Self.size), writable: true, inlineWrites: policy)
            let page = [UInt8](repeating: 0x33, count: 4096)
            func write(at offset: UInt64) throws -> Bool {
                try page.withUnsafeBytes { try store.writeInline(gathered: [$0], at: offset) }
            }
            FileBlockStore.beginBurst()
            defer { FileBlockStore.endBurst() }
            #expect(try write(at: 4096))  // reads the count; slow (any time is over -1 ns), not slept
            usleep(300)  // a sleep in the burst, outside any write (well within the 50 ms a reading stands)
            #expect(try write(at: 8192))  // the cached count has changed: not judged
            #expect(try write(at: 12288))  // read afresh: judged, not slept
            #expect(store.inlineWritePauses == 0, "the sleep between writes paused nothing")
            #expect(store.inlineWritesPreempted == 2, "the first and the third were judged")
            #expect(try T.read(store, at: 4096, count: 3 * 4096) == [UInt8](repeating: 0x33, count: 3 * 4096))
        }

        /// A write gathered from several reads is done inline when the policy takes its
        /// total length (on any file system), and otherwise left to the caller with nothing
        /// written; a slow one pauses inline writes.
        @Test func aGatheredWriteIsInlineWithinThePolicy() throws {
            let dir = try TempDir()
            let policy = InlineWritePolicy(largest: 65536, alignment: 4096, slowNanoseconds: 1_000_000_000, pauseNanoseconds: 600_000_000_000)
            let store = try FileBlockStore(path: try dir.file("a.img", size: Self.size), writable: true, inlineWrites: policy)
            let bytes = (0..<12288).map { UInt8(truncatingIfNeeded: $0 &* 7) }
            func gathered(_ data: [UInt8], at offset: UInt64, on store: FileBlockStore) throws -> Bool {
                // Three pieces of unequal size, as network reads leave them.
                let cuts = [0..<1000, 1000..<9000, 9000..<data.count]
                return try data.withUnsafeBytes { all in
                    try store.writeInline(gathered: cuts.map { UnsafeRawBufferPointer(rebasing: all[$0]) }, at: offset)
                }
            }
            #expect(try gathered(bytes, at: 8192, on: store))
            #expect(try T.read(store, at: 8192, count: bytes.count) == bytes)
            let large = [UInt8](repeating: 0x5a, count: 65536 + 4096)
            #expect(!(try gathered(large, at: 65536, on: store)), "larger than the policy's largest")
            #expect(try T.read(store, at: 65536, count: large.count) == [UInt8](repeating: 0, count: large.count))
            #expect(!(try gathered(bytes, at: 512, on: store)), "not page-aligned")
            #expect(try T.read(store, at: 0, count: 8192) == [UInt8](repeating: 0, count: 8192))
            #expect(store.inlineWritePauses == 0)

            let slow = InlineWritePolicy(largest: 65536, alignment: 4096, slowNanoseconds: -1, pauseNanoseconds: 600_000_000_000)
            let sleeps = Atomic<Int64>(0)
            let paused = try FileBlockStore(path: try dir.file("b.img", size: Self.size), writable: true, inlineWrites: slow,
                                            threadSleeps: { sleeps.add(1, ordering: .relaxed).newValue })
            #expect(try gathered(bytes, at: 0, on: paused))
            #expect(paused.inlineWritePauses == 1)
            #expect(!(try gathered(bytes, at: 16384, on: paused)), "paused after a slow one")
            #expect(try T.read(paused, at: 16384, count: bytes.count) == [UInt8](repeating: 0, count: bytes.count))
            let off = try FileBlockStore(path: try dir.file("c.img", size: Self.size), writable: true, inlineWrites: .off)
            #expect(!(try gathered(bytes, at: 0, on: off)))
        }

        @Test func inlineWritePolicyTakesSmallWholePagesUnlessPaused() {
            let p = InlineWritePolicy(largest: 65536, alignment: 4096, slowNanoseconds: 1_000_000, pauseNanoseconds: 1_000_000_000)
            #expect(p.allows(offset: 8192, length: 4096, now: 10, pausedUntil: .min))
            #expect(p.allows(offset: 0, length: 65536, now: 10, pausedUntil: .min))
            #expect(!p.allows(offset: 0, length: 65536 + 4096, now: 10, pausedUntil: .min), "too large")
            #expect(!p.allows(offset: 512, length: 4096, now: 10, pausedUntil: .min), "offset not page-aligned")
            #expect(!p.allows(offset: 4096, length: 512, now: 10, pausedUntil: .min), "part of a page")
            #expect(!p.allows(offset: 4096, length: 0, now: 10, pausedUntil: .min))
            #expect(!p.allows(offset: 4096, length: 4096, now: 10, pausedUntil: 11), "paused")
            #expect(p.allows(offset: 4096, length: 4096, now: 11, pausedUntil: 11), "the pause is over")
            #expect(p.pause(after: 1_000_000, slept: true, at: 50) == nil)
            #expect(p.pause(after: 1_000_001, slept: true, at: 50) == 1_000_000_050)
            #expect(p.pause(after: 5_000_000, slept: false, at: 50) == nil, "preempted, not blocked")
            #expect(p.isSlow(1_000_001) && !p.isSlow(1_000_000))
            #expect(!InlineWritePolicy.off.allows(offset: 0, length: 4096, now: 0, pausedUntil: .min))
        }

        /// ext4 refuses RWF_NOWAIT writes: a "nowait" write of whole pages is then done inline
        /// (true, and on disk), a partial page or a durable write is left to the caller (false,
        /// nothing written). On a file system that honours RWF_NOWAIT both are true.
        @Test func nowaitWritesOfWholePagesAreDoneInline() throws {
            let dir = try TempDir()
            let store = try FileBlockStore(path: try dir.file("a.img", size: Self.size), writable: true)
            let page = [UInt8](repeating: 0x11, count: 4096)
            // The first call learns whether the file system takes RWF_NOWAIT.
            let first = try page.withUnsafeBytes { try store.write($0, at: 0, durable: false, nowait: true) }
            let second = try page.withUnsafeBytes { try store.write($0, at: 8192, durable: false, nowait: true) }
            #expect(second, "a whole page at a page offset is written inline")
            #expect(try T.read(store, at: 8192, count: 4096) == page)
            if !first {  // RWF_NOWAIT refused: only the policy's writes are inline
                #expect(try T.read(store, at: 0, count: 4096) == [UInt8](repeating: 0, count: 4096))
                let partial = try page[..<512].withUnsafeBytes { try store.write($0, at: 16384, durable: false, nowait: true) }
                #expect(!partial)
                #expect(try T.read(store, at: 16384, count: 512) == [UInt8](repeating: 0, count: 512))
                let durable = try page.withUnsafeBytes { try store.write($0, at: 20480, durable: true, nowait: true) }
                #expect(!durable)
                let off = try FileBlockStore(path: try dir.file("b.img", size: Self.size), writable: true, inlineWrites: .off)
                _ = try page.withUnsafeBytes { try off.write($0, at: 0, durable: false, nowait: true) }
                #expect(!(try page.withUnsafeBytes { try off.write($0, at: 4096, durable: false, nowait: true) }))
            }
        }

        @Test func readingPastTheEndOfAShortFileGivesZeroes() throws {
            let dir = try TempDir()
            let contents = [UInt8](repeating: 0x5a, count: 100)
            let store = try FileBlockStore(path: try dir.file("short.img", contents: contents), writable: false)
            #expect(store.geometry.size == 100)
            let read = try T.read(store, at: 0, count: 4096)
            #expect(Array(read[..<100]) == contents)
            #expect(Array(read[100...]) == [UInt8](repeating: 0, count: 3996))
            #expect(try T.read(store, at: 1000, count: 512) == [UInt8](repeating: 0, count: 512))
        }

        @Test func discardReadsAsZeroesAndIsAHole() throws {
            let dir = try TempDir()
            let store = try FileBlockStore(path: try dir.file("a.img", size: Self.size), writable: true)
            try T.write(store, [UInt8](repeating: 0xab, count: 65536), at: 0)
            try store.discard(offset: 16384, length: 16384)
            let read = try T.read(store, at: 0, count: 65536)
            #expect(Array(read[..<16384]) == [UInt8](repeating: 0xab, count: 16384))
            #expect(Array(read[16384..<32768]) == [UInt8](repeating: 0, count: 16384))
            #expect(Array(read[32768...]) == [UInt8](repeating: 0xab, count: 32768))
            #expect(try store.extents(offset: 0, length: 65536) == [T.data(16384), T.hole(16384), T.data(32768)])
            try store.discard(offset: 0, length: 0)  // nothing
            #expect(try T.read(store, at: 0, count: 1) == [0xab])
        }

        @Test(arguments: [false, true])
        func writeZeroesReadsAsZeroes(mayDeallocate: Bool) throws {
            let dir = try TempDir()
            let store = try FileBlockStore(path: try dir.file("a.img", size: Self.size), writable: true)
            try T.write(store, [UInt8](repeating: 0xcd, count: 65536), at: 0)
            try store.writeZeroes(offset: 8192, length: 8192, mayDeallocate: mayDeallocate)
            try store.writeZeroes(offset: 40000, length: 1000, mayDeallocate: mayDeallocate)  // unaligned
            try store.writeZeroes(offset: 50000, length: 0, mayDeallocate: mayDeallocate)  // nothing
            let read = try T.read(store, at: 0, count: 65536)
            for (i, byte) in read.enumerated() {
                let zero = (8192..<16384).contains(i) || (40000..<41000).contains(i)
                if byte != (zero ? 0 : 0xcd) {
                    Issue.record("byte \(i) is \(byte)")
                    break
                }
            }
            if mayDeallocate {
                #expect(try store.extents(offset: 8192, length: 8192) == [T.hole(8192)])
            }
        }

        @Test func extentsOfDataHoleData() throws {
            let dir = try TempDir()
            let store = try FileBlockStore(path: try dir.file("a.img", size: Self.size), writable: true)
            #expect(try store.extents(offset: 0, length: UInt64(Self.size)) == [T.hole(UInt32(Self.size))], "all sparse")
            try T.write(store, [UInt8](repeating: 1, count: 65536), at: 0)
            try T.write(store, [UInt8](repeating: 2, count: 65536), at: 524_288)
            let k: UInt32 = 1024
            #expect(try store.extents(offset: 0, length: UInt64(Self.size)) == [T.data(64 * k), T.hole(448 * k), T.data(64 * k), T.hole(448 * k)])
            #expect(try store.extents(offset: 32 * 1024, length: 64 * 1024) == [T.data(32 * k), T.hole(32 * k)])
            #expect(try store.extents(offset: 480 * 1024, length: 64 * 1024) == [T.hole(32 * k), T.data(32 * k)])
            #expect(try store.extents(offset: 100 * 1024, length: 8 * 1024) == [T.hole(8 * k)])
            #expect(try store.extents(offset: 4096, length: 1) == [T.data(1)])
            // Past the end: clipped to the file, never beyond.
            #expect(try store.extents(offset: 600 * 1024, length: 10 << 20) == [T.hole(424 * k)])
            #expect(try store.extents(offset: UInt64(Self.size), length: 4096) == [])
            #expect(try store.extents(offset: UInt64(Self.size) + 1, length: 4096) == [])

            // Every window: the runs cover exactly the window (clipped to the size) and alternate.
            for offset in stride(from: UInt64(0), to: UInt64(Self.size), by: 61_440) {
                for length in [UInt64(1), 4096, 70_000, 600_000, 2 << 20] {
                    let runs = try store.extents(offset: offset, length: length)
                    let total = runs.reduce(UInt64(0)) { $0 + UInt64($1.length) }
                    #expect(total == min(UInt64(Self.size), offset + length) - offset, "\(offset)+\(length)")
                    #expect(runs.allSatisfy { $0.length > 0 })
                    #expect(zip(runs, runs.dropFirst()).allSatisfy { $0.isHole != $1.isHole }, "\(offset)+\(length): \(runs)")
                }
            }
        }

        @Test func flushAndCloseTwice() throws {
            let dir = try TempDir()
            let store = try FileBlockStore(path: try dir.file("a.img", size: 8192), writable: true)
            try T.write(store, [9], at: 0)
            try store.flush()
            store.prefetch(offset: 0, length: 8192)
            store.close()
            store.close()
        }

        @Test func writingToAReadOnlyStoreThrows() throws {
            let dir = try TempDir()
            let store = try FileBlockStore(path: try dir.file("a.img", size: 65536), writable: false)
            #expect(!store.writable)
            func expectRefused(_ what: String, _ body: () throws -> Void) {
                do {
                    try body()
                    Issue.record("\(what) on a read-only store did not throw")
                } catch let error as BlockStoreError {
                    // The kernel says EBADF (the descriptor is not open for writing): EIO for NBD.
                    #expect(error.nbd == .perm || error.nbd == .io, "\(what): \(error)")
                    #expect(error.errno == EBADF, "\(what): \(error)")
                } catch {
                    Issue.record("\(what): unexpected \(error)")
                }
            }
            expectRefused("write") { try T.write(store, [UInt8](repeating: 1, count: 512), at: 0) }
            expectRefused("durable write") { try T.write(store, [UInt8](repeating: 1, count: 512), at: 0, durable: true) }
            expectRefused("discard") { try store.discard(offset: 0, length: 4096) }
            expectRefused("write zeroes") { try store.writeZeroes(offset: 0, length: 4096, mayDeallocate: true) }
            #expect(try T.read(store, at: 0, count: 512) == [UInt8](repeating: 0, count: 512), "nothing was written")
        }

        @Test func openErrorsCarryTheErrno() throws {
            let dir = try TempDir()
            func openError(_ path: String, writable: Bool) -> BlockStoreError? {
                do throws(BlockStoreError) {
                    _ = try FileBlockStore(path: path, writable: writable)
                    return nil
                } catch {
                    return error
                }
            }
            let missing = openError(dir.at("missing.img"), writable: false)
            #expect(missing?.errno == ENOENT)
            #expect(missing?.description.contains("missing.img") == true)
            #expect(openError(dir.path, writable: false)?.errno == EINVAL, "a directory is neither a file nor a device")
            // Also read-write, where open(2) fails first (EISDIR, which was reported as a
            // storage failure): named as what it is.
            let readWrite = openError(dir.path, writable: true)
            #expect(readWrite?.errno == EINVAL && readWrite?.description.contains("neither a regular file nor a block device") == true, "\(String(describing: readWrite))")
        }

        @Test func errnoMapsToNBDErrors() {
            let cases: [(Int32, NBD.Errno)] = [
                (EPERM, .perm), (EROFS, .perm), (EACCES, .perm), (ENOSPC, .nospc), (EDQUOT, .nospc), (EFBIG, .nospc),
                (EINVAL, .inval), (EOPNOTSUPP, .notsup), (ENOMEM, .nomem), (EIO, .io), (EBADF, .io),
            ]
            for (e, nbd) in cases {
                #expect(BlockStoreError(errno: e, operation: "x").nbd == nbd, "errno \(e)")
            }
            #expect(BlockStoreError(errno: ENOSPC, operation: "write 5 bytes at 0").description
                == "write 5 bytes at 0: \(String(cString: strerror(ENOSPC)))")
        }
    }
}
