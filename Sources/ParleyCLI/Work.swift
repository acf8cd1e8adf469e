import ArgumentParser
import Foundation
import Logging
import Metrics
import Parley
import ParleyWork
import ParleyWorkBOINC
import ParleyWorkBuildbot
import Prometheus
import ServiceLifecycle
import SwiftProtobuf
import UnixSignals

/// `parley work`: Parley Work, the job scheduler (issue 11).
struct Work: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Parley Work: distribute signed jobs to workers.",
        discussion: """
            Jobs are signed with the project's Ed25519 key, which never leaves the machine that
            submits them; workers run only jobs whose signature verifies with the public key.
            A master (`work serve`) keeps the jobs in SQLite, or in PostgreSQL shared by several
            masters, and hands them out under leases; a result is accepted exactly once.
            """,
        subcommands: [Serve.self, Worker.self, Submit.self, Status.self, Results.self, Workers.self, Command.self, Keygen.self, Sign.self, Verify.self, Bench.self, Rotate.self, Exec.self]
    )

    static let defaultMaster = "127.0.0.1:7422"

    /// This program's path (for `parley work exec`).
    static func selfPath() -> String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
            ?? URL(fileURLWithPath: CommandLine.arguments[0]).standardizedFileURL.path
    }

    /// `HOST:PORT` of `--http`.
    static func hostPort(_ text: String) throws -> (host: String, port: Int) {
        guard let address = try? ParleyAddress(parsing: text), case .tcp(let host, let port) = address.kind else {
            throw ValidationError("bad --http \"\(text)\": use HOST:PORT")
        }
        return (host, port)
    }

    /// `HOST:PORT` of `--buildbot ws://HOST:PORT[/]`.
    static func webSocketHostPort(_ text: String) throws -> (host: String, port: Int) {
        guard text.hasPrefix("ws://") else { throw ValidationError("bad --buildbot \"\(text)\": use ws://HOST:PORT (Buildbot workers speak plain WebSocket)") }
        var rest = text.dropFirst("ws://".count)
        if rest.hasSuffix("/") { rest = rest.dropLast() }
        guard let address = try? ParleyAddress(parsing: String(rest)), case .tcp(let host, let port) = address.kind else {
            throw ValidationError("bad --buildbot \"\(text)\": use ws://HOST:PORT")
        }
        return (host, port)
    }

    /// Runs `body` on a connection to a master (authenticated when the security options say
    /// so), closed afterwards; a Parley error is printed as `parley work COMMAND: ...` and
    /// exits with status 2.
    static func withMaster(
        _ master: String, command: String, security: ClientSecurityOptions, router: ParleyRouter = ParleyRouter(),
        _ body: (ParleyClient) async throws -> Void
    ) async throws {
        do {
            let address = try ParleyAddress(parsing: master)
            var configuration = ParleyClient.Configuration(name: "parley-work-\(command)")
            try security.apply(to: &configuration, address: address)
            let client = try await ParleyClient.connect(to: address, configuration: configuration, router: router, logger: Logger(label: "parley.work"))
            defer { client.close() }
            try await body(client)
        } catch let error as ParleyError {
            print("parley work \(command): \(error.message) [\(error.code)]")
            throw ExitCode(2)
        }
    }

    struct Serve: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a master: the job store and the Work protocol on Parley.",
            discussion: """
                Default: 127.0.0.1:7422 and the SQLite file parley-work.sqlite in the current directory.
                With --database postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE any number of masters share
                one store: each claims jobs with row locks, so no job goes to two workers, and a worker
                whose master dies carries its leases and reports over to another. The schema is created
                and upgraded when a master starts. SIGINT/SIGTERM stop it gracefully.
                """
        )

        @Option(name: .long, help: ArgumentHelp("Address to listen on (repeatable).", valueName: "address"))
        var listen: [String] = []

        @Option(name: .long, help: ArgumentHelp("The job store: sqlite:PATH or postgres://USER@HOST[:PORT]/DATABASE.", valueName: "url"))
        var database = "sqlite:parley-work.sqlite"

        @Option(name: .long, help: ArgumentHelp("The project's public key (work.pub): refuse jobs it did not sign.", valueName: "file"))
        var trust: String?

        @Option(name: .long, help: ArgumentHelp("How long a lease lasts before its job goes back to the queue.", valueName: "seconds"))
        var leaseSeconds: Int = 600

        @Option(name: .long, help: ArgumentHelp("Attempts a job gets unless it says otherwise.", valueName: "n"))
        var maxAttempts: Int = 3

        @Option(name: .long, help: ArgumentHelp("The most leases one worker (or BOINC client) may hold at once: past it, it gets no work until it reports, hands back or lets leases expire, so that a worker asking again and again cannot take the whole queue. 0: no cap.", valueName: "n"))
        var maxLeasesPerWorker: Int = 0

        /// --max-leases-per-worker as the services take it (nil: no cap).
        var leaseCap: Int? { self.maxLeasesPerWorker > 0 ? self.maxLeasesPerWorker : nil }

        @Option(name: .long, help: ArgumentHelp("Serve HTTP at HOST:PORT: GET /status and /jobs/ID as JSON, /metrics for Prometheus (at most 64 connections, each closed after a minute idle or ten minutes open).", valueName: "host:port"))
        var http: String?

        @Option(name: .long, help: ArgumentHelp("A key rotation (parley work rotate) to announce to workers; needs --trust, whose key must have signed it.", valueName: "file"))
        var rotation: String?

        @Flag(name: .long, help: "Require capabilities of keyring entities: work.submit to submit, work.worker to work, work.read for status and results (work.* for all; anonymous clients get --anonymous-caps).")
        var requireCaps = false

        @Flag(name: .long, help: "Relay commands from clients to the workers that accept them (parley work command); with --require-caps, only entities with work.command may.")
        var allowCommands = false

        @Option(name: .long, help: ArgumentHelp("A preference sent to every worker: run at most this many jobs at once (0: the worker's --slots).", valueName: "n"))
        var maxSlots: UInt32 = 0

        @Option(name: .long, help: ArgumentHelp("A preference sent to every worker: after getting no work, wait this long before asking again (0: the worker's own).", valueName: "ms"))
        var idleMilliseconds: UInt32 = 0

        @Option(name: .long, help: ArgumentHelp("Serve unmodified Buildbot workers (buildbot-worker --protocol=msgpack_experimental_v7) on a WebSocket at ws://HOST:PORT; they log in with a --keyring entity's name and key (parley keyring key NAME).", valueName: "url"))
        var buildbot: String?

        @Option(name: .long, help: ArgumentHelp("An application Buildbot workers run (repeatable; default: buildbot): they get its jobs and those that need none.", valueName: "name"))
        var buildbotApp: [String] = []

        @Option(name: .long, help: ArgumentHelp("Seconds between keepalives to each Buildbot worker; one unanswered for as long closes its connection.", valueName: "seconds"))
        var buildbotKeepalive: Int = 30

        @Option(name: .long, help: ArgumentHelp("Seconds past a job's max_wall_seconds (3600 if it gives none) that a Buildbot worker may take to end the job's command before the master interrupts it; as long again and the job fails and the worker is dropped.", valueName: "seconds"))
        var buildbotGrace: Int = 60

        @OptionGroup(title: "Nucleus (what every worker and submitter is told)") var nucleus: NucleusOptions

        @OptionGroup var security: ServerSecurityOptions

        @OptionGroup(title: "BOINC front end") var boinc: WorkBOINCOptions

        @OptionGroup var logging: LoggingOptions

        func validate() throws {
            let postgres = self.database.hasPrefix("postgres://") || self.database.hasPrefix("postgresql://")
            guard postgres || (self.database.hasPrefix("sqlite:") && self.database.count > 7) else {
                throw ValidationError("--database must be sqlite:PATH or postgres://USER@HOST[:PORT]/DATABASE, not \(self.database)")
            }
            guard self.leaseSeconds > 0, self.maxAttempts > 0 else { throw ValidationError("--lease-seconds and --max-attempts must be positive") }
            guard (0...1_000_000).contains(self.maxLeasesPerWorker) else { throw ValidationError("--max-leases-per-worker must be 0 (no cap) to 1000000") }
            try checkSeconds(Double(self.leaseSeconds), "--lease-seconds", minimum: 1)
            if let http = self.http { _ = try Work.hostPort(http) }
            if let buildbot = self.buildbot {
                _ = try Work.webSocketHostPort(buildbot)
                guard self.security.keyring != nil else {
                    throw ValidationError("--buildbot needs --keyring: Buildbot workers log in with a keyring entity's name and key")
                }
                guard self.buildbotKeepalive >= 1 else { throw ValidationError("--buildbot-keepalive must be at least 1 second") }
                try checkSeconds(Double(self.buildbotKeepalive), "--buildbot-keepalive", minimum: 1)
                try checkSeconds(Double(self.buildbotGrace), "--buildbot-grace", minimum: 1)
            }
            for a in self.listen { do { _ = try ParleyAddress(parsing: a) } catch { throw ValidationError(error.message) } }
            try self.security.check(listen: try (self.listen.isEmpty ? [Work.defaultMaster] : self.listen).map { try ParleyAddress(parsing: $0) })
        }

        func run() async throws {
            self.logging.bootstrap()
            let logger = Logger(label: "parley.work")
            var registry: PrometheusCollectorRegistry?
            if self.http != nil {
                let r = PrometheusCollectorRegistry()
                MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: r))
                registry = r
            }
            let store: any WorkStore
            let postgres = !self.database.hasPrefix("sqlite:")
            do {
                if postgres {
                    var quiet = Logger(label: "parley.work.postgres")
                    quiet.logLevel = max(self.logging.logLevel, .warning)
                    store = try await PostgresWorkStore(url: self.database, connectTimeout: .seconds(30), logger: quiet)
                } else {
                    store = try SQLiteWorkStore(path: String(self.database.dropFirst("sqlite:".count)))
                }
            } catch {
                print("parley work serve: cannot open the job store: \(error)")
                throw ExitCode(2)
            }
            var trust: WorkSigning.PublicKey?
            if let path = self.trust {
                do { trust = try WorkSigning.readPublicKey(path) } catch { throw ValidationError(error.message) }
            }
            var rotation: WorkSigning.Rotation?
            if let path = self.rotation {
                guard let trust else { throw ValidationError("--rotation needs --trust (the key that signed it)") }
                do {
                    let r = try WorkSigning.readRotation(path)
                    try trust.verifyRotation(to: r.next, signature: r.signature)
                    rotation = r
                } catch { throw ValidationError(error.message) }
            }
            var router = ParleyRouter()
            var service = WorkService.Configuration(
                leaseDuration: .seconds(self.leaseSeconds), defaultMaxAttempts: self.maxAttempts, trust: trust,
                rotation: rotation, storeConcurrency: postgres ? 4 : 1
            )
            service.requireCapabilities = self.requireCaps
            service.maxLeasesPerWorker = self.leaseCap
            service.relayCommands = self.allowCommands
            service.preferences.maxSlots = self.maxSlots
            service.preferences.idleMilliseconds = self.idleMilliseconds
            let commands = WorkCommandCenter(logger: logger)
            WorkService.register(on: &router, store: store, configuration: service, commands: commands)
            let addresses = try (self.listen.isEmpty ? [Work.defaultMaster] : self.listen).map { try ParleyAddress(parsing: $0) }
            var configuration = ParleyServer.Configuration(
                listen: addresses, name: "parley-work", nucleus: self.nucleus.nucleus, minimumClientVersion: self.nucleus.minClientVersion
            )
            self.nucleus.apply(to: &configuration)
            do { try self.security.apply(to: &configuration) } catch let error as ParleyError { throw ValidationError(error.message) }
            let server = ParleyServer(configuration: configuration, router: router, logger: logger)
            // Expired leases go back to the queue even when no worker asks for work.
            let expiry = Task {
                while !Task.isCancelled {
                    try? await Task.sleep(for: .seconds(1))
                    do {
                        let n = try await store.expireLeases(now: WorkService.now())
                        if n > 0 { logger.info("leases expired", metadata: ["jobs": "\(n)"]) }
                    } catch {
                        logger.warning("cannot expire leases", metadata: ["error": "\(error)"])
                    }
                }
            }
            defer { expiry.cancel() }
            var services: [ServiceGroupConfiguration.ServiceConfiguration] = [.init(service: server)]
            if let http = self.http, let registry {
                let (host, port) = try Work.hostPort(http)
                services.append(.init(service: WorkHTTP.application(
                    host: host, port: port, store: store, metrics: { registry.emitToString() }, logger: logger, onRunning: { port in logger.info("http listening", metadata: ["address": "\(host):\(port)"]) }
                )))
            }
            if let buildbot = self.buildbot, let keyring = self.security.keyring {
                let (host, port) = try Work.webSocketHostPort(buildbot)
                var front = BuildbotFrontEnd.Configuration(host: host, port: port, keyringPath: keyring)
                front.requireCapabilities = self.requireCaps
                if !self.buildbotApp.isEmpty { front.apps = self.buildbotApp }
                front.leaseDuration = .seconds(self.leaseSeconds)
                front.trust = trust
                front.keepaliveInterval = .seconds(self.buildbotKeepalive)
                front.keepaliveTimeout = .seconds(self.buildbotKeepalive)
                front.listener.callTimeout = .seconds(self.buildbotKeepalive)
                front.commandGrace = .seconds(self.buildbotGrace)
                services.append(.init(service: BuildbotFrontEnd(configuration: front, store: store, commands: commands, logger: logger)))
            }
            if let boinc = try self.boinc.service(
                store: store, trust: (trust.map { [$0] } ?? []) + (rotation.map { [$0.next] } ?? []), keyring: self.security.keyring, requireCaps: self.requireCaps, database: self.database,
                maxLeasesPerWorker: self.leaseCap, logger: logger
            ) {
                services.append(.init(service: boinc))
            }
            let group = ServiceGroup(configuration: .init(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
            try await group.run()
            await store.close()
        }
    }

    struct Worker: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a worker: take jobs from a master, check their signatures, run them, report.",
            discussion: """
                A job whose signature does not verify with --trust is refused and reported, never run.
                The connection is a lossless session: a cut loses no report. With several --master
                addresses (masters sharing one PostgreSQL store) the worker starts at one chosen by its
                name and moves to the next when its master is gone, carrying its leases and reports.
                """
        )

        @Option(name: .long, help: ArgumentHelp("A master's address (repeatable: masters sharing one store).", valueName: "address"))
        var master: [String] = []

        @Option(name: .long, help: ArgumentHelp("An application this worker runs (repeatable): it also gets the jobs that need it.", valueName: "name"))
        var app: [String] = []

        @Option(name: .long, help: ArgumentHelp("How long the worker tries to reach a master before it gives up (also at its start, while no master answers yet).", valueName: "seconds"))
        var failoverSeconds: Int = 120

        var masters: [String] { self.master.isEmpty ? [Work.defaultMaster] : self.master }

        @Option(name: .long, help: ArgumentHelp("The project's public key (work.pub).", valueName: "file"))
        var trust: String

        @Option(name: .long, help: "Jobs run at once.")
        var slots: Int = 1

        @Option(name: .long, help: ArgumentHelp("Where jobs run, each in a directory of its own (job-ID-LEASE), removed once the job's report is made.", valueName: "dir"))
        var dir = "parley-work-jobs"

        @Flag(name: .long, help: "Keep each job's directory after its report (to look into a job's files).")
        var keepJobDirs = false

        @Option(name: .long, help: "The worker's name (default: the host name and process id; the keyring entity when --keyring is given).")
        var workerName: String?

        @Flag(name: .long, help: "Run the commands the master sends (parley work command): programs, file transfers, mkdir, rmdir, stat, glob; all inside --command-dir.")
        var acceptCommands = false

        @Option(name: .long, help: ArgumentHelp("Where the master's commands act (default: DIR/commands).", valueName: "dir"))
        var commandDir: String?

        @OptionGroup var security: ClientSecurityOptions

        @OptionGroup var logging: LoggingOptions

        func validate() throws {
            guard self.slots >= 1 else { throw ValidationError("--slots must be at least 1") }
            guard self.failoverSeconds >= 1 else { throw ValidationError("--failover-seconds must be at least 1") }
            try checkSeconds(Double(self.failoverSeconds), "--failover-seconds", minimum: 1)
            for a in self.app {
                guard !a.isEmpty else { throw ValidationError("--app needs a name") }
                do { try WorkService.check(app: a) } catch { throw ValidationError(error.message) }
            }
            for m in self.masters {
                do { _ = try ParleyAddress(parsing: m) } catch { throw ValidationError(error.message) }
                try self.security.check(address: try ParleyAddress(parsing: m))
            }
        }

        func run() async throws {
            self.logging.bootstrap()
            let trust: WorkSigning.PublicKey
            do { trust = try WorkSigning.readPublicKey(self.trust) } catch { throw ValidationError(error.message) }
            var base = ParleyClient.Configuration(name: "parley-work-worker")
            // With other masters to go to, a dead one is given up sooner.
            base.lossless = .init(reconnectTimeout: self.masters.count > 1 ? .seconds(5) : .seconds(60))
            let addresses = try self.masters.map { try ParleyAddress(parsing: $0) }
            // Each master's own configuration (TLS or not, by its address), checked here first.
            var configurations: [ParleyAddress: ParleyClient.Configuration] = [:]
            for address in addresses {
                var configuration = base
                do { try self.security.apply(to: &configuration, address: address) } catch { throw ValidationError(error.message) }
                configurations[address] = configuration
            }
            let given = self.workerName ?? "\(ProcessInfo.processInfo.hostName)-\(ProcessInfo.processInfo.processIdentifier)"
            let chosen = configurations, fallback = base
            // The master's commands: refused (with a clear error) unless --accept-commands.
            let commands: WorkCommandExecutor
            do {
                commands = try WorkCommandExecutor(configuration: .init(directory: self.commandDir ?? "\(self.dir)/commands", accept: self.acceptCommands))
            } catch {
                print("parley work worker: cannot make the command directory: \(error)")
                throw ExitCode(2)
            }
            var router = ParleyRouter()
            commands.register(on: &router)
            let link = WorkMasterLink(
                masters: addresses, configurationFor: { address in chosen[address] ?? fallback }, name: given,
                failoverTimeout: .seconds(Int64(self.failoverSeconds)), router: router, logger: Logger(label: "parley.work.worker")
            )
            let name: String
            do {
                name = try await link.firstClient().session.entity ?? given
            } catch let error as ParleyError {
                print("parley work worker: \(error.message) [\(error.code)]")
                throw ExitCode(2)
            }
            // Jobs with CPU or memory limits run through `parley work exec`, this same program.
            let limiter = [Work.selfPath(), "work", "exec"]
            var configuration = WorkWorker.Configuration(name: name, slots: self.slots, directory: self.dir, trust: trust, limiter: limiter, apps: self.app)
            configuration.keepJobDirectories = self.keepJobDirs
            let worker = WorkWorker(link: link, configuration: configuration, commands: commands)
            let task = Task { try await worker.run() }
            let signals = await UnixSignalsSequence(trapping: .sigint, .sigterm)
            // SIGINT/SIGTERM: stop the running jobs and hand them back, then leave.
            let stop = Task { for await _ in signals { worker.shutDown(); break } }
            defer { stop.cancel() }
            do {
                try await task.value
            } catch is CancellationError {
            } catch let error as ParleyError where error.code == .cancelled {
            } catch let error as ParleyError {
                print("parley work worker: \(error.message) [\(error.code)]")
                throw ExitCode(2)
            }
            link.close()
            let back = worker.handedBackJobs
            print("worker \(name) stopped: ran \(worker.ran.ran) jobs, refused \(worker.ran.refused), handed back \(back.count)\(back.isEmpty ? "" : " (jobs \(back.map(String.init).joined(separator: ", ")))")")
        }
    }

    struct Submit: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Sign and submit a job (COUNT copies) to a master; prints the job ids.",
            discussion: "Everything after -- is the job's program and arguments (no shell unless --shell). The private key stays here: the master only stores the signature."
        )

        @Option(name: .long, help: ArgumentHelp("The master's address.", valueName: "address"))
        var master = Work.defaultMaster

        @Option(name: .long, help: ArgumentHelp("The project's private key (work.key).", valueName: "file"))
        var key: String

        @Option(name: .long, help: "Copies of the job to submit (at most 100000, sent 1000 to a request).")
        var count: Int = 1

        @Option(name: .long, help: "Priority (higher first).")
        var priority: Int32 = 0

        @Flag(name: .long, help: "Run the command through /bin/sh -c.")
        var shell = false

        @Option(name: .long, help: ArgumentHelp("Wall-time limit (0: the worker's default).", valueName: "seconds"))
        var maxWall: UInt32 = 0

        @Option(name: .long, help: ArgumentHelp("How long the job is expected to run, for workers asking for seconds of work (0: unknown).", valueName: "seconds"))
        var estimate: UInt32 = 0

        @Option(name: .long, help: ArgumentHelp("CPU-time limit: SIGXCPU when reached (0: none).", valueName: "seconds"))
        var maxCpu: UInt32 = 0

        @Option(name: .long, help: ArgumentHelp("Memory (address space) limit: allocations past it fail (0: none).", valueName: "bytes"))
        var maxMemory: UInt64 = 0

        @Option(name: .long, help: ArgumentHelp("An input file, sent inline: NAME in the job's directory, from the local PATH (repeatable).", valueName: "name=path"))
        var input: [String] = []

        @Option(name: .long, help: ArgumentHelp("An input file the worker fetches: NAME=URL (http/https; fetched here once for its size and SHA-256) (repeatable).", valueName: "name=url"))
        var inputUrl: [String] = []

        @Option(name: .long, help: ArgumentHelp("A file the job leaves in its directory, sent back with the result (repeatable).", valueName: "name"))
        var output: [String] = []

        @Option(name: .long, help: ArgumentHelp("The application the job needs: only workers started with --app NAME get it.", valueName: "name"))
        var app: String = ""

        @Option(name: .long, help: ArgumentHelp("An environment variable for the job, NAME=VALUE (repeatable).", valueName: "name=value"))
        var env: [String] = []

        @Argument(parsing: .postTerminator, help: "The job's program and arguments.")
        var command: [String] = []

        @OptionGroup var security: ClientSecurityOptions

        func validate() throws {
            guard !self.command.isEmpty else { throw ValidationError("give the job's command after --") }
            // Sent in batches of WorkService.maxJobsPerSubmit, each stored all or none.
            guard (1...100_000).contains(self.count) else { throw ValidationError("--count must be from 1 to 100000") }
            for e in self.env where !e.contains("=") { throw ValidationError("--env takes NAME=VALUE, got \(e)") }
        }

        func run() async throws {
            let key: WorkSigning.PrivateKey
            do { key = try WorkSigning.readPrivateKey(self.key) } catch { throw ValidationError(error.message) }
            var spec = Parley_Work_V1_JobSpec()
            spec.argv = self.command
            spec.shell = self.shell
            spec.maxWallSeconds = self.maxWall
            spec.estimatedSeconds = self.estimate
            spec.maxCpuSeconds = self.maxCpu
            spec.maxMemoryBytes = self.maxMemory
            spec.outputs = self.output
            spec.app = self.app
            for (option, local) in self.input.map({ ($0, true) }) + self.inputUrl.map({ ($0, false) }) {
                guard let eq = option.firstIndex(of: "=") else { throw ValidationError("--input and --input-url take NAME=SOURCE, got \(option)") }
                var file = Parley_Work_V1_InputFile()
                file.name = String(option[..<eq])
                let source = String(option[option.index(after: eq)...])
                let bytes: Data
                if local {
                    guard let data = FileManager.default.contents(atPath: source) else { throw ValidationError("cannot read \(source)") }
                    bytes = data
                    file.content = data
                } else {
                    guard let url = URL(string: source), let data = try? Data(contentsOf: url) else { throw ValidationError("cannot fetch \(source)") }
                    bytes = data
                    file.url = source
                }
                file.size = UInt64(bytes.count)
                file.sha256 = Data(WorkFiles.sha256(bytes))
                spec.inputs.append(file)
            }
            do throws(WorkFiles.FileError) { try WorkFiles.check(spec: spec) } catch { throw ValidationError(error.message) }
            spec.env = Dictionary(self.env.map { e in (String(e.prefix { $0 != "=" }), String(e.drop { $0 != "=" }.dropFirst())) }) { $1 }
            if spec.env["PATH"] == nil { spec.env["PATH"] = "/usr/local/bin:/usr/bin:/bin" }
            var job = Parley_Work_V1_SignedJob()
            job.spec = try spec.serializedBytes()
            job.signature = Data(try key.sign(job: Array(job.spec)))
            job.priority = self.priority
            try await Work.withMaster(self.master, command: "submit", security: self.security) { client in
                // In batches a master takes (each stored all or none).
                var sent = 0
                while sent < self.count {
                    var submit = Parley_Work_V1_SubmitJobs()
                    submit.jobs = Array(repeating: job, count: min(WorkService.maxJobsPerSubmit, self.count - sent))
                    do {
                        let reply = try await client.request(submit, as: Parley_Work_V1_SubmitReply.self)
                        for id in reply.jobIds { print(id) }
                    } catch {
                        if sent > 0 { try? FileHandle.standardError.write(contentsOf: Data("parley work submit: \(sent) of \(self.count) jobs were stored (their ids above) before this batch failed\n".utf8)) }
                        throw error
                    }
                    sent += submit.jobs.count
                }
            }
        }
    }

    struct Status: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Jobs of a master by state.")

        @Option(name: .long, help: ArgumentHelp("The master's address.", valueName: "address"))
        var master = Work.defaultMaster

        @Flag(name: .long, help: "Print JSON.")
        var json = false

        @OptionGroup var security: ClientSecurityOptions

        func run() async throws {
            try await Work.withMaster(self.master, command: "status", security: self.security) { client in
                let s = try await client.request(Parley_Work_V1_StatusRequest(), as: Parley_Work_V1_StatusReply.self)
                if self.json {
                    print("{\"queued\":\(s.queued),\"leased\":\(s.leased),\"succeeded\":\(s.succeeded),\"failed\":\(s.failed)}")
                } else {
                    print("queued \(s.queued), leased \(s.leased), succeeded \(s.succeeded), failed \(s.failed)")
                }
            }
        }
    }

    struct Results: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "A job's state and accepted result.")

        @Option(name: .long, help: ArgumentHelp("The master's address.", valueName: "address"))
        var master = Work.defaultMaster

        @Flag(name: .long, help: "Print JSON.")
        var json = false

        @Argument(help: "The job id.")
        var job: UInt64

        @Option(name: .long, help: ArgumentHelp("Write the accepted result's output files into this directory.", valueName: "dir"))
        var saveOutputs: String?

        @OptionGroup var security: ClientSecurityOptions

        func run() async throws {
            try await Work.withMaster(self.master, command: "results", security: self.security) { client in
                var request = Parley_Work_V1_ResultRequest()
                request.jobID = self.job
                let r = try await client.request(request, as: Parley_Work_V1_ResultReply.self)
                if self.json {
                    print(try r.jsonString())
                } else {
                    print("job \(self.job): \(r.state)")
                    for f in r.failures { print("  attempt failed: \(f)") }
                    if r.hasResult {
                        print("  accepted from \(r.result.worker), lease \(r.result.leaseID): exit status \(r.result.exitStatus), \(r.result.wallMs) ms wall, \(r.result.cpuMs) ms CPU")
                        if !r.result.stdoutTail.isEmpty { print("  stdout: \(String(decoding: r.result.stdoutTail, as: UTF8.self))", terminator: "") }
                        for o in r.result.outputs {
                            print("  output \(o.name): \(o.size) bytes, sha256 \(o.sha256.map { String(format: "%02x", $0) }.joined())")
                        }
                    }
                }
                if let dir = self.saveOutputs {
                    for o in r.result.outputs {
                        do throws(WorkFiles.FileError) { try WorkFiles.check(name: o.name) } catch {
                            print("parley work results: not saved: \(error.message)")
                            throw ExitCode(2)
                        }
                        let path = dir + "/" + o.name
                        try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
                        do {
                            // Never over an existing file, nor through a link in its place.
                            try o.content.write(to: URL(fileURLWithPath: path), options: .withoutOverwriting)
                        } catch {
                            print("parley work results: not saved: \(path) exists or cannot be written (\(error.localizedDescription))")
                            throw ExitCode(2)
                        }
                        if !self.json { print("  saved \(path)") }
                    }
                }
            }
        }
    }

    struct Keygen: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make the project's signing key pair: DIR/work.key (mode 0600) and DIR/work.pub.",
            discussion: "Refuses to overwrite an existing key. Keep work.key off the masters; give work.pub to the workers (--trust)."
        )

        @Option(name: .long, help: ArgumentHelp("Directory to write work.key and work.pub into.", valueName: "dir"))
        var dir: String

        @Flag(name: .long, help: "Make the project's BOINC code-signing key instead: DIR/code_sign_private (mode 0600) and DIR/code_sign_public, RSA-1024 in BOINC's text format (for serve --boinc-key).")
        var boinc = false

        func run() throws {
            if self.boinc {
                do {
                    try BOINCSigning.writeKeyPair(try BOINCSigning.PrivateKey(), directory: self.dir)
                } catch {
                    print("parley work keygen: \(error.message)")
                    throw ExitCode(2)
                }
                print("wrote \(self.dir)/code_sign_private (private, mode 0600) and \(self.dir)/code_sign_public (public): the BOINC code-signing key")
                return
            }
            let key = WorkSigning.PrivateKey()
            do {
                try WorkSigning.writeKeyPair(key, directory: self.dir)
            } catch {
                print("parley work keygen: \(error.message)")
                throw ExitCode(2)
            }
            print("wrote \(self.dir)/work.key (private, mode 0600) and \(self.dir)/work.pub (public); key id \(key.publicKey.id)")
        }
    }

    struct Sign: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Sign a file with the project's private key; prints the signature in base64.",
            discussion: "Tests and scripts use it; `parley work submit` signs the jobs it submits itself."
        )

        @Option(name: .long, help: ArgumentHelp("The private key (work.key).", valueName: "file"))
        var key: String

        @Argument(help: ArgumentHelp("The file to sign.", valueName: "file"))
        var file: String

        func run() throws {
            do {
                let key = try WorkSigning.readPrivateKey(self.key)
                guard let bytes = FileManager.default.contents(atPath: self.file) else { throw WorkSigningError("cannot read \(self.file)") }
                print(Data(try key.sign(job: Array(bytes))).base64EncodedString())
            } catch let error as WorkSigningError {
                print("parley work sign: \(error.message)")
                throw ExitCode(2)
            }
        }
    }

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check a file's signature (base64) with the project's public key.",
            discussion: "Exits 0 when it verifies, 1 when it does not, saying why."
        )

        @Option(name: .long, help: ArgumentHelp("The public key (work.pub).", valueName: "file"))
        var trust: String

        @Option(name: .long, help: ArgumentHelp("The signature, in base64.", valueName: "base64"))
        var signature: String

        @Argument(help: ArgumentHelp("The signed file.", valueName: "file"))
        var file: String

        func run() throws {
            do {
                let key = try WorkSigning.readPublicKey(self.trust)
                guard let bytes = FileManager.default.contents(atPath: self.file) else { throw WorkSigningError("cannot read \(self.file)") }
                guard let signature = Data(base64Encoded: self.signature) else { throw WorkSigningError("the signature is not base64") }
                try key.verify(job: Array(bytes), signature: Array(signature))
                print("signature OK (key \(key.id))")
            } catch let error as WorkSigningError {
                print("parley work verify: \(error.message)")
                throw ExitCode(1)
            }
        }
    }

    struct Bench: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Measure a master: jobs dispatched and results accepted per second, with simulated workers.",
            discussion: """
                Submits --jobs copies of a signed job (`true`), then --workers simulated workers, each on
                its own Parley connection, spread over the --master addresses, ask for --slots jobs at a
                time and report each a success at once (nothing is run), until every job is accepted.
                Prints jobs per second end to end and the latency of an assignment (p50, p99). Start
                with an empty store: the jobs already queued would be counted too.
                """
        )

        @Option(name: .long, help: ArgumentHelp("A master's address (repeatable: workers are spread over them).", valueName: "address"))
        var master: [String] = []

        @Option(name: .long, help: ArgumentHelp("The project's private key (work.key), to sign the job.", valueName: "file"))
        var key: String

        @Option(name: .long, help: "Jobs to submit and drain.")
        var jobs: Int = 20_000

        @Option(name: .long, help: "Simulated workers (one connection each).")
        var workers: Int = 100

        @Option(name: .long, help: "Jobs a worker asks for at once.")
        var slots: Int = 8

        @Option(name: .long, help: ArgumentHelp("Verify each job's signature with this public key, as a real worker does.", valueName: "file"))
        var verify: String?

        @Flag(name: .long, help: "Print the result as JSON.")
        var json = false

        @OptionGroup var security: ClientSecurityOptions

        func validate() throws {
            guard self.jobs >= 1, self.workers >= 1, (1...64).contains(self.slots) else {
                throw ValidationError("--jobs and --workers must be at least 1, --slots 1 to 64")
            }
            for m in self.master { do { _ = try ParleyAddress(parsing: m) } catch { throw ValidationError(error.message) } }
        }

        func run() async throws {
            let key: WorkSigning.PrivateKey
            do { key = try WorkSigning.readPrivateKey(self.key) } catch { throw ValidationError(error.message) }
            var verify: WorkSigning.PublicKey?
            if let path = self.verify {
                do { verify = try WorkSigning.readPublicKey(path) } catch { throw ValidationError(error.message) }
            }
            let masters = try (self.master.isEmpty ? [Work.defaultMaster] : self.master).map { try ParleyAddress(parsing: $0) }
            var spec = Parley_Work_V1_JobSpec()
            spec.argv = ["true"]
            spec.env = ["PATH": "/usr/bin:/bin"]
            var job = Parley_Work_V1_SignedJob()
            job.spec = try spec.serializedBytes()
            job.signature = Data(try key.sign(job: Array(job.spec)))
            var client = ParleyClient.Configuration(name: "parley-work-bench")
            try self.security.apply(to: &client, address: masters[0])
            let logger = Logger(label: "parley.work.bench")
            let total = self.jobs
            let submitStarted = ContinuousClock.now
            try await Work.withMaster(masters[0].description, command: "bench", security: self.security) { master in
                try await WorkBench.submit(job, count: total, to: master) { sent in
                    try? FileHandle.standardError.write(contentsOf: Data("\rsubmitted \(sent)/\(total)".utf8))
                }
            }
            let submitSeconds = (ContinuousClock.now - submitStarted) / .seconds(1)
            try? FileHandle.standardError.write(contentsOf: Data(String(format: " in %.2f s\n", submitSeconds).utf8))
            let configuration = WorkBench.Configuration(masters: masters, jobs: total, workers: self.workers, slots: self.slots, client: client, verify: verify)
            let outcome: (seconds: Double, latencies: [Double], notAccepted: Int)
            do {
                outcome = try await WorkBench.drain(configuration, expected: total, logger: logger) { accepted in
                    try? FileHandle.standardError.write(contentsOf: Data("\raccepted \(accepted)/\(total)".utf8))
                }
            } catch let error as ParleyError {
                print("parley work bench: \(error.message) [\(error.code)]")
                throw ExitCode(2)
            }
            try? FileHandle.standardError.write(contentsOf: Data("\n".utf8))
            let result = WorkBench.Result(jobs: total, seconds: outcome.seconds, assignmentLatencies: outcome.latencies, submitSeconds: submitSeconds, notAccepted: outcome.notAccepted)
            let p50 = result.percentile(0.5) * 1000, p99 = result.percentile(0.99) * 1000
            if self.json {
                print(String(format: "{\"jobs\":%d,\"workers\":%d,\"masters\":%d,\"seconds\":%.3f,\"jobs_per_second\":%.0f,\"assignment_p50_ms\":%.3f,\"assignment_p99_ms\":%.3f,\"submit_seconds\":%.3f,\"not_accepted\":%d}",
                             total, self.workers, masters.count, result.seconds, result.jobsPerSecond, p50, p99, submitSeconds, result.notAccepted))
            } else {
                print(String(format: "%d jobs, %d workers, %d master(s): %.2f s, %.0f jobs/s; assignment p50 %.2f ms, p99 %.2f ms; submit %.2f s",
                             total, self.workers, masters.count, result.seconds, result.jobsPerSecond, p50, p99, submitSeconds))
            }
            if result.notAccepted > 0 {
                print("parley work bench: \(result.notAccepted) reports were not accepted")
                throw ExitCode(1)
            }
        }
    }

    struct Rotate: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Vouch for the project's next key with the current one (a key rotation).",
            discussion: """
                Writes FILE: the next public key and the current key's signature over it. Give it to
                the masters (parley work serve --trust CURRENT.pub --rotation FILE): they accept jobs
                signed by either key and announce the next key in every worker's welcome; a worker
                trusts it from then on only if a key it trusts signed it. Then sign jobs with the new key.
                """
        )

        @Option(name: .long, help: ArgumentHelp("The current private key (work.key).", valueName: "file"))
        var key: String

        @Option(name: .long, help: ArgumentHelp("The next public key (its work.pub).", valueName: "file"))
        var to: String

        @Option(name: .long, help: ArgumentHelp("The rotation file to write (never overwritten).", valueName: "file"))
        var out: String

        func run() throws {
            do {
                let key = try WorkSigning.readPrivateKey(self.key)
                let next = try WorkSigning.readPublicKey(self.to)
                try WorkSigning.writeRotation(.init(next: next, signature: try key.signRotation(to: next)), to: self.out)
                print("\(self.out): key \(next.id) vouched for by key \(key.publicKey.id)")
            } catch {
                throw ValidationError(error.message)
            }
        }
    }

    /// Not for people: the worker runs a job with CPU or memory limits as
    /// `parley work exec --cpu S --memory B -- PROGRAM ARGS...`, which sets the limits on
    /// itself and becomes the program (execv: same process, same environment).
    struct Exec: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a program under CPU and memory limits (used by the worker).", shouldDisplay: false
        )

        @Option(name: .long, help: "CPU seconds (0: none).")
        var cpu: UInt64 = 0

        @Option(name: .long, help: "Address-space bytes (0: none).")
        var memory: UInt64 = 0

        @Argument(parsing: .postTerminator, help: "The program (an absolute path) and its arguments.")
        var command: [String] = []

        func validate() throws {
            guard let program = self.command.first, program.hasPrefix("/") else {
                throw ValidationError("give the program's absolute path after --")
            }
        }

        func run() throws {
            if self.cpu > 0 {
                // SIGXCPU at the soft limit, SIGKILL a second later.
                var limit = rlimit(rlim_cur: rlim_t(self.cpu), rlim_max: rlim_t(self.cpu == .max ? self.cpu : self.cpu + 1))
                guard setrlimit(__rlimit_resource_t(RLIMIT_CPU.rawValue), &limit) == 0 else {
                    Self.fail("cannot limit CPU time to \(self.cpu) s: \(String(cString: strerror(errno)))")
                }
            }
            if self.memory > 0 {
                var limit = rlimit(rlim_cur: rlim_t(self.memory), rlim_max: rlim_t(self.memory))
                guard setrlimit(__rlimit_resource_t(RLIMIT_AS.rawValue), &limit) == 0 else {
                    Self.fail("cannot limit memory to \(self.memory) bytes: \(String(cString: strerror(errno)))")
                }
            }
            // The job starts with every signal unblocked and SIGXCPU's default action (it would
            // otherwise inherit this runtime's mask, and meet SIGKILL at the hard limit instead).
            var none = sigset_t()
            sigemptyset(&none)
            sigprocmask(SIG_SETMASK, &none, nil)
            signal(SIGXCPU, SIG_DFL)
            let arguments = self.command.map { strdup($0) } + [nil]
            execv(self.command[0], arguments)
            Self.fail("cannot run \(self.command[0]): \(String(cString: strerror(errno)))")
        }

        /// The job did not start: one line on stderr (its report's reason ends with it) and
        /// status 126, as a shell says of a program it cannot run.
        static func fail(_ message: String) -> Never {
            try? FileHandle.standardError.write(contentsOf: Data("parley work exec: \(message); the job did not run\n".utf8))
            Foundation.exit(126)
        }
    }
}
