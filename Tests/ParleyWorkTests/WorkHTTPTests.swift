import Foundation
import Hummingbird
import Logging
import ParleyTestSupport
import Testing

@testable import ParleyWork

/// The master's HTTP endpoint (`parley work serve --http`) holds no more connections than its
/// cap, and none longer than its lifetime: a client that trickles a request a byte at a time
/// within the idle timeout, or opens many connections, cannot keep them.
@Suite struct WorkHTTPTests {
    @Test func connectionsBeyondTheCapAndPastTheirLifetimeAreClosed() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("work-http-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try SQLiteWorkStore(path: dir + "/jobs.sqlite")
        var quiet = Logger(label: "work-http")
        quiet.logLevel = .critical
        let (ports, continuation) = AsyncStream<Int>.makeStream()
        let app = WorkHTTP.application(
            host: "127.0.0.1", port: 0, store: store, metrics: { "" }, logger: quiet,
            maxConnections: 1, connectionLifetime: .seconds(1), onRunning: { continuation.yield($0) }
        )
        let server = Task { try await app.runService() }
        defer { server.cancel() }
        var iterator = ports.makeAsyncIterator()
        let port = try #require(await iterator.next())
        // A request trickled: its connection closes at the end of its lifetime, not answered.
        let slow = try LoopbackSocket(port: port)
        slow.send("GET /sta")
        try await Task.sleep(for: .milliseconds(200))
        // Beyond the cap (one connection): closed at once, unanswered.
        let second = try LoopbackSocket(port: port)
        second.send("GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        let started = ContinuousClock.now
        let refused = await onOwnThread { second.untilClosed() }
        #expect(refused.closed && refused.text.isEmpty, "\(refused)")
        let ended = await onOwnThread { slow.untilClosed() }
        #expect(ended.closed && ended.text.isEmpty, "\(ended)")
        #expect(ContinuousClock.now - started < .seconds(15), "closed at its lifetime (1 s), not the idle timeout (60 s)")
        // Room again: a request is answered.
        let answered = try await firstLoopbackAnswer(port: port, request: "GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        #expect(answered.hasPrefix("HTTP/1.1 200") && answered.contains("\"queued\":0"), "\(answered)")
    }
}
