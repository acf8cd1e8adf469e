import Foundation
import NIOCore
import Parley
import ParleyTestSupport
import ParleyWire
import Testing


/// Runs the real `parley` executable, as a user would.
@Suite(.timeLimit(.minutes(2)))
struct CommandTests {
    static var parleyPath: String? { parleyExecutablePath() }

    typealias Output = ProcessOutput

    /// The first executable called `name` on the PATH.
    static func onPath(_ name: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        return path.split(separator: ":").map { "\($0)/\(name)" }.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// Runs `parley` (or `executable`) to completion (bounded by `seconds`; killed by PID after that).
    static func run(_ arguments: [String], executable: String? = nil, stdin: Data? = nil, seconds: Double = 60) async throws -> Output {
        try await runProcess(try executable ?? #require(parleyPath, "parley executable not built"), arguments, stdin: stdin, seconds: seconds)
    }

    /// Starts `parley serve`; stops it by PID (SIGTERM, then SIGKILL) when `body` ends.
    static func withServe<T>(_ arguments: [String], _ body: () async throws -> T) async throws -> (T, Int32) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try #require(parleyPath, "parley executable not built"))
        process.arguments = ["serve"] + arguments
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
        let result = try await body()
        kill(process.processIdentifier, SIGTERM)
        for _ in 0..<500 where process.isRunning { try await Task.sleep(for: .milliseconds(10)) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        return (result, process.terminationStatus)
    }

    static func waitForSocket(_ path: String) async throws {
        for _ in 0..<500 where !FileManager.default.fileExists(atPath: path) { try await Task.sleep(for: .milliseconds(10)) }
    }

    @Test func helpExplainsEverySubcommand() async throws {
        for sub in ["serve", "ping", "send", "decode", "work keygen", "work sign", "work verify"] {
            let out = try await Self.run(sub.split(separator: " ").map(String.init) + ["--help"])
            #expect(out.status == 0)
            #expect(out.stdout.contains("USAGE: parley \(sub)"), "\(out.stdout)")
        }
        let top = try await Self.run(["--help"])
        #expect(top.stdout.contains("serve") && top.stdout.contains("ping") && top.stdout.contains("decode"))
    }

    /// Output to a reader that has gone (`parley conform ADDRESS | head`): the command ends
    /// quietly, killed by SIGPIPE or (once NIO ignores SIGPIPE) with status 141, instead of
    /// crashing in FileHandle.write on the EPIPE.
    @Test func outputToAClosedPipeEndsQuietly() async throws {
        let socket = testScratchPath("pipe.sock")
        _ = try await Self.withServe(["--listen", "unix:\(socket)"]) {
            try await Self.waitForSocket(socket)
            let process = Process()
            process.executableURL = URL(fileURLWithPath: try #require(Self.parleyPath, "parley executable not built"))
            process.arguments = ["conform", "unix:\(socket)"]
            let pipe = Pipe()
            process.standardOutput = pipe
            process.standardError = FileHandle.nullDevice
            try pipe.fileHandleForReading.close()
            try process.run()
            for _ in 0..<3000 where process.isRunning { try await Task.sleep(for: .milliseconds(10)) }
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
            let quiet = (process.terminationReason == .exit && process.terminationStatus == 141)
                || (process.terminationReason == .uncaughtSignal && process.terminationStatus == SIGPIPE)
            #expect(quiet, "ended by \(process.terminationReason == .exit ? "status" : "signal") \(process.terminationStatus)")
        }
    }

    /// `Tests/Interop/python/parley_client.py` was written from docs/protocol.md alone, by
    /// someone who did not read the implementation: it checks that the document is enough to
    /// write a compatible client in another language.
    @Test func independentPythonClientInteroperates() async throws {
        let python = try #require(Self.onPath("python3"), "python3 is needed (.ci/run installs it)")
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Interop/python/parley_client.py").path
        // Its encoder and decoder against every test vector of the document.
        let selfTest = try await Self.run([script, "--self-test"], executable: python)
        #expect(selfTest.status == 0, Comment(rawValue: selfTest.stdout + selfTest.stderr))
        // Against the real server: handshake, Ping, Echo with a data segment, 50 pipelined
        // requests, a stream, a cancelled stream, an unknown type, a one-way message, a
        // KEEPALIVE, the nucleus, and CLOSE.
        let socket = testScratchPath("python.sock")
        let (out, status) = try await Self.withServe(["--listen", "unix:\(socket)", "--message", "hello from swift", "--name", "interop"]) {
            try await Self.waitForSocket(socket)
            return try await Self.run([script, "unix:\(socket)"], executable: python)
        }
        #expect(out.status == 0, Comment(rawValue: out.stdout + out.stderr))
        #expect(out.stdout.contains("OK: every check passed"))
        #expect(out.stdout.contains("hello from swift"))
        #expect(status == 0)
    }

    /// `parley work keygen`, `sign` and `verify`: the project's Ed25519 job-signing key.
    @Test func workKeysSignAndVerify() async throws {
        let dir = freshTestDirectory("work-keys")
        let keygen = try await Self.run(["work", "keygen", "--dir", dir])
        #expect(keygen.status == 0 && keygen.stdout.contains("key id"), "\(keygen.combined)")
        // Through FileManager, not stat(2): which module "defines" struct stat varies from one
        // fresh build to the next (once CDispatch), and MemberImportVisibility wants it named.
        let mode = (try? FileManager.default.attributesOfItem(atPath: dir + "/work.key")[.posixPermissions] as? NSNumber)?.intValue
        #expect(mode == 0o600)
        let again = try await Self.run(["work", "keygen", "--dir", dir])
        #expect(again.status == 2 && again.stdout.contains("not overwriting"))
        let job = dir + "/job.txt"
        try Data("run: swift test\n".utf8).write(to: URL(fileURLWithPath: job))
        let sign = try await Self.run(["work", "sign", "--key", dir + "/work.key", job])
        #expect(sign.status == 0)
        let signature = sign.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let ok = try await Self.run(["work", "verify", "--trust", dir + "/work.pub", "--signature", signature, job])
        #expect(ok.status == 0 && ok.stdout.contains("signature OK"))
        try Data("run: rm -rf /\n".utf8).write(to: URL(fileURLWithPath: job))
        let altered = try await Self.run(["work", "verify", "--trust", dir + "/work.pub", "--signature", signature, job])
        #expect(altered.status == 1 && altered.stdout.contains("does not verify"), "\(altered.combined)")
    }

    @Test func badArgumentsGetClearErrors() async throws {
        let a = try await Self.run(["ping", "no-port-here"])
        #expect(a.status != 0)
        #expect(a.stderr.contains("bad address \"no-port-here\""))
        let b = try await Self.run(["serve", "--listen", "[::1]"])
        #expect(b.status != 0)
        #expect(b.stderr.contains("bad address"))
        let c = try await Self.run(["ping", "unix:" + testScratchPath("nobody-here.sock"), "--count", "1"])
        #expect(c.status == 2)
        #expect(c.stdout.contains("cannot connect"))
    }

    /// `parley serve --handshake-timeout` closes a connection that sends its banner and
    /// nothing more once that time has passed (the default, 30 s, would outlast the test's
    /// 20 s wait), logs why, and refuses a timeout that is not positive. Options in seconds
    /// of several commands refuse values past a year (they used to crash on 1e300).
    @Test func serveClosesAStalledHandshakeAfterItsHandshakeTimeout() async throws {
        // 1e300 used to pass the check and trap when converted to a Duration.
        for bad in ["0", "-1", "nan", "inf", "1e300"] {
            let refused = try await Self.run(["serve", "--handshake-timeout=\(bad)"])
            #expect(refused.status != 0)
            #expect(refused.stderr.contains("--handshake-timeout must be from 0.001 to 31536000 seconds (a year)"), "\(refused.combined)")
        }
        let tiny = try await Self.run(["serve", "--idle-timeout=0.0000001"])
        #expect(tiny.status != 0 && tiny.stderr.contains("--idle-timeout must be 0 (never) or at least 0.001 seconds"), "\(tiny.combined)")
        for option in ["--session-retention", "--shutdown-grace", "--request-delay", "--idle-timeout"] {
            let refused = try await Self.run(["serve", "\(option)=1e300"])
            #expect(refused.status != 0)
            #expect(refused.stderr.contains("\(option) must be from 0 to 31536000 seconds (a year)"), "\(refused.combined)")
        }
        let send = try await Self.run(["send", "127.0.0.1:9", "--keepalive-timeout=1e300"])
        #expect(send.status != 0 && send.stderr.contains("--keepalive-timeout must be from 0.001 to 31536000 seconds"), "\(send.combined)")
        let chaos = try await Self.run(["chaos", "--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--jitter", "9223372036854775807"])
        #expect(chaos.status != 0 && chaos.stderr.contains("at most 3600000 milliseconds"), "\(chaos.combined)")
        let server = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--handshake-timeout", "0.3"])
        var banner = ByteBuffer()
        banner.writeBanner(Banner(supported: .implemented))
        let peer = try await RawPeer.connect(try ParleyAddress(parsing: server.address))
        let (_, closed) = try await peer.exchange(banner, seconds: 20, halfClose: false)
        #expect(closed, "the server closed the connection whose handshake stalled")
        #expect(try await server.waitForLog("handshake did not complete within 0.30 s"), "\(server.log)")
        #expect(await server.stop() == 0)
    }

    /// `parley serve --idle-timeout` closes a connection whose client did not negotiate
    /// keepalive once it has been idle that long, with CLOSE `timeout`, and logs it.
    @Test func serveClosesAnIdleConnectionWithoutKeepalive() async throws {
        let server = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--idle-timeout", "0.3"])
        let peer = try await RawPeer.connect(try ParleyAddress(parsing: server.address))
        let (reply, closed) = try await peer.exchange(
            clientSessionBytes(features: ParleyFeatures.implemented.subtracting(.keepalive), messages: []), seconds: 20, halfClose: false
        )
        #expect(closed, "the server closed the idle connection")
        let close = try #require(frames(in: reply).last)
        #expect(close.tag == .close)
        #expect(try await server.waitForLog("closing an idle connection"), "\(server.log)")
        #expect(await server.stop() == 0)
    }

    /// Files that cannot be read or written end a command with an error naming them, not a
    /// crash (Foundation's non-throwing FileHandle calls trap on an I/O error): standard input
    /// that is a directory, a capture file on a full device, an execution log that cannot
    /// seek (a FIFO); and `work submit --count` too large to build is refused.
    @Test func unreadableAndUnwritableFilesAreErrorsNotCrashes() async throws {
        let parley = try #require(Self.parleyPath, "parley executable not built")
        /// The status the shell saw: 128 + N for a process killed by signal N.
        func status(_ output: Output) -> Int? {
            output.stdout.split(separator: "\n").last { $0.hasPrefix("status=") }.flatMap { Int($0.dropFirst("status=".count)) }
        }
        let decode = try await Self.run(["-c", "'\(parley)' decode < /; echo status=$?"], executable: "/bin/sh")
        #expect((1...127).contains(status(decode) ?? 0), "\(decode.combined)")
        #expect(decode.stderr.contains("cannot read standard input"), "\(decode.combined)")

        // /dev/full refuses every write (ENOSPC). The capture opens it in place: it used to be
        // created afresh, which (as root) replaced the device with a regular file.
        func isCharacterDevice(_ path: String) -> Bool {
            (try? FileManager.default.attributesOfItem(atPath: path)[.type] as? FileAttributeType) == .typeCharacterSpecial
        }
        if isCharacterDevice("/dev/full") {
            let socket = testScratchPath("full.sock")
            let (ping, _) = try await Self.withServe(["--listen", "unix:\(socket)"]) {
                try await Self.waitForSocket(socket)
                return try await Self.run(["-c", "'\(parley)' ping unix:\(socket) --count 1 --capture-in /dev/full; echo status=$?"], executable: "/bin/sh")
            }
            #expect((1...127).contains(status(ping) ?? 0), "\(ping.combined)")
            #expect(ping.combined.contains("cannot write the capture file /dev/full"), "\(ping.combined)")
            #expect(isCharacterDevice("/dev/full"), "the capture left /dev/full a device")
        }

        // A capture into a FIFO nobody reads fails at once (it used to block the event loop).
        let unread = testScratchPath("capture-\(UUID().uuidString.prefix(8)).fifo")
        #expect(mkfifo(unread, 0o600) == 0)
        let fifoSocket = testScratchPath("fifo.sock")
        let (fifoPing, _) = try await Self.withServe(["--listen", "unix:\(fifoSocket)"]) {
            try await Self.waitForSocket(fifoSocket)
            return try await Self.run(["ping", "unix:\(fifoSocket)", "--count", "1", "--capture-in", unread], seconds: 20)
        }
        #expect(fifoPing.status != 0 && fifoPing.combined.contains("cannot write the capture file \(unread)"), "\(fifoPing.combined)")

        let fifo = testScratchPath("execution-\(UUID().uuidString.prefix(8)).fifo")
        #expect(mkfifo(fifo, 0o600) == 0)
        let reader = Process()
        reader.executableURL = URL(fileURLWithPath: "/bin/sh")
        reader.arguments = ["-c", "cat '\(fifo)' > /dev/null"]
        try reader.run()
        defer { kill(reader.processIdentifier, SIGKILL); reader.waitUntilExit() }
        let server = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--execution-log", fifo])
        #expect(await server.stop() == 0, "\(server.log)")

        let submit = try await Self.run(["work", "submit", "--key", "/nonexistent", "--count", "1000000000000", "--", "true"])
        #expect(submit.status != 0 && submit.stderr.contains("--count must be from 1 to 100000"), "\(submit.combined)")
    }

    /// `--max-connections`: one connection more than that is closed as soon as it is
    /// accepted (and logged); once one closes, another is served.
    @Test func serveClosesConnectionsBeyondItsMaximum() async throws {
        let server = try await ServeProcess.start(["--listen", "127.0.0.1:0", "--max-connections", "2"])
        let address = try ParleyAddress(parsing: server.address)
        let first = try await ParleyClient.connect(to: address)
        let second = try await ParleyClient.connect(to: address)
        await #expect(throws: ParleyError.self, "a third connection") { _ = try await ParleyClient.connect(to: address) }
        #expect(try await server.waitForLog("connection refused: 2 connections already"), "\(server.log)")
        first.close()
        // The server notices the close a moment later.
        var fourth: ParleyClient?
        for _ in 0..<50 where fourth == nil {
            fourth = try? await ParleyClient.connect(to: address)
            if fourth == nil { try await Task.sleep(for: .milliseconds(100)) }
        }
        #expect(fourth != nil, "a connection once one had closed")
        second.close()
        fourth?.close()
        #expect(await server.stop() == 0)
        let refused = try await Self.run(["serve", "--max-connections", "0"])
        #expect(refused.status != 0 && refused.stderr.contains("--max-connections must be at least 1"), "\(refused.combined)")
    }

    @Test func serveAndPingAndDecodeARecordedSession() async throws {
        let socket = testScratchPath("cli.sock")
        let captureIn = testScratchPath("session.in"), captureOut = testScratchPath("session.out")
        let (ping, status) = try await Self.withServe(["--listen", "unix:\(socket)", "--high-message", "be nice", "--name", "cli-test"]) {
            try await Self.waitForSocket(socket)
            return try await Self.run(["ping", "unix:\(socket)", "--count", "5", "--capture-in", captureIn, "--capture-out", captureOut])
        }
        #expect(status == 0, "serve exits cleanly on SIGTERM")
        #expect(ping.status == 0, Comment(rawValue: ping.stdout + ping.stderr))
        #expect(ping.stdout.contains("protocol version 1 (server 1)"))
        #expect(ping.stdout.contains("auth none"))
        #expect(ping.stdout.contains("[streams, keepalive, notice, dataSegment, direct]"))
        #expect(ping.stdout.contains("server message [high] be nice"))
        #expect(ping.stdout.contains("name \"cli-test\""))
        #expect(ping.stdout.contains("5 round trips to unix:\(socket): min/median/p99 = "))

        // What the client sent: banner, HELLO, AUTH_REQUEST, CLIENT_IDENT, five Ping requests.
        let sent = try await Self.run(["decode", captureOut])
        #expect(sent.status == 0, Comment(rawValue: sent.stdout))
        let lines = sent.stdout.split(separator: "\n")
        #expect(lines.first?.contains("element=banner version=1") == true)
        #expect(lines.filter { $0.contains("tag=MESSAGE") && $0.contains("kind=REQUEST type=parley.echo.v1.Ping") }.count == 5)
        #expect(lines.contains { $0.contains("tag=CLIENT_IDENT") && $0.contains("\"implementation\":\"parley-swift\"") })
        #expect(lines.contains { $0.contains("seq=5 ack=4 id=5") })

        // What the server sent, as JSON Lines from standard input.
        let received = try await Self.run(["decode", "--json"], stdin: try Data(contentsOf: URL(fileURLWithPath: captureIn)))
        #expect(received.status == 0)
        let objects = try received.stdout.split(separator: "\n").map {
            try #require(try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any], "not a JSON object: \($0)")
        }
        #expect(objects.compactMap { $0["tag"] as? String }.prefix(3) == ["HELLO", "AUTH_DONE", "SERVER_IDENT"])
        let pongs = objects.filter { ($0["type"] as? String) == "parley.echo.v1.Pong" }
        #expect(pongs.count == 5)
        #expect((pongs.last?["payload"] as? [String: Any])?["serverName"] as? String == "cli-test")
        let ident = try #require(objects.first { ($0["tag"] as? String) == "SERVER_IDENT" }?["payload"] as? [String: Any])
        let messages = (ident["nucleus"] as? [String: Any])?["messages"] as? [[String: Any]]
        #expect(messages?.first?["text"] as? String == "be nice")
    }

    @Test func decodeNamesTheFirstBadByte() async throws {
        var bytes = [UInt8]("PARLEY\r\n".utf8) + [1, 0, 0, 0] + [UInt8](repeating: 0, count: 20)
        bytes[10] = 0
        let out = try await Self.run(["decode"], stdin: Data(bytes))
        #expect(out.status == 1)
        #expect(out.stdout.contains("badPreambleCRC") && out.stdout.contains("offset=0"))
        let trunc = try await Self.run(["decode"], stdin: Data("PARL".utf8))
        #expect(trunc.status == 1)
        #expect(trunc.stdout.contains("truncated"))
    }

    /// Ids, seq, ack and timestamps are u64: decode prints them exactly, however large
    /// (it once printed them through a Double, and crashed from 2^63 - 512 on).
    @Test func decodePrintsLargeIntegersExactlyAndDoesNotCrash() async throws {
        var bytes = ByteBuffer()
        let big = WireMessage(
            header: MessageHeader(seq: UInt64.max, ack: UInt64.max - 1, id: 9_223_372_036_854_775_300, kind: .request, type: "t.X"),
            payload: ByteBuffer()
        )
        var parts: [ByteBuffer] = []
        big.encodeFrame(into: &parts, allocator: ByteBufferAllocator())
        for var p in parts { bytes.writeBuffer(&p) }
        var stamp = ByteBuffer()
        stamp.writeInteger(UInt64(1_700_000_000_123_456_789), endianness: .little)
        bytes.writeFrame(Frame(tag: .keepalive, segments: [stamp]))
        let out = try await Self.run(["decode", "--no-banner"], stdin: Data(bytes.readableBytesView))
        #expect(out.status == 0, "\(out.stdout)\(out.stderr)")
        #expect(out.stdout.contains("seq=18446744073709551615"))
        #expect(out.stdout.contains("ack=18446744073709551614"))
        #expect(out.stdout.contains("id=9223372036854775300"))
        #expect(out.stdout.contains("timestamp=1700000000123456789"))
        let json = try await Self.run(["decode", "--no-banner", "--json"], stdin: Data(bytes.readableBytesView))
        #expect(json.stdout.contains("\"seq\":18446744073709551615"))
    }

    /// A DIRECT frame is shown with its id, the service's header bytes and its data's size.
    @Test func decodeShowsDirectFrames() async throws {
        var f = DirectFrame(allocator: ByteBufferAllocator(), id: 18_446_744_073_709_551_000, headerLength: 4, dataLength: 3)
        f.setHeader(UInt32(0x0403_02ff), at: 8)
        f.writeData(ByteBuffer(bytes: [7, 7, 7]))
        let out = try await Self.run(["decode", "--no-banner"], stdin: Data(f.finishCRC().readableBytesView))
        #expect(out.status == 0, "\(out.stdout)\(out.stderr)")
        #expect(out.stdout.contains("tag=DIRECT") && out.stdout.contains("id=18446744073709551000"), "\(out.stdout)")
        #expect(out.stdout.contains("ff 02 03 04") && out.stdout.contains("3 bytes"), "\(out.stdout)")
    }
}
