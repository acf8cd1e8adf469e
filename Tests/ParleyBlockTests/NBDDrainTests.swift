import Dispatch
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Parley
@testable import ParleyBlock
import ParleyTestSupport
import Testing

/// A store whose blocking read at offset 0 waits for the test.
final class GatedReadStore: BlockStore {
    let geometry = BlockGeometry(size: 1 << 20)
    let gate = DispatchSemaphore(value: 0)
    let atGate = NIOLockedValueBox(false)

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, nowait: Bool) throws(BlockStoreError) -> Bool {
        if nowait { return false }
        if offset == 0 {
            self.atGate.withLockedValue { $0 = true }
            self.gate.wait()
        }
        buffer.initializeMemory(as: UInt8.self, repeating: 0x5a)
        return true
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64, durable: Bool, nowait: Bool) throws(BlockStoreError) -> Bool { true }
    func flush() throws(BlockStoreError) {}
    func discard(offset: UInt64, length: UInt64) throws(BlockStoreError) {}
    func writeZeroes(offset: UInt64, length: UInt64, mayDeallocate: Bool, fast: Bool) throws(BlockStoreError) {}
    func prefetch(offset: UInt64, length: UInt64) {}
    func extents(offset: UInt64, length: UInt64) throws(BlockStoreError) -> [BlockExtent] { [] }
    func close() {}
}

/// The NBD server shutting down (an unmap, `parley block serve` stopping): what is in flight
/// finishes and is answered, requests that still arrive are answered NBD_ESHUTDOWN (the NBD
/// document: a server SHOULD), and the connection then closes.
@Suite(.timeLimit(.minutes(2)))
struct NBDDrainTests {
    @Test func requestsArrivingWhileTheServerDrainsAreAnsweredShutdown() async throws {
        let scratch = try ScratchDirectory("nbd-drain")
        let store = GatedStore()
        var quiet = Logger(label: "nbd-drain")
        quiet.logLevel = .critical
        let io = BlockIOExecutor(threads: 2)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let catalog = try BlockExportCatalog(exports: [BlockExportSpec(name: "disk", path: "/")])
        let nbd = NBDServer(catalog: catalog, devices: BlockDeviceTable(openStore: { _, _ in store }), io: io, logger: quiet, group: group)
        let socket = scratch.file("nbd.sock")
        _ = try await nbd.bind([.unix(path: socket)])
        defer { store.gate.signal() }

        let (raw, go, message) = try RawNBD.connect(try RawSocket(unixPath: socket), export: "disk")
        #expect(go == 1, "\(message)")
        // Used from one thread at a time: the test's, then each `onThread` in turn.
        struct Handed: @unchecked Sendable { let nbd: RawNBD }
        let handed = Handed(nbd: raw)
        let client = handed.nbd
        // A write that waits on an IO thread until the test opens the gate.
        client.request(type: 1, cookie: 1, offset: 0, length: 512, payload: [UInt8](repeating: 7, count: 512))
        #expect(try await eventually { store.atGate.withLockedValue { $0 } })
        let shutdown = Task { await nbd.shutDown() }
        // Reads until one is answered NBD_ESHUTDOWN (those before the drain reached the
        // connection are served): bounded in count.
        var shut = false
        for cookie in UInt64(2)..<202 where !shut {
            let answer = try await BlockSlowOpenTests.onThread { () throws -> (error: UInt32, cookie: UInt64, data: [UInt8]) in
                handed.nbd.request(type: 0, cookie: cookie, offset: 4096, length: 512)
                return try handed.nbd.simpleReply { $0 == cookie ? 512 : 0 }
            }.get()
            #expect(answer.cookie == cookie)
            if answer.error == 108 { shut = true } else {
                #expect(answer.error == 0)
                try await Task.sleep(for: .milliseconds(20))
            }
        }
        #expect(shut, "no request was answered NBD_ESHUTDOWN while the server drained")
        // The write in flight is still carried out and answered; then the connection closes.
        store.gate.signal()
        let write = try await BlockSlowOpenTests.onThread { try handed.nbd.simpleReply() }.get()
        #expect(write.cookie == 1 && write.error == 0)
        #expect(store.log.withLockedValue { $0.written } == [0])
        let closed = try await BlockSlowOpenTests.onThread { handed.nbd.socket.waitForClose() }.get()
        #expect(closed, "the connection closes once what was in flight is done")
        await shutdown.value
        try await io.shutdown()
        try await group.shutdownGracefully()
    }

    /// A read-only export (nothing to flush at the end): a read still in flight when the
    /// drain starts is answered before the connection closes, not dropped with the close
    /// (its reply, completed outside a read burst, had only a flush queued).
    @Test func aReadInFlightDuringTheDrainIsAnsweredBeforeTheClose() async throws {
        let scratch = try ScratchDirectory("nbd-drain-ro")
        let store = GatedReadStore()
        var quiet = Logger(label: "nbd-drain")
        quiet.logLevel = .critical
        let io = BlockIOExecutor(threads: 2)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let catalog = try BlockExportCatalog(exports: [BlockExportSpec(name: "disk", path: "/", readOnly: true)])
        let nbd = NBDServer(catalog: catalog, devices: BlockDeviceTable(openStore: { _, _ in store }), io: io, logger: quiet, group: group)
        let socket = scratch.file("nbd.sock")
        _ = try await nbd.bind([.unix(path: socket)])
        defer { store.gate.signal() }
        let (raw, go, message) = try RawNBD.connect(try RawSocket(unixPath: socket), export: "disk")
        #expect(go == 1, "\(message)")
        struct Handed: @unchecked Sendable { let nbd: RawNBD }
        let handed = Handed(nbd: raw)
        handed.nbd.request(type: 0, cookie: 1, offset: 0, length: 512)
        #expect(try await eventually { store.atGate.withLockedValue { $0 } })
        let shutdown = Task { await nbd.shutDown() }
        // The listener closes (its socket file goes) before the drain is sent to the
        // connections; then one event-loop hop.
        #expect(try await eventually { !FileManager.default.fileExists(atPath: socket) })
        try await Task.sleep(for: .milliseconds(100))
        store.gate.signal()
        let answer = try await BlockSlowOpenTests.onThread { try handed.nbd.simpleReply(readLength: 512) }.get()
        #expect(answer.cookie == 1 && answer.error == 0 && answer.data == [UInt8](repeating: 0x5a, count: 512))
        let closed = try await BlockSlowOpenTests.onThread { handed.nbd.socket.waitForClose() }.get()
        #expect(closed)
        await shutdown.value
        try await io.shutdown()
        try await group.shutdownGracefully()
    }
}
