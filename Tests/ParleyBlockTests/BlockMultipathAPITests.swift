import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Parley
@testable import ParleyBlock
import CParleyBlockIO
import ParleyTestSupport
import Testing

/// The Swift multipath client (`BlockMultipathSession`, `BlockMultipathDevice`) against a
/// `parley block serve` process: many IOs in flight over two paths, every operation, the
/// server's refusals passed on with their status, and close.
@Suite(.timeLimit(.minutes(5)))
struct BlockMultipathAPITests {
    func session(_ server: BlockServerProcess, name: String = "api", policy: MultipathIOState.Policy = .roundRobin) throws -> BlockMultipathSession {
        try BlockMultipathSession(.init(sessionName: name, paths: [.unix(path: server.blockSocket), .tcp(host: "127.0.0.1", port: server.blockPort)],
                                        policy: policy, ioTimeout: .seconds(5)))
    }

    /// What the map's NBD endpoint hands its store: a write longer than the remote's
    /// max_io_size, in pieces (as an NBD write's reads), goes as several IOs at once and
    /// lands whole; a read that long comes back joined in order, as pieces.
    @Test func ioLongerThanTheRemotesLargestIsSplitAndJoined() async throws {
        let scratch = try ScratchDirectory()
        let length = Int(BlockService.maximumIO) * 2 + 12_288
        try scratch.sparseFile("disk.img", size: length + (1 << 20))
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(scratch.file("disk.img"))"])
        defer { server.stop() }
        let device = try await self.session(server).open("disk")
        let store = MultipathBlockStore(device: device)
        var rng = SplitMix(seed: 10)
        let bytes = (0..<length).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        // Cut as reads bring a payload: 64 KiB pieces, then a ragged tail.
        let pieces = ByteBufferPieces(stride(from: 0, to: length, by: 65_000).map { ByteBuffer(bytes: bytes[$0..<min(length, $0 + 65_000)]) })
        func run(_ request: BlockStoreRequest) async -> Result<ByteBufferPieces?, BlockStoreError> {
            await withCheckedContinuation { c in store.start(request) { c.resume(returning: $0) } }
        }
        guard case .success = await run(.write(offset: 4096, data: pieces, fua: false)) else { Issue.record("the write failed"); return }
        guard case .success(let read?) = await run(.read(offset: 4096, length: UInt32(length))) else { Issue.record("the read failed"); return }
        #expect(read.readableBytes == length)
        #expect(read.gathered() == ByteBuffer(bytes: bytes), "the read differs from the write")
        #expect(read.pieceCount >= 3, "three IOs' answers, joined as pieces")
        // Each part went as an IO of its own.
        #expect(device.status().writes == 3 && device.status().reads == 3)
        try await device.close()
    }

    /// A remote whose largest IO is no whole number of blocks: the pieces of a longer IO are
    /// cut to whole blocks (an unaligned piece would be refused).
    @Test func piecesOfALongerIOAreWholeBlocks() {
        #expect(MultipathBlockStore.largestIO(maxIoSize: 1_000_000, blockSize: 4096) == 999_424)
        #expect(MultipathBlockStore.largestIO(maxIoSize: 32 << 20, blockSize: 4096) == 32 << 20)
        #expect(MultipathBlockStore.largestIO(maxIoSize: 100, blockSize: 512) == 512)
        #expect(MultipathBlockStore.largestIO(maxIoSize: 0, blockSize: 4096) == 4096)
    }

    @Test(arguments: [MultipathIOState.Policy.roundRobin, .minInflight])
    func manyIOsInFlightOverTwoPaths(policy: MultipathIOState.Policy) async throws {
        let scratch = try ScratchDirectory()
        try scratch.sparseFile("disk.img", size: 8 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(scratch.file("disk.img"))"])
        defer { server.stop() }
        let device = try await self.session(server, policy: policy).open("disk")
        #expect(device.geometry.sizeBytes == 8 << 20)
        // 256 writes of 4 KiB at once, each block its own pattern, then read back at once.
        try await withThrowingTaskGroup(of: Void.self) { group in
            for i in 0..<256 {
                group.addTask { try await device.write(offset: UInt64(i) * 4096, data: ByteBuffer(repeating: UInt8(i & 0xff), count: 4096)) }
            }
            try await group.waitForAll()
        }
        try await device.flush()
        try await withThrowingTaskGroup(of: (Int, ByteBuffer).self) { group in
            for i in 0..<256 {
                group.addTask { (i, try await device.read(offset: UInt64(i) * 4096, length: 4096)) }
            }
            for try await (i, data) in group {
                #expect(data == ByteBuffer(repeating: UInt8(i & 0xff), count: 4096), "block \(i)")
            }
        }
        // Both paths carried IO.
        let status = device.status()
        #expect(status.paths.allSatisfy { $0.state == "up" && $0.sends > 0 }, "\(status.paths)")
        #expect(status.writes == 256 && status.reads == 256 && status.errors == 0)
        // Discard and write-zeroes read back as zeroes.
        try await device.discard(offset: 0, length: 8192)
        try await device.writeZeroes(offset: 8192, length: 4096, fua: true)
        #expect(try await device.read(offset: 0, length: 12288) == ByteBuffer(repeating: 0, count: 12288))
        #expect(try await device.read(offset: 12288, length: 4096) == ByteBuffer(repeating: 3, count: 4096))
        try await device.close()
        await #expect(throws: BlockMultipathError.self) { _ = try await device.read(offset: 0, length: 4096) }
        // A second close does nothing (it used to send another final flush to paths without
        // a connection: a precondition failure).
        try await device.close()
    }

    /// NBD's NO_HOLE through the map's store: the block protocol's write-zeroes may
    /// deallocate, so a range that must stay allocated gets zeroes written (the server's
    /// sparse file gains the blocks); without it the range stays a hole.
    @Test func writeZeroesWithNoHoleKeepsTheRangeAllocated() async throws {
        let scratch = try ScratchDirectory()
        let file = try scratch.sparseFile("disk.img", size: 8 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(file)"])
        defer { server.stop() }
        let device = try await self.session(server).open("disk")
        let store = MultipathBlockStore(device: device)
        func run(_ request: BlockStoreRequest) async -> Result<ByteBufferPieces?, BlockStoreError> {
            await withCheckedContinuation { c in store.start(request) { c.resume(returning: $0) } }
        }
        /// Where the file's first data (`data`) or hole starts at `offset` or after; -1: none.
        func seek(_ offset: Int64, data: Bool) -> Int64 {
            let fd = open(file, O_RDONLY)
            defer { close(fd) }
            return max(-1, parley_seek(fd, offset, data ? 1 : 0))
        }
        #expect(seek(0, data: true) == -1, "a sparse file: no data")
        guard case .success = await run(.writeZeroes(offset: 4 << 20, length: 1 << 20, fua: false, fast: false, noHole: false)) else {
            Issue.record("the write-zeroes failed")
            return
        }
        #expect(seek(0, data: true) == -1, "may deallocate: nothing allocated")
        guard case .success = await run(.writeZeroes(offset: 0, length: 3 << 20, fua: true, fast: false, noHole: true)) else {
            Issue.record("the write-zeroes with NO_HOLE failed")
            return
        }
        #expect(seek(0, data: true) == 0 && seek(0, data: false) >= 3 << 20, "NO_HOLE: the range is allocated")
        #expect(device.status().writes == 3, "written as zeroes, 1 MiB at a time")
        #expect(device.status().flushes == 1, "FUA: one flush after the writes, not each write durable")
        guard case .success(let read?) = await run(.read(offset: 0, length: 3 << 20)) else {
            Issue.record("the read failed")
            return
        }
        #expect(read.gathered() == ByteBuffer(repeating: 0, count: 3 << 20))
        // The synchronous call says the same.
        try store.writeZeroes(offset: 5 << 20, length: 8192, mayDeallocate: false, fast: false)
        #expect(device.status().writes == 4)
        try await device.close()
    }

    /// Two closes at once: the second waits for the first and gets its outcome, here the
    /// final flush's failure (no path came up within the IO timeout). It used to return at
    /// once, before the first had flushed.
    @Test func aRacingCloseGetsTheFirstOnesOutcome() async throws {
        let scratch = try ScratchDirectory()
        try scratch.sparseFile("disk.img", size: 1 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(scratch.file("disk.img"))"])
        defer { server.stop() }
        let session = try BlockMultipathSession(.init(sessionName: "race", paths: [.unix(path: server.blockSocket)], ioTimeout: .seconds(1)))
        let device = try await session.open("disk")
        server.stop(signal: SIGKILL)
        #expect(try await eventually { device.status().paths.allSatisfy { $0.state != "up" } })
        func close() async -> BlockMultipathError.Kind? {
            do {
                try await device.close()
                return nil
            } catch {
                return (error as? BlockMultipathError)?.kind
            }
        }
        async let a = close()
        async let b = close()
        let (ka, kb) = await (a, b)
        #expect(ka == .noPath && kb == .noPath, "\(String(describing: ka)), \(String(describing: kb))")
    }

    /// [R-17.8-5] The paths of a session lead to the same device: two servers exporting
    /// "disk" with different sizes are not one device, and the open over both is refused
    /// (pathsDisagree), naming both paths; over either alone it succeeds.
    @Test func pathsLeadingToDifferentDevicesAreRefused() async throws {
        // Two servers, each in its own directory (its sockets are there).
        let scratchA = try ScratchDirectory(), scratchB = try ScratchDirectory()
        try scratchA.sparseFile("a.img", size: 1 << 20)
        try scratchB.sparseFile("b.img", size: 2 << 20)
        let a = try await BlockServerProcess(scratch: scratchA, arguments: ["--export", "disk=\(scratchA.file("a.img"))"])
        defer { a.stop() }
        let b = try await BlockServerProcess(scratch: scratchB, arguments: ["--export", "disk=\(scratchB.file("b.img"))"])
        defer { b.stop() }
        // Read-only opens: the refused open's connections may still hold the device a moment.
        let both = try BlockMultipathSession(.init(sessionName: "split", paths: [.unix(path: a.blockSocket), .unix(path: b.blockSocket)], ioTimeout: .seconds(5)))
        do {
            _ = try await both.open("disk", access: .readOnly)
            Issue.record("an open over paths to a 1 MiB and a 2 MiB device succeeded")
        } catch let error as BlockMultipathError {
            #expect(error.kind == .pathsDisagree, "\(error)")
            #expect("\(error)".contains("1048576") && "\(error)".contains("2097152"), "\(error)")
        }
        let one = try BlockMultipathSession(.init(sessionName: "whole", paths: [.unix(path: b.blockSocket), .tcp(host: "127.0.0.1", port: b.blockPort)], ioTimeout: .seconds(5)))
        let device = try await one.open("disk", access: .readOnly)
        #expect(device.geometry.sizeBytes == 2 << 20)
        try await device.close()
    }

    /// A path whose server takes the connection but never answers (the handshake,
    /// `SessionInfo`, `Open`) counts as unreachable after `connectTimeout`, not forever.
    @Test func aPathThatNeverAnswersIsUnreachableAfterTheConnectTimeout() async throws {
        let scratch = try ScratchDirectory()
        let path = scratch.file("silent.sock")
        // A listener that never accepts: the kernel completes connections into its backlog.
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        #expect(fd >= 0)
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            let bytes = Array(path.utf8)
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        #expect(bound == 0 && listen(fd, 8) == 0)
        let session = try BlockMultipathSession(.init(sessionName: "silent", paths: [.unix(path: path)], connectTimeout: .milliseconds(300)))
        do {
            _ = try await session.open("disk")
            Issue.record("opened a device on a server that never answered")
        } catch let e as BlockMultipathError {
            #expect(e.kind == .unreachable && e.message.contains("no answer within"), "\(e)")
        }
    }

    /// A server that completes the handshake but never answers `SessionInfo`, or answers it
    /// and never `Open`: the path is unreachable after `connectTimeout`, and its connection
    /// is closed (not left open, one more at each reconnect).
    @Test(arguments: [true, false]) func aPathThatNeverOpensIsClosedAfterTheConnectTimeout(stuckAtSessionInfo: Bool) async throws {
        let scratch = try ScratchDirectory()
        var router = ParleyRouter()
        router.on(Parley_Block_V1_SessionInfo.self) { _, _ async throws -> Parley_Block_V1_SessionInfoReply in
            if stuckAtSessionInfo { try await Task.sleep(for: .seconds(3600)) }
            var reply = Parley_Block_V1_SessionInfoReply()
            reply.protocolVersion = 1
            reply.connectionID = 1
            return reply
        }
        router.on(Parley_Block_V1_Open.self) { _, _ async throws -> Parley_Block_V1_OpenReply in
            try await Task.sleep(for: .seconds(3600))
            return Parley_Block_V1_OpenReply()
        }
        var quiet = Logger(label: "stuck-open")
        quiet.logLevel = .critical
        let server = ParleyServer(configuration: .init(listen: [.unix(path: scratch.file("stuck.sock"))]), router: router, logger: quiet)
        Task { try await server.run() }
        defer { server.shutDown() }
        let address = try await server.listeningAddresses[0]
        let session = try BlockMultipathSession(.init(sessionName: "stuck", paths: [address], connectTimeout: .milliseconds(500)))
        do {
            _ = try await session.open("disk")
            Issue.record("opened a device on a server that never answered")
        } catch let e as BlockMultipathError {
            #expect(e.kind == .unreachable && e.message.contains("no answer within"), "\(e)")
        }
        #expect(try await eventually { server.connectionCount == 0 }, "the connection of the attempt that timed out was closed")
    }

    /// A server whose Open answers a geometry no client can use (a block size that is not a
    /// power of two from 512 to 65536, a largest IO below one block) is refused at the open,
    /// naming what is wrong, and the device is closed there again; a usable one opens.
    @Test func aGeometryNoClientCanUseIsRefusedAtTheOpen() async throws {
        let scratch = try ScratchDirectory()
        let closes = NIOLockedValueBox(0)
        var router = ParleyRouter()
        router.on(Parley_Block_V1_SessionInfo.self) { _, _ throws -> Parley_Block_V1_SessionInfoReply in
            var reply = Parley_Block_V1_SessionInfoReply()
            reply.protocolVersion = 1
            reply.connectionID = 1
            return reply
        }
        router.on(Parley_Block_V1_Open.self) { request, _ throws -> Parley_Block_V1_OpenReply in
            var reply = Parley_Block_V1_OpenReply()
            reply.deviceID = 7
            reply.geometry.sizeBytes = 1 << 20
            reply.geometry.maxIoSize = 8 << 20
            switch request.path {
            case "odd": reply.geometry.logicalBlockSize = 1000
            case "zero": reply.geometry.logicalBlockSize = 0
            case "huge": reply.geometry.logicalBlockSize = 1 << 20
            case "tiny-io": reply.geometry.logicalBlockSize = 4096; reply.geometry.maxIoSize = 512
            default: reply.geometry.logicalBlockSize = 4096
            }
            return reply
        }
        router.on(Parley_Block_V1_Close.self) { _, _ throws -> Parley_Block_V1_CloseReply in
            closes.withLockedValue { $0 += 1 }
            return Parley_Block_V1_CloseReply()
        }
        var quiet = Logger(label: "geometry")
        quiet.logLevel = .critical
        let server = ParleyServer(configuration: .init(listen: [.unix(path: scratch.file("geometry.sock"))]), router: router, logger: quiet)
        Task { try await server.run() }
        defer { server.shutDown() }
        let client = try await BlockClient.connect(to: try await server.listeningAddresses[0], sessionName: "geometry", direct: false)
        defer { client.closeConnection() }
        for (path, says) in [("odd", "logical_block_size 1000"), ("zero", "logical_block_size 0"), ("huge", "logical_block_size 1048576"), ("tiny-io", "max_io_size 512")] {
            do {
                _ = try await client.open(path)
                Issue.record("\(path) was opened")
            } catch let e as ParleyError {
                #expect(e.code == .protocolViolation && e.message.contains(says), "\(path): \(e)")
            }
        }
        #expect(closes.withLockedValue { $0 } == 4, "each refused device was closed on the server")
        #expect(try await client.open("fine").geometry.logicalBlockSize == 4096)
    }

    @Test func refusalsCarryTheServersStatus() async throws {
        let scratch = try ScratchDirectory()
        try scratch.sparseFile("disk.img", size: 1 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: [
            "--export", "disk=\(scratch.file("disk.img"))", "--export", "frozen=\(scratch.file("disk.img")),read-only",
        ])
        defer { server.stop() }
        let session = try self.session(server)
        func kind(_ body: () async throws -> Void) async -> BlockMultipathError.Kind? {
            do { try await body() } catch let e as BlockMultipathError { return e.kind } catch { return nil }
            return nil
        }
        #expect(await kind { _ = try await session.open("nosuch") } == .server(.notFound))
        #expect(await kind { _ = try await session.open("frozen") } == .server(.readOnly))
        let ro = try await session.open("frozen", access: .readOnly)
        #expect(await kind { try await ro.write(offset: 0, data: ByteBuffer(repeating: 1, count: 512)) } == .server(.readOnly))
        #expect(await kind { _ = try await ro.read(offset: 1 << 20, length: 512) } == .server(.outOfRange))
        #expect(await kind { _ = try await ro.read(offset: 100, length: 512) } == .server(.invalid))
        // An IO longer than 32 bits can say is refused as too large, not trapped.
        let huge: BlockMultipathError.Kind? = await withCheckedContinuation { c in
            ro.submit(.init(.read, offset: 0, length: UInt64(UInt32.max) + 1)) { result in
                if case .failure(let e) = result { c.resume(returning: e.kind) } else { c.resume(returning: nil) }
            }
        }
        #expect(huge == .server(.tooLarge))
        // A refused IO is not re-sent and the paths stay up.
        #expect(ro.status().paths.allSatisfy { $0.state == "up" && $0.failures == 0 })
        try await ro.close()
        #expect(throws: BlockError.self) { _ = try BlockMultipathSession(.init(sessionName: "bad name", paths: [.unix(path: "/x")])) }
        #expect(throws: BlockError.self) { _ = try BlockMultipathSession(.init(sessionName: "ok", paths: [])) }
    }
}
