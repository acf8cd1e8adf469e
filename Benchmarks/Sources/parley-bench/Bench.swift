import ArgumentParser
import Foundation
import Logging
import Parley

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

@main
struct ParleyBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "parley-bench",
        abstract: "Compare Parley with a raw SwiftNIO echo and gRPC over TCP loopback.",
        subcommands: [Run.self, Overhead.self, AEADBench.self, Server.self],
        defaultSubcommand: Run.self
    )
}

/// Logs go to standard error, warnings and worse only: a server child's standard output
/// carries its port.
func bootstrapLogging() {
    LoggingSystem.bootstrap { label in
        var handler = StreamLogHandler.standardError(label: label)
        handler.logLevel = .warning
        return handler
    }
}

struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the benchmark (the default).",
        discussion: """
            Starts one server process per system (this executable with `server`), then for each \
            workload runs the systems in turn (raw, raw-coalesced, parley, parley-lossless, grpc, \
            parley-secure, parley-tls, tls-echo, raw, ...) REPETITIONS times, each measurement on a fresh connection: WARMUP \
            seconds unmeasured, then DURATION seconds measured. Prints a table per workload with \
            the median over the repetitions and the ratios, then the goals. The servers are \
            stopped by PID at the end, on error and on SIGINT/SIGTERM.

            Systems: raw (a length-prefixed SwiftNIO echo; its client flushes every request), \
            raw-coalesced (the same echo, its client coalescing writes as Parley's does: one \
            event-loop job and one flush per batch of requests), parley (crc mode), \
            parley-lossless (crc mode, the client asks for a lossless session: feature bit 9), grpc, \
            parley-secure (method secret, secure mode: AES-256-GCM), parley-tls (tls://, crc \
            mode), tls-echo (the raw echo inside TLS 1.3), tls-coalesced (the same with the \
            coalescing client of raw-coalesced). The keyring and the certificates of \
            the secure ones are made in a temporary directory and removed at the end.

            Workloads: latency (queue depth 1, 64 B), throughput-64b and throughput-64k (WINDOW \
            concurrent tasks on one connection), bulk (BULK-SIZE payloads, BULK-WINDOW in flight; \
            Parley sends them in the data segment of its Echo call), handshake (HANDSHAKES \
            connections one after another, each timed from connect to its first 64 B answer), \
            reconnect (parley-lossless only: RECONNECT-WINDOW 64 B requests in flight through \
            `parley chaos` cutting the connection, CUT-AFTER bytes into each connection or at \
            random with CUT-PROBABILITY; for each cut, the time from the cut to the first answer \
            delivered after the session resumed, CUTS cuts per repetition after WARMUP; p50 and \
            p99). `parley chaos` is the real command, run as a process: the `parley` executable \
            next to this one (Scripts/bench.sh builds both), or --parley PATH.

            Environment: PARLEY_BENCH_FLUSH_EVERY=N sets ParleyConnectionLimits.flushEvery of \
            Parley's clients and servers (0: flush at the end of each read burst only; unset: \
            the library's default, 16).
            """
    )

    @Option(help: "Measurements of each system per workload (the median is reported).")
    var repetitions: Int = 5

    @Option(help: "Seconds measured per measurement.")
    var duration: Double = 2

    @Option(help: "Seconds of unmeasured round trips before each measurement.")
    var warmup: Double = 0.5

    @Option(
        help: ArgumentHelp(
            "Comma-separated workloads: latency, throughput-64b, throughput-64k, bulk, handshake, reconnect, or all (default: all).",
            valueName: "list"
        ),
        transform: Workload.parseList
    )
    var workloads: [Workload] = Workload.allCases

    @Option(help: ArgumentHelp("Comma-separated systems, in the order they alternate (default: raw,raw-coalesced,parley,parley-lossless,grpc,parley-secure,parley-tls,tls-echo,tls-coalesced).", valueName: "list"),
            transform: { try System.parseList($0, allowed: System.allCases) })
    var systems: [System] = System.allCases

    @Option(
        help: ArgumentHelp(
            "Where the callers' tasks run: pool (Swift's global pool), loop (each connection's event loop, through Parley's EventLoopTaskExecutor; gRPC's client has none and stays on the pool), or pool,loop (both, alternating within each repetition; a table per arrangement, and each system's best).",
            valueName: "list"
        ),
        transform: Callers.parseList
    )
    var callers: [Callers] = [.pool]

    @Option(help: "Requests in flight (concurrent tasks on one connection) in the throughput workloads.")
    var window: Int = 64

    @Option(help: "Requests in flight in the bulk workload.")
    var bulkWindow: Int = 4

    @Option(help: "Bytes per request in the bulk workload.")
    var bulkSize: Int = 1 << 20

    @Option(help: "Connections timed per measurement in the handshake workload (after a tenth as many unmeasured).")
    var handshakes: Int = 200

    @Option(help: "Cuts measured per repetition in the reconnect workload (after the warm-up).")
    var cuts: Int = 100

    @Option(help: ArgumentHelp("Reconnect workload: parley chaos cuts each connection once this many bytes have passed in a direction (0: not at a fixed point).", valueName: "bytes"))
    var cutAfter: Int = 65536

    @Option(help: ArgumentHelp("Reconnect workload: parley chaos cuts a connection at a random byte of a chunk read with this probability (0...1).", valueName: "p"))
    var cutProbability: Double = 0

    @Option(help: "Requests in flight in the reconnect workload.")
    var reconnectWindow: Int = 8

    @Option(help: ArgumentHelp("The parley executable whose `parley chaos` the reconnect workload runs (default: `parley` next to this executable).", valueName: "path"))
    var parley: String?

    func validate() throws {
        guard self.repetitions >= 1 else { throw ValidationError("--repetitions must be at least 1") }
        guard self.duration > 0, self.duration <= 600 else { throw ValidationError("--duration must be in (0, 600] seconds") }
        guard self.warmup >= 0, self.warmup <= 600 else { throw ValidationError("--warmup must be in [0, 600] seconds") }
        guard self.window >= 1, self.window <= 1024 else { throw ValidationError("--window must be 1...1024") }
        guard self.bulkWindow >= 1, self.bulkWindow <= 64 else { throw ValidationError("--bulk-window must be 1...64") }
        guard (1...(8 << 20)).contains(self.bulkSize) else { throw ValidationError("--bulk-size must be 1...8388608") }
        guard (1...100_000).contains(self.handshakes) else { throw ValidationError("--handshakes must be 1...100000") }
        guard (1...100_000).contains(self.cuts) else { throw ValidationError("--cuts must be 1...100000") }
        guard self.cutAfter >= 0, (0...1).contains(self.cutProbability) else { throw ValidationError("--cut-after must be 0 or more, --cut-probability 0...1") }
        guard self.cutAfter > 0 || self.cutProbability > 0 else { throw ValidationError("the reconnect workload needs --cut-after or --cut-probability") }
        guard (1...1024).contains(self.reconnectWindow) else { throw ValidationError("--reconnect-window must be 1...1024") }
        guard !self.workloads.isEmpty, !self.systems.isEmpty else { throw ValidationError("nothing to run") }
        guard Set(self.systems).count == self.systems.count else { throw ValidationError("--systems lists a system twice") }
    }

    func run() async throws {
        bootstrapLogging()
        let parley = try self.parley ?? (URL(fileURLWithPath: currentExecutable()).deletingLastPathComponent().appendingPathComponent("parley").path)
        let settings = Settings(
            repetitions: self.repetitions, duration: self.duration, warmup: self.warmup,
            window: self.window, bulkWindow: self.bulkWindow, bulkSize: self.bulkSize, handshakes: self.handshakes,
            callers: self.callers,
            reconnect: ReconnectSettings(
                cuts: self.cuts, window: self.reconnectWindow, cutAfter: self.cutAfter > 0 ? self.cutAfter : nil,
                cutProbability: self.cutProbability, parley: parley
            )
        )
        if self.workloads.contains(.reconnect), self.systems.contains(.parleyLossless), access(parley, X_OK) != 0 {
            throw BenchError("the reconnect workload runs `parley chaos`, and \(parley) is not an executable: build it with `swift build -c release --package-path Benchmarks --scratch-path .build-bench --product parley` (Scripts/bench.sh does), or pass --parley PATH")
        }
        let material = self.systems.contains(where: \.isSecure) ? try SecurityMaterial.make() : nil
        let signalSources = ChildProcesses.shared.stopOnSignals(removing: material?.directory)
        defer {
            ChildProcesses.shared.stopAll()
            material?.remove()
        }

        print(header(settings))
        var children: [System: ServerChild] = [:]
        for system in self.systems {
            let child = try await ServerChild.spawn(system, arguments: system.isSecure ? material!.serverArguments : [])
            children[system] = child
            progress("started the \(system.title) server: pid \(child.pid), 127.0.0.1:\(child.port)")
        }

        // Per arrangement of the callers, per workload. The handshake and reconnect workloads
        // do not depend on it: measured once, with the first arrangement, and shown under each.
        var results: [Callers: [Workload: WorkloadResults]] = [:]
        let ours = Set([getpid()] + children.values.map(\.pid))
        for workload in self.workloads {
            let systems = workload.systems(self.systems)
            guard !systems.isEmpty else {
                progress("\(workload.rawValue): skipped: it runs on parley-lossless only, which --systems does not name")
                continue
            }
            let arrangements = workload.hasCallers ? self.callers : [self.callers[0]]
            var r = Dictionary(uniqueKeysWithValues: arrangements.map { ($0, WorkloadResults(workload: workload)) })
            let loadBefore = MachineLoad.snapshot(excluding: ours)
            for rep in 1...settings.repetitions {
                for callers in arrangements {
                    for system in systems {
                        let m = try await self.measure(workload, system: system, port: children[system]!.port, settings: settings, material: material, repetition: rep, callers: callers)
                        r[callers]!.runs[system, default: []].append(m)
                        let label = arrangements.count > 1 ? " (\(callers.rawValue))" : ""
                        progress("\(workload.rawValue) \(rep)/\(settings.repetitions) \(system.title)\(label): \(summary(m, workload))")
                    }
                }
            }
            let otherLoad = loadBefore.flatMap { before in MachineLoad.snapshot(excluding: ours).map { $0.othersPercent(since: before) } }
            for callers in self.callers {
                var one = r[callers] ?? r[self.callers[0]]!
                one.otherLoad = otherLoad
                results[callers, default: [:]][workload] = one
                if arrangements.contains(callers) {
                    print(table(one, systems: self.systems, settings: settings, callers: workload.hasCallers && self.callers != [.pool] ? callers : nil))
                }
            }
        }
        for callers in self.callers {
            let results = results[callers] ?? [:]
            let suffix = self.callers == [.pool] ? "" : ", \(callers.title)"
            if self.systems.contains(.parley), self.systems.contains(where: { [.raw, .rawCoalesced, .grpc].contains($0) }) { print(goals(results, suffix: suffix)) }
            if self.systems.contains(.parleyLossless) { print(losslessGoals(results, systems: self.systems, suffix: suffix)) }
            if self.systems.contains(.parleySecure) { print(secureGoals(results, systems: self.systems, suffix: suffix)) }
        }
        if self.callers.count > 1 { print(bestArrangements(results, systems: self.systems, workloads: self.workloads.filter(\.hasCallers))) }

        for child in children.values { child.stop() }
        withExtendedLifetime(signalSources) {}
    }

    private func measure(_ workload: Workload, system: System, port: Int, settings: Settings, material: SecurityMaterial?, repetition: Int, callers: Callers) async throws -> Measurement {
        if workload == .reconnect {
            do {
                // The repetition's number seeds the proxy: the same faults in every invocation.
                return try await Measure.reconnect(port: port, settings: settings.reconnect, warmup: settings.warmup, seed: UInt64(repetition))
            } catch {
                throw BenchError("reconnect on \(system.title) failed: \(error)")
            }
        }
        if workload == .handshake {
            do {
                return try await Measure.handshake(system, port: port, load: settings.load(workload), material: material, count: settings.handshakes)
            } catch {
                throw BenchError("handshake on \(system.title) failed: \(error)")
            }
        }
        let caller: any EchoCaller
        do {
            caller = try await system.connect(port: port, load: settings.load(workload), material: material)
        } catch {
            throw BenchError("\(workload.rawValue): cannot connect to the \(system.title) server: \(error)")
        }
        do {
            let m: Measurement
            if workload == .latency {
                m = try await Measure.latency(caller, size: settings.size(workload), warmup: settings.warmup, duration: settings.duration, callers: callers)
            } else {
                m = try await Measure.throughput(
                    caller, size: settings.size(workload), window: settings.window(workload),
                    warmup: settings.warmup, duration: settings.duration, callers: callers
                )
            }
            await caller.close()
            return m
        } catch {
            await caller.close()
            throw BenchError("\(workload.rawValue) on \(system.title) failed: \(error)")
        }
    }
}

struct Server: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run one system's echo server (what `run` starts in its child processes).",
        discussion: """
            Listens on 127.0.0.1, prints "PORT <n>" on standard output, then serves until it is \
            stopped by a signal or its standard input reaches end of file.
            """
    )

    @Option(help: "raw, raw-coalesced, parley, parley-lossless, grpc, parley-secure, parley-tls, tls-echo or tls-coalesced.")
    var system: System

    @Option(help: "Port to listen on (0: any free port).")
    var port: Int = 0

    @Option(help: ArgumentHelp("The keyring of parley-secure.", valueName: "file"))
    var keyring: String?

    @Option(help: ArgumentHelp("The certificate directory of parley-tls and tls-echo (ca.pem, server.pem, server.key).", valueName: "dir"))
    var cert: String?

    func run() async throws {
        bootstrapLogging()
        exitWhenStandardInputCloses()
        try await self.system.serve(port: self.port, keyring: self.keyring, certificates: self.cert) { port in
            // Unbuffered: the parent waits for this line.
            FileHandle.standardOutput.write(Data("PORT \(port)\n".utf8))
        }
    }
}

func progress(_ line: String) {
    FileHandle.standardError.write(Data(("  " + line + "\n").utf8))
}

func summary(_ m: Measurement, _ w: Workload) -> String {
    switch w {
    case .latency:
        return "p50 \(fixed(m.p50)) µs, p99 \(fixed(m.p99)) µs (\(m.count) round trips)"
    case .handshake:
        return "p50 \(fixed(m.p50)) µs, p99 \(fixed(m.p99)) µs (\(m.count) connections, \(grouped(m.messagesPerSecond)) per second with close)"
    case .throughput64B, .throughput64K:
        return "\(grouped(m.messagesPerSecond)) messages/s, \(fixed(m.mibPerSecond)) MiB/s"
    case .bulk:
        return "\(fixed(m.mibPerSecond)) MiB/s, \(grouped(m.messagesPerSecond)) messages/s"
    case .reconnect:
        return "cut to delivery p50 \(fixed(m.p50.map { $0 / 1000 }, 2)) ms, p99 \(fixed(m.p99.map { $0 / 1000 }, 2)) ms, max \(fixed(m.maximum.map { $0 / 1000 }, 2)) ms (\(m.count) cuts, \(m.reconnects ?? 0) reconnects, \(grouped(m.roundTrips.map(Double.init))) round trips in \(fixed(m.seconds)) s)"
    }
}

/// What ran where: options, machine, build.
func header(_ s: Settings) -> String {
    var lines = ["## parley-bench"]
    lines.append("")
    #if DEBUG
    lines.append("WARNING: debug build; build with -c release (Scripts/bench.sh) for meaningful figures.")
    #endif
    lines.append("- date: \(ISO8601DateFormatter().string(from: Date()))")
    lines.append("- machine: \(machineDescription())")
    lines.append("- transport: TCP over loopback (127.0.0.1), client and server in separate processes")
    lines.append("- repetitions: \(s.repetitions) (systems alternate within each repetition; tables show medians)")
    lines.append("- each measurement: fresh connection, \(s.warmup) s warm-up, \(s.duration) s measured")
    lines.append("- callers (latency, throughput and bulk workloads): \(s.callers.map(\.title).joined(separator: "; then "))\(s.callers.count > 1 ? ", alternating within each repetition" : "")")
    lines.append("- throughput window: \(s.window) requests in flight; bulk: \(byteSize(s.bulkSize)) x \(s.bulkWindow) in flight")
    lines.append("- handshake: \(s.handshakes) connections per measurement after \(max(s.handshakes / 10, 1)) unmeasured, each timed from connect to its first answer")
    lines.append("- reconnect: lossless session through \(s.reconnect.description) (\(s.reconnect.parley) as a process); each cut timed to the first answer after the session resumed")
    lines.append("- secure systems: parley-secure = method secret, secure mode (\(SecureCipher.preferred[0].rawValue)); parley-tls and tls-echo = TLS 1.3 (swift-nio-ssl), development certificates")
    return lines.joined(separator: "\n") + "\n"
}

/// The processor model, the cores online and the OS: what every run's header records, so that
/// each figure can say where it was measured.
func machineDescription() -> String {
    "\(cpuModel()), \(ProcessInfo.processInfo.activeProcessorCount) cores online, \(systemName())"
}

/// The processor model: the first "model name" of /proc/cpuinfo, with its family, model and
/// stepping (a VM may show only "AMD EPYC"; family 25 model 17 then tells a Zen 4 Genoa).
func cpuModel() -> String {
    #if os(Linux)
    if let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8) {
        let lines = text.split(separator: "\n")
        /// The value of the first line `key : value` of the first processor.
        func field(_ key: String) -> String? {
            for line in lines {
                guard let colon = line.firstIndex(of: ":"),
                      line[..<colon].trimmingCharacters(in: .whitespaces) == key else { continue }
                return line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
            }
            return nil
        }
        if let name = field("model name") {
            let ids = [("family", field("cpu family")), ("model", field("model")), ("stepping", field("stepping"))]
                .compactMap { label, value in value.map { "\(label) \($0)" } }
            return ids.isEmpty ? name : "\(name) (\(ids.joined(separator: ", ")))"
        }
    }
    #endif
    return "unknown CPU"
}

func systemName() -> String {
    var u = utsname()
    guard uname(&u) == 0 else { return "unknown OS" }
    func field<T>(_ value: T) -> String {
        withUnsafeBytes(of: value) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
    }
    return "\(field(u.sysname)) \(field(u.release)) \(field(u.machine))"
}
