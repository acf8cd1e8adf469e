import ArgumentParser
import Foundation
import Logging
import Metrics
import NIOCore
import Parley
import ParleyBlock
import Prometheus
import ServiceLifecycle
import SwiftProtobuf
import UnixSignals

struct Block: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Parley Block: serve files and block devices over Parley's block protocol and NBD; map them on clients.",
        discussion: """
            Try it:
              truncate -s 1G /tmp/disk.img
              parley block serve --export disk=/tmp/disk.img &
              parley block info 127.0.0.1:7421
              nbdinfo nbd://127.0.0.1:10809/disk
              qemu-img convert -p -O raw image.qcow2 nbd://127.0.0.1:10809/disk
            On a client, over two paths, served on a local NBD socket:
              parley block map --session s1 --path 127.0.0.1:7421 \\
                  --path 127.0.0.1:7421 --device disk --nbd unix:/tmp/s1.sock &
              parley block list
              parley block unmap --session s1
            """,
        subcommands: [BlockServe.self, BlockInfo.self, BlockBench.self, BlockMapCommand.self, BlockList.self, BlockUnmap.self]
    )
}

struct BlockServe: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve exports over Parley's block protocol and standard NBD.",
        discussion: """
            Exports are regular files (sparse where the file system allows) or block devices:
              --export NAME=PATH[,read-only][,shared][,block-size=N]
            read-only refuses writers; shared allows several read-write openers (otherwise a
            device has at most one, and a second is refused); block-size makes requests that
            are not aligned to N bytes fail. With --search-path DIR, block-protocol clients may
            also open any file or device under DIR by relative path; %SESSNAME% in DIR is
            replaced by the client's session name, giving each session its own namespace.
            Paths that leave DIR ("..", absolute paths, symbolic links out) are refused.

            Parley's block protocol listens on 127.0.0.1:7421 and NBD on 127.0.0.1:10809 unless
            --listen / --nbd are given (HOST:PORT, [V6]:PORT or unix:PATH; repeatable).
            NBD clients: qemu-img, qemu-nbd, nbdinfo, nbdcopy, nbdfuse, fio --ioengine=nbd and
            the kernel's nbd-client. Flush and FUA reach stable storage (fdatasync, RWF_DSYNC).

            SIGINT/SIGTERM: stop accepting, finish IO in flight, flush every device, exit.

            The block protocol's listeners take the security options of `parley serve`
            (--auth, --keyring, --mode, --cert; tls:// and ws:// addresses); NBD is served
            as NBD clients expect it, without them.
            """
    )

    @Option(name: .long, help: ArgumentHelp("An export: NAME=PATH[,read-only][,shared][,block-size=N] (repeatable).", valueName: "export"))
    var export: [String] = []

    @Option(name: .long, help: ArgumentHelp("Directory under which clients may open devices by relative path; may contain %SESSNAME%.", valueName: "dir"))
    var searchPath: String?

    @Option(name: .long, help: ArgumentHelp("Parley block protocol address (repeatable; default 127.0.0.1:7421).", valueName: "address"))
    var listen: [String] = []

    @Option(name: .long, help: ArgumentHelp("NBD address (repeatable; default 127.0.0.1:10809).", valueName: "address"))
    var nbd: [String] = []

    @Flag(name: .long, help: "Serve every export read-only.")
    var readOnly = false

    @Option(name: .long, help: ArgumentHelp("Serve Prometheus metrics at http://HOST:PORT/metrics (64 connections at most, each closed after 60 s without a request and 10 minutes after its accept).", valueName: "host:port"))
    var metrics: String?

    @Option(name: .long, help: "Threads for storage calls that may block (reads that miss the cache, flushes, discards).")
    var ioThreads: Int = 16

    @Option(name: .long, help: ArgumentHelp("Largest plain write (whole 4 KiB pages) done on the network thread instead of an IO thread: a write that arrived in one read when the file system cannot do non-blocking writes (ext4), and one that arrived in several reads on any file system. Larger ones, durable ones and all writes for a second after one that took over 1 ms go to the IO threads. 0: all writes go to the IO threads.", valueName: "bytes"))
    var inlineWrites: Int = 1 << 20

    @Option(name: .long, help: ArgumentHelp("Seconds a client has from its connect to the end of the handshake, on the NBD and block protocol listeners; then it is closed.", valueName: "seconds"))
    var handshakeTimeout: Double = 30

    @Option(name: .long, help: ArgumentHelp("Connections served at once on each protocol (NBD, block); more are closed as soon as they are accepted. Default: half of the file descriptor limit less 128 (\(BlockServer.Configuration.defaultMaxConnections) here).", valueName: "n"))
    var maxConnections: Int = BlockServer.Configuration.defaultMaxConnections

    @Option(name: .long, help: ArgumentHelp("Microseconds a connection (NBD or block protocol) waits for its client's next request, without sleeping, after answering a lone request with nothing else in flight: a client at queue depth 1 then finds the server awake (on hosts whose idle CPUs halt at once this doubles its IOPS), for up to this much CPU per request. After a wait that runs out, the connection waits less often. 0: never.", valueName: "us"))
    var pollAfterReply: Int = 50

    @Flag(name: .long, inversion: .prefixedNo, help: "NBD reads of 64 KiB or more whose pages are all in the page cache go from the cache to the socket with sendfile, never copied into the server (over TCP, and over Unix sockets whose send buffer holds 1 MiB: --unix-send-buffer; not over TLS, not from block devices).")
    var zeroCopyReads = true

    @Flag(name: .long, inversion: .prefixedNo, help: "Grant DIRECT IO to block clients that ask for it (IO as DIRECT frames with a fixed 32-byte header instead of Io messages; docs/protocol.md 17.9). --no-direct refuses it: every IO comes as an Io message.")
    var direct = true

    @Option(name: .long, help: ArgumentHelp("Send buffer an NBD connection over a Unix socket asks for at its first read of 64 KiB or more (the kernel doubles it and caps it at net.core.wmem_max): with the default of 208 KiB a 1 MiB reply waits four times for the client. 0: keep the system's default.", valueName: "bytes"))
    var unixSendBuffer: Int = NBDServer.Limits().unixSendBuffer

    @Option(name: .long, help: ArgumentHelp("Reply bytes an NBD connection over TCP keeps in its socket unsent (TCP_NOTSENT_LOWAT), from its first read of 64 KiB or more: with no limit its large replies are queued at once and then pushed out by the client's acknowledgements, in the client's time (without a limit 1 MiB reads ran 0.69-0.86x as fast here). 0: keep the system's setting.", valueName: "bytes"))
    var tcpUnsentLimit: Int = NBDServer.Limits().tcpUnsentLimit

    @OptionGroup var security: ServerSecurityOptions

    @Option(name: .long, help: ArgumentHelp("NBD_OPT_STARTTLS: off, on (offered) or require. Default: on with --cert, off without. NBD clients find the CA as ca-cert.pem in their certificate directory (`parley cert init` writes it).", valueName: "policy"))
    var nbdTls: String?

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        guard !self.export.isEmpty || self.searchPath != nil else {
            throw ValidationError("give at least one --export NAME=PATH or a --search-path DIR")
        }
        for e in self.export {
            do { _ = try BlockExportSpec(parsing: e) } catch { throw ValidationError(error.message) }
        }
        for a in self.listen + self.nbd {
            do { _ = try ParleyAddress(parsing: a) } catch { throw ValidationError(error.message) }
        }
        if let m = self.metrics { _ = try Self.hostPort(m) }
        guard (1...1024).contains(self.ioThreads) else { throw ValidationError("--io-threads must be 1...1024") }
        guard (0...(32 << 20)).contains(self.inlineWrites) else { throw ValidationError("--inline-writes must be 0...33554432 bytes") }
        guard (0...(1 << 30)).contains(self.unixSendBuffer) else { throw ValidationError("--unix-send-buffer must be 0...1073741824 bytes") }
        guard (0...(1 << 30)).contains(self.tcpUnsentLimit) else { throw ValidationError("--tcp-unsent-limit must be 0...1073741824 bytes") }
        try checkSeconds(self.handshakeTimeout, "--handshake-timeout", minimum: 0.001)
        guard self.maxConnections >= 1 else { throw ValidationError("--max-connections must be at least 1") }
        guard (0...10_000).contains(self.pollAfterReply) else { throw ValidationError("--poll-after-reply must be 0...10000 microseconds") }
        try self.security.check(listen: try self.listen.map { try ParleyAddress(parsing: $0) })
        if let policy = self.nbdTls {
            guard let p = NBDTLSPolicy(rawValue: policy) else { throw ValidationError("--nbd-tls must be off, on or require") }
            if p != .off && self.security.cert == nil { throw ValidationError("--nbd-tls \(policy) needs --cert DIR") }
        }
    }

    static func hostPort(_ text: String) throws -> (host: String, port: Int) {
        guard let address = try? ParleyAddress(parsing: text), case .tcp(let host, let port) = address.kind else {
            throw ValidationError("bad --metrics \"\(text)\": use HOST:PORT")
        }
        return (host, port)
    }

    func run() async throws {
        self.logging.bootstrap()
        BlockIOExecutor.keepLargeBuffersInProcess()
        let logger = Logger(label: "parley.block")
        var registry: PrometheusCollectorRegistry?
        if self.metrics != nil {
            let r = PrometheusCollectorRegistry()
            MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: r))
            registry = r
        }
        let catalog: BlockExportCatalog
        do {
            catalog = try BlockExportCatalog(exports: self.export.map { try BlockExportSpec(parsing: $0) },
                                             searchPath: self.searchPath, readOnly: self.readOnly)
        } catch let error as BlockError {
            print("parley block serve: \(error.message)")
            throw ExitCode(2)
        }
        for spec in catalog.exports {
            do {
                _ = try catalog.resolveNamed(spec.name)
            } catch {
                print("parley block serve: \(error.message)")
                throw ExitCode(2)
            }
        }
        var configuration = BlockServer.Configuration(
            catalog: catalog,
            listen: self.listen.isEmpty ? [.tcp(host: "127.0.0.1", port: BlockServer.Configuration.defaultPort)] : try self.listen.map { try ParleyAddress(parsing: $0) },
            nbd: self.nbd.isEmpty ? [.tcp(host: "127.0.0.1", port: BlockServer.Configuration.defaultNBDPort)] : try self.nbd.map { try ParleyAddress(parsing: $0) },
            metrics: try self.metrics.map { try Self.hostPort($0) }, ioThreads: self.ioThreads
        )
        configuration.inlineWrites.largest = self.inlineWrites
        configuration.handshakeTimeout = .microseconds(Int64(self.handshakeTimeout * 1_000_000))
        configuration.maxConnections = self.maxConnections
        configuration.replyPolling = .microseconds(self.pollAfterReply)
        configuration.zeroCopyReads = self.zeroCopyReads
        configuration.direct = self.direct
        configuration.unixSendBuffer = self.unixSendBuffer
        configuration.tcpUnsentLimit = self.tcpUnsentLimit
        do {
            try self.security.apply(to: &configuration.parley)
            let policy = self.nbdTls.flatMap(NBDTLSPolicy.init(rawValue:)) ?? (self.security.cert == nil ? .off : .on)
            if policy != .off, let cert = self.security.cert {
                configuration.nbdTLS = NBDServer.TLS(context: try ParleyTLS.server(directory: cert).makeServerContext(), policy: policy)
            }
        } catch let error as ParleyError {
            throw ValidationError(error.message)
        }
        let server = BlockServer(configuration: configuration, registry: registry, logger: logger)
        let group = ServiceGroup(
            configuration: .init(services: [.init(service: server)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        )
        do {
            try await group.run()
        } catch let error as ParleyError {
            print("parley block serve: \(error.message)")
            throw ExitCode(2)
        }
    }
}

struct BlockInfo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Show a block server's exports and their geometry, over Parley's block protocol.",
        discussion: "Connects to ADDRESS (HOST:PORT, [V6]:PORT or unix:PATH; a block server listens on 127.0.0.1:7421 by default), starts a session and lists the exports."
    )

    @Argument(help: ArgumentHelp("Server address: HOST:PORT, [V6]:PORT or unix:PATH.", valueName: "address"))
    var address: String

    @Option(name: .long, help: "Session name to use.")
    var session: String = "parley-block-info"

    @Flag(name: .long, help: "Print JSON (one object per export) instead of a table.")
    var json = false

    @OptionGroup var security: ClientSecurityOptions

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        do { try self.security.check(address: try ParleyAddress(parsing: self.address)) } catch let error as ParleyError {
            throw ValidationError(error.message)
        }
    }

    func run() async throws {
        self.logging.bootstrap()
        let client: BlockClient
        do {
            client = try await self.security.connectBlock(to: self.address, sessionName: self.session, clientName: "parley-block-info")
        } catch let error as ParleyError {
            print("parley block info: \(error.message) [\(error.code)]")
            throw ExitCode(2)
        } catch let error as BlockError {
            print("parley block info: \(error.message) [\(error.status)]")
            throw ExitCode(2)
        }
        defer { client.closeConnection() }
        let exports = try await client.listExports()
        if self.json {
            for e in exports { print(try e.jsonString()) }
            return
        }
        print("server \(client.client.session.peer.name) (\(client.client.session.peer.implementation) \(client.client.session.peer.version)), block protocol version \(client.protocolVersion)")
        if exports.isEmpty { print("no named exports") }
        for e in exports {
            let g = e.geometry
            var flags: [String] = []
            if e.readOnly { flags.append("read-only") }
            if e.shared { flags.append("shared") }
            if g.rotational { flags.append("rotational") }
            if g.discardGranularity > 0 { flags.append("discard") }
            if g.fua { flags.append("fua") }
            if g.writeCache { flags.append("write-cache") }
            print("""
                \(e.name)
                  size        \(g.sizeBytes) bytes (\(g.sizeSectors) sectors)
                  blocks      logical \(g.logicalBlockSize), physical \(g.physicalBlockSize), max IO \(g.maxIoSize)
                  discard     granularity \(g.discardGranularity), max \(g.maxDiscardSize)
                  flags       \(flags.joined(separator: " "))
                """)
        }
    }
}

struct BlockBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Drive a block server over Parley's block protocol: IOPS, MiB/s and latency percentiles.",
        discussion: """
            Opens EXPORT and keeps --queue-depth IOs of --block-size bytes in flight for
            --seconds, random or sequential, reads or writes (writes change the export!).
            Prints a summary: IOPS, MiB/s, and p50/p99/p99.9 of the
            time from sending an IO to its answer. --json prints the summary as JSON.
            """
    )

    @Argument(help: ArgumentHelp("Server address: HOST:PORT, [V6]:PORT or unix:PATH.", valueName: "address"))
    var address: String

    @Option(name: .long, help: "Export (or path) to open.")
    var export: String

    @Option(name: .long, help: "randread, randwrite, read (sequential) or write (sequential).")
    var rw: String = "randread"

    @Option(name: .long, help: "Bytes per IO (a multiple of the device's logical block size).")
    var blockSize: Int = 4096

    @Option(name: .long, help: "IOs in flight.")
    var queueDepth: Int = 1

    @Option(name: .long, help: "How long to run.")
    var seconds: Double = 5

    @Flag(name: .long, help: "Print the summary as one JSON object.")
    var json = false

    @Option(name: .long, help: ArgumentHelp("""
        How the IOs are sent: callback (the clients' completion calls, the next IO sent from \
        each answer: no task per IO) or async (a task per slot awaiting each IO).
        """, valueName: "api"))
    var api: String = "callback"

    @Option(name: .long, help: ArgumentHelp("Drive the multipath client (BlockMultipathDevice) over this many paths to ADDRESS instead of one BlockClient.", valueName: "n"))
    var paths: Int?

    @Option(name: .long, help: ArgumentHelp("Microseconds each connection waits for the server's answer, without sleeping, after sending the next IO from an answer that came alone (queue depth 1): the answer then finds the client awake. 0: never.", valueName: "us"))
    var pollAfterReply: Int = 50

    @Flag(name: .long, inversion: .prefixedNo, help: "Send IO as DIRECT frames where the server grants it (docs/protocol.md 17.9); --no-direct sends Io messages, for comparisons.")
    var direct = true

    @OptionGroup var security: ClientSecurityOptions

    @OptionGroup var logging: LoggingOptions

    func validate() throws {
        do { try self.security.check(address: try ParleyAddress(parsing: self.address)) } catch let error as ParleyError {
            throw ValidationError(error.message)
        }
        if let paths = self.paths, !(1...64).contains(paths) { throw ValidationError("--paths must be 1...64") }
        guard ["callback", "async"].contains(self.api) else { throw ValidationError("--api must be callback or async") }
        guard ["randread", "randwrite", "read", "write"].contains(self.rw) else { throw ValidationError("--rw must be randread, randwrite, read or write") }
        guard (512...(8 << 20)).contains(self.blockSize), self.blockSize % 512 == 0 else { throw ValidationError("--block-size must be a multiple of 512 up to 8 MiB") }
        guard (1...1024).contains(self.queueDepth) else { throw ValidationError("--queue-depth must be 1...1024") }
        guard self.seconds > 0, self.seconds <= 3600 else { throw ValidationError("--seconds must be in (0, 3600]") }
        guard (0...10_000).contains(self.pollAfterReply) else { throw ValidationError("--poll-after-reply must be 0...10000 microseconds") }
    }

    /// One IO of the benchmark: over a single BlockClient, or the multipath client.
    enum Target: Sendable {
        case single(BlockClient, BlockClient.Device)
        case multipath(BlockMultipathDevice)

        func read(offset: UInt64, length: UInt32) async throws {
            switch self {
            case .single(let c, let d): _ = try await c.read(d, offset: offset, length: length)
            case .multipath(let d): _ = try await d.read(offset: offset, length: length)
            }
        }

        func write(offset: UInt64, data: ByteBuffer) async throws {
            switch self {
            case .single(let c, let d): try await c.write(d, offset: offset, data: data)
            case .multipath(let d): try await d.write(offset: offset, data: data)
            }
        }

        var size: UInt64 {
            switch self {
            case .single(_, let d): d.geometry.sizeBytes
            case .multipath(let d): d.geometry.sizeBytes
            }
        }

        func close() async {
            switch self {
            case .single(let c, _): c.closeConnection()
            case .multipath(let d): try? await d.close()
            }
        }
    }

    func connect() async throws -> Target {
        let access: Parley_Block_V1_AccessMode = self.rw.contains("write") ? .readWrite : .readOnly
        guard let paths = self.paths else {
            let client = try await self.security.connectBlock(to: self.address, sessionName: "parley-block-bench", clientName: "parley-block-bench",
                                                              replyPolling: .microseconds(self.pollAfterReply), direct: self.direct)
            do {
                return .single(client, try await client.open(self.export, access: access))
            } catch {
                client.closeConnection()
                throw error
            }
        }
        let address = try ParleyAddress(parsing: self.address)
        var configuration = BlockMultipathSession.Configuration(sessionName: "parley-block-bench", paths: Array(repeating: address, count: paths))
        configuration.client.name = "parley-block-bench"
        configuration.client.limits.replyPolling = .microseconds(self.pollAfterReply)
        configuration.direct = self.direct
        try self.security.apply(to: &configuration.client, address: address)
        return .multipath(try await BlockMultipathSession(configuration).open(self.export, access: access))
    }

    func run() async throws {
        self.logging.bootstrap()
        // Only to count this client's waits for answers (`--poll-after-reply`) for the summary.
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        let client: Target
        do {
            client = try await self.connect()
        } catch let error as ParleyError {
            print("parley block bench: \(error.message) [\(error.code)]")
            throw ExitCode(2)
        } catch let error as BlockError {
            print("parley block bench: \(error.message) [\(error.status)]")
            throw ExitCode(2)
        } catch let error as BlockMultipathError {
            print("parley block bench: \(error.message)")
            throw ExitCode(2)
        }
        let bs = UInt64(self.blockSize)
        let blocks = client.size / bs
        guard blocks > 0 else {
            print("parley block bench: the export is smaller than one block")
            throw ExitCode(2)
        }
        let payload = ByteBuffer(repeating: 0x5a, count: self.blockSize)
        let start = ContinuousClock.now
        let plan = BlockBenchPlan(depth: self.queueDepth, blocks: blocks, blockSize: bs, random: self.rw.hasPrefix("rand"),
                                  writes: self.rw.contains("write"), end: start + .milliseconds(Int64(self.seconds * 1000)))
        let length = UInt32(self.blockSize)
        let results: [Int64]
        if self.api == "async" {
            results = try await client.runTasks(plan, length: length, payload: payload)
        } else {
            results = try await BlockBenchCallbackDriver(plan: plan) { offset, done in
                client.submit(writes: plan.writes, offset: offset, length: length, payload: payload, done: done)
            }.run()
        }
        let elapsed = ContinuousClock.now - start
        await client.close()
        let secs = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        let sorted = results.sorted()
        func pct(_ p: Double) -> Double {
            sorted.isEmpty ? 0 : Double(sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]) / 1000
        }
        let iops = Double(sorted.count) / secs
        let mibs = iops * Double(self.blockSize) / 1_048_576
        let depth = self.queueDepth
        let waits = Self.replyWaits(registry)
        if self.json {
            print("{\"rw\":\"\(self.rw)\",\"api\":\"\(self.api)\",\"block_size\":\(self.blockSize),\"queue_depth\":\(depth),\"ios\":\(sorted.count),\"seconds\":\(secs),\"iops\":\(iops),\"mib_s\":\(mibs),\"p50_us\":\(pct(0.5)),\"p99_us\":\(pct(0.99)),\"p999_us\":\(pct(0.999)),\"reply_waits\":{\"answer\":\(waits.answer),\"timeout\":\(waits.timeout)}}")
        } else {
            print(String(format: "%@ bs=%d qd=%d: %.0f IOPS, %.1f MiB/s, latency p50 %.1f us, p99 %.1f us, p99.9 %.1f us (%d IOs in %.2f s); waits for answers: %d saw one, %d ran out",
                         self.rw, self.blockSize, depth, iops, mibs, pct(0.5), pct(0.99), pct(0.999), sorted.count, secs, waits.answer, waits.timeout))
        }
    }

    /// This process's waits for the server's answers (`parley_reply_waits_total`): those that
    /// saw the answer come, and those that ran out.
    static func replyWaits(_ registry: PrometheusCollectorRegistry) -> (answer: Int, timeout: Int) {
        var bytes: [UInt8] = []
        registry.emit(into: &bytes)
        func count(_ outcome: String) -> Int {
            let prefix = "parley_reply_waits_total{outcome=\"\(outcome)\"} "
            return String(decoding: bytes, as: UTF8.self).split(separator: "\n").first { $0.hasPrefix(prefix) }
                .flatMap { Int($0.dropFirst(prefix.count)) } ?? 0
        }
        return (count("message"), count("timeout"))
    }
}

extension ClientSecurityOptions {
    /// A block client connected to `address` (text form) with these options.
    func connectBlock(to address: String, sessionName: String, clientName: String, replyPolling: Duration = .zero, direct: Bool = true) async throws -> BlockClient {
        let parsed = try ParleyAddress(parsing: address)
        var configuration = ParleyClient.Configuration(name: clientName)
        configuration.limits.replyPolling = replyPolling
        try self.apply(to: &configuration, address: parsed)
        return try await BlockClient.connect(to: parsed, sessionName: sessionName, direct: direct, configuration: configuration)
    }
}
