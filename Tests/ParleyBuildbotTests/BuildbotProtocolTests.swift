import Foundation
import NIOCore
import NIOHTTP1
import Parley
import ParleyWork
import Testing
@testable import ParleyWorkBuildbot
import ParleyTestSupport

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
        let dir = testScratchPath("bb-auth-\(UUID().uuidString)")
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

/// Numbers a worker or a job chooses (a stat of 1e300, NaN times, limits of UInt64.max,
/// output without end): each is held to its range or refused with an error, and never traps
/// the master.
@Suite struct BuildbotHostileNumbersTests {
    /// A download's source in memory.
    struct BytesTransfer: WorkTransfer {
        let bytes: [UInt8]
        func write(command: UInt64, offset: UInt64, _ data: ByteBuffer) async throws {}
        func read(command: UInt64, offset: UInt64, length: Int) async throws -> (data: ByteBuffer, eof: Bool) {
            let start = Int(offset), end = min(self.bytes.count, start + length)
            return (ByteBuffer(bytes: self.bytes[start..<end]), end == self.bytes.count)
        }
    }

    @Test func statValuesBeyondInt64AreHeldToItsRange() throws {
        let args: MessagePack = .array([.array(["stat", .array([
            .double(1e300), .double(.nan), .double(.infinity), .double(-Double.infinity), .uint(.max), .double(-1e300), 12, .double(1.9), .double(1e16), .double(-2.5),
        ])])])
        let updates = try BuildbotUpdate.parse(args)
        let expected: [Int64] = [.max, 0, .max, .min, .max, .min, 12, 1, 10_000_000_000_000_000, -2]
        #expect(updates == [.stat(expected)])

        var stat = Parley_Work_V1_Command()
        stat.stat.path = "f"
        let parsed = BuildbotCommands.result(1, updates + [.rc(0)], failure: nil, interrupted: false, root: "/w", kind: stat.kind)
        #expect(parsed.stat.exists && parsed.stat.size == 12 && parsed.stat.mtimeUnixMs == .max, "\(parsed)")
        // Seconds to milliseconds saturate.
        let cases: [(seconds: Int64, ms: Int64)] = [
            (10_000_000_000_000_000, .max), (.max, .max), (.min, .min), (-10_000_000_000_000_000, .min), (-9_000_000_000_000_000, -9_000_000_000_000_000_000), (1_700_000_000, 1_700_000_000_000),
        ]
        for (seconds, ms) in cases {
            let r = BuildbotCommands.result(1, [.stat([0o100644, 0, 0, 1, 0, 0, 5, 0, seconds, 0]), .rc(0)], failure: nil, interrupted: false, root: "/w", kind: stat.kind)
            #expect(r.stat.exists && r.stat.mtimeUnixMs == ms, "\(seconds) s")
        }
    }

    @Test func limitsBeyondInt64AreHeldToItsRange() throws {
        var upload = Parley_Work_V1_Command()
        upload.upload.path = "a.bin"
        upload.upload.maxSize = .max
        let u = try BuildbotCommands.translate(upload, root: "/w")
        #expect(u.args["maxsize"] == MessagePack.int(.max) && u.limit == .max)
        var tree = Parley_Work_V1_Command()
        tree.uploadDirectory.path = "out"
        tree.uploadDirectory.maxSize = 1 << 63
        let d = try BuildbotCommands.translate(tree, root: "/w")
        #expect(d.args["maxsize"] == MessagePack.int(.max) && d.limit == 1 << 63)

        // A job's max_output_bytes: held to the largest tail a report carries.
        var spec = Parley_Work_V1_JobSpec()
        spec.maxOutputBytes = .max
        #expect(WorkService.tailLimit(spec, fallback: 0) == WorkService.maxTail)
        spec.maxOutputBytes = 1 << 40
        #expect(WorkService.tailLimit(spec, fallback: 0) == WorkService.maxTail)
        spec.maxOutputBytes = 10
        #expect(WorkService.tailLimit(spec, fallback: 0) == 10)
        spec.maxOutputBytes = 0
        #expect(WorkService.tailLimit(spec, fallback: .max) == WorkService.maxTail)
        #expect(WorkService.tailLimit(spec, fallback: 100) == 100)
    }

    @Test func aDownloadLimitedToUInt64MaxReads() async throws {
        var download = Parley_Work_V1_Command()
        download.download.path = "in.bin"
        download.download.maxSize = .max
        let limit = try BuildbotCommands.translate(download, root: "/w").limit
        #expect(limit == .max)
        let bytes: [UInt8] = Array(0..<100)
        let adapter = BuildbotTransferAdapter(command: 1, transfer: BytesTransfer(bytes: bytes), limit: limit)
        let first = try await adapter.read(length: 64)
        let second = try await adapter.read(length: 64)
        let third = try await adapter.read(length: 64)
        #expect(first == Array(bytes[0..<64]) && second == Array(bytes[64...]) && third.isEmpty)
        #expect(adapter.moved.0 == 100)
        // Below the length, one byte past the room still tells a download over its limit.
        let small = BuildbotTransferAdapter(command: 1, transfer: BytesTransfer(bytes: bytes), limit: 10)
        await #expect(throws: BuildbotProtocolError.self) { _ = try await small.read(length: 64) }
    }

    @Test func uploadTimesThatAreNoTimesAreRefused() async throws {
        let path = testScratchPath("bb-times-\(UUID().uuidString.prefix(8))")
        try Data("x".utf8).write(to: URL(fileURLWithPath: path))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let file = WorkFileTransfer(path: path)
        let adapter = BuildbotTransferAdapter(command: 1, transfer: file, limit: 10)
        for bad in [Double.nan, .infinity, -Double.infinity, 1e300, -1e300] {
            await #expect(throws: BuildbotProtocolError.self) { try await adapter.setTimes(access: 0, modified: bad) }
            await #expect(throws: BuildbotProtocolError.self) { try await adapter.setTimes(access: bad, modified: 0) }
            await #expect(throws: WorkFiles.FileError.self) { try await file.setTimes(command: 1, access: bad, modified: 0) }
            await #expect(throws: WorkFiles.FileError.self) { try await file.setTimes(command: 1, access: 0, modified: bad) }
        }
        // Seconds whose milliseconds are beyond Int64 (the result's mtime_unix_ms).
        await #expect(throws: BuildbotProtocolError.self) { try await adapter.setTimes(access: 0, modified: 9.3e15) }
        #expect(adapter.modified == nil)
        try await adapter.setTimes(access: 1_700_000_000.25, modified: 1_600_000_000.5)
        #expect(adapter.modified == 1_600_000_000.5)
        let modified = try #require(try FileManager.default.attributesOfItem(atPath: path)[.modificationDate] as? Date)
        #expect(abs(modified.timeIntervalSince1970 - 1_600_000_000.5) < 0.001, "\(modified)")
    }

    @Test func aCommandsUpdatesAreKeptBounded() {
        var kept = BuildbotKeptUpdates()
        let lines = String(repeating: "y\n", count: 512)
        for _ in 0..<2_000 {
            kept.add([.stdout(lines), .stderr(lines), .header(lines), .log(name: "build", text: lines), .elapsed(1), .other("x")])
        }
        kept.add([.failureReason("first"), .rc(3)])
        kept.add([.header("process killed by signal 9\n"), .failureReason("second"), .rc(-1), .stat([1, 2]), .files(["/w/a"])])
        let updates = kept.updates
        #expect(updates.allSatisfy { update in
            switch update {
            case .stdout, .log, .elapsed, .other, .stat: return false
            default: return true
            }
        }, "\(updates.count) updates")
        #expect(BuildbotCommands.header(updates).utf8.count <= BuildbotKeptUpdates.textLimit)
        let stderr = updates.compactMap { if case .stderr(let e) = $0 { return e } else { return nil } }.joined()
        #expect(stderr.utf8.count <= BuildbotKeptUpdates.textLimit && stderr.hasSuffix("y\n"))
        #expect(BuildbotCommands.signal(in: updates) == 9)
        #expect(BuildbotWorkerSession.reason(updates) == "first")
        #expect(updates.contains(.rc(-1)) && !updates.contains(.rc(3)) && updates.contains(.files(["/w/a"])))
        var shell = Parley_Work_V1_Command()
        shell.shell.argv = ["yes"]
        let result = BuildbotCommands.result(1, updates, failure: nil, interrupted: false, root: "/w", kind: shell.kind)
        #expect(result.signal == 9 && result.exitStatus == -1)
    }
}
