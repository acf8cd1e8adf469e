import Foundation
import Logging
import Parley
import ParleyBlock
import ParleyTestSupport
import Prometheus
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A block server that cannot start keeps nothing it had started: a program that embeds it
/// (and tries again, or goes on) holds no port or thread for it.
@Suite(.timeLimit(.minutes(1)))
struct BlockServerStartTests {
    /// A TCP socket listening on 127.0.0.1:`port` (0: any), and its port.
    static func listen(port: Int) -> (fd: Int32, port: Int)? {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return nil }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && Glibc.listen(fd, 1) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        guard ok else {
            close(fd)
            return nil
        }
        return (fd, Int(UInt16(bigEndian: address.sin_port)))
    }

    @Test func aBlockProtocolListenerThatCannotBindLeavesTheMetricsPortFree() async throws {
        let taken = try #require(Self.listen(port: 0))
        defer { close(taken.fd) }
        let metricsPort = try freeLoopbackPort()
        var quiet = Logger(label: "block-start")
        quiet.logLevel = .critical
        let configuration = BlockServer.Configuration(
            catalog: try BlockExportCatalog(exports: []), listen: [.tcp(host: "127.0.0.1", port: taken.port)],
            nbd: [.tcp(host: "127.0.0.1", port: 0)], metrics: ("127.0.0.1", metricsPort), ioThreads: 1)
        let server = BlockServer(configuration: configuration, registry: PrometheusCollectorRegistry(), logger: quiet)
        await #expect(throws: (any Error).self) { try await server.run() }
        let again = Self.listen(port: metricsPort)
        #expect(again != nil, "the metrics port is free again once run() has thrown")
        if let again { close(again.fd) }
    }
}
