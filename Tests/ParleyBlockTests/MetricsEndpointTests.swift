import Foundation
import NIOCore
@testable import ParleyBlock
import Prometheus
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The metrics endpoint shares its process with the block server: it holds a bounded number
/// of connections, each for a bounded time (it held any number, idle, for ever; found by a
/// review).
@Suite(.timeLimit(.minutes(2)))
struct MetricsEndpointTests {
    /// What a read on `socket` found: bytes, the end of the stream, or nothing before its
    /// receive timeout.
    enum Read: Equatable { case bytes, end, timeout }

    static func read(_ socket: RawSocket) -> Read {
        var byte: UInt8 = 0
        let n = recv(socket.fd, &byte, 1, 0)
        if n > 0 { return .bytes }
        if n == 0 || errno == ECONNRESET { return .end }
        return .timeout
    }

    @Test func connectionsAreCappedAndNeitherIdleNorTrickledOnesAreKept() async throws {
        var limits = MetricsEndpoint.Limits()
        limits.maxConnections = 2
        limits.idleTimeout = .seconds(30)
        limits.maxLifetime = .seconds(2)
        let endpoint = try await MetricsEndpoint.start(host: "127.0.0.1", port: 0, registry: PrometheusCollectorRegistry(), limits: limits)
        let port = try #require(endpoint.localAddress?.port)
        let first = try RawSocket(port: port)
        let second = try RawSocket(port: port)
        // The accept of the first two is counted before the third's (one event loop for the
        // listener): the third is closed as accepted.
        try await Task.sleep(for: .milliseconds(200))
        let third = try RawSocket(port: port)
        third.setTimeout(10)
        #expect(Self.read(third) == .end, "a connection past the cap is closed")
        // A request trickled a byte at a time is never idle: the lifetime ends it.
        let request = Array("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".utf8)
        for byte in request.prefix(13) {
            first.send([byte])
            try await Task.sleep(for: .milliseconds(300))
        }
        first.setTimeout(10)
        #expect(Self.read(first) == .end, "the trickling connection outlived its lifetime")
        // The second, silent, went at its lifetime too; a new one is served.
        second.setTimeout(10)
        #expect(Self.read(second) == .end)
        let fresh = try RawSocket(port: port)
        fresh.send(Array("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8))
        fresh.setTimeout(10)
        var text = ""
        while let chunk = fresh.receive(1) { text += String(decoding: chunk, as: UTF8.self) }
        #expect(text.hasPrefix("HTTP/1.1 200"), "\(text)")
        await endpoint.close()
    }

    @Test func anIdleConnectionIsClosed() async throws {
        var limits = MetricsEndpoint.Limits()
        limits.idleTimeout = .seconds(1)
        let endpoint = try await MetricsEndpoint.start(host: "127.0.0.1", port: 0, registry: PrometheusCollectorRegistry(), limits: limits)
        let port = try #require(endpoint.localAddress?.port)
        let idle = try RawSocket(port: port)
        idle.setTimeout(20)
        #expect(Self.read(idle) == .end, "an idle connection was kept past its idle timeout")
        await endpoint.close()
    }
}
