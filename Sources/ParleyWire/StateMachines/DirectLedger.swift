/// A server side's DIRECT requests in flight on one connection (docs/protocol.md 7.16): the
/// ids not answered yet, and whether reading is paused because there are `limit` of them.
///
/// Sans-IO: the connection handler admits each request read and reports each answer written,
/// and pauses or resumes reading as told.
public struct DirectLedger: Sendable {
    /// Requests in flight at which reading pauses (ParleyConnectionLimits.maxDirectInFlight).
    public let limit: Int
    private var ids = Set<UInt64>()
    /// Reading is paused for DIRECT requests.
    public private(set) var isPaused = false

    public init(limit: Int) {
        precondition(limit > 0)
        self.limit = limit
    }

    /// Requests read and not answered yet.
    public var count: Int { self.ids.count }

    public enum Admission: Equatable, Sendable {
        /// Hand it to the service; `pause`: stop reading until an answer is written.
        case admitted(pause: Bool)
        /// A request with this id is still unanswered: CLOSE `protocolViolation`.
        case duplicate
    }

    public mutating func admit(_ id: UInt64) -> Admission {
        guard self.ids.insert(id).inserted else { return .duplicate }
        if !self.isPaused, self.ids.count >= self.limit {
            self.isPaused = true
            return .admitted(pause: true)
        }
        return .admitted(pause: false)
    }

    public enum Answered: Equatable, Sendable {
        /// Write it; `resume`: reading may go on.
        case known(resume: Bool)
        /// No request with this id is in flight (answered twice): drop it.
        case unknown
    }

    public mutating func answered(_ id: UInt64) -> Answered {
        guard self.ids.remove(id) != nil else { return .unknown }
        if self.isPaused, self.ids.count < self.limit {
            self.isPaused = false
            return .known(resume: true)
        }
        return .known(resume: false)
    }
}
