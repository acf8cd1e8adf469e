/// The ordering and retry rules of a multipath block session, as a state machine with no
/// clock, channel or task inside (docs/protocol.md, "Multipath: ordering and durability").
///
/// The driver (`BlockMultipathSession`) feeds it events (an IO submitted, a send's outcome, a
/// path up or down, the no-path timer firing) and carries out the actions it returns (send
/// this IO on that path, complete that IO, arm or cancel the no-path timer, tear a path down).
///
/// The rules:
/// - **Overlapping modifications in submission order.** A write, discard or write-zeroes is
///   not sent while an earlier one (lower id) that overlaps it is unanswered: queued, sent,
///   or in doubt after its path died. Paths may reorder what travels on them, and a write
///   re-sent after a failover lands later than its first send would have; holding the later
///   one until the earlier one is acknowledged is what keeps a re-sent write from ever
///   overwriting a later acknowledged write to the same blocks. Reads and flushes are never
///   held (a read concurrent with a write may see either; a flush covers what was
///   acknowledged before it was submitted).
/// - **In doubt means re-sent.** An IO whose path dies before its answer is in doubt: it
///   may or may not have been carried out. It goes back to the queue in its original place
///   (by id) and is sent again on a live path; only the answer to its latest send counts.
/// - **No path.** With no path up, IO waits. The driver is told to arm the no-path timer
///   when IO starts waiting with no path; when it fires, every waiting IO fails (EIO) and
///   new IO fails at once until a path comes up again. A path coming up cancels the timer.
/// - **Bounded re-sends.** An IO whose path died under it `maxSends` times fails.
/// - **Fence before re-sending a modification.** A path's connection that died with a
///   modification on it in doubt is fenced (a Fence request on a live path) before that
///   modification, or any other, is sent again: the server may not have seen the connection
///   end yet, and a copy it carries out late could land after a later write. Until the fence
///   is answered no modification is sent (reads are); a modification that fails meanwhile
///   (no path, too many re-sends) keeps the fence pending all the same, since its copy could
///   still land.
/// - **A fence that takes too long.** Each fence has a timer from its start (the driver is
///   told to arm and cancel it); when one fires, the modifications waiting for a fence fail
///   (EIO), and new modifications fail at once, until every fence whose timer fired is answered. (The server answers a fence
///   once the fenced connection's running IO has finished: storage that never finishes one
///   would otherwise hold modifications, and the device's close, for ever.) Reads go on.
public struct MultipathIOState: Sendable, Hashable {
    public enum Policy: String, Sendable, CaseIterable {
        /// Each IO on the next live path in turn.
        case roundRobin = "round-robin"
        /// Each IO on the live path with the fewest IOs in flight.
        case minInflight = "min-inflight"
    }

    public enum Operation: String, Sendable, Hashable {
        case read, write, flush, discard, writeZeroes = "write-zeroes"
        /// Operations that change the device's contents, and so are ordered when they overlap.
        public var modifies: Bool { self == .write || self == .discard || self == .writeZeroes }
    }

    public struct IO: Sendable, Hashable {
        public var operation: Operation
        public var offset: UInt64
        public var length: UInt64
        public init(_ operation: Operation, offset: UInt64, length: UInt64) {
            self.operation = operation
            self.offset = offset
            self.length = length
        }
        func overlaps(_ other: IO) -> Bool {
            // Zero-length ranges overlap nothing.
            guard self.length > 0, other.length > 0 else { return false }
            let (selfEnd, o1) = self.offset.addingReportingOverflow(self.length)
            let (otherEnd, o2) = other.offset.addingReportingOverflow(other.length)
            return self.offset < (o2 ? .max : otherEnd) && other.offset < (o1 ? .max : selfEnd)
        }
    }

    /// Why an IO failed without the server's own answer.
    public enum Failure: Sendable, Equatable {
        /// No path came up within the no-path time.
        case noPath
        /// The session is closing (or closed) and takes no new IO.
        case closed
        /// The IO's path died under it `maxSends` times.
        case tooManyResends(Int)
        /// A modification that waited for a fence longer than the fence time (or was
        /// submitted after that, while the fence was still unanswered).
        case fenceTimedOut
    }

    /// What became of one send.
    public enum Outcome: Sendable, Equatable {
        /// The server carried it out.
        case done
        /// The server refused it or failed it (its answer): final, not re-sent.
        case refused
        /// The path failed (the connection ended, or the server is shutting down or no
        /// longer knows the device): the IO is in doubt, and the path is taken down.
        case pathFailed
    }

    /// One connection of a path: the path, and how many times it had come up.
    public struct Link: Sendable, Hashable, Comparable, CustomStringConvertible {
        public var path: Int
        public var incarnation: Int
        public init(path: Int, incarnation: Int) {
            self.path = path
            self.incarnation = incarnation
        }
        public var description: String { "path \(self.path + 1) connection \(self.incarnation)" }  // paths counted from 1, as in the logs
        public static func < (a: Link, b: Link) -> Bool { (a.path, a.incarnation) < (b.path, b.incarnation) }
    }

    public enum Action: Sendable, Equatable {
        /// Send IO `id` on `path`; report its outcome with `send`.
        case send(id: UInt64, path: Int, send: UInt64)
        /// Fence `link`'s connection with a Fence request on `path`; report its outcome with
        /// `fenceCompleted(link:send:outcome:)`.
        case fence(link: Link, path: Int, send: UInt64)
        /// Answer IO `id`: `nil` when the last send's outcome is to be passed on (done or
        /// refused), a failure otherwise.
        case complete(id: UInt64, failure: Failure?)
        /// Start the no-path timer (call `noPathTimerFired()` when it expires).
        case armNoPathTimer
        case cancelNoPathTimer
        /// Start the timer of `link`'s fence, with the IO timeout (call `fenceTimerFired(link)`
        /// when it expires): one per fence, from the fence's start.
        case armFenceTimer(Link)
        case cancelFenceTimer(Link)
        /// The path failed: close its connection and reconnect it (report `pathUp` then).
        case pathLost(Int)
    }

    enum Phase: Sendable, Hashable {
        /// Held behind an earlier overlapping modification.
        case blocked
        /// In doubt on a connection that is being fenced (see `fences`).
        case fenceHeld
        /// Waiting for a path.
        case queued
        case sent(path: Int, send: UInt64)
    }

    struct Entry: Sendable, Hashable {
        var io: IO
        var phase: Phase
        var sends = 0
        /// Sent at least once on a path that died.
        var inDoubt = false
        /// The connection whose fence this in-doubt modification waits for.
        var awaiting: Link?
    }

    public let pathCount: Int
    public let policy: Policy
    public let maxSends: Int
    /// IOs in flight per path before further IO waits in the queue.
    public let maxInFlightPerPath: Int
    /// Bytes of reads and writes in flight per path before further IO waits in the queue (an
    /// IO larger than this still goes to a path with nothing in flight). Each path is a
    /// session of its own on the server, which answers BUSY_SESSION past its own byte limit
    /// (256 MiB by default): kept below it, so that many large IOs, or a failed path's IO
    /// moving onto a survivor, wait here rather than fail.
    public let maxInFlightBytesPerPath: UInt64

    private(set) var entries: [UInt64: Entry] = [:]
    /// Queued IO ids, ascending.
    private(set) var queue: [UInt64] = []
    /// Blocked IO ids, ascending.
    private(set) var blocked: [UInt64] = []
    /// IO ids in doubt on a connection being fenced, ascending.
    private(set) var fenceHeld: [UInt64] = []
    private(set) var pathUp: [Bool]
    /// How many times each path has come up (its current connection's incarnation).
    private(set) var incarnations: [Int]
    /// Connections to fence, and where their Fence is (nil: waiting for a live path).
    private(set) var fences: [Link: FenceSend?] = [:]
    /// Whether modifications in doubt wait for a fence (false: re-sent at once, the
    /// behaviour of a server without Fence).
    public let fencing: Bool
    private(set) var inFlight: [Int]
    private(set) var inFlightBytes: [UInt64]
    struct FenceSend: Sendable, Hashable {
        var path: Int
        var send: UInt64
    }

    private var nextID: UInt64 = 1
    private var nextSend: UInt64 = 1
    private var nextPath = 0
    private var timerArmed = false
    /// Fences whose timer runs.
    private(set) var fenceTimers: Set<Link> = []
    /// Fences whose timer expired and that are still pending.
    private(set) var timedOutFences: Set<Link> = []
    /// A fence's timer expired and that fence is still pending: modifications fail at once.
    public var failingModifications: Bool { !self.timedOutFences.isEmpty }
    /// The no-path timer fired and no path has come up since: new IO fails at once.
    private(set) var failingFast = false
    private(set) var closing = false
    /// IOs sent again after their path died (a counter).
    public private(set) var resends = 0

    public init(paths: Int, policy: Policy = .roundRobin, maxSends: Int = 32, maxInFlightPerPath: Int = 256,
                maxInFlightBytesPerPath: UInt64 = 128 << 20, fencing: Bool = true) {
        precondition(paths > 0 && maxSends > 0 && maxInFlightPerPath > 0 && maxInFlightBytesPerPath > 0)
        self.pathCount = paths
        self.fencing = fencing
        self.incarnations = Array(repeating: 0, count: paths)
        self.policy = policy
        self.maxSends = maxSends
        self.maxInFlightPerPath = maxInFlightPerPath
        self.maxInFlightBytesPerPath = maxInFlightBytesPerPath
        self.pathUp = Array(repeating: false, count: paths)
        self.inFlight = Array(repeating: 0, count: paths)
        self.inFlightBytes = Array(repeating: 0, count: paths)
    }

    // MARK: - Queries

    /// IOs submitted and not yet answered.
    public var outstanding: Int { self.entries.count }
    public var livePaths: Int { self.pathUp.reduce(0) { $0 + ($1 ? 1 : 0) } }
    public func isUp(_ path: Int) -> Bool { self.pathUp[path] }
    public func inFlight(on path: Int) -> Int { self.inFlight[path] }
    /// Bytes of reads and writes in flight on `path`.
    public func inFlightBytes(on path: Int) -> UInt64 { self.inFlightBytes[path] }
    /// Whether `path` is up and could take `io` now.
    public func hasRoom(_ path: Int, for io: IO) -> Bool {
        guard self.pathUp[path], self.inFlight[path] < self.maxInFlightPerPath else { return false }
        let bytes = Self.counted(io)
        return self.inFlightBytes[path] == 0 || bytes <= self.maxInFlightBytesPerPath - min(self.inFlightBytes[path], self.maxInFlightBytesPerPath)
    }

    /// The bytes of `io` the server counts against its session's limit: reads and writes.
    static func counted(_ io: IO) -> UInt64 {
        io.operation == .read || io.operation == .write ? io.length : 0
    }
    public func io(_ id: UInt64) -> IO? { self.entries[id]?.io }
    /// The path IO `id`'s latest send is on, if it is on the wire.
    /// Calls `body` with the id, send and path of every IO on the wire (for a driver's
    /// watch of how long they go unanswered), in no particular order.
    public func forEachSent(_ body: (_ id: UInt64, _ send: UInt64, _ path: Int) -> Void) {
        for (id, entry) in self.entries {
            if case .sent(let path, let send) = entry.phase { body(id, send, path) }
        }
    }

    public func sentPath(of id: UInt64) -> Int? {
        if case .sent(let p, _) = self.entries[id]?.phase { return p }
        return nil
    }
    public var waiting: Int { self.queue.count + self.blocked.count + self.fenceHeld.count }
    /// The current connection of `path` (its incarnation counts its coming up).
    public func link(of path: Int) -> Link { Link(path: path, incarnation: self.incarnations[path]) }
    /// Connections waiting to be fenced, or being fenced.
    public var pendingFences: Int { self.fences.count }
    /// Whether `link`'s connection is waiting to be fenced, or being fenced.
    public func fencePending(_ link: Link) -> Bool { self.fences[link] != nil }
    /// Where the Fence of `link` is, if it is on the wire.
    public func fenceSent(of link: Link) -> (path: Int, send: UInt64)? {
        guard let f = self.fences[link], let f else { return nil }
        return (f.path, f.send)
    }

    // MARK: - Events

    /// A new IO: its id and what to do.
    public mutating func submit(_ io: IO) -> (id: UInt64, actions: [Action]) {
        var actions: [Action] = []
        let id = self.submit(io, into: &actions)
        return (id, actions)
    }

    /// A new IO: its id; what to do is appended to `actions` (a caller that keeps one array
    /// for every event allocates none per IO).
    ///   - final: taken even after `close()` (the device's last flush).
    public mutating func submit(_ io: IO, final: Bool = false, into actions: inout [Action]) -> UInt64 {
        let id = self.nextID
        self.nextID += 1
        if self.closing && !final {
            actions.append(.complete(id: id, failure: .closed))
            return id
        }
        if self.failingFast && self.livePaths == 0 {
            actions.append(.complete(id: id, failure: .noPath))
            return id
        }
        let held = io.operation.modifies && self.heldBack(id, io)
        self.entries[id] = Entry(io: io, phase: held ? .blocked : .queued)
        if held {
            self.blocked.append(id)
        } else {
            self.queue.append(id)
        }
        self.dispatch(&actions)
        return id
    }

    /// The outcome of send `send` of IO `id`. Outcomes of earlier sends (the IO was re-sent
    /// since) and of IOs already answered are ignored.
    public mutating func completed(id: UInt64, send: UInt64, outcome: Outcome) -> [Action] {
        var actions: [Action] = []
        self.completed(id: id, send: send, outcome: outcome, into: &actions)
        return actions
    }

    /// `completed(id:send:outcome:)`, appending what to do to `actions`.
    public mutating func completed(id: UInt64, send: UInt64, outcome: Outcome, into actions: inout [Action]) {
        guard let entry = self.entries[id], case .sent(let path, let current) = entry.phase, current == send else { return }
        switch outcome {
        case .done, .refused:
            self.inFlight[path] -= 1
            self.inFlightBytes[path] -= Self.counted(entry.io)
            self.finish(id, failure: nil, &actions)
        case .pathFailed:
            self.takeDown(path, &actions)
        }
        self.dispatch(&actions)
    }

    /// A path's device is open and ready for IO.
    public mutating func pathUp(_ path: Int) -> [Action] {
        guard !self.pathUp[path] else { return [] }
        self.pathUp[path] = true
        self.incarnations[path] += 1
        self.failingFast = false
        var actions: [Action] = []
        if self.timerArmed {
            self.timerArmed = false
            actions.append(.cancelNoPathTimer)
        }
        self.dispatch(&actions)
        return actions
    }

    /// A path's connection ended: its IO in flight is in doubt and is re-sent elsewhere.
    public mutating func pathDown(_ path: Int) -> [Action] {
        guard self.pathUp[path] else { return [] }
        var actions: [Action] = []
        self.takeDown(path, &actions)
        self.dispatch(&actions)
        return actions
    }

    /// The no-path timer expired: waiting IO fails, and new IO fails at once until a path is up.
    public mutating func noPathTimerFired() -> [Action] {
        guard self.timerArmed else { return [] }
        self.timerArmed = false
        // Nothing waited the whole time (what waited failed otherwise): new IO gets its own wait.
        guard self.livePaths == 0, self.waiting > 0 else { return [] }
        self.failingFast = true
        var actions: [Action] = []
        for id in (self.queue + self.blocked + self.fenceHeld).sorted() {
            self.finish(id, failure: .noPath, &actions)
        }
        return actions
    }

    /// The timer of `link`'s fence expired with it still pending: the modifications waiting
    /// for a fence fail, and new ones fail at once until that fence is answered.
    public mutating func fenceTimerFired(_ link: Link) -> [Action] {
        guard self.fenceTimers.remove(link) != nil, self.fences[link] != nil else { return [] }
        self.timedOutFences.insert(link)
        var actions: [Action] = []
        self.dispatch(&actions)
        return actions
    }

    /// The outcome of Fence `send` of `link`'s connection: done, or refused (a server
    /// without Fence: what waited for it is sent again anyway, as before fencing existed),
    /// or its carrying path failed (it goes again on another path). Outcomes of earlier
    /// sends are ignored.
    public mutating func fenceCompleted(link: Link, send: UInt64, outcome: Outcome) -> [Action] {
        guard let f = self.fences[link], let f, f.send == send else { return [] }
        var actions: [Action] = []
        switch outcome {
        case .done, .refused:
            self.fences[link] = nil
            var still: [UInt64] = []
            for id in self.fenceHeld {
                if self.entries[id]?.awaiting == link {
                    self.entries[id]!.phase = .queued
                    self.entries[id]!.awaiting = nil
                    self.insertQueued(id)
                } else {
                    still.append(id)
                }
            }
            self.fenceHeld = still
        case .pathFailed:
            self.takeDown(f.path, &actions)
        }
        self.dispatch(&actions)
        return actions
    }

    /// No new IO from now on (what is outstanding goes on).
    public mutating func close() -> [Action] {
        self.closing = true
        return []
    }

    // MARK: - Internals

    private mutating func takeDown(_ path: Int, _ actions: inout [Action]) {
        if self.pathUp[path] {
            self.pathUp[path] = false
            actions.append(.pathLost(path))
        }
        self.inFlight[path] = 0
        self.inFlightBytes[path] = 0
        let link = self.link(of: path)
        // A Fence that was on this path goes again on another.
        for (l, f) in self.fences where f?.path == path { self.fences[l] = .some(nil) }
        var inDoubt: [UInt64] = []
        for (id, entry) in self.entries {
            guard case .sent(let p, _) = entry.phase, p == path else { continue }
            self.entries[id]!.phase = .queued
            self.entries[id]!.inDoubt = true
            inDoubt.append(id)
        }
        for id in inDoubt.sorted() {
            let entry = self.entries[id]!
            if self.fencing && entry.io.operation.modifies && self.fences[link] == nil {
                self.fences[link] = .some(nil)
            }
            if entry.sends >= self.maxSends {
                self.finish(id, failure: .tooManyResends(entry.sends), &actions)
            } else if self.fencing && entry.io.operation.modifies {
                self.resends += 1
                self.entries[id]!.phase = .fenceHeld
                self.entries[id]!.awaiting = link
                self.fenceHeld.append(id)
            } else {
                self.resends += 1
                self.insertQueued(id)
            }
        }
    }

    private mutating func insertQueued(_ id: UInt64) {
        var lo = 0
        var hi = self.queue.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if self.queue[mid] < id { lo = mid + 1 } else { hi = mid }
        }
        self.queue.insert(id, at: lo)
    }

    /// Answers an IO and releases the blocked ones it was holding.
    private mutating func finish(_ id: UInt64, failure: Failure?, _ actions: inout [Action]) {
        if self.remove(id, failure: failure, &actions) { self.releaseBlocked() }
    }

    /// Finishes `ids` (in that order), then releases the blocked IO they held: one scan of
    /// the blocked IO for however many finish.
    private mutating func finish(_ ids: [UInt64], failure: Failure?, _ actions: inout [Action]) {
        var releases = false
        for id in ids where self.remove(id, failure: failure, &actions) { releases = true }
        if releases { self.releaseBlocked() }
    }

    /// Answers IO `id` and forgets it; true if it was a modification (it may have held others).
    private mutating func remove(_ id: UInt64, failure: Failure?, _ actions: inout [Action]) -> Bool {
        guard let entry = self.entries.removeValue(forKey: id) else { return false }
        if let i = self.queue.firstIndex(of: id) { self.queue.remove(at: i) }
        if let i = self.blocked.firstIndex(of: id) { self.blocked.remove(at: i) }
        if entry.phase == .fenceHeld, let i = self.fenceHeld.firstIndex(of: id) { self.fenceHeld.remove(at: i) }
        actions.append(.complete(id: id, failure: failure))
        return entry.io.operation.modifies
    }

    /// Releases, in id order, each blocked IO that no earlier unanswered modification overlaps.
    private mutating func releaseBlocked() {
        guard !self.blocked.isEmpty else { return }
        var still: [UInt64] = []
        for b in self.blocked {
            guard let be = self.entries[b] else { continue }
            if self.heldBack(b, be.io) {
                still.append(b)
            } else {
                self.entries[b]!.phase = .queued
                self.insertQueued(b)
            }
        }
        self.blocked = still
    }

    /// Whether an earlier unanswered modification (other than those in `except`) overlaps `io`.
    private func heldBack(_ id: UInt64, _ io: IO, except: Set<UInt64> = []) -> Bool {
        self.entries.contains { other in
            other.key < id && other.value.io.operation.modifies && other.value.io.overlaps(io) && !except.contains(other.key)
        }
    }

    private mutating func sendIO(_ id: UInt64, on path: Int, _ actions: inout [Action]) {
        let send = self.nextSend
        self.nextSend += 1
        self.entries[id]!.phase = .sent(path: path, send: send)
        self.entries[id]!.sends += 1
        self.inFlight[path] += 1
        self.inFlightBytes[path] += Self.counted(self.entries[id]!.io)
        actions.append(.send(id: id, path: path, send: send))
    }

    /// Sends each Fence not on the wire on a live path (the first up from `nextPath`).
    private mutating func sendFences(_ actions: inout [Action]) {
        guard self.livePaths > 0 else { return }
        for link in self.fences.keys.sorted() where self.fences[link]! == nil {
            var path = self.nextPath
            while !self.pathUp[path] { path = (path + 1) % self.pathCount }
            let send = self.nextSend
            self.nextSend += 1
            self.fences[link] = .some(FenceSend(path: path, send: send))
            actions.append(.fence(link: link, path: path, send: send))
        }
    }

    /// Fails every modification that waits for a fence (held in doubt, or queued), and those
    /// that this releases from being blocked behind them.
    private mutating func failWaitingModifications(_ actions: inout [Action]) {
        var doomed = Set(self.fenceHeld + self.queue.filter { self.entries[$0]!.io.operation.modifies })
        if doomed.isEmpty { return }
        // A blocked modification that only doomed ones hold back would be released by their
        // end and then fail too; one held back by one in flight waits for its answer.
        for b in self.blocked.sorted() where !self.heldBack(b, self.entries[b]!.io, except: doomed) {  // all modifications
            doomed.insert(b)
        }
        self.finish(doomed.sorted(), failure: .fenceTimedOut, &actions)
    }

    private mutating func choosePath(for io: IO) -> Int? {
        var best: Int?
        for k in 0..<self.pathCount {
            let p = (self.nextPath + k) % self.pathCount
            guard self.hasRoom(p, for: io) else { continue }
            switch self.policy {
            case .roundRobin:
                self.nextPath = (p + 1) % self.pathCount
                return p
            case .minInflight:
                if best == nil || self.inFlight[p] < self.inFlight[best!] { best = p }
            }
        }
        if let best { self.nextPath = (best + 1) % self.pathCount }
        return best
    }

    /// Sends what is queued on live paths with room, in id order; arms the timer when IO
    /// waits with no path up.
    private mutating func dispatch(_ actions: inout [Action]) {
        // Each pending fence has its timer from its start until it is answered or the timer
        // expires (it is then in `timedOutFences` until answered).
        if !self.fenceTimers.isEmpty || !self.timedOutFences.isEmpty {
            for link in self.fenceTimers.sorted() where self.fences[link] == nil {
                self.fenceTimers.remove(link)
                actions.append(.cancelFenceTimer(link))
            }
            self.timedOutFences = self.timedOutFences.filter { self.fences[$0] != nil }
        }
        if !self.fences.isEmpty {
            self.sendFences(&actions)
            for link in self.fences.keys.sorted() where !self.fenceTimers.contains(link) && !self.timedOutFences.contains(link) {
                self.fenceTimers.insert(link)
                actions.append(.armFenceTimer(link))
            }
        }
        if self.failingModifications { self.failWaitingModifications(&actions) }
        if self.fences.isEmpty {
            while let head = self.queue.first, let path = self.choosePath(for: self.entries[head]!.io) {
                self.queue.removeFirst()
                self.sendIO(head, on: path, &actions)
            }
        } else {
            // While a connection is being fenced no modification goes out; reads do, in order.
            var kept: [UInt64] = []
            var full = false
            for id in self.queue {
                let io = self.entries[id]!.io
                if full || io.operation.modifies {
                    kept.append(id)
                } else if let path = self.choosePath(for: io) {
                    self.sendIO(id, on: path, &actions)
                } else {
                    full = true
                    kept.append(id)
                }
            }
            self.queue = kept
        }
        if self.livePaths == 0, self.waiting > 0, !self.timerArmed {
            self.timerArmed = true
            actions.append(.armNoPathTimer)
        } else if self.waiting == 0, self.timerArmed {
            // What waited is gone (failed by a fence's timer): the next IO to wait gets a
            // whole wait of its own, not the rest of this one.
            self.timerArmed = false
            actions.append(.cancelNoPathTimer)
        }
    }
}
