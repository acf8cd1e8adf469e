import ArgumentParser
import Foundation
import NIOCore
import NIOPosix
import Parley
import ParleyNIO
import ParleyServices

/// Runs Swift tasks on one SwiftNIO event loop, so that a caller, its client and the server
/// all share one thread.
final class LoopExecutor: TaskExecutor, Sendable {
    let eventLoop: any EventLoop

    init(_ eventLoop: any EventLoop) { self.eventLoop = eventLoop }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        self.eventLoop.execute { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}

struct Overhead: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure the CPU a round trip costs in user space, with no kernel and no thread hop.",
        discussion: """
            The client, the server and the calling task all run on one event-loop thread and \
            are connected by an in-memory channel pair (ParleyNIO's InMemoryChannel): no socket, \
            no system call, no wake-up. The time of a queue-depth-1 round trip is then the CPU \
            both sides spend in user space on it, which the loopback benchmark (`run`) hides \
            under tens of microseconds of kernel and scheduler time. The raw SwiftNIO echo runs \
            over the same channel pair, so the difference between the two is Parley's own cost. \
            Systems alternate within each repetition; the table shows medians.
            """
    )

    @Option(help: "Measurements of each system (the median is reported).")
    var repetitions: Int = 7

    @Option(help: "Seconds measured per measurement.")
    var duration: Double = 1

    @Option(help: "Payload bytes per round trip.")
    var size: Int = 64

    @Option(help: ArgumentHelp(
        "Comma-separated systems: raw, parley (default: raw,parley). Lossless sessions are measured by `run --systems parley,parley-lossless` only: an in-process connection cannot be dialled again, so it is always lossy.",
        valueName: "list"
    ), transform: { try System.parseList($0, allowed: [.raw, .parley]) })
    var systems: [System] = [.raw, .parley]

    func validate() throws {
        guard !self.systems.isEmpty, Set(self.systems).count == self.systems.count else { throw ValidationError("--systems: name raw and/or parley, once each") }
        guard self.repetitions >= 1 else { throw ValidationError("--repetitions must be at least 1") }
        guard self.duration > 0, self.duration <= 600 else { throw ValidationError("--duration must be in (0, 600] seconds") }
        guard (0...(1 << 20)).contains(self.size) else { throw ValidationError("--size must be 0...1048576") }
    }

    func run() async throws {
        bootstrapLogging()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let loop = group.next()
        let executor = LoopExecutor(loop)
        let load = Load(size: self.size, dataSegment: false)
        let server = ParleyServer(configuration: .init(listen: [], name: "parley-bench"), router: EchoService.router(name: "parley-bench"), group: group)

        print("## parley-bench overhead\n")
        print("- machine: \(machineDescription())")
        print("- one event-loop thread: caller, client and server; InMemoryChannel pair; \(self.size) B payload")
        print("- repetitions: \(self.repetitions), \(self.duration) s each after 0.3 s warm-up (systems alternate; medians)\n")
        var nanos: [System: [Double]] = [:]
        for rep in 1...self.repetitions {
            for system in self.systems {
                let (ns, total) = try await withTaskExecutorPreference(executor) {
                    let caller: any EchoCaller
                    switch system {
                    case .raw: caller = try await RawCaller(inMemoryOn: group, load: load)
                    default: caller = try await ParleyCaller(inProcessTo: server, load: load)
                    }
                    try await caller.verify()
                    let (warm, _) = try await Measure.pump(caller, window: 1, seconds: 0.3)
                    let (count, seconds) = try await Measure.pump(caller, window: 1, seconds: self.duration)
                    await caller.close()
                    return (seconds * 1e9 / Double(count), 1 + warm + count)
                }
                nanos[system, default: []].append(ns)
                progress("overhead \(rep)/\(self.repetitions) \(system.title): \(fixed(ns / 1000)) µs per round trip (\(total) round trips on this connection)")
            }
        }
        print("| system | µs per round trip | runs, µs |")
        print("| --- | ---: | ---: |")
        for system in self.systems {
            print("| \(system.title) | \(fixed(median(nanos[system]!)! / 1000)) | \(nanos[system]!.map { fixed($0 / 1000) }.joined(separator: " ")) |")
        }
        if let raw = nanos[.raw].flatMap(median), let parley = nanos[.parley].flatMap(median) {
            print("| Parley - raw NIO | \(fixed((parley - raw) / 1000)) | |")
            print("| Parley / raw NIO | \(String(format: "%.2fx", parley / raw)) | |")
        }
        try await group.shutdownGracefully()
    }
}

extension RawCaller {
    /// A raw echo client and server joined by an in-memory channel pair on `group`.
    init(inMemoryOn group: any EventLoopGroup, load: Load) async throws {
        let (clientEnd, serverEnd) = InMemoryChannel.pair(group: group)
        try await serverEnd.eventLoop.submit {
            let sync = serverEnd.pipeline.syncOperations
            try sync.addHandler(ByteToMessageHandler(LengthPrefixedDecoder(keepPrefix: true)))
            try sync.addHandler(RawEchoHandler())
        }.get()
        try await clientEnd.eventLoop.submit {
            let sync = clientEnd.pipeline.syncOperations
            try sync.addHandler(ByteToMessageHandler(LengthPrefixedDecoder(keepPrefix: false)))
            try sync.addHandler(RawClientHandler())
        }.get()
        try await serverEnd.activate().get()
        try await clientEnd.activate().get()
        self.init(client: RawClient(channel: clientEnd), payload: ByteBuffer(bytes: testBytes(load.size)))
    }
}

extension ParleyCaller {
    /// A Parley client connected in-process to `server` (always lossy).
    init(inProcessTo server: ParleyServer, load: Load) async throws {
        let client = try await ParleyClient.connect(inProcessTo: server, configuration: ParleyClient.Configuration(name: "parley-bench"))
        self.init(client: client, load: load, system: .parley)
    }
}
