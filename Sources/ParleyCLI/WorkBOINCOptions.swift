import ArgumentParser
import Foundation
import Logging
import Parley
import ParleyWork
import ParleyWorkBOINC
import ServiceLifecycle

/// `parley work serve --boinc URL` and its `--boinc-*` options: the BOINC front end
/// (docs/boinc.md), one more service of the master's group on the same job store.
struct WorkBOINCOptions: ParsableArguments {
    @Option(name: .customLong("boinc"), help: ArgumentHelp("Serve BOINC clients: the project's URL (its master page), e.g. http://127.0.0.1:8765/; listens on its host and port.", valueName: "url"))
    var url: String?

    @Option(name: .customLong("boinc-key"), help: ArgumentHelp("The project's BOINC code-signing key (code_sign_private, from parley work keygen --boinc).", valueName: "file"))
    var key: String?

    @Option(name: .customLong("boinc-listen"), help: ArgumentHelp("Listen here instead of the URL's host and port.", valueName: "host:port"))
    var listen: String?

    @Option(name: .customLong("boinc-scheduler"), help: ArgumentHelp("A scheduler URL for the master page (repeatable; in order, for failover; default URL/scheduler).", valueName: "url"))
    var schedulers: [String] = []

    @Option(name: .customLong("boinc-request-delay"), help: ArgumentHelp("Tell clients to wait this long between scheduler RPCs.", valueName: "seconds"))
    var requestDelay: Double?

    @Option(name: .customLong("boinc-notice"), help: ArgumentHelp("A notice every client shows its user (repeatable).", valueName: "text"))
    var notices: [String] = []

    @Option(name: .customLong("boinc-lease-seconds"), help: ArgumentHelp("How long a BOINC client has for a job: its report deadline.", valueName: "seconds"))
    var leaseSeconds: Int = 3600

    @Option(name: .customLong("boinc-app"), help: ArgumentHelp("An application BOINC clients run besides their platforms' names (repeatable).", valueName: "name"))
    var apps: [String] = []

    @Option(name: .customLong("boinc-uploads"), help: ArgumentHelp("Where uploaded outputs wait for their report (default: next to the SQLite file, or ./parley-work-boinc-uploads).", valueName: "dir"))
    var uploads: String?

    @Option(name: .customLong("boinc-project-name"), help: ArgumentHelp("The project's name, as clients show it.", valueName: "name"))
    var projectName = "Parley Work"

    @Option(name: .customLong("boinc-max-connections-per-peer"), help: ArgumentHelp("Connections one address (an IPv6 /64) may hold open at once; more are closed as they are accepted. 0: no cap, for a front end behind a reverse proxy, where every client has the proxy's address.", valueName: "n"))
    var maxConnectionsPerPeer = 32

    func validate() throws {
        guard let url = self.url else {
            if self.key != nil { throw ValidationError("--boinc-key needs --boinc URL") }
            return
        }
        guard self.key != nil else { throw ValidationError("--boinc needs --boinc-key (make one with parley work keygen --boinc --dir DIR)") }
        _ = try self.address(url)
        guard self.leaseSeconds > 0 else { throw ValidationError("--boinc-lease-seconds must be positive") }
        guard self.maxConnectionsPerPeer >= 0 else { throw ValidationError("--boinc-max-connections-per-peer must be 0 (no cap) or more") }
        try checkSeconds(Double(self.leaseSeconds), "--boinc-lease-seconds", minimum: 1)
        if let delay = self.requestDelay { try checkSeconds(delay, "--boinc-request-delay", minimum: 0) }
        for app in self.apps {
            do throws(ParleyError) { try WorkService.check(app: app) } catch { throw ValidationError("--boinc-app: \(error.message)") }
        }
    }

    func address(_ url: String) throws -> (host: String, port: Int) {
        if let listen = self.listen { return try Work.hostPort(listen) }
        guard let components = URLComponents(string: url), components.scheme == "http", let host = components.host else {
            throw ValidationError("--boinc must be an http:// URL, not \(url)")
        }
        return (host, components.port ?? 80)
    }

    /// The front end as a service, or nil without --boinc.
    func service(
        store: any WorkStore, trust: [WorkSigning.PublicKey], keyring: String?, requireCaps: Bool, database: String, maxLeasesPerWorker: Int?, logger: Logger
    ) throws -> (any Service)? {
        guard let url = self.url, let keyPath = self.key else { return nil }
        let key: BOINCSigning.PrivateKey
        do { key = try BOINCSigning.readPrivateKey(keyPath) } catch { throw ValidationError(error.message) }
        let uploads = self.uploads ?? (database.hasPrefix("sqlite:") ? String(database.dropFirst("sqlite:".count)) + ".boinc-uploads" : "parley-work-boinc-uploads")
        var configuration = BOINCFrontEnd.Configuration(url: url, key: key, uploadDirectory: uploads, schedulerURLs: self.schedulers)
        configuration.trust = trust
        if let keyring {
            do { configuration.keyring = try ParleyKeyring.load(path: keyring) } catch { throw ValidationError(error.message) }
        }
        configuration.requireCapabilities = requireCaps
        configuration.maxLeasesPerWorker = maxLeasesPerWorker
        configuration.maxConnectionsPerPeer = self.maxConnectionsPerPeer == 0 ? nil : self.maxConnectionsPerPeer
        configuration.leaseDuration = .seconds(self.leaseSeconds)
        configuration.requestDelay = self.requestDelay
        configuration.notices = self.notices
        configuration.apps = self.apps
        configuration.projectName = self.projectName
        let frontEnd = try BOINCFrontEnd(configuration: configuration, store: store, logger: logger)
        let (host, port) = try self.address(url)
        return BOINCHTTP.application(host: host, port: port, frontEnd: frontEnd, logger: logger) { port in
            logger.info("boinc front end listening", metadata: ["url": "\(url)", "port": "\(port)"])
        }
    }
}
