import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Parley
import ParleyServices
import ParleyTestSupport
import ParleyWire
import ServiceLifecycle
import Testing

let quietLogger: Logger = {
    var l = Logger(label: "test")
    l.logLevel = .critical
    return l
}()

/// Runs a server on the given addresses (port 0 by default) for the duration of `body`,
/// then shuts it down gracefully and waits for it to stop.
///
/// Tests that flood their server (the mutation tests) give it an event-loop group of its own,
/// so that their bursts do not hold the shared loops other tests' connections run on.
func withServer<T>(
    listen: [ParleyAddress] = [.tcp(host: "127.0.0.1", port: 0)],
    configure: (inout ParleyServer.Configuration) -> Void = { _ in },
    router: ParleyRouter = EchoService.router(),
    logger: Logger = quietLogger,
    group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
    _ body: (ParleyServer, [ParleyAddress]) async throws -> T
) async throws -> T {
    var configuration = ParleyServer.Configuration(listen: listen)
    configure(&configuration)
    let server = ParleyServer(configuration: configuration, router: router, logger: logger, group: group)
    let task = Task { try await server.run() }
    do {
        let addresses = try await server.listeningAddresses
        let result = try await body(server, addresses)
        server.shutDown()
        try await task.value
        return result
    } catch {
        server.shutDown()
        _ = try? await task.value
        throw error
    }
}

func ping(_ client: ParleyClient, _ n: UInt64) async throws -> UInt64 {
    var p = Parley_Echo_V1_Ping()
    p.sequence = n
    return try await client.request(p, as: Parley_Echo_V1_Pong.self).sequence
}

/// Waits for `condition` to hold, polling every 10 ms, at most `seconds`.
func eventually(seconds: Double = 60, _ condition: () async -> Bool) async throws -> Bool {
    let deadline = ContinuousClock.now.advanced(by: .milliseconds(Int64(seconds * 1000)))
    while ContinuousClock.now < deadline {
        if await condition() { return true }
        try await Task.sleep(for: .milliseconds(10))
    }
    return await condition()
}

/// A counter shared with handlers.
final class Counter: Sendable {
    private let value = NIOLockedValueBox(0)
    @discardableResult func increment() -> Int { self.value.withLockedValue { $0 += 1; return $0 } }
    var count: Int { self.value.withLockedValue { $0 } }
}

/// A one-shot signal a handler can raise and a test can await with a bound.
final class Signal: Sendable {
    private let state = NIOLockedValueBox<(raised: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))
    func raise() {
        let waiters = self.state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
            s.raised = true
            defer { s.waiters = [] }
            return s.waiters
        }
        waiters.forEach { $0.resume() }
    }
    var isRaised: Bool { self.state.withLockedValue { $0.raised } }
    func wait(seconds: Double) async -> Bool {
        (try? await eventually(seconds: seconds) { self.isRaised }) ?? false
    }
}

/// Raw bytes over TCP or a Unix socket, for peers that speak the protocol by hand.
final class RawPeer: Sendable {
    let channel: NIOAsyncChannel<ByteBuffer, ByteBuffer>

    init(channel: NIOAsyncChannel<ByteBuffer, ByteBuffer>) { self.channel = channel }

    static func connect(_ address: ParleyAddress) async throws -> RawPeer {
        let bootstrap = ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelOption(.allowRemoteHalfClosure, value: true)
        let initializer: @Sendable (any Channel) -> EventLoopFuture<NIOAsyncChannel<ByteBuffer, ByteBuffer>> = { channel in
            channel.eventLoop.makeCompletedFuture {
                try NIOAsyncChannel(wrappingChannelSynchronously: channel, configuration: .init(isOutboundHalfClosureEnabled: true))
            }
        }
        switch address.kind {
        case .tcp(let host, let port), .tls(let host, let port), .webSocket(let host, let port, _, _):
            // Raw bytes to the TCP port, whatever the server expects there.
            return RawPeer(channel: try await bootstrap.connect(host: host, port: port, channelInitializer: initializer))
        case .unix(let path):
            return RawPeer(channel: try await bootstrap.connect(unixDomainSocketPath: path, channelInitializer: initializer))
        case .inProcess:
            throw ParleyError(code: .invalidArgument, message: "RawPeer needs a socket address")
        }
    }

    /// Writes `bytes` (in pieces of `pieces` bytes with `pause` in between, if given),
    /// half-closes, and collects everything the server sends until it closes, at most
    /// `seconds`. Returns the bytes and whether the server closed in time.
    func exchange(
        _ bytes: ByteBuffer, pieces: Int? = nil, pause: Duration = .zero, seconds: Double = 10, halfClose: Bool = true,
        until done: @escaping @Sendable (ByteBuffer) -> Bool = { _ in false }
    ) async throws -> (ByteBuffer, closed: Bool) {
        try await self.channel.executeThenClose { inbound, outbound in
            if let pieces {
                var rest = bytes
                while let piece = rest.readSlice(length: min(pieces, rest.readableBytes)), piece.readableBytes > 0 {
                    try? await outbound.write(piece)
                    if pause > .zero { try await Task.sleep(for: pause) }
                }
            } else {
                try? await outbound.write(bytes)
            }
            if halfClose { outbound.finish() }
            return try await withThrowingTaskGroup(of: (ByteBuffer, Bool).self) { group in
                group.addTask {
                    var received = ByteBuffer()
                    do {
                        for try await var chunk in inbound {
                            received.writeBuffer(&chunk)
                            if done(received) { break }
                        }
                    } catch {}
                    return (received, true)
                }
                group.addTask {
                    // In ticks of 100 ms, not one sleep: when the test process stalls (both
                    // of the pool's threads held by other tests of a parallel run), a single
                    // sleep can end together with a close that came long before, and win.
                    for _ in 0..<max(1, Int(seconds * 10)) { try await Task.sleep(for: .milliseconds(100)) }
                    return (ByteBuffer(), false)
                }
                let first = try await group.next()!
                group.cancelAll()
                return first
            }
        }
    }
}

/// The bytes a client sends in a whole session: banner, HELLO, AUTH_REQUEST, CLIENT_IDENT,
/// then the given messages (seq numbered from 1).
func clientSessionBytes(
    features: ParleyFeatures = .implemented, messages: [WireMessage], extraFrames: [Frame] = [], identPrefix: [Frame] = [], trailingFrames: [Frame] = []
) -> ByteBuffer {
    var b = ByteBuffer()
    b.writeBanner(Banner(supported: features))
    var hello = Parley_V1_Hello()
    hello.entityType = .client
    hello.peerAddress = "127.0.0.1:7420"
    b.writeFrame(hello.frame(tag: .hello))
    var auth = Parley_V1_AuthRequest()
    auth.method = "none"
    auth.offeredMethods = ["none"]
    b.writeFrame(auth.frame(tag: .authRequest))
    var ident = Parley_V1_ClientIdent()
    ident.platform = "test"
    ident.implementation = "raw-peer"
    ident.version = "1.0.0"
    for f in identPrefix { b.writeFrame(f) }
    b.writeFrame(ident.frame(tag: .clientIdent))
    for f in extraFrames { b.writeFrame(f) }
    var session = SessionStateMachine(role: .client, features: features)
    for m in messages { b.writeFrame(try! session.frame(for: m, allocator: ByteBufferAllocator())) }
    for f in trailingFrames { b.writeFrame(f) }
    return b
}

func pingMessage(id: UInt64) -> WireMessage {
    var p = Parley_Echo_V1_Ping()
    p.sequence = id
    return WireMessage(header: MessageHeader(id: id, kind: .request, type: Parley_Echo_V1_Ping.protoMessageName), payload: p.parleyPayload())
}

/// Decodes what a server sent back into frames (ignoring a truncated tail).
func frames(in bytes: ByteBuffer) -> [Frame] {
    var decoder = WireDecoder()
    var b = bytes
    var out: [Frame] = []
    while let e = try? decoder.decode(buffer: &b) {
        if case .frame(let f) = e { out.append(f) }
    }
    return out
}

// MARK: - Real processes and keyrings (secure-mode tests)

/// A `parley serve` process started by a test: its stderr (the server's log) goes to a file,
/// its listening address is read from the "listening" log line (start it on port 0), and it
/// is stopped by PID (SIGTERM, then SIGKILL) by `stop()` or, failing that, when released.
final class ServeProcess {
    let process: Process
    let logPath: String
    /// The first address the server logged, e.g. `127.0.0.1:40123` or `tls://127.0.0.1:40123`.
    private(set) var address = ""

    private init(process: Process, logPath: String) {
        self.process = process
        self.logPath = logPath
    }

    deinit {
        if self.process.isRunning { kill(self.process.processIdentifier, SIGKILL) }
    }

    /// The server's log so far.
    var log: String { String(decoding: FileManager.default.contents(atPath: self.logPath) ?? Data(), as: UTF8.self) }

    /// Starts `parley serve ARGUMENTS` (or another subcommand that serves, `command`) and
    /// waits (at most `seconds`) until it listens.
    static func start(_ arguments: [String], command: [String] = ["serve"], seconds: Double = 30) async throws -> ServeProcess {
        let parley = try #require(parleyExecutablePath(), "parley executable not built")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: parley)
        process.arguments = command + arguments
        let logPath = testScratchPath("serve-\(UUID().uuidString.prefix(8)).log")
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        process.standardOutput = FileHandle.nullDevice
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let serve = ServeProcess(process: process, logPath: logPath)
        let deadline = ContinuousClock.now.advanced(by: .milliseconds(Int64(seconds * 1000)))
        while ContinuousClock.now < deadline, process.isRunning {
            if let range = serve.log.range(of: #"addresses=\["([^"]+)""#, options: .regularExpression) {
                serve.address = String(serve.log[range].dropFirst("addresses=[\"".count).dropLast())
                return serve
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        let log = serve.log
        _ = await serve.stop()
        throw ParleyError(code: .connectFailed, message: "parley serve \(arguments) did not start listening: \(log)")
    }

    /// The log's length now: pass it to `waitForLog(after:)` to look only at what comes later.
    var logMark: Int { self.log.utf8.count }

    /// Waits (at most `seconds`) until the log, from byte `after` on, has a line containing
    /// every one of `texts`.
    func waitForLog(_ texts: String..., after mark: Int = 0, seconds: Double = 10) async throws -> Bool {
        try await eventually(seconds: seconds) {
            let log = self.log
            let tail = String(decoding: log.utf8.dropFirst(mark), as: UTF8.self)
            return tail.split(separator: "\n").contains { line in texts.allSatisfy { line.contains($0) } }
        }
    }

    /// Stops the server by PID (SIGTERM, then SIGKILL after 5 s) and returns its exit status.
    @discardableResult
    func stop() async -> Int32 {
        if self.process.isRunning { kill(self.process.processIdentifier, SIGTERM) }
        for _ in 0..<500 where self.process.isRunning { try? await Task.sleep(for: .milliseconds(10)) }
        if self.process.isRunning { kill(self.process.processIdentifier, SIGKILL) }
        self.process.waitUntilExit()
        return self.process.terminationStatus
    }
}

/// Runs the built `parley` with `arguments` to completion (bounded by `seconds`).
func parley(_ arguments: [String], stdin: Data? = nil, seconds: Double = 60) async throws -> ProcessOutput {
    try await runProcess(try #require(parleyExecutablePath(), "parley executable not built"), arguments, stdin: stdin, seconds: seconds)
}

/// A fresh empty directory for one test.
func freshTestDirectory(_ name: String) -> String {
    let dir = testScratchPath("\(name)-\(UUID().uuidString.prefix(8))")
    try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

/// Writes a keyring (mode 0600) with one random key per entity and returns the keys by name.
@discardableResult
func writeKeyring(_ path: String, _ entities: [(name: String, caps: [String])], expires: Date? = nil) throws -> [String: [UInt8]] {
    var keys: [String: [UInt8]] = [:]
    var generator = SystemRandomNumberGenerator()
    let keyring = ParleyKeyring(entities: entities.map { e in
        let key = (0..<32).map { _ in UInt8.random(in: 0...255, using: &generator) }
        keys[e.name] = key
        return ParleyKeyring.Entity(name: e.name, key: key, caps: e.caps, created: Date(), expires: expires)
    })
    try keyring.save(path: path)
    return keys
}

/// Whether `needle` occurs anywhere in `haystack`.
func occurs(_ needle: [UInt8], in haystack: [UInt8]) -> Bool {
    guard !needle.isEmpty, haystack.count >= needle.count else { return needle.isEmpty }
    return (0...(haystack.count - needle.count)).contains { i in haystack[i..<(i + needle.count)].elementsEqual(needle) }
}

/// Runs `body` with an event-loop group of its own (one thread), shut down afterwards.
func withOwnEventLoop<T>(_ body: (any EventLoopGroup) async throws -> T) async throws -> T {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    do {
        let result = try await body(group)
        try await group.shutdownGracefully()
        return result
    } catch {
        try? await group.shutdownGracefully()
        throw error
    }
}
