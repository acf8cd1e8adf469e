/// Numbers from outside (a file system, a worker, a database) turned into Int64 without the
/// trap of `Int64(_: Double)`, which stops the process on NaN, an infinity or a value beyond
/// Int64's range (a file with `touch -d @1e17`, a worker's `1e300`).
extension Int64 {
    /// `value` rounded toward zero, or nil when it is NaN, an infinity or beyond Int64's range.
    public init?(ifRepresentable value: Double) {
        // Both comparisons are false for NaN. -2^63 is Int64.min; 2^63 is one past Int64.max.
        guard value >= -0x1p63, value < 0x1p63 else { return nil }
        self.init(value)
    }

    /// `value` rounded toward zero and held to Int64's range: an infinity or a value beyond
    /// the range is `.min` or `.max`, NaN is 0.
    public init(saturating value: Double) {
        self = Int64(ifRepresentable: value) ?? (value.isNaN ? 0 : value < 0 ? .min : .max)
    }
}
