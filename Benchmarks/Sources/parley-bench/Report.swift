import Foundation

/// The workloads, each run for every system.
enum Workload: String, CaseIterable, Sendable {
    case latency
    case throughput64B = "throughput-64b"
    case throughput64K = "throughput-64k"
    case bulk
    /// Connect-to-first-answer: connect, handshake(s), one 64 B round trip (the connection is
    /// then closed, untimed), one connection after another.
    case handshake
    /// Lossless sessions only (issue 14): the time from a cut of the connection (by `parley
    /// chaos`) to the first answer delivered after it, requests flowing all along.
    case reconnect

    /// Whether the workload's round trips are made by callers whose tasks can run on the pool
    /// or on the event loop (`--callers`); the handshake and reconnect workloads are not.
    var hasCallers: Bool { self != .handshake && self != .reconnect }

    /// The systems this workload runs on (of those asked for).
    func systems(_ asked: [System]) -> [System] {
        self == .reconnect ? asked.filter { $0 == .parleyLossless } : asked
    }

    static func parseList(_ text: String) throws -> [Workload] {
        if text == "all" { return Workload.allCases }
        return try text.split(separator: ",").map { name in
            guard let w = Workload(rawValue: name.trimmingCharacters(in: .whitespaces)) else {
                throw BenchError("unknown workload \"\(name)\": use \(Workload.allCases.map(\.rawValue).joined(separator: ", ")) or all")
            }
            return w
        }
    }
}

/// The knobs of one invocation.
struct Settings: Sendable {
    var repetitions: Int
    var duration: Double
    var warmup: Double
    var window: Int
    var bulkWindow: Int
    var bulkSize: Int
    /// Connections timed per measurement of the handshake workload.
    var handshakes: Int
    /// Where the callers' tasks run, in the order the arrangements alternate.
    var callers: [Callers] = [.pool]
    /// The reconnect workload.
    var reconnect: ReconnectSettings

    func size(_ w: Workload) -> Int {
        switch w {
        case .latency, .throughput64B, .handshake, .reconnect: return 64
        case .throughput64K: return 64 * 1024
        case .bulk: return self.bulkSize
        }
    }

    func window(_ w: Workload) -> Int {
        switch w {
        case .latency, .handshake: return 1
        case .throughput64B, .throughput64K: return self.window
        case .bulk: return self.bulkWindow
        case .reconnect: return self.reconnect.window
        }
    }

    func load(_ w: Workload) -> Load {
        Load(size: self.size(w), dataSegment: w == .bulk)
    }

    func title(_ w: Workload) -> String {
        switch w {
        case .latency:
            return "Round-trip latency, queue depth 1, 64 B payload"
        case .throughput64B:
            return "Pipelined throughput, 64 B payload, \(self.window) requests in flight"
        case .throughput64K:
            return "Pipelined throughput, 64 KiB payload, \(self.window) requests in flight"
        case .bulk:
            return "Bulk, \(byteSize(self.bulkSize)) payload, \(self.bulkWindow) requests in flight"
        case .handshake:
            return "Connect to first answer (connect, handshake, one 64 B round trip), \(self.handshakes) connections per run"
        case .reconnect:
            return "Cut to first delivery after it, lossless session through \(self.reconnect.description)"
        }
    }
}

/// Every run of one workload, per system, in the order they ran.
struct WorkloadResults: Sendable {
    let workload: Workload
    var runs: [System: [Measurement]] = [:]
    /// CPU used by other processes while this workload ran, in percent of the machine.
    var otherLoad: Double?

    func values(_ system: System, _ metric: (Measurement) -> Double?) -> [Double] {
        (self.runs[system] ?? []).compactMap(metric)
    }

    func median(_ system: System, _ metric: (Measurement) -> Double?) -> Double? {
        parley_bench.median(self.values(system, metric))
    }

    /// `system`'s median (Parley's by default) over another system's median.
    func ratio(_ other: System, _ metric: (Measurement) -> Double?, of system: System = .parley) -> Double? {
        guard let p = self.median(system, metric), let o = self.median(other, metric), o > 0 else { return nil }
        return p / o
    }

    /// The median of the per-repetition ratios (`system`'s run over the other system's run of
    /// the same repetition, measured seconds apart).
    func pairedRatio(_ other: System, _ metric: (Measurement) -> Double?, of system: System = .parley) -> Double? {
        let p = self.values(system, metric), o = self.values(other, metric)
        return parley_bench.median(zip(p, o).compactMap { $1 > 0 ? $0 / $1 : nil })
    }
}

enum Metric {
    static let p50: @Sendable (Measurement) -> Double? = { $0.p50 }
    static let p99: @Sendable (Measurement) -> Double? = { $0.p99 }
    static let messages: @Sendable (Measurement) -> Double? = { $0.messagesPerSecond }
    static let mib: @Sendable (Measurement) -> Double? = { $0.mibPerSecond }
}

// MARK: - Formatting

func fixed(_ v: Double?, _ digits: Int = 1) -> String {
    guard let v else { return "-" }
    return String(format: "%.\(digits)f", v)
}

func grouped(_ v: Double?) -> String {
    guard let v else { return "-" }
    let digits = String(Int(v.rounded()))
    var out = ""
    for (i, c) in digits.reversed().enumerated() {
        if i > 0 && i % 3 == 0 { out.append(",") }
        out.append(c)
    }
    return String(out.reversed())
}

func times(_ v: Double?) -> String {
    guard let v else { return "-" }
    return String(format: "%.2fx", v)
}

func byteSize(_ n: Int) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 { return "\(n >> 20) MiB" }
    if n >= 1 << 10 && n % (1 << 10) == 0 { return "\(n >> 10) KiB" }
    return "\(n) B"
}

/// A Markdown table with right-aligned columns after the first.
func markdownTable(_ header: [String], _ rows: [[String]]) -> String {
    let all = [header] + rows
    let widths = header.indices.map { i in all.map { $0[i].count }.max() ?? 0 }
    func line(_ cells: [String]) -> String {
        "| " + cells.enumerated().map { i, c in
            let pad = String(repeating: " ", count: widths[i] - c.count)
            return i == 0 ? c + pad : pad + c
        }.joined(separator: " | ") + " |"
    }
    let rule = "|" + widths.enumerated().map { i, w in
        i == 0 ? " " + String(repeating: "-", count: w) + " " : " " + String(repeating: "-", count: max(w - 1, 1)) + ": "
    }.joined(separator: "|") + "|"
    return ([line(header), rule] + rows.map(line)).joined(separator: "\n")
}

func table(_ r: WorkloadResults, systems: [System], settings: Settings, callers: Callers? = nil) -> String {
    var out = "### \(settings.title(r.workload))\(callers.map { ", \($0.title)" } ?? "")\n\n"
    // The ratios shown under the systems: (numerator, denominator).
    let pairs: [(System, System)] = [
        (.parley, .raw), (.parley, .rawCoalesced), (.rawCoalesced, .raw), (.parley, .grpc), (.parleyLossless, .parley), (.parleySecure, .parley), (.parleySecure, .tlsEcho),
        (.parleySecure, .parleyTLS), (.parleyTLS, .tlsEcho), (.parleyTLS, .parley), (.tlsEcho, .raw),
        (.parleySecure, .tlsCoalesced), (.tlsCoalesced, .tlsEcho), (.tlsCoalesced, .rawCoalesced),
    ]
    let systems = systems.filter { r.runs[$0] != nil }
    let compare = pairs.filter { systems.contains($0.0) && systems.contains($0.1) }
    // Per workload: the primary metric (medians, each run, paired ratio), the secondary one, and
    // how each is printed.
    typealias Column = (metric: @Sendable (Measurement) -> Double?, format: (Double?) -> String, header: String)
    let (first, second, runs): (Column, Column, String)
    switch r.workload {
    case .latency, .handshake:
        (first, second, runs) = ((Metric.p50, { fixed($0) }, "p50 µs"), (Metric.p99, { fixed($0) }, "p99 µs"), "p50 of each run, µs")
    case .throughput64B, .throughput64K:
        (first, second, runs) = ((Metric.messages, grouped, "messages/s"), (Metric.mib, { fixed($0) }, "MiB/s"), "messages/s of each run")
    case .bulk:
        (first, second, runs) = ((Metric.mib, { fixed($0) }, "MiB/s"), (Metric.messages, grouped, "messages/s"), "MiB/s of each run")
    case .reconnect:
        let ms: (Double?) -> String = { fixed($0.map { $0 / 1000 }, 2) }
        (first, second, runs) = ((Metric.p50, ms, "p50 ms"), (Metric.p99, ms, "p99 ms"), "p50 of each run, ms")
    }
    var rows = systems.map { s in
        [s.title, first.format(r.median(s, first.metric)), second.format(r.median(s, second.metric)),
         r.values(s, first.metric).map { first.format($0) }.joined(separator: " ")]
    }
    for (s, o) in compare {
        rows.append(["\(s.title) / \(o.title)", times(r.ratio(o, first.metric, of: s)), times(r.ratio(o, second.metric, of: s)),
                     "paired median: " + times(r.pairedRatio(o, first.metric, of: s))])
    }
    out += markdownTable(["system", first.header, second.header, runs], rows)
    if r.workload == .reconnect {
        for s in systems {
            let m = r.runs[s] ?? []
            out += "\n\n\(s.title), each run: cuts measured \(m.map { "\($0.count)" }.joined(separator: " "))"
                + "; slowest, ms: \(m.map { fixed($0.maximum.map { $0 / 1000 }, 2) }.joined(separator: " "))"
                + "; round trips during the run: \(m.map { grouped($0.roundTrips.map(Double.init)) }.joined(separator: " "))"
                + "; reconnects of the session: \(m.map { "\($0.reconnects ?? 0)" }.joined(separator: " "))"
            let unmatched = m.reduce(0) { $0 + ($1.unmatched ?? 0) }
            if unmatched > 0 { out += "; \(unmatched) cuts not followed by a delivery before the run stopped (left out)" }
            out += "."
        }
    }
    if let load = r.otherLoad {
        out += "\n\nOther processes used \(fixed(load))% of the machine's CPU meanwhile"
            + (load >= 5 ? " (a disturbed run: figures may be off)." : ".")
    }
    return out + "\n"
}

/// A goal of an issue: `system`'s median over `other`'s, at least or at most `limit`.
struct Goal: Sendable {
    var text: String
    var workload: Workload
    var system: System = .parley
    var other: System
    var metric: @Sendable (Measurement) -> Double?
    var limit: Double
    var atMost: Bool
    /// At most: strictly below the limit (faster than).
    var strict = false
}

/// The goals, checked against the medians, as a table headed `title`.
/// `extra`: rows of goals that are not ratios, already formatted.
func goalTable(_ title: String, _ list: [Goal], _ results: [Workload: WorkloadResults], systems: [System], extra: [[String]] = []) -> String {
    let rows = list.map { g -> [String] in
        guard systems.contains(g.system), systems.contains(g.other),
              let r = results[g.workload], let ratio = r.ratio(g.other, g.metric, of: g.system) else {
            return [g.text, "-", "-", "not measured"]
        }
        let met = g.atMost ? (g.strict ? ratio < g.limit : ratio <= g.limit) : ratio >= g.limit
        let by = g.atMost ? g.limit / ratio : ratio / g.limit
        return [g.text, times(ratio), times(r.pairedRatio(g.other, g.metric, of: g.system)),
                (met ? "met" : "NOT met") + String(format: " (margin %.2fx)", by)]
    }
    return "### \(title)\n\n" + markdownTable(["goal", "ratio of medians", "paired median", "verdict"], rows + extra) + "\n"
}

/// The secure-mode goals of issue 8 (secure mode against crc mode and against TLS 1.3), as
/// `secureGoals` checks them; `bestArrangements` checks its
/// throughput ones (those that are not "at most") too.
let secureGoalList = [
    Goal(text: "secure 64 B pipelined >= 0.8x crc mode (Parley secure / Parley)", workload: .throughput64B,
         system: .parleySecure, other: .parley, metric: Metric.messages, limit: 0.8, atMost: false),
    Goal(text: "secure 64 B pipelined >= 1.5x TLS echo", workload: .throughput64B,
         system: .parleySecure, other: .tlsEcho, metric: Metric.messages, limit: 1.5, atMost: false),
    Goal(text: "secure bulk MiB/s >= 0.8x crc mode (Parley secure / Parley)", workload: .bulk,
         system: .parleySecure, other: .parley, metric: Metric.mib, limit: 0.8, atMost: false),
    Goal(text: "secure bulk MiB/s >= 1.5x TLS echo", workload: .bulk,
         system: .parleySecure, other: .tlsEcho, metric: Metric.mib, limit: 1.5, atMost: false),
    Goal(text: "secure handshake p50 faster than TLS 1.3 (TLS echo: handshake + one echo)", workload: .handshake,
         system: .parleySecure, other: .tlsEcho, metric: Metric.p50, limit: 1, atMost: true, strict: true),
    Goal(text: "secure handshake p50 faster than Parley over TLS 1.3", workload: .handshake,
         system: .parleySecure, other: .parleyTLS, metric: Metric.p50, limit: 1, atMost: true, strict: true),
]

func secureGoals(_ results: [Workload: WorkloadResults], systems: [System], suffix: String = "") -> String {
    goalTable("Goals of issue 8 (secure mode)\(suffix)", secureGoalList, results, systems: systems)
}

/// The goals of issue 14 (lossless sessions): sessions on against off, and cut to delivery.
func losslessGoals(_ results: [Workload: WorkloadResults], systems: [System], suffix: String = "") -> String {
    let ratios = [
        Goal(text: "sessions on: 64 B pipelined >= 0.9x sessions off (Parley lossless / Parley)", workload: .throughput64B,
             system: .parleyLossless, other: .parley, metric: Metric.messages, limit: 0.9, atMost: false),
        Goal(text: "sessions on: bulk MiB/s >= 0.9x sessions off (Parley lossless / Parley)", workload: .bulk,
             system: .parleyLossless, other: .parley, metric: Metric.mib, limit: 0.9, atMost: false),
    ]
    // The absolute goal: cut to first delivery, p50 under 10 ms (the median of the runs' p50s).
    let p50 = results[.reconnect]?.median(.parleyLossless, Metric.p50)
    let p99 = results[.reconnect]?.median(.parleyLossless, Metric.p99)
    let verdict = p50.map { $0 < 10_000 ? "met" + String(format: " (margin %.2fx)", 10_000 / $0) : "NOT met" } ?? "not measured"
    let absolute = [
        "cut to first delivery after it: p50 under 10 ms (median of the runs' p50; p99 beside it)",
        p50.map { fixed($0 / 1000, 2) + " ms" } ?? "-", p99.map { "p99 " + fixed($0 / 1000, 2) + " ms" } ?? "-", verdict,
    ]
    return goalTable("Goals of issue 14 (lossless sessions)\(suffix)", ratios, results, systems: systems, extra: [absolute])
}

/// The issue's goals, checked against the medians.
func goals(_ results: [Workload: WorkloadResults], suffix: String = "") -> String {
    let list = [
        Goal(text: "p50 latency within 1.2x of raw NIO", workload: .latency, other: .raw, metric: Metric.p50, limit: 1.2, atMost: true),
        Goal(text: "64 B throughput >= 0.8x raw NIO", workload: .throughput64B, other: .raw, metric: Metric.messages, limit: 0.8, atMost: false),
        Goal(text: "64 B throughput >= 2x gRPC", workload: .throughput64B, other: .grpc, metric: Metric.messages, limit: 2, atMost: false),
        Goal(text: "bulk MiB/s >= 0.9x raw NIO", workload: .bulk, other: .raw, metric: Metric.mib, limit: 0.9, atMost: false),
        // The same goals against the honest floor (issue 14): the raw echo that coalesces.
        Goal(text: "p50 latency within 1.2x of raw NIO coalesced", workload: .latency, other: .rawCoalesced, metric: Metric.p50, limit: 1.2, atMost: true),
        Goal(text: "64 B throughput >= 0.8x raw NIO coalesced", workload: .throughput64B, other: .rawCoalesced, metric: Metric.messages, limit: 0.8, atMost: false),
        Goal(text: "bulk MiB/s >= 0.9x raw NIO coalesced", workload: .bulk, other: .rawCoalesced, metric: Metric.mib, limit: 0.9, atMost: false),
    ]
    return goalTable("Goals\(suffix)", list, results, systems: System.allCases)
}

/// With both arrangements of the callers: each system's median in each, and its better one;
/// the ratios of issue 8's goals between the systems' better arrangements (each system
/// judged as its fastest client drives it).
func bestArrangements(_ results: [Callers: [Workload: WorkloadResults]], systems: [System], workloads: [Workload]) -> String {
    var out = "### Each system in its better arrangement of the callers\n\n"
    var rows: [[String]] = []
    var best: [Workload: [System: Double]] = [:]
    for workload in workloads {
        let (metric, format, higher): (@Sendable (Measurement) -> Double?, (Double?) -> String, Bool) =
            switch workload {
            case .latency: (Metric.p50, { fixed($0) + " µs" }, false)
            case .bulk: (Metric.mib, { fixed($0) + " MiB/s" }, true)
            default: (Metric.messages, { grouped($0) + " msg/s" }, true)
            }
        for system in systems {
            let pool = results[.pool]?[workload]?.median(system, metric)
            let loop = results[.loop]?[workload]?.median(system, metric)
            let values = [pool, loop].compactMap { $0 }
            guard let better = higher ? values.max() : values.min() else { continue }
            best[workload, default: [:]][system] = better
            rows.append([workload.rawValue, system.title, format(pool), format(loop), format(better)])
        }
    }
    out += markdownTable(["workload", "system", "pool", "loop", "better"], rows) + "\n"
    // Not the issue's baseline: a TLS client that coalesces its writes as Parley's does.
    let stronger = [
        Goal(text: "secure 64 B pipelined >= 1.5x TLS echo coalesced (a stronger baseline than the issue's)", workload: .throughput64B,
             system: .parleySecure, other: .tlsCoalesced, metric: Metric.messages, limit: 1.5, atMost: false),
        Goal(text: "secure bulk MiB/s >= 1.5x TLS echo coalesced (a stronger baseline than the issue's)", workload: .bulk,
             system: .parleySecure, other: .tlsCoalesced, metric: Metric.mib, limit: 1.5, atMost: false),
    ]
    var goalRows: [[String]] = []
    for g in secureGoalList.filter({ !$0.atMost }) + stronger {
        guard let a = best[g.workload]?[g.system], let b = best[g.workload]?[g.other], b > 0 else { continue }
        let ratio = a / b
        goalRows.append([g.text + " (better arrangements)", times(ratio), (ratio >= g.limit ? "met" : "NOT met") + String(format: " (margin %.2fx)", ratio / g.limit)])
    }
    if !goalRows.isEmpty {
        out += "\n" + markdownTable(["goal", "ratio of the better medians", "verdict"], goalRows) + "\n"
    }
    return out
}
