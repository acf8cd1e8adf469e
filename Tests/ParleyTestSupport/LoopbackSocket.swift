#if canImport(Glibc)
import Glibc
#endif

/// A blocking TCP socket connected to 127.0.0.1:`port`, with receive and send timeouts of
/// `timeoutSeconds`; throws naming the errno when the connect fails. The caller closes it.
/// - Parameter source: the loopback address to connect from (any of 127.0.0.0/8), as a
///   peer apart from those connecting from 127.0.0.1.
public func connectLoopback(port: Int, timeoutSeconds: Int, from source: String? = nil) throws -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    if let source {
        var local = sockaddr_in()
        local.sin_family = sa_family_t(AF_INET)
        local.sin_addr.s_addr = inet_addr(source)
        let bound = withUnsafePointer(to: &local) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard bound == 0 else {
            let error = errno
            close(fd)
            throw LoopbackConnectError(port: port, errno: error)
        }
    }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = in_port_t(UInt16(port).bigEndian)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    let ok = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    guard ok == 0 else {
        let error = errno
        close(fd)
        throw LoopbackConnectError(port: port, errno: error)
    }
    var timeout = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    return fd
}

public struct LoopbackConnectError: Error, CustomStringConvertible {
    public let port: Int
    public let errno: Int32
    public var description: String { "connect to 127.0.0.1:\(self.port): errno \(self.errno)" }
}

/// A blocking socket to 127.0.0.1 with a 20 s receive timeout (used by one thread at a time),
/// for tests of what a server does with a client's connection.
public final class LoopbackSocket: @unchecked Sendable {
    public let fd: Int32
    public init(port: Int, from source: String? = nil) throws { self.fd = try connectLoopback(port: port, timeoutSeconds: 20, from: source) }
    deinit { close(self.fd) }
    public func send(_ text: String) { self.send(Array(text.utf8)) }
    public func send(_ bytes: [UInt8]) {
        var sent = 0
        while sent < bytes.count {
            let n = bytes[sent...].withUnsafeBytes { Glibc.send(self.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return }
            sent += n
        }
    }
    /// What comes until the peer closes (true) or the timeout (false).
    public func untilClosed() -> (closed: Bool, text: String) {
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(self.fd, $0.baseAddress, $0.count, 0) }
            if n == 0 || (n < 0 && errno == ECONNRESET) { return (true, String(decoding: out, as: UTF8.self)) }
            if n < 0 { return (false, String(decoding: out, as: UTF8.self)) }
            out += buffer[0..<n]
        }
    }
}

/// Sends `request` on a fresh connection to 127.0.0.1:`port` until the answer starts with
/// "HTTP/1.1 200" (a server sees the closes of connections it refused a moment later), at
/// most 50 tries 100 ms apart; the last answer.
public func firstLoopbackAnswer(port: Int, request: String) async throws -> String {
    var answered = ""
    for _ in 0..<50 where !answered.hasPrefix("HTTP/1.1 200") {
        let socket = try LoopbackSocket(port: port)
        socket.send(request)
        answered = await onOwnThread { socket.untilClosed().text }
        if !answered.hasPrefix("HTTP/1.1 200") { try await Task.sleep(for: .milliseconds(100)) }
    }
    return answered
}
