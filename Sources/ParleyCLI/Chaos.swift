import ArgumentParser
import Foundation
import NIOCore
import NIOPosix
import Parley
import ParleyChaos
import UnixSignals

struct Chaos: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "A fault proxy: forwards connections to a server while cutting, delaying, fragmenting, stalling and slowing them.",
        discussion: """
            Put it between clients and a Parley server (or any TCP service) to see how they
            cope with a bad network:
              parley chaos --listen 127.0.0.1:7500 --to 127.0.0.1:7420 --cut-probability 0.01 --fragment 7
              parley ping 127.0.0.1:7500
            Faults apply to both directions unless --only says c2s (client to server) or s2c.
            --rate makes each connection a link of that speed, in each direction the faults
            apply to (--rate 67108864: 64 MiB/s).
            The same --seed and the same traffic give the same faults; the seed is printed.
            Every fault is printed as it happens, and a summary when it stops (SIGINT/SIGTERM).
            """
    )

    @Option(name: .long, help: ArgumentHelp("Address to listen on: HOST:PORT or unix:PATH.", valueName: "address"))
    var listen: String

    @Option(name: .long, help: ArgumentHelp("Address to forward to: HOST:PORT or unix:PATH.", valueName: "address"))
    var to: String

    @Option(name: .long, help: "Seed of the faults (default: random, printed).")
    var seed: UInt64?

    @Option(name: .long, help: ArgumentHelp("Cut each connection once this many bytes have passed in a direction.", valueName: "bytes"))
    var cutAfter: Int?

    @Option(name: .long, help: ArgumentHelp("Probability per chunk read of cutting the connection at a random byte of it (0...1).", valueName: "p"))
    var cutProbability: Double = 0

    @Option(name: .long, help: ArgumentHelp("Split what is read into writes of 1 to this many bytes.", valueName: "bytes"))
    var fragment: Int?

    @Option(name: .long, help: ArgumentHelp("Delay every write by this many milliseconds.", valueName: "ms"))
    var delay: Int = 0

    @Option(name: .long, help: ArgumentHelp("Add up to this many milliseconds of random delay to every write.", valueName: "ms"))
    var jitter: Int = 0

    @Option(name: .long, help: ArgumentHelp("Stall the direction once, after this many bytes (with --stall-for).", valueName: "bytes"))
    var stallAfter: Int?

    @Option(name: .long, help: ArgumentHelp("How long a stall lasts.", valueName: "ms"))
    var stallFor: Int = 1000

    @Option(name: .long, help: ArgumentHelp("Hold each connection to this many bytes per second in each direction the faults apply to (a link of that speed).", valueName: "bytes"))
    var rate: Int?

    @Option(name: .long, help: ArgumentHelp("Apply the faults to one direction only: c2s or s2c.", valueName: "direction"))
    var only: String?

    @Flag(name: .long, help: "Print only the summary.")
    var quiet = false

    func validate() throws {
        for a in [self.listen, self.to] {
            let address: ParleyAddress
            do { address = try ParleyAddress(parsing: a) } catch { throw ValidationError(error.message) }
            switch address.kind {
            case .tcp, .unix: break
            default: throw ValidationError("the chaos proxy forwards HOST:PORT or unix:PATH, not \(a)")
            }
        }
        guard (0...1).contains(self.cutProbability) else { throw ValidationError("--cut-probability must be 0...1") }
        if let f = self.fragment, f < 1 { throw ValidationError("--fragment must be at least 1") }
        if let c = self.cutAfter, c < 0 { throw ValidationError("--cut-after must be 0 or more") }
        if let r = self.rate, !(1...(1 << 40)).contains(r) { throw ValidationError("--rate must be 1 to 1099511627776 bytes per second") }
        guard self.delay >= 0, self.jitter >= 0, self.stallFor >= 0 else { throw ValidationError("delays must be 0 or more milliseconds") }
        guard self.delay <= 3_600_000, self.jitter <= 3_600_000, self.stallFor <= 3_600_000 else {
            throw ValidationError("--delay, --jitter and --stall-for must be at most 3600000 milliseconds (an hour)")
        }
        if let only, !["c2s", "s2c"].contains(only) { throw ValidationError("--only must be c2s or s2c") }
    }

    func run() async throws {
        let settings = ChaosPlan.Settings(
            cutAfterBytes: self.cutAfter, cutProbability: self.cutProbability, fragment: self.fragment,
            delayMilliseconds: self.delay, jitterMilliseconds: self.jitter, stallAfterBytes: self.stallAfter,
            stallMilliseconds: self.stallFor, rateBytesPerSecond: self.rate
        )
        let seed = self.seed ?? UInt64.random(in: 1...UInt64(UInt32.max))
        let quiet = self.quiet
        let proxy = ChaosProxy(
            configuration: .init(
                listen: try ParleyAddress(parsing: self.listen), target: try ParleyAddress(parsing: self.to),
                toServer: self.only == "s2c" ? .init() : settings, toClient: self.only == "c2s" ? .init() : settings, seed: seed
            ),
            report: { line in if !quiet { emit(line) } }
        )
        let bound: ParleyAddress
        do { bound = try await proxy.start() } catch {
            print("parley chaos: cannot listen on \(self.listen): \((error as? ParleyError)?.message ?? "\(error)")")
            throw ExitCode(2)
        }
        emit("parley chaos: \(bound) -> \(self.to), seed \(seed)")
        let signals = await UnixSignalsSequence(trapping: .sigint, .sigterm)
        for await _ in signals { break }
        await proxy.stop()
        let counts = proxy.counts
        emit("parley chaos: \(counts.connections) connections, \(counts.cuts) cut (seed \(seed))")
    }
}
