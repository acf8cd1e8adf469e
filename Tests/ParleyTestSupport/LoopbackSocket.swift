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
