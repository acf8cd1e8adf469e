import Foundation
import NIOCore
import Parley
import ParleyBlock
import ParleyTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Corrupted NBD sessions and random block-protocol requests (`Io` messages and DIRECT
/// frames) against a live `parley block serve`: it never crashes or hangs, answers every
/// block request with a defined status, and keeps serving other clients.
/// `PARLEY_BLOCK_MUTATIONS` sets the number of variants (default 400 NBD sessions, 4,000
/// `Io` requests and 2,000 DIRECT requests).
@Suite(.timeLimit(.minutes(10)))
struct BlockMutationTests {
    static var variants: Int { Int(ProcessInfo.processInfo.environment["PARLEY_BLOCK_MUTATIONS"] ?? "") ?? 400 }

    /// A valid NBD client stream after the greeting: flags, structured replies, meta
    /// context, GO, then a write, a read, a block status, a trim, a flush and a disconnect.
    static let nbdSession: [UInt8] = {
        var b = Bytes()
        b.u32(3)
        b.u64(0x4948_4156_454f_5054); b.u32(8); b.u32(0)
        let export = "disk", context = "base:allocation"
        b.u64(0x4948_4156_454f_5054); b.u32(10); b.u32(UInt32(4 + export.utf8.count + 4 + 4 + context.utf8.count))
        b.u32(UInt32(export.utf8.count)); b.string(export); b.u32(1); b.u32(UInt32(context.utf8.count)); b.string(context)
        b.u64(0x4948_4156_454f_5054); b.u32(7); b.u32(UInt32(4 + export.utf8.count + 4))
        b.u32(UInt32(export.utf8.count)); b.string(export); b.u16(1); b.u16(3)
        func request(_ type: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64, length: UInt32) {
            b.u32(0x2560_9513); b.u16(flags); b.u16(type); b.u64(cookie); b.u64(offset); b.u32(length)
        }
        request(1, flags: 1, cookie: 1, offset: 8192, length: 4096)
        b.data += [UInt8](repeating: 0x5a, count: 4096)
        request(0, cookie: 2, offset: 0, length: 65536)
        request(7, cookie: 3, offset: 0, length: 1 << 20)
        request(4, cookie: 4, offset: 1 << 20, length: 65536)
        request(6, cookie: 5, offset: 2 << 20, length: 4096)
        request(3, cookie: 6, offset: 0, length: 0)
        request(2, cookie: 7, offset: 0, length: 0)
        return b.data
    }()

    /// Offsets and lengths at the edges (of a block, the device, max_io_size, the integer
    /// types) that random block requests pick from, `Io` and DIRECT alike.
    static let extremeSizes: [UInt64] = [0, 1, 511, 512, 4096, 65536, 4 << 20, 8 << 20, (8 << 20) + 512, UInt64(UInt32.max), UInt64.max]

    static func mutate(_ seed: [UInt8], _ n: Int, rng: inout SplitMix) -> [UInt8] {
        var b = seed
        func at(_ count: Int) -> Int { Int(rng.next() % UInt64(max(count, 1))) }
        switch n % 6 {
        case 0:  // bit flips
            for _ in 0..<(1 + at(4)) { let i = at(b.count); b[i] ^= UInt8(1) << UInt8(rng.next() % 8) }
        case 1:  // random bytes
            for _ in 0..<(1 + at(8)) { b[at(b.count)] = UInt8(truncatingIfNeeded: rng.next()) }
        case 2:  // truncation
            b = Array(b.prefix(at(b.count)))
        case 3:  // insertion
            let i = at(b.count)
            b.insert(contentsOf: (0..<(1 + at(16))).map { _ in UInt8(truncatingIfNeeded: rng.next()) }, at: i)
        case 4:  // deletion
            let i = at(b.count)
            b.removeSubrange(i..<min(b.count, i + 1 + at(16)))
        default:  // a 32-bit field set to an extreme (lengths, counts, flags)
            let i = at(b.count - 4)
            let v: [UInt8] = [[0xff, 0xff, 0xff, 0xff], [0x80, 0, 0, 0], [0, 0, 0, 0], [0x7f, 0xff, 0xff, 0xff]][at(4)]
            b.replaceSubrange(i..<(i + 4), with: v)
        }
        return b
    }

    @Test func corruptedNBDSessionsNeverCrashOrHangTheServer() async throws {
        let scratch = try ScratchDirectory()
        let path = try scratch.sparseFile("disk.img", size: 4 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(path)"])
        defer { server.stop() }
        var rng = SplitMix(seed: 0x4e42_4421)
        var hung = 0
        for n in 0..<Self.variants {
            let bytes = Self.mutate(Self.nbdSession, n, rng: &rng)
            let socket = try RawSocket(unixPath: server.nbdSocket)
            socket.setTimeout(5)
            guard socket.receive(18) != nil else {
                Issue.record("variant \(n): no greeting; server running: \(server.isRunning)")
                break
            }
            socket.send(bytes)
            socket.shutdownWrite()
            if !socket.waitForClose() { hung += 1 }
        }
        #expect(hung == 0, "\(hung) connections did not end after the client's end of stream")
        #expect(server.isRunning)
        // The unmodified session still works.
        let (nbd, go, _) = try RawNBD.connect(RawSocket(unixPath: server.nbdSocket), export: "disk")
        #expect(go == 1)
        nbd.request(type: 0, cookie: 9, offset: 0, length: 4096)
        #expect(try nbd.simpleReply(readLength: 4096).error == 0)
    }

    @Test func randomBlockRequestsGetADefinedAnswer() async throws {
        let scratch = try ScratchDirectory()
        let path = try scratch.sparseFile("disk.img", size: 4 << 20)
        try scratch.sparseFile("other.img", size: 1 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: [
            "--export", "disk=\(path)", "--search-path", scratch.path,
        ])
        defer { server.stop() }
        let client = try await BlockClient.connect(to: .unix(path: server.blockSocket), sessionName: "fuzz")
        defer { client.closeConnection() }
        let disk = try await client.open("disk")
        var rng = SplitMix(seed: 0xb10c)
        let total = Self.variants * 10
        let paths = ["disk", "other.img", "../etc/passwd", "/etc/passwd", "", "nope", "a/../../b", String(repeating: "x", count: 5000), "other.img/"]
        let sizes = Self.extremeSizes
        var statuses: [Parley_Block_V1_BlockStatus: Int] = [:]
        for n in 0..<total {
            func pick<T>(_ a: [T]) -> T { a[Int(rng.next() % UInt64(a.count))] }
            if n % 50 == 0 {
                var open = Parley_Block_V1_Open()
                open.path = pick(paths)
                open.accessMode = Parley_Block_V1_AccessMode(rawValue: Int(rng.next() % 4)) ?? .readOnly
                let reply = try await client.client.request(open, as: Parley_Block_V1_OpenReply.self)
                statuses[reply.status, default: 0] += 1
                continue
            }
            var io = Parley_Block_V1_Io()
            io.deviceID = rng.next() % 4 == 0 ? UInt32(truncatingIfNeeded: rng.next()) : disk.id
            io.offset = rng.next() % 3 == 0 ? pick(sizes) : (rng.next() % 8192) * 512
            io.length = UInt32(truncatingIfNeeded: rng.next() % 3 == 0 ? pick(sizes) : (rng.next() % 16) * 512)
            io.operation = Parley_Block_V1_IoOperation(rawValue: Int(rng.next() % 6)) ?? .read
            io.flags = rng.next() % 5 == 0 ? UInt32(truncatingIfNeeded: rng.next()) : UInt32(rng.next() % 2)
            let dataLength = rng.next() % 3 == 0 ? Int(rng.next() % 9000) : Int(min(io.length, 1 << 20))
            let data: ByteBuffer? = rng.next() % 4 == 0 ? nil : ByteBuffer(repeating: 0xee, count: dataLength)
            let reply = try await client.client.call(io, data: data, as: Parley_Block_V1_IoReply.self)
            statuses[reply.message.status, default: 0] += 1
            if case .UNRECOGNIZED = reply.message.status { Issue.record("undefined status for \(io)") }
        }
        #expect(statuses.values.reduce(0, +) == total)
        #expect(statuses[.ok, default: 0] > 0)
        #expect(statuses[.invalid, default: 0] > 0)
        #expect(statuses[.outOfRange, default: 0] > 0)
        #expect(statuses[.unknownDevice, default: 0] > 0)
        #expect(server.isRunning)
        // The session still works, and another session is served too.
        _ = try await client.read(disk, offset: 0, length: 512)
        let other = try await BlockClient.connect(to: .unix(path: server.blockSocket), sessionName: "other")
        defer { other.closeConnection() }
        #expect(try await other.listExports().count == 1)
    }

    /// [R-17.9-2]: random DIRECT requests (docs/protocol.md 17.9) against a live server: every
    /// field of the 24-byte header at random or at an extreme, reserved bytes set, data of a
    /// length that fits the request or not, or none. Each is answered with a defined status,
    /// except one whose header has the wrong size, which ends the connection with CLOSE
    /// `malformedPayload` (then the test connects again); the server keeps running and serves
    /// the session afterwards.
    @Test func randomDirectRequestsGetADefinedAnswer() async throws {
        let scratch = try ScratchDirectory()
        let path = try scratch.sparseFile("disk.img", size: 4 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(path)"])
        defer { server.stop() }
        var client = try await BlockClient.connect(to: .unix(path: server.blockSocket), sessionName: "fuzz")
        defer { client.closeConnection() }
        #expect(client.usesDirect, "the server did not grant DIRECT IO")
        var disk = try await client.open("disk")
        var rng = SplitMix(seed: 0xd1_2ec7)
        let sizes = Self.extremeSizes
        var statuses: [Parley_Block_V1_BlockStatus: Int] = [:]
        var closes = 0
        let total = Self.variants * 5
        for n in 0..<total {
            func pick<T>(_ a: [T]) -> T { a[Int(rng.next() % UInt64(a.count))] }
            let connection = client.client.connection
            let malformed = n % 97 == 96
            let frame: DirectFrame
            if malformed {
                var length = Int(rng.next() % 40)
                if length == BlockDirect.requestHeaderLength { length += 1 }
                let withData = rng.next() % 2 == 0
                var f = DirectFrame(allocator: connection.channelAllocator, headerLength: length, dataLength: withData ? 512 : nil)
                if withData { f.writeData(ByteBuffer(repeating: 1, count: 512)) }
                frame = f
            } else {
                var r = BlockDirect.Request(
                    operation: rng.next() % 8 == 0 ? UInt8(truncatingIfNeeded: rng.next()) : UInt8(rng.next() % 6),
                    flags: rng.next() % 5 == 0 ? UInt8(truncatingIfNeeded: rng.next()) : UInt8(rng.next() % 2),
                    deviceID: rng.next() % 4 == 0 ? UInt32(truncatingIfNeeded: rng.next()) : disk.id,
                    offset: rng.next() % 3 == 0 ? pick(sizes) : (rng.next() % 8192) * 512,
                    length: UInt32(truncatingIfNeeded: rng.next() % 3 == 0 ? pick(sizes) : (rng.next() % 16) * 512))
                if rng.next() % 10 == 0 { r.reserved = rng.next() }
                let dataLength = rng.next() % 3 == 0 ? Int(rng.next() % 9000) : Int(min(r.length, 1 << 20))
                let data: ByteBuffer? = rng.next() % 4 == 0 ? nil : ByteBuffer(repeating: 0xee, count: dataLength)
                frame = r.frame(allocator: connection.channelAllocator, data: data)
            }
            let result = await withCheckedContinuation { c in connection.sendDirect(frame) { c.resume(returning: $0) } }
            switch result {
            case .success(let answer) where !malformed:
                switch BlockDirect.Answer.decode(answer) {
                case .success(let a):
                    statuses[a.status, default: 0] += 1
                    if case .UNRECOGNIZED = a.status { Issue.record("variant \(n): undefined status \(a.status)") }
                case .failure(let e):
                    Issue.record("variant \(n): the server's answer is malformed: \(e.message)")
                }
            case .failure(let error) where malformed && error.code == .malformedPayload:
                closes += 1
                client.closeConnection()
                client = try await BlockClient.connect(to: .unix(path: server.blockSocket), sessionName: "fuzz")
                disk = try await client.open("disk")
            default:
                Issue.record("variant \(n) (malformed: \(malformed)): \(result)")
                return
            }
        }
        #expect(statuses.values.reduce(0, +) + closes == total)
        #expect(closes == total / 97)
        #expect(statuses[.ok, default: 0] > 0)
        #expect(statuses[.invalid, default: 0] > 0)
        #expect(statuses[.outOfRange, default: 0] > 0)
        #expect(statuses[.unknownDevice, default: 0] > 0)
        #expect(server.isRunning)
        // The session still works.
        try await client.write(disk, offset: 0, data: ByteBuffer(repeating: 7, count: 4096))
        #expect(try await client.read(disk, offset: 0, length: 4096) == ByteBuffer(repeating: 7, count: 4096))
    }
}
