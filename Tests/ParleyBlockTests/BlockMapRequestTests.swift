import Foundation
import Parley
@testable import ParleyBlock
import Testing
import ParleyTestSupport


/// RNBD's `map_device` words, as `parley block map --rnbd` reads them.
@Suite struct BlockMapRequestTests {
    @Test func rnbdLines() throws {
        let seed = try BlockMapRequest(rnbd: "sessname=blya path=ip:10.50.100.66 device_path=/dev/ram0")
        // RNBD's server joins dev_search_path and device_path: the device is relative to
        // the server's search path, as a Parley server takes it.
        #expect(seed == BlockMapRequest(session: "blya", paths: ["10.50.100.66:7421"], device: "dev/ram0", access: "rw"))
        #expect(try BlockMapRequest(rnbd: "sessname=s path=ip:h device_path=//vm/disk").device == "vm/disk")
        let multi = try BlockMapRequest(rnbd: """
            sessname=s1 path=ip:10.0.0.2,ip:10.0.0.1 path=ip:10.0.1.1:7500 path=unix:/run/b.sock path=ip:fe80::1 \
            device_path=vm/disk access_mode=ro nr_poll_queues=4
            """)
        #expect(multi.session == "s1")
        #expect(multi.paths == ["10.0.0.1:7421", "10.0.1.1:7500", "unix:/run/b.sock", "[fe80::1]:7421"])
        #expect(multi.device == "vm/disk" && multi.access == "ro")
        #expect(try BlockMapRequest(rnbd: "sessname=m path=ip:h device_path=d access_mode=migration").access == "migration")
        // A bracketed IPv6 address with or without its port; a line with CRLF ending.
        #expect(try BlockMapRequest(rnbd: "sessname=s path=ip:[fe80::1] path=ip:[::1]:7500 device_path=d").paths == ["[fe80::1]:7421", "[::1]:7500"])
        #expect(try BlockMapRequest(rnbd: "sessname=s\tpath=ip:h\r\ndevice_path=disk\r\n") == BlockMapRequest(session: "s", paths: ["h:7421"], device: "disk", access: "rw"))
    }

    @Test(arguments: [
        ("path=ip:h device_path=d", "no sessname="),
        ("sessname=s device_path=d", "no path="),
        ("sessname=s path=ip:h", "no device_path="),
        ("sessname=s path=ip:h device_path=d access_mode=rx", "bad access_mode"),
        ("sessname=s path=gid:fe80::1 device_path=d", "InfiniBand"),
        ("sessname=s path=ip:h device_path=d size=3", "unknown RNBD word \"size=\""),
        ("sessname=s path=ip:h device_path", "expected KEY=VALUE"),
        ("sessname=s path= device_path=d", "empty path"),
        ("sessname=s path=ip:10.0.0.1, device_path=d", "bad path=ip:10.0.0.1,"),
        ("sessname=s path=, device_path=d", "bad path=,"),
        ("sessname=s path=ip:a,ip:b,ip:c device_path=d", "bad path="),
        ("sessname=s path=ip:h device_path=/", "names no device"),
        ("sessname=s sessname=t path=ip:h device_path=d", "sessname= is given twice"),
        ("sessname=s path=ip:h device_path=d device_path=e", "device_path= is given twice"),
        ("sessname=s path=ip:h device_path=d access_mode=ro access_mode=rw", "access_mode= is given twice"),
    ])
    func badLines(line: String, complaint: String) {
        do {
            _ = try BlockMapRequest(rnbd: line)
            Issue.record("accepted \(line)")
        } catch {
            #expect(error.status == .invalid)
            #expect(error.message.contains(complaint), "\(error.message)")
        }
    }
}

/// The status files `parley block list` and `unmap` read: `unmap` signals the process a
/// record names, so only records it can trust count.
@Suite struct BlockMapRecordTests {
    static func json(pid: Int32, session: String) -> String {
        """
        {"pid":\(pid),"nbd":"unix:/x.sock","exportName":"d","updated":0,"status":{"session":"\(session)","device":"d","access":"rw",
        "policy":"round-robin","sizeBytes":0,"blockSize":512,"paths":[],"outstanding":0,"waiting":0,"reads":0,"writes":0,
        "flushes":0,"otherOps":0,"bytesRead":0,"bytesWritten":0,"resends":0,"errors":0,"closed":false}}
        """
    }

    static func directory(mode: mode_t = 0o700) throws -> String {
        let path = testScratchPath("parley-records-\(UUID().uuidString)")
        #expect(mkdir(path, mode) == 0)
        #expect(chmod(path, mode) == 0)
        return path
    }

    static func write(_ text: String, to path: String, mode: mode_t = 0o644) {
        #expect(FileManager.default.createFile(atPath: path, contents: Data(text.utf8)))
        #expect(chmod(path, mode) == 0)
    }

    @Test func plantedAndForeignRecordsAreIgnored() throws {
        let dir = try Self.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // A process whose arguments say `block map` (sh's $0 and $1), as a real map's do.
        let mapLike = Process()
        mapLike.executableURL = URL(fileURLWithPath: "/bin/sh")
        mapLike.arguments = ["-c", "while :; do sleep 0.1; done", "block", "map"]
        try mapLike.run()
        defer { kill(mapLike.processIdentifier, SIGKILL); mapLike.waitUntilExit() }
        Self.write(Self.json(pid: mapLike.processIdentifier, session: "good"), to: dir + "/good.d.json")
        // pid -1 would signal every process, 0 the group, 1 init; this test process is no map.
        Self.write(Self.json(pid: -1, session: "all"), to: dir + "/all.d.json")
        Self.write(Self.json(pid: 0, session: "group"), to: dir + "/group.d.json")
        Self.write(Self.json(pid: 1, session: "init"), to: dir + "/init.d.json")
        Self.write(Self.json(pid: getpid(), session: "other"), to: dir + "/other.d.json")
        // A record others may write: not trusted either.
        Self.write(Self.json(pid: mapLike.processIdentifier, session: "writable"), to: dir + "/writable.d.json", mode: 0o666)
        #expect(BlockMap.records(directory: dir).map(\.status.session) == ["good"])
        // A directory others may write to: nothing in it counts.
        #expect(chmod(dir, 0o777) == 0)
        #expect(BlockMap.records(directory: dir).isEmpty)
    }

    /// A temporary file a killed map left, and a file that is no record, go once a minute
    /// old; newer ones stay (a map may be writing them).
    @Test func leftoversGoOnceAMinuteOld() throws {
        let dir = try Self.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for name in ["s.1234.json.tmp", "garbage.json", "fresh.json.tmp", "fresh.json", "other.txt"] {
            Self.write("{\"half\":", to: dir + "/" + name, mode: 0o600)
        }
        for name in ["s.1234.json.tmp", "garbage.json", "other.txt"] {
            try FileManager.default.setAttributes([.modificationDate: Date(timeIntervalSinceNow: -120)], ofItemAtPath: dir + "/" + name)
        }
        #expect(BlockMap.records(directory: dir).isEmpty)
        let left = try FileManager.default.contentsOfDirectory(atPath: dir).sorted()
        #expect(left == ["fresh.json", "fresh.json.tmp", "other.txt"], "\(left)")
    }

    /// The map's own status directory is made private (0700), also one made under umask 002;
    /// another user's is refused.
    @Test func aMapKeepsItsStatusDirectoryPrivate() throws {
        let open = try Self.directory(mode: 0o777)
        defer { try? FileManager.default.removeItem(atPath: open) }
        try BlockMap.prepareStateDirectory(open)
        #expect((try FileManager.default.attributesOfItem(atPath: open)[.posixPermissions] as? NSNumber)?.intValue == 0o700)
        if geteuid() == 0 {
            // As root (CI), a directory given to nobody stands for another user's.
            let foreign = try Self.directory(mode: 0o700)
            defer { try? FileManager.default.removeItem(atPath: foreign) }
            #expect(chown(foreign, 65534, 65534) == 0)
            #expect(throws: ParleyError.self) { try BlockMap.prepareStateDirectory(foreign) }
        }
        let fresh = open + "/state"
        try BlockMap.prepareStateDirectory(fresh)
        let permissions = try FileManager.default.attributesOfItem(atPath: fresh)[.posixPermissions] as? NSNumber
        #expect(permissions?.intValue == 0o700)
        try BlockMap.prepareStateDirectory(fresh)  // its own, again: fine
    }
}
