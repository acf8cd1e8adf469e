import Foundation
import Parley
import ParleyTestSupport
import Testing

/// Command-line input the `parley` command takes as meant, or refuses saying what is wrong.
@Suite struct CLIInputTests {
    /// `keyring export NAME NAME`: the entity is written once, and the keyring loads.
    @Test func anEntityNamedTwiceIsExportedOnce() async throws {
        let dir = freshTestDirectory("cli-export")
        let keyring = dir + "/server.keyring", out = dir + "/alice.keyring"
        #expect(try await parley(["keyring", "add", "client.alice", "--keyring", keyring]).status == 0)
        let export = try await parley(["keyring", "export", "client.alice", "client.alice", "--keyring", keyring, "--out", out])
        #expect(export.status == 0 && export.stdout.contains("wrote client.alice to"), "\(export.combined)")
        let list = try await parley(["keyring", "list", "--keyring", out])
        #expect(list.status == 0, "the exported keyring loads: \(list.combined)")
        #expect(list.stdout.components(separatedBy: "client.alice").count == 2, "\(list.stdout)")
    }

    /// A minimum client version that does not start with a number would compare as 0 and
    /// refuse no client: refused, saying why. (`1.4.0-beta` is a version: its suffix is ignored.)
    @Test(arguments: ["v2", "", ".5", "١.٢", "x1.0"])
    func aMinimumClientVersionThatIsNoVersionIsRefused(version: String) async throws {
        let out = try await parley(["serve", "--listen", "127.0.0.1:0", "--min-client-version", version])
        #expect(out.status != 0 && out.combined.contains("--min-client-version"), "\(out.combined)")
    }

    /// `--ws-allow-origin` takes an origin as browsers send it, or `*`.
    @Test(arguments: ["app.example.com", "https://app.example.com/", "https://", "https://a b"])
    func aWebSocketOriginThatIsNoOriginIsRefused(origin: String) async throws {
        let out = try await parley(["serve", "--listen", "ws://127.0.0.1:0/parley", "--ws-allow-origin", origin])
        #expect(out.status != 0 && out.combined.contains("--ws-allow-origin \(origin): not an origin"), "\(out.combined)")
    }

    /// `conform --only ID ADDRESS`: the address written after the ids is the address.
    @Test func anAddressAfterTheOnlyIdsIsTheAddress() async throws {
        try await withServer { server, addresses in
            guard case .tcp(_, let port) = addresses[0].kind else { Issue.record("not TCP"); return }
            let out = try await parley(["conform", "--only", "R-4.5-1", "127.0.0.1:\(port)"], seconds: 60)
            #expect(out.status == 0 && out.stdout.contains("R-4.5-1 PASS"), "\(out.combined)")
        }
    }
}

/// Keyring files: what is checked is what is read.
@Suite struct KeyringFileTests {
    /// A FIFO, a directory, a loose file, a symbolic link to a good keyring: the checks
    /// apply to the file opened (a FIFO is refused at once, not waited on for a writer).
    @Test func theFileOpenedIsTheFileChecked() throws {
        let dir = freshTestDirectory("keyring-files")
        let good = dir + "/good.keyring"
        try ParleyKeyring(entities: [.init(name: "client.a", key: [UInt8](repeating: 7, count: 32), caps: [], created: Date())]).save(path: good)
        #expect(try ParleyKeyring.load(path: good).entities.map(\.name) == ["client.a"])
        // A link to it reads it (the checks are of the file it names).
        let link = dir + "/link.keyring"
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: good)
        #expect(try ParleyKeyring.load(path: link).entities.map(\.name) == ["client.a"])
        let fifo = dir + "/fifo.keyring"
        #expect(mkfifo(fifo, 0o600) == 0)
        let refusedFIFO = #expect(throws: ParleyError.self) { try ParleyKeyring.load(path: fifo) }
        #expect(refusedFIFO?.message.contains("not a regular file") == true)
        let refusedDir = #expect(throws: ParleyError.self) { try ParleyKeyring.load(path: dir) }
        #expect(refusedDir?.message.contains("not a regular file") == true, "\(String(describing: refusedDir))")
        let loose = dir + "/loose.keyring"
        try FileManager.default.copyItem(atPath: good, toPath: loose)
        #expect(chmod(loose, 0o644) == 0)
        let refusedLoose = #expect(throws: ParleyError.self) { try ParleyKeyring.load(path: loose) }
        #expect(refusedLoose?.message.contains("has mode 0644") == true)
        let missing = #expect(throws: ParleyError.self) { try ParleyKeyring.load(path: dir + "/none") }
        #expect(missing?.message.contains("No such file") == true)
    }

    /// docs/security.md: dates are RFC 3339, also with fractional seconds or an offset, as
    /// another implementation may write them; anything else is refused naming the field and
    /// the text (before: "Expected date string to be ISO8601-formatted. at entities.Index 0").
    @Test func datesWithFractionsAndOffsetsAreRead() throws {
        let dir = freshTestDirectory("keyring-dates")
        let key = Data(repeating: 9, count: 32).base64EncodedString()
        func keyring(_ created: String, _ expires: String) throws -> String {
            let path = dir + "/\(UUID().uuidString).keyring"
            let text = #"{"format": "parley-keyring-1", "entities": [{"name": "client.py", "key": "\#(key)", "caps": ["*"], "created": "\#(created)", "expires": "\#(expires)", "revoked": false}]}"#
            #expect(FileManager.default.createFile(atPath: path, contents: Data(text.utf8), attributes: [.posixPermissions: 0o600]))
            return path
        }
        let read = try ParleyKeyring.load(path: try keyring("2026-12-07T14:03:18.123456Z", "2027-06-30T02:00:00+02:00"))
        let entity = try #require(read.entities.first)
        #expect(entity.expires == Date(timeIntervalSince1970: 1_814_313_600), "\(String(describing: entity.expires))")
        #expect(abs(entity.created.timeIntervalSince1970 - 1_796_652_198.123) < 0.01, "\(entity.created)")
        let refused = #expect(throws: ParleyError.self) { try ParleyKeyring.load(path: try keyring("2026-12-07 14:03:18", "2027-06-30T00:00:00Z")) }
        #expect(refused?.message.contains("\"2026-12-07 14:03:18\" is not an RFC 3339 date") == true && refused?.message.contains("created") == true, "\(String(describing: refused))")
    }
}
