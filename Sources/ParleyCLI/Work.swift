import ArgumentParser
import Foundation
import ParleyWork

/// `parley work`: Parley Work, the job scheduler (issue 11). So far: its signing keys.
struct Work: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Parley Work: distribute signed jobs to workers (so far: signing keys).",
        discussion: """
            Jobs are signed with the project's Ed25519 key, which never leaves the machine that
            submits them; workers run only jobs whose signature verifies with the public key.
            """,
        subcommands: [Keygen.self, Sign.self, Verify.self]
    )

    struct Keygen: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make the project's signing key pair: DIR/work.key (mode 0600) and DIR/work.pub.",
            discussion: "Refuses to overwrite an existing key. Keep work.key off the masters; give work.pub to the workers (--trust)."
        )

        @Option(name: .long, help: ArgumentHelp("Directory to write work.key and work.pub into.", valueName: "dir"))
        var dir: String

        func run() throws {
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
}
