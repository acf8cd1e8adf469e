import Foundation
import Hummingbird
import Logging
import NIOConcurrencyHelpers
import NIOCore

/// The BOINC front end's HTTP layer (`parley work serve --boinc URL`), on Hummingbird, thin:
/// it maps paths to `BOINCFrontEnd`'s endpoints and bodies to bytes.
///
/// - `GET <base>` (and `index.html`): the master page, listing the scheduler URLs;
/// - `POST` to a scheduler URL's path: the scheduler RPC;
/// - `POST <base>file_upload_handler`: uploads;
/// - `GET <base>download/NAME`: programs and inputs;
/// - `GET <base>get_project_config.php`: the project's name and URL.
///
/// A body over its limit is refused with 413 before it is all read; an upload's file bytes
/// are written as they come (`BOINCFrontEnd.upload(chunks:budget:)`).
public enum BOINCHTTP {
    public static func application(
        host: String, port: Int, frontEnd: BOINCFrontEnd, logger: Logger, onRunning: @escaping @Sendable (Int) async -> Void = { _ in }
    ) -> some ApplicationProtocol {
        let connections = BOINCAllowance(frontEnd.configuration.maxConnections)
        // nil or 0: no cap.
        let peers = frontEnd.configuration.maxConnectionsPerPeer.flatMap { $0 > 0 ? BOINCPeerCounts(limit: $0) : nil }
        let lifetime = TimeAmount(frontEnd.configuration.connectionLifetime)
        return Application(
            // A connection that sends and reads nothing for a minute is closed: one that opens
            // and waits would otherwise hold a file descriptor for ever. One that trickles is
            // closed at the end of its lifetime, and beyond the cap none is kept.
            router: self.router(frontEnd),
            server: .http1(configuration: .init(
                additionalChannelHandlers: [BOINCConnectionLimits(count: connections, peers: peers, lifetime: lifetime, logger: logger)],
                idleTimeout: .seconds(60)
            )),
            configuration: .init(address: .hostname(host, port: port), serverName: "parley-work-boinc"),
            onServerRunning: { channel in
                // Uploads no report can use any more go, while the server runs.
                let interval = frontEnd.configuration.uploadSweepInterval
                let sweeper = Task {
                    while !Task.isCancelled {
                        try? await Task.sleep(for: interval)
                        if Task.isCancelled { return }
                        do {
                            let n = try await frontEnd.sweepUploads()
                            if n > 0 { logger.info("boinc uploads removed: no report can use them", metadata: ["files": "\(n)"]) }
                        } catch {
                            logger.warning("cannot sweep boinc uploads", metadata: ["error": "\(error)"])
                        }
                    }
                }
                channel.closeFuture.whenComplete { _ in sweeper.cancel() }
                await onRunning(channel.localAddress?.port ?? port)
            }, logger: logger
        )
    }

    /// The router alone (tests drive it in process).
    public static func router(_ frontEnd: BOINCFrontEnd) -> Router<BasicRequestContext> {
        let base = Self.path(of: frontEnd.configuration.url)
        let budget = BOINCAllowance(frontEnd.configuration.maxBufferedBodyBytes)
        let schedulers = Set(frontEnd.configuration.schedulerURLs.map(Self.path(of:)))
        let router = Router()
        let get: @Sendable (Request, BasicRequestContext) async throws -> Response = { request, _ in
            let path = request.uri.path
            if path == base || path == base + "index.html" || path == base + "index.php" { return Self.response(frontEnd.masterPage()) }
            if path == base + "get_project_config.php" { return Self.response(frontEnd.projectConfig()) }
            if path.hasPrefix(base + "download/") {
                return Self.response(await frontEnd.download(name: String(path.dropFirst(base.count + "download/".count))))
            }
            return Self.response(.text(404, "not found"))
        }
        let post: @Sendable (Request, BasicRequestContext) async throws -> Response = { request, _ in
            let path = request.uri.path
            if schedulers.contains(path) {
                let limit = frontEnd.configuration.maxRequestBytes
                switch try await Self.body(request, limit: limit, budget: budget) {
                case .bytes(let bytes): return Self.response(await frontEnd.schedule(body: bytes))
                case .tooLarge: return Self.response(frontEnd.refuse(.init(status: 413, message: "the scheduler request is over this project's limit of \(limit) bytes")))
                case .busy: return Self.response(frontEnd.refuse(.init(status: 503, message: "the server holds too many requests at once; try again later")))
                }
            }
            if path == base + "file_upload_handler" {
                // The header is read whole, the file's bytes written as they come.
                let limit = frontEnd.configuration.maxUploadBytes + (64 << 10)
                if let announced = request.headers[.contentLength].flatMap({ Int($0) }), announced > limit {
                    return Self.response(.dataServer(413, .init(status: -1, message: "the upload is over this project's limit of \(frontEnd.configuration.maxUploadBytes) bytes; nothing was stored")))
                }
                return Self.response(await frontEnd.upload(chunks: request.body, budget: budget))
            }
            return Self.response(.text(404, "not found"))
        }
        router.get("/", use: get)
        router.get("**", use: get)
        router.post("/", use: post)
        router.post("**", use: post)
        return router
    }

    enum Body {
        case bytes([UInt8])
        /// Over its limit.
        case tooLarge
        /// The budget has no room for it.
        case busy
    }

    /// A request's body, at most `limit` bytes (a Content-Length over it is refused before
    /// anything is read). Its bytes are held from `budget` (bytes of bodies held at once,
    /// together) as they arrive: a client that announces much and trickles holds only what
    /// it sent.
    static func body(_ request: Request, limit: Int, budget: BOINCAllowance) async throws -> Body {
        if let announced = request.headers[.contentLength].flatMap({ Int($0) }), announced > limit { return .tooLarge }
        var held = 0
        defer { budget.give(held) }
        var buffer = ByteBuffer()
        for try await chunk in request.body {
            guard buffer.readableBytes + chunk.readableBytes <= limit else { return .tooLarge }
            guard budget.take(chunk.readableBytes) else { return .busy }
            held += chunk.readableBytes
            buffer.writeImmutableBuffer(chunk)
        }
        return .bytes(buffer.readBytes(length: buffer.readableBytes) ?? [])
    }

    static func path(of url: String) -> String {
        guard let components = URLComponents(string: url) else { return "/" }
        let path = components.path.isEmpty ? "/" : components.path
        return path
    }

    static func response(_ r: BOINCResponse) -> Response {
        Response(
            status: .init(code: r.status), headers: [.contentType: r.contentType],
            body: .init(byteBuffer: ByteBuffer(bytes: r.body))
        )
    }
}

/// A quantity shared by a listener's connections (connections open, bytes of bodies held):
/// taken while in use, given back after.
final class BOINCAllowance: Sendable {
    let total: Int
    private let left: NIOLockedValueBox<Int>
    init(_ total: Int) {
        self.total = total
        self.left = NIOLockedValueBox(total)
    }
    func take(_ n: Int = 1) -> Bool {
        self.left.withLockedValue { left in
            guard n <= left else { return false }
            left -= n
            return true
        }
    }
    func give(_ n: Int = 1) { self.left.withLockedValue { $0 += n } }
}

/// Connections open now per peer (an IPv4 address, or an IPv6 address's /64), shared by
/// the handlers of one listener.
final class BOINCPeerCounts: Sendable {
    let limit: Int
    private let open = NIOLockedValueBox<[String: Int]>([:])
    init(limit: Int) { self.limit = limit }

    /// The key `address` is counted under; nil: not counted (a Unix socket).
    static func key(_ address: SocketAddress?) -> String? {
        switch address {
        case .v4: return address?.ipAddress
        case .v6(let a):
            let bytes = withUnsafeBytes(of: a.address.sin6_addr) { Array($0) }
            // An IPv4 client of a dual-stack listener (::ffff:a.b.c.d) is its IPv4 address.
            if bytes[0..<10].allSatisfy({ $0 == 0 }), bytes[10] == 0xff, bytes[11] == 0xff {
                return bytes[12...].map { String($0) }.joined(separator: ".")
            }
            return bytes[0..<8].map { String(format: "%02x", $0) }.joined() + "/64"
        default: return nil
        }
    }

    func take(_ key: String) -> Bool {
        self.open.withLockedValue { open in
            let n = open[key, default: 0]
            guard n < self.limit else { return false }
            open[key] = n + 1
            return true
        }
    }

    func give(_ key: String) {
        self.open.withLockedValue { open in
            let n = open[key, default: 1] - 1
            open[key] = n > 0 ? n : nil
        }
    }
}

/// Closes connections beyond the caps (in all, and per peer) as they are accepted, and each
/// connection at the end of its lifetime (BOINCFrontEnd.Configuration). Passes everything
/// through untouched.
final class BOINCConnectionLimits: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny

    /// Connections open now, shared by the handlers of one listener.
    let count: BOINCAllowance
    let peers: BOINCPeerCounts?
    let lifetime: TimeAmount
    let logger: Logger
    private var entered = false
    private var peer: String?
    private var timer: Scheduled<Void>?

    init(count: BOINCAllowance, peers: BOINCPeerCounts?, lifetime: TimeAmount, logger: Logger) {
        self.count = count
        self.peers = peers
        self.lifetime = lifetime
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let key = self.peers == nil ? nil : BOINCPeerCounts.key(context.channel.remoteAddress)
        if let key, let peers = self.peers, !peers.take(key) {
            self.logger.warning("boinc connection refused: \(peers.limit) connections from \(key) are open")
            context.close(promise: nil)
            return
        }
        guard self.count.take() else {
            if let key { self.peers?.give(key) }
            self.logger.warning("boinc connection refused: \(self.count.total) connections are open")
            context.close(promise: nil)
            return
        }
        self.peer = key
        self.entered = true
        let channel = context.channel
        let lifetime = self.lifetime
        let logger = self.logger
        self.timer = context.eventLoop.scheduleTask(in: lifetime) {
            logger.info("boinc connection closed: open for \(lifetime.nanoseconds / 1_000_000_000) s")
            channel.close(promise: nil)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = nil
        if self.entered {
            self.entered = false
            self.count.give()
            if let peer = self.peer { self.peers?.give(peer) }
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        context.fireChannelRead(data)
    }
}
