import ArgumentParser
import Dispatch
import NIOCore
import Parley
import NIOSSL

/// Monotonic time in nanoseconds.
@inline(__always)
func nanotime() -> UInt64 {
    DispatchTime.now().uptimeNanoseconds
}

/// What one measurement of one system found.
struct Measurement: Sendable {
    /// Round trips completed while measuring.
    var count: Int
    var seconds: Double
    var bytesPerMessage: Int
    /// Queue-depth-1 round-trip percentiles (latency workload only), in microseconds.
    var p50: Double?
    var p99: Double?
    /// The reconnect workload: the slowest cut-to-delivery (µs), the round trips completed
    /// while measuring, the session's reconnects, cuts followed by no delivery.
    var maximum: Double? = nil
    var roundTrips: Int? = nil
    var reconnects: Int? = nil
    var unmatched: Int? = nil

    var messagesPerSecond: Double { Double(self.count) / self.seconds }
    /// Payload bytes echoed per second (each byte goes to the server and back), in MiB/s.
    var mibPerSecond: Double { self.messagesPerSecond * Double(self.bytesPerMessage) / 1_048_576 }
}

/// Where the callers' tasks run: Swift's global pool (every task resumed by an answer is
/// scheduled on a pool thread, which hands its next request to the event loop), or the event
/// loop of the caller's connection (`EventLoopTaskExecutor`: answers resume their tasks on the
/// thread that read them, and the next request is written from there).
enum Callers: String, CaseIterable, Sendable, ExpressibleByArgument {
    case pool
    case loop

    static func parseList(_ text: String) throws -> [Callers] {
        let list = try text.split(separator: ",").map { name in
            guard let c = Callers(rawValue: String(name)) else {
                throw BenchError("unknown callers \"\(name)\": use pool, loop or pool,loop")
            }
            return c
        }
        guard !list.isEmpty, Set(list).count == list.count else { throw BenchError("--callers: pool, loop or pool,loop") }
        return list
    }

    /// The executor the callers' tasks prefer (nil: the global pool; also when the system's
    /// client has no event loop to offer, as gRPC's).
    func executor(_ caller: any EchoCaller) -> (any TaskExecutor)? {
        guard self == .loop, let loop = caller.loop else { return nil }
        return EventLoopTaskExecutor(loop)
    }

    var title: String {
        switch self {
        case .pool: return "callers on Swift's global pool"
        case .loop: return "callers on the connection's event loop"
        }
    }
}

enum Measure {
    /// Round trips one after another (queue depth 1): after `warmup` seconds, times each
    /// round trip for `duration` seconds.
    static func latency(_ caller: any EchoCaller, size: Int, warmup: Double, duration: Double, callers: Callers = .pool) async throws -> Measurement {
        guard let executor = callers.executor(caller) else {
            return try await self.latencyHere(caller, size: size, warmup: warmup, duration: duration)
        }
        return try await Task(executorPreference: executor) {
            try await self.latencyHere(caller, size: size, warmup: warmup, duration: duration)
        }.value
    }

    private static func latencyHere(_ caller: any EchoCaller, size: Int, warmup: Double, duration: Double) async throws -> Measurement {
        _ = try await self.pump(caller, window: 1, seconds: warmup)
        var samples: [UInt64] = []
        samples.reserveCapacity(1 << 18)
        let start = nanotime()
        let end = start + UInt64(duration * 1e9)
        var now = start
        repeat {
            let t0 = now
            try await caller.roundTrip()
            now = nanotime()
            samples.append(now - t0)
        } while now < end
        let seconds = Double(now - start) / 1e9
        samples.sort()
        return Measurement(
            count: samples.count, seconds: seconds, bytesPerMessage: size,
            p50: Double(percentile(samples, 0.50)) / 1000, p99: Double(percentile(samples, 0.99)) / 1000
        )
    }

    /// `window` tasks, each doing round trips one after another on the same connection, so
    /// that `window` requests are in flight: after `warmup` seconds, counts the round trips
    /// of `duration` seconds.
    static func throughput(_ caller: any EchoCaller, size: Int, window: Int, warmup: Double, duration: Double, callers: Callers = .pool) async throws -> Measurement {
        _ = try await self.pump(caller, window: window, seconds: warmup, callers: callers)
        let (count, seconds) = try await self.pump(caller, window: window, seconds: duration, callers: callers)
        return Measurement(count: count, seconds: seconds, bytesPerMessage: size)
    }

    /// Runs `window` concurrent loops of round trips until `seconds` have passed; returns the
    /// round trips done and the time until the last one finished. `callers`: where the loops'
    /// tasks run.
    static func pump(_ caller: any EchoCaller, window: Int, seconds: Double, callers: Callers = .pool) async throws -> (count: Int, seconds: Double) {
        guard seconds > 0 else { return (0, 0) }
        let start = nanotime()
        let end = start + UInt64(seconds * 1e9)
        let executor = callers.executor(caller)
        let count = try await withThrowingTaskGroup(of: Int.self) { group in
            for _ in 0..<window {
                group.addTask(executorPreference: executor) {
                    var n = 0
                    repeat {
                        try await caller.roundTrip()
                        n += 1
                    } while nanotime() < end
                    return n
                }
            }
            return try await group.reduce(0, +)
        }
        return (count, Double(nanotime() - start) / 1e9)
    }
}

extension Measure {
    /// Connections one after another, each opened (connect and every handshake), used for one
    /// round trip of `load` and closed; records the time from the start of the connect to the
    /// first answer (the close is not timed, but each connection is closed before the next
    /// one starts). `count / 10` unmeasured connections first. The TLS echo's client context
    /// is made once, as a TLS client keeps one; Parley's `tls://` transport makes its own.
    static func handshake(_ system: System, port: Int, load: Load, material: SecurityMaterial?, count: Int) async throws -> Measurement {
        var tlsClient: NIOSSLContext?
        if system == .tlsEcho || system == .tlsCoalesced {
            guard let material else { throw BenchError("\(system.title) needs certificates") }
            tlsClient = try TLSEcho.clientContext(certificates: material.certificates)
        }
        func one() async throws -> UInt64 {
            let t0 = nanotime()
            let caller: any EchoCaller
            if system.isParley {
                // The first echo is connect's first call: in secure mode it leaves with
                // CLIENT_IDENT (R-6.1-6), otherwise right after the handshake.
                caller = try await ParleyCaller.connectWithFirstEcho(system, port: port, load: load, material: material)
            } else {
                caller = try await system.open(port: port, load: load, material: material, tlsClient: tlsClient)
                do {
                    try await caller.roundTrip()
                } catch {
                    await caller.close()
                    throw error
                }
            }
            let elapsed = nanotime() - t0
            await caller.close()
            return elapsed
        }
        for _ in 0..<max(count / 10, 1) { _ = try await one() }
        var samples: [UInt64] = []
        samples.reserveCapacity(count)
        let start = nanotime()
        for _ in 0..<count { samples.append(try await one()) }
        let seconds = Double(nanotime() - start) / 1e9
        samples.sort()
        return Measurement(
            count: count, seconds: seconds, bytesPerMessage: load.size,
            p50: Double(percentile(samples, 0.50)) / 1000, p99: Double(percentile(samples, 0.99)) / 1000
        )
    }
}

/// The nearest-rank percentile of sorted samples.
func percentile<T>(_ sorted: [T], _ p: Double) -> T {
    precondition(!sorted.isEmpty)
    let rank = Int((p * Double(sorted.count)).rounded(.up)) - 1
    return sorted[min(max(rank, 0), sorted.count - 1)]
}

func median(_ values: [Double]) -> Double? {
    guard !values.isEmpty else { return nil }
    let s = values.sorted()
    let mid = s.count / 2
    return s.count % 2 == 1 ? s[mid] : (s[mid - 1] + s[mid]) / 2
}
