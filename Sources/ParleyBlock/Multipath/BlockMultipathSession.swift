import Logging
#if canImport(Glibc)
import Glibc
#endif
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Parley

/// A block session over several paths (RNBD's multipath): a session name, the addresses of
/// one server (or the same address several times, for more connections) and a path policy.
/// Devices opened through it keep working while at least one path lives: IO in flight on a
/// path that dies is re-sent on another, and the dead path reconnects in the background.
/// The ordering rules are `MultipathIOState`'s (docs/protocol.md, "Multipath").
///
/// Each open device has its own connection on every path (each one a block session of the
/// same name on the server, which lets them share the device's read-write open).
public struct BlockMultipathSession: Sendable {
    public struct Configuration: Sendable {
        public var sessionName: String
        public var paths: [ParleyAddress]
        public var policy: MultipathIOState.Policy
        /// How long IO waits when no path is up before it fails with EIO.
        public var ioTimeout: Duration
        /// Reconnect back-off: the first retry after `reconnectBase`, doubling up to `reconnectMax`.
        public var reconnectBase: Duration
        public var reconnectMax: Duration
        /// How long a path's connect, `SessionInfo` and `Open` may take together (when the
        /// device is opened, and at each reconnect) before the path counts as unreachable: a
        /// server that takes the connection and never answers does not hold a path (or the
        /// open) forever. Generous by default: a loaded machine can take seconds to connect.
        public var connectTimeout: Duration
        /// An IO whose path dies under it this many times fails.
        public var maxSends: Int
        /// IOs in flight per path (more wait in the queue).
        public var maxInFlightPerPath: Int
        /// Bytes of reads and writes in flight per path (more wait in the queue); below the
        /// server's per-session limit (`BlockService.Limits.maxInFlightBytes`, 256 MiB by
        /// default), which it answers with BUSY_SESSION, an EIO for the caller.
        public var maxInFlightBytesPerPath: UInt64
        public var client: ParleyClient.Configuration
        /// Where the paths' connections live. One event loop for a whole map keeps an IO on
        /// one thread from the NBD request to the answer (no thread hop, no wake-up).
        public var group: any EventLoopGroup
        /// Ask each path's server for DIRECT IO (docs/protocol.md 17.9), used where granted;
        /// false: every IO as an `Io` message (`parley block map --no-direct`).
        public var direct = true
        /// An IO a path leaves unanswered this long takes the path down (docs/protocol.md
        /// 17.8 rule 3): its connection is closed and its IO goes again elsewhere, fenced, as
        /// after any failover. nil (the default): such a path is kept, and the IO is only
        /// logged once it has waited `ioTimeout` (a flush of much data on slow storage may
        /// take that long and more).
        public var answerTimeout: Duration?

        public init(sessionName: String, paths: [ParleyAddress], policy: MultipathIOState.Policy = .roundRobin,
                    ioTimeout: Duration = .seconds(30), reconnectBase: Duration = .milliseconds(50), reconnectMax: Duration = .seconds(2),
                    connectTimeout: Duration = .seconds(60), maxSends: Int = 32, maxInFlightPerPath: Int = 256,
                    maxInFlightBytesPerPath: UInt64 = 128 << 20,
                    client: ParleyClient.Configuration = Self.defaultClient, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) {
            self.sessionName = sessionName
            self.paths = paths
            self.policy = policy
            self.ioTimeout = ioTimeout
            self.reconnectBase = reconnectBase
            self.reconnectMax = reconnectMax
            self.connectTimeout = connectTimeout
            self.maxSends = maxSends
            self.maxInFlightPerPath = maxInFlightPerPath
            self.maxInFlightBytesPerPath = maxInFlightBytesPerPath
            self.client = client
            self.group = group
        }

        /// The wait before retry `attempt` (1, 2, ...): `reconnectBase` doubling up to `reconnectMax`.
        func backoff(attempt: Int) -> Duration {
            var delay = self.reconnectBase
            for _ in 1..<max(1, min(attempt, 20)) { delay = min(delay * 2, self.reconnectMax) }
            return delay
        }

        /// Keepalives every second and a 5 s timeout, so that a path that goes silent is
        /// found dead (and its IO re-sent) in seconds rather than a minute; a path that sent
        /// a lone request waits up to 50 µs for its answer without sleeping (`ReplyPolling`).
        public static var defaultClient: ParleyClient.Configuration {
            var c = ParleyClient.Configuration.defaults
            c.limits.keepaliveInterval = .seconds(1)
            c.limits.keepaliveTimeout = .seconds(5)
            c.limits.replyPolling = .microseconds(50)
            return c
        }
    }

    public let configuration: Configuration
    let logger: Logger

    public init(_ configuration: Configuration, logger: Logger = Logger(label: "parley.block.multipath")) throws(BlockError) {
        guard !configuration.paths.isEmpty else { throw BlockError(.invalid, "a session needs at least one path") }
        guard BlockExportCatalog.validSessionName(configuration.sessionName) else {
            throw BlockError(.invalid, "bad session name \"\(configuration.sessionName)\": use 1-64 bytes of A-Z a-z 0-9 . _ -, not starting with '.'")
        }
        // Retries (reconnects, a Fence asked again) wait at least the base: never a hot loop.
        guard configuration.reconnectBase > .zero, configuration.reconnectMax >= configuration.reconnectBase else {
            throw BlockError(.invalid, "the reconnect back-off must be above zero and its maximum at least its base (\(configuration.reconnectBase), \(configuration.reconnectMax))")
        }
        guard configuration.ioTimeout > .zero else { throw BlockError(.invalid, "the IO timeout must be above zero") }
        guard configuration.maxSends > 0, configuration.maxInFlightPerPath > 0, configuration.maxInFlightBytesPerPath > 0 else {
            throw BlockError(.invalid, "maxSends, maxInFlightPerPath and maxInFlightBytesPerPath must be above zero (\(configuration.maxSends), \(configuration.maxInFlightPerPath), \(configuration.maxInFlightBytesPerPath))")
        }
        if let t = configuration.answerTimeout, t <= .zero { throw BlockError(.invalid, "the answer timeout must be above zero") }
        self.configuration = configuration
        self.logger = logger
    }

    /// Opens `path` (an export name or a path under the server's search path) on every path.
    /// Fails if the server refuses it on any path (unknown device, read-only export, ...), if
    /// the paths lead to devices of different geometry, or if no path can be reached.
    public func open(_ path: String, access: Parley_Block_V1_AccessMode = .readWrite) async throws -> BlockMultipathDevice {
        let device = BlockMultipathDevice(session: self, path: path, access: access)
        try await device.start()
        return device
    }
}

/// Why a multipath IO or open failed.
public struct BlockMultipathError: Error, Sendable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// The server answered with this status.
        case server(Parley_Block_V1_BlockStatus)
        /// No path was up for the configured IO timeout (EIO).
        case noPath
        /// The device is closed.
        case closed
        /// The IO's path died under it too many times (EIO).
        case tooManyResends
        /// A modification waited longer than the IO timeout for a fence (EIO).
        case fenceTimedOut
        /// The paths do not lead to the same device.
        case pathsDisagree
        /// No path could be reached.
        case unreachable
        /// The server answered the IO with a Parley ERROR rather than a block status (EIO).
        case refused
    }
    public var kind: Kind
    public var message: String
    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }
    public var description: String { self.message }
    /// The errno an NBD client or a kernel would see.
    public var errno: Int32 {
        switch self.kind {
        case .server(.readOnly): return EROFS
        case .server(.noSpace): return ENOSPC
        case .server(.invalid), .server(.outOfRange), .server(.tooLarge): return EINVAL
        case .server(.notSupported): return EOPNOTSUPP
        default: return EIO
        }
    }
}

/// A device open over every path of a multipath session. Its IO calls may be made from many
/// tasks at once (many in flight); each returns when the server has answered it on some path,
/// or fails (see `BlockMultipathError`).
public final class BlockMultipathDevice: Sendable {
    public let session: BlockMultipathSession
    public let path: String
    public let access: Parley_Block_V1_AccessMode
    /// This device's client instance on the server (SessionInfo.client_instance): its paths'
    /// connections may fence each other, and no other client's.
    let instance = UInt64.random(in: 1...UInt64.max)
    private let state: NIOLockedValueBox<State>
    private var logger: Logger { self.session.logger }

    /// What `status()` reports of one path.
    public struct PathStatus: Sendable, Codable, Equatable {
        public var address: String
        /// up, connecting, down
        public var state: String
        public var inFlight: Int
        public var sends: Int
        public var failures: Int
        public var connects: Int
        public var lastError: String?
    }

    public struct Status: Sendable, Codable, Equatable {
        public var session: String
        public var device: String
        public var access: String
        public var policy: String
        public var sizeBytes: UInt64
        public var blockSize: UInt32
        public var paths: [PathStatus]
        public var outstanding: Int
        public var waiting: Int
        public var reads: Int
        public var writes: Int
        public var flushes: Int
        public var otherOps: Int
        public var bytesRead: Int
        public var bytesWritten: Int
        public var resends: Int
        public var errors: Int
        public var closed: Bool
    }

    struct Path {
        var address: ParleyAddress
        var client: BlockClient?
        var deviceID: UInt32 = 0
        var connecting = false
        var connects = 0
        var sends = 0
        var failures = 0
        var lastError: String?
        /// Bumped on each connect, so that a late "closed" of an old connection is ignored.
        var generation = 0
    }

    struct Pending {
        var io: MultipathIOState.IO
        var fua: Bool
        var data: ByteBufferPieces?
        var complete: @Sendable (Result<ByteBufferPieces?, BlockMultipathError>) -> Void
        /// The server's answer to the latest send, passed on when the machine completes it.
        var result: Result<ByteBufferPieces?, BlockMultipathError>?
    }

    /// One send of an IO, as the answer watchdog tells them apart (a send again is another).
    struct Sent: Hashable {
        var id: UInt64
        var send: UInt64
    }

    struct Watched {
        var rounds: Int
        var logged = false
    }

    /// The machine's timers: the no-path timer, and one per pending fence.
    enum TimerKind: Hashable {
        case noPath
        case fence(MultipathIOState.Link)
    }

    /// A running timer's task, and its token (from a counter, new on each arm), so that a
    /// timer that fires after it was cancelled or armed again does nothing.
    struct Timer {
        var task: Task<Void, Never>?
        var token: Int
    }

    struct State {
        var machine: MultipathIOState
        var paths: [Path]
        var pending: [UInt64: Pending] = [:]
        var geometry: Parley_Block_V1_Geometry?
        /// The machine's running timers.
        var timers: [TimerKind: Timer] = [:]
        var lastTimerToken = 0
        var closed = false
        /// `close()` has begun (it runs once), and how it ended (for later callers).
        var closeStarted = false
        var closeOutcome: Result<Void, any Error>?
        var closeWaiters: [CheckedContinuation<Result<Void, any Error>, Never>] = []
        var reconnects: [Int: Task<Void, Never>] = [:]
        /// The server's connection id of each path connection, for fences.
        var linkIDs: [MultipathIOState.Link: UInt64] = [:]
        var drained: [CheckedContinuation<Void, Never>] = []
        /// The answer watchdog's task, and the sends it has seen on the wire: how many of
        /// its rounds in a row each has been there, and whether it was logged.
        var watchdog: Task<Void, Never>?
        var watched: [Sent: Watched] = [:]
        /// The machine's actions for one event, kept between events so that an IO allocates
        /// no array (taken out with `swap` while in use).
        var actions: [MultipathIOState.Action] = []
        var reads = 0, writes = 0, flushes = 0, otherOps = 0, bytesRead = 0, bytesWritten = 0, errors = 0
    }

    /// What to do outside the lock.
    enum Job {
        case send(id: UInt64, send: UInt64, path: Int, client: BlockClient, deviceID: UInt32, io: MultipathIOState.IO,
                  fua: Bool, data: ByteBufferPieces?)
        case resume(@Sendable (Result<ByteBufferPieces?, BlockMultipathError>) -> Void, Result<ByteBufferPieces?, BlockMultipathError>)
        case arm(TimerKind, token: Int)
        case cancel(Task<Void, Never>)
        case lost(path: Int, client: BlockClient?, reason: String)
        case fence(link: MultipathIOState.Link, send: UInt64, client: BlockClient, target: UInt64)
        case drained([CheckedContinuation<Void, Never>])
    }

    /// Jobs in order: the first two without an array (an IO's send, or an answer and the send
    /// it made room for: what nearly every event yields), any more in one.
    struct Jobs {
        private var first: Job?
        private var second: Job?
        private var rest: [Job] = []

        var isEmpty: Bool { self.first == nil }

        mutating func append(_ job: Job) {
            if self.first == nil {
                self.first = job
            } else if self.second == nil {
                self.second = job
            } else {
                self.rest.append(job)
            }
        }

        func forEach(_ body: (Job) -> Void) {
            if let first = self.first { body(first) }
            if let second = self.second { body(second) }
            for job in self.rest { body(job) }
        }
    }

    init(session: BlockMultipathSession, path: String, access: Parley_Block_V1_AccessMode) {
        self.session = session
        self.path = path
        self.access = access
        let c = session.configuration
        self.state = NIOLockedValueBox(State(
            machine: MultipathIOState(paths: c.paths.count, policy: c.policy, maxSends: c.maxSends, maxInFlightPerPath: c.maxInFlightPerPath,
                                      maxInFlightBytesPerPath: c.maxInFlightBytesPerPath),
            paths: c.paths.map { Path(address: $0) }
        ))
    }

    /// The device's geometry (the same on every path).
    public var geometry: Parley_Block_V1_Geometry { self.state.withLockedValue { $0.geometry ?? Parley_Block_V1_Geometry() } }

    // MARK: - Opening and paths

    enum ConnectOutcome: Sendable {
        case up(BlockClient, BlockClient.Device)
        case refused(BlockError)
        case unreachable(String)
    }

    /// One connect attempt, ended once by whichever comes first: the connect and open, the
    /// connect timeout, or the cancellation of the task waiting for it. A connection the
    /// attempt made is closed unless the attempt ends with it up.
    final class ConnectAttempt: Sendable {
        private struct State {
            var continuation: CheckedContinuation<ConnectOutcome, Never>?
            var client: ParleyClient?
            var outcome: ConnectOutcome?
        }
        private let state = NIOLockedValueBox(State())

        /// The waiter: answered at once if the attempt has ended already.
        func wait(_ continuation: CheckedContinuation<ConnectOutcome, Never>) {
            let outcome = self.state.withLockedValue { s -> ConnectOutcome? in
                if s.outcome == nil { s.continuation = continuation }
                return s.outcome
            }
            if let outcome { continuation.resume(returning: outcome) }
        }

        /// The connection is up (its session and device not yet open); false if the attempt
        /// has ended, and the connection is to be closed.
        func connected(_ client: ParleyClient) -> Bool {
            self.state.withLockedValue { s in
                if s.outcome != nil { return false }
                s.client = client
                return true
            }
        }

        func end(_ outcome: ConnectOutcome) {
            let (first, continuation, client) = self.state.withLockedValue { s -> (Bool, CheckedContinuation<ConnectOutcome, Never>?, ParleyClient?) in
                if s.outcome != nil { return (false, nil, nil) }
                s.outcome = outcome
                defer { s.continuation = nil; s.client = nil }
                return (true, s.continuation, s.client)
            }
            guard first else {
                if case .up(let late, _) = outcome { late.closeConnection() }  // ended already: timed out or cancelled
                return
            }
            if case .up = outcome {} else { client?.close() }
            continuation?.resume(returning: outcome)
        }
    }

    /// Connects path `index` and opens the device there, within `connectTimeout`: a server
    /// that takes the connection but never answers the handshake, `SessionInfo` or `Open`
    /// counts as unreachable, and its connection is closed (as it is when the waiting task
    /// is cancelled: a reconnect while the device closes).
    private func connect(_ index: Int) async -> ConnectOutcome {
        let timeout = self.session.configuration.connectTimeout
        let attempt = ConnectAttempt()
        let timer = Task {
            try? await Task.sleep(for: timeout)
            if !Task.isCancelled { attempt.end(.unreachable("no answer within \(timeout) (connect, SessionInfo and Open)")) }
        }
        Task {
            attempt.end(await self.connectNow(index, attempt))
            timer.cancel()
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { attempt.wait($0) }
        } onCancel: {
            timer.cancel()
            attempt.end(.unreachable("cancelled"))
        }
    }

    private func connectNow(_ index: Int, _ attempt: ConnectAttempt) async -> ConnectOutcome {
        let address = self.session.configuration.paths[index]
        let c = self.session.configuration
        let client: BlockClient
        do {
            client = try await BlockClient.connect(to: address, sessionName: c.sessionName, clientInstance: self.instance, direct: c.direct, configuration: c.client,
                                                   logger: self.logger, group: c.group, connected: { attempt.connected($0) })
        } catch let e as BlockError {
            return .refused(e)
        } catch {
            return .unreachable("\(error)")
        }
        do {
            let device = try await client.open(self.path, access: self.access)
            return .up(client, device)
        } catch let e as BlockError {
            client.closeConnection()
            return .refused(BlockError(e.status, "\(address): \(e.message)"))
        } catch {
            client.closeConnection()
            return .unreachable("\(error)")
        }
    }

    static func sameDevice(_ a: Parley_Block_V1_Geometry, _ b: Parley_Block_V1_Geometry) -> Bool {
        a.sizeBytes == b.sizeBytes && a.logicalBlockSize == b.logicalBlockSize && a.maxIoSize == b.maxIoSize
    }

    func start() async throws {
        let c = self.session.configuration
        let outcomes = await withTaskGroup(of: (Int, ConnectOutcome).self) { group in
            for i in c.paths.indices {
                group.addTask { (i, await self.connect(i)) }
            }
            var all: [(Int, ConnectOutcome)] = []
            for await r in group { all.append(r) }
            return all.sorted { $0.0 < $1.0 }
        }
        func closeAll() {
            for (_, o) in outcomes { if case .up(let client, _) = o { client.closeConnection() } }
        }
        // A refusal on any path is the answer: the device does not exist there, or may not be
        // opened so (a read-only export, a busy device).
        for (i, o) in outcomes {
            if case .refused(let e) = o {
                closeAll()
                throw BlockMultipathError(.server(e.status), "path \(i + 1) (\(c.paths[i])) refused \(self.path): \(e.message)")
            }
        }
        var geometry: Parley_Block_V1_Geometry?
        var first = 0
        for (i, o) in outcomes {
            guard case .up(_, let d) = o else { continue }
            if let g = geometry {
                if !Self.sameDevice(g, d.geometry) {
                    closeAll()
                    throw BlockMultipathError(.pathsDisagree, """
                        the paths of session "\(c.sessionName)" lead to different devices: \(self.path) on path \(first + 1) (\(c.paths[first])) \
                        has \(g.sizeBytes) bytes in \(g.logicalBlockSize)-byte blocks, on path \(i + 1) (\(c.paths[i])) \(d.geometry.sizeBytes) bytes \
                        in \(d.geometry.logicalBlockSize)-byte blocks
                        """)
                }
            } else {
                geometry = d.geometry
                first = i
            }
        }
        guard let geometry else {
            let reasons = outcomes.map { i, o -> String in
                if case .unreachable(let why) = o { return "path \(i + 1) (\(c.paths[i])): \(why)" }
                return ""
            }.filter { !$0.isEmpty }
            throw BlockMultipathError(.unreachable, "no path of session \"\(c.sessionName)\" could be reached: \(reasons.joined(separator: "; "))")
        }
        self.state.withLockedValue { $0.geometry = geometry }
        for (i, o) in outcomes {
            switch o {
            case .up(let client, let device):
                self.attach(i, client: client, device: device)
            case .unreachable(let why):
                self.logger.warning("path down", metadata: self.meta(i, ["error": "\(why)"]))
                self.state.withLockedValue { $0.paths[i].lastError = why }
                self.scheduleReconnect(i, attempt: 1)
            case .refused:
                break
            }
        }
        self.startWatchdog()
    }

    // MARK: - The answer watchdog

    /// Rounds of the watchdog per timeout: a send counts as unanswered for a timeout once it
    /// has been on the wire at that many rounds in a row, so between the timeout and a
    /// quarter more. No clock is read per IO.
    static let watchRounds = 4

    /// Looks at the IO on the wire every quarter of the answer timeout (or of the IO timeout
    /// without one): logs a send unanswered for the IO timeout, and with an answer timeout
    /// takes down the path of one unanswered that long (docs/protocol.md 17.8 rule 3).
    private func startWatchdog() {
        let c = self.session.configuration
        let period = max(min(c.answerTimeout ?? c.ioTimeout, c.ioTimeout) / Self.watchRounds, .milliseconds(10))
        let task = Task {
            while !Task.isCancelled {
                try? await Task.sleep(for: period)
                if Task.isCancelled { return }
                self.watch(period: period)
            }
        }
        let keep = self.state.withLockedValue { s -> Bool in
            if s.closed { return false }
            s.watchdog = task
            return true
        }
        if !keep { task.cancel() }
    }

    /// One round of the watchdog.
    func watch(period: Duration) {
        let c = self.session.configuration
        let logAfter = Int((c.ioTimeout / period).rounded(.up))
        let downAfter = c.answerTimeout.map { Int(($0 / period).rounded(.up)) }
        var slow: [(path: Int, io: MultipathIOState.IO)] = []
        let stuck = self.state.withLockedValue { s -> [(path: Int, generation: Int, io: MultipathIOState.IO)] in
            var seen: [Sent: Watched] = [:]
            var stuck: [Int: MultipathIOState.IO] = [:]
            s.machine.forEachSent { id, send, path in
                let key = Sent(id: id, send: send)
                var w = s.watched[key].map { Watched(rounds: $0.rounds + 1, logged: $0.logged) } ?? Watched(rounds: 0)
                if w.rounds >= logAfter, !w.logged, let io = s.machine.io(id) {
                    w.logged = true
                    slow.append((path, io))
                }
                if let downAfter, w.rounds >= downAfter, stuck[path] == nil, let io = s.machine.io(id) { stuck[path] = io }
                seen[key] = w
            }
            s.watched = seen
            return stuck.sorted { $0.key < $1.key }.map { ($0.key, s.paths[$0.key].generation, $0.value) }
        }
        for (path, io) in slow {
            self.logger.warning("\(io.operation.rawValue) of \(io.length) bytes at \(io.offset) has had no answer on this path for \(c.ioTimeout)",
                                metadata: self.meta(path))
        }
        for (path, generation, io) in stuck {
            self.pathFailed(path, generation: generation,
                            reason: "\(io.operation.rawValue) of \(io.length) bytes at \(io.offset) had no answer for \(c.answerTimeout ?? .zero) (--answer-timeout)")
        }
    }

    private func meta(_ i: Int, _ extra: Logger.Metadata = [:]) -> Logger.Metadata {
        var m: Logger.Metadata = [
            "session": "\(self.session.configuration.sessionName)", "device": "\(self.path)",
            "path": "\(i + 1)", "address": "\(self.session.configuration.paths[i])",
        ]
        m.merge(extra) { $1 }
        return m
    }

    /// A path's device is open: IO may go there.
    private func attach(_ i: Int, client: BlockClient, device: BlockClient.Device) {
        let (jobs, generation, ok) = self.state.withLockedValue { s -> (Jobs, Int, Bool) in
            if s.closed { return (Jobs(), 0, false) }
            s.paths[i].client = client
            s.paths[i].deviceID = device.id
            s.paths[i].connecting = false
            s.paths[i].connects += 1
            s.paths[i].generation += 1
            s.paths[i].lastError = nil
            var jobs = Jobs()
            let actions = s.machine.pathUp(i)
            s.linkIDs[s.machine.link(of: i)] = client.connectionID
            self.resolve(actions, &s, &jobs)
            return (jobs, s.paths[i].generation, true)
        }
        guard ok else {
            client.closeConnection()
            return
        }
        self.logger.info("path up", metadata: self.meta(i, ["device_id": "\(device.id)"]))
        self.run(jobs)
        Task {
            await client.client.closed()
            self.pathFailed(i, generation: generation, reason: "connection closed")
        }
    }

    /// A path's connection ended (or failed an IO): its IO is re-sent elsewhere and it reconnects.
    private func pathFailed(_ i: Int, generation: Int, reason: String) {
        let jobs = self.state.withLockedValue { s -> Jobs in
            guard s.paths[i].generation == generation, s.paths[i].client != nil else { return Jobs() }
            var jobs = Jobs()
            self.resolve(s.machine.pathDown(i), &s, &jobs, lostBecause: reason)
            if s.paths[i].client != nil {
                // pathDown on a path the machine already took down yields no .pathLost
                jobs.append(.lost(path: i, client: s.paths[i].client, reason: reason))
                s.paths[i].client = nil
            }
            return jobs
        }
        self.run(jobs)
    }

    private func scheduleReconnect(_ i: Int, attempt: Int) {
        let wait = self.session.configuration.backoff(attempt: attempt)
        let task = Task {
            try? await Task.sleep(for: wait)
            await self.reconnect(i, attempt: attempt)
        }
        let keep = self.state.withLockedValue { s -> Bool in
            if s.closed { return false }
            s.paths[i].connecting = true
            s.reconnects[i] = task
            return true
        }
        if !keep { task.cancel() }
    }

    private func reconnect(_ i: Int, attempt: Int) async {
        if self.state.withLockedValue({ $0.closed }) { return }
        switch await self.connect(i) {
        case .up(let client, let device):
            let expected = self.state.withLockedValue { $0.geometry }
            if let expected, !Self.sameDevice(expected, device.geometry) {
                let why = "\(self.path) there is not the device the other paths reach (\(device.geometry.sizeBytes) bytes, not \(expected.sizeBytes))"
                self.logger.error("path refused", metadata: self.meta(i, ["error": "\(why)"]))
                client.closeConnection()
                self.state.withLockedValue { $0.paths[i].lastError = why }
                self.scheduleReconnect(i, attempt: attempt + 1)
                return
            }
            self.attach(i, client: client, device: device)
        case .refused(let e):
            if attempt == 1 { self.logger.error("path refused", metadata: self.meta(i, ["error": "\(e.message)"])) }
            self.state.withLockedValue { $0.paths[i].lastError = e.message }
            self.scheduleReconnect(i, attempt: attempt + 1)
        case .unreachable(let why):
            if attempt == 1 { self.logger.warning("path reconnect failed, retrying with back-off", metadata: self.meta(i, ["error": "\(why)"])) }
            self.state.withLockedValue { $0.paths[i].lastError = why }
            self.scheduleReconnect(i, attempt: attempt + 1)
        }
    }

    // MARK: - Actions

    /// Turns the machine's actions into jobs, under the lock (so that a send goes to the
    /// connection the machine believed up, never to a newer one).
    /// `lostBecause`: why a path these actions take down went (default: an IO failed on it).
    private func resolve(_ actions: [MultipathIOState.Action], _ s: inout State, _ jobs: inout Jobs, lostBecause: String? = nil) {
        for action in actions {
            switch action {
            case .send(let id, let path, let send):
                guard let p = s.pending[id], let client = s.paths[path].client else {
                    preconditionFailure("send of unknown IO \(id) or on a path without a connection")
                }
                s.paths[path].sends += 1
                jobs.append(.send(id: id, send: send, path: path, client: client, deviceID: s.paths[path].deviceID,
                                  io: p.io, fua: p.fua, data: p.data))
            case .complete(let id, let failure):
                guard let p = s.pending.removeValue(forKey: id) else { continue }
                let result: Result<ByteBufferPieces?, BlockMultipathError>
                switch failure {
                case nil:
                    result = p.result ?? .failure(BlockMultipathError(.noPath, "no answer"))
                case .noPath:
                    result = .failure(BlockMultipathError(.noPath, "\(p.io.operation.rawValue) of \(self.path) failed: no path of session \"\(self.session.configuration.sessionName)\" came up within \(self.session.configuration.ioTimeout)"))
                case .closed:
                    result = .failure(BlockMultipathError(.closed, "\(self.path) is closed"))
                case .tooManyResends(let n):
                    result = .failure(BlockMultipathError(.tooManyResends, "\(p.io.operation.rawValue) of \(self.path) failed: its path died under it \(n) times"))
                case .fenceTimedOut:
                    result = .failure(BlockMultipathError(.fenceTimedOut, "\(p.io.operation.rawValue) of \(self.path) failed: the server has not answered the fence of a dead path connection within \(self.session.configuration.ioTimeout), so no modification can be sent safely"))
                }
                if case .failure = result { s.errors += 1 } else {
                    switch p.io.operation {
                    case .read:
                        s.reads += 1
                        s.bytesRead += Int(p.io.length)
                    case .write:
                        s.writes += 1
                        s.bytesWritten += Int(p.io.length)
                    case .flush: s.flushes += 1
                    case .discard, .writeZeroes: s.otherOps += 1
                    }
                }
                jobs.append(.resume(p.complete, result))
                if s.pending.isEmpty, !s.drained.isEmpty {
                    jobs.append(.drained(s.drained))
                    s.drained = []
                }
            case .armNoPathTimer: Self.arm(.noPath, &s, &jobs)
            case .armFenceTimer(let link): Self.arm(.fence(link), &s, &jobs)
            case .cancelNoPathTimer: Self.cancel(.noPath, &s, &jobs)
            case .cancelFenceTimer(let link): Self.cancel(.fence(link), &s, &jobs)
            case .fence(let link, let path, let send):
                // No connection on a path the machine has up: the device is closed; the fence is moot.
                guard let client = s.paths[path].client else { continue }
                // The id stays until the fence is over: a fence whose path dies goes again.
                jobs.append(.fence(link: link, send: send, client: client, target: s.linkIDs[link] ?? 0))
            case .pathLost(let path):
                // The dead connection's id is kept only while it has a fence to get.
                let dead = s.machine.link(of: path)
                if !s.machine.fencePending(dead) { s.linkIDs[dead] = nil }
                s.paths[path].failures += 1
                jobs.append(.lost(path: path, client: s.paths[path].client, reason: lostBecause ?? "IO failed on it"))
                s.paths[path].client = nil
            }
        }
    }

    /// Arms the timer `kind` with a new token (a timer of that kind still running is cancelled).
    private static func arm(_ kind: TimerKind, _ s: inout State, _ jobs: inout Jobs) {
        Self.cancel(kind, &s, &jobs)
        s.lastTimerToken += 1
        s.timers[kind] = Timer(task: nil, token: s.lastTimerToken)
        jobs.append(.arm(kind, token: s.lastTimerToken))
    }

    /// Cancels the timer `kind`, if it runs.
    private static func cancel(_ kind: TimerKind, _ s: inout State, _ jobs: inout Jobs) {
        if let t = s.timers.removeValue(forKey: kind)?.task { jobs.append(.cancel(t)) }
    }

    /// Runs an event of the machine that appends its actions to the array the state keeps
    /// (no array per IO), and resolves them into jobs.
    private func resolving(_ s: inout State, _ event: (inout State, inout [MultipathIOState.Action]) -> Void) -> Jobs {
        var actions: [MultipathIOState.Action] = []
        swap(&actions, &s.actions)
        event(&s, &actions)
        var jobs = Jobs()
        self.resolve(actions, &s, &jobs)
        actions.removeAll(keepingCapacity: true)
        swap(&actions, &s.actions)
        return jobs
    }

    private func run(_ jobs: Jobs) {
        jobs.forEach { job in
            switch job {
            case .send(let id, let send, let path, let client, let deviceID, let io, let fua, let data):
                self.perform(id: id, send: send, path: path, client: client, deviceID: deviceID, io: io, fua: fua, data: data)
            case .resume(let complete, let result):
                complete(result)
            case .arm(let kind, let token):
                let timeout = self.session.configuration.ioTimeout
                let task = Task {
                    try? await Task.sleep(for: timeout)
                    if Task.isCancelled { return }
                    let fired = self.state.withLockedValue { s -> (jobs: Jobs, tell: Bool)? in
                        guard s.timers[kind]?.token == token, !s.closed else { return nil }
                        s.timers[kind] = nil
                        var jobs = Jobs()
                        switch kind {
                        case .noPath:
                            self.resolve(s.machine.noPathTimerFired(), &s, &jobs)
                            return (jobs, !jobs.isEmpty)
                        case .fence(let link):
                            self.resolve(s.machine.fenceTimerFired(link), &s, &jobs)
                            return (jobs, s.machine.timedOutFences.contains(link))
                        }
                    }
                    guard let (jobs, tell) = fired else { return }
                    let meta: Logger.Metadata = ["session": "\(self.session.configuration.sessionName)", "device": "\(self.path)"]
                    switch kind {
                    case .noPath where tell: self.logger.error("no path for \(timeout): failing IO", metadata: meta)
                    case .fence(let link) where tell:
                        self.logger.error("the fence of \(link) has had no answer for \(timeout): modifications fail (EIO) until it is answered; reads go on",
                                          metadata: meta)
                    default: break
                    }
                    self.run(jobs)
                }
                self.state.withLockedValue { s in
                    if s.timers[kind]?.token == token { s.timers[kind]!.task = task } else { task.cancel() }
                }
            case .cancel(let task):
                task.cancel()
            case .lost(let path, let client, let reason):
                client?.closeConnection()
                let closed = self.state.withLockedValue { $0.closed }
                if !closed {
                    self.logger.warning("path down: \(reason); reconnecting", metadata: self.meta(path))
                    self.state.withLockedValue { $0.paths[path].lastError = reason }
                    self.scheduleReconnect(path, attempt: 1)
                }
            case .drained(let waiters):
                for w in waiters { w.resume() }
            case .fence(let link, let send, let client, let target):
                self.fence(link, send: send, client: client, target: target)
            }
        }
    }

    /// Fences a dead path connection before its modifications in doubt are sent again
    /// (docs/protocol.md 17.8). A server that cannot (no connection id, or it refuses) leaves
    /// the rule without its last step: they are sent again anyway, as before fences existed.
    private func fence(_ link: MultipathIOState.Link, send: UInt64, client: BlockClient, target: UInt64) {
        Task {
            var outcome = MultipathIOState.Outcome.done
            if target == 0 {
                outcome = .refused
                self.logger.warning("cannot fence \(link): the server gave it no connection id; sending its IO again unfenced",
                                    metadata: self.meta(link.path))
            } else {
                var attempt = 0
                while true {
                    do {
                        try await client.fence([target])
                        self.logger.info("fenced \(link) (server connection \(target)) before sending its IO again", metadata: self.meta(link.path))
                    } catch {
                        switch Self.fenceFailure(error, connectionEnded: client.client.connection.endReason != nil) {
                        case .refused:
                            outcome = .refused
                            let why = (error as? BlockError)?.message ?? "\(error)"
                            self.logger.warning("the server refused to fence \(link): \(why); sending its IO again unfenced", metadata: self.meta(link.path))
                        case .pathFailed:
                            outcome = .pathFailed
                        case .again:
                            // Not an answer about the fence: ask again on the same path. The
                            // fence timer bounds what waits meanwhile (17.8 rule 4).
                            attempt += 1
                            let delay = self.session.configuration.backoff(attempt: attempt)
                            self.logger.warning("fencing \(link) failed: \(error); asking again in \(delay)", metadata: self.meta(link.path))
                            try? await Task.sleep(for: delay)
                            // Closed, or the fence went on another path meanwhile (this one died): that send asks.
                            if self.state.withLockedValue({ $0.closed || $0.machine.fenceSent(of: link)?.send != send }) { return }
                            continue
                        }
                    }
                    break
                }
            }
            let jobs = self.state.withLockedValue { s -> Jobs in
                var jobs = Jobs()
                if s.closed { return jobs }
                let actions = s.machine.fenceCompleted(link: link, send: send, outcome: outcome)
                if !s.machine.fencePending(link) { s.linkIDs[link] = nil }
                self.resolve(actions, &s, &jobs)
                return jobs
            }
            self.run(jobs)
        }
    }

    /// Whether a failed request's error is the server's answer on a connection that lives on
    /// (an ERROR response: its final word on that request), not the path failing. Codes that
    /// say the server is going away or gave the request up are path failures all the same.
    static func isRefusal(_ error: any Error, connectionEnded: Bool) -> Bool {
        guard let e = error as? ParleyError, !connectionEnded else { return false }
        return !Self.failsPath(e.code)
    }

    /// Parley ERROR codes that are failures of the path even on a connection that lives on
    /// (the server is going away, or gave the request up): for IO and Fence alike.
    static func failsPath(_ code: ParleyError.Code) -> Bool {
        switch code {
        case .shuttingDown, .cancelled, .timeout, .connectionClosed, .sessionReset, .sessionSuperseded: return true
        default: return false
        }
    }

    /// Block statuses that are failures of the path, not answers to the request (17.8 rule 2):
    /// for IO and Fence alike.
    static func failsPath(_ status: Parley_Block_V1_BlockStatus) -> Bool {
        switch status {
        case .shuttingDown, .unknownDevice, .noSession, .fenced: return true
        default: return false
        }
    }

    /// What a failed Fence means (docs/protocol.md 17.8 rule 4).
    enum FenceFailure: Equatable {
        /// The server will not fence: the IO in doubt goes again unfenced.
        case refused
        /// The path failed: the fence goes on another path.
        case pathFailed
        /// An error that says nothing about fencing (a handler failure, an unknown code) on a
        /// connection that lives on: the Fence is asked again on the same path. Taking it for
        /// a refusal would send the IO in doubt again unfenced, the unsafe direction.
        case again
    }

    /// Classifies a Fence's failure: a refusal only when the server says so (a block status
    /// other than those that fail a path for IO too, or a Parley ERROR that is permanent: it
    /// does not know Fence, or will not let this client fence, or finds the request invalid).
    static func fenceFailure(_ error: any Error, connectionEnded: Bool) -> FenceFailure {
        if let e = error as? BlockError { return Self.failsPath(e.status) ? .pathFailed : .refused }
        guard let e = error as? ParleyError, !connectionEnded, !Self.failsPath(e.code) else { return .pathFailed }
        switch e.code {
        case .unknownMessageType, .permissionDenied, .invalidArgument: return .refused
        default: return .again
        }
    }

    /// What a path's answer to an IO means (docs/protocol.md 17.8 rule 2): done; the server's
    /// refusal, which the IO's caller gets (with its reason); or a failure of the path, after
    /// which the IO goes again on another (no result: the machine decides). Every sender of IO
    /// on a path classifies its answers here. `connectionEnded` is read only for errors that
    /// are not block statuses.
    static func outcome(of answer: Result<ByteBufferPieces?, any Error>, io: MultipathIOState.IO, device: String,
                        connectionEnded: @autoclosure () -> Bool) -> (MultipathIOState.Outcome, Result<ByteBufferPieces?, BlockMultipathError>?) {
        switch answer {
        case .success(let reply):
            return (.done, .success(reply))
        case .failure(let e as BlockError):
            guard !Self.failsPath(e.status) else { return (.pathFailed, nil) }
            return (.refused, .failure(BlockMultipathError(.server(e.status), "\(io.operation.rawValue) of \(io.length) bytes at \(io.offset) on \(device): \(e.message)")))
        case .failure(let e):
            guard Self.isRefusal(e, connectionEnded: connectionEnded()) else { return (.pathFailed, nil) }
            return (.refused, .failure(BlockMultipathError(.refused, "\(io.operation.rawValue) of \(io.length) bytes at \(io.offset) on \(device): the server answered \(e)")))
        }
    }

    /// Sends one IO on a path. Its answer comes on the path connection's event loop, without
    /// a task or a continuation per IO: with the map's NBD endpoint on that loop too, a read
    /// is taken, sent, answered and replied to without a thread hop.
    private func perform(id: UInt64, send: UInt64, path: Int, client: BlockClient, deviceID: UInt32, io: MultipathIOState.IO, fua: Bool,
                         data: ByteBufferPieces?) {
        let operation: Parley_Block_V1_IoOperation
        switch io.operation {
        case .read: operation = .read
        case .write: operation = .write
        case .flush: operation = .flush
        case .discard: operation = .discard
        case .writeZeroes: operation = .writeZeroes
        }
        client.io(BlockClient.Device(id: deviceID, geometry: Parley_Block_V1_Geometry()), operation,
                  offset: io.offset, length: UInt32(io.length), dataPieces: data, fua: fua) { answer in
            let (outcome, result) = Self.outcome(of: answer, io: io, device: self.path,
                                                 connectionEnded: client.client.connection.endReason != nil)
            let jobs = self.state.withLockedValue { s -> Jobs in
                if let result { s.pending[id]?.result = result }
                return self.resolving(&s) { s, actions in s.machine.completed(id: id, send: send, outcome: outcome, into: &actions) }
            }
            self.run(jobs)
        }
    }

    // MARK: - IO

    /// Submits one IO; `complete` runs once, on any thread, with its answer (the data of a
    /// read, nil for other operations). For callers that do not want a task per IO.
    public func submit(_ io: MultipathIOState.IO, fua: Bool = false, data: ByteBuffer? = nil,
                       complete: @escaping @Sendable (Result<ByteBuffer?, BlockMultipathError>) -> Void) {
        self.submit(io, fua: fua, data: data.map { ByteBufferPieces($0) }, final: false) { complete($0.map { $0?.gathered() }) }
    }

    /// `submit` with data in pieces both ways: a write's data as the reads that brought it
    /// (sent without gathering them: `DirectFrame`), a large read's answer as the reads it
    /// arrived in (what the map's NBD endpoint writes on as it is).
    public func submit(_ io: MultipathIOState.IO, fua: Bool = false, dataPieces: ByteBufferPieces?,
                       complete: @escaping @Sendable (Result<ByteBufferPieces?, BlockMultipathError>) -> Void) {
        self.submit(io, fua: fua, data: dataPieces, final: false, complete: complete)
    }

    /// `final`: taken while closing (the last flush).
    private func submit(_ io: MultipathIOState.IO, fua: Bool, data: ByteBufferPieces?, final: Bool,
                        complete: @escaping @Sendable (Result<ByteBufferPieces?, BlockMultipathError>) -> Void) {
        // One IO's length travels as 32 bits (docs/protocol.md 17.2): longer is the caller's
        // mistake, refused here as the server would refuse it, not trapped at the conversion.
        guard io.length <= UInt64(UInt32.max) else {
            return complete(.failure(BlockMultipathError(.server(.tooLarge), "\(io.operation) of \(io.length) bytes: one IO carries at most \(UInt32.max) bytes")))
        }
        let jobs = self.state.withLockedValue { s -> Jobs in
            self.resolving(&s) { s, actions in
                // The entry must exist before the machine's actions (resolved after) refer to it.
                let id = s.machine.submit(io, final: final, into: &actions)
                s.pending[id] = Pending(io: io, fua: fua, data: data, complete: complete)
            }
        }
        self.run(jobs)
    }

    /// Submits one IO and waits for its answer (`final`: taken while closing).
    func submit(_ io: MultipathIOState.IO, fua: Bool = false, data: ByteBuffer? = nil, final: Bool = false) async throws -> ByteBuffer? {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<ByteBuffer?, any Error>) in
            self.submit(io, fua: fua, data: data.map { ByteBufferPieces($0) }, final: final) { result in
                continuation.resume(with: result.map { $0?.gathered() }.mapError { $0 as any Error })
            }
        }
    }

    public func read(offset: UInt64, length: UInt32) async throws -> ByteBuffer {
        try await self.submit(.init(.read, offset: offset, length: UInt64(length))) ?? ByteBuffer()
    }

    public func write(offset: UInt64, data: ByteBuffer, fua: Bool = false) async throws {
        _ = try await self.submit(.init(.write, offset: offset, length: UInt64(data.readableBytes)), fua: fua, data: data)
    }

    /// Makes every write acknowledged before this call durable.
    public func flush() async throws {
        _ = try await self.submit(.init(.flush, offset: 0, length: 0))
    }

    public func discard(offset: UInt64, length: UInt32, fua: Bool = false) async throws {
        _ = try await self.submit(.init(.discard, offset: offset, length: UInt64(length)), fua: fua)
    }

    public func writeZeroes(offset: UInt64, length: UInt32, fua: Bool = false) async throws {
        _ = try await self.submit(.init(.writeZeroes, offset: offset, length: UInt64(length)), fua: fua)
    }

    // MARK: - Status and close

    public func status() -> Status {
        self.state.withLockedValue { s in
            let g = s.geometry ?? Parley_Block_V1_Geometry()
            let c = self.session.configuration
            return Status(
                session: c.sessionName, device: self.path,
                access: self.access == .readOnly ? "ro" : self.access == .migration ? "migration" : "rw",
                policy: c.policy.rawValue, sizeBytes: g.sizeBytes, blockSize: g.logicalBlockSize,
                paths: s.paths.indices.map { i in
                    let p = s.paths[i]
                    return PathStatus(address: "\(p.address)", state: s.machine.isUp(i) ? "up" : p.connecting ? "connecting" : "down",
                                      inFlight: s.machine.inFlight(on: i), sends: p.sends, failures: p.failures, connects: p.connects,
                                      lastError: p.lastError)
                },
                outstanding: s.machine.outstanding, waiting: s.machine.waiting, reads: s.reads, writes: s.writes, flushes: s.flushes,
                otherOps: s.otherOps, bytesRead: s.bytesRead, bytesWritten: s.bytesWritten, resends: s.machine.resends, errors: s.errors,
                closed: s.closed
            )
        }
    }

    /// Waits until no IO is outstanding.
    public func drain() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let now = self.state.withLockedValue { s -> Bool in
                if s.pending.isEmpty { return true }
                s.drained.append(continuation)
                return false
            }
            if now { continuation.resume() }
        }
    }

    /// Refuses new IO, waits for what is in flight, flushes (read-write opens), closes the
    /// device on every path and the connections. The final flush's error, if any, is thrown
    /// after everything is closed.
    public func close() async throws {
        // New IO is refused from here: what is in flight when the connections close below
        // would be re-sent on paths without one.
        // Once only: a second close (or one racing the first) would send another final flush
        // to paths whose connections the first dropped. It waits for the first to end and
        // gets its outcome instead.
        let (first, waits) = self.state.withLockedValue { s -> (Bool, Bool) in
            guard !s.closeStarted else { return (false, false) }
            s.closeStarted = true
            _ = s.machine.close()
            return (true, s.machine.livePaths == 0 && !s.machine.failingFast && (!s.pending.isEmpty || self.access != .readOnly))
        }
        guard first else {
            let outcome = await withCheckedContinuation { (continuation: CheckedContinuation<Result<Void, any Error>, Never>) in
                let done = self.state.withLockedValue { s -> Result<Void, any Error>? in
                    if let outcome = s.closeOutcome { return outcome }
                    s.closeWaiters.append(continuation)
                    return nil
                }
                if let done { continuation.resume(returning: done) }
            }
            return try outcome.get()
        }
        if waits {
            self.logger.warning("closing with no path up: IO in flight and the final flush wait up to \(self.session.configuration.ioTimeout) for one",
                                metadata: ["session": "\(self.session.configuration.sessionName)", "device": "\(self.path)"])
        }
        await self.drain()
        var flushError: (any Error)?
        if self.access != .readOnly {
            do { _ = try await self.submit(.init(.flush, offset: 0, length: 0), final: true) } catch { flushError = error }
        }
        let (clients, tasks, unanswered) = self.state.withLockedValue { s -> ([(BlockClient, UInt32)], [Task<Void, Never>], Int) in
            let unanswered = s.machine.pendingFences
            let clients = s.paths.compactMap { p in p.client.map { ($0, p.deviceID) } }
            for i in s.paths.indices { s.paths[i].client = nil }
            let tasks = Array(s.reconnects.values) + s.timers.values.compactMap(\.task) + (s.watchdog.map { [$0] } ?? [])
            s.watchdog = nil
            s.reconnects = [:]
            s.timers = [:]
            s.closed = true
            return (clients, tasks, unanswered)
        }
        if unanswered > 0 {
            // docs/protocol.md 17.8 rule 6: not waited for; a copy of a write that failed may
            // still be carried out on the connection it died on.
            self.logger.warning("closing with \(unanswered) fence\(unanswered == 1 ? "" : "s") unanswered: a write that failed (EIO) on a connection not yet fenced may still land on the server",
                                metadata: ["session": "\(self.session.configuration.sessionName)", "device": "\(self.path)"])
        }
        for t in tasks { t.cancel() }
        // Every path's Close at once, each answered within the IO timeout or not waited for
        // (a server whose Close never comes must not hold the unmap): the connection goes
        // either way, and with it the server's open.
        let timeout = self.session.configuration.ioTimeout
        await withTaskGroup(of: Void.self) { group in
            for (client, id) in clients {
                group.addTask {
                    try? await client.close(BlockClient.Device(id: id, geometry: Parley_Block_V1_Geometry()), timeout: timeout)
                    client.closeConnection()
                }
            }
        }
        self.logger.info("device closed", metadata: ["session": "\(self.session.configuration.sessionName)", "device": "\(self.path)"])
        let outcome: Result<Void, any Error> = flushError.map { .failure($0) } ?? .success(())
        let waiters = self.state.withLockedValue { s -> [CheckedContinuation<Result<Void, any Error>, Never>] in
            s.closeOutcome = outcome
            defer { s.closeWaiters = [] }
            return s.closeWaiters
        }
        for w in waiters { w.resume(returning: outcome) }
        try outcome.get()
    }
}

