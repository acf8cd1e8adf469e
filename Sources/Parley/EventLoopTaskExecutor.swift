import NIOCore

/// Runs Swift tasks on a SwiftNIO event loop.
///
/// A connection's request handlers run here when `ParleyConnectionLimits.handlersOnEventLoop`
/// is set: a request is then read, dispatched, handled and answered on the thread that owns
/// the socket, without a thread hop (a handler that suspends resumes here too). Handlers
/// must then not block (they are async; CPU-heavy ones should turn the option off). Services
/// use it too, to run their own tasks on a connection's event loop
/// (`Task(executorPreference: EventLoopTaskExecutor(connection.eventLoop))`).
public final class EventLoopTaskExecutor: TaskExecutor, Sendable {
    public let eventLoop: any EventLoop

    public init(_ eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        self.eventLoop.execute {
            job.runSynchronously(on: self.asUnownedTaskExecutor())
        }
    }
}
