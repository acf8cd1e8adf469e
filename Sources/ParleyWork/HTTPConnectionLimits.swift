#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore

/// A quantity shared by a listener's connections (connections open, bytes of bodies held):
/// taken while in use, given back after.
public final class HTTPAllowance: Sendable {
    public let total: Int
    private let left: NIOLockedValueBox<Int>
    public init(_ total: Int) {
        self.total = total
        self.left = NIOLockedValueBox(total)
    }
    public func take(_ n: Int = 1) -> Bool {
        self.left.withLockedValue { left in
            guard n <= left else { return false }
            left -= n
            return true
        }
    }
    public func give(_ n: Int = 1) { self.left.withLockedValue { $0 += n } }
}

/// Connections open now per peer (an IPv4 address, or an IPv6 address's /64), shared by
/// the handlers of one listener.
public final class HTTPPeerCounts: Sendable {
    public let limit: Int
    private let open = NIOLockedValueBox<[String: Int]>([:])
    public init(limit: Int) { self.limit = limit }

    /// The key `address` is counted under; nil: not counted (a Unix socket).
    public static func key(_ address: SocketAddress?) -> String? {
        switch address {
        case .v4: return address?.ipAddress
        case .v6:
            // The address's bytes from its text (inet_pton), not from `sockaddr_in6`, whose
            // members this module cannot see without importing SwiftNIO's C shims.
            var bytes = [UInt8](repeating: 0, count: 16)
            guard let text = address?.ipAddress, inet_pton(AF_INET6, text, &bytes) == 1 else { return nil }
            // An IPv4 client of a dual-stack listener (::ffff:a.b.c.d) is its IPv4 address.
            if bytes[0..<10].allSatisfy({ $0 == 0 }), bytes[10] == 0xff, bytes[11] == 0xff {
                return bytes[12...].map { String($0) }.joined(separator: ".")
            }
            return bytes[0..<8].map { String(format: "%02x", $0) }.joined() + "/64"
        default: return nil
        }
    }

    public func take(_ key: String) -> Bool {
        self.open.withLockedValue { open in
            let n = open[key, default: 0]
            guard n < self.limit else { return false }
            open[key] = n + 1
            return true
        }
    }

    public func give(_ key: String) {
        self.open.withLockedValue { open in
            let n = open[key, default: 1] - 1
            open[key] = n > 0 ? n : nil
        }
    }
}

/// Closes connections beyond the caps (in all, and per peer) as they are accepted, and each
/// connection at the end of its lifetime; `label` names the listener in the log ("boinc",
/// "http"). Passes everything through untouched.
public final class HTTPConnectionLimits: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = NIOAny

    /// Connections open now, shared by the handlers of one listener.
    let count: HTTPAllowance
    let peers: HTTPPeerCounts?
    let lifetime: TimeAmount
    let label: String
    let logger: Logger
    private var entered = false
    private var peer: String?
    private var timer: Scheduled<Void>?

    public init(count: HTTPAllowance, peers: HTTPPeerCounts?, lifetime: TimeAmount, label: String, logger: Logger) {
        self.count = count
        self.peers = peers
        self.lifetime = lifetime
        self.label = label
        self.logger = logger
    }

    public func handlerAdded(context: ChannelHandlerContext) {
        let key = self.peers == nil ? nil : HTTPPeerCounts.key(context.channel.remoteAddress)
        if let key, let peers = self.peers, !peers.take(key) {
            self.logger.warning("\(self.label) connection refused: \(peers.limit) connections from \(key) are open")
            context.close(promise: nil)
            return
        }
        guard self.count.take() else {
            if let key { self.peers?.give(key) }
            self.logger.warning("\(self.label) connection refused: \(self.count.total) connections are open")
            context.close(promise: nil)
            return
        }
        self.peer = key
        self.entered = true
        let channel = context.channel
        let lifetime = self.lifetime
        let logger = self.logger
        let label = self.label
        self.timer = context.eventLoop.scheduleTask(in: lifetime) {
            logger.info("\(label) connection closed: open for \(lifetime.nanoseconds / 1_000_000_000) s")
            channel.close(promise: nil)
        }
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = nil
        if self.entered {
            self.entered = false
            self.count.give()
            if let peer = self.peer { self.peers?.give(peer) }
        }
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        context.fireChannelRead(data)
    }
}
