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
    @Test func aCloseTheServerNeverAnswersDoesNotHoldTheUnmap() async throws {
        let scratch = try ScratchDirectory("close")
        try scratch.sparseFile("disk.img", size: 1 << 20)
        let io = BlockIOExecutor(threads: 1)
        var quiet = Logger(label: "close")
        quiet.logLevel = .critical
        let service = BlockService(catalog: try BlockExportCatalog(exports: [BlockExportSpec(name: "disk", path: scratch.file("disk.img"))]),
                                   devices: BlockDeviceTable(openStore: { _, _ in GatedStore() }), io: io, logger: quiet)
        var router = service.router()
        let closes = NIOLockedValueBox(0)
        router.on(Parley_Block_V1_Close.self) { _, _ async throws -> Parley_Block_V1_CloseReply in
            closes.withLockedValue { $0 += 1 }
            try await Task.sleep(for: .seconds(3600))
            return Parley_Block_V1_CloseReply()
        }
        let server = ParleyServer(configuration: .init(listen: [.unix(path: scratch.file("block.sock"))]), router: router, logger: quiet)
        Task { try await server.run() }
        defer { server.shutDown() }
        let address = try await server.listeningAddresses[0]
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
