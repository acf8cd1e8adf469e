import ArgumentParser
import Foundation
import Parley

/// `parley cert ...`: the development CA and certificates for `tls://` and `wss://`.
struct Cert: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make development TLS certificates (a CA, the server's, and entities').",
        discussion: """
            Try TLS with mutual authentication:
              parley cert init --dir certs
              parley cert issue client.alice --dir certs
            The server then uses certs/server.pem and certs/server.key and trusts certs/ca.pem
            for client certificates; a client trusts certs/ca.pem and presents
            certs/client.alice.pem. Keys are written mode 0600; no key material is printed.
            For development and tests: production brings its own PKI.
            """,
        subcommands: [Init.self, Issue.self]
    )

    struct Init: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make a development CA and a server certificate signed by it.",
            discussion: """
                Writes DIR/ca.pem and DIR/ca.key (the CA, valid 10 years), and DIR/server.pem
                and DIR/server.key (common name "server", for localhost, 127.0.0.1, ::1 and
                every --host; valid 2 years). DIR is created (mode 0700) if missing. An
                existing CA is kept unless --force is given.
                """
        )

        @Option(name: .long, help: ArgumentHelp("Directory for the files.", valueName: "dir"))
        var dir: String

        @Option(name: .long, help: ArgumentHelp("Another DNS name or IP address for the server certificate (repeatable).", valueName: "host"))
        var host: [String] = []

        @Flag(name: .long, help: "Replace an existing CA (certificates it signed stop being trusted).")
        var force = false

        func run() async throws {
            do {
                for file in try DevelopmentCertificates.initialize(directory: self.dir, hosts: self.host, force: self.force) {
                    print("wrote \(file)")
                }
            } catch {
                Cert.fail("parley cert init", error)
            }
        }
    }

    struct Issue: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Issue a certificate for an entity, signed by the development CA.",
            discussion: """
                Writes DIR/NAME.pem and DIR/NAME.key, common name NAME (an entity name such as
                client.alice, which the tls authentication method reports), for client
                authentication, and for server authentication too when --host is given.
                """
        )

        @Argument(help: ArgumentHelp("Entity name: the certificate's common name and file name.", valueName: "name"))
        var name: String

        @Option(name: .long, help: ArgumentHelp("Directory holding ca.pem and ca.key.", valueName: "dir"))
        var dir: String

        @Option(name: .long, help: ArgumentHelp("A DNS name or IP address the certificate is valid for as a server (repeatable).", valueName: "host"))
        var host: [String] = []

        @Flag(name: .long, help: "Replace an existing certificate of that name.")
        var force = false

        func run() async throws {
            do {
                for file in try DevelopmentCertificates.issue(name: self.name, directory: self.dir, hosts: self.host, force: self.force) {
                    print("wrote \(file)")
                }
            } catch {
                Cert.fail("parley cert issue", error)
            }
        }
    }

    /// Reports a failure on standard error and exits with status 2.
    static func fail(_ command: String, _ error: ParleyError) -> Never {
        try? FileHandle.standardError.write(contentsOf: Data("\(command): \(error.message)\n".utf8))
        Foundation.exit(2)
    }
}
