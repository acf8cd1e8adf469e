import Foundation
import Hummingbird
import Logging
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
/// A body over its limit is refused with 413 before it is all read.
public enum BOINCHTTP {
    public static func application(
        host: String, port: Int, frontEnd: BOINCFrontEnd, logger: Logger, onRunning: @escaping @Sendable (Int) async -> Void = { _ in }
    ) -> some ApplicationProtocol {
        Application(
            // A connection that sends and reads nothing for a minute is closed: one that opens
            // and waits would otherwise hold a file descriptor for ever.
            router: self.router(frontEnd), server: .http1(configuration: .init(idleTimeout: .seconds(60))),
            configuration: .init(address: .hostname(host, port: port), serverName: "parley-work-boinc"),
            onServerRunning: { channel in await onRunning(channel.localAddress?.port ?? port) }, logger: logger
        )
    }

    /// The router alone (tests drive it in process).
    public static func router(_ frontEnd: BOINCFrontEnd) -> Router<BasicRequestContext> {
        let base = Self.path(of: frontEnd.configuration.url)
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
                guard let body = try await Self.body(request, limit: limit) else {
                    return Self.response(frontEnd.refuse(.init(status: 413, message: "the scheduler request is over this project's limit of \(limit) bytes")))
                }
                return Self.response(await frontEnd.schedule(body: body))
            }
            if path == base + "file_upload_handler" {
                let limit = frontEnd.configuration.maxUploadBytes + (64 << 10)
                guard let body = try await Self.body(request, limit: limit) else {
                    return Self.response(.dataServer(413, .init(status: -1, message: "the upload is over this project's limit of \(frontEnd.configuration.maxUploadBytes) bytes; nothing was stored")))
                }
                return Self.response(await frontEnd.upload(body: body))
            }
            return Self.response(.text(404, "not found"))
        }
        router.get("/", use: get)
        router.get("**", use: get)
        router.post("/", use: post)
        router.post("**", use: post)
        return router
    }

    /// The body, or nil if it is over `limit`.
    static func body(_ request: Request, limit: Int) async throws -> [UInt8]? {
        do {
            var buffer = try await request.body.collect(upTo: limit)
            return buffer.readBytes(length: buffer.readableBytes) ?? []
        } catch is NIOTooManyBytesError {
            return nil
        }
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
