import NIOCore
import ParleyWire

/// What receives a connection's events, on the connection's event loop.
///
/// The async layer implements it (`ParleyConnection`): answers complete their waiting callers
/// and requests start their handlers right where the frame was decoded, with no queue and no
/// thread hop in between.
public protocol ParleyEventSink: AnyObject, Sendable {
    /// An event after the handshake: a message, a notice or a keepalive answer. On the event loop.
    func received(_ event: ConnectionEvent)
    /// The connection has closed, for this reason. Called once, on the event loop.
    func closed(_ reason: ParleyError)
}

/// The tail of a Parley pipeline: hands events to the async layer's sink, and holds reads from
/// the socket while the sink asks it to (back-pressure when its handlers are at their limit).
///
/// When the handshake completes, `establish` is called on the event loop with its result and
/// returns the sink; `established` then succeeds with it. If the connection closes first,
/// `established` fails with the error that closed it (or `connectionClosed`).
public final class ParleyBridgeHandler<Sink: ParleyEventSink>: ChannelDuplexHandler, RemovableChannelHandler {
    public typealias InboundIn = ConnectionEvent
    public typealias OutboundIn = ConnectionCommand
    public typealias OutboundOut = ConnectionCommand

    /// Called on the event loop when the handshake has completed; returns the sink of the session.
    public typealias Establish = (HandshakeResult, ReadControl) throws -> Sink

    private let establish: Establish
    private let establishedPromise: EventLoopPromise<Sink>
    private var sink: Sink?
    /// The first error seen: the reason the connection closes.
    private var failure: ParleyError?
    private var readsPaused = false
    private var readPending = false
    private var context: ChannelHandlerContext?
    private var isClosed = false

    /// Succeeds with the sink once the handshake has completed.
    public var established: EventLoopFuture<Sink> { self.establishedPromise.futureResult }

    public init(eventLoop: any EventLoop, establish: @escaping Establish) {
        self.establish = establish
        self.establishedPromise = eventLoop.makePromise()
    }

    /// Pauses and resumes reading from the socket; usable from any thread.
    public struct ReadControl: Sendable {
        let handler: NIOLoopBound<ParleyBridgeHandler>

        public var eventLoop: any EventLoop { self.handler.eventLoop }

        /// Stops reading (on the event loop) until `resume` is called.
        public func pause() {
            if self.handler.eventLoop.inEventLoop {
                self.handler.value.setReadsPaused(true)
            } else {
                let handler = self.handler
                self.handler.eventLoop.execute { handler.value.setReadsPaused(true) }
            }
        }

        /// Resumes reading, issuing the read that was held back, if any.
        public func resume() {
            if self.handler.eventLoop.inEventLoop {
                self.handler.value.setReadsPaused(false)
            } else {
                let handler = self.handler
                self.handler.eventLoop.execute { handler.value.setReadsPaused(false) }
            }
        }
    }

    public func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        self.closeOut()
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let event = self.unwrapInboundIn(data)
        if let sink = self.sink {
            sink.received(event)
            return
        }
        guard case .established(let result) = event else { return }
        do {
            let sink = try self.establish(result, ReadControl(handler: NIOLoopBound(self, eventLoop: context.eventLoop)))
            self.sink = sink
            self.establishedPromise.succeed(sink)
        } catch {
            self.failure = error as? ParleyError ?? ParleyError(code: .unspecified, message: "session setup failed: \(error)", cause: error)
            context.close(promise: nil)
        }
    }

    public func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // Every error reaches the connection handler first, which sends CLOSE when it can and
        // closes the channel once that is written: here it is only the reason to report.
        if self.failure == nil {
            self.failure = error as? ParleyError
                ?? ParleyError(code: .connectionClosed, message: "connection failed: \(error)", cause: error)
        }
    }

    public func channelInactive(context: ChannelHandlerContext) {
        self.closeOut()
        context.fireChannelInactive()
    }

    public func read(context: ChannelHandlerContext) {
        if self.readsPaused {
            self.readPending = true
        } else {
            context.read()
        }
    }

    func setReadsPaused(_ paused: Bool) {
        self.readsPaused = paused
        if !paused, self.readPending, let context = self.context {
            self.readPending = false
            context.read()
        }
    }

    private func closeOut() {
        guard !self.isClosed else { return }
        self.isClosed = true
        if let sink = self.sink {
            sink.closed(self.failure ?? ParleyError(code: .connectionClosed, message: "peer closed the connection"))
        } else {
            self.establishedPromise.fail(self.failure ?? ParleyError(code: .connectionClosed, message: "connection closed during the handshake"))
        }
    }
}
