import ArgumentParser
import Foundation
import Logging
import NIOPosix
import Parley
import ParleyBlock
import ServiceLifecycle
import UnixSignals

struct BlockMapCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "map",
        abstract: "Open a remote device over one or more paths and serve it on a local NBD endpoint.",
        discussion: """
            Opens DEVICE (an export name, or a path under the server's
            --search-path) on a block server over every --path (Parley's block
            protocol: several addresses of one server, or one address several
            times for more connections), and serves it as an NBD export on --nbd
            for nbd-client (/dev/nbdN), qemu, nbdinfo, nbdcopy and fio. The NBD
            export is named DEVICE, and is also the default export (""):
              parley block map --session s1 --path 10.0.0.1:7421 \\
                  --path 10.0.1.1:7421 --device disk --nbd unix:/run/s1.sock
              nbdinfo 'nbd+unix:///disk?socket=/run/s1.sock'
              nbd-client -unix /run/s1.sock /dev/nbd0 -N disk

            RNBD's map_device words work instead of the flags (--nbd still
            needed; ip:ADDRESS without a port means port 7421; device_path is
            taken relative to the server's search path, as RNBD's server joins
            its dev_search_path and device_path: /dev/ram0 means dev/ram0):
              parley block map --nbd unix:/run/s1.sock --rnbd \\
                  "sessname=s1 path=ip:10.0.0.1 path=ip:10.0.1.1 device_path=disk"

            Multipath: each IO goes to one path (--policy min-inflight, the
            default: the path with the fewest IOs in flight; or round-robin).
            When a path dies, its IO in flight is sent again on another path,
            and the path reconnects in the background with back-off (each
            change is logged).
            Writes to overlapping blocks take effect in the order submitted, also
            across a failover: before a write in doubt goes again, the server is
            asked to fence the dead connection, so a re-sent write never
            overwrites a later acknowledged one (docs/protocol.md 17.8; a server
            that refuses the fence, e.g. one restarted meanwhile, leaves a
            window, with a warning in the log). With no path up, IO waits up to
            --io-timeout seconds, then fails with EIO, and new IO fails at once
            until a path is back. A fence unanswered for --io-timeout fails the
            writes waiting for it (EIO), and new writes until it is answered;
            reads go on. A path that stays up but leaves an IO unanswered (its
            server's storage hangs) is logged once the IO has waited
            --io-timeout; with --answer-timeout it is taken down after that
            long, and its IO goes again elsewhere as after any failover.

            Status: twice a second the map writes STATE_DIR/SESSION.PID.json,
            which `parley block list` shows. SIGINT, SIGTERM or `parley block
            unmap`: NBD clients' requests in flight complete, the device's IO
            drains, a final flush, the device is closed on every path (each Close
            answered within --io-timeout or not waited for), exit.
            With no path up that waits up to --io-timeout; a second SIGINT
            (Ctrl-C again) exits at once (status 1), a second SIGTERM waits.
            """
    )

    @Option(name: .long, help: "Session name (the server's %SESSNAME%; 1-64 of A-Z a-z 0-9 . _ -).")
    var session: String?

    @Option(name: .long, help: ArgumentHelp("A path to the server: HOST:PORT, [V6]:PORT or unix:PATH (repeatable).", valueName: "address"))
    var path: [String] = []

    @Option(name: .long, help: ArgumentHelp("The device to open: an export name or a path under the server's search path.", valueName: "path"))
    var device: String?

    @Flag(name: .long, help: "Open the device read-only.")
    var readOnly = false

    @Flag(name: .long, help: "Open for a live move: read-write while another session still has it open read-write.")
    var migration = false

    @Option(name: .long, help: ArgumentHelp("RNBD's map_device line instead of --session/--path/--device/--read-only.", valueName: "line"))
    var rnbd: String?

    @Option(name: .long, help: ArgumentHelp("Local NBD endpoint: unix:SOCKET or HOST:PORT.", valueName: "address"))
    var nbd: String

    @Option(name: .long, help: "min-inflight (each IO to the path with the fewest in flight, so a slower path takes fewer: RNBD's default) or round-robin (every path in turn: the slowest path sets the pace).")
    var policy: String = "min-inflight"

    @Option(name: .long, help: ArgumentHelp("Seconds IO waits while no path is up, and writes wait for a fence, before they fail with EIO.", valueName: "seconds"))
    var ioTimeout: Double = 30

    @Option(name: .long, help: ArgumentHelp("Seconds an IO may go unanswered on a path that stays up before the path is taken down and the IO sent again elsewhere (default: never; a flush of much data on slow storage can take long).", valueName: "seconds"))
    var answerTimeout: Double?

    @Option(name: .long, help: ArgumentHelp("Directory for the status file (default $PARLEY_BLOCK_STATE_DIR or /tmp/parley-block-UID).", valueName: "dir"))
    var stateDir: String?

    @Option(name: .long, help: ArgumentHelp("Microseconds the map waits, without sleeping, for what comes next at queue depth 1: on a path, the server's answer to a lone request; on the NBD endpoint, the client's next request after answering. The map's thread then stays awake for it (on hosts whose idle CPUs halt this multiplies QD1 IOPS), for up to this much CPU per IO. After a wait that runs out, it waits less often. 0: never.", valueName: "us"))
    var pollAfterReply: Int = 50

    @Flag(name: .long, inversion: .prefixedNo, help: "Send IO as DIRECT frames (a fixed 32-byte header, no message layer) on paths whose server grants it (feature bit 4, not lossless); --no-direct sends every IO as an Io message, for comparisons. docs/protocol.md 17.9.")
    var direct = true

    @OptionGroup var security: ClientSecurityOptions

    @OptionGroup var logging: LoggingOptions

    func request() throws -> BlockMapRequest {
        if let rnbd {
            guard self.session == nil, self.path.isEmpty, self.device == nil, !self.readOnly, !self.migration else {
                throw ValidationError("give either --rnbd LINE or --session/--path/--device, not both")
            }
            do {
                return try BlockMapRequest(rnbd: rnbd)
            } catch {
                throw ValidationError(error.message)
            }
        }
        guard let session else { throw ValidationError("missing --session NAME (or --rnbd LINE)") }
        guard !self.path.isEmpty else { throw ValidationError("give at least one --path ADDRESS") }
        guard let device else { throw ValidationError("missing --device PATH") }
        guard !(self.readOnly && self.migration) else { throw ValidationError("--read-only and --migration exclude each other") }
        return BlockMapRequest(session: session, paths: self.path, device: device, access: self.readOnly ? "ro" : self.migration ? "migration" : "rw")
    }

    func validate() throws {
        let r = try self.request()
        guard BlockExportCatalog.validSessionName(r.session) else {
            throw ValidationError("bad session name \"\(r.session)\": use 1-64 bytes of A-Z a-z 0-9 . _ -, not starting with '.'")
        }
        var addresses: [ParleyAddress] = []
        for p in r.paths {
            do { addresses.append(try ParleyAddress(parsing: p)) } catch { throw ValidationError("bad path \"\(p)\": \(error.message)") }
        }
        // One client configuration serves every path: its credentials, methods and TLS.
        guard Set(addresses.map(\.usesTLS)).count == 1 else {
            throw ValidationError("give every path with tls:// or none: the paths share one security setting")
        }
        for a in addresses { try self.security.check(address: a) }
        do {
            let a = try ParleyAddress(parsing: self.nbd)
            switch a.kind {
            case .tcp, .unix: break
            default: throw ValidationError("--nbd takes unix:SOCKET or HOST:PORT")
            }
        } catch let error as ParleyError {
            throw ValidationError("bad --nbd \"\(self.nbd)\": \(error.message)")
        }
        guard MultipathIOState.Policy(rawValue: self.policy) != nil else { throw ValidationError("--policy must be round-robin or min-inflight") }
        guard self.ioTimeout >= 0.001, self.ioTimeout <= 86400 else { throw ValidationError("--io-timeout must be in [0.001, 86400] seconds") }
        if let t = self.answerTimeout, !(t >= 0.001 && t <= 86400) { throw ValidationError("--answer-timeout must be in [0.001, 86400] seconds") }
        guard (0...10_000).contains(self.pollAfterReply) else { throw ValidationError("--poll-after-reply must be 0...10000 microseconds") }
    }

    func run() async throws {
        self.logging.bootstrap()
        BlockIOExecutor.keepLargeBuffersInProcess()
        let logger = Logger(label: "parley.block.map")
        let r = try self.request()
        let paths = try r.paths.map { try ParleyAddress(parsing: $0) }
        var configuration = BlockMultipathSession.Configuration(
            sessionName: r.session, paths: paths, policy: MultipathIOState.Policy(rawValue: self.policy)!,
            ioTimeout: .milliseconds(Int64(self.ioTimeout * 1000))
        )
        configuration.client.name = "parley-block-map"
        configuration.client.limits.replyPolling = .microseconds(self.pollAfterReply)
        configuration.direct = self.direct
        configuration.answerTimeout = self.answerTimeout.map { .milliseconds(Int64($0 * 1000)) }
        // One event loop for the NBD endpoint and every path: an IO stays on one thread.
        configuration.group = MultiThreadedEventLoopGroup.singleton.next()
        do {
            try self.security.apply(to: &configuration.client, address: paths[0])
        } catch {
            throw ValidationError(error.message)
        }
        let access: Parley_Block_V1_AccessMode = r.access == "ro" ? .readOnly : r.access == "migration" ? .migration : .readWrite
        let map = BlockMap(session: try BlockMultipathSession(configuration, logger: logger), device: r.device, access: access,
                           nbd: try ParleyAddress(parsing: self.nbd), stateDirectory: self.stateDir ?? BlockMap.defaultStateDirectory, logger: logger)
        // Signals are trapped from before the start (one that comes during it unmaps once the
        // map is up). The first SIGINT or SIGTERM unmaps cleanly, which can take up to
        // --io-timeout when no path is up (IO in flight and the final flush wait for one); a
        // second SIGINT (Ctrl-C again) exits at once. A second SIGTERM (`parley block unmap`
        // again) waits with the first.
        let signals = await UnixSignalsSequence(trapping: .sigint, .sigterm)
        let (first, firstReceived) = AsyncStream<Void>.makeStream()
        let watcher = Task {
            var unmapping = false
            for await signal in signals {
                guard unmapping else {
                    unmapping = true
                    firstReceived.yield()
                    continue
                }
                guard signal == .sigint else { continue }
                emit("parley block map: interrupted again: exiting without waiting for the unmap (IO still in flight fails; writes acknowledged so far are on the server, not necessarily on stable storage)")
                _exit(1)  // not exit(): no atexit handlers while the event loops run
            }
        }
        let running: BlockMap.Running
        do {
            running = try await map.start()
        } catch let error as BlockMultipathError {
            watcher.cancel()
            print("parley block map: \(error.message)")
            throw ExitCode(2)
        } catch let error as ParleyError {
            watcher.cancel()
            print("parley block map: \(error.message)")
            throw ExitCode(2)
        }
        emit("mapped \(r.device) of session \(r.session) on \(running.boundAddress) (\(paths.count) path\(paths.count == 1 ? "" : "s"))")
        for await _ in first { break }
        logger.info("unmapping: draining IO, flushing, closing (Ctrl-C again: exit at once)")
        do {
            try await running.stop()
        } catch {
            watcher.cancel()
            print("parley block map: the final flush failed: \(error)")
            throw ExitCode(1)
        }
        watcher.cancel()
        emit("unmapped \(r.device)")
    }
}

struct BlockList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "Show the maps running on this machine: sessions, devices, paths and their state, IO in flight, counters.",
        discussion: """
            Reads the status files `parley block map` writes twice a second in the state
            directory (--state-dir, $PARLEY_BLOCK_STATE_DIR or /tmp/parley-block-UID); files of
            maps that are no longer running are removed. --json prints one object per map.
            """
    )

    @Option(name: .long, help: ArgumentHelp("Directory of the status files.", valueName: "dir"))
    var stateDir: String?

    @Flag(name: .long, help: "One JSON object per map.")
    var json = false

    func run() async throws {
        let records = BlockMap.records(directory: self.stateDir ?? BlockMap.defaultStateDirectory)
        if self.json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            for r in records { print(String(decoding: try encoder.encode(r), as: UTF8.self)) }
            return
        }
        if records.isEmpty {
            print("no maps")
            return
        }
        for r in records {
            let s = r.status
            print("session \(s.session) device \(s.device) (\(s.access), \(s.sizeBytes) bytes, \(s.blockSize)-byte blocks) on nbd \(r.nbd), pid \(r.pid), policy \(s.policy)")
            print("  io: \(s.outstanding) outstanding (\(s.waiting) waiting), \(s.reads) reads \(s.bytesRead) B, \(s.writes) writes \(s.bytesWritten) B, \(s.flushes) flushes, \(s.otherOps) discard/zero, \(s.resends) re-sent, \(s.errors) errors")
            for (i, p) in s.paths.enumerated() {
                var line = "  path \(i + 1) \(p.address): \(p.state), \(p.inFlight) in flight, \(p.sends) sent, \(p.failures) failures, \(p.connects) connects"
                if let e = p.lastError, p.state != "up" { line += " (last error: \(e))" }
                print(line)
            }
        }
    }
}

struct BlockUnmap: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "unmap",
        abstract: "Stop a map cleanly: its IO in flight completes, a final flush, the device is closed on every path.",
        discussion: """
            Finds the map of --session (and --device, if the session maps several; --pid,
            if it maps one device twice) in the state directory, sends its process SIGTERM
            and waits for it to exit: at most --timeout seconds, by default as long as the
            map's own timeouts allow its unmap (with no path up it waits up to its --io-
            timeout for one), at least 60. Exits 0 when the map is gone after a clean
            unmap (IO drained, final flush done), 1 if it did not stop in time or its
            unmap failed (the final flush; the map's message is printed), 2 if there is no
            such map.
            """
    )

    @Option(name: .long, help: "Session name of the map.")
    var session: String

    @Option(name: .long, help: ArgumentHelp("Device of the map (needed when the session maps several).", valueName: "path"))
    var device: String?

    @Option(name: .long, help: ArgumentHelp("Process id of the map (needed when the session maps one device twice; `parley block list` shows it).", valueName: "pid"))
    var pid: Int32?

    @Option(name: .long, help: ArgumentHelp("Directory of the status files.", valueName: "dir"))
    var stateDir: String?

    @Option(name: .long, help: ArgumentHelp("Seconds to wait for the map to exit (default: what the map's own timeouts allow its unmap, twice --io-timeout and --answer-timeout and 30 s, at least 60).", valueName: "seconds"))
    var timeout: Double?

    func validate() throws {
        if let timeout = self.timeout { try checkSeconds(timeout, "--timeout", minimum: 0) }
    }

    func run() async throws {
        let records = BlockMap.records(directory: self.stateDir ?? BlockMap.defaultStateDirectory).filter {
            $0.status.session == self.session && (self.device == nil || $0.status.device == self.device) && (self.pid == nil || $0.pid == self.pid)
        }
        guard !records.isEmpty else {
            print("parley block unmap: no map of session \(self.session)\(self.device.map { " device \($0)" } ?? "")\(self.pid.map { " pid \($0)" } ?? "")")
            throw ExitCode(2)
        }
        guard records.count == 1 else {
            let maps = records.map { "\($0.status.device) (pid \($0.pid))" }.joined(separator: ", ")
            print("parley block unmap: session \(self.session) has \(records.count) maps, \(maps): give \(self.device == nil && Set(records.map(\.status.device)).count > 1 ? "--device or " : "")--pid")
            throw ExitCode(2)
        }
        let pid = records[0].pid
        let device = records[0].status.device
        // ESRCH: it ended between the listing and the signal; what it left says how.
        guard kill(pid, SIGTERM) == 0 || errno == ESRCH else {
            print("parley block unmap: cannot signal process \(pid): \(String(cString: strerror(errno)))")
            throw ExitCode(1)
        }
        // A map waiting for a path (up to its --io-timeout) is not reported stuck before then.
        let timeout = self.timeout ?? max(60, min(records[0].unmapWithin ?? 60, 4 * 86400))
        let deadline = ContinuousClock.now + .milliseconds(Int64(timeout * 1000))
        while BlockMap.isRunningMap(pid) {
            guard ContinuousClock.now < deadline else {
                print("parley block unmap: process \(pid) is still running after \(timeout) s")
                throw ExitCode(1)
            }
            try await Task.sleep(for: .milliseconds(50))
        }
        // A clean unmap removes the map's status file; one that failed leaves it, saying why.
        let directory = self.stateDir ?? BlockMap.defaultStateDirectory
        if let left = BlockMap.leftRecord(directory: directory, session: self.session, pid: pid) {
            try? FileManager.default.removeItem(atPath: BlockMap.recordFile(directory: directory, session: self.session, pid: pid))
            print("parley block unmap: \(device) of session \(self.session): \(left.failure ?? "the map ended without a clean unmap (killed?)"); writes acknowledged before are on the server, not necessarily on stable storage")
            throw ExitCode(1)
        }
        print("unmapped \(device) of session \(self.session)")
    }
}
