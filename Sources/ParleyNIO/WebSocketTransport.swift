import Foundation
import NIOCore
import NIOHTTP1
import NIOWebSocket
import ParleyWire

/// The WebSocket layer of `ws://` and `wss://` channels (RFC 6455): an HTTP/1.1 upgrade, then
/// a `WebSocketStreamHandler` that carries Parley's byte stream in binary messages.
///
/// The Parley handlers are added only once the upgrade has completed, on a channel that is
/// already active: the connection handler starts its handshake when it is added.
enum WebSocketPipeline {
    /// Settings shared by both sides.
    struct Options {
        /// The largest WebSocket frame accepted from the peer (NIO's decoder buffers a whole
        /// frame before handing it on).
        var maxFrameSize: Int
        /// How long a server waits for an upgrade request before closing the connection.
        var upgradeTimeout: TimeAmount
        /// Server side: the web origins allowed (`PosixTransport.webSocketAllowedOrigins`),
        /// `normalized` once here rather than at every request.
        var allowedOrigins: Set<String> = []

        /// True if a request with these headers may upgrade: no `Origin` (not a browser), or
        /// an allowed one.
        func allows(_ headers: HTTPHeaders) -> Bool {
            let origins = headers["Origin"]
            guard !origins.isEmpty else { return true }
            if self.allowedOrigins.contains("*") { return true }
            return origins.allSatisfy { self.allowedOrigins.contains(Self.normalized($0)) }
        }

        /// An origin as browsers serialise it: scheme and host in lower case, no default
        /// port (`HTTPS://App.Example:443` is `https://app.example`).
        static func normalized(_ origin: String) -> String {
            var o = origin.lowercased()
            for (scheme, port) in [("https://", ":443"), ("http://", ":80")] where o.hasPrefix(scheme) && o.hasSuffix(port) {
                o.removeLast(port.count)
            }
            return o
        }
    }

    /// Sets up an accepted channel as an HTTP/1.1 server that upgrades requests for `path` to
    /// WebSocket and answers every other request with an HTTP error.
    /// - Parameters:
    ///   - security: the TLS handshake handler (`wss://`), whose event is fired again once the
    ///     Parley handlers are in place.
    static func configureServer(
        _ channel: any Channel, path: String, options: Options, security: TLSHandshakeHandler?,
        initializer: @escaping ParleyChannelInitializer
    ) throws {
        let securityBox = security.map { NIOLoopBound($0, eventLoop: channel.eventLoop) }
        let upgrader = NIOWebSocketServerUpgrader(
            maxFrameSize: options.maxFrameSize, automaticErrorHandling: true,
            shouldUpgrade: { channel, head in
                channel.eventLoop.makeSucceededFuture(Self.path(of: head.uri) == path && options.allows(head.headers) ? HTTPHeaders() : nil)
            },
            upgradePipelineHandler: { channel, _ in
                Self.addParley(to: channel, role: .server, security: securityBox, initializer: initializer)
            }
        )
        let refusal = HTTPRefusalHandler(path: path, options: options)
        try channel.pipeline.syncOperations.configureHTTPServerPipeline(
            withServerUpgrade: (upgraders: [upgrader], completionHandler: { context in
                // Called before the upgrader adds its handlers: nothing HTTP may stay behind.
                context.pipeline.syncOperations.removeHandler(name: HTTPRefusalHandler.name, promise: nil)
            })
        )
        try channel.pipeline.syncOperations.addHandler(refusal, name: HTTPRefusalHandler.name)
    }

    /// Sets up a fresh client channel to send the upgrade request for `path` once it is
    /// active; returns a future that succeeds once the upgrade has completed and `initializer`
    /// has run, or fails with a `ParleyError` naming `address` and why.
    static func configureClient(
        _ channel: any Channel, host: String, port: Int, path: String, address: String, options: Options,
        security: TLSHandshakeHandler?, initializer: @escaping ParleyChannelInitializer
    ) throws -> EventLoopFuture<Void> {
        let upgraded = channel.eventLoop.makePromise(of: Void.self)
        let securityBox = security.map { NIOLoopBound($0, eventLoop: channel.eventLoop) }
        let upgrader = NIOWebSocketClientUpgrader(
            maxFrameSize: options.maxFrameSize, automaticErrorHandling: true,
            upgradePipelineHandler: { channel, _ in
                let added = Self.addParley(to: channel, role: .client, security: securityBox, initializer: initializer)
                added.cascade(to: upgraded)
                return added
            }
        )
        let hostHeader = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        let requester = UpgradeRequestHandler(path: path, host: hostHeader, address: address, upgraded: upgraded, timeout: options.upgradeTimeout)
        // The server may send its first WebSocket frame right behind the 101: the bytes read
        // past the response must go on to the WebSocket decoder, not be dropped.
        try channel.pipeline.syncOperations.addHTTPClientHandlers(
            leftOverBytesStrategy: .forwardBytes,
            withClientUpgrade: (upgraders: [upgrader], completionHandler: { context in
                // Called before the upgrader adds its handlers.
                context.pipeline.syncOperations.removeHandler(name: UpgradeRequestHandler.name, promise: nil)
            })
        )
        try channel.pipeline.syncOperations.addHandler(requester, name: UpgradeRequestHandler.name)
        return upgraded.futureResult
    }

    /// Adds the byte-stream adapter and the Parley handlers to an upgraded channel, then
    /// repeats the TLS security event (fired while HTTP was in charge) for the Parley handler.
    private static func addParley(
        to channel: any Channel, role: WebSocketStreamHandler.Role, security: NIOLoopBound<TLSHandshakeHandler>?,
        initializer: @escaping ParleyChannelInitializer
    ) -> EventLoopFuture<Void> {
        let gate = role == .server ? WebSocketFrameGate(limit: ParleyConnectionHandler.handshakeFrameLimit) : nil
        do {
            let operations = channel.pipeline.syncOperations
            try operations.addHandler(WebSocketStreamHandler(role: role))
            if let gate {
                // Until the Parley handshake completes, frames are held to the handshake's
                // limit, as on a TCP port, before NIO's decoder buffers one whole.
                let decoder = try operations.handler(type: ByteToMessageHandler<WebSocketFrameDecoder>.self)
                try operations.addHandler(gate, position: .before(decoder))
            }
        } catch {
            return channel.eventLoop.makeFailedFuture(error)
        }
        let gateBox = gate.map { NIOLoopBound($0, eventLoop: channel.eventLoop) }
        return initializer(channel).map {
            if let event = security?.value.event {
                channel.pipeline.fireUserInboundEventTriggered(event)
            }
            if let gateBox {
                if let parley = try? channel.pipeline.syncOperations.handler(type: ParleyConnectionHandler.self) {
                    parley.established.whenSuccess {
                        // Lifted at once (the read that completed the handshake may go on
                        // with a long frame), removed after this event-loop turn.
                        gateBox.value.lift()
                        channel.eventLoop.execute { channel.pipeline.syncOperations.removeHandler(gateBox.value, promise: nil) }
                    }
                } else {
                    // No Parley handshake on this pipeline (a conformance tester's inbox): nothing lifts it.
                    channel.pipeline.syncOperations.removeHandler(gateBox.value, promise: nil)
                }
            }
        }.flatMapErrorThrowing { error in
            channel.close(promise: nil)  // e.g. the server is shutting down
            throw error
        }
    }

    /// The path of a request target (`/parley?x=1` → `/parley`).
    static func path(of uri: String) -> String {
        String(uri.prefix { $0 != "?" && $0 != "#" })
    }
}

/// Answers the HTTP requests that do not upgrade: 404 for another path, 403 for the WebSocket
/// path from a web origin not allowed, 426 (Upgrade Required) for the WebSocket path without
/// a WebSocket upgrade; then closes. Also closes a
/// connection that has not upgraded within `timeout`. Removed from the pipeline when an
/// upgrade starts.
final class HTTPRefusalHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    static let name = "parley.http-refusal"
    private let path: String
    private let options: WebSocketPipeline.Options
    private var timer: Scheduled<Void>?
    private var request: HTTPRequestHead?

    init(path: String, options: WebSocketPipeline.Options) {
        self.path = path
        self.options = options
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let channel = context.channel
        self.timer = context.eventLoop.scheduleTask(in: self.options.upgradeTimeout) { channel.close(promise: nil) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch Self.unwrapInboundIn(data) {
        case .head(let head):
            self.request = head
        case .body:
            break
        case .end:
            guard let request = self.request else { return }
            self.request = nil
            let status: HTTPResponseStatus
            let text: String
            var headers = HTTPHeaders([("Content-Type", "text/plain; charset=utf-8"), ("Connection", "close")])
            if WebSocketPipeline.path(of: request.uri) == self.path, !self.options.allows(request.headers) {
                status = .forbidden
                let origin = request.headers["Origin"].joined(separator: ", ")
                text = "\(self.path) does not accept connections from web pages of \(origin): that origin is not allowed here (parley serve --ws-allow-origin).\n"
            } else if WebSocketPipeline.path(of: request.uri) == self.path {
                status = .upgradeRequired
                text = "\(self.path) is a Parley WebSocket endpoint: send a WebSocket upgrade request (Upgrade: websocket).\n"
                headers.add(name: "Upgrade", value: "websocket")
            } else {
                status = .notFound
                text = "\(WebSocketPipeline.path(of: request.uri)) not found: the Parley WebSocket endpoint here is \(self.path)\n"
            }
            headers.add(name: "Content-Length", value: "\(text.utf8.count)")
            var head = HTTPResponseHead(version: request.version, status: status, headers: headers)
            head.headers.add(name: "Server", value: "parley")
            context.write(Self.wrapOutboundOut(.head(head)), promise: nil)
            context.write(Self.wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: text)))), promise: nil)
            let channel = context.channel
            context.writeAndFlush(Self.wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // The upgrader reports a refused upgrade (another path) as an error before passing the
        // request on to be answered here: not a reason to close.
        if error is NIOWebSocketUpgradeError { return }
        context.close(promise: nil)
    }
}

/// Client side of the upgrade: sends `GET PATH` with the upgrade headers (which
/// `NIOHTTPClientUpgradeHandler` adds) as soon as the channel is active, and turns any
/// answer other than 101, or none within `timeout`, into a clear error. Removed when the
/// upgrade completes.
final class UpgradeRequestHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPClientResponsePart
    typealias OutboundOut = HTTPClientRequestPart

    static let name = "parley.ws-upgrade-request"
    private let path: String
    private let host: String
    private let address: String
    private let upgraded: EventLoopPromise<Void>
    private let timeout: TimeAmount
    private var timer: Scheduled<Void>?
    private var sent = false
    private var response: HTTPResponseHead?
    private var body = ""

    init(path: String, host: String, address: String, upgraded: EventLoopPromise<Void>, timeout: TimeAmount) {
        self.path = path
        self.host = host
        self.address = address
        self.upgraded = upgraded
        self.timeout = timeout
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let (upgraded, channel, address, timeout) = (self.upgraded, context.channel, self.address, self.timeout)
        self.timer = context.eventLoop.scheduleTask(in: timeout) {
            upgraded.fail(ParleyError(code: .timeout, message: "no WebSocket upgrade answer from \(address) within \(Double(timeout.nanoseconds) / 1e9) s"))
            channel.close(promise: nil)
        }
        if context.channel.isActive { self.send(context: context) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        self.send(context: context)
        context.fireChannelActive()
    }

    private func send(context: ChannelHandlerContext) {
        guard !self.sent else { return }
        self.sent = true
        var head = HTTPRequestHead(version: .http1_1, method: .GET, uri: self.path)
        head.headers.add(name: "Host", value: self.host)
        head.headers.add(name: "Content-Length", value: "0")
        context.write(Self.wrapOutboundOut(.head(head)), promise: nil)
        context.writeAndFlush(Self.wrapOutboundOut(.end(nil)), promise: nil)
    }

    /// Only a refused upgrade gets here: the upgrade handler passes on a response other than
    /// 101 and removes itself.
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch Self.unwrapInboundIn(data) {
        case .head(let head):
            self.response = head
        case .body(let bytes):
            if self.body.utf8.count < 200 { self.body += String(buffer: bytes) }
        case .end:
            self.refused(context: context)
        }
    }

    private func refused(context: ChannelHandlerContext) {
        guard let head = self.response else { return }
        self.response = nil
        var why = "HTTP \(head.status.code) \(head.status.reasonPhrase)"
        let text = self.body.trimmingCharacters(in: .whitespacesAndNewlines).prefix(200)
        if !text.isEmpty { why += ": \(text)" }
        self.upgraded.fail(ParleyError(code: .connectFailed, message: "WebSocket upgrade at \(self.address) refused: \(why)"))
        context.close(promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A refused upgrade reports its 101 problems (wrong accept key, no Upgrade header) as
        // errors before passing the response on: keep the response for the message.
        if error is NIOHTTPClientUpgradeError {
            if self.response == nil {
                self.upgraded.fail(ParleyError(code: .connectFailed, message: "WebSocket upgrade at \(self.address) failed: \(error)", cause: error))
                context.close(promise: nil)
            }
            return
        }
        self.upgraded.fail(ParleyError(code: .connectFailed, message: "WebSocket upgrade at \(self.address) failed: \(error)", cause: error))
        context.fireErrorCaught(error)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.refused(context: context)
        self.upgraded.fail(ParleyError(code: .connectFailed, message: "\(self.address) closed the connection during the WebSocket upgrade"))
        context.fireChannelInactive()
    }
}

/// Carries Parley's byte stream over WebSocket (RFC 6455) after the upgrade.
///
/// Inbound, the payload of every binary data frame (and its continuations) is passed on as it
/// arrives: Parley frames its own messages, so WebSocket message boundaries mean nothing to
/// it and fragmented messages need no reassembly. A text frame closes with 1003 (Parley sends
/// binary only), a continuation outside a message or a new message inside one with 1002;
/// pings are answered with pongs.
///
/// Outbound, what was written between two flushes leaves as one binary message, in frames
/// of at most `maxFrameSize` bytes; small buffers are copied together, large ones are sent
/// as they are (a bulk segment is never copied). A client masks every frame (RFC 6455 5.3)
/// with a fresh key; NIO's encoder applies it.
///
/// Closing sends a close frame (1000) and waits, at most `closeTimeout`, for the peer's
/// before closing the connection (RFC 6455 7.1.1); a close frame from the peer is answered
/// with one and the connection closed.
final class WebSocketStreamHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = WebSocketFrame
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = WebSocketFrame

    enum Role { case client, server }

    /// Frames sent are at most this long: large enough that headers cost nothing, small enough
    /// for peers whose decoders keep a small limit.
    static let maxFrameSize = 64 * 1024
    /// Buffers shorter than this are copied into one frame rather than framed one by one.
    static let coalesceBelow = 4 * 1024
    static let closeTimeout = TimeAmount.seconds(2)

    private let role: Role
    private var pending: [ByteBuffer] = []
    private var pendingPromise: EventLoopPromise<Void>?
    /// Inside a binary message whose final frame has not arrived.
    private var inMessage = false
    private var sentClose = false
    private var receivedClose = false
    private var closePromise: EventLoopPromise<Void>?
    private var closeTimer: Scheduled<Void>?

    init(role: Role) { self.role = role }

    /// The payload of the latest ping that came while the socket was full (at most 125 bytes).
    private var unansweredPing: ByteBuffer?

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable, let data = self.unansweredPing, !self.sentClose {
            self.unansweredPing = nil
            context.writeAndFlush(Self.wrapOutboundOut(WebSocketFrame(fin: true, opcode: .pong, maskKey: self.maskKey, data: data)), promise: nil)
        }
        context.fireChannelWritabilityChanged()
    }

    private var maskKey: WebSocketMaskingKey? { self.role == .client ? .random() : nil }

    // MARK: inbound

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = Self.unwrapInboundIn(data)
        switch frame.opcode {
        case .binary, .continuation:
            guard !self.receivedClose else { return }
            if (frame.opcode == .binary) == self.inMessage {
                let why = self.inMessage ? "a new message started inside a fragmented one" : "a continuation frame outside a message"
                return self.fail(context: context, code: .protocolError, why)
            }
            self.inMessage = !frame.fin
            let payload = frame.unmaskedData
            if payload.readableBytes > 0 { context.fireChannelRead(Self.wrapInboundOut(payload)) }
        case .text:
            self.fail(context: context, code: .unacceptableData, "Parley is carried in binary messages, not text")
        case .ping:
            // While the socket does not take what is written, only the latest ping is kept,
            // and answered once it does: a peer that sends pings and never reads would
            // otherwise grow the pongs queued here without bound (also before the Parley
            // handshake, which reads whatever comes). RFC 6455 5.5.3 lets an endpoint answer
            // only the latest of several pings.
            guard !self.sentClose else { return }
            guard context.channel.isWritable else {
                // A copy (at most 125 bytes): a slice would keep the whole read buffer.
                self.unansweredPing = ByteBuffer(bytes: frame.unmaskedData.readableBytesView)
                return
            }
            self.unansweredPing = nil
            context.writeAndFlush(Self.wrapOutboundOut(WebSocketFrame(fin: true, opcode: .pong, maskKey: self.maskKey, data: frame.unmaskedData)), promise: nil)
        case .pong:
            break
        case .connectionClose:
            self.receivedClose = true
            if self.sentClose {
                self.finishClose(context: context)
            } else {
                // Echo the peer's status code (the first two bytes), then close.
                var data = frame.unmaskedData
                let code = data.readSlice(length: min(2, data.readableBytes)) ?? ByteBuffer()
                self.sentClose = true
                self.closeAfterWriting(WebSocketFrame(fin: true, opcode: .connectionClose, maskKey: self.maskKey, data: code), context: context)
            }
        default:
            self.fail(context: context, code: .protocolError, "unknown opcode \(frame.opcode)")
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.closeTimer?.cancel()
        self.closeTimer = nil
        let promise = self.closePromise
        self.closePromise = nil
        promise?.succeed()
        context.fireChannelInactive()
    }

    /// A WebSocket protocol error: tell the Parley handler, send a close frame with `code`, close.
    private func fail(context: ChannelHandlerContext, code: WebSocketErrorCode, _ why: String) {
        guard !self.sentClose else { return }
        context.fireErrorCaught(ParleyError(code: .protocolViolation, message: "WebSocket: \(why)"))
        self.sentClose = true
        var data = context.channel.allocator.buffer(capacity: 2)
        data.write(webSocketErrorCode: code)
        self.closeAfterWriting(WebSocketFrame(fin: true, opcode: .connectionClose, maskKey: self.maskKey, data: data), context: context)
    }

    /// Writes a close frame, then closes the connection (below this handler: a close asked
    /// for meanwhile waits for it in `closePromise`). A peer that does not read may never let
    /// the frame out: the connection is closed `closeTimeout` later all the same.
    private func closeAfterWriting(_ frame: WebSocketFrame, context: ChannelHandlerContext) {
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.writeAndFlush(Self.wrapOutboundOut(frame)).whenComplete { _ in
            let (handler, context) = loopBound.value
            handler.finishClose(context: context)
        }
        self.closeTimer?.cancel()
        self.closeTimer = context.eventLoop.scheduleTask(in: Self.closeTimeout) {
            let (handler, context) = loopBound.value
            handler.finishClose(context: context)
        }
    }

    // MARK: outbound

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard !self.sentClose else {
            promise?.fail(ChannelError.outputClosed)
            return
        }
        self.pending.append(Self.unwrapOutboundIn(data))
        if let promise {
            if let pendingPromise = self.pendingPromise {
                pendingPromise.futureResult.cascade(to: promise)
            } else {
                self.pendingPromise = promise
            }
        }
    }

    func flush(context: ChannelHandlerContext) {
        self.sendPending(context: context)
        context.flush()
    }

    /// Writes what is pending as one binary message.
    private func sendPending(context: ChannelHandlerContext) {
        guard !self.pending.isEmpty else { return }
        var frames: [ByteBuffer] = []
        var small: ByteBuffer?
        for var buffer in self.pending {
            if buffer.readableBytes < Self.coalesceBelow {
                if small == nil { small = context.channel.allocator.buffer(capacity: Self.maxFrameSize) }
                small!.writeBuffer(&buffer)
                if small!.readableBytes >= Self.maxFrameSize - Self.coalesceBelow {
                    frames.append(small!)
                    small = nil
                }
                continue
            }
            if let s = small {
                frames.append(s)
                small = nil
            }
            while buffer.readableBytes > 0 {
                frames.append(buffer.readSlice(length: min(Self.maxFrameSize, buffer.readableBytes))!)
            }
        }
        if let small { frames.append(small) }
        self.pending.removeAll(keepingCapacity: true)
        let promise = self.pendingPromise
        self.pendingPromise = nil
        for (i, data) in frames.enumerated() {
            let last = i == frames.count - 1
            let frame = WebSocketFrame(fin: last, opcode: i == 0 ? .binary : .continuation, maskKey: self.maskKey, data: data)
            context.write(Self.wrapOutboundOut(frame), promise: last ? promise : nil)
        }
    }

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        guard mode == .all, context.channel.isActive, !self.receivedClose else {
            return context.close(mode: mode, promise: promise)
        }
        if let promise {
            if let closePromise = self.closePromise {
                closePromise.futureResult.cascade(to: promise)
            } else {
                self.closePromise = promise
            }
        }
        guard !self.sentClose else { return }
        self.sendPending(context: context)
        self.sentClose = true
        var data = context.channel.allocator.buffer(capacity: 2)
        data.write(webSocketErrorCode: .normalClosure)
        context.writeAndFlush(Self.wrapOutboundOut(WebSocketFrame(fin: true, opcode: .connectionClose, maskKey: self.maskKey, data: data)), promise: nil)
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        self.closeTimer = context.eventLoop.scheduleTask(in: Self.closeTimeout) {
            let (handler, context) = loopBound.value
            handler.finishClose(context: context)
        }
    }

    /// Our close frame was answered (or not in time): close the connection.
    private func finishClose(context: ChannelHandlerContext) {
        self.closeTimer?.cancel()
        self.closeTimer = nil
        let promise = self.closePromise
        self.closePromise = nil
        context.close(mode: .all, promise: promise)
    }
}
