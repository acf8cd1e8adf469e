import Foundation
import Logging
import NIOConcurrencyHelpers
import Parley
import ParleyWire
import SwiftProtobuf

/// The Work benchmark: submits jobs, then simulated workers (one Parley connection each, as a
/// real worker has) ask for work and report every job a success at once, without running
/// anything, so that what is measured is the master and its store: jobs dispatched and results
/// accepted per second end to end, and the latency of an assignment (request for work to
/// reply, including its commit).
public enum WorkBench {
    public struct Configuration: Sendable {
        public var masters: [ParleyAddress]
        public var jobs: Int
        public var workers: Int
        /// Jobs a simulated worker asks for at once (its slots).
        public var slots: Int
        public var client: ParleyClient.Configuration
        /// Check each job's signature as a real worker does (Ed25519, on this process's CPU).
        public var verify: WorkSigning.PublicKey?

        public init(masters: [ParleyAddress], jobs: Int, workers: Int = 100, slots: Int = 8, client: ParleyClient.Configuration = .init(), verify: WorkSigning.PublicKey? = nil) {
            self.masters = masters
            self.jobs = jobs
            self.workers = workers
            self.slots = slots
            self.client = client
            self.verify = verify
        }
    }

    public struct Result: Sendable {
        public var jobs: Int
        public var seconds: Double
        public var jobsPerSecond: Double { Double(self.jobs) / self.seconds }
        /// Request-for-work round trips that brought at least one job, in seconds.
        public var assignmentLatencies: [Double]
        public var submitSeconds: Double
        /// Reports answered other than "accepted" (there should be none).
        public var notAccepted: Int

        public init(jobs: Int, seconds: Double, assignmentLatencies: [Double], submitSeconds: Double, notAccepted: Int) {
            self.jobs = jobs
            self.seconds = seconds
            self.assignmentLatencies = assignmentLatencies
            self.submitSeconds = submitSeconds
            self.notAccepted = notAccepted
        }

        public func percentile(_ p: Double) -> Double {
            let sorted = self.assignmentLatencies.sorted()
            guard !sorted.isEmpty else { return 0 }
            return sorted[min(sorted.count - 1, Int((Double(sorted.count) * p).rounded(.down)))]
        }
    }

    /// Submits `jobs` copies of `job` in batches of 1,000; `progress` is called after each.
    public static func submit(_ job: Parley_Work_V1_SignedJob, count: Int, to client: ParleyClient, progress: (Int) -> Void = { _ in }) async throws {
        var sent = 0
        while sent < count {
            var submit = Parley_Work_V1_SubmitJobs()
            submit.jobs = Array(repeating: job, count: min(WorkService.maxJobsPerSubmit, count - sent))
            let reply = try await client.request(submit, as: Parley_Work_V1_SubmitReply.self)
            sent += reply.jobIds.count
            progress(sent)
        }
    }

    /// Runs the simulated workers until `expected` results were accepted; `progress` gets the
    /// count of accepted results about every second.
    public static func drain(
        _ configuration: Configuration, expected: Int, logger: Logger, progress: @escaping @Sendable (Int) -> Void = { _ in }
    ) async throws -> (seconds: Double, latencies: [Double], notAccepted: Int) {
        var clients: [ParleyClient] = []
        defer { for c in clients { c.close() } }
        for w in 0..<configuration.workers {
            var config = configuration.client
            config.name = "parley-work-bench-\(w)"
            clients.append(try await ParleyClient.connect(to: configuration.masters[w % configuration.masters.count], configuration: config, logger: logger))
        }
        let accepted = NIOLockedValueBox(0)
        let notAccepted = NIOLockedValueBox(0)
        let latencies = NIOLockedValueBox<[Double]>([])
        let clock = ContinuousClock()
        let started = clock.now
        let reporter = Task {
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(1))
                progress(accepted.withLockedValue { $0 })
            }
        }
        defer { reporter.cancel() }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for (w, client) in clients.enumerated() {
                group.addTask {
                    let name = "bench-\(w)"
                    var idle = 0
                    while accepted.withLockedValue({ $0 }) < expected {
                        var request = Parley_Work_V1_RequestWork()
                        request.worker = name
                        request.slots = UInt32(configuration.slots)
                        let asked = clock.now
                        let reply = try await client.request(request, as: Parley_Work_V1_WorkAssignments.self)
                        guard !reply.assignments.isEmpty else {
                            // Others hold the last jobs; a bounded wait, then ask again.
                            idle += 1
                            if idle > 2000 { throw WorkStoreError("worker \(w) found no work 2,000 times in a row with \(accepted.withLockedValue { $0 }) of \(expected) accepted") }
                            try await Task.sleep(for: .milliseconds(5))
                            continue
                        }
                        idle = 0
                        let took = clock.now - asked
                        latencies.withLockedValue { $0.append(Double(took.components.attoseconds) / 1e18 + Double(took.components.seconds)) }
                        try await withThrowingTaskGroup(of: Parley_Work_V1_ReportAck.self) { reports in
                            for assignment in reply.assignments {
                                if let key = configuration.verify {
                                    try key.verify(job: Array(assignment.job.spec), signature: Array(assignment.job.signature))
                                }
                                var report = Parley_Work_V1_ReportResult()
                                report.worker = name
                                report.jobID = assignment.jobID
                                report.leaseID = assignment.leaseID
                                reports.addTask { try await client.request(report, as: Parley_Work_V1_ReportAck.self, idempotent: true) }
                            }
                            for try await ack in reports {
                                if ack.verdict == .accepted {
                                    accepted.withLockedValue { $0 += 1 }
                                } else {
                                    notAccepted.withLockedValue { $0 += 1 }
                                }
                            }
                        }
                    }
                }
            }
            try await group.waitForAll()
        }
        let elapsed = clock.now - started
        return (Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18, latencies.withLockedValue { $0 }, notAccepted.withLockedValue { $0 })
    }
}
