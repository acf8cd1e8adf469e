#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import NIOCore
import NIOPosix
import ParleyWire

/// Why a connect failed, in words a person reads ("Connection refused", not NIO's
/// "connection reset (error set): Connection refused) (errno: 111)"), and whether it found
/// nobody there: what a daemon waits out when it starts before its server.
enum ConnectFailure {
    /// Errors of the socket layer that say nobody answered at that address (yet), or the
    /// network is not up (yet). Not a reset or an abort: those come after a connection was
    /// made (a TLS or WebSocket peer that refuses), which waiting does not mend.
    private static let unreachableErrnos: Set<CInt> = [
        ECONNREFUSED, ENOENT, ETIMEDOUT, EHOSTUNREACH, ENETUNREACH, EHOSTDOWN, ENETDOWN, EADDRNOTAVAIL, EAGAIN,
    ]

    static func describe(_ error: any Error) -> String {
        switch error {
        case let error as ParleyError:
            return error.message
        case let error as IOError:
            return String(cString: strerror(error.errnoCode))
        case let error as NIOConnectionError:
            if let dns = error.dnsAError ?? error.dnsAAAAError {
                return "cannot resolve \(error.host): \(dns)"
            }
            if error.connectionErrors.isEmpty { return "\(error.host) has no address" }
            return error.connectionErrors.map { "\($0.target): \(Self.describe($0.error))" }.joined(separator: "; ")
        case ChannelError.connectTimeout(let timeout):
            return "no answer within \(Double(timeout.nanoseconds) / 1e9) s"
        default:
            return "\(error)"
        }
    }

    static func isUnreachable(_ error: any Error) -> Bool {
        switch error {
        case let error as IOError:
            return Self.unreachableErrnos.contains(error.errnoCode)
        case let error as NIOConnectionError:
            // A name that does not resolve (yet: a daemon may start before the network or
            // its DNS), or addresses that did not answer.
            if error.dnsAError != nil || error.dnsAAAAError != nil { return true }
            return !error.connectionErrors.isEmpty && error.connectionErrors.allSatisfy { Self.isUnreachable($0.error) }
        case ChannelError.connectTimeout:
            return true
        default:
            return false
        }
    }
}

extension ParleyError {
    /// A connect that found nobody there: nothing listening, no route, a name that does not
    /// resolve, or no answer in time. The peer may come up later, so a daemon may wait for
    /// it; false for refusals that would be the same next time (authentication, a
    /// certificate, a version, a bad address).
    public var isPeerUnreachable: Bool {
        guard self.code == .connectFailed, let cause = self.cause else { return false }
        return ConnectFailure.isUnreachable(cause)
    }

    /// A connect a daemon starting before its server may wait out: nobody there yet
    /// (`isPeerUnreachable`), or a server that let it in and closed the connection before
    /// the session began (at its connection limit) or is shutting down.
    public var isWorthWaitingFor: Bool {
        self.isPeerUnreachable || self.code == .connectionClosed || self.code == .shuttingDown
    }
}
