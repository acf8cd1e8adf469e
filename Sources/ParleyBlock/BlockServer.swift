import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Parley
import Prometheus
import ServiceLifecycle

/// `parley block serve`: the block protocol on Parley and a standard NBD server over the
/// same exports, with optional Prometheus metrics. A Service: graceful shutdown stops
/// accepting, lets IO in flight finish, flushes every open device and stops.
public final class BlockServer: Service, Sendable {
    public struct Configuration: Sendable {
        public var catalog: BlockExportCatalog
        /// Parley block protocol listeners (default 127.0.0.1:7421).
        public var listen: [ParleyAddress]
        /// NBD listeners (default 127.0.0.1:10809).
        public var nbd: [ParleyAddress]
        /// Prometheus endpoint (HOST:PORT), if any.
        public var metrics: (host: String, port: Int)?
        /// Threads for storage calls that may block.
        public var ioThreads: Int
        /// Which plain writes are done on the event loop where the file system refuses
        /// RWF_NOWAIT writes (`InlineWritePolicy.off`: every write goes to the IO threads).
        public var inlineWrites = InlineWritePolicy()
        public var name: String
        /// Security and transport of the block protocol's listeners (methods, modes, keyring,
        /// TLS); its `listen` and `name` are replaced by the ones above.
        public var parley: ParleyServer.Configuration = ParleyServer.Configuration()
        /// NBD_OPT_STARTTLS on the NBD listeners (nil: refused).
        public var nbdTLS: NBDServer.TLS?
        /// How long a client has to finish the handshake, on the NBD listeners and on the block
        /// protocol's (which then takes it from here, not from `parley`).
        public var handshakeTimeout: Duration = .seconds(30)
        /// Connections served at once, on the NBD listeners and on the block protocol's each.
        public var maxConnections = Configuration.defaultMaxConnections
        /// How long a connection busy-waits for its client's next request after answering a
        /// lone one (`ReplyPolling`), on the NBD listeners (with nothing else in flight) and on
        /// the block protocol's (`ParleyConnectionLimits.replyPolling`); zero never waits.
        public var replyPolling: Duration = .microseconds(50)
        /// Large NBD reads of cached pages sent with sendfile (`NBDServer.Limits.zeroCopyReads`).
        public var zeroCopyReads = true
        /// Grant DIRECT IO to block clients that ask for it (docs/protocol.md 17.9).
        public var direct = true
        /// Send buffer of an NBD connection over a Unix socket once it reads 64 KiB or more at
        /// a time (`NBDServer.Limits.unixSendBuffer`); 0 keeps the system's default.
        public var unixSendBuffer = NBDServer.Limits().unixSendBuffer
        /// Unsent reply bytes an NBD connection over TCP keeps in its socket once it reads 64
        /// KiB or more at a time (`NBDServer.Limits.tcpUnsentLimit`); 0 keeps the system's.
        public var tcpUnsentLimit = NBDServer.Limits().tcpUnsentLimit
        /// Half of what a lone server takes: the two protocols share the descriptor limit.
        public static let defaultMaxConnections = max(32, ParleyServer.defaultMaxConnections / 2)

        public static let defaultPort = 7421
        public static let defaultNBDPort = 10809

        public init(catalog: BlockExportCatalog, listen: [ParleyAddress] = [.tcp(host: "127.0.0.1", port: defaultPort)],
                    nbd: [ParleyAddress] = [.tcp(host: "127.0.0.1", port: defaultNBDPort)], metrics: (host: String, port: Int)? = nil,
                    ioThreads: Int = 16, name: String = "parley-block") {
            self.catalog = catalog
            self.listen = listen
            self.nbd = nbd
            self.metrics = metrics
            self.ioThreads = ioThreads
            self.name = name
        }
    }

    public let configuration: Configuration
    public let devices: BlockDeviceTable
    public let service: BlockService
    let io: BlockIOExecutor
    let nbdServer: NBDServer
    let parleyServer: ParleyServer
    let registry: PrometheusCollectorRegistry?
    let logger: Logger
    private let binding = NIOLockedValueBox(Binding.waiting([]))

    /// Where `run()` is with its listeners, and who waits for them.
    enum Binding {
        case waiting([CheckedContinuation<Bound, any Error>])
        case bound(Bound)
        case failed(any Error)
    }

    public struct Bound: Sendable {
        public var listen: [ParleyAddress]
        public var nbd: [ParleyAddress]
        public var metrics: SocketAddress?
    }

    public init(configuration: Configuration, registry: PrometheusCollectorRegistry? = nil, logger: Logger = Logger(label: "parley.block")) {
        self.configuration = configuration
        self.registry = registry
        self.logger = logger
        let inlineWrites = configuration.inlineWrites
        self.devices = BlockDeviceTable(openStore: { path, writable throws(BlockStoreError) in
            try FileBlockStore(path: path, writable: writable, inlineWrites: inlineWrites)
        })
        self.io = BlockIOExecutor(threads: configuration.ioThreads)
        self.service = BlockService(catalog: configuration.catalog, devices: self.devices, io: self.io, direct: configuration.direct, logger: logger)
        var limits = NBDServer.Limits()
        limits.handshakeTimeout = .nanoseconds(configuration.handshakeTimeout.nanoseconds)
        limits.maxConnections = configuration.maxConnections
        limits.replyPolling = .nanoseconds(configuration.replyPolling.nanoseconds)
        limits.zeroCopyReads = configuration.zeroCopyReads
        limits.unixSendBuffer = configuration.unixSendBuffer
        limits.tcpUnsentLimit = configuration.tcpUnsentLimit
        self.nbdServer = NBDServer(catalog: configuration.catalog, devices: self.devices, io: self.io, limits: limits, tls: configuration.nbdTLS, logger: logger)
        var parley = configuration.parley
        parley.limits.handshakeTimeout = configuration.handshakeTimeout
        parley.limits.replyPolling = configuration.replyPolling
        parley.maxConnections = configuration.maxConnections
        parley.listen = configuration.listen
        parley.name = configuration.name
        self.parleyServer = ParleyServer(configuration: parley, router: self.service.router(), logger: logger)
    }

    /// The addresses actually bound (port 0 resolved), once `run()` has bound them.
    public var boundAddresses: Bound {
        get async throws {
            try await withCheckedThrowingContinuation { c in
                let now: Result<Bound, any Error>? = self.binding.withLockedValue { state in
                    switch state {
                    case .waiting(let waiters):
                        state = .waiting(waiters + [c])
                        return nil
                    case .bound(let b): return .success(b)
                    case .failed(let e): return .failure(e)
                    }
                }
                if let now { c.resume(with: now) }
            }
        }
    }

    public func run() async throws {
        var metrics: MetricsEndpoint?
        do {
            let nbd = try await self.nbdServer.bind(self.configuration.nbd)
            if let m = self.configuration.metrics, let registry = self.registry {
                metrics = try await MetricsEndpoint.start(host: m.host, port: m.port, registry: registry)
            }
            let started = metrics
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    try await withGracefulShutdownHandler {
                        try await self.parleyServer.run()
                    } onGracefulShutdown: {
                        self.logger.info("shutting down: finishing IO in flight")
                        self.service.beginShutdown()
                    }
                }
                let listen = try await self.parleyServer.listeningAddresses
                let b = Bound(listen: listen, nbd: nbd, metrics: started?.localAddress)
                self.settle(.bound(b)).forEach { $0.resume(returning: b) }
                self.logger.info("block server listening", metadata: [
                    "parley": "\(listen.map(\.description))", "nbd": "\(nbd.map(\.description))",
                    "metrics": "\(started.flatMap { m in m.localAddress.map { "\($0.ipAddress ?? "?"):\($0.port ?? 0)" } } ?? "off")",
                    "exports": "\(self.configuration.catalog.exports.map(\.name))",
                ])
                // The Parley server returns once it has drained (graceful shutdown) or was cancelled.
                try await group.next()
            }
        } catch {
            // Whatever started goes again (a listener that could not bind after the NBD and
            // metrics ones had), so that an embedding program keeps no port or thread.
            await self.stop(metrics: metrics)
            self.failWaiters(error)
            throw error
        }
        await self.stop(metrics: metrics)
        self.logger.info("block server stopped")
    }

    private func stop(metrics: MetricsEndpoint?) async {
        await self.nbdServer.shutDown()
        self.devices.flushAll()
        await metrics?.close()
        try? await self.io.shutdown()
    }

    private func failWaiters(_ error: any Error) {
        self.settle(.failed(error)).forEach { $0.resume(throwing: error) }
    }

    /// Records the outcome of binding and returns who was waiting for it.
    private func settle(_ outcome: Binding) -> [CheckedContinuation<Bound, any Error>] {
        self.binding.withLockedValue { state in
            defer { state = outcome }
            if case .waiting(let waiters) = state { return waiters }
            return []
        }
    }
}
