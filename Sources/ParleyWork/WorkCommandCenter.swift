import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Parley
import ParleyWire

/// One end of an upload or a download, on the master's side: where an upload's chunks go,
/// where a download's come from.
public protocol WorkTransfer: Sendable {
    /// An upload's next chunk; `offset` is the number of bytes written before it.
    func write(command: UInt64, offset: UInt64, _ data: ByteBuffer) async throws
    /// A download's next chunk: at most `length` bytes from `offset`, and whether no more follow.
    func read(command: UInt64, offset: UInt64, length: Int) async throws -> (data: ByteBuffer, eof: Bool)
}

/// A worker that is not on a Parley connection (a Buildbot worker, through its front end):
/// it runs the master's `Command`s its own way and reports them as the same events.
public protocol WorkCommandLink: AnyObject, Sendable {
    /// Runs `command` (its id already set); the events end with its result.
    func run(_ command: Parley_Work_V1_Command, transfer: (any WorkTransfer)?) async throws -> AsyncThrowingStream<WorkCommandCenter.Event, any Error>
    /// Interrupts a running command; false when it no longer runs.
    func interrupt(_ commandID: UInt64, signal: Int32, reason: String) async throws -> Bool
}

/// A file on the master's machine as a transfer's end: an upload writes it (created, or
/// truncated by the first chunk), a download reads it.
public struct WorkFileTransfer: WorkTransfer {
    public let path: String

    public init(path: String) { self.path = path }

    public func write(command: UInt64, offset: UInt64, _ data: ByteBuffer) async throws {
        let path = self.path
        try await NIOThreadPool.singleton.runIfActive {
            if offset == 0 { guard FileManager.default.createFile(atPath: path, contents: nil) else { throw WorkFiles.FileError("cannot create \(path)") } }
            guard let handle = FileHandle(forWritingAtPath: path) else { throw WorkFiles.FileError("cannot open \(path) for writing") }
            defer { try? handle.close() }
            try handle.seek(toOffset: offset)
            try handle.write(contentsOf: Data(data.readableBytesView))
        }
    }

    public func read(command: UInt64, offset: UInt64, length: Int) async throws -> (data: ByteBuffer, eof: Bool) {
        let path = self.path
        return try await NIOThreadPool.singleton.runIfActive {
            guard let handle = FileHandle(forReadingAtPath: path) else { throw WorkFiles.FileError("cannot open \(path) for reading") }
            defer { try? handle.close() }
            let size = try handle.seekToEnd()
            try handle.seek(toOffset: offset)
            let bytes = try handle.read(upToCount: length) ?? Data()
            return (ByteBuffer(bytes: bytes), offset + UInt64(bytes.count) >= size)
        }
    }
}

/// The master's side of master-initiated commands (§19.8): knows the workers connected to
/// this master (from their hellos), sends them `Command`s on their own connections, serves
/// the transfers of uploads and downloads, and relays commands for submitters
/// (`RunWorkerCommand`, `InterruptWorkerCommand`).
public final class WorkCommandCenter: Sendable {
    /// What a command sends back: its updates, then its result.
    public enum Event: Sendable {
        case update(Parley_Work_V1_CommandUpdate)
        case result(Parley_Work_V1_CommandResult)
    }

    /// A command sent to a worker: its id (for `interrupt`) and its events. Cancelling the
    /// task that iterates them, or `cancel()`, cancels the command (the worker kills what it
    /// runs; no result follows).
    public struct Run: Sendable {
        public let id: UInt64
        public let worker: String
        public let events: AsyncThrowingStream<Event, any Error>
        let cancellation: @Sendable () -> Void

        public func cancel() { self.cancellation() }
    }

    private struct Attached {
        var connection: ParleyConnection?
        var link: (any WorkCommandLink)?
        var hello: Parley_Work_V1_WorkerHello
    }

    private enum Direction { case upload, download, none }

    private struct Active {
        var worker: String
        var connection: ParleyConnection?
        var link: (any WorkCommandLink)?
        var transfer: (any WorkTransfer)?
        var direction: Direction
        var limit: UInt64
        /// The offset the next chunk must have: chunks come in order, once each.
        var next: UInt64 = 0
    }

    private struct State {
        var workers: [String: Attached] = [:]
        var commands: [UInt64: Active] = [:]
        var nextID: UInt64 = 1
    }

    private let state = NIOLockedValueBox(State())
    let logger: Logger

    public init(logger: Logger = Logger(label: "parley.work.commands")) {
        self.logger = logger
    }

    /// The hellos of the workers connected now, by name.
    public var workers: [Parley_Work_V1_WorkerHello] {
        self.state.withLockedValue { $0.workers.values.map(\.hello) }.sorted { $0.worker < $1.worker }
    }

    /// Commands running now.
    public var runningCount: Int { self.state.withLockedValue { $0.commands.count } }

    /// A worker said hello on `connection`: commands for its name go there until the
    /// connection ends (or another hello of the same name replaces it).
    ///
    /// One name per connection: a later hello on the same connection replaces the earlier
    /// one (a connection saying hello under ever new names would otherwise pile them up).
    func attach(_ hello: Parley_Work_V1_WorkerHello, connection: ParleyConnection) {
        let first = self.state.withLockedValue { state -> Bool in
            let earlier = state.workers.filter { $0.value.connection === connection }.map(\.key)
            for name in earlier { state.workers[name] = nil }
            state.workers[hello.worker] = Attached(connection: connection, hello: hello)
            return earlier.isEmpty
        }
        guard first else { return }
        Task {
            _ = await connection.closed()
            self.state.withLockedValue { state in
                for (name, attached) in state.workers where attached.connection === connection { state.workers[name] = nil }
            }
        }
    }

    /// A worker on another protocol (`WorkCommandLink`) is connected under `hello.worker`
    /// until `detach` (or another attach of the same name replaces it).
    public func attach(_ hello: Parley_Work_V1_WorkerHello, link: any WorkCommandLink) {
        self.state.withLockedValue { $0.workers[hello.worker] = Attached(connection: nil, link: link, hello: hello) }
    }

    /// The worker named `name`, attached through `link`, is gone: commands for it are refused.
    public func detach(_ name: String, link: any WorkCommandLink) {
        self.state.withLockedValue { state in
            if let current = state.workers[name]?.link, current === link {
                state.workers[name] = nil
            }
        }
    }

    /// Sends `command` to `worker` (its id is set here) and returns its events. An upload
    /// or a download needs `transfer`.
    public func run(_ command: Parley_Work_V1_Command, on worker: String, transfer: (any WorkTransfer)? = nil) async throws -> Run {
        var command = command
        let direction: Direction
        var limit: UInt64 = .max
        switch command.kind {
        case .upload(let upload)?:
            direction = .upload
            if upload.maxSize > 0 { limit = upload.maxSize }
            try Self.check(upload.path)
        case .uploadDirectory(let upload)?:
            direction = .upload
            if upload.maxSize > 0 { limit = upload.maxSize }
            if !(upload.path.isEmpty || upload.path == ".") { try Self.check(upload.path) }
        case .download(let download)?:
            direction = .download
            if download.maxSize > 0 { limit = download.maxSize }
            try Self.check(download.path)
        case nil:
            throw ParleyError(code: .invalidArgument, message: "the command has no kind")
        default:
            direction = .none
        }
        if direction != .none, transfer == nil {
            throw ParleyError(code: .invalidArgument, message: "an upload or a download needs the master's end of the transfer")
        }
        let (id, attached) = try self.state.withLockedValue { state -> Result<(UInt64, Attached), ParleyError> in
            guard let attached = state.workers[worker] else {
                let names = state.workers.keys.sorted()
                return .failure(ParleyError(code: .invalidArgument, message: "worker \(worker) is not connected to this master (connected: \(names.isEmpty ? "none" : names.joined(separator: ", ")))"))
            }
            guard attached.hello.commands else {
                return .failure(ParleyError(code: .permissionDenied, message: "worker \(worker) does not take commands from its master (it was started without --accept-commands)"))
            }
            let id = state.nextID
            state.nextID += 1
            state.commands[id] = Active(worker: worker, connection: attached.connection, link: attached.link, transfer: transfer, direction: direction, limit: limit)
            return .success((id, attached))
        }.get()
        command.commandID = id
        guard let connection = attached.connection else {
            return try await self.run(command, id: id, worker: worker, link: attached.link!, transfer: transfer)
        }
        let responses: ParleyResponseStream<Parley_Work_V1_CommandUpdate, Parley_Work_V1_CommandResult>
        do {
            responses = try await connection.stream(command, item: Parley_Work_V1_CommandUpdate.self, final: Parley_Work_V1_CommandResult.self)
        } catch {
            self.state.withLockedValue { _ = $0.commands.removeValue(forKey: id) }
            throw error
        }
        return self.forward(id: id, worker: worker) { pass in
            for try await event in responses {
                switch event {
                case .item(let update, _): pass(.update(update))
                case .final(let result): pass(.result(result))
                }
            }
        }
    }

    /// A command for a worker on a `WorkCommandLink`.
    private func run(_ command: Parley_Work_V1_Command, id: UInt64, worker: String, link: any WorkCommandLink, transfer: (any WorkTransfer)?) async throws -> Run {
        let upstream: AsyncThrowingStream<Event, any Error>
        do {
            upstream = try await link.run(command, transfer: transfer)
        } catch {
            self.state.withLockedValue { _ = $0.commands.removeValue(forKey: id) }
            throw error
        }
        return self.forward(id: id, worker: worker) { pass in
            for try await event in upstream { pass(event) }
        }
    }

    /// Events of a command held for its reader, at most, and their output bytes at most
    /// (a worker's update may carry up to a frame's 16 MiB): past either the reader is too
    /// slow, and the command is stopped rather than its output kept in memory without end
    /// (the worker's side answers updates as they come).
    static let maxBufferedEvents = 1024
    static let maxBufferedBytes = 64 << 20

    /// The output an event holds (what a slow reader makes the master keep).
    static func bytes(of event: Event) -> Int {
        guard case .update(let u) = event else { return 0 }
        return u.stdout.count + u.stderr.count + u.log.count + u.header.utf8.count + u.logName.utf8.count
    }

    /// What waits for a command's reader: the sizes of the events in the stream's buffer,
    /// oldest first (the reader takes the oldest), and their sum.
    struct Backlog {
        var sizes = CircularBuffer<Int>()
        var bytes = 0
        var overflow: ParleyError?

        /// `event` of `size` bytes was yielded, finding `yielded`: returns why the reader is
        /// too slow, if it now is (updates only: the command's result always gets in, the
        /// buffer holds one event more for it).
        mutating func yielded(_ yielded: AsyncThrowingStream<Event, any Error>.Continuation.YieldResult, _ event: Event, size: Int, id: UInt64) -> ParleyError? {
            let waiting: Int
            switch yielded {
            case .enqueued(let remaining): waiting = WorkCommandCenter.maxBufferedEvents + 1 - remaining
            case .dropped: waiting = WorkCommandCenter.maxBufferedEvents + 1
            case .terminated: return nil
            @unknown default: return nil
            }
            if case .enqueued = yielded {
                self.sizes.append(size)
                self.bytes += size
            }
            // The reader took the oldest ones meanwhile.
            while self.sizes.count > waiting { self.bytes -= self.sizes.removeFirst() }
            guard case .update = event else { return nil }
            if waiting > WorkCommandCenter.maxBufferedEvents {
                return ParleyError(code: .cancelled, message: "command \(id) stopped: its output came faster than it was read (\(WorkCommandCenter.maxBufferedEvents) updates waiting)")
            }
            if self.bytes > WorkCommandCenter.maxBufferedBytes {
                return ParleyError(code: .cancelled, message: "command \(id) stopped: its output came faster than it was read (\(self.bytes >> 20) MiB waiting)")
            }
            return nil
        }
    }

    /// The `Run` of command `id`: `pump` passes its events on (to `pass`), in a task that
    /// ends the command's entry when it ends; cancelling the run (or dropping its events)
    /// cancels the task, and so does a reader `maxBufferedEvents` behind: the task's
    /// cancellation ends the pump's upstream, which stops the command on the worker, and the
    /// reader is told why after what it has not read yet.
    private func forward(
        id: UInt64, worker: String,
        _ pump: @escaping @Sendable (_ pass: @Sendable (Event) -> Void) async throws -> Void
    ) -> Run {
        let (events, continuation) = AsyncThrowingStream<Event, any Error>.makeStream(bufferingPolicy: .bufferingOldest(Self.maxBufferedEvents + 1))
        let backlog = NIOLockedValueBox(Backlog())
        let overflow: @Sendable () -> ParleyError? = { backlog.withLockedValue { $0.overflow } }
        let pass: @Sendable (Event) -> Void = { event in
            // Yielded under the lock: the sizes stay in the order of the buffer.
            let stopped = backlog.withLockedValue { b -> Bool in
                guard b.overflow == nil else { return false }
                b.overflow = b.yielded(continuation.yield(event), event, size: Self.bytes(of: event), id: id)
                return b.overflow != nil
            }
            if stopped { withUnsafeCurrentTask { $0?.cancel() } }
        }
        let forward = Task {
            defer { self.state.withLockedValue { _ = $0.commands.removeValue(forKey: id) } }
            do {
                try await pump(pass)
                if let stopped = overflow() { continuation.finish(throwing: stopped) } else { continuation.finish() }
            } catch {
                continuation.finish(throwing: overflow() ?? error)
            }
        }
        continuation.onTermination = { _ in forward.cancel() }
        return Run(id: id, worker: worker, events: events, cancellation: { forward.cancel() })
    }

    /// Sends an `InterruptCommand` for a running command; false when the worker no longer
    /// runs it.
    public func interrupt(_ id: UInt64, signal: Int32 = 0, reason: String = "") async throws -> Bool {
        let active = self.state.withLockedValue { $0.commands[id] }
        if let link = active?.link { return try await link.interrupt(id, signal: signal, reason: reason) }
        guard let connection = active?.connection else { return false }
        var interrupt = Parley_Work_V1_InterruptCommand()
        interrupt.commandID = id
        interrupt.signal = signal
        interrupt.reason = reason
        return try await connection.request(interrupt, as: Parley_Work_V1_InterruptReply.self).found
    }

    static func check(_ path: String) throws(ParleyError) {
        do throws(WorkFiles.FileError) {
            try CommandPaths.check(path)
        } catch {
            throw ParleyError(code: .invalidArgument, message: "the command is refused: \(error.message)")
        }
    }

    /// The transfer of command `id`, if `connection` (the worker's) runs it in `direction`;
    /// takes the chunk's place: `offset` must be the next, and `count` bytes must fit.
    private func take(_ id: UInt64, from connection: ParleyConnection, direction: Direction, offset: UInt64, count: UInt64) throws(ParleyError) -> any WorkTransfer {
        try self.state.withLockedValue { state -> Result<any WorkTransfer, ParleyError> in
            guard var active = state.commands[id] else { return .failure(ParleyError(code: .invalidArgument, message: "no command \(id) runs on this master")) }
            guard active.connection === connection else { return .failure(ParleyError(code: .invalidArgument, message: "command \(id) is not this worker's")) }
            guard active.direction == direction, let transfer = active.transfer else {
                return .failure(ParleyError(code: .invalidArgument, message: "command \(id) is not \(direction == .upload ? "an upload" : "a download")"))
            }
            guard offset == active.next else { return .failure(ParleyError(code: .invalidArgument, message: "command \(id): a chunk at offset \(offset) where \(active.next) was next")) }
            guard active.limit >= offset, count <= active.limit - offset else {
                return .failure(ParleyError(code: .invalidArgument, message: "command \(id): the \(direction == .upload ? "upload" : "download") is over its limit of \(active.limit) bytes"))
            }
            active.next = offset + count
            state.commands[id] = active
            return .success(transfer)
        }.get()
    }

    /// Registers the transfers' handlers (from workers) and the relay (from submitters).
    /// `relay`: whether submitters may run commands on workers at all.
    public func register(on router: inout ParleyRouter, relay: Bool, requireCapabilities: Bool) {
        if requireCapabilities {
            router.require("work.worker", for: Parley_Work_V1_TransferWrite.self, Parley_Work_V1_TransferRead.self)
            router.require("work.command", for: Parley_Work_V1_RunWorkerCommand.self, Parley_Work_V1_InterruptWorkerCommand.self)
            router.require("work.read", for: Parley_Work_V1_ListWorkers.self)
        }
        router.onWithData(Parley_Work_V1_TransferWrite.self) { (write: Parley_Work_V1_TransferWrite, ctx: ParleyRequestContext) -> ParleyReply<Parley_Work_V1_TransferWritten> in
            let data = ctx.data ?? ByteBuffer()
            let transfer = try self.take(write.commandID, from: ctx.connection, direction: .upload, offset: write.offset, count: UInt64(data.readableBytes))
            try await transfer.write(command: write.commandID, offset: write.offset, data)
            return ParleyReply(Parley_Work_V1_TransferWritten())
        }
        router.onWithData(Parley_Work_V1_TransferRead.self) { (read: Parley_Work_V1_TransferRead, ctx: ParleyRequestContext) -> ParleyReply<Parley_Work_V1_TransferData> in
            let length = min(Int(read.length), WorkCommandExecutor.maxChunk)
            guard length > 0 else { throw ParleyError(code: .invalidArgument, message: "a TransferRead asks for 0 bytes") }
            // The place is taken for the most this chunk can be; the next offset is then set
            // to what came.
            let transfer = try self.take(read.commandID, from: ctx.connection, direction: .download, offset: read.offset, count: 0)
            let (data, eof) = try await transfer.read(command: read.commandID, offset: read.offset, length: length)
            var chunk = data
            if chunk.readableBytes > length { chunk = chunk.getSlice(at: chunk.readerIndex, length: length) ?? chunk }
            _ = try self.take(read.commandID, from: ctx.connection, direction: .download, offset: read.offset, count: UInt64(chunk.readableBytes))
            var reply = Parley_Work_V1_TransferData()
            reply.eof = eof
            return ParleyReply(reply, data: chunk)
        }
        router.on(Parley_Work_V1_ListWorkers.self) { (_: Parley_Work_V1_ListWorkers, _: ParleyRequestContext) -> Parley_Work_V1_WorkerList in
            var list = Parley_Work_V1_WorkerList()
            list.workers = self.workers
            return list
        }
        router.onStream(Parley_Work_V1_RunWorkerCommand.self, item: Parley_Work_V1_CommandUpdate.self) { request, writer, ctx in
            guard relay else { throw Self.relayRefusal }
            guard request.hasCommand else { throw ParleyError(code: .invalidArgument, message: "RunWorkerCommand holds no command") }
            let run = try await self.run(request.command, on: request.worker, transfer: RelayTransfer(connection: ctx.connection))
            // The first item names the command (for InterruptWorkerCommand).
            var started = Parley_Work_V1_CommandUpdate()
            started.commandID = run.id
            started.header = "command \(run.id) on worker \(run.worker)\n"
            try await writer.send(started)
            ctx.logger.info("relaying a command", metadata: ["command": "\(run.id)", "worker": "\(run.worker)", "entity": "\(ctx.session.entity ?? "anonymous")"])
            for try await event in run.events {
                switch event {
                case .update(let update): try await writer.send(update)
                case .result(let result): return result
                }
            }
            throw ParleyError(code: .connectionClosed, message: "worker \(run.worker) went away before command \(run.id) ended")
        }
        router.on(Parley_Work_V1_InterruptWorkerCommand.self) { (request: Parley_Work_V1_InterruptWorkerCommand, _: ParleyRequestContext) -> Parley_Work_V1_InterruptReply in
            guard relay else { throw Self.relayRefusal }
            let id = request.interrupt.commandID
            guard self.state.withLockedValue({ $0.commands[id]?.worker }) == request.worker else {
                var reply = Parley_Work_V1_InterruptReply()
                reply.found = false
                return reply
            }
            var reply = Parley_Work_V1_InterruptReply()
            reply.found = try await self.interrupt(id, signal: request.interrupt.signal, reason: request.interrupt.reason.isEmpty ? "interrupted by a submitter" : request.interrupt.reason)
            return reply
        }
    }

    static let relayRefusal = ParleyError(code: .permissionDenied, message: "this master does not relay commands to workers (start it with --allow-commands)")
}

/// A relayed command's transfer: its chunks go to (come from) the submitter that asked for
/// it, on the submitter's connection, under the same command id.
struct RelayTransfer: WorkTransfer {
    let connection: ParleyConnection

    func write(command: UInt64, offset: UInt64, _ data: ByteBuffer) async throws {
        var write = Parley_Work_V1_TransferWrite()
        write.commandID = command
        write.offset = offset
        _ = try await self.connection.call(write, data: data, as: Parley_Work_V1_TransferWritten.self)
    }

    func read(command: UInt64, offset: UInt64, length: Int) async throws -> (data: ByteBuffer, eof: Bool) {
        var read = Parley_Work_V1_TransferRead()
        read.commandID = command
        read.offset = offset
        read.length = UInt32(clamping: length)
        let reply = try await self.connection.call(read, as: Parley_Work_V1_TransferData.self)
        return (reply.data ?? ByteBuffer(), reply.message.eof)
    }
}
