#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import NIOConcurrencyHelpers
import NIOCore
import ParleyWire

/// The file of a Unix socket a listener binds: taken only when no other process listens on
/// it, and removed when the listener that made it closes.
///
/// SwiftNIO's `cleanupExistingSocketFile` removes whatever socket file is at the path, even
/// one a running server still listens on: that server keeps running, unreachable, and its
/// clients reach the new one instead. So, before binding, a connection is tried: accepted (or
/// refused for a full backlog), the path is in use and the bind is refused; refused because
/// nobody listens, the file is a stale socket left by a process that died, and is removed.
/// A file that is not a socket is never removed. (Hand-written: no package we have offers
/// it.) There is a window between the check and the bind in which another
/// process could take the path; two listeners started at the same instant on one path are
/// not told apart.
public enum UnixListenerPath {
    /// Makes `path` free to bind: throws a `ParleyError` naming the path if a process listens
    /// on it or it is something other than a socket; removes a stale socket.
    public static func claim(_ path: String) throws {
        var st = stat()
        guard lstat(path, &st) == 0 else {
            let code = errno
            if code == ENOENT { return }
            throw ParleyError(code: .invalidArgument, message: "cannot use \(path) for a Unix socket: \(String(cString: strerror(code)))")
        }
        guard (st.st_mode & S_IFMT) == S_IFSOCK else {
            throw ParleyError(code: .invalidArgument, message: "\(path) exists and is not a Unix socket: not replacing it")
        }
        switch Self.probe(path) {
        case .listening:
            throw ParleyError(code: .invalidArgument, message: "\(path) is in use: another process listens on it (stop it first, or choose another path)")
        case .stale:
            guard unlink(path) == 0 || errno == ENOENT else {
                throw ParleyError(code: .invalidArgument, message: "cannot remove the stale socket \(path): \(String(cString: strerror(errno)))")
            }
        case .failed(let code):
            throw ParleyError(code: .invalidArgument, message: "cannot tell whether \(path) is in use: \(String(cString: strerror(code)))")
        }
    }

    /// The socket file's identity (device and inode) right after the bind, for `release`.
    public static func identity(of path: String) -> Identity? {
        var st = stat()
        guard lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFSOCK else { return nil }
        return Identity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }

    /// Removes `path` if it is still the socket file `identity` names (not one another
    /// listener bound there since).
    public static func release(_ path: String, identity: Identity?) {
        guard let identity, Self.identity(of: path) == identity else { return }
        unlink(path)
    }

    /// Binds with `bind` after `claim`, and removes the socket file when the listener closes:
    /// before its descriptor is closed (so that the file removed is its own: while it is
    /// open, another listener's `claim` finds the path in use and leaves it), and when
    /// the close is done, for a listener that closed without being asked (then only if the
    /// file is still the one it bound).
    public static func bind(_ path: String, _ bind: () async throws -> any Channel) async throws -> any Channel {
        try Self.claim(path)
        let listener = try await bind()
        let identity = Self.identity(of: path)
        let remover = RemoveOnClose(path: path, identity: identity)
        listener.closeFuture.whenComplete { _ in remover.removeOnce() }
        try await listener.pipeline.addHandler(remover).get()
        return listener
    }

    /// On the listener's pipeline: removes the socket file as the close goes by, once (the
    /// fallback after the close must not remove a file another listener bound since, which
    /// may have the inode number this one's had).
    final class RemoveOnClose: ChannelOutboundHandler, Sendable {
        typealias OutboundIn = Never
        let path: String
        let identity: Identity?
        private let done = NIOLockedValueBox(false)
        init(path: String, identity: Identity?) {
            self.path = path
            self.identity = identity
        }
        func removeOnce() {
            guard self.done.withLockedValue({ d in defer { d = true }; return !d }) else { return }
            UnixListenerPath.release(self.path, identity: self.identity)
        }
        func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
            if mode == .all { self.removeOnce() }
            context.close(mode: mode, promise: promise)
        }
    }

    public struct Identity: Equatable, Sendable {
        public var device: UInt64
        public var inode: UInt64
    }

    enum Probe: Equatable { case listening, stale, failed(Int32) }

    /// Tries to connect, without blocking: listening, nobody listening, or an error.
    static func probe(_ path: String) -> Probe {
        #if canImport(Glibc)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        #else
        let fd = socket(AF_UNIX, SOCK_STREAM, 0)
        #endif
        guard fd >= 0 else { return .failed(errno) }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return .failed(ENAMETOOLONG) }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if result == 0 { return .listening }
        switch errno {
        case EAGAIN, EINPROGRESS: return .listening  // a listener whose backlog is full
        case ECONNREFUSED, ENOENT: return .stale
        case let code: return .failed(code)
        }
    }
}
