import Metrics

/// The kinds of IO counted per export.
public enum BlockOpKind: String, Sendable, CaseIterable {
    case read, write, flush, discard, writeZeroes = "write_zeroes", cache, blockStatus = "block_status"

    /// Position in `allCases`, without building that array on the IO path.
    var index: Int {
        switch self {
        case .read: 0
        case .write: 1
        case .flush: 2
        case .discard: 3
        case .writeZeroes: 4
        case .cache: 5
        case .blockStatus: 6
        }
    }
}

/// Per-export counters (operations, bytes, errors) and latency histograms, through
/// swift-metrics: `parley_block_ops_total`, `parley_block_bytes_total`,
/// `parley_block_errors_total` and `parley_block_latency_seconds`, labelled with the export
/// and the operation. Made once per open device, so the IO path only increments.
public struct BlockMetrics: Sendable {
    public struct Op: Sendable {
        let ops: Counter
        let bytes: Counter
        let errors: Counter
        let latency: Metrics.Timer

        /// Records one completed operation.
        public func record(bytes: Int, failed: Bool, nanoseconds: Int64) {
            self.ops.increment()
            if failed { self.errors.increment() } else if bytes > 0 { self.bytes.increment(by: bytes) }
            self.latency.recordNanoseconds(nanoseconds)
        }
    }

    private let ops: [Op]

    /// `factory`: the metrics backend (nil: the one bootstrapped, `MetricsSystem.factory`).
    public init(export: String, factory: (any MetricsFactory)? = nil) {
        let f = factory ?? MetricsSystem.factory
        self.ops = BlockOpKind.allCases.map { kind in
            let d = [("export", export), ("op", kind.rawValue)]
            return Op(ops: Counter(label: "parley_block_ops_total", dimensions: d, factory: f),
                      bytes: Counter(label: "parley_block_bytes_total", dimensions: d, factory: f),
                      errors: Counter(label: "parley_block_errors_total", dimensions: d, factory: f),
                      latency: Metrics.Timer(label: "parley_block_latency_seconds", dimensions: d, preferredDisplayUnit: .seconds, factory: f))
        }
    }

    public func callAsFunction(_ kind: BlockOpKind) -> Op {
        self.ops[kind.index]
    }
}
