import NIOCore
import Parley
import ParleyServices
import Testing

/// The echo service's grant of DIRECT frames (docs/protocol.md section 12), beyond what
/// `parley conform` checks: the refusals of `EnableDirect`, and answers after the delay.
@Suite(.timeLimit(.minutes(1)))
struct EchoDirectTests {
    /// A delay over the service's limit, and a second grant on one connection, are answered
    /// ERROR invalidArgument; the first grant stays in force.
    @Test func enableDirectRefusesALongDelayAndASecondGrant() async throws {
        try await withServer { _, addresses in
            let client = try await ParleyClient.connect(to: addresses[0], logger: quietLogger)
            defer { client.close() }
            var tooLong = Parley_Echo_V1_EnableDirect()
            tooLong.delayMs = EchoService.maxDirectDelayMs + 1
            let long = await #expect(throws: ParleyError.self) { _ = try await client.request(tooLong, as: Parley_Echo_V1_DirectGranted.self) }
            #expect(long?.code == .invalidArgument && long?.message.contains("10000") == true, "\(String(describing: long))")
            var grant = Parley_Echo_V1_EnableDirect()
            grant.delayMs = 50
            #expect(try await client.request(grant, as: Parley_Echo_V1_DirectGranted.self).delayMs == 50)
            let again = await #expect(throws: ParleyError.self) { _ = try await client.request(grant, as: Parley_Echo_V1_DirectGranted.self) }
            #expect(again?.code == .invalidArgument && again?.message.contains("already enabled") == true, "\(String(describing: again))")
            // The first grant holds: a DIRECT request is echoed, no sooner than its delay.
            let connection = client.connection
            var frame = DirectFrame(allocator: connection.channelAllocator, headerLength: 3, dataLength: 5)
            frame.setHeader(UInt8(7), at: DirectFrame.idSize + 2)
            frame.writeData(ByteBuffer(bytes: [1, 2, 3, 4, 5]))
            let sent = ContinuousClock.now
            let result = await withCheckedContinuation { c in connection.sendDirect(frame) { c.resume(returning: $0.map { $0.frame }) } }
            let waited = ContinuousClock.now - sent
            guard case .success(let answer) = result else {
                Issue.record("the DIRECT request failed: \(result)")
                return
            }
            #expect(Array(answer.segments[0].readableBytesView.dropFirst(DirectFrame.idSize)) == [0, 0, 7])
            #expect(answer.segments.count == 2 && Array(answer.segments[1].readableBytesView) == [1, 2, 3, 4, 5])
            #expect(waited >= .milliseconds(50), "answered after \(waited), before the grant's delay")
        }
    }
}
