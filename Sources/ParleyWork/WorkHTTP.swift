import Foundation
import Hummingbird
import Logging
import NIOCore
import SwiftProtobuf

/// The master's HTTP endpoint (`parley work serve --http HOST:PORT`), on Hummingbird:
///
/// - `GET /status`: jobs by state, as JSON (`{"queued":0,"leased":0,"succeeded":0,"failed":0}`);
/// - `GET /jobs/ID`: a job's state, failures and accepted result, as JSON (the `ResultReply`
///   of the Work protocol in protobuf's JSON mapping, as `parley work results --json` prints);
/// - `GET /metrics`: the process's metrics in Prometheus's text format.
///
/// Anything else is 404; a job id that is not a number is 400. Read-only: nothing here
/// changes the store.
public enum WorkHTTP {
    /// Builds the application; run it (it is a `Service`) beside the Parley server.
    /// `metrics` renders the metrics registry.
    /// At most `maxConnections` connections are kept (one more is closed as it is accepted),
    /// each for at most `connectionLifetime` (a request trickled a byte at a time is never
    /// idle), as the BOINC front end does.
    public static func application(
        host: String, port: Int, store: any WorkStore, metrics: @escaping @Sendable () -> String, logger: Logger,
        maxConnections: Int = 64, connectionLifetime: TimeAmount = .minutes(10),
        onRunning: @escaping @Sendable (Int) async -> Void = { _ in }
    ) -> some ApplicationProtocol {
        let router = Router()
        router.get("status") { _, _ -> Response in
            let counts = try await store.counts()
            let body = ["queued", "leased", "succeeded", "failed"].map { "\"\($0)\":\(counts[$0] ?? 0)" }.joined(separator: ",")
            return Self.json("{\(body)}\n")
        }
        router.get("jobs/:id") { _, context -> Response in
            guard let text = context.parameters.get("id"), let id = UInt64(text) else {
                return Self.json("{\"error\":\"the job id must be a number\"}\n", status: .badRequest)
            }
            guard let job = try await store.job(id) else {
                return Self.json("{\"error\":\"no job \(id)\"}\n", status: .notFound)
            }
            let reply = try WorkService.resultReply(job)
            return Self.json(try reply.jsonString() + "\n")
        }
        router.get("metrics") { _, _ -> Response in
            Response(
                status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                body: .init(byteBuffer: ByteBuffer(string: metrics()))
            )
        }
        let connections = HTTPAllowance(maxConnections)
        return Application(
            // Idle connections are closed after a minute (see BOINCHTTP).
            router: router,
            server: .http1(configuration: .init(
                additionalChannelHandlers: [HTTPConnectionLimits(count: connections, peers: nil, lifetime: connectionLifetime, label: "http", logger: logger)],
                idleTimeout: .seconds(60)
            )),
            configuration: .init(address: .hostname(host, port: port), serverName: "parley-work"),
            onServerRunning: { channel in await onRunning(channel.localAddress?.port ?? port) }, logger: logger
        )
    }

    static func json(_ text: String, status: HTTPResponse.Status = .ok) -> Response {
        Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(string: text)))
    }
}
