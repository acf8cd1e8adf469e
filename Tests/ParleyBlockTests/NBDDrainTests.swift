import Foundation
import Logging
import MetricsTestKit
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Parley
@testable import ParleyBlock
import ParleyTestSupport
import Testing

/// The NBD server shutting down (an unmap, `parley block serve` stopping): what is in flight
/// finishes and is answered, requests that still arrive are answered NBD_ESHUTDOWN (the NBD
/// document: a server SHOULD), and the connection then closes.
@Suite(.timeLimit(.minutes(2)))
struct NBDDrainTests {
    /// Used from one thread at a time: the test's, then each `onThread` in turn.
    struct Handed: @unchecked Sendable { let nbd: RawNBD }

    /// An NBD server of `store` as export "disk" on a Unix socket (IO threads: 2, so that
    /// the store's gate holds one), and a client connected to it.
    func serve(_ store: GatedStore, readOnly: Bool, scratch: ScratchDirectory, metrics: TestMetrics? = nil) async throws
        -> (NBDServer, BlockIOExecutor, MultiThreadedEventLoopGroup, socket: String, Handed) {
        var quiet = Logger(label: "nbd-drain")
        quiet.logLevel = .critical
        let io = BlockIOExecutor(threads: 2)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let catalog = try BlockExportCatalog(exports: [BlockExportSpec(name: "disk", path: "/", readOnly: readOnly)])
        let nbd = NBDServer(catalog: catalog, devices: BlockDeviceTable(openStore: { _, _ in store }, metricsFactory: metrics), io: io, logger: quiet, group: group)
        let socket = scratch.file("nbd.sock")
        _ = try await nbd.bind([.unix(path: socket)])
        let (raw, go, message) = try RawNBD.connect(try RawSocket(unixPath: socket), export: "disk")
        #expect(go == 1, "\(message)")
        return (nbd, io, group, socket, Handed(nbd: raw))
    }

    @Test func requestsArrivingWhileTheServerDrainsAreAnsweredShutdown() async throws {
        let scratch = try ScratchDirectory("nbd-drain")
        let store = GatedStore()
        let metrics = TestMetrics()
        let (nbd, io, group, _, handed) = try await self.serve(store, readOnly: false, scratch: scratch, metrics: metrics)
        defer { store.gate.signal() }
        let client = handed.nbd
        // A write that waits on an IO thread until the test opens the gate.
        client.request(type: 1, cookie: 1, offset: 0, length: 512, payload: [UInt8](repeating: 7, count: 512))
        #expect(try await eventually { store.atGate.withLockedValue { $0 } })
        let shutdown = Task { await nbd.shutDown() }
        // Reads until one is answered NBD_ESHUTDOWN (those before the drain reached the
        // connection are served): bounded in count.
        var shut = false, served = 0
        for cookie in UInt64(2)..<202 where !shut {
            let answer = try await BlockSlowOpenTests.onThread { () throws -> (error: UInt32, cookie: UInt64, data: [UInt8]) in
                handed.nbd.request(type: 0, cookie: cookie, offset: 4096, length: 512)
                return try handed.nbd.simpleReply { $0 == cookie ? 512 : 0 }
            }.get()
            #expect(answer.cookie == cookie)
            if answer.error == 108 { shut = true } else {
                #expect(answer.error == 0)
                served += 1
                try await Task.sleep(for: .milliseconds(20))
            }
        }
        #expect(shut, "no request was answered NBD_ESHUTDOWN while the server drained")
        // The refused read counts as a failed read; the served ones do not.
        let dimensions = [("export", "disk"), ("op", "read")]
        let errors = try metrics.expectCounter("parley_block_errors_total", dimensions).totalValue
        let reads = try metrics.expectCounter("parley_block_ops_total", dimensions).totalValue
        #expect(errors == 1 && reads == Int64(served + 1), "errors \(errors), reads \(reads), served \(served)")
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
        let store = GatedStore(gatesReads: true)
        let (nbd, io, group, socket, handed) = try await self.serve(store, readOnly: true, scratch: scratch)
        defer { store.gate.signal() }
        handed.nbd.request(type: 0, cookie: 1, offset: 0, length: 512)
        #expect(try await eventually { store.atGate.withLockedValue { $0 } })
        let shutdown = Task { await nbd.shutDown() }
        // The listener closes (its socket file goes) before the drain is sent to the
        // connections; then one event-loop hop.
        #expect(try await eventually { !FileManager.default.fileExists(atPath: socket) })
        try await Task.sleep(for: .milliseconds(100))
        store.gate.signal()
        let answer = try await BlockSlowOpenTests.onThread { try handed.nbd.simpleReply(readLength: 512) }.get()
        #expect(answer.cookie == 1 && answer.error == 0 && answer.data == [UInt8](repeating: 0, count: 512))
        let closed = try await BlockSlowOpenTests.onThread { handed.nbd.socket.waitForClose() }.get()
        #expect(closed)
        await shutdown.value
        try await io.shutdown()
        try await group.shutdownGracefully()
    }
}
