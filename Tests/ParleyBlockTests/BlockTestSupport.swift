import Foundation
import Parley
import ParleyTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A scratch directory removed when the value is dropped (tests keep it for their duration).
final class ScratchDirectory: @unchecked Sendable {
    let path: String
    init(_ label: String = "block") throws {
        let base = URL(fileURLWithPath: testScratchPath("parley-\(label)-\(UUID().uuidString.prefix(8))"))
        try FileManager.default.createDirectory(at: base, withIntermediateDirectories: true)
        self.path = base.path
    }
    func file(_ name: String) -> String { self.path + "/" + name }
    deinit { try? FileManager.default.removeItem(atPath: self.path) }

    /// A sparse file of `size` bytes.
    @discardableResult
    func sparseFile(_ name: String, size: Int) throws -> String {
        let p = self.file(name)
        #expect(FileManager.default.createFile(atPath: p, contents: nil))
        let fd = open(p, O_RDWR)
        defer { close(fd) }
        #expect(ftruncate(fd, off_t(size)) == 0)
        return p
    }
}

typealias ToolOutput = ProcessOutput

enum Tools {
    /// The `parley` executable next to the test bundle (or in .build/debug).
    static var parley: String {
        get throws {
            try #require(parleyExecutablePath(), "parley executable not built")
        }
    }

    /// A third-party program the interop tests need; `.ci/run` installs them.
    static func require(_ name: String, package: String) throws -> String {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        let found = path.split(separator: ":").map { "\($0)/\(name)" }.first { FileManager.default.isExecutableFile(atPath: $0) }
        return try #require(found, "\(name) is not installed: apt-get install \(package) (.ci/run does)")
    }

    /// Runs a program to completion, bounded by `seconds` (killed by PID after that).
    static func run(_ executable: String, _ arguments: [String], seconds: Double = 120) async throws -> ToolOutput {
        try await runProcess(executable, arguments, seconds: seconds)
    }
}

/// `parley block serve` as a real process, on a Unix socket and an ephemeral TCP port for
/// each protocol; stopped by PID.
final class BlockServerProcess: @unchecked Sendable {
    let process = Process()
    let logPath: String
    let nbdSocket: String
    let blockSocket: String
    private(set) var nbdPort = 0
    private(set) var blockPort = 0
    private(set) var metricsPort = 0

    init(scratch: ScratchDirectory, arguments: [String], metrics: Bool = false) async throws {
        self.logPath = scratch.file("server-\(UUID().uuidString.prefix(6)).log")
        self.nbdSocket = scratch.file("nbd.sock")
        self.blockSocket = scratch.file("block.sock")
        _ = FileManager.default.createFile(atPath: self.logPath, contents: nil)
        self.process.executableURL = URL(fileURLWithPath: try Tools.parley)
        var args = ["block", "serve", "--nbd", "127.0.0.1:0", "--nbd", "unix:\(self.nbdSocket)",
                    "--listen", "127.0.0.1:0", "--listen", "unix:\(self.blockSocket)", "--log-level", "debug"]
        if metrics { args += ["--metrics", "127.0.0.1:0"] }
        self.process.arguments = args + arguments
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: self.logPath))
        self.process.standardOutput = log
        self.process.standardError = log
        self.process.standardInput = FileHandle.nullDevice
        try self.process.run()
        // The "block server listening" line names the bound addresses.
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline {
            let text = self.log
            if let line = text.split(separator: "\n").first(where: { $0.contains("block server listening") }) {
                self.nbdPort = Self.port(in: String(line), key: "nbd=")
                self.blockPort = Self.port(in: String(line), key: "parley=")
                if metrics { self.metricsPort = Self.port(in: String(line), key: "metrics=") }
                return
            }
            if !self.process.isRunning { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        self.stop(signal: SIGKILL)
        Issue.record("parley block serve did not start: \(self.log)")
        throw CancellationError()
    }

    /// The first 127.0.0.1 port after `key` in a log line.
    static func port(in line: String, key: String) -> Int {
        guard let r = line.range(of: key) else { return 0 }
        let rest = line[r.upperBound...]
        guard let a = rest.range(of: "127.0.0.1") else { return 0 }
        let digits = rest[a.upperBound...].drop { !$0.isNumber }.prefix { $0.isNumber }
        return Int(digits) ?? 0
    }

    var log: String { String(decoding: FileManager.default.contents(atPath: self.logPath) ?? Data(), as: UTF8.self) }
    var nbdURI: String { "nbd://127.0.0.1:\(self.nbdPort)" }
    func nbdUnixURI(_ export: String) -> String { "nbd+unix:///\(export)?socket=\(self.nbdSocket)" }
    var isRunning: Bool { self.process.isRunning }

    /// Stops the server by PID and returns its exit status.
    @discardableResult
    func stop(signal: Int32 = SIGTERM, seconds: Double = 20) -> Int32 {
        stopProcessBlocking(self.process, signal: signal, grace: seconds)
        return self.process.terminationStatus
    }

    deinit { if self.process.isRunning { kill(self.process.processIdentifier, SIGKILL) } }
}

/// A blocking socket with a receive timeout (30 s: a suite of 600 tests on two cores stalls
/// a server for over 10 s at times), for speaking raw NBD (or anything) in tests.
final class RawSocket {
    let fd: Int32

    init(unixPath: String) throws {
        self.fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in unixPath.utf8.prefix(raw.count - 1).enumerated() { raw[i] = b }
        }
        let r = withUnsafePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(self.fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        try #require(r == 0, "connect to \(unixPath): errno \(errno)")
        self.setTimeout(30)
    }

    init(port: Int) throws {
        self.fd = try connectLoopback(port: port, timeoutSeconds: 30)
    }

    func setTimeout(_ seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(self.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(self.fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Sends everything; false if the peer has gone.
    @discardableResult
    func send(_ bytes: [UInt8]) -> Bool {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(self.fd, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return false }
            done += n
        }
        return true
    }

    /// Exactly `count` bytes, or nil on end of stream, error or timeout.
    func receive(_ count: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = out.withUnsafeMutableBytes { recv(self.fd, $0.baseAddress! + done, count - done, 0) }
            if n <= 0 { return nil }
            done += n
        }
        return out
    }

    /// Half-closes: the peer sees the end of the stream.
    func shutdownWrite() { _ = Glibc.shutdown(self.fd, Int32(SHUT_WR)) }

    /// Reads until the peer closes (bounded by the timeout); true if it closed.
    func waitForClose() -> Bool {
        var buf = [UInt8](repeating: 0, count: 65536)
        for _ in 0..<10_000 {
            let n = buf.withUnsafeMutableBytes { recv(self.fd, $0.baseAddress!, 65536, 0) }
            if n == 0 { return true }
            if n < 0 { return errno == ECONNRESET }
        }
        return false
    }

    deinit { close(self.fd) }
}

/// Big-endian byte building and reading for raw NBD.
struct Bytes {
    var data: [UInt8] = []
    mutating func u16(_ v: UInt16) { self.data += withUnsafeBytes(of: v.bigEndian, Array.init) }
    mutating func u32(_ v: UInt32) { self.data += withUnsafeBytes(of: v.bigEndian, Array.init) }
    mutating func u64(_ v: UInt64) { self.data += withUnsafeBytes(of: v.bigEndian, Array.init) }
    mutating func string(_ s: String) { self.data += Array(s.utf8) }

    static func u16(_ b: [UInt8], _ at: Int) -> UInt16 { UInt16(b[at]) << 8 | UInt16(b[at + 1]) }
    static func u32(_ b: [UInt8], _ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 << 8 | UInt32(b[at + $1]) } }
    static func u64(_ b: [UInt8], _ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 << 8 | UInt64(b[at + $1]) } }
}

/// A minimal raw NBD client: fixed newstyle, optional structured replies, NBD_OPT_GO.
struct RawNBD {
    let socket: RawSocket
    var structured = false

    /// The client's side of the handshake up to and including the option header; returns
    /// the option reply type of GO (1 = ACK: transmission; otherwise an error) and the message.
    static func connect(_ socket: RawSocket, export: String, structured: Bool = false) throws -> (RawNBD, UInt32, String) {
        let greeting = try #require(socket.receive(18), "no NBD greeting")
        #expect(Bytes.u64(greeting, 0) == 0x4e42_444d_4147_4943)
        var b = Bytes()
        b.u32(3)  // fixed newstyle, no zeroes
        if structured {
            b.u64(0x4948_4156_454f_5054); b.u32(8); b.u32(0)
        }
        // NBD_OPT_GO asking for NBD_INFO_BLOCK_SIZE (this client honours block sizes).
        b.u64(0x4948_4156_454f_5054); b.u32(7); b.u32(UInt32(4 + export.utf8.count + 4))
        b.u32(UInt32(export.utf8.count)); b.string(export); b.u16(1); b.u16(3)
        socket.send(b.data)
        if structured {
            let ack = try #require(socket.receive(20))
            #expect(Bytes.u32(ack, 12) == 1)
        }
        while true {
            let header = try #require(socket.receive(20), "no reply to NBD_OPT_GO")
            let type = Bytes.u32(header, 12)
            let length = Int(Bytes.u32(header, 16))
            let payload = length > 0 ? try #require(socket.receive(length)) : []
            if type == 3 { continue }  // NBD_REP_INFO
            return (RawNBD(socket: socket, structured: structured), type, String(decoding: payload, as: UTF8.self))
        }
    }

    func request(type: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64, length: UInt32, payload: [UInt8] = []) {
        var b = Bytes()
        b.u32(0x2560_9513); b.u16(flags); b.u16(type); b.u64(cookie); b.u64(offset); b.u32(length)
        self.socket.send(b.data + payload)
    }

    /// One simple reply (no structured replies negotiated): error and cookie; `readLength`
    /// data bytes follow a successful read.
    func simpleReply(readLength: Int = 0) throws -> (error: UInt32, cookie: UInt64, data: [UInt8]) {
        try self.simpleReply { _ in readLength }
    }

    /// One simple reply whose data length depends on which request it answers: replies come
    /// in completion order, so a client with several reads in flight knows the length only
    /// from the cookie (`readLength(cookie)`).
    func simpleReply(readLength: (UInt64) -> Int) throws -> (error: UInt32, cookie: UInt64, data: [UInt8]) {
        let h = try #require(self.socket.receive(16), "no reply")
        #expect(Bytes.u32(h, 0) == 0x6744_6698)
        let error = Bytes.u32(h, 4), cookie = Bytes.u64(h, 8)
        let length = error == 0 ? readLength(cookie) : 0
        let data = length > 0 ? try #require(self.socket.receive(length)) : []
        return (error, cookie, data)
    }

    /// One structured chunk: flags, type, cookie, payload.
    func chunk() throws -> (flags: UInt16, type: UInt16, cookie: UInt64, payload: [UInt8]) {
        let h = try #require(self.socket.receive(20), "no reply chunk")
        #expect(Bytes.u32(h, 0) == 0x668e_33ef)
        let length = Int(Bytes.u32(h, 16))
        return (Bytes.u16(h, 4), Bytes.u16(h, 6), Bytes.u64(h, 8), length > 0 ? try #require(self.socket.receive(length)) : [])
    }
}

/// Polls `condition` (bounded: 2,000 tries, 5 ms apart); whether it came true.
func eventually(_ condition: () -> Bool) async throws -> Bool {
    for _ in 0..<2000 {
        if condition() { return true }
        try await Task.sleep(for: .milliseconds(5))
    }
    return condition()
}
