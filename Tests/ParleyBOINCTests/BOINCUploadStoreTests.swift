import Crypto
import Dispatch
import Foundation
import NIOConcurrencyHelpers
import NIOPosix
import Testing
@testable import ParleyWorkBOINC
#if canImport(Glibc)
import Glibc
import ParleyTestSupport
#endif

/// The upload store's file work runs on a blocking pool with a lock per file: a call stuck
/// on one file (a slow disk; here held by the test) holds up no other file.
@Suite(.timeLimit(.minutes(2)))
struct BOINCUploadStoreTests {
    /// Polls `condition` (bounded: 2,000 tries, 5 ms apart).
    func eventually(_ condition: () -> Bool) async throws -> Bool {
        for _ in 0..<2000 {
            if condition() { return true }
            try await Task.sleep(for: .milliseconds(5))
        }
        return condition()
    }

    @Test func aCallStuckOnOneFileHoldsUpNoOther() async throws {
        let directory = testScratchPath("boinc-uploads-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let pool = NIOThreadPool(numberOfThreads: 2)
        pool.start()
        let gate = DispatchSemaphore(value: 0)
        let stuckNow = NIOLockedValueBox(false)
        let uploads = try BOINCUploadStore(directory: directory, pool: pool, holding: { name in
            guard name == "stuck_0" else { return }
            stuckNow.withLockedValue { $0 = true }
            gate.wait()
        })
        defer { gate.signal() }
        let stuck = Task { try await uploads.read("stuck_0", limit: 100) }
        #expect(try await self.eventually { stuckNow.withLockedValue { $0 } })
        let bytes = Array("output of another job".utf8)
        let md5 = Insecure.MD5.hash(data: bytes).map { String(format: "%02x", $0) }.joined()
        let done = NIOLockedValueBox(false)
        let other = Task {
            let result = try await uploads.write("other_0", offset: 0, data: bytes, total: Int64(bytes.count), md5: md5)
            done.withLockedValue { $0 = true }
            return result
        }
        #expect(try await self.eventually { done.withLockedValue { $0 } }, "another file was stored while the first call was stuck")
        gate.signal()
        #expect(try await stuck.value == nil, "no such upload")
        let stored = try await other.value
        #expect((try? stored.get()) != nil, "\(stored)")
        #expect(try await uploads.read("other_0", limit: 100) == bytes)
        #expect(try await uploads.size("other_0") == Int64(bytes.count))
        try await uploads.remove(prefix: "other")
        #expect(try await uploads.size("other_0") == 0)
        try await pool.shutdownGracefully()
    }
}
