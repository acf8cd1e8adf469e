import CParleySocket
import Metrics
import NIOCore
import ParleyWire

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A connection's busy wait for its peer's next bytes after it answered, on the event loop
/// (`ReplyPolling` decides when and says why). Held by a channel handler; used only on the
/// channel's event loop while the channel is open.
///
/// SwiftNIO does not hand out a channel's descriptor: it is found once, by the socket's
/// `SO_COOKIE` in /proc/self/fd (`parley_socket_with_cookie`). Since it is used only on the
/// event loop while the channel is open, NIO cannot have closed it (nor the number have been
/// reused) meanwhile. Only a channel that is a socket (NIOPosix's socket channels are
/// `SocketOptionProvider`s) is asked for its cookie: others (in-memory, a test's embedded
/// channel, an HTTP/2 stream) may trap on an option they do not know, and never wait.
public struct PeerWait {
    public enum Outcome: Equatable, Sendable {
        /// Bytes came within the window.
        case bytes
        /// The window ran out with none.
        case timeout
        /// The wait failed (errno) or the channel has no descriptor: this connection waits
        /// no more.
        case unavailable(errno: CInt)
    }

    public private(set) var policy: ReplyPolling
    /// The socket: nil until looked up, -1 when there is none.
    private var socket: CInt?
    /// nil when the window is zero: a connection that never waits registers no counters.
    private let counters: (sawBytes: Counter, ranOut: Counter)?

    /// After the first bytes come, how long the wait goes on while more keep coming, so that
    /// a peer writing several frames in a row is read in one go.
    public static let settle: UInt64 = 3_000

    static let cookieOption = ChannelOptions.Types.SocketOption(level: SocketOptionLevel(SOL_SOCKET), name: 57)  // SO_COOKIE

    /// `window` 0 never waits. Waits are counted in `label`, dimension `outcome` (`seen`
    /// when bytes came, `timeout` when none did).
    public init(window: TimeAmount, label: String, seen: String) {
        self.policy = ReplyPolling(window: UInt64(max(0, window.nanoseconds)))
        self.counters = self.policy.window > 0
            ? (Counter(label: label, dimensions: [("outcome", seen)]), Counter(label: label, dimensions: [("outcome", "timeout")])) : nil
    }

    public var isEnabled: Bool { self.policy.window > 0 }

    /// Waits now if the policy says so: nil when it did not.
    public mutating func wait(on channel: any Channel) -> Outcome? {
        guard self.policy.shouldWait() else { return nil }
        guard let fd = self.descriptor(channel) else {
            self.policy = ReplyPolling(window: 0)
            return .unavailable(errno: 0)
        }
        let seen = parley_await_bytes(fd, self.policy.window, Self.settle)
        if let counters = self.counters { (seen == 1 ? counters.sawBytes : counters.ranOut).increment() }
        if seen < 0 {
            self.policy = ReplyPolling(window: 0)
            return .unavailable(errno: -seen)
        }
        self.policy.waited(sawBytes: seen == 1)
        return seen == 1 ? .bytes : .timeout
    }

    private mutating func descriptor(_ channel: any Channel) -> CInt? {
        if let fd = self.socket { return fd >= 0 ? fd : nil }
        var fd: CInt = -1
        if channel.isActive, channel is any SocketOptionProvider, channel.remoteAddress != nil,
           let cookie = try? channel.syncOptions?.getOption(Self.cookieOption), cookie != 0 {
            fd = parley_socket_with_cookie(UInt64(UInt(bitPattern: cookie)))
        }
        self.socket = fd
        return fd >= 0 ? fd : nil
    }
}
