import Logging
import NIOConcurrencyHelpers
import NIOCore
import Parley
import Synchronization

/// The block protocol's server side: sessions, opens, IO and closes as Parley requests
/// (Protos/parley/block/v1/block.proto; docs/protocol.md, "Parley Block").
public final class BlockService: Sendable {
    /// The block protocol version this implementation speaks.
    public static let protocolVersion: UInt32 = 1
    /// Largest IO: what fits a default frame with room for the header and reply.
    public static let maximumIO: UInt32 = 8 << 20

    public struct Limits: Sendable {
        /// IOs in flight per session before new ones are refused with BLOCK_STATUS_BUSY_SESSION.
        public var maxInFlight = 1024
        /// Bytes of IO in flight per session before new ones are refused.
        public var maxInFlightBytes = 256 << 20
        /// Devices one connection keeps open at once (every Open counts, also of a device it
        /// has open already); a further Open is refused with BLOCK_STATUS_BUSY_SESSION.
        public var maxOpenDevices = 1024
        public init() {}
    }

    let catalog: BlockExportCatalog
    let devices: BlockDeviceTable
    let io: BlockIOExecutor
    let limits: Limits
    let logger: Logger
    private let sessions = NIOLockedValueBox<[ObjectIdentifier: BlockSession]>([:])
    /// Sessions by connection id, for Fence: from SessionInfo until the connection has ended
    /// and its IO has finished.
    /// The first id is drawn at random, so that a restarted server does not give out the ids
    /// of the one before (a client fencing a connection of the old process must not hit one
    /// of the new). Ids run from `firstConnectionID` up: one outside that range was never
    /// given out by this process, and a Fence of it is refused rather than taken as done.
    private let connections: NIOLockedValueBox<(byID: [UInt64: BlockSession], next: UInt64)>
    private let firstConnectionID: UInt64
    /// Read by every IO: an atomic, not a lock.
    private let shuttingDown = Atomic<Bool>(false)
    /// Held while a Fence checks that its connection is not fenced and marks its targets:
    /// two connections fencing each other at once would otherwise both pass the check and
    /// leave their client no path.
    private let fencing = NIOLock()
    /// Grant DIRECT IO to clients that ask (SessionInfo.direct_io; docs/protocol.md 17.9).
    let allowsDirect: Bool

    /// - Parameter direct: grant DIRECT IO to clients that ask for it (`parley block serve
    ///   --no-direct` turns it off, for comparisons).
    public init(catalog: BlockExportCatalog, devices: BlockDeviceTable, io: BlockIOExecutor, limits: Limits = Limits(),
                direct: Bool = true, logger: Logger = Logger(label: "parley.block")) {
        self.allowsDirect = direct
        self.catalog = catalog
        self.devices = devices
        self.io = io
        self.limits = limits
        self.logger = logger
        let first = UInt64.random(in: 1...(1 << 62))
        self.firstConnectionID = first
        self.connections = NIOLockedValueBox(([:], first))
    }

    /// A router with the block protocol's handlers.
    public func router() -> ParleyRouter {
        var router = ParleyRouter()
        self.register(on: &router)
        return router
    }

    public func register(on router: inout ParleyRouter) {
        router.on(Parley_Block_V1_SessionInfo.self) { [self] request, context in self.sessionInfo(request, context) }
        // Both open files (ListExports to read each export's geometry): on a blocking pool
        // (`BlockDeviceTable.runOpen`), so that a slow open never holds up an event loop.
        router.on(Parley_Block_V1_ListExports.self) { [self] _, context async throws in
            try await BlockDeviceTable.runOpen(on: context.connection.eventLoop) { self.listExports() }.get()
        }
        router.on(Parley_Block_V1_Open.self) { [self] request, context async throws in
            try self.authorize(request, context)
            return try await BlockDeviceTable.runOpen(on: context.connection.eventLoop) { self.open(request, context) }.get()
        }
        router.on(Parley_Block_V1_Close.self) { [self] request, context in self.close(request, context) }
        router.on(Parley_Block_V1_Fence.self) { [self] request, context async in await self.fence(request, context) }
        router.onWithData(Parley_Block_V1_Io.self, completing: { [self] request, context, respond in
            self.io(request, context, respond: respond)
        })
    }

    /// The capability an open needs: `block.read` for a read-only open, `block.write` for a
    /// read-write or migration open (`block.*` or `*` grant both; clients of method `none`
    /// have the server's anonymous capabilities, `*` by default). Refused opens are answered
    /// `permissionDenied` and logged with the entity's name; nothing is opened.
    func authorize(_ request: Parley_Block_V1_Open, _ context: ParleyRequestContext) throws(ParleyError) {
        let needed = request.accessMode == .readOnly ? "block.read" : "block.write"
        guard !context.session.grants(needed) else { return }
        let error = ParleyError(
            code: .permissionDenied,
            message: "\(context.session.entityName) may not open \(request.path) \(request.accessMode == .readOnly ? "read-only" : "for writing"): it needs capability \"\(needed)\""
        )
        self.logger.warning("block open refused", metadata: [
            "entity": "\(context.session.entityName)", "path": "\(request.path)", "error": "\(error.message)",
        ])
        throw error
    }

    /// Refuses new IO from now on (graceful shutdown; IO in flight completes).
    public func beginShutdown() {
        self.shuttingDown.store(true, ordering: .releasing)
    }

    /// Sessions open now.
    public var sessionCount: Int { self.sessions.withLockedValue { $0.count } }

    // MARK: - Handlers

    private func session(for context: ParleyRequestContext) -> BlockSession? {
        self.sessions.withLockedValue { $0[ObjectIdentifier(context.connection)] }
    }

    func sessionInfo(_ request: Parley_Block_V1_SessionInfo, _ context: ParleyRequestContext) -> Parley_Block_V1_SessionInfoReply {
        var reply = Parley_Block_V1_SessionInfoReply()
        guard request.protocolVersion >= 1 else {
            reply.status = .invalid
            reply.message = "protocol_version must be 1 or more"
            return reply
        }
        guard BlockExportCatalog.validSessionName(request.sessionName) else {
            reply.status = .invalid
            reply.message = "bad session name \"\(request.sessionName)\": use 1-64 bytes of A-Z a-z 0-9 . _ -, not starting with '.'"
            return reply
        }
        let version = min(request.protocolVersion, Self.protocolVersion)
        let connection = context.connection
        let key = ObjectIdentifier(connection)
        let (session, created) = self.sessions.withLockedValue { s -> (BlockSession, Bool) in
            if let existing = s[key] { return (existing, false) }
            let id = self.connections.withLockedValue { c -> UInt64 in
                defer { c.next += 1 }
                return c.next
            }
            let new = BlockSession(name: request.sessionName, version: version, peer: connection.session.peerAddress,
                                   instance: request.clientInstance, connectionID: id)
            s[key] = new
            self.connections.withLockedValue { $0.byID[id] = new }
            return (new, true)
        }
        if created {
            self.logger.info("block session started", metadata: ["session": "\(session.name)", "peer": "\(session.peer)"])
            Task { [self] in
                _ = await connection.closed()
                // IO of this connection not yet started is dropped from now on (see `fenced`).
                session.markEnded()
                self.sessions.withLockedValue { _ = $0.removeValue(forKey: key) }
                // Kept for Fence while its IO runs: a fence of it waits for that IO.
                session.whenIdle { [self] in self.connections.withLockedValue { _ = $0.byID.removeValue(forKey: session.connectionID) } }
                session.closeAll { device, access in
                    self.devices.close(device, access: access, owner: session.owner)
                    self.logger.info("block device closed", metadata: ["session": "\(session.name)", "export": "\(device.name)", "reason": "session ended"])
                }
                self.logger.info("block session ended", metadata: ["session": "\(session.name)"])
            }
        } else if session.name != request.sessionName || session.instance != request.clientInstance {
            reply.status = .invalid
            reply.message = "this connection is already session \"\(session.name)\" of client instance \(session.instance)"
            return reply
        }
        if request.directIo, self.allowsDirect, connection.mayUseDirect, !connection.isDirectEnabled {
            // Enabled before the answer leaves (through the same outlet, in order), so that
            // the client's first DIRECT after it finds the connection enabled.
            try? connection.enableDirect { [self] request in self.direct(request, session: session) }
        }
        // Once granted, every SessionInfo of the connection gets the same answer.
        reply.directIo = connection.isDirectEnabled
        reply.protocolVersion = session.version
        reply.connectionID = session.connectionID
        return reply
    }

    func listExports() -> Parley_Block_V1_ExportList {
        var list = Parley_Block_V1_ExportList()
        for spec in self.catalog.exports {
            var entry = Parley_Block_V1_ExportEntry()
            entry.name = spec.name
            entry.readOnly = spec.readOnly || self.catalog.readOnly
            entry.shared = spec.shared
            do {
                let export = try self.catalog.resolveNamed(spec.name)
                let device = try self.devices.open(export, access: .readOnly, owner: "list")
                entry.geometry = Self.geometry(device.store.geometry, blockSize: Self.blockSize(export, device), readOnly: export.readOnly)
                self.devices.close(device, access: .readOnly, owner: "list")
            } catch {
                self.logger.warning("export cannot be opened", metadata: ["export": "\(spec.name)", "error": "\(error)"])
            }
            list.exports.append(entry)
        }
        return list
    }

    /// Fences other connections of this client (docs/protocol.md 17.8): their new IO is
    /// refused, IO of theirs waiting for an IO thread is dropped, and the answer waits for
    /// the IO of theirs already running.
    func fence(_ request: Parley_Block_V1_Fence, _ context: ParleyRequestContext) async -> Parley_Block_V1_FenceReply {
        var reply = Parley_Block_V1_FenceReply()
        func refuse(_ status: Parley_Block_V1_BlockStatus, _ message: String) -> Parley_Block_V1_FenceReply {
            reply.status = status
            reply.message = message
            self.logger.warning("block fence refused: \(message)", metadata: ["session": "\(self.session(for: context)?.name ?? "-")"])
            return reply
        }
        guard let session = self.session(for: context) else { return refuse(.noSession, "send SessionInfo before Fence") }
        guard session.instance != 0 else { return refuse(.invalid, "Fence needs a client_instance in SessionInfo") }
        // A fenced connection fences nothing: its client gave it up, and its Fence of the
        // connection that fenced it would leave the client no path (docs/protocol.md 17.1).
        // Checked here first, and again with the marking, under `fencing`.
        if session.isFenced.load(ordering: .acquiring) {
            return refuse(.fenced, "connection \(session.connectionID) was fenced: it cannot fence other connections")
        }
        var targets: [BlockSession] = []
        var seen = Set<UInt64>()
        for id in request.connectionIds where seen.insert(id).inserted {
            if id == session.connectionID { return refuse(.invalid, "connection \(id) is the fencing connection itself") }
            let (known, issued) = self.connections.withLockedValue { c in (c.byID[id], id >= self.firstConnectionID && id < c.next) }
            guard let target = known else {
                // Given out by this process and gone: it ended with no IO left, and nothing of
                // it can run any more. Never given out here: another server process's (paths to
                // two processes, or one from before a restart), which this one cannot fence.
                if issued { continue }
                return refuse(.invalid, "connection \(id) is not one of this server process's (a restarted server, or another process): it cannot be fenced here")
            }
            guard target.name == session.name, target.instance == session.instance else {
                return refuse(.invalid, "connection \(id) is not one of this client's (session \"\(session.name)\", client instance \(session.instance))")
            }
            targets.append(target)
        }
        // Every target refuses new IO from now on, then the answer waits for what runs on
        // each (marking them one by one admitted IO on the later ones meanwhile).
        let fencedMeanwhile = self.fencing.withLock { () -> Bool in
            if session.isFenced.load(ordering: .acquiring) { return true }
            for target in targets { target.markFenced(by: session.connectionID) }
            return false
        }
        if fencedMeanwhile {
            return refuse(.fenced, "connection \(session.connectionID) was fenced while its Fence was checked: it cannot fence other connections")
        }
        for target in targets { await target.idle() }
        if !targets.isEmpty {
            self.logger.info("block connections fenced", metadata: [
                "session": "\(session.name)", "by": "\(session.connectionID)", "fenced": "\(targets.map(\.connectionID).sorted())",
            ])
        }
        return reply
    }

    static func blockSize(_ export: BlockExportCatalog.Resolved, _ device: BlockDevice) -> UInt32 {
        export.blockSize ?? max(512, device.store.geometry.logicalBlockSize)
    }

    static func geometry(_ g: BlockGeometry, blockSize: UInt32, readOnly: Bool) -> Parley_Block_V1_Geometry {
        var out = Parley_Block_V1_Geometry()
        out.sizeBytes = g.size
        out.sizeSectors = g.size / 512
        out.logicalBlockSize = blockSize
        out.physicalBlockSize = max(blockSize, g.physicalBlockSize)
        out.maxIoSize = Self.maximumIO
        if g.discard && !readOnly {
            out.discardGranularity = max(blockSize, g.discardGranularity)
            out.maxDiscardSize = g.maximumDiscard
        }
        out.writeCache = g.writeCache
        out.fua = true
        out.rotational = g.rotational
        return out
    }

    func open(_ request: Parley_Block_V1_Open, _ context: ParleyRequestContext) -> Parley_Block_V1_OpenReply {
        var reply = Parley_Block_V1_OpenReply()
        func refuse(_ e: BlockError) -> Parley_Block_V1_OpenReply {
            reply.status = e.status
            reply.message = e.message
            self.logger.warning("block open refused: \(e.message)", metadata: [
                "session": "\(self.session(for: context)?.name ?? "-")", "path": "\(request.path)", "status": "\(e.status)",
            ])
            return reply
        }
        guard let session = self.session(for: context) else {
            return refuse(BlockError(.noSession, "send SessionInfo before Open"))
        }
        if self.shuttingDown.load(ordering: .acquiring) { return refuse(BlockError(.shuttingDown, "the server is shutting down")) }
        let access: BlockAccess
        switch request.accessMode {
        case .readOnly: access = .readOnly
        case .readWrite: access = .readWrite
        case .migration: access = .migration
        case .UNRECOGNIZED(let n): return refuse(BlockError(.invalid, "unknown access mode \(n)"))
        }
        // Checked again when the device is added (the connection may end or be fenced while
        // the file opens); here so that such a connection opens no file.
        if session.ended.load(ordering: .acquiring) || session.isFenced.load(ordering: .acquiring) {
            return refuse(BlockError(.noSession, "connection \(session.connectionID) of session \"\(session.name)\" was fenced or has ended: it opens nothing"))
        }
        // Checked again when the device is added (opens may race); here so that an Open past
        // the cap opens no file.
        guard session.openCount < self.limits.maxOpenDevices else {
            return refuse(BlockError(.busySession, "this connection has \(self.limits.maxOpenDevices) devices open, the most it may: close one first"))
        }
        do {
            let export = try self.catalog.resolve(request.path, session: session.name)
            let device = try self.devices.open(export, access: access, owner: session.owner)
            let blockSize = Self.blockSize(export, device)
            let readOnly = access == .readOnly
            let id: UInt32
            switch session.add(device: device, access: access, blockSize: blockSize, limit: self.limits.maxOpenDevices) {
            case .success(let added): id = added
            case .failure(let refusal):
                self.devices.close(device, access: access, owner: session.owner)
                return refuse(refusal)
            }
            reply.deviceID = id
            reply.accessMode = request.accessMode
            reply.geometry = Self.geometry(device.store.geometry, blockSize: blockSize, readOnly: readOnly)
            self.logger.info("block device opened", metadata: [
                "session": "\(session.name)", "export": "\(export.name)", "path": "\(export.path)", "access": "\(access)", "device": "\(id)",
            ])
            return reply
        } catch {
            return refuse(error)
        }
    }

    func close(_ request: Parley_Block_V1_Close, _ context: ParleyRequestContext) -> Parley_Block_V1_CloseReply {
        var reply = Parley_Block_V1_CloseReply()
        guard let session = self.session(for: context) else {
            reply.status = .noSession
            reply.message = "send SessionInfo before Close"
            return reply
        }
        let found = session.remove(id: request.deviceID) { device, access in
            self.devices.close(device, access: access, owner: session.owner)
            self.logger.info("block device closed", metadata: ["session": "\(session.name)", "export": "\(device.name)", "device": "\(request.deviceID)"])
        }
        if !found {
            reply.status = .unknownDevice
            reply.message = "no open device \(request.deviceID) in session \"\(session.name)\""
        }
        return reply
    }

    /// Serves one `Io` message and calls `respond` exactly once (see `run`). No task per request.
    func io(
        _ request: Parley_Block_V1_Io, _ context: ParleyRequestContext,
        respond: @escaping @Sendable (Result<ParleyReply<Parley_Block_V1_IoReply>, any Error>) -> Void
    ) {
        @Sendable func refused(_ status: Parley_Block_V1_BlockStatus, _ message: String) -> ParleyReply<Parley_Block_V1_IoReply> {
            var reply = Parley_Block_V1_IoReply()
            reply.status = status
            reply.message = message
            return ParleyReply(reply)
        }
        guard let session = self.session(for: context) else {
            self.logRefusal(.noSession, "send SessionInfo before Io", session: nil)
            return respond(.success(refused(.noSession, "send SessionInfo before Io")))
        }
        // A read's answer is one frame: the message header, the reply's type name (an OK
        // IoReply has an empty payload) and the data, within the client's frame limit.
        let call = IOCall(operation: request.operation.rawValue, flags: request.flags, deviceID: request.deviceID,
                          offset: request.offset, length: request.length, data: context.data.map { ByteBufferPieces($0) },
                          maxReadLength: context.connection.session.maxDataBytes(type: Parley_Block_V1_IoReply.protoMessageName))
        self.run(call, session: session, eventLoop: context.connection.eventLoop, readFrame: nil) { outcome in
            switch outcome {
            case .done(let data): respond(.success(ParleyReply(Parley_Block_V1_IoReply(), data: data)))
            case .read: preconditionFailure("a read into a DIRECT frame without one")
            case .refused(let status, let message): respond(.success(refused(status, message)))
            // A modification dropped unstarted (its connection fenced or ended): ERROR
            // `cancelled` (docs/protocol.md 17.2). Otherwise the IO threads have stopped: the
            // server is going away.
            case .dropped(let error as ParleyError) where error.code == .cancelled: respond(.failure(error))
            case .dropped(let error): respond(.success(refused(.shuttingDown, "the server's IO threads have stopped: \(error)")))
            }
        }
    }

    // MARK: - DIRECT IO (docs/protocol.md 17.9)

    /// Serves one DIRECT request of `session`'s connection (granted by `sessionInfo`): the
    /// same checks and storage as `io`, through `run`; the answer's status is the IO's.
    func direct(_ request: ParleyDirectRequest, session: BlockSession) {
        var call: IOCall
        switch BlockDirect.Request.decode(request.header) {
        case .failure(let malformed):
            return request.violation(malformed.message)
        case .success(let r):
            call = IOCall(operation: Int(r.operation), flags: UInt32(r.flags), deviceID: r.deviceID, offset: r.offset, length: r.length, data: request.dataPieces,
                          reservedNonZero: r.reserved != 0,
                          maxReadLength: request.connection.session.peerMaxFrameSize - BlockDirect.answerSegment0Length)
        }
        if self.directInline(&call, request, session: session) { return }
        let length = Int(call.length)
        var readFrame: (@Sendable () -> DirectFrame)?
        if call.operation == Parley_Block_V1_IoOperation.read.rawValue {
            readFrame = { request.answerFrame(headerLength: BlockDirect.answerHeaderLength, dataLength: length) }
        }
        self.run(call, session: session, eventLoop: request.connection.eventLoop, readFrame: readFrame) { (outcome: IOOutcome) in
            switch outcome {
            case .done:
                request.answer(request.answerFrame(headerLength: BlockDirect.answerHeaderLength, dataLength: nil))
            case .read(let frame):
                request.answer(frame)  // status 0: the frame's header is zeroed
            case .refused(let status, let message):
                var frame = request.answerFrame(headerLength: BlockDirect.answerHeaderLength, dataLength: nil)
                BlockDirect.setStatus(status, in: &frame)
                _ = message  // logged by `run`
                request.answer(frame)
            case .dropped:
                // A modification dropped unstarted (its connection ended or was fenced):
                // the client holds it in doubt, as after FENCED (docs/protocol.md 17.9); or
                // the IO threads have stopped (the server is going away).
                var frame = request.answerFrame(headerLength: BlockDirect.answerHeaderLength, dataLength: nil)
                let status: Parley_Block_V1_BlockStatus = session.ended.load(ordering: .acquiring) ? .noSession
                    : session.isFenced.load(ordering: .acquiring) ? .fenced : .shuttingDown
                BlockDirect.setStatus(status, in: &frame)
                request.answer(frame)
            }
        }
    }

    /// DIRECT's lane for what nearly all IO is: a read, or a write without FUA, that passes
    /// every check, served right here when the page cache takes it at once: the same
    /// session accounting (`begin`/`end`, so a Fence or Close waits for it), checks, storage
    /// call, error handling and metrics as `run`, without its closures and outcome plumbing
    /// (about a microsecond per IO on a server behind the map; docs/performance.md). A
    /// refusal, or IO that would wait, returns false and goes through `run`, which checks it
    /// all again (nothing was stored or answered) and, for the latter, offloads it at once
    /// (`IOCall.triedInline`) rather than try the page cache a second time.
    private func directInline(_ call: inout IOCall, _ request: ParleyDirectRequest, session: BlockSession) -> Bool {
        let kind: BlockOpKind
        switch call.operation {
        case Parley_Block_V1_IoOperation.read.rawValue where call.flags & ~UInt32(Parley_Block_V1_IoFlag.fua.rawValue) == 0: kind = .read
        case Parley_Block_V1_IoOperation.write.rawValue where call.flags == 0: kind = .write
        default: return false
        }
        guard !call.reservedNonZero, !self.shuttingDown.load(ordering: .acquiring) else { return false }
        let length = Int(call.length)
        guard case .success(let open) = session.begin(id: call.deviceID, bytes: length, limits: self.limits) else { return false }
        guard Self.refusal(call, kind: kind, open: open) == nil else {
            session.end(id: call.deviceID, bytes: length)
            return false
        }
        let started = ContinuousClock.now
        let store = open.device.store
        var answer: DirectFrame?
        var failure: BlockError?
        do {
            if kind == .read {
                var frame = request.answerFrame(headerLength: BlockDirect.answerHeaderLength, dataLength: length)
                if try frame.withUnsafeMutableData({ try store.read(into: $0, at: call.offset, nowait: true) }) { answer = frame }
            } else {
                FileBlockStore.joinBurst(on: request.connection.eventLoop)
                if try Self.writeInline(call.data!, to: store, at: call.offset) {
                    answer = request.answerFrame(headerLength: BlockDirect.answerHeaderLength, dataLength: nil)
                }
            }
        } catch let error as BlockStoreError {
            failure = BlockError(error)
            self.logStoreFailure(failure!, session: session, device: open.device)
            var frame = request.answerFrame(headerLength: BlockDirect.answerHeaderLength, dataLength: nil)
            BlockDirect.setStatus(failure!.status, in: &frame)
            answer = frame
        } catch {
            preconditionFailure("a block store threw \(error), not a BlockStoreError")
        }
        if answer != nil {
            open.device.metrics(kind).record(bytes: length, failed: failure != nil, nanoseconds: (ContinuousClock.now - started).nanoseconds)
        }
        session.end(id: call.deviceID, bytes: length)
        guard let answer else {
            call.triedInline = true
            return false
        }
        request.answer(answer)  // status 0 unless the store failed: the frame's header is zeroed
        return true
    }

    /// A write done here if the store takes it without blocking (false: nothing written): one
    /// buffer as `write(nowait:)`, a few (a large DIRECT write as it arrived, in one batch of
    /// `ByteBufferPieces.batchSize`) as a gathered write within the store's inline policy;
    /// more go to an IO thread.
    static func writeInline(_ data: ByteBufferPieces, to store: any BlockStore, at offset: UInt64) throws(BlockStoreError) -> Bool {
        if let one = data.single {
            return try one.withUnsafeReadableBytes { (bytes) throws(BlockStoreError) in try store.write(bytes, at: offset, durable: false, nowait: true) }
        }
        guard data.pieceCount <= ByteBufferPieces.batchSize else { return false }
        var inline = false
        try data.forEachBatch { (pieces, _) throws(BlockStoreError) in inline = try store.writeInline(gathered: pieces, at: offset) }
        return inline
    }

    private func logStoreFailure(_ e: BlockError, session: BlockSession, device: BlockDevice) {
        self.logger.error("block IO failed: \(e.message)", metadata: ["session": "\(session.name)", "export": "\(device.name)"])
    }

    // MARK: - IO, whatever carries it

    /// One IO as either carrier gives it: `Io` and its data segment, or a DIRECT request.
    struct IOCall: Sendable {
        /// `IoOperation`'s number (unknown ones are refused).
        var operation: Int
        var flags: UInt32
        var deviceID: UInt32
        var offset: UInt64
        var length: UInt32
        /// A write's data: one buffer, or a large DIRECT write as the reads it arrived in.
        var data: ByteBufferPieces?
        /// DIRECT: the request's reserved bytes are not 0 (INVALID, with the flags' check).
        var reservedNonZero = false
        /// The longest read whose answer fits the client's frame limit (TOO_LARGE beyond it,
        /// with the max_io_size check).
        var maxReadLength = Int.max
        /// DIRECT: the inline lane found that the page cache cannot take it without waiting:
        /// `run` offloads it at once.
        var triedInline = false
    }

    /// How an IO ended.
    enum IOOutcome: Sendable {
        /// Done: a read's data (nil for other operations).
        case done(ByteBuffer?)
        /// Done: a read's data, read into the answer frame `readFrame` made.
        case read(DirectFrame)
        /// Refused or failed with a block status (already logged).
        case refused(Parley_Block_V1_BlockStatus, String)
        /// Not run: a modification whose connection ended or was fenced before an IO thread
        /// took it, or an IO pool that has stopped.
        case dropped(any Error)
    }

    private func logRefusal(_ status: Parley_Block_V1_BlockStatus, _ message: String, session: BlockSession?) {
        self.logger.warning("block IO refused: \(message)", metadata: ["session": "\(session?.name ?? "-")", "status": "\(status)"])
    }

    /// The checks of docs/protocol.md 17.2 that need the open device (after `session.begin`;
    /// a discard's NOT_SUPPORTED is `run`'s): the status and message of a refusal, or nil.
    private static func refusal(_ call: IOCall, kind: BlockOpKind, open: BlockSession.OpenDevice) -> (Parley_Block_V1_BlockStatus, String)? {
        let length = Int(call.length)
        let data = call.data
        let size = open.device.store.geometry.size
        // Checks every operation with a range shares.
        if kind != .flush {
            let b = UInt64(open.blockSize)
            if call.offset % b != 0 || UInt64(length) % b != 0 {
                return (.invalid, "\(kind.rawValue) at offset \(call.offset), length \(length) is not aligned to the device's \(b)-byte blocks")
            }
            if (kind == .read || kind == .write) && call.length > Self.maximumIO {
                return (.tooLarge, "\(kind.rawValue) of \(length) bytes is larger than max_io_size \(Self.maximumIO)")
            }
            if kind == .read && length > call.maxReadLength {
                return (.tooLarge, "a read of \(length) bytes answers with more than the client's frame limit allows (\(call.maxReadLength) bytes of data)")
            }
            let (end, overflow) = call.offset.addingReportingOverflow(UInt64(length))
            if overflow || end > size {
                return (.outOfRange, "\(kind.rawValue) of \(length) bytes at offset \(call.offset) ends past the device's \(size) bytes")
            }
        }
        if kind != .read && kind != .flush && open.access == .readOnly {
            return (.readOnly, "\(kind.rawValue) on device \(call.deviceID), which is open read-only")
        }
        if kind == .write {
            guard let data else {
                return (.invalid, "a write of \(length) bytes needs a data segment of \(length) bytes (an empty one for 0), and the request has none")
            }
            guard data.readableBytes == length else {
                return (.invalid, "a write of \(length) bytes needs exactly \(length) bytes of data, got \(data.readableBytes)")
            }
        } else if data != nil, kind != .read || data!.readableBytes > 0 {
            return (.invalid, "\(kind.rawValue) takes no data segment")
        }
        return nil
    }

    /// Runs one IO of `session` (docs/protocol.md 17.2; the same for `Io` and DIRECT) and calls
    /// `done` exactly once: at once when it is refused or completes inline on the event loop
    /// (a read or write the page cache answers without waiting), else when an IO thread has
    /// done it (then on `eventLoop`). With `readFrame`, a read's data goes straight into the
    /// answer frame it makes (`IOOutcome.read`).
    func run(_ call: IOCall, session: BlockSession, eventLoop: any EventLoop, readFrame: (@Sendable () -> DirectFrame)?,
             done: @escaping @Sendable (IOOutcome) -> Void) {
        @Sendable func refuse(_ status: Parley_Block_V1_BlockStatus, _ message: String) {
            self.logRefusal(status, message, session: session)
            done(.refused(status, message))
        }
        if self.shuttingDown.load(ordering: .acquiring) { return refuse(.shuttingDown, "the server is shutting down") }
        let length = Int(call.length)
        let kind: BlockOpKind
        switch Parley_Block_V1_IoOperation(rawValue: call.operation) {
        case .read?: kind = .read
        case .write?: kind = .write
        case .flush?: kind = .flush
        case .discard?: kind = .discard
        case .writeZeroes?: kind = .writeZeroes
        case .UNRECOGNIZED?, nil: return refuse(.invalid, "unknown IO operation \(call.operation)")
        }
        guard call.flags & ~UInt32(Parley_Block_V1_IoFlag.fua.rawValue) == 0 else {
            return refuse(.invalid, "unknown IO flags 0x\(String(call.flags, radix: 16))")
        }
        guard !call.reservedNonZero else { return refuse(.invalid, "reserved bytes of a DIRECT request must be 0") }
        let fua = call.flags & UInt32(Parley_Block_V1_IoFlag.fua.rawValue) != 0
        let data = call.data
        // At most max_io_size counts against the session's bytes in flight: a longer IO is
        // refused TOO_LARGE by the checks after admission, not BUSY_SESSION by it.
        let counted = kind == .read || kind == .write ? min(length, Int(Self.maximumIO)) : 0
        let open: BlockSession.OpenDevice
        switch session.begin(id: call.deviceID, bytes: counted, limits: self.limits) {
        case .failure(let e): return refuse(e.status, e.message)
        case .success(let o): open = o
        }
        let device = open.device
        let store = device.store
        let started = ContinuousClock.now
        let deviceID = call.deviceID
        /// Ends the IO: records it, releases its in-flight share, answers.
        @Sendable func finish(_ outcome: IOOutcome, failed: Bool) {
            device.metrics(kind).record(bytes: counted, failed: failed, nanoseconds: (ContinuousClock.now - started).nanoseconds)
            session.end(id: deviceID, bytes: counted)
            done(outcome)
        }
        @Sendable func fail(_ status: Parley_Block_V1_BlockStatus, _ message: String) {
            self.logRefusal(status, message, session: session)
            finish(.refused(status, message), failed: true)
        }
        /// The outcome of storage work: a store error is answered with its block status and
        /// logged; any other error (a fenced modification) drops the request.
        @Sendable func completed(_ result: Result<IOOutcome, any Error>) {
            switch result {
            case .success(let outcome):
                finish(outcome, failed: false)
            case .failure(let error as BlockStoreError):
                let e = BlockError(error)
                self.logStoreFailure(e, session: session, device: device)
                finish(.refused(e.status, e.message), failed: true)
            case .failure(let error):
                finish(.dropped(error), failed: true)
            }
        }
        if let (status, message) = Self.refusal(call, kind: kind, open: open) { return fail(status, message) }
        let offset = call.offset
        /// A modification that waited for an IO thread is dropped if its connection ended
        /// meanwhile: the client holds it in doubt and sends it again on another path, and a
        /// late copy landing after that could overwrite a later write (docs/protocol.md 17.8).
        @Sendable func fenced() throws {
            if session.ended.load(ordering: .acquiring) {
                throw ParleyError(code: .cancelled, message: "\(kind.rawValue) at \(offset) dropped: its connection ended before it started")
            }
            if session.isFenced.load(ordering: .acquiring) {
                throw ParleyError(code: .cancelled, message: "\(kind.rawValue) at \(offset) dropped: its connection was fenced before it started")
            }
        }
        /// Runs `body` on an IO thread; its outcome completes the request on the event loop.
        func offload(_ body: @escaping @Sendable () throws -> IOOutcome) {
            self.io.run(on: eventLoop, body).whenComplete { completed($0) }
        }
        /// Reads the range into `raw` (all of it); false if it would have to wait.
        @Sendable func read(into raw: UnsafeMutableRawBufferPointer, nowait: Bool) throws -> Bool {
            try store.read(into: raw, at: offset, nowait: nowait)
        }
        do {
            switch kind {
            case .read:
                if let readFrame {
                    if !call.triedInline {
                        var frame = readFrame()
                        if try frame.withUnsafeMutableData({ try read(into: $0, nowait: true) }) { return completed(.success(.read(frame))) }
                    }
                    offload {
                        var frame = readFrame()
                        _ = try frame.withUnsafeMutableData { try read(into: $0, nowait: false) }
                        return .read(frame)
                    }
                    return
                }
                var buffer = ByteBufferAllocator().buffer(capacity: length)
                let inline = try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { ptr in
                    try read(into: UnsafeMutableRawBufferPointer(rebasing: ptr[..<length]), nowait: true) ? length : 0
                }
                if inline == length { return completed(.success(.done(buffer))) }
                offload {
                    var b = ByteBufferAllocator().buffer(capacity: length)
                    _ = try b.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { ptr in
                        _ = try read(into: UnsafeMutableRawBufferPointer(rebasing: ptr[..<length]), nowait: false)
                        return length
                    }
                    return .done(b)
                }
            case .write:
                let data = data!
                if !fua { FileBlockStore.joinBurst(on: eventLoop) }
                let inline = fua || call.triedInline ? false : try Self.writeInline(data, to: store, at: offset)
                if inline { return completed(.success(.done(nil))) }
                offload {
                    try fenced()
                    if let one = data.single {
                        _ = try one.withUnsafeReadableBytes { try store.write($0, at: offset, durable: fua, nowait: false) }
                    } else {
                        try data.forEachBatch { (pieces, skipped) throws(BlockStoreError) in try store.write(gathered: pieces, at: offset + UInt64(skipped)) }
                        if fua { try store.flush() }
                    }
                    return .done(nil)
                }
            case .flush:
                offload {
                    try store.flush()
                    return .done(nil)
                }
            case .discard:
                guard store.geometry.discard else { return fail(.notSupported, "the device cannot discard") }
                offload {
                    try fenced()
                    try store.discard(offset: offset, length: UInt64(length))
                    if fua { try store.flush() }
                    return .done(nil)
                }
            case .writeZeroes:
                offload {
                    try fenced()
                    try store.writeZeroes(offset: offset, length: UInt64(length), mayDeallocate: true)
                    if fua { try store.flush() }
                    return .done(nil)
                }
            case .cache, .blockStatus:
                completed(.success(.done(nil)))
            }
        } catch {
            completed(.failure(error))
        }
    }
}

/// One block session: its name, version and open devices.
final class BlockSession: Sendable {
    struct OpenDevice: Sendable {
        var device: BlockDevice
        var access: BlockAccess
        var blockSize: UInt32
        var inFlight = 0
        var closing = false
    }

    struct State {
        var devices: [UInt32: OpenDevice] = [:]
        var nextID: UInt32 = 1
        var inFlight = 0
        var inFlightBytes = 0
        /// Closed devices whose IO is still in flight, with what to do when it ends.
        var pendingClose: [UInt32: @Sendable (BlockDevice, BlockAccess) -> Void] = [:]
        /// The connection that fenced this one (0: none).
        var fencedBy: UInt64 = 0
        /// Run when no IO is in flight any more.
        var idle: [@Sendable () -> Void] = []
    }

    let name: String
    let version: UInt32
    let peer: String
    /// The client's instance (SessionInfo.client_instance; 0: none) and this connection's id.
    let instance: UInt64
    let connectionID: UInt64
    /// The connection has ended: modifications still waiting for an IO thread are dropped.
    let ended = Atomic<Bool>(false)
    /// Another connection of the client fenced this one: new IO is refused, IO waiting for
    /// an IO thread is dropped.
    let isFenced = Atomic<Bool>(false)
    private let state = NIOLockedValueBox(State())

    /// Who holds devices in the device table: the session's name, so that the paths of one
    /// session (several connections with the same name) share its read-write opens.
    var owner: String { "session \(self.name)" }

    init(name: String, version: UInt32, peer: String, instance: UInt64 = 0, connectionID: UInt64 = 0) {
        self.name = name
        self.version = version
        self.peer = peer
        self.instance = instance
        self.connectionID = connectionID
    }

    var openCount: Int { self.state.withLockedValue { $0.devices.count } }

    /// Adds an opened device: its id; refused once the session has ended (its devices are
    /// closed then, and one added after that would never be), or with `limit` open already.
    func add(device: BlockDevice, access: BlockAccess, blockSize: UInt32, limit: Int = Int.max) -> Result<UInt32, BlockError> {
        self.state.withLockedValue { s in
            if self.ended.load(ordering: .acquiring) || s.fencedBy != 0 {
                return .failure(BlockError(.noSession, "session \"\(self.name)\" ended while \(device.name) was being opened"))
            }
            guard s.devices.count < limit else {
                return .failure(BlockError(.busySession, "this connection has \(limit) devices open, the most it may: close one first"))
            }
            while s.devices[s.nextID] != nil || s.nextID == 0 { s.nextID &+= 1 }
            let id = s.nextID
            s.nextID &+= 1
            s.devices[id] = OpenDevice(device: device, access: access, blockSize: blockSize)
            return .success(id)
        }
    }

    /// The connection has ended: from now on its IO is refused, and modifications admitted
    /// before and still waiting for an IO thread are dropped. Under the lock IO is admitted
    /// under, so that an IO is either admitted before (and awaited by `whenIdle` and a fence)
    /// or refused.
    func markEnded() {
        self.state.withLockedValue { _ in self.ended.store(true, ordering: .releasing) }
    }

    func begin(id: UInt32, bytes: Int, limits: BlockService.Limits) -> Result<OpenDevice, BlockError> {
        self.state.withLockedValue { s in
            if self.ended.load(ordering: .relaxed) {
                return .failure(BlockError(.noSession, "connection \(self.connectionID) of session \"\(self.name)\" has ended"))
            }
            if s.fencedBy != 0 {
                return .failure(BlockError(.fenced, "connection \(self.connectionID) of session \"\(self.name)\" was fenced by connection \(s.fencedBy)"))
            }
            // One lookup, the device's count changed in place (no copy of the entry put back).
            guard let index = s.devices.index(forKey: id), !s.devices.values[index].closing else {
                return .failure(BlockError(.unknownDevice, "no open device \(id) in session \"\(self.name)\""))
            }
            if s.inFlight >= limits.maxInFlight || s.inFlightBytes + bytes > limits.maxInFlightBytes {
                return .failure(BlockError(.busySession, "session \"\(self.name)\" has \(s.inFlight) IOs and \(s.inFlightBytes) bytes in flight"))
            }
            s.inFlight += 1
            s.inFlightBytes += bytes
            s.devices.values[index].inFlight += 1
            return .success(s.devices.values[index])
        }
    }

    func end(id: UInt32, bytes: Int) {
        let release: (() -> Void)? = self.state.withLockedValue { s in
            s.inFlight -= 1
            s.inFlightBytes -= bytes
            if s.inFlight == 0, !s.idle.isEmpty {
                let idle = s.idle
                s.idle = []
                // The device's own close, if any, comes first.
                let close = self.releaseIfClosed(id: id, &s)
                return { close?(); idle.forEach { $0() } }
            }
            return self.releaseIfClosed(id: id, &s)
        }
        release?()
    }

    /// The device's pending close once its last IO has ended (under the lock).
    private func releaseIfClosed(id: UInt32, _ s: inout State) -> (() -> Void)? {
        guard let index = s.devices.index(forKey: id) else { return nil }
        s.devices.values[index].inFlight -= 1
        let open = s.devices.values[index]
        if open.closing && open.inFlight == 0 {
            s.devices[id] = nil
            let action = s.pendingClose.removeValue(forKey: id)
            // Constants captured, not `open`: a captured `var` is boxed on the heap at its
            // declaration, on every IO, closing or not.
            let device = open.device, access = open.access
            return { action?(device, access) }
        }
        return nil
    }

    /// Runs `body` once no IO of this session is in flight (at once if none is).
    func whenIdle(_ body: @escaping @Sendable () -> Void) {
        let now = self.state.withLockedValue { s -> Bool in
            if s.inFlight == 0 { return true }
            s.idle.append(body)
            return false
        }
        if now { body() }
    }

    /// Fences this connection (for connection `by`): new IO is refused from now on (what
    /// waits for an IO thread is dropped); `idle()` waits for the IO in flight.
    func markFenced(by: UInt64) {
        self.state.withLockedValue { s in
            if s.fencedBy == 0 { s.fencedBy = by }
            self.isFenced.store(true, ordering: .releasing)
        }
    }

    /// Returns once no IO of this session is in flight.
    func idle() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            self.whenIdle { continuation.resume() }
        }
    }

    /// Closes a device once its IO in flight has ended. False if there is no such device.
    func remove(id: UInt32, then release: @escaping @Sendable (BlockDevice, BlockAccess) -> Void) -> Bool {
        let now: OpenDevice?? = self.state.withLockedValue { s in
            guard var open = s.devices[id], !open.closing else { return .none }
            if open.inFlight == 0 {
                s.devices[id] = nil
                return .some(open)
            }
            open.closing = true
            s.devices[id] = open
            s.pendingClose[id] = release
            return .some(nil)
        }
        switch now {
        case .none: return false
        case .some(let open?):
            release(open.device, open.access)
            return true
        case .some(nil): return true
        }
    }

    func closeAll(_ release: @escaping @Sendable (BlockDevice, BlockAccess) -> Void) {
        let ids = self.state.withLockedValue { Array($0.devices.keys) }
        for id in ids { _ = self.remove(id: id, then: release) }
    }
}
