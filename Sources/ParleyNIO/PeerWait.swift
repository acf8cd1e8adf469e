import CParleySocket
import Dispatch
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import ParleyWire
import Synchronization

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
/// `SO_COOKIE` in /proc/self/fd (`DescriptorScan`), off the event loop (a scan costs a system
/// call per descriptor of the process: with thousands of connections, milliseconds); the
/// connection does not wait until it is known. Once found it is checked on the event loop
/// (its cookie is still this socket's) and then used only there while the channel is open,
/// so NIO cannot have closed it (nor the number have been reused) meanwhile. Only a channel
/// that is a socket (NIOPosix's socket channels are `SocketOptionProvider`s) is asked for its
/// cookie: others (in-memory, a test's embedded channel, an HTTP/2 stream) may trap on an
/// option they do not know, and never wait.
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
    private var socket: Socket = .unknown
    private enum Socket {
        /// Not looked up yet.
        case unknown
        /// Being looked up (`DescriptorScan`).
        case pending(DescriptorScan.Lookup)
        case found(CInt)
        /// The channel has no socket, or it was not found: no waits.
        case none
    }
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
        let fd: CInt
        switch self.descriptor(channel) {
        case .found(let found):
            fd = found
        case .pending:
            return nil
        case .unknown, .none:
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

    private mutating func descriptor(_ channel: any Channel) -> Socket {
        switch self.socket {
        case .found, .none:
            break
        case .pending(let lookup):
            switch lookup.result {
            case nil:
                break
            case let fd? where fd >= 0 && parley_socket_cookie(fd) == lookup.cookie:
                self.socket = .found(fd)
            case _?:
                self.socket = .none
            }
        case .unknown:
            if channel.isActive, channel is any SocketOptionProvider, channel.remoteAddress != nil,
               let cookie = try? channel.syncOptions?.getOption(Self.cookieOption), cookie != 0 {
                self.socket = .pending(DescriptorScan.shared.find(UInt64(UInt(bitPattern: cookie))))
            } else {
                self.socket = .none
            }
        }
        return self.socket
    }
}

/// Finds sockets' descriptors by their cookies in /proc/self/fd on a Dispatch thread, never
/// on an event loop: one scan at a time, each for every cookie asked for since the last
/// began, so that many connections accepted at once cost one scan, not one each.
final class DescriptorScan: Sendable {
    static let shared = DescriptorScan()

    final class Lookup: Sendable {
        let cookie: UInt64
        private let found = Atomic<CInt>(Lookup.notYet)
        private static let notYet: CInt = -2

        init(cookie: UInt64) { self.cookie = cookie }

        /// nil while the scan runs; then the descriptor, or -1.
        var result: CInt? {
            let value = self.found.load(ordering: .acquiring)
            return value == Self.notYet ? nil : value
        }

        fileprivate func finish(_ fd: CInt) { self.found.store(fd, ordering: .releasing) }
    }

    /// Lookups asked for and not yet in a scan, and whether a scan is under way.
    private let state = NIOLockedValueBox((waiting: [Lookup](), scanning: false))

    /// Starts a lookup of the socket whose cookie is `cookie`: its `result` is set when a
    /// scan has looked.
    func find(_ cookie: UInt64) -> Lookup {
        let lookup = Lookup(cookie: cookie)
        let start = self.state.withLockedValue { state in
            state.waiting.append(lookup)
            let idle = !state.scanning
            state.scanning = true
            return idle
        }
        if start { DispatchQueue.global(qos: .utility).async { self.scan() } }
        return lookup
    }

    private func scan() {
        while true {
            let batch = self.state.withLockedValue { state in
                let batch = state.waiting
                state.waiting = []
                state.scanning = !batch.isEmpty
                return batch
            }
            if batch.isEmpty { return }
            let cookies = batch.map(\.cookie)
            var fds = [CInt](repeating: -1, count: batch.count)
            _ = parley_sockets_with_cookies(cookies, &fds, batch.count)
            for (lookup, fd) in zip(batch, fds) { lookup.finish(fd) }
        }
    }
}
