import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket

/// How a worker's credentials at the WebSocket upgrade are judged.
public enum BuildbotAuthentication: Sendable, Hashable {
    /// The worker's name.
    case accepted(String)
    /// No `Authorization: Basic` header, or a name and password that do not match: 401.
    case refused(String)
    /// An `Authorization` header that is not Basic base64 of "name:password": 400.
    case malformed(String)

    /// Reads `Authorization: Basic base64(name:password)` and asks `check`.
    public static func judge(_ headers: HTTPHeaders, check: (String, String) -> BuildbotAuthentication) -> BuildbotAuthentication {
        let values = headers["Authorization"]
        guard let value = values.first else { return .refused("no Authorization header: a Buildbot worker logs in with HTTP Basic authentication") }
        guard values.count == 1 else { return .malformed("\(values.count) Authorization headers") }
        let parts = value.split(separator: " ", maxSplits: 1)
        guard parts.count == 2, parts[0].lowercased() == "basic" else { return .malformed("the Authorization header is not Basic") }
        guard let data = Data(base64Encoded: String(parts[1]).trimmingCharacters(in: .whitespaces)), let text = String(data: data, encoding: .utf8) else {
            return .malformed("the Basic credentials are not base64 of UTF-8 text")
        }
        guard let colon = text.firstIndex(of: ":") else { return .malformed("the Basic credentials have no ':' between name and password") }
        return check(String(text[..<colon]), String(text[text.index(after: colon)...]))
    }
}

/// One `update`, `complete` or transfer step of a command, as the connection hands it on.
public enum BuildbotCommandEvent: Sendable {
    case updates([BuildbotUpdate])
    /// The command ended: nil, or the worker's failure text.
    case complete(failure: String?)
}

/// The master's end of a file moving between master and worker during a command: what
/// `upload_file` writes and what `download_file` reads. Every call is one of the worker's
/// requests; its answer waits for the call (Buildbot's own flow control).
public protocol BuildbotTransfer: Sendable {
    /// `update_upload_file_write`: the next chunk of the worker's file.
    func write(_ bytes: [UInt8]) async throws
    /// `update_upload_file_close`: the file is complete.
    func closeWrite() async throws
    /// `update_upload_file_utime` (keepstamp): the worker file's times, seconds since 1970.
    func setTimes(access: Double, modified: Double) async throws
    /// `update_read_file`: up to `length` next bytes; empty at the end.
    func read(length: Int) async throws -> [UInt8]
    /// `update_read_file_close`.
    func closeRead() async throws
}

/// A connected Buildbot worker, after its upgrade: requests to it (`call`), the commands it
/// runs (`start`), and the requests it sends, answered here. Closing it closes the socket;
/// everything waiting fails with `BuildbotConnectionError`.
public final class BuildbotConnection: Sendable {
    public let worker: String
    public let remoteAddress: String
    let channel: any Channel
    let logger: Logger

    private struct Command {
        var continuation: AsyncThrowingStream<BuildbotCommandEvent, any Error>.Continuation
        var transfer: (any BuildbotTransfer)?
    }

    private struct State {
        var requests = BuildbotRequests()
        var waiters: [Int64: CheckedContinuation<MessagePack, any Error>] = [:]
        var commands: [String: Command] = [:]
        /// Commands whose `complete` has been received and is waiting to be served: no
        /// longer running (`isRunning`), though their events have not ended yet.
        var completing: Set<String> = []
        var nextCommand: UInt64 = 0
        var closed: String?
        /// The connection has ended and every request the worker sent before has been served
        /// (`closed()` returns from then on).
        var drained = false
        var closeWaiters: [CheckedContinuation<Void, Never>] = []
        /// The worker's requests received and not yet answered.
        var queued = 0
        var readsPaused = false
        var writableWaiters: [CheckedContinuation<Void, Never>] = []
    }

    /// Past this many unanswered requests of the worker the connection stops reading (the
    /// worker's sends then wait in TCP) until they are down to `resumeReadingAt`: a worker
    /// that sends faster than the master answers, or that does not read the answers (they
    /// are answered only while the socket takes them), cannot grow the master's memory.
    static let maxQueuedRequests = 256
    static let resumeReadingAt = 64

    private let state = NIOLockedValueBox(State())
    private let inbox: AsyncStream<(op: String, seq: Int64, body: MessagePack)>.Continuation
    /// How long `call` waits for an answer before the connection is declared dead.
    public let callTimeout: Duration

    init(worker: String, channel: any Channel, callTimeout: Duration, logger: Logger) {
        self.worker = worker
        self.channel = channel
        self.remoteAddress = channel.remoteAddress?.description ?? "?"
        self.callTimeout = callTimeout
        self.logger = logger
        let (stream, continuation) = AsyncStream<(op: String, seq: Int64, body: MessagePack)>.makeStream()
        self.inbox = continuation
        // The worker's requests, answered one at a time in the order they came: a command's
        // updates and chunks stay in order, and each chunk is answered only once stored.
        Task { [self] in
            for await request in stream {
                await self.untilWritable()
                await self.serve(request.op, seq: request.seq, body: request.body)
                let resume = self.state.withLockedValue { state -> Bool in
                    state.queued -= 1
                    guard state.readsPaused, state.queued <= Self.resumeReadingAt else { return false }
                    state.readsPaused = false
                    return true
                }
                if resume { self.applyReadState() }
            }
            // The connection has ended (`finish`) and what the worker sent before its end has
            // been served: a command whose `complete` came before the close frame, the end of
            // the stream or the master's own close has ended as it did; the others fail now.
            self.drained()
        }
    }

    /// Sets the channel's auto-read to what the state says now (on the event loop, so that a
    /// pause and a resume decided on different threads end in the latest one).
    private func applyReadState() {
        let channel = self.channel
        channel.eventLoop.execute { [self] in
            let paused = self.state.withLockedValue { $0.readsPaused }
            channel.setOption(ChannelOptions.autoRead, value: !paused).whenFailure { _ in }
        }
    }

    /// Returns once the channel takes writes (at once if it does), or it has closed.
    private func untilWritable() async {
        if self.channel.isWritable { return }
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let wait = self.state.withLockedValue { state -> Bool in
                guard state.closed == nil, !self.channel.isWritable else { return false }
                state.writableWaiters.append(continuation)
                return true
            }
            if !wait { continuation.resume() }
        }
    }

    /// From the channel handler: the channel's writability changed.
    func writabilityChanged() {
        guard self.channel.isWritable else { return }
        let waiters = self.state.withLockedValue { state in
            defer { state.writableWaiters = [] }
            return state.writableWaiters
        }
        for w in waiters { w.resume() }
    }

    /// Why the connection ended, once it has.
    public var closeReason: String? { self.state.withLockedValue { $0.closed } }

    /// Sends a request and waits for its answer; a worker's exception is thrown as
    /// `BuildbotRemoteError`. No answer within `callTimeout` closes the connection.
    @discardableResult
    public func call(_ op: String, _ fields: [(String, MessagePack)] = []) async throws -> MessagePack {
        let timeout = self.callTimeout
        let result: MessagePack = try await withCheckedThrowingContinuation { continuation in
            let sent: Result<Int64, any Error> = self.state.withLockedValue { state in
                if let why = state.closed { return .failure(BuildbotConnectionError(worker: self.worker, reason: why)) }
                do {
                    let seq = try state.requests.send()
                    state.waiters[seq] = continuation
                    return .success(seq)
                } catch {
                    return .failure(error)
                }
            }
            switch sent {
            case .failure(let error):
                continuation.resume(throwing: error)
            case .success(let seq):
                self.send(BuildbotMessage.request(op: op, seq: seq, fields))
                self.channel.eventLoop.scheduleTask(in: TimeAmount(timeout)) { [self] in
                    if self.state.withLockedValue({ $0.waiters[seq] != nil }) {
                        self.close(reason: "no answer to \(op) (request \(seq)) within \(timeout)")
                    }
                }
            }
        }
        return result
    }

    /// Starts a command on the worker: registers it before sending `start_command` (a quick
    /// command's updates and completion arrive before the answer), then returns its id and
    /// events. The stream ends after `.complete`, or fails when the worker refuses the
    /// command or the connection ends.
    public func start(_ name: String, args: MessagePack, builder: String? = nil, transfer: (any BuildbotTransfer)? = nil) async throws -> (id: String, events: AsyncThrowingStream<BuildbotCommandEvent, any Error>) {
        let (events, continuation) = AsyncThrowingStream<BuildbotCommandEvent, any Error>.makeStream()
        let id: String = try self.state.withLockedValue { state -> Result<String, any Error> in
            if let why = state.closed { return .failure(BuildbotConnectionError(worker: self.worker, reason: why)) }
            let id = String(state.nextCommand)
            state.nextCommand += 1
            state.commands[id] = Command(continuation: continuation, transfer: transfer)
            return .success(id)
        }.get()
        var fields: [(String, MessagePack)] = [("command_id", .string(id)), ("command_name", .string(name)), ("args", args)]
        if let builder { fields.append(("builder_name", .string(builder))) }
        do {
            try await self.call("start_command", fields)
        } catch {
            // A command whose `complete` came before the answer (and the connection then
            // ended) is left to the inbox, which delivers its end.
            let command = self.state.withLockedValue { s in s.completing.contains(id) ? nil : s.commands.removeValue(forKey: id) }
            command?.continuation.finish(throwing: error)
        }
        return (id, events)
    }

    /// Asks the worker to interrupt a running command.
    public func interrupt(_ id: String, why: String) async throws {
        try await self.call("interrupt_command", [("command_id", .string(id)), ("why", .string(why))])
    }

    /// Whether the command still runs (no `complete` received yet, the connection not ended).
    public func isRunning(_ id: String) -> Bool {
        self.state.withLockedValue { $0.closed == nil && $0.commands[id] != nil && !$0.completing.contains(id) }
    }

    /// The ids of the commands running now (no `complete` received yet, the connection not ended).
    public var runningCommands: [String] {
        self.state.withLockedValue { s in s.closed != nil ? [] : s.commands.keys.filter { !s.completing.contains($0) } }
    }

    /// Closes the connection (no WebSocket close handshake: neither Buildbot side waits for
    /// one); every call waiting fails; what the worker sent before is still served, and then
    /// the commands not completed fail.
    public func close(reason: String) {
        self.finish(reason: reason)
        self.channel.close(promise: nil)
    }

    /// Waits until the connection has ended and what the worker sent before its end has been
    /// served (every command completed then has delivered its end; the others have failed).
    public func closed() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let done = self.state.withLockedValue { state -> Bool in
                if state.drained { return true }
                state.closeWaiters.append(continuation)
                return false
            }
            if done { continuation.resume() }
        }
    }

    // MARK: From the channel

    /// The connection ended: calls waiting fail at once; the worker's requests already
    /// received are still served (in the inbox's task, which then fails the commands left
    /// and wakes `closed()`'s waiters).
    func finish(reason: String) {
        let ended = self.state.withLockedValue { state -> (waiters: [CheckedContinuation<MessagePack, any Error>], writable: [CheckedContinuation<Void, Never>])? in
            guard state.closed == nil else { return nil }
            state.closed = reason
            _ = state.requests.drain()
            defer {
                state.waiters = [:]
                state.writableWaiters = []
            }
            return (Array(state.waiters.values), state.writableWaiters)
        }
        guard let ended else { return }
        let error = BuildbotConnectionError(worker: self.worker, reason: reason)
        for w in ended.waiters { w.resume(throwing: error) }
        for w in ended.writable { w.resume() }
        self.inbox.finish()
        // A request being served may wait on a transfer (a relayed one, on its submitter):
        // the end is not held up longer than the call timeout by it.
        self.channel.eventLoop.scheduleTask(in: TimeAmount(self.callTimeout)) { [self] in self.drained() }
    }

    /// The connection has ended and what the worker sent before has been served (or the
    /// call timeout has passed since the end): the commands left fail, `closed()` returns.
    private func drained() {
        let (commands, waiters, reason) = self.state.withLockedValue { state -> ([Command], [CheckedContinuation<Void, Never>], String) in
            guard !state.drained else { return ([], [], "") }
            state.drained = true
            defer {
                state.commands = [:]
                state.completing = []
                state.closeWaiters = []
            }
            return (Array(state.commands.values), state.closeWaiters, state.closed ?? "closed")
        }
        let error = BuildbotConnectionError(worker: self.worker, reason: reason)
        for c in commands { c.continuation.finish(throwing: error) }
        for w in waiters { w.resume() }
    }

    /// A decoded message from the worker.
    func received(_ message: BuildbotMessage) throws(BuildbotProtocolError) {
        switch message {
        case .response(let seq, let result, let isException):
            let waiter = try self.state.withLockedValue { state -> Result<CheckedContinuation<MessagePack, any Error>?, BuildbotProtocolError> in
                do throws(BuildbotProtocolError) { try state.requests.receive(seq) } catch { return .failure(error) }
                return .success(state.waiters.removeValue(forKey: seq))
            }.get()
            if isException {
                waiter?.resume(throwing: BuildbotRemoteError(message: result.stringValue ?? "\(result)"))
            } else {
                waiter?.resume(returning: result)
            }
        case .request(let op, let seq, let body):
            let pause = self.state.withLockedValue { state -> Bool in
                state.queued += 1
                if op == "complete", let id = Self.commandID(body), state.commands[id] != nil { state.completing.insert(id) }
                guard !state.readsPaused, state.queued >= Self.maxQueuedRequests else { return false }
                state.readsPaused = true
                return true
            }
            self.inbox.yield((op, seq, body))
            if pause { self.applyReadState() }
        }
    }

    private func send(_ message: MessagePack) {
        let bytes = message.encoded()
        var buffer = self.channel.allocator.buffer(capacity: bytes.count)
        buffer.writeBytes(bytes)
        self.channel.writeAndFlush(WebSocketFrame(fin: true, opcode: .binary, data: buffer), promise: nil)
    }

    private func respond(_ seq: Int64, _ result: MessagePack = .nil, exception: Bool = false) {
        self.send(BuildbotMessage.response(seq: seq, result: result, exception: exception))
    }

    /// The command a request of the worker names (a string, or an integer as some send).
    private static func commandID(_ body: MessagePack) -> String? {
        body["command_id"]?.stringValue ?? body["command_id"]?.intValue.map(String.init)
    }

    /// Answers one of the worker's requests (all of them name a command). After the
    /// connection's end too, for what the worker sent before it (see `drained`).
    private func serve(_ op: String, seq: Int64, body: MessagePack) async {
        let id = Self.commandID(body)
        let command = id.flatMap { id in self.state.withLockedValue { $0.commands[id] } }
        let known = ["update", "complete", "update_upload_file_write", "update_upload_file_close", "update_upload_file_utime",
                     "update_read_file", "update_read_file_close", "update_upload_directory_write", "update_upload_directory_unpack"]
        guard known.contains(op) else {
            self.logger.notice("buildbot worker sent an unknown request", metadata: ["worker": "\(self.worker)", "op": "\(op)"])
            self.respond(seq, .string("Command \(op) does not exist."), exception: true)
            return
        }
        guard let id, let command else {
            self.respond(seq, .string("\(op): no command \(id ?? "(none)") is running"), exception: true)
            return
        }
        do {
            switch op {
            case "update":
                command.continuation.yield(.updates(try BuildbotUpdate.parse(body["args"] ?? .nil)))
                self.respond(seq)
            case "complete":
                let args = body["args"] ?? .nil
                self.state.withLockedValue { state in
                    state.commands[id] = nil
                    state.completing.remove(id)
                }
                command.continuation.yield(.complete(failure: args.isNil ? nil : (args.stringValue ?? "\(args)")))
                command.continuation.finish()
                self.respond(seq)
            case "update_upload_file_write", "update_upload_directory_write":
                guard let transfer = command.transfer else { throw BuildbotProtocolError("command \(id) does not upload") }
                guard let bytes = body["args"]?.binaryValue ?? body["args"]?.stringValue.map({ Array($0.utf8) }) else {
                    throw BuildbotProtocolError("update_upload_file_write: args must be binary")
                }
                try await transfer.write(bytes)
                self.respond(seq)
            case "update_upload_file_close", "update_upload_directory_unpack":
                guard let transfer = command.transfer else { throw BuildbotProtocolError("command \(id) does not upload") }
                try await transfer.closeWrite()
                self.respond(seq)
            case "update_upload_file_utime":
                guard let transfer = command.transfer else { throw BuildbotProtocolError("command \(id) does not upload") }
                guard let access = body["access_time"]?.doubleValue, let modified = body["modified_time"]?.doubleValue else {
                    throw BuildbotProtocolError("update_upload_file_utime: access_time and modified_time must be numbers")
                }
                try await transfer.setTimes(access: access, modified: modified)
                self.respond(seq)
            case "update_read_file":
                guard let transfer = command.transfer else { throw BuildbotProtocolError("command \(id) does not download") }
                guard let length = body["length"]?.intValue, length >= 0 else { throw BuildbotProtocolError("update_read_file: length must be a non-negative integer") }
                self.respond(seq, .binary(try await transfer.read(length: Int(min(length, 1 << 20)))))
            case "update_read_file_close":
                guard let transfer = command.transfer else { throw BuildbotProtocolError("command \(id) does not download") }
                try await transfer.closeRead()
                self.respond(seq)
            default:
                throw BuildbotProtocolError("\(op) is not served by this master")
            }
        } catch {
            self.respond(seq, .string("\(error)"), exception: true)
        }
    }
}

/// The connection to a worker ended.
public struct BuildbotConnectionError: Error, Sendable, Hashable, CustomStringConvertible {
    public var worker: String
    public var reason: String
    public var description: String { "buildbot worker \(self.worker): connection closed: \(self.reason)" }
}

/// The worker answered a request with an exception.
public struct BuildbotRemoteError: Error, Sendable, Hashable, CustomStringConvertible {
    public var message: String
    public var description: String { "the worker refused: \(self.message)" }
}

/// A step of a job (mkdir, a file's transfer) the worker did not complete by its deadline.
struct BuildbotStepOverdue: Error, Sendable, Hashable, CustomStringConvertible {
    var message: String
    var description: String { self.message }
}

/// Binary frames (whole messages, after the aggregator) to the connection; text frames
/// ignored, as Buildbot does; ping answered; a close or a bad message closes the socket.
final class BuildbotFrameHandler: ChannelInboundHandler {
    typealias InboundIn = WebSocketFrame
    typealias OutboundOut = WebSocketFrame

    /// TCP_QUICKACK (12 on Linux; Glibc does not export the constant to Swift).
    static let quickACK = ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: 12))

    let connection: BuildbotConnection
    let limits: MessagePack.Limits
    /// A bad message was refused: what comes after it is ignored until the connection closes.
    private var refused = false

    init(connection: BuildbotConnection, limits: MessagePack.Limits) {
        self.connection = connection
        self.limits = limits
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = Self.unwrapInboundIn(data)
        if self.refused { return }
        // ACK at once: the worker's socket has Nagle's algorithm on, so its next message (a
        // command's update after the answer to start_command) waits for this ACK, which Linux
        // would otherwise delay by up to 40 ms: 20 commands a second instead of hundreds.
        // TCP_QUICKACK is not sticky, hence once per read.
        try? context.channel.syncOptions?.setOption(Self.quickACK, value: 1)
        switch frame.opcode {
        case .binary:
            var payload = frame.unmaskedData
            let bytes = payload.readBytes(length: payload.readableBytes) ?? []
            do {
                let value = try MessagePack.decode(bytes, limits: self.limits)
                try self.connection.received(try BuildbotMessage.parse(value))
            } catch {
                self.refuse(context: context, code: .dataInconsistentWithMessage, "\(error)")
            }
        case .connectionClose:
            self.connection.finish(reason: "the worker closed the WebSocket")
            context.close(promise: nil)
        case .ping:
            // Answered only while the worker reads: a pong may answer just the latest ping
            // (RFC 6455 5.5.3), and pongs to a worker that does not read would pile up here.
            guard context.channel.isWritable else { break }
            var payload = frame.unmaskedData
            let pong = WebSocketFrame(fin: true, opcode: .pong, data: payload.readSlice(length: min(payload.readableBytes, 125)) ?? context.channel.allocator.buffer(capacity: 0))
            context.writeAndFlush(Self.wrapOutboundOut(pong), promise: nil)
        default:
            break  // text frames and pongs
        }
    }

    /// A message that breaks the protocol: a close frame naming what was wrong, then the end.
    private func refuse(context: ChannelHandlerContext, code: WebSocketErrorCode, _ why: String) {
        self.connection.logger.warning("buildbot worker sent a bad message", metadata: ["worker": "\(self.connection.worker)", "error": "\(why)"])
        var data = context.channel.allocator.buffer(capacity: 125)
        data.write(webSocketErrorCode: code)
        data.writeString(String(why.utf8.prefix(120)) ?? "bad message")
        self.connection.finish(reason: "bad message: \(why)")
        self.refused = true
        let channel = context.channel
        context.writeAndFlush(Self.wrapOutboundOut(WebSocketFrame(fin: true, opcode: .connectionClose, data: data))).whenComplete { _ in channel.close(promise: nil) }
        // A worker that does not read never takes the close frame: closed all the same.
        context.eventLoop.scheduleTask(in: .seconds(5)) { channel.close(promise: nil) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.connection.finish(reason: "the connection was lost")
        context.fireChannelInactive()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        self.connection.writabilityChanged()
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.connection.finish(reason: "\(error)")
        context.close(promise: nil)
    }
}

/// Answers the HTTP requests that do not upgrade: 401 for missing or wrong credentials (with
/// `WWW-Authenticate`), 400 for malformed ones, 426 for a request that is not a WebSocket
/// upgrade; then closes.
final class BuildbotRefusalHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let judge: @Sendable (HTTPHeaders) -> BuildbotAuthentication
    private var request: HTTPRequestHead?

    init(judge: @escaping @Sendable (HTTPHeaders) -> BuildbotAuthentication) {
        self.judge = judge
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch Self.unwrapInboundIn(data) {
        case .head(let head): self.request = head
        case .body: break
        case .end:
            guard let request = self.request else { return }
            self.request = nil
            var headers = HTTPHeaders([("Content-Type", "text/plain; charset=utf-8"), ("Connection", "close"), ("Server", "parley")])
            let status: HTTPResponseStatus
            let text: String
            switch self.judge(request.headers) {
            case .refused(let why):
                status = .unauthorized
                text = why
                headers.add(name: "WWW-Authenticate", value: "Basic realm=\"parley-work buildbot\"")
            case .malformed(let why):
                status = .badRequest
                text = why
            case .accepted:
                status = .upgradeRequired
                text = "this is Parley Work's Buildbot endpoint: connect with a WebSocket upgrade (buildbot-worker --protocol=msgpack_experimental_v7)"
                headers.add(name: "Upgrade", value: "websocket")
            }
            let body = text + "\n"
            headers.add(name: "Content-Length", value: "\(body.utf8.count)")
            context.write(Self.wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: status, headers: headers))), promise: nil)
            context.write(Self.wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
            let channel = context.channel
            context.writeAndFlush(Self.wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if error is NIOWebSocketUpgradeError { return }
        context.close(promise: nil)
    }
}

/// The WebSocket listener: HTTP/1.1 upgrade with Basic authentication, then a
/// `BuildbotConnection` per worker, handed to `onConnection`.
public final class BuildbotListener: Sendable {
    public struct Configuration: Sendable {
        public var host: String
        public var port: Int
        /// Largest message (one frame, or fragments together).
        public var maxMessageBytes: Int = 16 << 20
        public var callTimeout: Duration = .seconds(60)
        /// A connection that has not become a logged-in WebSocket this long after it was
        /// accepted (no request, a slow one, a refused one kept open) is closed.
        public var upgradeTimeout: Duration = .seconds(30)
        public var limits = MessagePack.Limits()
        public init(host: String, port: Int) {
            self.host = host
            self.port = port
        }
    }

    let channel: any Channel
    public var port: Int { self.channel.localAddress?.port ?? 0 }

    private init(channel: any Channel) { self.channel = channel }

    public static func bind(
        _ configuration: Configuration, logger: Logger,
        authenticate: @escaping @Sendable (String, String) -> BuildbotAuthentication,
        onConnection: @escaping @Sendable (BuildbotConnection) -> Void
    ) async throws -> BuildbotListener {
        let judge: @Sendable (HTTPHeaders) -> BuildbotAuthentication = { BuildbotAuthentication.judge($0, check: authenticate) }
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                let upgrader = NIOWebSocketServerUpgrader(
                    maxFrameSize: configuration.maxMessageBytes, automaticErrorHandling: true,
                    shouldUpgrade: { channel, head in
                        guard case .accepted = judge(head.headers) else { return channel.eventLoop.makeSucceededFuture(nil) }
                        return channel.eventLoop.makeSucceededFuture(HTTPHeaders())
                    },
                    upgradePipelineHandler: { channel, head in
                        guard case .accepted(let name) = judge(head.headers) else { return channel.close() }
                        let connection = BuildbotConnection(worker: name, channel: channel, callTimeout: configuration.callTimeout, logger: logger)
                        do {
                            try channel.pipeline.syncOperations.addHandler(NIOWebSocketFrameAggregator(
                                minNonFinalFragmentSize: 0, maxAccumulatedFrameCount: 4096, maxAccumulatedFrameSize: configuration.maxMessageBytes
                            ))
                            try channel.pipeline.syncOperations.addHandler(BuildbotFrameHandler(connection: connection, limits: configuration.limits))
                        } catch {
                            return channel.eventLoop.makeFailedFuture(error)
                        }
                        onConnection(connection)
                        return channel.eventLoop.makeSucceededVoidFuture()
                    }
                )
                let deadline = channel.eventLoop.scheduleTask(in: TimeAmount(configuration.upgradeTimeout)) {
                    logger.info("buildbot connection closed: no logged-in WebSocket within \(configuration.upgradeTimeout)",
                                metadata: ["peer": "\(channel.remoteAddress.map { "\($0)" } ?? "?")"])
                    channel.close(promise: nil)
                }
                channel.closeFuture.whenComplete { _ in deadline.cancel() }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(
                        withServerUpgrade: (upgraders: [upgrader], completionHandler: { context in
                            deadline.cancel()
                            context.pipeline.syncOperations.removeHandler(name: "buildbot.refusal", promise: nil)
                        })
                    )
                    try channel.pipeline.syncOperations.addHandler(BuildbotRefusalHandler(judge: judge), name: "buildbot.refusal")
                }
            }
            .bind(host: configuration.host, port: configuration.port).get()
        return BuildbotListener(channel: channel)
    }

    public func close() async {
        try? await self.channel.close()
    }
}
