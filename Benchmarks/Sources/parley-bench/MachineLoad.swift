import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// How much CPU the rest of the machine used while a workload ran, to tell a clean run from
/// one disturbed by other work (a compiler, a test run). Linux only (reads /proc).
///
/// It adds up user + system time (own and of reaped children) of every process other than
/// this one and its server children, at the start and at the end, so it also catches short
/// processes that were started and reaped in between (their time lands in the parent).
struct MachineLoad: Sendable {
    let others: Double
    let wall: UInt64

    static func snapshot(excluding: Set<Int32>) -> MachineLoad? {
        #if os(Linux)
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        guard ticks > 0, let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc") else { return nil }
        var total = 0.0
        for entry in entries {
            guard let pid = Int32(entry), !excluding.contains(pid),
                  let stat = try? String(contentsOfFile: "/proc/\(entry)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")") else { continue }
            // Fields after the command: state ppid ... utime(14) stime(15) cutime(16) cstime(17).
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            guard fields.count > 14 else { continue }
            for i in 11...14 { total += Double(fields[i]) ?? 0 }
        }
        return MachineLoad(others: total / ticks, wall: nanotime())
        #else
        return nil
        #endif
    }

    /// The share of the machine (all cores) the other processes used since `start`, in percent.
    func othersPercent(since start: MachineLoad) -> Double {
        let seconds = Double(self.wall - start.wall) / 1e9
        let cores = Double(ProcessInfo.processInfo.activeProcessorCount)
        guard seconds > 0 else { return 0 }
        return max(0, self.others - start.others) / (seconds * cores) * 100
    }
}
