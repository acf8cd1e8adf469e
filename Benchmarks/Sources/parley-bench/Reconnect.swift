import Foundation
import Parley
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

// The reconnect workload (issue 14): the time from a cut of the connection to the first
// answer delivered after it, for a lossless client whose requests keep flowing through the
// fault proxy `parley chaos`, run as a process of its own (the real command, built with the
// harness: `.build-bench/release/parley`).
//
// Timing: the proxy prints "conn N c2s: cut after B bytes" and then closes both sides of
// connection N, in the same event-loop callback; a thread of ours blocked on its standard
// output timestamps the line as it arrives (a thread wake-up after the proxy's write, the
// same kind of wake-up that tells the client its socket closed). The "first message delivered
// after it" is the first round trip that completes after that time *and* after the session
// resumed on a new connection (`reconnects` above its value at the cut): an answer that came
// in on the broken connection but whose task ran late does not count.

/// One cut, as seen from here.
struct CutEvent: Sendable {
    /// When the proxy's line arrived (monotonic nanoseconds).
    var time: UInt64
    /// Reconnects of the session at the cut: the first delivery after the cut is the first
    /// round trip completing with more.
    var reconnectsAtCut: Int
}

/// What the proxy reported, filled by the thread reading its output.
final class ChaosLog: Sendable {
    struct State {
        var connection: ParleyConnection?
        var cuts: [CutEvent] = []
        var connections = 0
        /// Lines before the proxy said where it listens (shown if it does not start).
        var lines: [String] = []
    }

    let state = Mutex(State())

    /// A line of the proxy's report after its start: cuts, and new connections.
    func parse(_ line: String, at time: UInt64) {
        // "conn N c2s: cut after B bytes"; "conn N: 127.0.0.1:P -> 127.0.0.1:T"
        guard line.hasPrefix("conn ") else { return }
        let number = Int(line.dropFirst(5).prefix { $0.isNumber }) ?? 0
        if line.contains(": cut after ") {
            self.state.withLock { s in
                // Connection N is at best the session's N-th link: at most N - 1 reconnects
                // had happened when it was cut. The count read now can only be higher than
                // the one at the cut (if this thread woke late), so take the lower of the two.
                let read = s.connection?.reconnects ?? Int.max
                s.cuts.append(CutEvent(time: time, reconnectsAtCut: max(0, min(read, number - 1))))
            }
        } else if line.contains(" -> ") {
            self.state.withLock { $0.connections = max($0.connections, number) }
        }
    }
}

/// `parley chaos` running in a child process, stopped by its PID.
final class ChaosChild: Sendable {
    let pid: pid_t
    /// The port the proxy listens on (127.0.0.1).
    let port: Int
    private let log: ChaosLog

    private init(pid: pid_t, port: Int, log: ChaosLog) {
        self.pid = pid
        self.port = port
        self.log = log
    }

    /// Starts `parley chaos --listen 127.0.0.1:0 --to 127.0.0.1:<target> ARGUMENTS` and
    /// waits for the line that says where it listens.
    static func spawn(parley: String, target: Int, arguments: [String], timeout: Duration = .seconds(30)) async throws -> ChaosChild {
        guard access(parley, X_OK) == 0 else {
            throw BenchError("the reconnect workload runs `parley chaos`, and \(parley) is not an executable: build it with `swift build -c release --package-path Benchmarks --scratch-path .build-bench --product parley` (Scripts/bench.sh does), or pass --parley PATH")
        }
        let (pid, _, stdoutReader) = try spawnProcess(
            parley, ["chaos", "--listen", "127.0.0.1:0", "--to", "127.0.0.1:\(target)"] + arguments, stdinPipe: false
        )
        let watchdog = Task {
            try await Task.sleep(for: timeout)
            ChildProcesses.shared.stop(pid)
        }
        defer { watchdog.cancel() }
        // The reader is a thread of its own (not the cooperative pool, which the client's tasks
        // keep busy): it blocks on the pipe and timestamps each cut as its line arrives.
        let log = ChaosLog()
        let port: Int? = await withCheckedContinuation { (continuation: CheckedContinuation<Int?, Never>) in
            let thread = Thread {
                var started = false
                var reader = LineReader(fd: stdoutReader)
                while let (line, now) = reader.next() {
                    if !started {
                        // "parley chaos: 127.0.0.1:PORT -> 127.0.0.1:TARGET, seed S"
                        if line.hasPrefix("parley chaos: "), line.contains(" -> "),
                           let address = line.dropFirst("parley chaos: ".count).split(separator: " ").first,
                           let colon = address.lastIndex(of: ":"), let p = Int(address[address.index(after: colon)...]) {
                            started = true
                            continuation.resume(returning: p)
                        } else {
                            log.state.withLock { $0.lines.append(line) }
                        }
                        continue
                    }
                    log.parse(line, at: now)
                }
                close(stdoutReader)
                if !started { continuation.resume(returning: nil) }
            }
            thread.start()
        }
        guard let port else {
            ChildProcesses.shared.stop(pid)
            let output = log.state.withLock { $0.lines.joined(separator: " / ") }
            throw BenchError("parley chaos did not start (its output: \(output.isEmpty ? "nothing" : output))")
        }
        // The reader thread goes on filling `log`.
        return ChaosChild(pid: pid, port: port, log: log)
    }

    /// The client whose reconnects count the session's links.
    func watch(_ connection: ParleyConnection) { self.log.state.withLock { $0.connection = connection } }

    var cuts: [CutEvent] { self.log.state.withLock { $0.cuts } }
    var connections: Int { self.log.state.withLock { $0.connections } }

    /// Stops the proxy (SIGTERM, then SIGKILL) and reaps it; the reader thread ends at the
    /// end of its output.
    func stop() {
        self.log.state.withLock { $0.connection = nil }
        ChildProcesses.shared.stop(self.pid)
    }
}

/// Lines of a pipe, each with the time its bytes were read (blocking reads).
struct LineReader {
    let fd: Int32
    private var buffer: [UInt8] = []
    private var chunk = [UInt8](repeating: 0, count: 4096)
    private var time: UInt64 = 0

    init(fd: Int32) { self.fd = fd }

    /// The next line (without its newline) and when it arrived; nil at end of file.
    mutating func next() -> (String, UInt64)? {
        while true {
            if let newline = self.buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: self.buffer[..<newline], as: UTF8.self)
                self.buffer.removeSubrange(...newline)
                return (line, self.time)
            }
            let fd = self.fd
            let n = self.chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n > 0 {
                self.time = nanotime()
                self.buffer += self.chunk[..<n]
            } else if n == -1 && errno == EINTR {
                continue
            } else {
                return nil
            }
        }
    }
}

/// What the reconnect workload is asked to do.
struct ReconnectSettings: Sendable {
    /// Cuts measured per repetition (after the warm-up).
    var cuts: Int
    /// Requests in flight (tasks on the one lossless connection).
    var window: Int
    /// `parley chaos --cut-after` (nil: not given).
    var cutAfter: Int?
    /// `parley chaos --cut-probability` (0: not given).
    var cutProbability: Double
    /// The `parley` executable.
    var parley: String
    /// Give up a repetition that has not seen `cuts` cuts after this long.
    var timeout: Double = 120

    var chaosArguments: [String] {
        var a: [String] = []
        if let n = self.cutAfter { a += ["--cut-after", "\(n)"] }
        if self.cutProbability > 0 { a += ["--cut-probability", "\(self.cutProbability)"] }
        return a
    }

    var description: String {
        "parley chaos \(self.chaosArguments.joined(separator: " ")) (both directions), \(self.window) x 64 B requests in flight, \(self.cuts) cuts per repetition"
    }
}

extension Measure {
    /// Runs a lossless client through a `parley chaos` proxy in front of the server on `port`
    /// until `settings.cuts` cuts have happened after `warmup` seconds; for each cut, the time
    /// from the cut to the first round trip completed after the session resumed. p50 and p99
    /// in microseconds; `count` is the number of cuts measured.
    static func reconnect(port: Int, settings r: ReconnectSettings, warmup: Double, seed: UInt64) async throws -> Measurement {
        let chaos = try await ChaosChild.spawn(parley: r.parley, target: port, arguments: r.chaosArguments + ["--seed", "\(seed)"])
        defer { chaos.stop() }
        let caller = try await ParleyCaller(.parleyLossless, port: chaos.port, load: Load(size: 64, dataSegment: false))
        let connection = caller.client.connection
        chaos.watch(connection)

        let stop = Flag()
        let start = nanotime()
        let measuredFrom = start + UInt64(warmup * 1e9)
        let deadline = measuredFrom + UInt64(r.timeout * 1e9)
        let completions: [(time: UInt64, reconnects: Int)]
        do {
            try await caller.verify()
            completions = try await withThrowingTaskGroup(of: [(time: UInt64, reconnects: Int)].self) { group in
                for _ in 0..<r.window {
                    group.addTask {
                        var log: [(time: UInt64, reconnects: Int)] = []
                        log.reserveCapacity(1 << 16)
                        while !stop.isSet {
                            try await caller.roundTrip()
                            log.append((nanotime(), connection.reconnects))
                        }
                        return log
                    }
                }
                // Until enough cuts were seen after the warm-up and the session resumed after
                // the last of them (plus a moment for answers to flow on the new link).
                var failure: BenchError?
                while true {
                    try await Task.sleep(for: .milliseconds(5))
                    let cuts = chaos.cuts.filter { $0.time >= measuredFrom }
                    if cuts.count >= r.cuts, let last = cuts.last, connection.reconnects > last.reconnectsAtCut {
                        try await Task.sleep(for: .milliseconds(50))
                        break
                    }
                    if nanotime() > deadline {
                        failure = BenchError("reconnect: only \(cuts.count) of \(r.cuts) cuts in \(Int(r.timeout)) s (\(connection.reconnects) reconnects)")
                        break
                    }
                }
                stop.set()
                var all: [(time: UInt64, reconnects: Int)] = []
                for try await log in group { all += log }
                if let failure { throw failure }
                return all
            }
        } catch {
            await caller.close()
            throw error
        }
        let end = nanotime()
        let reconnects = connection.reconnects
        await caller.close()

        let sorted = completions.sorted { $0.time < $1.time }
        let cuts = chaos.cuts.filter { $0.time >= measuredFrom && $0.time < end }
        var samples: [UInt64] = []
        var unmatched = 0
        for cut in cuts {
            // The first completion after the cut, then the first of those after the resume.
            var lo = 0, hi = sorted.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if sorted[mid].time <= cut.time { lo = mid + 1 } else { hi = mid }
            }
            guard let i = sorted[lo...].firstIndex(where: { $0.reconnects > cut.reconnectsAtCut }) else {
                unmatched += 1
                continue
            }
            samples.append(sorted[i].time - cut.time)
        }
        guard !samples.isEmpty else { throw BenchError("reconnect: no cut was followed by a delivery (\(cuts.count) cuts, \(unmatched) unmatched)") }
        samples.sort()
        let measured = completions.filter { $0.time >= measuredFrom }.count
        return Measurement(
            count: samples.count, seconds: Double(end - measuredFrom) / 1e9, bytesPerMessage: 64,
            p50: Double(percentile(samples, 0.50)) / 1000, p99: Double(percentile(samples, 0.99)) / 1000,
            maximum: Double(samples.last!) / 1000, roundTrips: measured, reconnects: reconnects, unmatched: unmatched
        )
    }
}
