import Foundation
import NIOCore
import Parley
@testable import ParleyConformance
import ParleyServices
import ParleyWire
import Testing

/// The conformance tool's own session helpers: what bounds its waits, and what it takes for a
/// connection that ended with CLOSE.
@Suite struct ConformanceSessionTests {
    /// A server that sends KEEPALIVEs often and answers late: the wait for an answer ends at
    /// its timeout (a failure), not when the answer finally comes (before, every KEEPALIVE
    /// started the wait again, so a server that never answered hung the check).
    @Test func waitingForAnAnswerEndsAtTheTimeoutWhateverKeepalivesCome() async throws {
        let limits = ParleyConnectionLimits(keepaliveInterval: .milliseconds(50), keepaliveTimeout: .seconds(30))
        try await withServer(configure: { $0.limits = limits }) { _, addresses in
            let context = CheckContext(
                target: ConformanceTarget(address: addresses[0]), timeout: .milliseconds(600),
                serverBanner: Banner(supported: []), serverLimit: Frame.defaultMaxFrameSize, hasEcho: true
            )
            let session = try await ClientSession.open(context: context)
            defer { session.peer.close() }
            var sleep = Parley_Echo_V1_Sleep()
            sleep.delayMs = 8_000
            let id = try await session.request(Parley_Echo_V1_Sleep.protoMessageName, sleep.parleyPayload())
            let failure = await #expect(throws: CheckFailure.self) { _ = try await session.answer(id) }
            #expect(failure?.expected == "the answer to request \(id)", "\(String(describing: failure))")
            #expect(session.controls.contains { $0.tag == .keepalive }, "the server did send KEEPALIVEs meanwhile")
        }
    }

    /// The CLOSE must be the last frame: a server that goes on sending after it fails.
    @Test func aFrameAfterTheCloseIsAFailure() throws {
        var status = Parley_V1_Status()
        status.code = ParleyError.Code.protocolViolation.rawValue
        let close = status.frame(tag: .close)
        let after = Frame(tag: .keepaliveAck, segments: [ByteBuffer(bytes: [0, 0, 0, 0, 0, 0, 0, 1])])
        #expect(throws: Never.self) { try expectCloseFrame(.protocolViolation, because: "a test", in: ([close], true)) }
        #expect(throws: CheckFailure.self) { try expectCloseFrame(.protocolViolation, because: "a test", in: ([close, after], true)) }
        #expect(throws: CheckFailure.self) { try expectCloseFrame(.protocolViolation, because: "a test", in: ([close], false)) }
        #expect(throws: CheckFailure.self) { try expectCloseFrame(.malformedPayload, because: "a test", in: ([close], true)) }
    }

    /// A server with the smallest frame limit allowed (65536, R-4.5-1) passes the checks that
    /// send large requests: they size them from its limit (before, both sent more than it
    /// takes, and a correct server's frameTooLarge was reported as its failure).
    @Test func aServerWithTheSmallestFrameLimitPassesTheChecksOfLargeRequests() async throws {
        try await withServer(configure: { $0.maxFrameSize = 65_536 }) { _, addresses in
            let report = try await ConformanceRunner(target: ConformanceTarget(address: addresses[0]), only: ["R-4.5-1", "R-4.5-2", "R-7.15-2"]).run()
            #expect(report.results.map(\.status) == [.pass, .pass, .pass], "\(report.results.map { "\($0.line) \($0.expected ?? "") / \($0.seen ?? "")" })")
        }
    }
}
