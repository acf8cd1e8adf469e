import ArgumentParser
import Foundation
import Parley

/// The security options of a command that runs a Parley server (`serve`, `block serve`).
struct ServerSecurityOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Authentication methods allowed, comma-separated: none, secret, tls.", valueName: "methods"))
    var auth: String = "none"

    @Option(name: .long, help: ArgumentHelp("Keyring of the entities method secret accepts (see `parley keyring`).", valueName: "file"))
    var keyring: String?

    @Option(name: .long, help: ArgumentHelp("Connection modes allowed: crc, secure or crc,secure. secure seals every frame (needs --auth secret); secure alone refuses clients without it.", valueName: "modes"))
    var mode: String = "crc"

    @Option(name: .long, help: ArgumentHelp("Certificate directory for tls:// and wss:// (from `parley cert init`): server.pem, server.key, and ca.pem to check client certificates.", valueName: "dir"))
    var cert: String?

    @Flag(name: .long, help: "With TLS: require a client certificate (mutual TLS), not just check one if offered.")
    var requireClientCert = false

    @Option(name: .long, help: ArgumentHelp("Capabilities of clients no method identified (auth none, TLS without a certificate), comma-separated.", valueName: "caps"))
    var anonymousCaps: String = "*"

    @Option(name: .customLong("ws-allow-origin"), help: ArgumentHelp("A web origin (scheme://host[:port], as browsers send it in Origin) whose pages may connect to ws:// and wss:// listeners (repeatable; * for any). Clients that are not browsers send no Origin and are always accepted; without this option, a request from a web page is refused (403).", valueName: "origin"))
    var wsAllowOrigin: [String] = []

    var methods: [String] { Self.list(self.auth) }

    static func list(_ text: String) -> [String] {
        text.split(separator: ",").map { String($0).trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    }

    /// Checks the options together, for the addresses the server will listen on.
    func check(listen: [ParleyAddress]) throws {
        do {
            var configuration = ParleyServer.Configuration()
            try self.apply(to: &configuration)
            try configuration.validateSecurity()
        } catch let error as ParleyError {
            throw ValidationError(error.message)
        }
        for origin in self.wsAllowOrigin where origin != "*" {
            let parts = origin.split(separator: "://", maxSplits: 1)
            guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty, !parts[1].contains("/"), !origin.contains(where: \.isWhitespace) else {
                throw ValidationError("--ws-allow-origin \(origin): not an origin; give scheme://host[:port] as browsers send it (https://app.example.com, no path), or *")
            }
        }
        let tls = listen.contains(where: \.usesTLS)
        if tls && self.cert == nil { throw ValidationError("tls:// and wss:// need --cert DIR (make one with `parley cert init --dir DIR`)") }
        if self.methods.contains(AuthMethod.tls) && !tls { throw ValidationError("--auth tls needs a tls:// or wss:// listener") }
    }

    /// Sets methods, modes, keyring, TLS and anonymous capabilities on a server configuration.
    func apply(to configuration: inout ParleyServer.Configuration) throws {
        configuration.authMethods = self.methods
        configuration.modes = try ConnectionMode.parseList(self.mode)
        configuration.anonymousCapabilities = Self.list(self.anonymousCaps)
        // Called at validation too: a bad keyring or certificate stops the command before it starts.
        if let path = self.keyring { configuration.keyring = try ParleyKeyringSource(path: path) }
        if self.cert != nil || !self.wsAllowOrigin.isEmpty {
            var transport = PosixTransport()
            if let cert = self.cert {
                transport.tls = try ParleyTLS.server(directory: cert, clientCertificates: self.requireClientCert ? .required : .optional)
            }
            transport.webSocketAllowedOrigins = Set(self.wsAllowOrigin)
            configuration.transport = transport
        }
    }
}

/// The security options of a command that connects to a Parley server (`ping`, `block info`, ...).
struct ClientSecurityOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Keyring holding this client's key: authenticate with method secret (needs --name).", valueName: "file"))
    var keyring: String?

    @Option(name: .long, help: ArgumentHelp("Entity to authenticate as (with --keyring, or the certificate NAME.pem in --cert), e.g. client.alice.", valueName: "name"))
    var name: String?

    @Option(name: .long, help: ArgumentHelp("Connection modes accepted: crc, secure or secure,crc (default with --keyring: secure,crc).", valueName: "modes"))
    var mode: String?

    @Option(name: .long, help: ArgumentHelp("Certificate directory for tls:// and wss://: trusts ca.pem, presents NAME.pem (with --name) if it is there.", valueName: "dir"))
    var cert: String?

    func check(address: ParleyAddress) throws {
        if self.keyring != nil && self.name == nil { throw ValidationError("--keyring needs --name (the entity to authenticate as)") }
        if address.usesTLS && self.cert == nil { throw ValidationError("tls:// and wss:// need --cert DIR (the directory holding ca.pem)") }
        if let mode = self.mode {
            do { _ = try ConnectionMode.parseList(mode) } catch { throw ValidationError(error.message) }
        }
    }

    /// Sets credentials, methods, modes and TLS on a client configuration.
    func apply(to configuration: inout ParleyClient.Configuration, address: ParleyAddress) throws(ParleyError) {
        if let path = self.keyring, let name = self.name {
            configuration.secret = try ParleyKeyring.load(path: path).credentials(for: name, keyringPath: path)
            configuration.authMethods = [AuthMethod.secret]
            configuration.modes = [.secure, .crc]
        } else if address.usesTLS {
            // On TLS without a key: method tls (a certificate names us), else none.
            configuration.authMethods = [AuthMethod.tls, AuthMethod.none]
        }
        if let mode = self.mode { configuration.modes = try ConnectionMode.parseList(mode) }
        if let cert = self.cert {
            var transport = PosixTransport()
            transport.tls = try ParleyTLS.client(directory: cert, name: self.name)
            configuration.transport = transport
        }
    }
}
