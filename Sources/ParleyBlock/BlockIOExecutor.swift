import NIOCore
import NIOPosix

/// Runs storage calls that may block on threads of their own, never on an event loop.
///
/// Reads and plain writes are first tried on the event loop with RWF_NOWAIT, which the
/// kernel honours only when it can complete them from the page cache without waiting; what
/// would wait (a cache miss, a flush, a discard, a durable write) comes here.
public final class BlockIOExecutor: Sendable {
    public let threads: Int
    private let pool: NIOThreadPool

    public init(threads: Int) {
        self.threads = max(1, threads)
        self.pool = NIOThreadPool(numberOfThreads: self.threads)
        self.pool.start()
    }

    /// Runs `body` on an IO thread; the result arrives on `eventLoop`.
    public func run<T: Sendable>(on eventLoop: any EventLoop, _ body: @escaping @Sendable () throws -> T) -> EventLoopFuture<T> {
        self.pool.runIfActive(eventLoop: eventLoop, body)
    }

    public func shutdown() async throws {
        try await self.pool.shutdownGracefully()
    }
}
