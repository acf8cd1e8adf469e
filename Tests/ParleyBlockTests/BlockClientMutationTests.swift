import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Parley
@testable import ParleyBlock
import ParleyTestSupport
import Testing

/// The block client against a server that answers anything: made-up SessionInfo, Open and
/// Close answers (any status, version, id, geometry field) and IO answers (any status; data
/// of the right length, shorter, longer, or none; DIRECT answer headers of any size). Every
/// call of the client, and of a multipath session over it, returns or fails with an error
/// that says why; nothing crashes and nothing waits for ever (each round has a deadline).
/// `PARLEY_BLOCK_CLIENT_MUTATIONS` rounds (default 60).
@Suite(.timeLimit(.minutes(5)))
struct BlockClientMutationTests {
    static let rounds = ProcessInfo.processInfo.environment["PARLEY_BLOCK_CLIENT_MUTATIONS"].flatMap(Int.init) ?? 60

    /// What the server answers in one round, drawn before the round.
    struct Script: Sendable {
        var version: UInt32
        var direct: Bool
        var sessionStatus: Parley_Block_V1_BlockStatus
        var openStatus: Parley_Block_V1_BlockStatus
        var deviceID: UInt32
        var geometry: Parley_Block_V1_Geometry
        var ioStatuses: [Parley_Block_V1_BlockStatus]
        /// Per answer: the data carried, as a change to the length asked (nil: none).
        var dataDelta: [Int?]
        var directHeaderLength: [Int]
    }

    static func script(_ rng: inout SplitMix) -> Script {
        let statuses: [Parley_Block_V1_BlockStatus] = [.ok, .ok, .ok, .ok, .invalid, .ioError, .fenced, .shuttingDown, .busySession, .tooLarge,
                                                        .unknownDevice, .noSession, .outOfRange, .readOnly, .notSupported, .noSpace,
                                                        .UNRECOGNIZED(999)]
        var g = Parley_Block_V1_Geometry()
        g.sizeBytes = ([0, 512, 1 << 20, UInt64.max, UInt64.random(in: 0...(1 << 30), using: &rng)] as [UInt64]).randomElement(using: &rng)!
        g.sizeSectors = g.sizeBytes / 512
        g.logicalBlockSize = ([512, 512, 4096, 0, 3, 1 << 20] as [UInt32]).randomElement(using: &rng)!
        g.physicalBlockSize = ([0, 512, 4096, UInt32.max] as [UInt32]).randomElement(using: &rng)!
        g.maxIoSize = ([0, 512, 4096, 8 << 20, UInt32.max] as [UInt32]).randomElement(using: &rng)!
        g.discardGranularity = ([0, 4096, UInt32.max] as [UInt32]).randomElement(using: &rng)!
        g.maxDiscardSize = ([0, 1 << 30, UInt32.max] as [UInt32]).randomElement(using: &rng)!
        g.writeCache = Bool.random(using: &rng)
        g.fua = Bool.random(using: &rng)
        g.rotational = Bool.random(using: &rng)
        return Script(
            version: ([0, 1, 1, 1, 2, UInt32.max] as [UInt32]).randomElement(using: &rng)!,
            direct: Bool.random(using: &rng),
            sessionStatus: Int.random(in: 0..<8, using: &rng) == 0 ? statuses.randomElement(using: &rng)! : .ok,
            openStatus: Int.random(in: 0..<6, using: &rng) == 0 ? statuses.randomElement(using: &rng)! : .ok,
            deviceID: ([0, 1, 7, UInt32.max] as [UInt32]).randomElement(using: &rng)!,
            geometry: g,
            ioStatuses: (0..<64).map { _ in statuses.randomElement(using: &rng)! },
            dataDelta: (0..<64).map { _ in [0, 0, 0, -1, 1, -512, nil].randomElement(using: &rng)! },
            directHeaderLength: (0..<64).map { _ in [BlockDirect.answerHeaderLength, BlockDirect.answerHeaderLength, 0, 4, 12].randomElement(using: &rng)! }
        )
    }

    /// A server answering as `script` says; its IO answers taken in turn.
    static func server(_ script: Script, socket: String) async throws -> (ParleyServer, ParleyAddress) {
        let next = NIOLockedValueBox(0)
        @Sendable func turn() -> Int { next.withLockedValue { n in defer { n += 1 }; return n % 64 } }
        var router = ParleyRouter()
        router.on(Parley_Block_V1_SessionInfo.self) { _, context throws -> Parley_Block_V1_SessionInfoReply in
            var reply = Parley_Block_V1_SessionInfoReply()
            reply.protocolVersion = script.version
            reply.connectionID = 42
            reply.status = script.sessionStatus
            if script.direct {
                try context.connection.enableDirect { request in
                    let i = turn()
                    let length = Int(request.header.getInteger(at: request.header.readerIndex + 20, endianness: .little, as: UInt32.self) ?? 0)
                    let carried = script.dataDelta[i].map { max(0, min(length + $0, 1 << 20)) }
                    var frame = request.answerFrame(headerLength: script.directHeaderLength[i], dataLength: carried)
                    if script.directHeaderLength[i] == BlockDirect.answerHeaderLength { BlockDirect.setStatus(script.ioStatuses[i], in: &frame) }
                    if let carried { frame.writeData(ByteBuffer(repeating: 9, count: carried)) }
                    request.answer(frame)
                }
                reply.directIo = true
            }
            return reply
        }
        router.on(Parley_Block_V1_Open.self) { _, _ throws -> Parley_Block_V1_OpenReply in
            var reply = Parley_Block_V1_OpenReply()
            reply.status = script.openStatus
            reply.deviceID = script.deviceID
            reply.geometry = script.geometry
            reply.message = script.openStatus == .ok ? "" : "refused by the test"
            return reply
        }
        router.on(Parley_Block_V1_Close.self) { _, _ throws -> Parley_Block_V1_CloseReply in
            var reply = Parley_Block_V1_CloseReply()
            reply.status = script.ioStatuses[turn()]
            return reply
        }
        router.on(Parley_Block_V1_Fence.self) { _, _ throws -> Parley_Block_V1_FenceReply in
            var reply = Parley_Block_V1_FenceReply()
            reply.status = script.ioStatuses[turn()]
            return reply
        }
        router.onWithData(Parley_Block_V1_Io.self) { request, _ -> ParleyReply<Parley_Block_V1_IoReply> in
            let i = turn()
            var reply = Parley_Block_V1_IoReply()
            reply.status = script.ioStatuses[i]
            let carried = script.dataDelta[i].map { max(0, min(Int(request.length) + $0, 1 << 20)) }
            return ParleyReply(reply, data: carried.map { ByteBuffer(repeating: 9, count: $0) })
        }
        var quiet = Logger(label: "hostile-block")
        quiet.logLevel = .critical
        let server = ParleyServer(configuration: .init(listen: [.unix(path: socket)]), router: router, logger: quiet)
        Task { try await server.run() }
        return (server, try await server.listeningAddresses[0])
    }

    @Test func madeUpAnswersAreTakenOrRefusedWithAReason() async throws {
        let scratch = try ScratchDirectory("hostile-block")
        var rng = SplitMix(seed: 0xB10C_C11E)
        var outcomes: [String: Int] = [:]
        for round in 0..<Self.rounds {
            let script = Self.script(&rng)
            let (server, address) = try await Self.server(script, socket: scratch.file("s\(round).sock"))
            defer { server.shutDown() }
            let operations = (0..<12).map { _ in Int.random(in: 0..<5, using: &rng) }
            let useMultipath = Bool.random(using: &rng)
            // The round's calls, in a task with a deadline: none may wait for ever.
            let work = Task { () -> [String] in
                var seen: [String] = []
                func note(_ what: String, _ body: () async throws -> Void) async {
                    do {
                        try await body()
                        seen.append("\(what): ok")
                    } catch let e as BlockError {
                        #expect(!e.message.isEmpty || e.status != .ok, "round \(round): \(what) failed without a reason")
                        seen.append("\(what): \(e.status)")
                    } catch let e as ParleyError {
                        #expect(!e.message.isEmpty, "round \(round): \(what) failed without a reason")
                        seen.append("\(what): \(e.code)")
                    } catch let e as BlockMultipathError {
                        #expect(!e.message.isEmpty, "round \(round): \(what) failed without a reason")
                        seen.append("\(what): \(e.kind)")
                    } catch {
                        #expect(!"\(error)".isEmpty, "round \(round): \(what) failed without a reason")
                        seen.append("\(what): \(type(of: error))")
                    }
                }
                if useMultipath {
                    guard let session = try? BlockMultipathSession(.init(sessionName: "hostile", paths: [address], ioTimeout: .seconds(2), connectTimeout: .seconds(5))) else { return ["session: refused"] }
                    var device: BlockMultipathDevice?
                    await note("multipath open") { device = try await session.open("disk") }
                    if let device {
                        for op in operations {
                            switch op {
                            case 0, 1: await note("multipath read") { _ = try await device.read(offset: 0, length: 4096) }
                            case 2, 3: await note("multipath write") { try await device.write(offset: 4096, data: ByteBuffer(repeating: 1, count: 4096)) }
                            default: await note("multipath flush") { try await device.flush() }
                            }
                        }
                        await note("multipath close") { try await device.close() }
                    }
                    return seen
                }
                let client: BlockClient
                do {
                    client = try await BlockClient.connect(to: address, sessionName: "hostile", direct: script.direct)
                } catch {
                    #expect(!"\(error)".isEmpty)
                    return ["connect: \(type(of: error))"]
                }
                defer { client.closeConnection() }
                var device: BlockClient.Device?
                await note("open") { device = try await client.open("disk") }
                let target = device ?? BlockClient.Device(id: script.deviceID, geometry: script.geometry)
                for op in operations {
                    switch op {
                    case 0, 1: await note("read") { _ = try await client.read(target, offset: 0, length: 4096) }
                    case 2: await note("write") { try await client.write(target, offset: 4096, data: ByteBuffer(repeating: 1, count: 4096)) }
                    case 3: await note("flush") { try await client.flush(target) }
                    default: await note("fence") { try await client.fence([7]) }
                    }
                }
                await note("close") { try await client.close(target, timeout: .seconds(5)) }
                return seen
            }
            let deadline = Task {
                try await Task.sleep(for: .seconds(60))
                work.cancel()
            }
            let seen = await work.value
            // Cancelled only by the deadline.
            let timedOut = work.isCancelled
            deadline.cancel()
            #expect(!timedOut, "round \(round) did not end within 60 s: \(seen)")
            for s in seen { outcomes[s, default: 0] += 1 }
            server.shutDown()
        }
        print("block client mutations: \(Self.rounds) rounds; \(outcomes.sorted { $0.key < $1.key })")
        #expect(outcomes.keys.contains { $0.hasSuffix(": ok") } && outcomes.keys.contains { !$0.hasSuffix(": ok") })
    }
}
