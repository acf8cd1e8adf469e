import Foundation
import Hummingbird
import Logging
import NIOConcurrencyHelpers
import NIOCore
import ParleyWork

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
        let connections = HTTPAllowance(frontEnd.configuration.maxConnections)
        // nil or 0: no cap.
        let peers = frontEnd.configuration.maxConnectionsPerPeer.flatMap { $0 > 0 ? HTTPPeerCounts(limit: $0) : nil }
        let lifetime = TimeAmount(frontEnd.configuration.connectionLifetime)
        return Application(
            // A connection that sends and reads nothing for a minute is closed: one that opens
            // and waits would otherwise hold a file descriptor for ever. One that trickles is
            // closed at the end of its lifetime, and beyond the cap none is kept.
            router: self.router(frontEnd),
            server: .http1(configuration: .init(
                additionalChannelHandlers: [HTTPConnectionLimits(count: connections, peers: peers, lifetime: lifetime, label: "boinc", logger: logger)],
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
        let budget = HTTPAllowance(frontEnd.configuration.maxBufferedBodyBytes)
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
    static func body(_ request: Request, limit: Int, budget: HTTPAllowance) async throws -> Body {
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
