import ArgumentParser
import Foundation
import Parley

struct Keyring: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Manage a keyring of entities and their keys (method secret).",
        discussion: """
            A keyring is a JSON file of named entities (client.alice, worker.build-7), each
            with a 32-byte random key, capabilities, an optional expiry and a revoked mark.
            It is written with mode 0600 through a temporary file and a rename; a keyring that
            others may read or write is refused. Only `keyring key` prints a key (for programs
            that log in with a name and password).

            A server and its clients on one machine can share one keyring. Otherwise give
            each client a keyring with its own entity only:
              parley keyring add client.alice --keyring server.keyring --caps echo
              parley keyring export client.alice --keyring server.keyring --out alice.keyring
            """,
        subcommands: [Add.self, List.self, Key.self, Revoke.self, Rotate.self, Remove.self, Export.self]
    )

    struct Options: ParsableArguments {
        @Option(name: .long, help: ArgumentHelp("The keyring file.", valueName: "file"))
        var keyring: String
    }

    /// Runs a command's body; a Parley error becomes its message on stderr and exit code 1.
    static func reporting(_ body: () throws -> Void) throws {
        do {
            try body()
        } catch let error as ParleyError {
            throw Keyring.fail(error)
        }
    }

    static func fail(_ error: ParleyError) -> ExitCode {
        try? FileHandle.standardError.write(contentsOf: Data("parley keyring: \(error.message)\n".utf8))
        return ExitCode(1)
    }

    static func parseDate(_ text: String) throws -> Date {
        let full = ISO8601DateFormatter()
        if let date = full.date(from: text) { return date }
        let day = ISO8601DateFormatter()
        day.formatOptions = [.withFullDate]
        if let date = day.date(from: text) { return date }
        throw ValidationError("bad date \"\(text)\": use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ")
    }

    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Add an entity with a new random key (creates the keyring if needed)."
        )
        @Argument(help: "Entity name, e.g. client.alice.") var name: String
        @OptionGroup var options: Options
        @Option(name: .long, help: "Capabilities, comma-separated (e.g. echo,block.*; * is everything). Default: none.")
        var caps: String = ""
        @Option(name: .long, help: "Expiry: YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ.")
        var expires: String?

        func validate() throws {
            do { try ParleyKeyring.validate(name: self.name) } catch { throw ValidationError(error.message) }
            if let expires { _ = try Keyring.parseDate(expires) }
        }

        func run() throws {
            try Keyring.reporting {
                var keyring = try ParleyKeyring.loadOrEmpty(path: self.options.keyring)
                guard keyring.entity(named: self.name) == nil else {
                    throw ParleyError(code: .invalidArgument, message: "\(self.name) is already in \(self.options.keyring); use rotate to give it a new key")
                }
                let caps = self.caps.split(separator: ",").map { String($0).trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
                keyring.entities.append(ParleyKeyring.Entity(
                    name: self.name, key: Keyring.randomKey(), caps: caps, created: Date(),
                    expires: try self.expires.map(Keyring.parseDate)
                ))
                try keyring.save(path: self.options.keyring)
                print("added \(self.name) to \(self.options.keyring) (caps: \(caps.isEmpty ? "none" : caps.joined(separator: ",")))")
                if let expires = keyring.entity(named: self.name)?.expires, expires <= Date() {
                    try? FileHandle.standardError.write(contentsOf: Data("parley keyring: warning: \(self.name) expires in the past (\(ISO8601DateFormatter().string(from: expires))): servers refuse its key\n".utf8))
                }
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the entities (never their keys).")
        @OptionGroup var options: Options

        func run() throws {
            try Keyring.reporting {
                let keyring = try ParleyKeyring.load(path: self.options.keyring)
                let now = Date()
                let formatter = ISO8601DateFormatter()
                for e in keyring.entities {
                    var status = "active"
                    if e.revoked { status = "revoked" } else if let x = e.expires, x <= now { status = "expired" }
                    let expires = e.expires.map { " expires \(formatter.string(from: $0))" } ?? ""
                    print("\(e.name)\t\(status)\tcaps \(e.caps.isEmpty ? "-" : e.caps.joined(separator: ","))\tcreated \(formatter.string(from: e.created))\(expires)")
                }
            }
        }
    }

    /// Loads, changes one entity, saves.
    static func update(_ options: Options, _ name: String, _ change: (inout ParleyKeyring.Entity) -> Void) throws {
        try Keyring.reporting {
            var keyring = try ParleyKeyring.load(path: options.keyring)
            guard let index = keyring.entities.firstIndex(where: { $0.name == name }) else {
                throw ParleyError(code: .invalidArgument, message: "\(name) is not in \(options.keyring)")
            }
            change(&keyring.entities[index])
            try keyring.save(path: options.keyring)
        }
    }

    static func randomKey() -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        return (0..<32).map { _ in UInt8.random(in: 0...255, using: &generator) }
    }

    struct Revoke: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Mark an entity's key revoked: servers refuse it from their next connection on."
        )
        @Argument(help: "Entity name.") var name: String
        @OptionGroup var options: Options

        func run() throws {
            try Keyring.update(self.options, self.name) { $0.revoked = true }
            print("revoked \(self.name) in \(self.options.keyring)")
        }
    }

    struct Rotate: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Give an entity a new random key (and clear a revoked mark); the old key stops working.",
            discussion: "Export the entity again and hand the new keyring to its client."
        )
        @Argument(help: "Entity name.") var name: String
        @OptionGroup var options: Options
        @Option(name: .long, help: "New expiry: YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (default: keep it).")
        var expires: String?

        func run() throws {
            let expires = try self.expires.map(Keyring.parseDate)
            try Keyring.update(self.options, self.name) { e in
                e = ParleyKeyring.Entity(name: e.name, key: Keyring.randomKey(), caps: e.caps, created: Date(), expires: expires ?? e.expires)
            }
            print("rotated the key of \(self.name) in \(self.options.keyring)")
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove an entity from the keyring.")
        @Argument(help: "Entity name.") var name: String
        @OptionGroup var options: Options

        func run() throws {
            try Keyring.reporting {
                var keyring = try ParleyKeyring.load(path: self.options.keyring)
                guard keyring.entity(named: self.name) != nil else {
                    throw ParleyError(code: .invalidArgument, message: "\(self.name) is not in \(self.options.keyring)")
                }
                keyring.entities.removeAll { $0.name == self.name }
                try keyring.save(path: self.options.keyring)
                print("removed \(self.name) from \(self.options.keyring)")
            }
        }
    }

    struct Key: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print an entity's key (base64), nothing else.",
            discussion: "For programs that log in with a name and password, such as a Buildbot worker of `parley work serve --buildbot`: buildbot-worker create-worker --protocol=msgpack_experimental_v7 DIR HOST:PORT NAME \"$(parley keyring key NAME)\"."
        )
        @Argument(help: "Entity name.") var name: String
        @OptionGroup var options: Options

        func run() throws {
            try Keyring.reporting {
                let keyring = try ParleyKeyring.load(path: self.options.keyring)
                guard let e = keyring.entity(named: self.name) else {
                    throw ParleyError(code: .invalidArgument, message: "\(self.name) is not in \(self.options.keyring)")
                }
                print(e.key)
            }
        }
    }

    struct Export: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write a keyring holding only the given entities (a client's keyring)."
        )
        @Argument(help: "Entity names.") var names: [String]
        @OptionGroup var options: Options
        @Option(name: .long, help: ArgumentHelp("The keyring to write (mode 0600).", valueName: "file"))
        var out: String

        func run() throws {
            try Keyring.reporting {
                let keyring = try ParleyKeyring.load(path: self.options.keyring)
                var exported = ParleyKeyring()
                for name in self.names {
                    // A name given twice is exported once (a keyring listing an entity twice is refused on load).
                    guard !exported.entities.contains(where: { $0.name == name }) else { continue }
                    guard let e = keyring.entity(named: name) else {
                        throw ParleyError(code: .invalidArgument, message: "\(name) is not in \(self.options.keyring)")
                    }
                    exported.entities.append(e)
                }
                try exported.save(path: self.out)
                print("wrote \(exported.entities.map(\.name).joined(separator: ", ")) to \(self.out)")
            }
        }
    }
}
