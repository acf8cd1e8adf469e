import Foundation
import Testing
@testable import ParleyWork
#if canImport(Glibc)
import Glibc
#endif

/// Fetching a job's input over HTTP.
@Suite(.timeLimit(.minutes(2))) struct WorkFetchTests {
    /// A server that answers with a large Content-Length and then sends a byte every 200 ms,
    /// until its client goes (at most 60 s); on loopback, stopped by closing its socket.
    final class TricklingServer: @unchecked Sendable {
        let listener: Int32
        let port: Int
        let done = DispatchSemaphore(value: 0)

        init() throws {
            let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            guard bound == 0, listen(listener, 4) == 0 else {
                close(listener)
                throw POSIXError(.EADDRINUSE)
            }
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &length) } }
            self.listener = listener
            self.port = Int(UInt16(bigEndian: address.sin_port))
            let done = self.done
            Thread.detachNewThread {
                defer { done.signal() }
                let client = accept(listener, nil, nil)
                guard client >= 0 else { return }
                defer { close(client) }
                var buffer = [UInt8](repeating: 0, count: 4096)
                _ = recv(client, &buffer, buffer.count, 0)
                let head = Array("HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n".utf8)
                guard send(client, head, head.count, Int32(MSG_NOSIGNAL)) == head.count else { return }
                for _ in 0..<300 {
                    guard send(client, [0x41], 1, Int32(MSG_NOSIGNAL)) == 1 else { return }
                    usleep(200_000)
                }
            }
        }

        func stop() { shutdown(self.listener, Int32(SHUT_RDWR)); close(self.listener) }
    }

    /// Cancelling the task that fetches stops the download (the worker does when the job's
    /// lease is lost meanwhile). Before, a server trickling bytes held it until it stopped
    /// sending: the timeout counts only silence.
    @Test func aFetchStopsWhenItsTaskIsCancelled() async throws {
        let server = try TricklingServer()
        defer { server.stop() }
        let fetch = Task { try await WorkFiles.fetch("http://127.0.0.1:\(server.port)/in.bin", name: "in.bin", size: 1_000_000) }
        try await Task.sleep(for: .milliseconds(600))
        let cancelledAt = ContinuousClock.now
        fetch.cancel()
        let result = await fetch.result
        let took = ContinuousClock.now - cancelledAt
        #expect(throws: WorkFiles.FileError.self) { try result.get() }
        #expect(took < .seconds(30), "the fetch went on \(took) after its task was cancelled")
    }
}
