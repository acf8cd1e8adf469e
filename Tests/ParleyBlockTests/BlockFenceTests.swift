import Dispatch
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Parley
import ParleyTestSupport
@testable import ParleyBlock
import Testing

/// A store whose first blocking write (or, with `gatesReads`, read) at offset 0 waits for
/// the test; it records what it carried out.
final class GatedStore: BlockStore {
    let geometry = BlockGeometry(size: 1 << 20)
    let gate = DispatchSemaphore(value: 0)
    let gatesReads: Bool
    init(gatesReads: Bool = false) { self.gatesReads = gatesReads }
    /// Offsets written (blocking writes), and offsets of the `nowait` attempts (what the
    /// server received), in order.
    let log = NIOLockedValueBox<(written: [UInt64], received: [UInt64])>(([], []))
    /// True once the write at offset 0 is on an IO thread, waiting at the gate.
    let atGate = NIOLockedValueBox(false)

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, nowait: Bool) throws(BlockStoreError) -> Bool {
        if nowait { return false }
        if self.gatesReads, offset == 0 {
            self.atGate.withLockedValue { $0 = true }
            self.gate.wait()
        }
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        return true
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64, durable: Bool, nowait: Bool) throws(BlockStoreError) -> Bool {
        if nowait {
            self.log.withLockedValue { $0.received.append(offset) }
            return false
        }
        if offset == 0 {
            self.atGate.withLockedValue { $0 = true }
            self.gate.wait()
        }
        self.log.withLockedValue { $0.written.append(offset) }
        return true
    }

    func flush() throws(BlockStoreError) {}
    func discard(offset: UInt64, length: UInt64) throws(BlockStoreError) {}
    func writeZeroes(offset: UInt64, length: UInt64, mayDeallocate: Bool, fast: Bool) throws(BlockStoreError) {}
    func prefetch(offset: UInt64, length: UInt64) {}
    func extents(offset: UInt64, length: UInt64) throws(BlockStoreError) -> [BlockExtent] { [] }
    func close() {}
}

/// The server's half of the multipath rule (docs/protocol.md 17.8): a write that is still
/// waiting for an IO thread when its connection ends is dropped, never carried out late
/// ([R-17.8-4]); Fence makes the same hold for a connection the server has not seen end, and
/// waits for what of it is running ([R-17.8-7]).
@Suite(.timeLimit(.minutes(2)))
struct BlockFenceTests {
    /// How the test server answers Fence.
    enum Fences {
        /// As the block service does.
        case served
        /// A Parley ERROR `permissionDenied`: a refusal.
        case refused
        /// A Parley ERROR `handlerFailed` the first `n` times (not an answer about fencing),
        /// then as the block service does.
        case failingFirst(Int)
        /// `handlerFailed` while the flag is set (keeping the connection that asked in
        /// `carrier`), then as the block service does.
        case failingWhile(NIOLockedValueBox<Bool>, carrier: NIOLockedValueBox<ParleyConnection?>)
    }

    /// A server on a Unix socket whose device is `store`, with `threads` IO threads. With
    /// `grab`, its router keeps there the server side of the connection that brought the
    /// first write at offset 0 (so that a test can end it, as a cut would); with
    /// `fences`, its Fence handler answers as that says (and counts the Fences in `fenceCount`).
    func serve(_ store: GatedStore, _ scratch: ScratchDirectory, threads: Int = 1, grab: NIOLockedValueBox<ParleyConnection?>? = nil,
               fences: Fences = .served, fenceCount: NIOLockedValueBox<Int>? = nil) async throws -> (BlockService, ParleyServer, BlockIOExecutor, ParleyAddress) {
        try scratch.sparseFile("disk.img", size: 1 << 20)
        let io = BlockIOExecutor(threads: threads)
        var quiet = Logger(label: "fence")
        quiet.logLevel = .critical
        let service = BlockService(catalog: try BlockExportCatalog(exports: [BlockExportSpec(name: "disk", path: scratch.file("disk.img"))]),
                                   devices: BlockDeviceTable(openStore: { _, _ in store }), io: io, logger: quiet)
        var router = service.router()
        if let grab {
            router.onWithData(Parley_Block_V1_Io.self, completing: { request, context, respond in
                if request.operation == .write && request.offset == 0 {
                    grab.withLockedValue { if $0 == nil { $0 = context.connection } }
                }
                service.io(request, context, respond: respond)
            })
        }
        let count = fenceCount ?? NIOLockedValueBox(0)
        switch fences {
        case .served:
            break
        case .refused:
            router.on(Parley_Block_V1_Fence.self) { _, _ throws -> Parley_Block_V1_FenceReply in
                throw ParleyError(code: .permissionDenied, message: "this test's server fences nobody")
            }
        case .failingFirst(let n):
            router.on(Parley_Block_V1_Fence.self) { request, context async throws -> Parley_Block_V1_FenceReply in
                let seen = count.withLockedValue { c -> Int in
                    c += 1
                    return c
                }
                if seen <= n { throw ParleyError(code: .handlerFailed, message: "this test's fence handler fails \(n) times") }
                return await service.fence(request, context)
            }
        case .failingWhile(let failing, let carrier):
            router.on(Parley_Block_V1_Fence.self) { request, context async throws -> Parley_Block_V1_FenceReply in
                count.withLockedValue { $0 += 1 }
                if failing.withLockedValue({ $0 }) {
                    carrier.withLockedValue { $0 = context.connection }
                    throw ParleyError(code: .handlerFailed, message: "this test's fence handler fails for now")
                }
                return await service.fence(request, context)
            }
        }
        let server = ParleyServer(configuration: .init(listen: [.unix(path: scratch.file("block.sock"))]), router: router, logger: quiet)
        Task { try await server.run() }
        return (service, server, io, try await server.listeningAddresses[0])
    }

    /// A Fence from another connection of the same client: the fenced connection's running
    /// write finishes before the answer, its queued write is dropped, and its later IO is
    /// refused; fences from other clients, of itself, or without an instance are refused.
    @Test func aFenceWaitsForTheRunningWriteDropsTheQueuedOneAndRefusesLaterIO() async throws {
        let scratch = try ScratchDirectory("fence")
        let store = GatedStore()
        let (service, server, io, address) = try await self.serve(store, scratch)
        defer {
            store.gate.signal()
            server.shutDown()
        }
        let instance: UInt64 = 0x5eed
        let old = try await BlockClient.connect(to: address, sessionName: "fence", clientInstance: instance)
        let live = try await BlockClient.connect(to: address, sessionName: "fence", clientInstance: instance)
        #expect(old.connectionID != 0 && live.connectionID != 0 && old.connectionID != live.connectionID)
        let device = try await old.open("disk")
        _ = try await live.open("disk")
        let first = Task { try await old.write(device, offset: 0, data: ByteBuffer(repeating: 1, count: 4096)) }
        #expect(try await eventually { store.log.withLockedValue { $0.received.contains(0) } })
        let second = Task { try await old.write(device, offset: 4096, data: ByteBuffer(repeating: 2, count: 4096)) }
        #expect(try await eventually { store.log.withLockedValue { $0.received.count } == 2 })
        // One attempt without waiting per write: DIRECT's inline lane hands what would wait
        // to the IO threads, not back to the page cache.
        #expect(store.log.withLockedValue { $0.received } == [0, 4096])
        _ = try await eventually { store.atGate.withLockedValue { $0 } }

        // Refused fences change nothing.
        let stranger = try await BlockClient.connect(to: address, sessionName: "fence", clientInstance: 7)
        await #expect(throws: BlockError.self) { try await stranger.fence([old.connectionID]) }
        let anonymous = try await BlockClient.connect(to: address, sessionName: "fence")
        await #expect(throws: BlockError.self) { try await anonymous.fence([old.connectionID]) }
        await #expect(throws: BlockError.self) { try await live.fence([live.connectionID]) }
        // An id this server process never gave out (another process's, or one from before a
        // restart): refused, not taken as fenced; this process cannot know what runs there.
        do {
            try await live.fence([live.connectionID + 1_000_000])
            Issue.record("a fence of an id this server never gave out was answered OK")
        } catch let e as BlockError {
            #expect(e.status == .invalid && e.message.contains("not one of this server process's"), "\(e)")
        }
        // Given out here, ended, no IO left: fenced already.
        let gone = try await BlockClient.connect(to: address, sessionName: "fence", clientInstance: instance)
        let before = service.sessionCount
        gone.closeConnection()
        #expect(try await eventually { service.sessionCount == before - 1 })
        try await live.fence([gone.connectionID])

        // The fence waits for the write at 0, which holds the only IO thread.
        let fence = Task { try await live.fence([old.connectionID]) }
        let fenced = Self.watch(fence)
        // Until the server has taken the fence (IO of the old connection is refused FENCED
        // from then on; a device id it does not have touches no store), the gate stays shut:
        // a fixed wait let a loaded run open it before the Fence was read (2026-12-05).
        var refused = false
        for _ in 0..<400 where !refused {
            do {
                _ = try await old.read(BlockClient.Device(id: 999, geometry: device.geometry), offset: 0, length: 512)
            } catch let e as BlockError where e.status == .fenced {
                refused = true
            } catch {}
            if !refused { try await Task.sleep(for: .milliseconds(25)) }
        }
        #expect(refused, "the server never took the fence")
        try await Task.sleep(for: .milliseconds(100))
        #expect(store.log.withLockedValue { $0.written }.isEmpty)
        #expect(!fenced.withLockedValue { $0 }, "answered while the fenced connection's write was running")
        store.gate.signal()
        try await fence.value
        try await io.run(on: MultiThreadedEventLoopGroup.singleton.next()) {}.get()
        #expect(store.log.withLockedValue { $0.written } == [0], "the running write completes, the queued one is dropped")
        _ = await first.result
        let dropped = await second.result
        #expect(throws: (any Error).self) { try dropped.get() }
        // [R-17.9-3]: as DIRECT IO, the dropped modification is answered FENCED.
        if case .failure(let e as BlockError) = dropped {
            #expect(e.status == .fenced, "\(e)")
        } else {
            Issue.record("the dropped DIRECT write did not fail with FENCED: \(dropped)")
        }
        // Later IO of the fenced connection is refused, and says why.
        do {
            try await old.write(device, offset: 8192, data: ByteBuffer(repeating: 3, count: 4096))
            Issue.record("a write on a fenced connection was taken")
        } catch let e as BlockError {
            // DIRECT answers carry no text: the client names the IO and the status.
            #expect(old.usesDirect, "this test covers fencing with DIRECT IO")
            #expect(e.status == .fenced && e.message.contains("write of 4096 bytes at offset 8192"), "\(e)")
        }
        #expect(store.log.withLockedValue { $0.written } == [0])
        server.shutDown()
        try await io.shutdown()
    }

    /// A connection that has ended can still be fenced while its IO runs: the fence waits.
    /// 17.1: a fenced connection fences nothing: its Fence is refused `BLOCK_STATUS_FENCED`,
    /// and the connection that fenced it goes on (the fenced path could fence its fencer, and
    /// the client was left with no path; found by the independent Python block client).
    @Test func aFencedConnectionCannotFenceItsFencer() async throws {
        let scratch = try ScratchDirectory("fence-back")
        let store = GatedStore()
        let (_, server, io, address) = try await self.serve(store, scratch)
        defer {
            store.gate.signal()
            server.shutDown()
        }
        let old = try await BlockClient.connect(to: address, sessionName: "fence", clientInstance: 9)
        let live = try await BlockClient.connect(to: address, sessionName: "fence", clientInstance: 9)
        try await live.fence([old.connectionID])
        let refused = await #expect(throws: BlockError.self) { try await old.fence([live.connectionID]) }
        #expect(refused?.status == .fenced, "\(String(describing: refused))")
        // The fencer is not fenced: it still opens (a fenced connection's Open is NO_SESSION).
        let device = try await live.open("disk")
        #expect(device.id != 0)
        server.shutDown()
        try await io.shutdown()
    }

    /// [R-17.8-7] for a Fence naming several connections: all of them refuse new IO from
    /// its arrival, while the answer waits for the IO running on the first (the targets were
    /// marked one by one, each after the one before had drained: the second admitted IO
    /// meanwhile; found by a review against the spec).
    @Test func aFenceOfSeveralConnectionsRefusesIOOnAllOfThemAtOnce() async throws {
        let scratch = try ScratchDirectory("fence-several")
        let store = GatedStore()
        let (_, server, io, address) = try await self.serve(store, scratch)
        defer {
            store.gate.signal()
            server.shutDown()
        }
        let busy = try await BlockClient.connect(to: address, sessionName: "fence", clientInstance: 11)
        let quiet = try await BlockClient.connect(to: address, sessionName: "fence", clientInstance: 11)
        let live = try await BlockClient.connect(to: address, sessionName: "fence", clientInstance: 11)
        let device = try await busy.open("disk")
        let first = Task { try await busy.write(device, offset: 0, data: ByteBuffer(repeating: 1, count: 4096)) }
        _ = try await eventually { store.atGate.withLockedValue { $0 } }
        let fence = Task { try await live.fence([busy.connectionID, quiet.connectionID]) }
        let fenced = Self.watch(fence)
        // An IO naming a device the connection does not have touches no store: FENCED once
        // the connection is fenced, UNKNOWN_DEVICE before.
        let nowhere = BlockClient.Device(id: 999, geometry: device.geometry)
        func status(_ client: BlockClient) async -> Parley_Block_V1_BlockStatus? {
            do {
                _ = try await client.read(nowhere, offset: 0, length: 512)
                return .ok
            } catch let e as BlockError {
                return e.status
            } catch {
                return nil
            }
        }
        var taken = false
        for _ in 0..<400 where !taken {
            taken = await status(busy) == .fenced
            if !taken { try await Task.sleep(for: .milliseconds(25)) }
        }
        #expect(taken, "the server never took the fence")
        #expect(await status(quiet) == .fenced, "the second connection admitted IO while the first drained")
        #expect(!fenced.withLockedValue { $0 }, "answered while the first connection's write was running")
        store.gate.signal()
        try await fence.value
        _ = await first.result
        server.shutDown()
        try await io.shutdown()
    }

    /// IO the stopped IO threads can no longer take is SHUTTING_DOWN for `Io` as for DIRECT
    /// (`Io` got a Parley ERROR handlerFailed, which the multipath client takes for a final
    /// failure where DIRECT's status is re-sent elsewhere).
    @Test(arguments: [false, true]) func ioTheStoppedIOThreadsCannotTakeIsShuttingDown(direct: Bool) async throws {
        let scratch = try ScratchDirectory("pool-stopped")
        let store = GatedStore()
        let (_, server, io, address) = try await self.serve(store, scratch)
        defer { server.shutDown() }
        let client = try await BlockClient.connect(to: address, sessionName: "late", direct: direct)
        let device = try await client.open("disk")
        #expect(client.usesDirect == direct)
        try await io.shutdown()
        do {
            // The gated store's page cache takes nothing at once: the read needs an IO thread.
            _ = try await client.read(device, offset: 4096, length: 4096)
            Issue.record("a read was answered with the IO threads stopped")
        } catch let e as BlockError {
            #expect(e.status == .shuttingDown, "\(e)")
        }
    }

    @Test func aFenceOfAnEndedConnectionWaitsForItsRunningIO() async throws {
        let scratch = try ScratchDirectory("fence")
        let store = GatedStore()
        let (service, server, io, address) = try await self.serve(store, scratch)
        defer {
            store.gate.signal()
            server.shutDown()
        }
        let old = try await BlockClient.connect(to: address, sessionName: "fence", clientInstance: 9)
        let live = try await BlockClient.connect(to: address, sessionName: "fence", clientInstance: 9)
        let device = try await old.open("disk")
        let first = Task { try await old.write(device, offset: 0, data: ByteBuffer(repeating: 1, count: 4096)) }
        _ = try await eventually { store.atGate.withLockedValue { $0 } }
        old.closeConnection()
        #expect(try await eventually { service.sessionCount == 1 }, "the server saw the connection end")
        let fence = Task { try await live.fence([old.connectionID]) }
        let fenced = Self.watch(fence)
        try await Task.sleep(for: .milliseconds(300))
        #expect(!fenced.withLockedValue { $0 }, "answered while the ended connection's write was running")
        store.gate.signal()
        try await fence.value
        #expect(store.log.withLockedValue { $0.written } == [0])
        _ = await first.result
        server.shutDown()
        try await io.shutdown()
    }

    /// [R-17.8-4] under any scheduling: an IO admitted after the connection was marked ended
    /// is refused (handlers off the event loop may reach admission late), and one admitted
    /// before keeps the connection reachable (`whenIdle`) until it ends.
    @Test func noIOIsAdmittedOnceTheConnectionHasEnded() async throws {
        let session = BlockSession(name: "s", version: 1, peer: "test", instance: 1, connectionID: 42)
        let device = BlockDevice(name: "disk", path: "/dev/null", store: GatedStore(), metrics: BlockMetrics(export: "disk"))
        let id = try #require(try? session.add(device: device, access: .readWrite, blockSize: 512).get())
        let admitted = session.begin(id: id, bytes: 4096, limits: BlockService.Limits())
        #expect((try? admitted.get()) != nil)
        session.markEnded()
        switch session.begin(id: id, bytes: 4096, limits: BlockService.Limits()) {
        case .success: Issue.record("an IO was admitted after the connection ended")
        case .failure(let e): #expect(e.status == .noSession && e.message.contains("has ended"), "\(e)")
        }
        let idle = NIOLockedValueBox(false)
        session.whenIdle { idle.withLockedValue { $0 = true } }
        #expect(!idle.withLockedValue { $0 }, "idle while an admitted IO runs")
        session.end(id: id, bytes: 4096)
        #expect(idle.withLockedValue { $0 })

        // The same under a race: two threads admit and end IO while a third marks the end
        // and waits for idle. An IO admitted once idle was reported is one admitted after
        // the end (a fence answered by then would not have waited for it). On threads of
        // their own, not Swift's pool; `overlaps` counts the rounds where a thread was still
        // admitting IO when the end came (the race happened).
        let (late, neverIdle, overlaps) = await onOwnThread { () -> ([Int], [Int], Int) in
            var late: [Int] = [], neverIdle: [Int] = [], overlaps = 0
            for round in 0..<200 {
                let session = BlockSession(name: "s", version: 1, peer: "test", instance: 1, connectionID: 42)
                guard let id = try? session.add(device: device, access: .readWrite, blockSize: 512).get() else { return ([], [round], 0) }
                let idle = NIOLockedValueBox(false)
                let lateHere = NIOLockedValueBox(0)
                let raced = NIOLockedValueBox(false)
                let admitting = NIOLockedValueBox(false)
                DispatchQueue.concurrentPerform(iterations: 3) { thread in
                    if thread == 0 {
                        // The end comes while the others admit IO: once one has (on a loaded
                        // machine the three may not start together, and no round raced), then
                        // after a delay that varies by round. Bounded if they never start.
                        var waited = 0
                        while waited < 1_000_000, !admitting.withLockedValue({ $0 }) { waited += 1 }
                        for _ in 0..<(round * 37 % 500) { _ = session.begin(id: UInt32.max, bytes: 0, limits: BlockService.Limits()) }
                        session.markEnded()
                        session.whenIdle { idle.withLockedValue { $0 = true } }
                        return
                    }
                    var admitted = 0
                    for _ in 0..<100_000 {
                        guard case .success = session.begin(id: id, bytes: 4096, limits: BlockService.Limits()) else {
                            if admitted > 0 { raced.withLockedValue { $0 = true } }
                            return
                        }
                        admitted += 1
                        if admitted == 1 { admitting.withLockedValue { $0 = true } }
                        if idle.withLockedValue({ $0 }) { lateHere.withLockedValue { $0 += 1 } }
                        session.end(id: id, bytes: 4096)
                    }
                }
                if lateHere.withLockedValue({ $0 }) > 0 { late.append(round) }
                if !idle.withLockedValue({ $0 }) { neverIdle.append(round) }
                if raced.withLockedValue({ $0 }) { overlaps += 1 }
            }
            return (late, neverIdle, overlaps)
        }
        #expect(late.isEmpty, "rounds \(late): IO admitted after the connection ended and went idle")
        #expect(neverIdle.isEmpty, "rounds \(neverIdle): never idle")
        #expect(overlaps > 0, "no round raced the end against admissions")
    }

    /// What `cutARunningWrite` set up.
    struct CutWrite {
        let scratch: ScratchDirectory
        let store: GatedStore
        let server: ParleyServer
        let io: BlockIOExecutor
        let device: BlockMultipathDevice
        /// The write at offset 0.
        let first: Task<Void, any Error>
    }

    /// A server with two IO threads (`serve`, grabbing), a device open over two paths to it, and a write at offset 0
    /// that the server runs (held at the store's gate) when the server ends the connection
    /// that brought it, as a cut would: the client fences that connection on the other path.
    func cutARunningWrite(fences: Fences, fenceCount: NIOLockedValueBox<Int>? = nil, paths: Int = 2, ioTimeout: Duration) async throws -> CutWrite {
        let scratch = try ScratchDirectory("fence")
        let store = GatedStore()
        let grabbed = NIOLockedValueBox<ParleyConnection?>(nil)
        let (_, server, io, address) = try await self.serve(store, scratch, threads: 2, grab: grabbed, fences: fences, fenceCount: fenceCount)
        var quiet = Logger(label: "fence")
        quiet.logLevel = .critical
        var configuration = BlockMultipathSession.Configuration(sessionName: "fence", paths: Array(repeating: address, count: paths), ioTimeout: ioTimeout)
        // `Io` messages: the grabbing router sees which connection brought the write (DIRECT
        // IO goes straight to the service; `aFenceWaitsForTheRunningWrite...` covers it).
        configuration.direct = false
        let session = try BlockMultipathSession(configuration, logger: quiet)
        let device = try await session.open("disk")
        let first = Task { try await device.write(offset: 0, data: ByteBuffer(repeating: 1, count: 4096)) }
        #expect(try await eventually { store.atGate.withLockedValue { $0 } && grabbed.withLockedValue { $0 } != nil })
        grabbed.withLockedValue { $0 }?.close()
        return CutWrite(scratch: scratch, store: store, server: server, io: io, device: device, first: first)
    }

    /// Waits up to `seconds` for `task` to finish; false if it has not.
    static func finishes<T: Sendable>(_ task: Task<T, any Error>, within seconds: Int) async throws -> Bool {
        let done = NIOLockedValueBox(false)
        Task {
            _ = await task.result
            done.withLockedValue { $0 = true }
        }
        for _ in 0..<(seconds * 20) {
            if done.withLockedValue({ $0 }) { return true }
            try await Task.sleep(for: .milliseconds(50))
        }
        return done.withLockedValue { $0 }
    }

    /// Whether a write at 8192 succeeds within 5 s (tried every 50 ms).
    static func writesAgain(_ device: BlockMultipathDevice) async throws -> Bool {
        for _ in 0..<100 {
            do {
                try await device.write(offset: 8192, data: ByteBuffer(repeating: 3, count: 4096))
                return true
            } catch {
                try await Task.sleep(for: .milliseconds(50))
            }
        }
        return false
    }

    /// Whether `task` ended within `seconds` (false, recorded, if it hangs); it must have
    /// failed `fenceTimedOut` (EIO).
    static func failsForTheFence(_ task: Task<Void, any Error>, within seconds: Int, _ what: String) async throws -> Bool {
        guard try await Self.finishes(task, within: seconds) else {
            Issue.record("\(what) hangs")
            return false
        }
        do {
            try await task.value
            Issue.record("\(what) succeeded while a fence was unanswered")
        } catch let e as BlockMultipathError {
            #expect(e.kind == .fenceTimedOut && e.errno == EIO, "\(e)")
        }
        return true
    }

    /// A path whose connection stays up (keepalives answered) while its server's storage
    /// never finishes a write: with an answer timeout the path is taken down once the write
    /// has waited that long, so the write is in doubt, fenced, and fails within the IO
    /// timeout instead of waiting for ever (docs/protocol.md 17.8 rule 3); the path comes
    /// back, and once the storage finishes the write, writes go again. Without an answer
    /// timeout the path stays up, the write waits, and it is logged once.
    @Test(arguments: [true, false]) func aWriteTheServerNeverFinishes(answerTimeout: Bool) async throws {
        let scratch = try ScratchDirectory("answer")
        let store = GatedStore()
        let (_, server, io, address) = try await self.serve(store, scratch, threads: 2)
        defer {
            store.gate.signal()
            server.shutDown()
        }
        let logs = LogCollector()
        var configuration = BlockMultipathSession.Configuration(sessionName: "answer", paths: [address], ioTimeout: .milliseconds(1500))
        if answerTimeout { configuration.answerTimeout = .milliseconds(500) }
        let session = try BlockMultipathSession(configuration, logger: logs.logger("answer", level: .warning))
        let device = try await session.open("disk")
        let first = Task { try await device.write(offset: 0, data: ByteBuffer(repeating: 1, count: 4096)) }
        #expect(try await eventually { store.atGate.withLockedValue { $0 } })
        let logged = { logs.all.filter { $0.message.contains("has had no answer on this path") }.count }
        if answerTimeout {
            guard try await Self.failsForTheFence(first, within: 10, "the write the server never finishes") else { return }
            #expect(device.status().paths[0].failures >= 1)
            #expect(logs.all.contains { $0.message.contains("path down: write of 4096 bytes at 0 had no answer for") }, "\(logs.all.map(\.message))")
            #expect(try await eventually { device.status().paths[0].state == "up" }, "the path does not come back")
        } else {
            // Logged once it has waited the IO timeout (polled: a loaded machine stretches
            // the watchdog's sleeps), and then kept waiting on the path.
            for _ in 0..<300 where logged() == 0 { try await Task.sleep(for: .milliseconds(100)) }
            try await Task.sleep(for: .seconds(1))
            let path = device.status().paths[0]
            #expect(path.state == "up" && path.failures == 0 && path.inFlight == 1, "\(path)")
            #expect(logged() == 1, "\(logs.all.map(\.message))")
        }
        // The storage finishes the write (its fence is answered): writes go again.
        store.gate.signal()
        if !answerTimeout { try await first.value }
        let wrote = try await Self.writesAgain(device)
        #expect(wrote, "writes still fail after the storage finished")
        let close = Task { try await device.close() }
        guard try await Self.finishes(close, within: 10) else {
            Issue.record("close hangs")
            return
        }
        // (A write may land twice: on a loaded machine one can outlast the answer timeout and
        // go again, which is what the rules allow.)
        #expect(Set(store.log.withLockedValue { $0.written }) == [0, 8192])
        server.shutDown()
        try await io.shutdown()
    }

    /// Storage that never finishes an IO holds a fence for ever: the multipath client fails
    /// the modifications waiting for it after the IO timeout (EIO, not a hang), fails new
    /// ones at once while it is unanswered, goes on reading, and writes again once it is
    /// answered (docs/protocol.md 17.8 rule 4).
    @Test func anUnansweredFenceFailsModificationsAfterTheIOTimeout() async throws {
        // The server's answer to the fence waits for the write, which waits for the gate.
        let cut = try await self.cutARunningWrite(fences: .served, ioTimeout: .seconds(1))
        let (store, server, io, device, first) = (cut.store, cut.server, cut.io, cut.device, cut.first)
        defer {
            store.gate.signal()
            server.shutDown()
        }
        guard try await Self.failsForTheFence(first, within: 10, "the write waiting for the fence") else { return }
        // New modifications fail at once; reads go on.
        let second = Task { try await device.write(offset: 8192, data: ByteBuffer(repeating: 2, count: 4096)) }
        guard try await Self.failsForTheFence(second, within: 2, "a new write while the fence is unanswered") else { return }
        let read = try await device.read(offset: 8192, length: 4096)
        #expect(read.readableBytes == 4096)
        // The running write finishes, the fence is answered: writes go again.
        store.gate.signal()
        let wrote = try await Self.writesAgain(device)
        #expect(wrote, "writes still fail after the fence was answered")
        let close = Task { try await device.close() }
        guard try await Self.finishes(close, within: 10) else {
            Issue.record("close hangs")
            return
        }
        server.shutDown()
        try await io.shutdown()
    }

    /// A server that answers Fence with a Parley ERROR on a live connection refuses it: the
    /// write in doubt goes again unfenced (with a warning), and the fence's path is not taken
    /// for dead (it used to be, and the fence went round the paths for ever).
    @Test func aFenceAnsweredWithAnErrorIsARefusalNotAPathFailure() async throws {
        let cut = try await self.cutARunningWrite(fences: .refused, ioTimeout: .seconds(5))
        let (store, server, io, device, first) = (cut.store, cut.server, cut.io, cut.device, cut.first)
        defer {
            store.gate.signal()
            store.gate.signal()
            server.shutDown()
        }
        // Sent again unfenced: it reaches the store a second time (and waits at the gate too).
        #expect(try await eventually { store.log.withLockedValue { $0.received.filter { $0 == 0 }.count } >= 2 },
                "the write was not sent again after the refused fence")
        store.gate.signal()
        store.gate.signal()
        guard try await Self.finishes(first, within: 10) else {
            Issue.record("the write hangs")
            return
        }
        try await first.value
        let failures = device.status().paths.map(\.failures)
        #expect(failures.reduce(0, +) == 1, "only the cut path failed: \(failures)")
        try await device.close()
        server.shutDown()
        try await io.shutdown()
    }

    /// A Fence answered with an error that says nothing about fencing (here `handlerFailed`)
    /// on a live connection is asked again, not taken for a refusal: the write in doubt is not
    /// sent again until the fence is answered OK, which waits for the running write
    /// (docs/protocol.md 17.8 rule 2).
    @Test func aFenceThatFailsForAnotherReasonIsAskedAgainNotSkipped() async throws {
        let fenceCount = NIOLockedValueBox(0)
        let cut = try await self.cutARunningWrite(fences: .failingFirst(3), fenceCount: fenceCount, ioTimeout: .seconds(20))
        let (store, server) = (cut.store, cut.server)
        defer {
            store.gate.signal()
            store.gate.signal()
            server.shutDown()
        }
        // Asked again past the failures: the fourth reaches the service, which waits for the
        // running write before it answers.
        #expect(try await eventually { fenceCount.withLockedValue { $0 } >= 4 }, "the fence was not asked again")
        try await self.theWriteGoesAgainOnceFenced(cut, pathFailures: 1)
    }

    /// The end of a cut write whose fence is still unanswered: it was not sent again; once
    /// the store lets the running write (and then the re-send) finish, it succeeds, having
    /// been sent again exactly once, with `pathFailures` path failures in all.
    func theWriteGoesAgainOnceFenced(_ cut: CutWrite, pathFailures: Int) async throws {
        let (store, server, io, device, first) = (cut.store, cut.server, cut.io, cut.device, cut.first)
        #expect(store.log.withLockedValue { $0.received.filter { $0 == 0 }.count } == 1,
                "the write in doubt was sent again before its fence was answered")
        store.gate.signal()  // the running write, then the fenced re-send
        store.gate.signal()
        guard try await Self.finishes(first, within: 10) else {
            Issue.record("the write hangs")
            return
        }
        try await first.value
        #expect(store.log.withLockedValue { $0.received.filter { $0 == 0 }.count } == 2, "sent again once, after the fence")
        let failures = device.status().paths.map(\.failures)
        #expect(failures.reduce(0, +) == pathFailures, "path failures: \(failures)")
        try await device.close()
        server.shutDown()
        try await io.shutdown()
    }

    /// A Fence being asked again whose path dies goes on another path (the loop on the dead
    /// one stops), and the write in doubt still waits for it.
    @Test func aFenceAskedAgainMovesWhenItsPathDies() async throws {
        let failing = NIOLockedValueBox(true)
        let carrier = NIOLockedValueBox<ParleyConnection?>(nil)
        let fenceCount = NIOLockedValueBox(0)
        let cut = try await self.cutARunningWrite(fences: .failingWhile(failing, carrier: carrier), fenceCount: fenceCount, paths: 3,
                                                  ioTimeout: .seconds(20))
        let (store, server) = (cut.store, cut.server)
        defer {
            store.gate.signal()
            store.gate.signal()
            server.shutDown()
        }
        #expect(try await eventually { fenceCount.withLockedValue { $0 } >= 2 }, "the fence was not asked again")
        let asked = fenceCount.withLockedValue { $0 }
        carrier.withLockedValue { $0 }?.close()  // the path the fence is asked on dies
        failing.withLockedValue { $0 = false }
        #expect(try await eventually { fenceCount.withLockedValue { $0 } > asked }, "the fence did not go on another path")
        try await self.theWriteGoesAgainOnceFenced(cut, pathFailures: 2)
    }

    /// How a failed Fence is taken (docs/protocol.md 17.8 rule 4).
    @Test func aFailedFenceIsClassifiedByWhatItSays() {
        typealias F = BlockMultipathDevice.FenceFailure
        let parley: [(ParleyError.Code, F)] = [
            (.unknownMessageType, .refused), (.permissionDenied, .refused), (.invalidArgument, .refused),
            (.handlerFailed, .again), (.unspecified, .again), (ParleyError.Code(rawValue: 999), .again), (.protocolViolation, .again),
            (.shuttingDown, .pathFailed), (.cancelled, .pathFailed), (.timeout, .pathFailed), (.connectionClosed, .pathFailed),
            (.sessionReset, .pathFailed), (.sessionSuperseded, .pathFailed),
        ]
        for (code, expected) in parley {
            let e = ParleyError(code: code, message: "test")
            #expect(BlockMultipathDevice.fenceFailure(e, connectionEnded: false) == expected, "\(code)")
            #expect(BlockMultipathDevice.fenceFailure(e, connectionEnded: true) == .pathFailed, "\(code) after the end")
        }
        let block: [(Parley_Block_V1_BlockStatus, F)] = [
            (.invalid, .refused), (.readOnly, .refused), (.ioError, .refused),
            (.shuttingDown, .pathFailed), (.noSession, .pathFailed), (.fenced, .pathFailed), (.unknownDevice, .pathFailed),
        ]
        for (status, expected) in block {
            #expect(BlockMultipathDevice.fenceFailure(BlockError(status, "test"), connectionEnded: false) == expected, "\(status)")
        }
        struct Other: Error {}
        #expect(BlockMultipathDevice.fenceFailure(Other(), connectionEnded: false) == .pathFailed)
    }

    /// How an IO's answer is taken (docs/protocol.md 17.8 rule 2), by any sender of IO on a
    /// path: statuses and errors that fail the path send the IO again elsewhere (no result),
    /// the server's other refusals reach the caller with their reason.
    @Test func anIOAnswerIsClassifiedByWhatItSays() {
        let io = MultipathIOState.IO(.write, offset: 4096, length: 512)
        func outcome(_ answer: Result<ByteBufferPieces?, any Error>, ended: Bool = false) -> (MultipathIOState.Outcome, Result<ByteBufferPieces?, BlockMultipathError>?) {
            BlockMultipathDevice.outcome(of: answer, io: io, device: "dev", connectionEnded: ended)
        }
        let data = ByteBufferPieces(ByteBuffer(bytes: [1, 2, 3]))
        let done = outcome(.success(data))
        #expect(done.0 == .done)
        if case .success(let d)? = done.1 { #expect(d?.gathered() == ByteBuffer(bytes: [1, 2, 3])) } else { Issue.record("no data with done") }
        for status in [Parley_Block_V1_BlockStatus.shuttingDown, .noSession, .fenced, .unknownDevice] {
            let o = outcome(.failure(BlockError(status, "test")))
            #expect(o.0 == .pathFailed && o.1 == nil, "\(status)")
        }
        for status in [Parley_Block_V1_BlockStatus.invalid, .readOnly, .ioError, .tooLarge, .busySession] {
            let o = outcome(.failure(BlockError(status, "no space")))
            #expect(o.0 == .refused, "\(status)")
            guard case .failure(let e)? = o.1 else { Issue.record("\(status): no reason for the caller"); continue }
            #expect(e.message.contains("512 bytes at 4096 on dev") && e.message.contains("no space"), "\(e.message)")
        }
        let refusal = outcome(.failure(ParleyError(code: .invalidArgument, message: "bad")))
        #expect(refusal.0 == .refused)
        #expect(outcome(.failure(ParleyError(code: .invalidArgument, message: "bad")), ended: true).0 == .pathFailed)
        #expect(outcome(.failure(ParleyError(code: .connectionClosed, message: "gone"))).0 == .pathFailed)
        struct Other: Error {}
        #expect(outcome(.failure(Other())).0 == .pathFailed)
    }

    /// A flag set once `task` has finished.
    static func watch(_ task: Task<Void, any Error>) -> NIOLockedValueBox<Bool> {
        let done = NIOLockedValueBox(false)
        Task {
            _ = await task.result
            done.withLockedValue { $0 = true }
        }
        return done
    }

    @Test func aQueuedWriteOfAnEndedConnectionIsDropped() async throws {
        let scratch = try ScratchDirectory("fence")
        try scratch.sparseFile("disk.img", size: 1 << 20)
        let store = GatedStore()
        let io = BlockIOExecutor(threads: 1)  // one IO thread: the second write queues behind the first
        var quiet = Logger(label: "fence")
        quiet.logLevel = .critical
        let service = BlockService(catalog: try BlockExportCatalog(exports: [BlockExportSpec(name: "disk", path: scratch.file("disk.img"))]),
                                   devices: BlockDeviceTable(openStore: { _, _ in store }), io: io, logger: quiet)
        let server = ParleyServer(configuration: .init(listen: [.unix(path: scratch.file("block.sock"))]), router: service.router(), logger: quiet)
        let running = Task { try await server.run() }
        defer {
            store.gate.signal()
            server.shutDown()
        }
        let address = try await server.listeningAddresses[0]
        let client = try await BlockClient.connect(to: address, sessionName: "fence", logger: quiet)
        let device = try await client.open("disk")
        let first = Task { try await client.write(device, offset: 0, data: ByteBuffer(repeating: 1, count: 4096)) }
        // The second write is sent only once the first has arrived: two tasks started together
        // may send in either order, and when the write at 4096 went first it took the IO
        // thread and was carried out (a CI run on 2026-12-01 failed so).
        #expect(try await eventually { store.log.withLockedValue { $0.received.contains(0) } })
        let second = Task { try await client.write(device, offset: 4096, data: ByteBuffer(repeating: 2, count: 4096)) }
        // Both received: the first holds the only IO thread, the second waits for it.
        #expect(try await eventually { store.log.withLockedValue { $0.received.count } == 2 })
        // Received is not started: the first write may still be on its way to the IO thread,
        // and would then be dropped as well (it failed so in one run of four on 2026-12-01).
        _ = try await eventually { store.atGate.withLockedValue { $0 } }
        client.closeConnection()
        #expect(try await eventually { service.sessionCount == 0 }, "the server saw the connection end")
        store.gate.signal()
        // A job queued after both has run: the second write's turn has come and gone.
        try await io.run(on: MultiThreadedEventLoopGroup.singleton.next()) {}.get()
        #expect(store.log.withLockedValue { $0.written } == [0], "the started write completes, the waiting one is dropped")
        _ = await first.result
        _ = await second.result
        server.shutDown()
        _ = try? await running.value
        try await io.shutdown()
    }
}
