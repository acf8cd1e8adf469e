import Foundation
import ParleyTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A program run in the background with its output in a log file; stopped by PID.
final class BackgroundProcess: @unchecked Sendable {
    let process = Process()
    let logPath: String

    init(_ executable: String, _ arguments: [String], log: String) throws {
        self.logPath = log
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        self.process.executableURL = URL(fileURLWithPath: executable)
        self.process.arguments = arguments
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        self.process.standardOutput = handle
        self.process.standardError = handle
        self.process.standardInput = FileHandle.nullDevice
        try self.process.run()
    }

    var log: String { String(decoding: FileManager.default.contents(atPath: self.logPath) ?? Data(), as: UTF8.self) }
    var isRunning: Bool { self.process.isRunning }
    var pid: Int32 { self.process.processIdentifier }

    /// Waits (at most `seconds`) for a log line containing `text`; false if the process ended first.
    func wait(for text: String, seconds: Double = 60) async -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if self.log.contains(text) { return true }
            if !self.process.isRunning { return self.log.contains(text) }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return false
    }

    /// Waits for the process to end by itself (at most `seconds`, then SIGKILL); its status.
    @discardableResult
    func waitForExit(seconds: Double = 60) async -> Int32 {
        await ParleyTestSupport.waitForExit(self.process, killAfter: seconds)
        return self.process.terminationStatus
    }

    @discardableResult
    func stop(signal: Int32 = SIGTERM, seconds: Double = 30) -> Int32 {
        stopProcessBlocking(self.process, signal: signal, grace: seconds)
        return self.process.terminationStatus
    }

    deinit { if self.process.isRunning { kill(self.process.processIdentifier, SIGKILL) } }
}

/// `parley block map` in the background, serving on a Unix socket in the scratch directory.
final class BlockMapProcess: @unchecked Sendable {
    let background: BackgroundProcess
    let socket: String
    let stateDir: String
    let export: String

    /// Starts `parley block map` with `arguments` (paths, device, options) and waits until it
    /// has mapped the device; throws (recording the log) if it does not.
    init(scratch: ScratchDirectory, export: String = "disk", _ arguments: [String]) async throws {
        let tag = UUID().uuidString.prefix(6)
        self.socket = scratch.file("map-\(tag).sock")
        self.stateDir = scratch.file("state")
        self.export = export
        self.background = try BackgroundProcess(try Tools.parley, ["block", "map", "--nbd", "unix:\(self.socket)", "--state-dir", self.stateDir] + arguments,
                                                log: scratch.file("map-\(tag).log"))
        guard await self.background.wait(for: "mapped ") else {
            self.background.stop(signal: SIGKILL)
            Issue.record("parley block map did not map: \(self.background.log)")
            throw CancellationError()
        }
    }

    var uri: String { "nbd+unix:///\(self.export)?socket=\(self.socket)" }
    var log: String { self.background.log }
    @discardableResult
    func stop() -> Int32 { self.background.stop() }
}

/// `parley chaos` between a map's path and the server, cutting connections.
final class ChaosProcess: @unchecked Sendable {
    let background: BackgroundProcess
    let listen: String

    init(scratch: ScratchDirectory, to target: String, _ arguments: [String]) async throws {
        let tag = UUID().uuidString.prefix(6)
        self.listen = "unix:" + scratch.file("chaos-\(tag).sock")
        self.background = try BackgroundProcess(try Tools.parley, ["chaos", "--listen", self.listen, "--to", target] + arguments,
                                                log: scratch.file("chaos-\(tag).log"))
        guard await self.background.wait(for: "parley chaos:") else {
            self.background.stop(signal: SIGKILL)
            Issue.record("parley chaos did not start: \(self.background.log)")
            throw CancellationError()
        }
    }

    /// Connections cut so far.
    var cuts: Int { self.background.log.split(separator: "\n").filter { $0.contains(": cut after") }.count }
    func stop() { self.background.stop() }
}

/// fio's verify job, as the interop tests run it: a write phase, then (a second fio run)
/// the verify phase reading every block back.
enum FioVerify {
    static func arguments(uri: String, size: String = "32M", phase: String, seed: Int = 1) -> [String] {
        var args = ["--name=verify", "--ioengine=nbd", "--uri=\(uri)", "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=\(size)",
                    "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--randseed=\(seed)", "--output-format=json"]
        args += phase == "write" ? ["--do_verify=0"] : ["--verify_only=1"]
        return args
    }

    /// The job's error and bytes moved, from fio's JSON.
    static func result(_ out: ToolOutput) throws -> (error: Int, read: Int, written: Int) {
        let text = out.stdout
        guard let brace = text.firstIndex(of: "{") else { return (-1, 0, 0) }
        let json = try #require(try JSONSerialization.jsonObject(with: Data(text[brace...].utf8)) as? [String: Any])
        let job = try #require((json["jobs"] as? [[String: Any]])?.first)
        let read = (job["read"] as? [String: Any])?["io_bytes"] as? Int ?? 0
        let write = (job["write"] as? [String: Any])?["io_bytes"] as? Int ?? 0
        return (job["error"] as? Int ?? -1, read, write)
    }
}

/// `parley block map` used by the NBD programs, through failovers, server restarts and bad input.
@Suite(.timeLimit(.minutes(10)), .serialized)
struct BlockMapTests {
    func server(_ scratch: ScratchDirectory, size: Int = 64 << 20, extra: [String] = []) async throws -> BlockServerProcess {
        try scratch.sparseFile("disk.img", size: size)
        return try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(scratch.file("disk.img"))"] + extra)
    }

    @Test func nbdinfoQemuImgAndNbdcopyThroughTheMap() async throws {
        let nbdinfo = try Tools.require("nbdinfo", package: "libnbd-bin")
        let nbdcopy = try Tools.require("nbdcopy", package: "libnbd-bin")
        let qemuImg = try Tools.require("qemu-img", package: "qemu-utils")
        let qemuIO = try Tools.require("qemu-io", package: "qemu-utils")
        let scratch = try ScratchDirectory("map")
        let server = try await self.server(scratch, size: 48 << 20)
        defer { server.stop() }
        let map = try await BlockMapProcess(scratch: scratch, [
            "--session", "interop", "--path", "127.0.0.1:\(server.blockPort)", "--path", "unix:\(server.blockSocket)", "--device", "disk",
        ])
        defer { map.stop() }
        let info = try await Tools.run(nbdinfo, [map.uri])
        #expect(info.status == 0, "\(info.combined)")
        #expect(info.stdout.contains("export-size: 50331648"))
        #expect(info.stdout.contains("block_size_minimum: 512"))
        #expect(info.stdout.contains("is_read_only: false"))

        // qemu-img convert a qcow2 image in and out, then compare.
        let source = scratch.file("source.qcow2")
        #expect(try await Tools.run(qemuImg, ["create", "-f", "qcow2", source, "48M"]).status == 0)
        let fill = try await Tools.run(qemuIO, ["-c", "write -P 0xab 1M 3M", "-c", "write -P 0x5c 17M 64k", "-c", "write -P 0x01 40M 8M", source])
        #expect(fill.status == 0, "\(fill.combined)")
        let into = try await Tools.run(qemuImg, ["convert", "-n", "-f", "qcow2", "-O", "raw", source, map.uri], seconds: 240)
        #expect(into.status == 0, "\(into.combined)")
        let back = scratch.file("back.qcow2")
        let out = try await Tools.run(qemuImg, ["convert", "-f", "raw", "-O", "qcow2", map.uri, back], seconds: 240)
        #expect(out.status == 0, "\(out.combined)")
        let compare = try await Tools.run(qemuImg, ["compare", "-f", "qcow2", "-F", "qcow2", source, back])
        #expect(compare.status == 0 && compare.stdout.contains("Images are identical"), "\(compare.combined)")

        // nbdcopy: random bytes in and back out.
        let random = scratch.file("random.bin")
        #expect(try await Tools.run("/bin/dd", ["if=/dev/urandom", "of=\(random)", "bs=1M", "count=48", "status=none"]).status == 0)
        let up = try await Tools.run(nbdcopy, [random, map.uri], seconds: 240)
        #expect(up.status == 0, "\(up.combined)")
        let down = try await Tools.run(nbdcopy, [map.uri, scratch.file("copy.bin")], seconds: 240)
        #expect(down.status == 0, "\(down.combined)")
        #expect(try await Tools.run("/usr/bin/cmp", [random, scratch.file("copy.bin")]).status == 0, "nbdcopy round trip differs")
        // What the map wrote is on the server's file.
        #expect(try await Tools.run("/usr/bin/cmp", [random, scratch.file("disk.img")]).status == 0, "the server's file differs")
    }

    /// nbd-client (what gives a `/dev/nbdN`) opens an export with NBD_OPT_GO and asks for no
    /// information, block sizes included: the map's 512-byte device must still be served.
    /// libnbd, told not to ask (`set_request_block_size(False)`), opens it the same way.
    @Test func aClientThatDoesNotAskForBlockSizesIsServed() async throws {
        // libnbd's Python binding, as Debian's python3-libnbd installs it for the system's
        // Python (nbdsh runs whichever python3 comes first in PATH, which may lack it).
        let python = "/usr/bin/python3"
        let probe = try await Tools.run(python, ["-c", "import nbd"])
        try #require(probe.status == 0, "libnbd's Python binding is not installed: apt-get install python3-libnbd (.ci/run does)")
        let scratch = try ScratchDirectory("map-nbdsh")
        let server = try await self.server(scratch, size: 1 << 20)
        defer { server.stop() }
        let map = try await BlockMapProcess(scratch: scratch, [
            "--session", "nbdsh", "--path", "127.0.0.1:\(server.blockPort)", "--device", "disk",
        ])
        defer { map.stop() }
        let script = """
            import nbd
            h = nbd.NBD()
            h.set_request_block_size(False)
            h.set_strict_mode(0)
            h.connect_uri("\(map.uri)")
            print("minimum", h.get_block_size(nbd.SIZE_MINIMUM))
            h.pwrite(b"\\x5a" * 4096, 8192)
            print("read back", h.pread(4096, 8192) == b"\\x5a" * 4096)
            try:
                h.pread(100, 1)
                print("unaligned read answered")
            except nbd.Error as e:
                import errno
                # This binding gives the errno's name ("EINVAL"), others its number.
                print("unaligned read errno", e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), e.errno))
            h.shutdown()
            """
        let out = try await Tools.run(python, ["-c", script])
        #expect(out.status == 0, "\(out.combined)")
        #expect(out.stdout.contains("minimum 512"), "\(out.combined)")
        #expect(out.stdout.contains("read back True"), "\(out.combined)")
        #expect(out.stdout.contains("unaligned read errno \(EINVAL)"), "\(out.combined)")

        // nbd-client itself: it negotiates (NBD_OPT_GO, no information asked for) and would
        // then hand the socket to the kernel's nbd driver, which this machine may not have
        // (no /dev/nbdN in a container): what is checked is that the map opened the export
        // for it, and that the server refused nothing.
        let nbdClient = ["/usr/sbin/nbd-client", "/sbin/nbd-client"].first { FileManager.default.isExecutableFile(atPath: $0) }
        let client = try #require(nbdClient, "nbd-client is not installed: apt-get install nbd-client (.ci/run does)")
        let opens = map.log.components(separatedBy: "NBD client opened export").count
        let negotiated = try await Tools.run(client, ["-unix", map.socket, "/dev/nbd15", "-N", "disk"], seconds: 30)
        if negotiated.status == 0 { _ = try? await Tools.run(client, ["-d", "/dev/nbd15"], seconds: 30) }  // a machine with the driver
        #expect(negotiated.combined.contains("size = 1MB"), "\(negotiated.combined)")
        #expect(!negotiated.combined.contains("Server said"), "\(negotiated.combined)")
        #expect(map.log.components(separatedBy: "NBD client opened export").count == opens + 1, "\(map.log)")
    }

    @Test func fioVerifiesThroughTheMapAndListAndUnmapWork() async throws {
        let fio = try Tools.require("fio", package: "fio")
        let scratch = try ScratchDirectory("map")
        let server = try await self.server(scratch)
        defer { server.stop() }
        let map = try await BlockMapProcess(scratch: scratch, [
            // No --policy: min-inflight is the default (RNBD's), which `list` shows below.
            "--rnbd", "sessname=fio path=ip:127.0.0.1:\(server.blockPort) path=ip:127.0.0.1:\(server.blockPort) device_path=disk access_mode=rw",
        ])
        defer { map.stop() }
        let write = try await Tools.run(fio, FioVerify.arguments(uri: map.uri, phase: "write"), seconds: 300)
        #expect(write.status == 0, "\(write.combined)")
        let verify = try await Tools.run(fio, FioVerify.arguments(uri: map.uri, phase: "verify"), seconds: 300)
        #expect(verify.status == 0, "\(verify.combined)")
        let w = try FioVerify.result(write), v = try FioVerify.result(verify)
        #expect(w.error == 0 && w.written == 32 << 20, "\(write.stdout)")
        #expect(v.error == 0 && v.read == 32 << 20, "\(verify.stdout)")

        // parley block list shows the session, its device and both paths up.
        let list = try await Tools.run(try Tools.parley, ["block", "list", "--state-dir", map.stateDir])
        #expect(list.status == 0, "\(list.combined)")
        #expect(list.stdout.contains("session fio device disk (rw, 67108864 bytes"), "\(list.stdout)")
        #expect(list.stdout.contains("policy min-inflight"), "\(list.stdout)")
        #expect(list.stdout.split(separator: "\n").filter { $0.contains("path ") && $0.contains(": up,") }.count == 2, "\(list.stdout)")
        let json = try await Tools.run(try Tools.parley, ["block", "list", "--json", "--state-dir", map.stateDir])
        #expect(json.stdout.contains("\"session\":\"fio\""), "\(json.stdout)")
        // What `unmap` waits by default: twice the default --io-timeout (30 s), and 30 s.
        #expect(json.stdout.contains("\"unmapWithin\":90"), "\(json.stdout)")

        // unmap: the map drains, flushes, closes and exits; list no longer shows it.
        let unmap = try await Tools.run(try Tools.parley, ["block", "unmap", "--session", "fio", "--state-dir", map.stateDir])
        #expect(unmap.status == 0, "\(unmap.combined)")
        #expect(await map.background.waitForExit(seconds: 30) == 0, "\(map.log)")
        #expect(map.log.contains("unmapped disk"))
        #expect(server.log.contains("block device closed"))
        let after = try await Tools.run(try Tools.parley, ["block", "list", "--state-dir", map.stateDir])
        #expect(after.stdout.contains("no maps"), "\(after.stdout)")
        let again = try await Tools.run(try Tools.parley, ["block", "unmap", "--session", "fio", "--state-dir", map.stateDir])
        #expect(again.status == 2 && again.stdout.contains("no map of session fio"), "\(again.combined)")
    }

    /// Writes whose header arrives alone and whose payload comes in the next read (libnbd
    /// sends the two apart): from 1 KiB on, the payload is taken as the next read's bytes
    /// (one piece, or several as they come), not copied. Directly and through the map, every
    /// write lands byte for byte, with the requests sharing a read with a payload's end.
    @Test(arguments: [false, true]) func writesWhosePayloadComesInTheNextReadLandWhole(throughMap: Bool) async throws {
        let scratch = try ScratchDirectory("map")
        let server = try await self.server(scratch, size: 8 << 20)
        defer { server.stop() }
        var map: BlockMapProcess?
        if throughMap {
            map = try await BlockMapProcess(scratch: scratch, ["--session", "split", "--path", "unix:\(server.blockSocket)", "--device", "disk"])
        }
        defer { map?.stop() }
        let socket = try RawSocket(unixPath: map.map { String($0.socket) } ?? server.nbdSocket)
        let (nbd, go, message) = try RawNBD.connect(socket, export: "disk")
        #expect(go == 1, "\(message)")
        func header(_ cookie: UInt64, type: UInt16 = 1, offset: Int, length: Int) -> [UInt8] {
            var b = Bytes()
            b.u32(0x2560_9513); b.u16(0); b.u16(type); b.u64(cookie); b.u64(UInt64(offset)); b.u32(UInt32(length))
            return b.data
        }
        // 512 B (copied: below 1 KiB), 1 KiB, 4 KiB in one piece, 12 KiB in three pieces, 4 KiB
        // whose payload ends in the same send as the next header.
        let lengths = [512, 1024, 4096, 12_288, 4096, 4096]
        var expected: [(offset: Int, data: [UInt8])] = []
        var carry: [UInt8] = []
        for (i, length) in lengths.enumerated() {
            let offset = i * (64 << 10)
            let data = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ ($0 >> 8) &* 7 &+ i &* 29 &+ 5) }  // no 4 KiB period
            expected.append((offset, data))
            #expect(socket.send(carry + header(UInt64(i + 1), offset: offset, length: length)))
            carry = []
            usleep(20_000)  // the header alone in a read
            if length == 12_288 {
                for part in 0..<3 {
                    #expect(socket.send(Array(data[(part * 4096)..<((part + 1) * 4096)])))
                    usleep(20_000)
                }
            } else if i == 4 {
                carry = data  // sent with the next header
            } else {
                #expect(socket.send(data))
            }
        }
        #expect(socket.send(header(100, type: 3, offset: 0, length: 0)))  // FLUSH
        var answered: [UInt64: UInt32] = [:]
        for _ in 0...lengths.count {
            let reply = try nbd.simpleReply()
            answered[reply.cookie] = reply.error
        }
        var all = Dictionary(uniqueKeysWithValues: (1...lengths.count).map { (UInt64($0), UInt32(0)) })
        all[100] = 0
        #expect(answered == all)
        for (i, e) in expected.enumerated() {
            #expect(BlockServerTests.fileBytes(scratch.file("disk.img"), offset: e.offset, count: e.data.count) == e.data, "write \(i + 1) of \(e.data.count) bytes")
        }
    }

    /// fio writes and verifies through a two-path map while `parley chaos` cuts one path
    /// again and again: every cut leaves IO in doubt, which is re-sent on the other path
    /// ([R-17.8-1], [R-17.8-2]).
    @Test func fioVerifiesWhileOnePathIsCutRepeatedly() async throws {
        let fio = try Tools.require("fio", package: "fio")
        let scratch = try ScratchDirectory("map")
        let server = try await self.server(scratch)
        defer { server.stop() }
        // Each connection through the proxy is cut after 256 KiB in either direction.
        let chaos = try await ChaosProcess(scratch: scratch, to: "unix:\(server.blockSocket)", ["--cut-after", "262144", "--seed", "10"])
        defer { chaos.stop() }
        let map = try await BlockMapProcess(scratch: scratch, [
            "--session", "chaos", "--path", "unix:\(server.blockSocket)", "--path", chaos.listen, "--device", "disk",
        ])
        defer { map.stop() }
        var round = 0
        // Bounded: rounds of a write phase and a verify phase until the path was cut 20 times.
        while round < 4 && (round == 0 || chaos.cuts < 20) {
            round += 1
            let write = try await Tools.run(fio, FioVerify.arguments(uri: map.uri, phase: "write", seed: round), seconds: 300)
            #expect(write.status == 0, "\(write.combined)")
            let verify = try await Tools.run(fio, FioVerify.arguments(uri: map.uri, phase: "verify", seed: round), seconds: 300)
            #expect(verify.status == 0, "\(verify.combined)")
            let w = try FioVerify.result(write), v = try FioVerify.result(verify)
            #expect(w.error == 0 && w.written == 32 << 20, "\(write.stdout)")
            #expect(v.error == 0 && v.read == 32 << 20, "verify failed in round \(round): \(verify.combined)")
        }
        #expect(chaos.cuts >= 20, "only \(chaos.cuts) cuts")
        let downs = map.log.components(separatedBy: "path down").count - 1
        #expect(downs >= 20, "the map saw \(downs) path failures")
        let status = try await Tools.run(try Tools.parley, ["block", "list", "--json", "--state-dir", map.stateDir])
        #expect(!status.stdout.contains("\"resends\":0,"), "nothing was re-sent: \(status.stdout)")
        #expect(status.stdout.contains("\"errors\":0"), "\(status.stdout)")
    }

    /// A partition ([R-17.8-6], [R-17.8-7]): the client-to-server direction of one path stalls
    /// in the middle of a 256 KiB write. The map finds the path dead (keepalive), fences its
    /// connection on the other path, sends the write again there, and takes a later write to
    /// the same blocks. When the stall ends the server receives the rest of the first copy on
    /// the old connection, which it has not seen end: it must not carry it out. Without the
    /// fence it lands over the later write (the test fails so with fencing off).
    @Test func aStalledPathsLateCopyNeverLandsOverALaterWrite() async throws {
        let scratch = try ScratchDirectory("map")
        let server = try await self.server(scratch, size: 8 << 20)
        defer { server.stop() }
        let chaos = try await ChaosProcess(scratch: scratch, to: "unix:\(server.blockSocket)",
                                           ["--stall-after", "65536", "--stall-for", "10000", "--only", "c2s"])
        defer { chaos.stop() }
        let map = try await BlockMapProcess(scratch: scratch, [
            "--session", "stall", "--path", "unix:\(server.blockSocket)", "--path", chaos.listen, "--device", "disk", "--policy", "round-robin",
        ])
        defer { map.stop() }
        let socket = try RawSocket(unixPath: map.socket)
        socket.setTimeout(60)
        let (nbd, go, message) = try RawNBD.connect(socket, export: "disk")
        #expect(go == 1, "\(message)")
        // A read takes path 1, so that the write takes path 2, through the proxy (round-robin).
        nbd.request(type: 0, cookie: 1, offset: 0, length: 4096)
        #expect(try nbd.simpleReply(readLength: 4096).error == 0)
        let first = [UInt8](repeating: 0xaa, count: 256 << 10)
        nbd.request(type: 1, cookie: 2, offset: 0, length: UInt32(first.count), payload: first)
        let answered = try nbd.simpleReply()  // once path 2 is found dead, fenced, and the write sent again
        #expect(answered.error == 0 && answered.cookie == 2, "\(map.log)")
        #expect(map.log.contains("path down") && map.log.contains("fenced path 2 connection 1"), "\(map.log)")
        let second = [UInt8](repeating: 0x55, count: 4096)
        nbd.request(type: 1, cookie: 3, offset: 0, length: UInt32(second.count), payload: second)
        #expect(try nbd.simpleReply().error == 0)
        // The stall ends: the proxy delivers the rest of the first copy, then closes that connection.
        var ended = false
        for _ in 0..<400 where !ended {  // at most 40 s
            ended = server.log.contains("block session ended")
            if !ended { try await Task.sleep(for: .milliseconds(100)) }
        }
        #expect(ended, "the stalled connection did not end: \(chaos.background.log)")
        try await Task.sleep(for: .milliseconds(500))
        nbd.request(type: 0, cookie: 4, offset: 0, length: 8192)
        let back = try nbd.simpleReply(readLength: 8192)
        #expect(back.error == 0)
        #expect(Array(back.data[..<4096]) == second, "the later write was overwritten by a late copy of the first")
        #expect(Array(back.data[4096...]) == Array(first[4096..<8192]))
        #expect(server.log.contains("block connections fenced"), "\(server.log)")
    }

    /// The server is killed (SIGKILL) while fio writes through the map and started again on
    /// the same file: IO waits, then resumes, and every block verifies.
    @Test func ioWaitsForAKilledServerAndResumes() async throws {
        let fio = try Tools.require("fio", package: "fio")
        let scratch = try ScratchDirectory("map")
        let first = try await self.server(scratch)
        let map = try await BlockMapProcess(scratch: scratch, [
            "--session", "restart", "--path", "unix:\(first.blockSocket)", "--path", "unix:\(first.blockSocket)", "--device", "disk",
            "--io-timeout", "60",
        ])
        defer { map.stop() }
        let writer = try BackgroundProcess(fio, FioVerify.arguments(uri: map.uri, size: "48M", phase: "write") + ["--rate_iops=3000"],
                                           log: scratch.file("fio-write.log"))
        // Kill the server once fio is under way, and start it again on the same sockets and file.
        #expect(await map.background.wait(for: "NBD client opened export", seconds: 30) || map.log.contains("mapped"))
        try await Task.sleep(for: .milliseconds(1500))
        #expect(writer.isRunning, "fio finished before the server was killed: \(writer.log)")
        first.stop(signal: SIGKILL)
        #expect(await map.background.wait(for: "path down", seconds: 30), "\(map.log)")
        try await Task.sleep(for: .seconds(1))
        let second = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(scratch.file("disk.img"))"])
        defer { second.stop() }
        #expect(await writer.waitForExit(seconds: 300) == 0, "fio: \(writer.log)")
        let verify = try await Tools.run(fio, FioVerify.arguments(uri: map.uri, size: "48M", phase: "verify"), seconds: 300)
        #expect(verify.status == 0, "\(verify.combined)")
        let v = try FioVerify.result(verify)
        #expect(v.error == 0 && v.read == 48 << 20, "\(verify.stdout)")
        #expect(map.log.components(separatedBy: "path up").count - 1 >= 4, "both paths came back: \(map.log)")
    }

    /// With no server at all, IO fails with EIO after --io-timeout instead of hanging ([R-17.8-3]).
    @Test func ioFailsWithEIOWhenNoPathComesBack() async throws {
        let nbdcopy = try Tools.require("nbdcopy", package: "libnbd-bin")
        let scratch = try ScratchDirectory("map")
        let server = try await self.server(scratch, size: 8 << 20)
        let map = try await BlockMapProcess(scratch: scratch, [
            "--session", "gone", "--path", "unix:\(server.blockSocket)", "--device", "disk", "--io-timeout", "2",
        ])
        defer { map.stop() }
        server.stop(signal: SIGKILL)
        #expect(await map.background.wait(for: "path down", seconds: 30), "\(map.log)")
        let copy = try await Tools.run(nbdcopy, [map.uri, scratch.file("out.bin")], seconds: 120)
        #expect(copy.status != 0, "\(copy.combined)")
        #expect(copy.combined.contains("Input/output error"), "\(copy.combined)")
        #expect(map.log.contains("no path for"), "\(map.log)")
        // Unmapping: the final flush finds no path either and fails; `parley block unmap`
        // says so and exits 1 (it does not report a clean unmap).
        let unmap = try await Tools.run(try Tools.parley, ["block", "unmap", "--session", "gone", "--state-dir", map.stateDir])
        #expect(unmap.status == 1, "\(unmap.combined)")
        #expect(unmap.stdout.contains("the final flush failed"), "\(unmap.combined)")
        #expect(await map.background.waitForExit(seconds: 30) == 1, "\(map.log)")
        let list = try await Tools.run(try Tools.parley, ["block", "list", "--state-dir", map.stateDir])
        #expect(list.stdout.contains("no maps"), "\(list.combined)")
    }

    /// A map of session `session` (read-write, one path) whose server was killed: its path down.
    func mapWithNoPath(_ session: String, ioTimeout: Int) async throws -> (ScratchDirectory, BlockMapProcess) {
        let scratch = try ScratchDirectory("map-\(session)")
        let server = try await self.server(scratch, size: 8 << 20)
        let map = try await BlockMapProcess(scratch: scratch, [
            "--session", session, "--path", "unix:\(server.blockSocket)", "--device", "disk", "--io-timeout", "\(ioTimeout)",
        ])
        server.stop(signal: SIGKILL)
        #expect(await map.background.wait(for: "path down", seconds: 30), "\(map.log)")
        return (scratch, map)
    }

    /// Unmapping with no path up waits (up to --io-timeout) for one, for the final flush, and
    /// says so; a second SIGTERM (`parley block unmap` again) waits too, a second SIGINT
    /// (Ctrl-C again) exits at once, with status 1.
    @Test func aSecondSignalEndsAnUnmapThatWaitsForAPath() async throws {
        let (scratch, map) = try await self.mapWithNoPath("stuck", ioTimeout: 600)
        defer { map.background.stop(signal: SIGKILL) }
        // `parley block unmap` sends the first SIGTERM and waits.
        let unmap = try BackgroundProcess(try Tools.parley, ["block", "unmap", "--session", "stuck", "--state-dir", map.stateDir],
                                          log: scratch.file("unmap.log"))
        #expect(await map.background.wait(for: "closing with no path up", seconds: 30), "\(map.log)")
        #expect(map.background.isRunning, "the unmap waits for a path: \(map.log)")
        // A second SIGTERM, from an unmap that waits half a second, not the map's 1,230 s.
        let impatient = try await Tools.run(try Tools.parley, ["block", "unmap", "--session", "stuck", "--timeout", "0.5", "--state-dir", map.stateDir])
        #expect(impatient.status == 1 && impatient.stdout.contains("is still running after 0.5 s"), "\(impatient.combined)")
        #expect(map.background.isRunning, "a second SIGTERM waits with the first: \(map.log)")
        kill(map.background.pid, SIGINT)
        #expect(await map.background.waitForExit(seconds: 30) == 1, "\(map.log)")
        #expect(map.log.contains("interrupted again: exiting without waiting for the unmap"), "\(map.log)")
        // The unmap that waited does not report a clean unmap.
        #expect(await unmap.waitForExit(seconds: 30) == 1, "\(unmap.log)")
        #expect(unmap.log.contains("ended during its unmap"), "\(unmap.log)")
    }

    /// An NBD client that disconnects from a read-write map with no path up: the flush at
    /// the connection's end fails (EIO after --io-timeout), which no reply can carry: the
    /// map logs it as an error instead of dropping it.
    @Test func aFailedFlushAtAConnectionsEndIsLogged() async throws {
        let nbdinfo = try Tools.require("nbdinfo", package: "libnbd-bin")
        let (scratch, map) = try await self.mapWithNoPath("endflush", ioTimeout: 1)
        // The directory (the map's socket in it) goes with its last use.
        defer { withExtendedLifetime(scratch) { _ = map.background.stop(signal: SIGKILL) } }
        // nbdinfo's handshake needs no path (the map knows the device); its disconnect flushes.
        let info = try await Tools.run(nbdinfo, ["--size", map.uri], seconds: 60)
        #expect(info.status == 0, "\(info.combined)")
        #expect(await map.background.wait(for: "the flush at a connection's end failed", seconds: 30), "\(map.log)")
    }

    /// A second map on the socket a running map serves is refused (NIO's own clean-up would
    /// remove the running map's socket and serve the other device there); a clean unmap
    /// removes its socket; a socket left by a killed map is taken over.
    @Test func aSocketARunningMapServesIsNotTaken() async throws {
        let nbdinfo = try Tools.require("nbdinfo", package: "libnbd-bin")
        let scratch = try ScratchDirectory("map-socket")
        let server = try await self.server(scratch, size: 4 << 20)
        defer { server.stop() }
        let args = ["--path", "unix:\(server.blockSocket)", "--device", "disk"]
        let map = try await BlockMapProcess(scratch: scratch, ["--session", "first"] + args)
        // Read-only: the server lets it open the device beside the first map's read-write open.
        let second = try await Tools.run(try Tools.parley, ["block", "map", "--session", "second", "--nbd", "unix:\(map.socket)",
                                                             "--state-dir", map.stateDir, "--read-only"] + args, seconds: 60)
        #expect(second.status == 2 && second.stdout.contains("is in use"), "\(second.combined)")
        let info = try await Tools.run(nbdinfo, [map.uri])
        #expect(info.status == 0, "the first map still serves its socket: \(info.combined)")
        #expect(map.stop() == 0, "\(map.log)")
        #expect(!FileManager.default.fileExists(atPath: map.socket), "a clean unmap removes its socket")

        let killed = try BackgroundProcess(try Tools.parley, ["block", "map", "--session", "killed", "--nbd", "unix:\(map.socket)",
                                                             "--state-dir", map.stateDir] + args, log: scratch.file("killed.log"))
        #expect(await killed.wait(for: "mapped "), "\(killed.log)")
        killed.stop(signal: SIGKILL)
        #expect(FileManager.default.fileExists(atPath: map.socket), "a killed map leaves its socket")
        // Read-only: the server may not have seen the killed map's read-write open end yet.
        let next = try BackgroundProcess(try Tools.parley, ["block", "map", "--session", "next", "--nbd", "unix:\(map.socket)",
                                                           "--state-dir", map.stateDir, "--read-only"] + args, log: scratch.file("next.log"))
        defer { next.stop() }
        #expect(await next.wait(for: "mapped "), "a stale socket is taken over: \(next.log)")
        #expect(try await Tools.run(nbdinfo, [map.uri]).status == 0)

        // Not a socket: never removed.
        let plain = scratch.file("plain.file")
        #expect(FileManager.default.createFile(atPath: plain, contents: Data("keep".utf8)))
        let onFile = try await Tools.run(try Tools.parley, ["block", "map", "--session", "third", "--nbd", "unix:\(plain)",
                                                             "--state-dir", map.stateDir, "--read-only"] + args, seconds: 60)
        #expect(onFile.status == 2 && onFile.stdout.contains("is not a Unix socket"), "\(onFile.combined)")
        #expect(FileManager.default.contents(atPath: plain) == Data("keep".utf8))
    }

    /// Two maps of one session and device (two read-only maps): `unmap` names both with
    /// their pids, and unmaps the one `--pid` names.
    @Test func unmapTellsTwoMapsOfOneDeviceApartByPid() async throws {
        let scratch = try ScratchDirectory("map")
        try scratch.sparseFile("disk.img", size: 16 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(scratch.file("disk.img"))"])
        defer { server.stop() }
        let args = ["--session", "twice", "--path", "unix:\(server.blockSocket)", "--device", "disk", "--read-only"]
        let first = try await BlockMapProcess(scratch: scratch, args)
        defer { first.stop() }
        let second = try await BlockMapProcess(scratch: scratch, args)
        defer { second.stop() }
        let parley = try Tools.parley
        let ambiguous = try await Tools.run(parley, ["block", "unmap", "--session", "twice", "--device", "disk", "--state-dir", first.stateDir])
        #expect(ambiguous.status == 2, "\(ambiguous.combined)")
        #expect(ambiguous.stdout.contains("pid \(first.background.pid)") && ambiguous.stdout.contains("pid \(second.background.pid)")
                && ambiguous.stdout.contains("--pid"), "\(ambiguous.combined)")
        let one = try await Tools.run(parley, ["block", "unmap", "--session", "twice", "--pid", "\(first.background.pid)", "--state-dir", first.stateDir])
        #expect(one.status == 0, "\(one.combined)")
        #expect(await first.background.waitForExit(seconds: 30) == 0, "\(first.log)")
        #expect(second.background.isRunning, "the other map goes on")
        let rest = try await Tools.run(parley, ["block", "unmap", "--session", "twice", "--state-dir", first.stateDir])
        #expect(rest.status == 0, "\(rest.combined)")
        #expect(await second.background.waitForExit(seconds: 30) == 0, "\(second.log)")
    }

    @Test func badInputIsRefusedClearly() async throws {
        let scratch = try ScratchDirectory("map")
        try scratch.sparseFile("disk.img", size: 16 << 20)
        try scratch.sparseFile("other.img", size: 8 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: [
            "--export", "disk=\(scratch.file("disk.img"))", "--export", "frozen=\(scratch.file("disk.img")),read-only",
        ])
        defer { server.stop() }
        let parley = try Tools.parley
        func map(_ args: [String]) async throws -> ToolOutput {
            try await Tools.run(parley, ["block", "map", "--nbd", "unix:\(scratch.file("bad.sock"))", "--state-dir", scratch.file("state")] + args, seconds: 60)
        }
        let unknown = try await map(["--session", "bad", "--path", "unix:\(server.blockSocket)", "--device", "nosuch"])
        #expect(unknown.status == 2, "\(unknown.combined)")
        #expect(unknown.stdout.contains("refused nosuch") && unknown.stdout.contains("no export named \"nosuch\""), "\(unknown.combined)")

        let readOnly = try await map(["--session", "bad", "--path", "unix:\(server.blockSocket)", "--device", "frozen"])
        #expect(readOnly.status == 2, "\(readOnly.combined)")
        #expect(readOnly.stdout.contains("export \"frozen\" is read-only"), "\(readOnly.combined)")
        // Read-only is fine.
        let ro = try await BlockMapProcess(scratch: scratch, export: "frozen", ["--session", "bad", "--path", "unix:\(server.blockSocket)", "--device", "frozen", "--read-only"])
        let info = try await Tools.run(try Tools.require("nbdinfo", package: "libnbd-bin"), [ro.uri])
        #expect(info.stdout.contains("is_read_only: true"), "\(info.combined)")
        ro.stop()

        // A second server exporting a different device under the same name.
        let otherScratch = try ScratchDirectory("map-other")
        try otherScratch.sparseFile("disk.img", size: 8 << 20)
        let other = try await BlockServerProcess(scratch: otherScratch, arguments: ["--export", "disk=\(otherScratch.file("disk.img"))"])
        defer { other.stop() }
        let mixed = try await map(["--session", "bad", "--path", "unix:\(server.blockSocket)", "--path", "unix:\(other.blockSocket)", "--device", "disk"])
        #expect(mixed.status == 2, "\(mixed.combined)")
        #expect(mixed.stdout.contains("lead to different devices"), "\(mixed.combined)")

        // Nothing to reach.
        let nowhere = try await map(["--session", "bad", "--path", "unix:\(scratch.file("nothing.sock"))", "--device", "disk"])
        #expect(nowhere.status == 2 && nowhere.stdout.contains("could be reached"), "\(nowhere.combined)")

        // Bad words.
        let rnbd = try await map(["--rnbd", "sessname=bad path=ip:127.0.0.1 device_path=disk access_mode=rx"])
        #expect(rnbd.status != 0 && rnbd.combined.contains("bad access_mode"), "\(rnbd.combined)")
        let both = try await map(["--rnbd", "sessname=bad path=ip:127.0.0.1 device_path=disk", "--session", "x"])
        #expect(both.status != 0 && both.combined.contains("not both"), "\(both.combined)")

        // Security options checked as for every client command (a --keyring without --name
        // used to connect without authenticating), and one setting for all paths.
        let path = "unix:\(server.blockSocket)"
        let keyless = try await map(["--session", "bad", "--path", path, "--device", "disk", "--keyring", scratch.file("k")])
        #expect(keyless.status != 0 && keyless.combined.contains("--keyring needs --name"), "\(keyless.combined)")
        let mixedTLS = try await map(["--session", "bad", "--path", path, "--path", "tls://127.0.0.1:1", "--device", "disk"])
        #expect(mixedTLS.status != 0 && mixedTLS.combined.contains("every path with tls:// or none"), "\(mixedTLS.combined)")
        let noCert = try await map(["--session", "bad", "--path", "tls://127.0.0.1:1", "--device", "disk"])
        #expect(noCert.status != 0 && noCert.combined.contains("need --cert"), "\(noCert.combined)")
        let tiny = try await map(["--session", "bad", "--path", path, "--device", "disk", "--io-timeout", "0.0005"])
        #expect(tiny.status != 0 && tiny.combined.contains("--io-timeout must be in [0.001"), "\(tiny.combined)")
    }
}
