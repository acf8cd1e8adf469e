import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Parley
@testable import ParleyBlock
import ParleyTestSupport
import Testing

/// Closing a multipath device (what `parley block unmap` ends with) does not wait for ever on
/// a server that never answers Close: each path's Close has the IO timeout, all at once, and
/// the connections go either way.
@Suite(.timeLimit(.minutes(1)))
struct BlockMultipathCloseTests {
    /// A block server on a Unix socket in `scratch` exporting a 1 MiB "disk" (its store
    /// `store`, a file by default), its router as `adjust` leaves it; stopped, IO threads
    /// and all, when `body` returns.
    func withServer(_ name: String, store: (any BlockStore)? = nil, limits: BlockService.Limits = .init(),
                    adjust: (inout ParleyRouter) -> Void = { _ in },
                    _ body: (ParleyAddress, Logger) async throws -> Void) async throws {
        let scratch = try ScratchDirectory(name)
        try scratch.sparseFile("disk.img", size: 1 << 20)
        let io = BlockIOExecutor(threads: 1)
        var quiet = Logger(label: name)
        quiet.logLevel = .critical
        let devices = store.map { s in BlockDeviceTable(openStore: { _, _ in s }) } ?? BlockDeviceTable()
        let service = BlockService(catalog: try BlockExportCatalog(exports: [BlockExportSpec(name: "disk", path: scratch.file("disk.img"))]),
                                   devices: devices, io: io, limits: limits, logger: quiet)
        var router = service.router()
        adjust(&router)
        let server = ParleyServer(configuration: .init(listen: [.unix(path: scratch.file("block.sock"))]), router: router, logger: quiet)
        Task { try await server.run() }
        do {
            try await body(try await server.listeningAddresses[0], quiet)
        } catch {
            server.shutDown()
            try? await io.shutdown()
            throw error
        }
        server.shutDown()
        try? await io.shutdown()
    }

    @Test func aCloseTheServerNeverAnswersDoesNotHoldTheUnmap() async throws {
        let closes = NIOLockedValueBox(0)
        try await self.withServer("close", store: GatedStore(), adjust: { router in
            router.on(Parley_Block_V1_Close.self) { _, _ async throws -> Parley_Block_V1_CloseReply in
                closes.withLockedValue { $0 += 1 }
                try await Task.sleep(for: .seconds(3600))
                return Parley_Block_V1_CloseReply()
            }
        }) { address, quiet in
            let session = try BlockMultipathSession(.init(sessionName: "close", paths: [address, address], ioTimeout: .seconds(1)), logger: quiet)
            let device = try await session.open("disk", access: .readOnly)
            let closing = Task { try await device.close() }
            let done = NIOLockedValueBox(false)
            Task {
                _ = await closing.result
                done.withLockedValue { $0 = true }
            }
            var finished = false
            for _ in 0..<300 where !finished {
                finished = done.withLockedValue { $0 }
                if !finished { try await Task.sleep(for: .milliseconds(50)) }
            }
            #expect(finished, "the close still waits after 15 s for Closes the server never answers")
            #expect(closes.withLockedValue { $0 } == 2, "a Close on each path")
            if finished { try await closing.value } else { closing.cancel() }
        }
    }

    /// A connection keeps at most `maxOpenDevices` devices open: an Open past it is refused
    /// BLOCK_STATUS_BUSY_SESSION (a client looping Open without Close grew the server's
    /// memory without bound); after a Close there is room again.
    @Test func opensPastTheLimitAreRefused() async throws {
        var limits = BlockService.Limits()
        limits.maxOpenDevices = 3
        try await self.withServer("opens", limits: limits) { address, _ in
            let client = try await BlockClient.connect(to: address, sessionName: "opens")
            var devices: [BlockClient.Device] = []
            for _ in 0..<3 { devices.append(try await client.open("disk", access: .readOnly)) }
            do {
                _ = try await client.open("disk", access: .readOnly)
                Issue.record("a fourth open was accepted")
            } catch let error as BlockError {
                #expect(error.status == .busySession && error.message.contains("3 devices open"), "\(error)")
            }
            try await client.close(devices[0])
            _ = try await client.open("disk", access: .readOnly)
            // Another connection has its own.
            let other = try await BlockClient.connect(to: address, sessionName: "opens")
            _ = try await other.open("disk", access: .readOnly)
            client.closeConnection()
            other.closeConnection()
        }
    }
}
