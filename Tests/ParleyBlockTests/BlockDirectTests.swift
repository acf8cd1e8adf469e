import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Parley
import ParleyBlock
import ParleyTestSupport
import Testing

/// DIRECT IO (docs/protocol.md 7.16 and 17.9) against a real `parley block serve` process:
/// the same answers as `Io` messages, the grant's rules, malformed requests, secure mode,
/// and IO that ends with its connection.
@Suite(.timeLimit(.minutes(3)))
struct BlockDirectTests {
    /// Status of an IO (`.ok` when it succeeded) and the data it returned.
    static func outcome(_ body: () async throws -> ByteBuffer?) async -> (Parley_Block_V1_BlockStatus?, ByteBuffer?) {
        do {
            return (.ok, try await body())
        } catch let e as BlockError {
            return (e.status, nil)
        } catch {
            Issue.record("unexpected error \(error)")
            return (nil, nil)
        }
    }

    /// [R-7.16-1] [R-17.9-2]: one client granted DIRECT IO and one sending `Io` messages get
    /// the same statuses and data for every check of section 17.2.
    @Test func directAndIoMessagesGiveTheSameAnswers() async throws {
        let scratch = try ScratchDirectory("direct")
        let path = try scratch.sparseFile("disk.img", size: 4 << 20)
        let roPath = try scratch.sparseFile("ro.img", size: 1 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(path)", "--export", "ro=\(roPath),read-only"])
        defer { server.stop() }
        let direct = try await BlockClient.connect(to: .unix(path: server.blockSocket), sessionName: "direct")
        let messages = try await BlockClient.connect(to: .tcp(host: "127.0.0.1", port: server.blockPort), sessionName: "messages", direct: false)
        defer { [direct, messages].forEach { $0.closeConnection() } }
        #expect(direct.usesDirect, "the server did not grant DIRECT IO")
        #expect(!messages.usesDirect)

        let a = try await direct.open("disk")
        let b = try await messages.open("disk", access: .migration)
        let roA = try await direct.open("ro", access: .readOnly)
        let roB = try await messages.open("ro", access: .readOnly)
        typealias Case = (name: String, run: (BlockClient, BlockClient.Device, BlockClient.Device) async throws -> ByteBuffer?)
        let pattern = ByteBuffer(bytes: (0..<65536).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) })
        let cases: [Case] = [
            ("write", { c, d, _ in try await c.write(d, offset: 65536, data: pattern, fua: true); return nil }),
            ("read", { c, d, _ in try await c.read(d, offset: 65536, length: 65536) }),
            ("read of 0 bytes", { c, d, _ in try await c.read(d, offset: 0, length: 0) }),
            ("flush", { c, d, _ in try await c.flush(d); return nil }),
            ("past the end", { c, d, _ in try await c.read(d, offset: 4 << 20, length: 4096) }),
            ("overflowing end", { c, d, _ in try await c.read(d, offset: UInt64.max - 511, length: 4096) }),
            ("unaligned", { c, d, _ in try await c.read(d, offset: 100, length: 512) }),
            ("over max_io_size", { c, d, _ in try await c.read(d, offset: 0, length: 16 << 20) }),
            ("unknown device", { c, d, _ in try await c.read(BlockClient.Device(id: 999, geometry: d.geometry), offset: 0, length: 512) }),
            ("short write data", { c, d, _ in try await c.io(d, .write, offset: 0, length: 4096, data: ByteBuffer(repeating: 1, count: 512)) }),
            ("data on a flush", { c, d, _ in try await c.io(d, .flush, offset: 0, length: 0, data: ByteBuffer(repeating: 1, count: 512)) }),
            ("unknown operation", { c, d, _ in try await c.io(d, .UNRECOGNIZED(9), offset: 0, length: 512) }),
            ("write read-only", { c, _, ro in try await c.write(ro, offset: 0, data: ByteBuffer(repeating: 9, count: 512)); return nil }),
            ("write zeroes", { c, d, _ in try await c.io(d, .writeZeroes, offset: 0, length: 8192) }),
            ("discard", { c, d, _ in try await c.io(d, .discard, offset: 8192, length: 8192) }),
            ("zeroes read back", { c, d, _ in try await c.read(d, offset: 0, length: 16384) }),
        ]
        for (name, run) in cases {
            let viaDirect = await Self.outcome { try await run(direct, a, roA) }
            let viaMessages = await Self.outcome { try await run(messages, b, roB) }
            #expect(viaDirect.0 == viaMessages.0, "\(name): DIRECT \(String(describing: viaDirect.0)), Io \(String(describing: viaMessages.0))")
            #expect(viaDirect.1 == viaMessages.1, "\(name): the data differ")
        }
        #expect(try await direct.read(a, offset: 65536, length: 65536) == pattern)
        #expect(try await direct.read(a, offset: 0, length: 512) == ByteBuffer(repeating: 0, count: 512))
        // The refusals were logged by the server with their reasons, DIRECT ones included.
        #expect(server.log.contains("session=direct") && server.log.contains("ends past the device"))
    }

    /// [R-17.9-2]: DIRECT requests whose fields are wrong are answered INVALID; one whose
    /// header has the wrong size ends the connection with CLOSE `malformedPayload`.
    @Test func badDirectRequestsAreRefusedOrCloseTheConnection() async throws {
        let scratch = try ScratchDirectory("direct")
        let path = try scratch.sparseFile("disk.img", size: 1 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(path)"])
        defer { server.stop() }
        let client = try await BlockClient.connect(to: .unix(path: server.blockSocket), sessionName: "bad")
        defer { client.closeConnection() }
        #expect(client.usesDirect)
        let device = try await client.open("disk")
        let connection = client.client.connection
        func send(_ frame: DirectFrame) async -> Result<DirectInbound, ParleyError> {
            await withCheckedContinuation { c in connection.sendDirect(frame) { c.resume(returning: $0) } }
        }
        func status(_ r: BlockDirect.Request, data: ByteBuffer? = nil) async throws -> Parley_Block_V1_BlockStatus {
            let answer = try await send(r.frame(allocator: connection.channelAllocator, data: data)).get()
            return try BlockDirect.Answer.decode(answer).get().status
        }
        #expect(try await status(BlockDirect.Request(operation: 0, flags: 0, deviceID: device.id, offset: 0, length: 512)) == .ok)
        #expect(try await status(BlockDirect.Request(operation: 0, flags: 4, deviceID: device.id, offset: 0, length: 512)) == .invalid)
        var reserved = BlockDirect.Request(operation: 0, flags: 0, deviceID: device.id, offset: 0, length: 512)
        reserved.reserved = 1 << 20
        #expect(try await status(reserved) == .invalid)
        #expect(try await status(BlockDirect.Request(operation: 7, flags: 0, deviceID: device.id, offset: 0, length: 512)) == .invalid)
        #expect(try await status(BlockDirect.Request(operation: 1, flags: 0, deviceID: device.id, offset: 0, length: 512)) == .invalid, "a write without data")
        #expect(try await status(BlockDirect.Request(operation: 1, flags: 0, deviceID: device.id, offset: 0, length: 512), data: ByteBuffer(repeating: 3, count: 512)) == .ok)
        // A header of 16 bytes instead of 24: the server closes the connection.
        var short = DirectFrame(allocator: connection.channelAllocator, headerLength: 16, dataLength: nil)
        short.setHeader(UInt32(device.id), at: 12)
        guard case .failure(let error) = await send(short) else {
            Issue.record("a malformed DIRECT request was answered")
            return
        }
        #expect(error.code == .malformedPayload && error.message.contains("segment 0 is 32 bytes"), "\(error)")
        #expect(await connection.closed().code == .malformedPayload)
        // Nothing was written but the one good write.
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        var first = [UInt8](repeating: 0, count: 4)
        #expect(pread(fd, &first, 4, 0) == 4 && first == [3, 3, 3, 3])
    }

    /// [R-17.9-1]: no grant without the client's asking, from a server started with
    /// `--no-direct`, or in a lossless session; IO then goes as `Io` messages and works.
    @Test func directIOIsGrantedOnlyWhereItMayBe() async throws {
        let scratch = try ScratchDirectory("direct")
        let path = try scratch.sparseFile("disk.img", size: 1 << 20)
        let refusing = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(path)", "--no-direct"])
        defer { refusing.stop() }
        var lossless = ParleyClient.Configuration()
        lossless.lossless = ParleyClient.LosslessOptions()
        let clients = [
            try await BlockClient.connect(to: .unix(path: refusing.blockSocket), sessionName: "refused"),
            try await BlockClient.connect(to: .tcp(host: "127.0.0.1", port: refusing.blockPort), sessionName: "lossless", configuration: lossless),
        ]
        defer { clients.forEach { $0.closeConnection() } }
        #expect(clients.allSatisfy { !$0.usesDirect })
        #expect(clients[1].client.connection.lossless != nil && !clients[1].client.connection.mayUseDirect)
        let d = try await clients[0].open("disk")
        try await clients[0].write(d, offset: 512, data: ByteBuffer(repeating: 5, count: 512))
        #expect(try await clients[0].read(d, offset: 512, length: 512) == ByteBuffer(repeating: 5, count: 512))
    }

    /// DIRECT IO in secure mode: sealed like every frame, large and small.
    @Test func directIOInSecureMode() async throws {
        let scratch = try ScratchDirectory("direct")
        let path = try scratch.sparseFile("disk.img", size: 4 << 20)
        let keyring = scratch.file("server.keyring")
        let out = try await Tools.run(try Tools.parley, ["keyring", "add", "client.d", "--keyring", keyring, "--caps", "block.*"])
        #expect(out.status == 0, "\(out.combined)")
        let server = try await BlockServerProcess(scratch: scratch, arguments: [
            "--export", "disk=\(path)", "--auth", "secret", "--keyring", keyring, "--mode", "secure",
        ])
        defer { server.stop() }
        let credentials = try ParleyKeyring.load(path: keyring).credentials(for: "client.d", keyringPath: keyring)
        let client = try await BlockClient.connect(to: .unix(path: server.blockSocket), sessionName: "sealed", configuration: .init(secret: credentials))
        defer { client.closeConnection() }
        #expect(client.usesDirect && client.client.connection.session.connectionMode == .secure)
        let d = try await client.open("disk")
        let big = ByteBuffer(bytes: (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        try await withThrowingTaskGroup(of: Void.self) { group in
            for i in 0..<32 {
                group.addTask { try await client.write(d, offset: UInt64(i) * 4096 + (2 << 20), data: ByteBuffer(repeating: UInt8(i), count: 4096)) }
            }
            group.addTask { try await client.write(d, offset: 0, data: big, fua: true) }
            try await group.waitForAll()
        }
        #expect(try await client.read(d, offset: 0, length: 1 << 20) == big)
        for i in [0, 17, 31] {
            #expect(try await client.read(d, offset: UInt64(i) * 4096 + (2 << 20), length: 4096) == ByteBuffer(repeating: UInt8(i), count: 4096))
        }
    }

    /// [R-17.9-2]: a server whose DIRECT answers are malformed (a segment 0 of 20 bytes; an OK
    /// read answer with 5 bytes for 512) loses the connection, and the IO fails as on a
    /// connection that ended (`connectionClosed`: a multipath client sends it elsewhere).
    @Test(arguments: [false, true]) func malformedDirectAnswersEndTheConnection(wrongData: Bool) async throws {
        let scratch = try ScratchDirectory("direct")
        var router = ParleyRouter()
        router.on(Parley_Block_V1_SessionInfo.self) { _, context throws -> Parley_Block_V1_SessionInfoReply in
            try context.connection.enableDirect { request in
                // A broken service: the wrong header size, or a read answered short.
                if wrongData {
                    var frame = request.answerFrame(headerLength: 8, dataLength: 5)
                    frame.writeData(ByteBuffer(repeating: 1, count: 5))
                    request.answer(frame)
                } else {
                    request.answer(request.answerFrame(headerLength: 12, dataLength: nil))
                }
            }
            var reply = Parley_Block_V1_SessionInfoReply()
            reply.protocolVersion = 1
            reply.connectionID = 1
            reply.directIo = true
            return reply
        }
        var quiet = Logger(label: "direct")
        quiet.logLevel = .critical
        let server = ParleyServer(configuration: .init(listen: [.unix(path: scratch.file("bad.sock"))]), router: router, logger: quiet)
        Task { try await server.run() }
        defer { server.shutDown() }
        let client = try await BlockClient.connect(to: try await server.listeningAddresses[0], sessionName: "broken")
        defer { client.closeConnection() }
        #expect(client.usesDirect)
        let device = BlockClient.Device(id: 1, geometry: Parley_Block_V1_Geometry())
        do {
            _ = try await client.read(device, offset: 0, length: 512)
            Issue.record("a malformed answer was taken")
            return
        } catch let e as ParleyError {
            #expect(e.code == .connectionClosed && e.message.contains("DIRECT answer"), "\(e)")
        }
        #expect(await client.client.connection.closed().code == .malformedPayload)
    }

    /// The same over `Io` messages (no DIRECT): an OK answer to a read of 512 bytes carrying
    /// 5 bytes, or none, ends the connection; the read fails as on a connection that ended,
    /// not with zeros or short data passed to the caller.
    @Test(arguments: [5, nil] as [Int?]) func shortIoReadAnswersEndTheConnection(carried: Int?) async throws {
        let scratch = try ScratchDirectory("io-short")
        var router = ParleyRouter()
        router.on(Parley_Block_V1_SessionInfo.self) { _, _ -> Parley_Block_V1_SessionInfoReply in
            var reply = Parley_Block_V1_SessionInfoReply()
            reply.protocolVersion = 1
            reply.connectionID = 1
            return reply
        }
        router.onWithData(Parley_Block_V1_Io.self) { _, _ -> ParleyReply<Parley_Block_V1_IoReply> in
            ParleyReply(Parley_Block_V1_IoReply(), data: carried.map { ByteBuffer(repeating: 1, count: $0) })
        }
        var quiet = Logger(label: "io-short")
        quiet.logLevel = .critical
        let server = ParleyServer(configuration: .init(listen: [.unix(path: scratch.file("short.sock"))]), router: router, logger: quiet)
        Task { try await server.run() }
        defer { server.shutDown() }
        let client = try await BlockClient.connect(to: try await server.listeningAddresses[0], sessionName: "short")
        defer { client.closeConnection() }
        #expect(!client.usesDirect)
        let device = BlockClient.Device(id: 1, geometry: Parley_Block_V1_Geometry())
        do {
            let data = try await client.read(device, offset: 0, length: 512)
            Issue.record("a short answer was taken: \(data.readableBytes) bytes")
            return
        } catch let e as ParleyError {
            #expect(e.code == .connectionClosed && e.message.contains("read of 512 bytes carried"), "\(e)")
        }
        #expect(await client.client.connection.closed().code == .malformedPayload)
    }

    /// [R-7.16-7]: DIRECT IO waiting for its answer fails with the connection's end, none
    /// is left waiting; the server drops the modification that had not started.
    @Test func directIOInFlightFailsWhenTheConnectionEnds() async throws {
        let scratch = try ScratchDirectory("direct")
        let store = GatedStore()
        let (service, server, _, address) = try await BlockFenceTests().serve(store, scratch)
        defer {
            store.gate.signal()
            server.shutDown()
        }
        let client = try await BlockClient.connect(to: address, sessionName: "ends")
        #expect(client.usesDirect)
        let device = try await client.open("disk")
        let results = NIOLockedValueBox<[Result<ByteBuffer?, any Error>]>([])
        for i in 0..<2 {
            client.io(device, .write, offset: UInt64(i) * 4096, length: 4096, data: ByteBuffer(repeating: 1, count: 4096), fua: true) { r in
                results.withLockedValue { $0.append(r) }
            }
        }
        #expect(try await eventually { store.atGate.withLockedValue { $0 } })
        client.closeConnection()
        #expect(try await eventually { results.withLockedValue { $0.count } == 2 })
        for r in results.withLockedValue({ $0 }) {
            guard case .failure(let e as ParleyError) = r else { Issue.record("expected the connection's end, got \(r)"); continue }
            #expect(e.code == .connectionClosed)
        }
        // The server has seen the connection end before the IO thread is let go.
        #expect(try await eventually { service.sessionCount == 0 })
        store.gate.signal()
        _ = try await eventually { store.log.withLockedValue { $0.written.count } >= 1 }
        try await Task.sleep(for: .milliseconds(100))
        #expect(store.log.withLockedValue { $0.written } == [0], "the write that waited for the IO thread was dropped")
    }
}
