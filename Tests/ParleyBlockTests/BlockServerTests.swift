import Foundation
import NIOCore
import Parley
import ParleyBlock
import ParleyTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `parley block serve` as a process: durability, refusals of bad input on both protocols,
/// the block protocol's sessions and opens, metrics and shutdown.
@Suite(.timeLimit(.minutes(5)))
struct BlockServerTests {
    static func fileBytes(_ path: String, offset: Int, count: Int) -> [UInt8] {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        var out = [UInt8](repeating: 0, count: count)
        _ = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, count, off_t(offset)) }
        return out
    }

    // MARK: - NBD

    @Test func acknowledgedFUAAndFlushedWritesAreInTheFileAfterSIGKILL() async throws {
        let scratch = try ScratchDirectory()
        let path = try scratch.sparseFile("disk.img", size: 8 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(path)"])
        defer { server.stop(signal: SIGKILL) }
        let (nbd, go, message) = try RawNBD.connect(RawSocket(unixPath: server.nbdSocket), export: "disk")
        #expect(go == 1, "\(message)")
        let a = [UInt8](repeating: 0xa1, count: 65536), b = [UInt8](repeating: 0xb2, count: 4096)
        nbd.request(type: 1, flags: 1, cookie: 1, offset: 1 << 20, length: UInt32(a.count), payload: a)  // WRITE + FUA
        #expect(try nbd.simpleReply().error == 0)
        nbd.request(type: 1, cookie: 2, offset: 3 << 20, length: UInt32(b.count), payload: b)
        #expect(try nbd.simpleReply().error == 0)
        nbd.request(type: 3, cookie: 3, offset: 0, length: 0)  // FLUSH
        let flushed = try nbd.simpleReply()
        #expect(flushed.error == 0 && flushed.cookie == 3)
        server.stop(signal: SIGKILL)
        #expect(Self.fileBytes(path, offset: 1 << 20, count: a.count) == a)
        #expect(Self.fileBytes(path, offset: 3 << 20, count: b.count) == b)
    }

    /// A write of 128 KiB or more is gathered from the reads that bring it (not copied into
    /// one buffer): sent in pieces, with the next request in the same send as its last piece,
    /// it lands whole and in place, FUA included, and the request after it is served.
    @Test func aLargeWriteArrivingInPiecesLandsWholeAndTheNextRequestIsServed() async throws {
        let scratch = try ScratchDirectory()
        let path = try scratch.sparseFile("disk.img", size: 8 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(path)"])
        defer { server.stop(signal: SIGKILL) }
        let socket = try RawSocket(port: server.nbdPort)
        let (nbd, go, message) = try RawNBD.connect(socket, export: "disk")
        #expect(go == 1, "\(message)")
        let big = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        let small = [UInt8](repeating: 0x5c, count: 4096)
        var header = Bytes()
        header.u32(0x2560_9513); header.u16(1); header.u16(1); header.u64(1); header.u64(2 << 20); header.u32(UInt32(big.count))  // WRITE + FUA
        var next = Bytes()
        next.u32(0x2560_9513); next.u16(0); next.u16(1); next.u64(2); next.u64(5 << 20); next.u32(UInt32(small.count))
        var pieces: [[UInt8]] = [header.data + big[..<1000]]
        var at = 1000
        while at < big.count {
            let end = min(big.count, at + 150_000)
            pieces.append(Array(big[at..<end]))
            at = end
        }
        pieces[pieces.count - 1] += next.data + small
        for piece in pieces {
            #expect(socket.send(piece))
            usleep(5_000)  // separate reads on the server
        }
        var answered: [UInt64: UInt32] = [:]
        for _ in 0..<2 {
            let reply = try nbd.simpleReply()
            answered[reply.cookie] = reply.error
        }
        #expect(answered == [1: 0, 2: 0])
        server.stop(signal: SIGKILL)
        let landed = Self.fileBytes(path, offset: 2 << 20, count: big.count)
        let firstWrong = landed.indices.first { $0 >= big.count || landed[$0] != big[$0] } ?? (landed.count == big.count ? nil : landed.count)
        #expect(firstWrong == nil, "the 1 MiB write differs from byte \(firstWrong ?? 0) on")
        #expect(Self.fileBytes(path, offset: 5 << 20, count: small.count) == small)
        #expect(Self.fileBytes(path, offset: (2 << 20) - 16, count: 16) == [UInt8](repeating: 0, count: 16))
        #expect(Self.fileBytes(path, offset: 3 << 20, count: 16) == [UInt8](repeating: 0, count: 16))
    }

    /// Requests cut anywhere by read boundaries (inside a header, inside a small write's
    /// payload, in a large write's header) are taken whole, and the reads' rest after a cut
    /// request too: a stream of writes sent in pieces of odd sizes lands byte for byte.
    @Test(arguments: [false, true]) func requestsCutByReadBoundariesAreTakenWhole(unix: Bool) async throws {
        let scratch = try ScratchDirectory()
        let path = try scratch.sparseFile("disk.img", size: 8 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(path)"])
        defer { server.stop(signal: SIGKILL) }
        let socket = unix ? try RawSocket(unixPath: server.nbdSocket) : try RawSocket(port: server.nbdPort)
        let (nbd, go, message) = try RawNBD.connect(socket, export: "disk")
        #expect(go == 1, "\(message)")
        var seed: UInt64 = 0x9e37_79b9_7f4a_7c15
        func random(_ range: ClosedRange<Int>) -> Int {
            seed = seed &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return range.lowerBound + Int((seed >> 33) % UInt64(range.count))
        }
        // Writes of 512 B to 16 KiB, and two of 200 KiB (gathered), at their own offsets; then a flush.
        var stream: [UInt8] = []
        var expected: [(offset: Int, data: [UInt8])] = []
        var offset = 0
        for i in 0..<60 {
            let length = i == 20 || i == 41 ? 200 << 10 : random(1...32) * 512
            let data = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i &* 7 &+ 1) }
            var header = Bytes()
            header.u32(0x2560_9513); header.u16(0); header.u16(1); header.u64(UInt64(i + 1)); header.u64(UInt64(offset)); header.u32(UInt32(length))
            stream += header.data + data
            expected.append((offset, data))
            offset += length + 512
        }
        var flush = Bytes()
        flush.u32(0x2560_9513); flush.u16(0); flush.u16(3); flush.u64(61); flush.u64(0); flush.u32(0)
        stream += flush.data
        // Pieces of 1 to 40 bytes (cuts inside headers) and of up to 12 KiB, each its own send.
        var at = 0, pieces = 0
        while at < stream.count {
            let size = random(0...3) == 0 ? random(1...40) : random(1...12_288)
            let end = min(stream.count, at + size)
            guard socket.send(Array(stream[at..<end])) else {
                Issue.record("the server closed the connection after \(at) of \(stream.count) bytes")
                return
            }
            at = end
            pieces += 1
            if pieces % 4 == 0 { usleep(1_000) }  // separate reads on the server
        }
        var answered: [UInt64: UInt32] = [:]
        for _ in 0..<61 {
            let reply = try nbd.simpleReply()
            answered[reply.cookie] = reply.error
        }
        #expect(answered == Dictionary(uniqueKeysWithValues: (1...61).map { (UInt64($0), UInt32(0)) }))
        server.stop(signal: SIGKILL)
        for (i, write) in expected.enumerated() {
            let landed = Self.fileBytes(path, offset: write.offset, count: write.data.count + 512)
            let firstWrong = landed.indices.first { $0 < write.data.count ? landed[$0] != write.data[$0] : landed[$0] != 0 }
            #expect(firstWrong == nil, "write \(i + 1) of \(write.data.count) bytes differs from byte \(firstWrong ?? 0) on")
        }
    }

    @Test func badNBDRequestsAreRefusedWithTheirErrorAndNothingIsWritten() async throws {
        let scratch = try ScratchDirectory()
        let path = try scratch.sparseFile("disk.img", size: 1 << 20)
        let roPath = try scratch.sparseFile("ro.img", size: 1 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: [
            "--export", "disk=\(path),block-size=4096", "--export", "ro=\(roPath),read-only",
        ])
        defer { server.stop() }
        let (nbd, go, _) = try RawNBD.connect(RawSocket(unixPath: server.nbdSocket), export: "disk")
        #expect(go == 1)
        let data = [UInt8](repeating: 0x77, count: 4096)
        // A write past the end: ENOSPC (a read there would be EINVAL).
        nbd.request(type: 1, cookie: 10, offset: 1 << 20, length: 4096, payload: data)
        #expect(try nbd.simpleReply().error == 28)
        // Not aligned to the export's 4096-byte blocks.
        nbd.request(type: 1, cookie: 11, offset: 512, length: 4096, payload: data)
        #expect(try nbd.simpleReply().error == 22)
        // A read larger than the maximum payload.
        nbd.request(type: 0, cookie: 12, offset: 0, length: 64 << 20)
        #expect(try nbd.simpleReply().error == 22)
        // A write larger than the maximum: refused, its payload skipped, the connection goes on.
        let big = [UInt8](repeating: 0x66, count: (32 << 20) + 4096)
        nbd.request(type: 1, cookie: 13, offset: 0, length: UInt32(big.count), payload: big)
        #expect(try nbd.simpleReply().error == 22)
        // Unknown command, unknown flag.
        nbd.request(type: 99, cookie: 14, offset: 0, length: 0)
        #expect(try nbd.simpleReply().error == 22)
        nbd.request(type: 0, flags: 0x80, cookie: 15, offset: 0, length: 4096)
        #expect(try nbd.simpleReply().error == 22)
        // Still serving: a good read returns zeroes (nothing above was written).
        nbd.request(type: 0, cookie: 16, offset: 0, length: 4096)
        let good = try nbd.simpleReply(readLength: 4096)
        #expect(good.error == 0 && good.cookie == 16)
        #expect(good.data == [UInt8](repeating: 0, count: 4096))
        #expect(Self.fileBytes(path, offset: 0, count: 1 << 20) == [UInt8](repeating: 0, count: 1 << 20))
        // A bad magic ends the connection.
        nbd.socket.send([0xde, 0xad, 0xbe, 0xef] + [UInt8](repeating: 0, count: 24))
        #expect(nbd.socket.waitForClose())

        // Writes to a read-only export: EPERM, structured error with a message.
        let (ro, roGo, _) = try RawNBD.connect(RawSocket(unixPath: server.nbdSocket), export: "ro", structured: true)
        #expect(roGo == 1)
        ro.request(type: 1, cookie: 20, offset: 0, length: 4096, payload: data)
        let chunk = try ro.chunk()
        #expect(chunk.type == 0x8001 && chunk.cookie == 20 && chunk.flags & 1 == 1)
        #expect(Bytes.u32(chunk.payload, 0) == 1)
        #expect(String(decoding: chunk.payload.dropFirst(6), as: UTF8.self).contains("read-only"))
        #expect(Self.fileBytes(roPath, offset: 0, count: 4096) == [UInt8](repeating: 0, count: 4096))

        let log = server.log
        #expect(log.contains("ends past the export"))
        #expect(log.contains("is not aligned"))
        #expect(log.contains("bad request magic 0xdeadbeef"))
        #expect(log.contains("write to a read-only export"))
    }

    /// A client that sends reads and never reads the replies: its connection stops taking
    /// requests once 8 MiB of replies wait (reads served from the page cache are never "in
    /// flight", so the in-flight limits did not hold them: 96 reads of 32 MiB grew the server
    /// by 3 GiB), and another client is served meanwhile.
    @Test func aClientThatNeverReadsItsRepliesCannotGrowTheServer() async throws {
        let scratch = try ScratchDirectory()
        let path = try scratch.sparseFile("disk.img", size: 64 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(path)"])
        defer { server.stop() }
        let before = try #require(Self.residentMiB(server.process.processIdentifier))
        let (greedy, go, _) = try RawNBD.connect(RawSocket(unixPath: server.nbdSocket), export: "disk")
        #expect(go == 1)
        var reads = Bytes()
        for cookie in 0..<96 {
            reads.u32(0x2560_9513); reads.u16(0); reads.u16(0); reads.u64(UInt64(cookie)); reads.u64(0); reads.u32(32 << 20)
        }
        #expect(greedy.socket.send(reads.data))
        try await Task.sleep(for: .seconds(3))
        let after = try #require(Self.residentMiB(server.process.processIdentifier))
        #expect(after - before < 512, "the server grew from \(before) to \(after) MiB")
        let (other, ok, _) = try RawNBD.connect(RawSocket(unixPath: server.nbdSocket), export: "disk")
        #expect(ok == 1)
        other.request(type: 0, cookie: 7, offset: 4096, length: 4096)
        #expect(try other.simpleReply(readLength: 4096).cookie == 7)
        #expect(server.isRunning)
    }

    /// Clients that connect and never finish the handshake are closed after
    /// `--handshake-timeout`, on the NBD listener and on the block protocol's; a good client
    /// still gets through.
    @Test func stalledHandshakesAreClosedAfterTheHandshakeTimeout() async throws {
        let scratch = try ScratchDirectory()
        let path = try scratch.sparseFile("disk.img", size: 1 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(path)", "--handshake-timeout", "0.5"])
        defer { server.stop() }
        let silent = try RawSocket(unixPath: server.nbdSocket)
        #expect(silent.receive(18) != nil, "the NBD greeting")
        let halfway = try RawSocket(port: server.nbdPort)
        #expect(halfway.receive(18) != nil)
        halfway.send([0, 0, 0, 3])  // client flags, then nothing
        let parley = try RawSocket(unixPath: server.blockSocket)
        #expect(silent.waitForClose(), "NBD, nothing sent")
        #expect(halfway.waitForClose(), "NBD, flags sent")
        #expect(parley.waitForClose(), "block protocol, no banner")
        #expect(server.log.contains("NBD handshake did not complete within 0.5 s"), "\(server.log)")
        let (nbd, ok, _) = try RawNBD.connect(RawSocket(unixPath: server.nbdSocket), export: "disk")
        #expect(ok == 1)
        try await Task.sleep(for: .seconds(1))
        nbd.request(type: 0, cookie: 3, offset: 0, length: 512)
        #expect(try nbd.simpleReply(readLength: 512).cookie == 3, "a finished handshake is not timed")
    }

    /// A process's resident memory (VmRSS), in MiB.
    static func residentMiB(_ pid: Int32) -> Int? {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
              let kib = Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") else { return nil }
        return kib / 1024
    }

    @Test func badNBDHandshakesAreRefusedAndTheServerGoesOn() async throws {
        let scratch = try ScratchDirectory()
        let path = try scratch.sparseFile("disk.img", size: 1 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(path)"])
        defer { server.stop() }
        // An HTTP request instead of NBD: unknown client flags.
        let http = try RawSocket(unixPath: server.nbdSocket)
        #expect(http.receive(18) != nil)
        http.send(Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
        #expect(http.waitForClose())
        // Good flags, then an option with a bad magic.
        let junk = try RawSocket(port: server.nbdPort)
        #expect(junk.receive(18) != nil)
        junk.send([0, 0, 0, 3] + Array("NOTMAGIC".utf8) + [0, 0, 0, 7, 0, 0, 0, 0])
        #expect(junk.waitForClose())
        // An export that does not exist: NBD_REP_ERR_UNKNOWN naming it.
        let (_, go, message) = try RawNBD.connect(RawSocket(unixPath: server.nbdSocket), export: "nope")
        #expect(go == 0x8000_0006)
        #expect(message.contains("nope"))
        // A good client still gets through.
        let (nbd, ok, _) = try RawNBD.connect(RawSocket(unixPath: server.nbdSocket), export: "disk")
        #expect(ok == 1)
        nbd.request(type: 0, cookie: 1, offset: 0, length: 512)
        #expect(try nbd.simpleReply(readLength: 512).error == 0)
        let log = server.log
        #expect(log.contains("unknown client flags"))
        #expect(log.contains("bad option magic"))
        #expect(server.isRunning)
    }

    // MARK: - Block protocol

    /// `parley block bench` drives a real server with both of its ways of sending IOs: the
    /// completion calls (no task per IO) and a task per slot. Sequential writes with four slots
    /// start at blocks 0, 16384, 32768 and 49152 of a 256 MiB sparse export: each slot's first
    /// block has the pattern and the block before it (another slot's, never reached in 0.3 s)
    /// is still a hole.
    @Test(arguments: ["callback", "async"])
    func blockBenchWritesAndReadsWithEitherAPI(api: String) async throws {
        let scratch = try ScratchDirectory()
        let path = try scratch.sparseFile("disk.img", size: 256 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(path)"])
        defer { server.stop() }
        let parley = try Tools.parley
        let common = ["block", "bench", "unix:\(server.blockSocket)", "--export", "disk", "--queue-depth", "4", "--seconds", "0.3", "--json", "--api", api]
        let write = try await Tools.run(parley, common + ["--rw", "write"], seconds: 60)
        #expect(write.status == 0, "\(write.combined)")
        let summary = try #require(try JSONSerialization.jsonObject(with: Data(write.stdout.utf8)) as? [String: Any], "\(write.stdout)")
        #expect(summary["api"] as? String == api)
        let ios = summary["ios"] as? Int ?? 0
        #expect(ios > 0 && ios < 4 * 16384, "\(ios) IOs: fewer than one slot's share, so no slot reached the next one's start")
        let file = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? file.close() }
        func block(_ n: UInt64) throws -> [UInt8] {
            try file.seek(toOffset: n * 4096)
            return [UInt8](try file.read(upToCount: 4096) ?? Data())
        }
        for slot in UInt64(0)..<4 {
            #expect(try block(slot * 16384) == [UInt8](repeating: 0x5a, count: 4096), "slot \(slot)'s first write is in the file")
            if slot > 0 {
                #expect(try block(slot * 16384 - 1) == [UInt8](repeating: 0, count: 4096), "slot \(slot) started where it should")
            }
        }
        let read = try await Tools.run(parley, common + ["--rw", "randread"], seconds: 60)
        #expect(read.status == 0, "\(read.combined)")
        #expect(read.stdout.contains("\"rw\":\"randread\""))
        let bad = try await Tools.run(parley, ["block", "bench", "unix:\(server.blockSocket)", "--export", "disk", "--api", "threads"], seconds: 60)
        #expect(bad.status != 0)
        #expect(bad.combined.contains("--api must be callback or async"))
    }

    /// [R-17.2-1]: IO not aligned to the logical block size, past the end (also when the sum
    /// overflows) or over the maximum IO size is refused with its status.
    @Test func blockProtocolReadsWritesAndRefusesBadIO() async throws {
        let scratch = try ScratchDirectory()
        let path = try scratch.sparseFile("disk.img", size: 4 << 20)
        let roPath = try scratch.sparseFile("ro.img", size: 1 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(path)", "--export", "ro=\(roPath),read-only"])
        defer { server.stop() }
        let client = try await BlockClient.connect(to: .unix(path: server.blockSocket), sessionName: "alice")
        defer { client.closeConnection() }
        #expect(client.protocolVersion == 1)
        let exports = try await client.listExports()
        #expect(exports.map(\.name).sorted() == ["disk", "ro"])
        #expect(exports.first { $0.name == "disk" }?.geometry.sizeBytes == 4 << 20)
        #expect(exports.first { $0.name == "ro" }?.readOnly == true)

        let disk = try await client.open("disk", access: .readWrite)
        #expect(disk.id != 0)
        #expect(disk.geometry.sizeSectors == (4 << 20) / 512)
        #expect(disk.geometry.logicalBlockSize == 512)
        // Many writes in flight at once, then read back.
        try await withThrowingTaskGroup(of: Void.self) { group in
            for i in 0..<32 {
                group.addTask {
                    let block = ByteBuffer(repeating: UInt8(i), count: 65536)
                    try await client.write(disk, offset: UInt64(i) * 65536, data: block, fua: i % 8 == 0)
                }
            }
            try await group.waitForAll()
        }
        try await client.flush(disk)
        for i in [0, 7, 31] {
            let back = try await client.read(disk, offset: UInt64(i) * 65536, length: 65536)
            #expect(back == ByteBuffer(repeating: UInt8(i), count: 65536))
        }
        #expect(Self.fileBytes(path, offset: 31 * 65536, count: 16) == [UInt8](repeating: 31, count: 16))

        func status(_ body: () async throws -> Void) async -> Parley_Block_V1_BlockStatus? {
            do {
                try await body()
                return .ok
            } catch let e as BlockError {
                return e.status
            } catch {
                Issue.record("unexpected error \(error)")
                return nil
            }
        }
        #expect(await status { _ = try await client.read(disk, offset: 4 << 20, length: 4096) } == .outOfRange)
        #expect(await status { _ = try await client.read(disk, offset: UInt64.max - 511, length: 4096) } == .outOfRange)
        #expect(await status { _ = try await client.read(disk, offset: 100, length: 512) } == .invalid)
        #expect(await status { _ = try await client.read(disk, offset: 0, length: 16 << 20) } == .tooLarge)
        // Past the session's 256 MiB in flight by itself, with nothing else in flight: too
        // large, not BUSY_SESSION (the IO's own length counted as if in flight already).
        #expect(await status { _ = try await client.read(disk, offset: 0, length: 300 << 20) } == .tooLarge)
        #expect(await status { _ = try await client.read(BlockClient.Device(id: 999, geometry: disk.geometry), offset: 0, length: 512) } == .unknownDevice)
        #expect(await status { try await client.io(disk, .write, offset: 0, length: 4096, data: ByteBuffer(repeating: 1, count: 512)) } == .invalid)
        #expect(await status { _ = try await client.open("missing") } == .notFound)
        #expect(await status { _ = try await client.open("ro", access: .readWrite) } == .readOnly)
        let ro = try await client.open("ro", access: .readOnly)
        #expect(await status { try await client.write(ro, offset: 0, data: ByteBuffer(repeating: 9, count: 512)) } == .readOnly)
        #expect(Self.fileBytes(roPath, offset: 0, count: 512) == [UInt8](repeating: 0, count: 512))
        try await client.close(ro)
        #expect(await status { try await client.close(ro) } == .unknownDevice)
        // Write-zeroes and discard read back as zeroes.
        try await client.io(disk, .writeZeroes, offset: 0, length: 65536)
        try await client.io(disk, .discard, offset: 65536, length: 65536)
        #expect(try await client.read(disk, offset: 0, length: 131072) == ByteBuffer(repeating: 0, count: 131072))
        let log = server.log
        #expect(log.contains("block device opened"))
        #expect(log.contains("session=alice"))
        #expect(log.contains("ends past the device"))
    }

    /// A read whose answer would not fit the client's frame limit is TOO_LARGE for `Io` as
    /// for DIRECT (it was read, then failed with a Parley ERROR frameTooLarge: docs/protocol.md
    /// 17.1 says block IO answers with a status).
    @Test(arguments: [false, true]) func aReadLargerThanTheClientsFramesIsTooLarge(direct: Bool) async throws {
        let scratch = try ScratchDirectory()
        let path = try scratch.sparseFile("disk.img", size: 4 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(path)"])
        defer { server.stop() }
        var configuration = ParleyClient.Configuration.defaults
        configuration.maxFrameSize = 1 << 20
        let client = try await BlockClient.connect(to: .unix(path: server.blockSocket), sessionName: "small", direct: direct, configuration: configuration)
        defer { client.closeConnection() }
        let disk = try await client.open("disk", access: .readOnly)
        #expect(client.usesDirect == direct)
        #expect(try await client.read(disk, offset: 0, length: 512 << 10).readableBytes == 512 << 10)
        do {
            _ = try await client.read(disk, offset: 0, length: 1 << 20)
            Issue.record("a read of a whole frame's worth was answered")
        } catch let e as BlockError {
            #expect(e.status == .tooLarge, "\(e)")
        }
        // The connection goes on.
        #expect(try await client.read(disk, offset: 4096, length: 4096).readableBytes == 4096)
    }

    @Test func oneReadWriteOpenerPerDeviceAcrossSessions() async throws {
        let scratch = try ScratchDirectory()
        let path = try scratch.sparseFile("disk.img", size: 1 << 20)
        let shared = try scratch.sparseFile("shared.img", size: 1 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(path)", "--export", "shared=\(shared),shared"])
        defer { server.stop() }
        let alice = try await BlockClient.connect(to: .unix(path: server.blockSocket), sessionName: "alice")
        let bob = try await BlockClient.connect(to: .unix(path: server.blockSocket), sessionName: "bob")
        let carol = try await BlockClient.connect(to: .unix(path: server.blockSocket), sessionName: "carol")
        defer { [alice, bob, carol].forEach { $0.closeConnection() } }
        let first = try await alice.open("disk", access: .readWrite)
        do {
            _ = try await bob.open("disk", access: .readWrite)
            Issue.record("a second read-write opener was allowed")
        } catch let e as BlockError {
            #expect(e.status == .busy)
            #expect(e.message.contains("alice"))
        }
        // Readers are always allowed; a migration open may be the second writer, not the third.
        _ = try await bob.open("disk", access: .readOnly)
        let moving = try await bob.open("disk", access: .migration)
        await #expect(throws: BlockError.self) { _ = try await carol.open("disk", access: .migration) }
        // NBD writers are refused while a session holds the device read-write.
        let (_, go, message) = try RawNBD.connect(RawSocket(unixPath: server.nbdSocket), export: "disk")
        #expect(go == 0x8000_0002, "\(message)")
        // Once the writers close, another session may write.
        try await alice.close(first)
        try await bob.close(moving)
        _ = try await carol.open("disk", access: .readWrite)
        // A shared export takes several writers.
        _ = try await alice.open("shared", access: .readWrite)
        _ = try await bob.open("shared", access: .readWrite)
    }

    /// With method secret, an open needs block.read (read-only) or block.write (read-write,
    /// migration) among the entity's capabilities; nothing is opened otherwise.
    @Test func opensNeedTheEntitysBlockCapabilities() async throws {
        let scratch = try ScratchDirectory()
        let path = try scratch.sparseFile("disk.img", size: 1 << 20)
        let keyring = scratch.file("server.keyring")
        for (name, caps) in [("client.reader", "block.read"), ("client.writer", "block.*"), ("client.none", "echo")] {
            let out = try await Tools.run(try Tools.parley, ["keyring", "add", name, "--keyring", keyring, "--caps", caps])
            #expect(out.status == 0, "\(out.combined)")
        }
        let server = try await BlockServerProcess(scratch: scratch, arguments: [
            "--export", "disk=\(path)", "--auth", "secret", "--keyring", keyring, "--mode", "secure",
        ])
        defer { server.stop() }
        let loaded = try ParleyKeyring.load(path: keyring)
        func connect(_ name: String) async throws -> BlockClient {
            try await BlockClient.connect(
                to: .unix(path: server.blockSocket), sessionName: name,
                configuration: .init(secret: try loaded.credentials(for: name, keyringPath: keyring))
            )
        }
        let reader = try await connect("client.reader")
        let writer = try await connect("client.writer")
        let nobody = try await connect("client.none")
        defer { [reader, writer, nobody].forEach { $0.closeConnection() } }
        _ = try await reader.open("disk", access: .readOnly)
        for (client, access) in [(reader, Parley_Block_V1_AccessMode.readWrite), (reader, .migration), (nobody, .readOnly)] {
            do {
                _ = try await client.open("disk", access: access)
                Issue.record("an open without its capability was allowed (\(access))")
            } catch let e as ParleyError {
                #expect(e.code == .permissionDenied)
                #expect(e.message.contains("needs capability"), "\(e.message)")
            }
        }
        // The refused write-open left the device free for a writer.
        _ = try await writer.open("disk", access: .readWrite)
    }

    /// [R-17.3-1]: a path with `..`, an absolute one or a link out of the search path is refused.
    @Test func searchPathGivesEachSessionItsNamespaceAndRefusesEscapes() async throws {
        let scratch = try ScratchDirectory()
        let root = scratch.file("sessions")
        for name in ["alice", "bob"] {
            try FileManager.default.createDirectory(atPath: root + "/" + name, withIntermediateDirectories: true)
            try scratch.sparseFile("sessions/\(name)/vol", size: name == "alice" ? 1 << 20 : 2 << 20)
        }
        try scratch.sparseFile("secret.img", size: 1 << 20)
        try FileManager.default.createSymbolicLink(atPath: root + "/alice/escape", withDestinationPath: scratch.file("secret.img"))
        try FileManager.default.createDirectory(atPath: root + "/alice/folder", withIntermediateDirectories: true)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--search-path", root + "/%SESSNAME%"])
        defer { server.stop() }
        let alice = try await BlockClient.connect(to: .unix(path: server.blockSocket), sessionName: "alice")
        let bob = try await BlockClient.connect(to: .unix(path: server.blockSocket), sessionName: "bob")
        defer { alice.closeConnection(); bob.closeConnection() }
        #expect(try await alice.open("vol").geometry.sizeBytes == 1 << 20)
        #expect(try await bob.open("vol").geometry.sizeBytes == 2 << 20)
        for (path, expected) in [("../bob/vol", Parley_Block_V1_BlockStatus.pathRefused), ("/etc/passwd", .pathRefused),
                                 ("escape", .pathRefused), ("missing", .notFound), ("folder", .invalid)] {
            for access in [Parley_Block_V1_AccessMode.readOnly, .readWrite] {
                do {
                    _ = try await alice.open(path, access: access)
                    Issue.record("\(path) was opened")
                } catch let e as BlockError {
                    // A directory is no device (it failed to open read-write as IO_ERROR).
                    #expect(e.status == expected, "\(path) \(access): \(e)")
                }
            }
        }
        #expect(server.log.contains("leads out of the search path"))
        // A session name that cannot be a path component is refused.
        await #expect(throws: BlockError.self) {
            _ = try await BlockClient.connect(to: .unix(path: server.blockSocket), sessionName: "../x")
        }
    }

    @Test func openBeforeSessionInfoIsRefused() async throws {
        let scratch = try ScratchDirectory()
        let path = try scratch.sparseFile("disk.img", size: 1 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(path)"])
        defer { server.stop() }
        let raw = try await ParleyClient.connect(to: .unix(path: server.blockSocket))
        defer { raw.close() }
        var open = Parley_Block_V1_Open()
        open.path = "disk"
        let reply = try await raw.request(open, as: Parley_Block_V1_OpenReply.self)
        #expect(reply.status == .noSession)
        var io = Parley_Block_V1_Io()
        io.deviceID = 1
        io.length = 512
        #expect(try await raw.request(io, as: Parley_Block_V1_IoReply.self).status == .noSession)
    }

    // MARK: - Operations

    @Test func infoCommandMetricsAndGracefulShutdown() async throws {
        let scratch = try ScratchDirectory()
        let path = try scratch.sparseFile("disk.img", size: 2 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(path)"], metrics: true)
        defer { server.stop(signal: SIGKILL) }
        let info = try await Tools.run(try Tools.parley, ["block", "info", "unix:\(server.blockSocket)"])
        #expect(info.status == 0, "\(info.combined)")
        #expect(info.stdout.contains("disk"))
        #expect(info.stdout.contains("2097152 bytes (4096 sectors)"))
        let missing = try await Tools.run(try Tools.parley, ["block", "info", "unix:\(scratch.file("nothing.sock"))"])
        #expect(missing.status != 0)

        let client = try await BlockClient.connect(to: .tcp(host: "127.0.0.1", port: server.blockPort), sessionName: "metrics")
        let disk = try await client.open("disk")
        try await client.write(disk, offset: 0, data: ByteBuffer(repeating: 3, count: 8192))
        _ = try await client.read(disk, offset: 0, length: 8192)
        _ = try? await client.read(disk, offset: 2 << 20, length: 512)
        let socket = try RawSocket(port: server.metricsPort)
        socket.send(Array("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8))
        var text = ""
        while let chunk = socket.receive(1) { text += String(decoding: chunk, as: UTF8.self) }
        #expect(text.hasPrefix("HTTP/1.1 200"))
        #expect(text.contains("parley_block_ops_total{export=\"disk\",op=\"write\"} 1"))
        #expect(text.contains("parley_block_bytes_total{export=\"disk\",op=\"read\"} 8192"))
        #expect(text.contains("parley_block_errors_total{export=\"disk\",op=\"read\"} 1"))
        #expect(text.contains("parley_block_latency_seconds_bucket"))
        // The core's own instruments: handlers are timed when a backend was bootstrapped
        // before the connection (session open, device open, write and two reads at least).
        let handled = text.split(separator: "\n").first { $0.hasPrefix("parley_request_duration_count") }
        #expect(handled.flatMap { $0.split(separator: " ").last.flatMap { Int($0) } }.map { $0 >= 5 } == true, "\(text)")
        client.closeConnection()

        #expect(server.stop(signal: SIGTERM) == 0)
        #expect(server.log.contains("block server stopped"))
    }
}
