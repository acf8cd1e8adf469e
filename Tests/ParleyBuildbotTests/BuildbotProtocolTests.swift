import Foundation
import NIOHTTP1
import Parley
import ParleyWork
import Testing
@testable import ParleyWorkBuildbot

/// The sans-IO parts of the Buildbot front end: message shapes, sequence numbers, updates,
/// the translation of Parley commands, and logins against a keyring.
@Suite struct BuildbotProtocolTests {
    @Test func parsesRequestsAndResponses() throws {
        #expect(try BuildbotMessage.parse(.object(["op": "response", "seq_number": 4, "result": "x", "is_exception": true])) == .response(seq: 4, result: "x", isException: true))
        #expect(try BuildbotMessage.parse(.object(["op": "response", "seq_number": 0])) == .response(seq: 0, result: .nil, isException: false))
        let update = MessagePack.object(["op": "update", "seq_number": 2, "command_id": "1", "args": .array([])])
        #expect(try BuildbotMessage.parse(update) == .request(op: "update", seq: 2, body: update))
        let bad: [(MessagePack, String)] = [
            (.array([]), "must be a map, not an array"),
            (.object(["seq_number": 1]), "without a string \"op\""),
            (.object(["op": 5, "seq_number": 1]), "without a string \"op\""),
            (.object(["op": "update"]), "update: no integer \"seq_number\""),
            (.object(["op": "update", "seq_number": "1"]), "no integer"),
            (.object(["op": "update", "seq_number": -1]), "negative seq_number"),
        ]
        for (value, text) in bad {
            #expect { _ = try BuildbotMessage.parse(value) } throws: { "\($0)".contains(text) }
        }
    }

    @Test func responsesMustAnswerOutstandingRequests() throws {
        var requests = BuildbotRequests(limit: 2)
        #expect(try requests.send() == 0)
        #expect(try requests.send() == 1)
        #expect { _ = try requests.send() } throws: { "\($0)".contains("2 requests already wait") }
        try requests.receive(1)
        #expect { try requests.receive(1) } throws: { "\($0)".contains("a second response to request 1") }
        #expect { try requests.receive(9) } throws: { "\($0)".contains("never sent") }
        #expect(requests.drain() == [0])
        #expect(requests.outstanding.isEmpty)
    }

    @Test func readsUpdates() throws {
        let args: MessagePack = .array([
            .array(["stdout", .array(["hello\n", .array([5]), .array([.double(1.5)])])]),
            .array(["stderr", "bare\n"]),
            .array(["header", .array(["process killed by signal 9\n", .array([]), .array([])])]),
            .array(["rc", -1]), .array(["elapsed", .double(0.25)]),
            .array(["files", .array(["/w/a", "/w/b"])]),
            .array(["stat", .array([33188, 1, 2, 1, 0, 0, 12, .double(1.0), .double(1700000000.5), .double(1.0)])]),
            .array(["log", .array(["build.log", .array(["line\n"])])]),
            .array(["failure_reason", "timeout"]), .array(["something_new", 1]),
        ])
        let updates = try BuildbotUpdate.parse(args)
        #expect(updates == [
            .stdout("hello\n"), .stderr("bare\n"), .header("process killed by signal 9\n"), .rc(-1), .elapsed(0.25), .files(["/w/a", "/w/b"]),
            .stat([33188, 1, 2, 1, 0, 0, 12, 1, 1_700_000_000, 1]), .log(name: "build.log", text: "line\n"), .failureReason("timeout"), .other("something_new"),
        ])
        for (bad, text) in [(MessagePack.object([:]), "must be a list"), (.array([.array(["rc"])]), "not [key, value]"), (.array([.array(["rc", "x"])]), "rc must be an integer"),
                            (.array([.array(["stdout", 3])]), "stdout without text"), (.array([.array(["log", "x"])]), "log must be")] {
            #expect { _ = try BuildbotUpdate.parse(bad) } throws: { "\($0)".contains(text) }
        }
    }

    @Test func translatesParleyCommands() throws {
        var shell = Parley_Work_V1_Command()
        shell.commandID = 3
        shell.shell.argv = ["make", "-j2"]
        shell.shell.workdir = "src"
        shell.shell.env = ["B": "2", "A": "1"]
        shell.shell.timeoutSeconds = 30
        shell.shell.interruptSignal = 15
        let t = try BuildbotCommands.translate(shell, root: "/w/commands")
        #expect(t.name == "shell")
        #expect(t.args["workdir"] == "/w/commands/src")
        #expect(t.args["command"] == .array(["make", "-j2"]))
        #expect(t.args["env"] == .object(["A": "1", "B": "2"]))
        #expect(t.args["timeout"] == 30 && t.args["maxTime"] == 3600 && t.args["interruptSignal"] == "TERM" && t.args["logEnviron"] == false)
        shell.shell.shell = true
        #expect(try BuildbotCommands.translate(shell, root: "/w").args["command"] == "make -j2")

        var upload = Parley_Work_V1_Command()
        upload.upload.path = "out/a.bin"
        upload.upload.maxSize = 10
        let u = try BuildbotCommands.translate(upload, root: "/w")
        #expect(u.name == "upload_file" && u.args["path"] == "/w/out/a.bin" && u.args["keepstamp"] == true && u.limit == 10 && u.direction == .upload)
        var download = Parley_Work_V1_Command()
        download.download.path = "in.bin"
        download.download.mode = 0o600
        let d = try BuildbotCommands.translate(download, root: "/w")
        #expect(d.name == "download_file" && d.args["mode"] == 0o600 && d.args["maxsize"] == .nil && d.direction == .download)
        var tree = Parley_Work_V1_Command()
        tree.uploadDirectory.path = "out"
        let dir = try BuildbotCommands.translate(tree, root: "/w")
        #expect(dir.name == "upload_directory" && dir.args["path"] == "/w/out" && dir.args["compress"] == .nil && dir.direction == .upload)
        var logged = shell
        logged.shell.logfiles = ["build": "out/build.log"]
        #expect(try BuildbotCommands.translate(logged, root: "/w").args["logfiles"] == .object(["build": "out/build.log"]))
        logged.shell.logfiles = ["build": "../x"]
        #expect(throws: WorkFiles.FileError.self) { _ = try BuildbotCommands.translate(logged, root: "/w") }
        var listing = Parley_Work_V1_Command()
        listing.listdir.path = ""
        #expect(try BuildbotCommands.translate(listing, root: "/w").args["path"] == "/w")

        // Paths out of the command directory, and what Buildbot cannot do, are refused whole.
        var escape = Parley_Work_V1_Command()
        escape.mkdir.paths = ["ok", "../out"]
        #expect(throws: WorkFiles.FileError.self) { _ = try BuildbotCommands.translate(escape, root: "/w") }
        var absolute = Parley_Work_V1_Command()
        absolute.stat.path = "/etc/passwd"
        #expect(throws: WorkFiles.FileError.self) { _ = try BuildbotCommands.translate(absolute, root: "/w") }
        var twoFiles = Parley_Work_V1_Command()
        twoFiles.rmfile.paths = ["a", "b"]
        #expect { _ = try BuildbotCommands.translate(twoFiles, root: "/w") } throws: { "\($0)".contains("one file per command") }
        #expect(throws: WorkFiles.FileError.self) { _ = try BuildbotCommands.translate(Parley_Work_V1_Command(), root: "/w") }
    }

    @Test func turnsUpdatesIntoResults() {
        var shell = Parley_Work_V1_Command()
        shell.shell.argv = ["x"]
        let killed = BuildbotCommands.result(1, [.header("command interrupted, attempting to kill\nprocess killed by signal 9\n"), .rc(-1)], failure: nil, interrupted: true, root: "/w", kind: shell.kind)
        #expect(killed.signal == 9 && killed.interrupted && killed.exitStatus == -1)
        let exited = BuildbotCommands.result(1, [.rc(3)], failure: nil, interrupted: false, root: "/w", kind: shell.kind)
        #expect(exited.exitStatus == 3 && exited.signal == 0 && exited.error.isEmpty)
        var glob = Parley_Work_V1_Command()
        glob.glob.path = "*"
        let files = BuildbotCommands.result(1, [.files(["/w/b", "/w/a"]), .rc(0)], failure: nil, interrupted: false, root: "/w", kind: glob.kind)
        #expect(files.paths == ["a", "b"])
        var stat = Parley_Work_V1_Command()
        stat.stat.path = "f"
        let found = BuildbotCommands.result(1, [.stat([0o100640, 0, 0, 1, 0, 0, 42, 0, 1_700_000_000, 0]), .rc(0)], failure: nil, interrupted: false, root: "/w", kind: stat.kind)
        #expect(found.stat.exists && found.stat.kind == "file" && found.stat.size == 42 && found.stat.mode == 0o640 && found.stat.mtimeUnixMs == 1_700_000_000_000)
        let missing = BuildbotCommands.result(1, [.rc(1)], failure: nil, interrupted: false, root: "/w", kind: stat.kind)
        #expect(!missing.stat.exists && missing.exitStatus == 1)
        let failed = BuildbotCommands.result(1, [], failure: "Traceback ...", interrupted: false, root: "/w", kind: glob.kind)
        #expect(failed.exitStatus == 1 && failed.error == "Traceback ...")
    }

    @Test func loginsAreJudgedAgainstTheKeyring() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("bb-auth-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/keyring.json"
        let key = [UInt8](repeating: 7, count: 32)
        var keyring = ParleyKeyring()
        keyring.entities.append(.init(name: "bb1", key: key, caps: ["work.worker"], created: Date()))
        keyring.entities.append(.init(name: "plain", key: key, caps: [], created: Date()))
        keyring.entities.append(.init(name: "old", key: key, caps: ["work.*"], created: Date(), expires: Date(timeIntervalSince1970: 1)))
        keyring.entities.append(.init(name: "gone", key: key, caps: ["*"], created: Date(), revoked: true))
        try keyring.save(path: path)
        let password = Data(key).base64EncodedString()
        func judge(_ name: String, _ pw: String, caps: Bool = true) -> BuildbotAuthentication {
            BuildbotFrontEnd.authenticate(name: name, password: pw, keyringPath: path, requireCapabilities: caps)
        }
        #expect(judge("bb1", password) == .accepted("bb1"))
        #expect(judge("bb1", password + "x") == .refused("unknown worker name or wrong password"))
        #expect(judge("bb1", "") == .refused("unknown worker name or wrong password"))
        #expect(judge("nobody", password) == .refused("unknown worker name or wrong password"))
        #expect(judge("plain", password) == .refused("worker plain lacks the capability work.worker"))
        #expect(judge("plain", password, caps: false) == .accepted("plain"))
        #expect("\(judge("old", password))".contains("expired"))
        #expect("\(judge("gone", password))".contains("revoked"))
        #expect("\(BuildbotFrontEnd.authenticate(name: "bb1", password: password, keyringPath: dir + "/none.json", requireCapabilities: false))".contains("cannot read its keyring"))

        // The header itself.
        func header(_ value: String?) -> HTTPHeaders { value.map { HTTPHeaders([("Authorization", $0)]) } ?? HTTPHeaders() }
        let check: (String, String) -> BuildbotAuthentication = { name, pw in pw == "s3cret" ? .accepted(name) : .refused("no") }
        #expect(BuildbotAuthentication.judge(header("Basic " + Data("w1:s3cret".utf8).base64EncodedString()), check: check) == .accepted("w1"))
        #expect(BuildbotAuthentication.judge(header("basic " + Data("w1:a:b".utf8).base64EncodedString()), check: check) == .refused("no"))
        if case .refused = BuildbotAuthentication.judge(header(nil), check: check) {} else { Issue.record("no header must be refused (401)") }
        for bad in ["Bearer x", "Basic !!!", "Basic " + Data("nocolon".utf8).base64EncodedString(), "Basic"] {
            if case .malformed = BuildbotAuthentication.judge(header(bad), check: check) {} else { Issue.record("\(bad) must be malformed (400)") }
        }
    }
}
