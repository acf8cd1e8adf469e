import Foundation
import NIOConcurrencyHelpers
import Parley
import ParleyChaos
import ParleyServices
import Testing

/// The fault proxy's plan (pure) and the proxy itself between a real client and server.
@Suite(.timeLimit(.minutes(10))) struct ChaosPlanTests {
    @Test func transparentPlanPassesChunksWhole() {
        var plan = ChaosPlan(settings: .init(), seed: 1)
        #expect(plan.settings.isTransparent)
        #expect(plan.plan(1000) == .init(pieces: [.init(offset: 0, length: 1000, delayMilliseconds: 0)], cut: false))
        #expect(plan.passed == 1000)
    }

    @Test func fragmentsCoverTheChunkInOrderWithinTheLimit() {
        var plan = ChaosPlan(settings: .init(fragment: 7), seed: 42)
        for size in [1, 7, 8, 1000, 65536] {
            let step = plan.plan(size)
            #expect(!step.cut)
            #expect(step.pieces.allSatisfy { (1...7).contains($0.length) })
            var offset = 0
            for piece in step.pieces {
                #expect(piece.offset == offset)
                offset += piece.length
            }
            #expect(offset == size)
        }
    }

    @Test func cutAfterBytesCutsAtExactlyThatByteAcrossChunks() {
        var plan = ChaosPlan(settings: .init(cutAfterBytes: 250), seed: 1)
        #expect(!plan.plan(100).cut)
        #expect(!plan.plan(100).cut)
        let step = plan.plan(100)
        #expect(step.cut && step.bytesBeforeCut == 50)
    }

    @Test func theSameSeedGivesTheSameFaults() {
        let settings = ChaosPlan.Settings(cutProbability: 0.05, fragment: 13, jitterMilliseconds: 5)
        func run(_ seed: UInt64) -> [ChaosPlan.Step] {
            var plan = ChaosPlan(settings: settings, seed: seed)
            return (0..<200).map { _ in plan.plan(500) }
        }
        #expect(run(9) == run(9))
        #expect(run(9) != run(10))
        #expect(run(9).contains { $0.cut }, "a 5% cut probability cuts within 200 chunks")
    }

    @Test func aStallDelaysThePieceThatCrossesTheMarkOnce() {
        var plan = ChaosPlan(settings: .init(stallAfterBytes: 150, stallMilliseconds: 500), seed: 1)
        let first = plan.plan(100)
        #expect(first.pieces.map(\.delayMilliseconds) == [0])
        let second = plan.plan(100)
        #expect(second.pieces == [.init(offset: 0, length: 50, delayMilliseconds: 0), .init(offset: 50, length: 50, delayMilliseconds: 500)])
        #expect(plan.plan(100).pieces.map(\.delayMilliseconds) == [0])
    }

    @Test func aRateGivesEachPieceTheTimeItsBytesTake() {
        var whole = ChaosPlan(settings: .init(rateBytesPerSecond: 1_000_000), seed: 1)
        #expect(whole.plan(5000).pieces == [.init(offset: 0, length: 5000, delayMilliseconds: 0, transmitNanoseconds: 5_000_000)])
        // Fragmented, the pieces together take what their bytes take: what each leaves over
        // when rounded down to nanoseconds is carried, across chunks too (at 3 bytes/s, a
        // byte takes 333,333,333.3 ns; at 3 GB/s, 0.33 ns: alone, each would be 0).
        for rate in [3, 3_000_000_000] {
            var split = ChaosPlan(settings: .init(fragment: 100, rateBytesPerSecond: rate), seed: 7)
            let pieces = split.plan(10_000).pieces + split.plan(5_000).pieces
            #expect(pieces.count > 2)
            #expect(pieces.reduce(0) { $0 + $1.transmitNanoseconds } == Int64(15_000) * 1_000_000_000 / Int64(rate))
        }
        #expect(!ChaosPlan.Settings(rateBytesPerSecond: 1).isTransparent)
        var free = ChaosPlan(settings: .init(), seed: 1)
        #expect(free.plan(5000).pieces.map(\.transmitNanoseconds) == [0])
    }
}

@Suite(.timeLimit(.minutes(10))) struct ChaosProxyTests {
    @Test func requestsGetThroughFragmentedAndDelayedBytes() async throws {
        try await withServer { _, addresses in
            let proxy = ChaosProxy(configuration: .init(
                listen: .tcp(host: "127.0.0.1", port: 0), target: addresses[0],
                toServer: .init(fragment: 5, jitterMilliseconds: 2), toClient: .init(fragment: 3), seed: 3
            ))
            let address = try await proxy.start()
            let client = try await ParleyClient.connect(to: address, logger: quietLogger)
            for i in 1...20 { #expect(try await ping(client, UInt64(i)) == UInt64(i)) }
            var echo = Parley_Echo_V1_Echo()
            echo.payload = Data((0..<3000).map { UInt8(truncatingIfNeeded: $0) })
            let reply = try await client.request(echo, as: Parley_Echo_V1_EchoReply.self)
            #expect(reply.payload == echo.payload)
            client.close()
            await proxy.stop()
            #expect(proxy.counts == (1, 0))
        }
    }

    /// A rate holds a direction to that many bytes per second: 256 KiB of echo at 1 MiB/s
    /// towards the client takes a quarter of a second at least (a bound below, which a slow
    /// machine cannot break), and arrives whole.
    @Test func aRateHoldsTheBytesBack() async throws {
        try await withServer { _, addresses in
            let proxy = ChaosProxy(configuration: .init(
                listen: .tcp(host: "127.0.0.1", port: 0), target: addresses[0], toClient: .init(rateBytesPerSecond: 1 << 20), seed: 1
            ))
            let address = try await proxy.start()
            let client = try await ParleyClient.connect(to: address, logger: quietLogger)
            var echo = Parley_Echo_V1_Echo()
            echo.payload = Data((0..<(256 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 7) })
            let started = ContinuousClock.now
            let reply = try await client.request(echo, as: Parley_Echo_V1_EchoReply.self)
            let took = ContinuousClock.now - started
            #expect(reply.payload == echo.payload)
            #expect(took >= .milliseconds(245), "256 KiB at 1 MiB/s: \(took)")
            client.close()
            await proxy.stop()
        }
    }

    @Test func aCutEndsTheClientsConnectionWithConnectionClosed() async throws {
        try await withServer { _, addresses in
            let lines = NIOLockedValueBox<[String]>([])
            let proxy = ChaosProxy(
                configuration: .init(listen: .tcp(host: "127.0.0.1", port: 0), target: addresses[0], toServer: .init(cutAfterBytes: 400), seed: 1),
                report: { line in lines.withLockedValue { $0.append(line) } }
            )
            let address = try await proxy.start()
            let client = try await ParleyClient.connect(to: address, logger: quietLogger)
            var failure: ParleyError?
            for i in 1...50 {
                do { _ = try await ping(client, UInt64(i)) } catch let error as ParleyError {
                    failure = error
                    break
                }
            }
            #expect(failure?.code == .connectionClosed)
            #expect(try await eventually { proxy.counts.cuts == 1 })
            #expect(lines.withLockedValue { $0 }.contains { $0.contains("c2s: cut after 400 bytes") })
            await proxy.stop()
        }
    }
}
