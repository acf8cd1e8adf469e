import NIOCore
import ParleyWire

/// Runs the handshake and session state machines on the event loop.
///
/// Pipeline: `ByteToMessageHandler(WireDecoder)` → `ParleyConnectionHandler` → (async layer).
/// Inbound it turns decoded banners and frames into `ConnectionEvent`s; outbound it turns
/// `ConnectionCommand`s into frames, stamps seq/ack, and writes each frame as a list of
/// buffers (bulk segments are never copied). Every protocol error is sent to the peer in a
/// CLOSE frame when possible, fired up the pipeline as a `ParleyError`, and closes the channel.
public final class ParleyConnectionHandler: ChannelDuplexHandler, RemovableChannelHandler {
    public typealias InboundIn = WireInbound
    public typealias InboundOut = ConnectionEvent
    public typealias OutboundIn = ConnectionCommand
    public typealias OutboundOut = ByteBuffer

    public enum Role {
        case client(ClientHandshakeStateMachine)
        case server(ServerHandshakeStateMachine)
    }

    private enum State {
        case handshaking(Role)
        case established(SessionStateMachine)
        case closing
    }

    private var state: State
    private var scratch: [ByteBuffer] = []
    /// A flush is scheduled for the end of this event-loop tick.
    private var flushScheduled = false
    /// Between the first `channelRead` of a read burst and its `channelReadComplete`.
    private var inReadBurst = false
    /// A flush was asked for during the read burst; it happens at `channelReadComplete`.
    private var flushAfterReadBurst = false

    public init(role: Role) {
        self.state = .handshaking(role)
    }

    public func channelActive(context: ChannelHandlerContext) {
        guard case .handshaking(var role) = self.state else { return context.fireChannelActive() }
        let step: HandshakeStep
        switch role {
        case .client(var m):
            step = m.start()
            role = .client(m)
        case .server(var m):
            step = m.start()
            role = .server(m)
        }
        self.state = .handshaking(role)
        context.fireChannelActive()
        self.perform(step, context: context)
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.inReadBurst = true
        let inbound = self.unwrapInboundIn(data)
        switch self.state {
        case .closing:
            return
        case .handshaking(var role):
            let step: HandshakeStep
            switch role {
            case .client(var m):
                step = m.received(inbound)
                role = .client(m)
            case .server(var m):
                step = m.received(inbound)
                role = .server(m)
            }
            self.state = .handshaking(role)
            self.perform(step, context: context)
        case .established(var session):
            let event = session.received(inbound)
            self.state = .established(session)
            switch event {
            case .message(let message):
                context.fireChannelRead(self.wrapInboundOut(.message(message)))
            case .notice(let nucleus):
                context.fireChannelRead(self.wrapInboundOut(.notice(nucleus)))
            case .keepaliveAck(let stamp):
                context.fireChannelRead(self.wrapInboundOut(.keepaliveAck(stamp)))
            case .reply(let frame):
                self.writeFrame(frame, context: context)
                context.flush()
            case .ignore:
                break
            case .peerClosed(let error):
                self.state = .closing
                context.fireErrorCaught(error)
                context.close(promise: nil)
            case .violation(let error):
                self.failConnection(error, tellPeer: true, context: context)
            }
        }
    }

    public func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if case .closing = self.state {
            return
        }
        if let error = error as? ParleyError {
            // A decoding error: the bytes the peer sent are bad. Tell it why, then close.
            self.failConnection(error, tellPeer: true, context: context)
        } else {
            self.state = .closing
            context.fireErrorCaught(error)
            context.close(promise: nil)
        }
    }

    public func channelReadComplete(context: ChannelHandlerContext) {
        self.inReadBurst = false
        if self.flushAfterReadBurst {
            self.flushAfterReadBurst = false
            context.flush()
        }
        context.fireChannelReadComplete()
    }

    /// Coalesces flushes. Answers written while a read burst is being handled (handlers that
    /// answer without suspending) leave together when the burst ends, as a raw NIO echo
    /// flushes in `channelReadComplete`. Other writes arrive as separate write+flush jobs on the
    /// event loop; flushing once after all the jobs queued in this tick turns them into one
    /// vectored write instead of one write(2) per answer.
    public func flush(context: ChannelHandlerContext) {
        if self.inReadBurst {
            self.flushAfterReadBurst = true
            return
        }
        guard !self.flushScheduled else { return }
        self.flushScheduled = true
        context.eventLoop.assumeIsolated().execute {
            self.flushScheduled = false
            context.flush()
        }
    }

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let command = self.unwrapOutboundIn(data)
        guard case .established(var session) = self.state else {
            promise?.fail(ParleyError(code: .connectionClosed, message: "connection is not established"))
            return
        }
        switch command {
        case .message(let message):
            do {
                let frame = try session.frame(for: message, allocator: context.channel.allocator)
                self.state = .established(session)
                self.writeFrame(frame, context: context, promise: promise)
            } catch {
                promise?.fail(error)
            }
        case .notice(let nucleus):
            do {
                try session.mayControl(.notice)
                var notice = Parley_V1_Notice()
                notice.nucleus = nucleus
                self.writeFrame(notice.frame(tag: .notice, allocator: context.channel.allocator), context: context, promise: promise)
            } catch {
                promise?.fail(error)
            }
        case .keepalive(let stamp):
            do {
                try session.mayControl(.keepalive)
                self.writeFrame(SessionStateMachine.keepaliveFrame(tag: .keepalive, timestamp: stamp), context: context, promise: promise)
            } catch {
                promise?.fail(error)
            }
        case .close(let error):
            self.state = .closing
            let written = context.eventLoop.makePromise(of: Void.self)
            self.writeFrame(error.status.frame(tag: .close, allocator: context.channel.allocator), context: context, promise: written)
            context.flush()
            let channel = context.channel
            written.futureResult.whenComplete { result in
                promise?.completeWith(result)
                channel.close(promise: nil)
            }
        }
    }

    private func perform(_ step: HandshakeStep, context: ChannelHandlerContext) {
        for element in step.send {
            switch element {
            case .banner(let banner):
                var buffer = context.channel.allocator.buffer(capacity: Banner.size)
                buffer.writeBanner(banner)
                context.write(self.wrapOutboundOut(buffer), promise: nil)
            case .frame(let frame):
                self.writeFrame(frame, context: context)
            }
        }
        switch step.outcome {
        case .none:
            if !step.send.isEmpty { context.flush() }
        case .established(let result):
            if !step.send.isEmpty { context.flush() }
            let role: SessionStateMachine.Role
            if case .handshaking(.client(_)) = self.state { role = .client } else { role = .server }
            let peerMax = result.peerHello.maxFrameSize == 0 ? Frame.defaultMaxFrameSize : Int(result.peerHello.maxFrameSize)
            self.state = .established(SessionStateMachine(role: role, features: result.features, maxPeerFrameSize: peerMax))
            context.fireChannelRead(self.wrapInboundOut(.established(result)))
        case .failed(let error):
            // The step's frames (if any) already hold the CLOSE to send. The error goes up
            // first: closing may complete at once, and would end the stream without a reason.
            self.state = .closing
            context.fireErrorCaught(error)
            self.flushThenClose(context: context)
        }
    }

    private func failConnection(_ error: ParleyError, tellPeer: Bool, context: ChannelHandlerContext) {
        self.state = .closing
        if tellPeer {
            self.writeFrame(error.status.frame(tag: .close, allocator: context.channel.allocator), context: context)
        }
        context.fireErrorCaught(error)
        self.flushThenClose(context: context)
    }

    private func flushThenClose(context: ChannelHandlerContext) {
        let done = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(self.wrapOutboundOut(ByteBuffer()), promise: done)
        let channel = context.channel
        done.futureResult.whenComplete { _ in channel.close(promise: nil) }
    }

    private func writeFrame(_ frame: Frame, context: ChannelHandlerContext, promise: EventLoopPromise<Void>? = nil) {
        self.scratch.removeAll(keepingCapacity: true)
        frame.encode(into: &self.scratch, allocator: context.channel.allocator)
        let last = self.scratch.count - 1
        for (i, buffer) in self.scratch.enumerated() {
            context.write(self.wrapOutboundOut(buffer), promise: i == last ? promise : nil)
        }
    }
}
