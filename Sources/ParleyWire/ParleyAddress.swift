/// Where a Parley server listens or a client connects.
///
/// Text forms (used by the `parley` command and in redirects):
/// `HOST:PORT` (IPv4 address or host name), `[V6]:PORT`, `unix:PATH`,
/// `tls://HOST:PORT` (TCP inside TLS 1.3), and `ws://HOST:PORT/PATH` or `wss://HOST:PORT/PATH`
/// (WebSocket, plain or inside TLS, upgraded from HTTP/1.1 at PATH). Every host may be an
/// IPv6 address in brackets.
import Foundation

public struct ParleyAddress: Hashable, Sendable, CustomStringConvertible {
    public enum Kind: Hashable, Sendable {
        case tcp(host: String, port: Int)
        case unix(path: String)
        /// TCP inside TLS 1.3.
        case tls(host: String, port: Int)
        /// Binary WebSocket messages upgraded from an HTTP/1.1 request for `path` (which starts
        /// with "/"); inside TLS when `tls` is true (`wss://`).
        case webSocket(host: String, port: Int, path: String, tls: Bool)
        /// The in-process transport (a connected socket pair, no address).
        case inProcess
    }

    public var kind: Kind

    /// The default port of `parley serve`.
    public static let defaultPort = 7420

    public static func tcp(host: String, port: Int) -> ParleyAddress { ParleyAddress(kind: .tcp(host: host, port: port)) }
    public static func unix(path: String) -> ParleyAddress { ParleyAddress(kind: .unix(path: path)) }
    public static func tls(host: String, port: Int) -> ParleyAddress { ParleyAddress(kind: .tls(host: host, port: port)) }
    public static func webSocket(host: String, port: Int, path: String = "/", tls: Bool = false) -> ParleyAddress {
        ParleyAddress(kind: .webSocket(host: host, port: port, path: path, tls: tls))
    }

    public init(kind: Kind) { self.kind = kind }

    /// True for `tls://` and `wss://` addresses: they need certificates.
    public var usesTLS: Bool {
        switch self.kind {
        case .tls: return true
        case .webSocket(_, _, _, let tls): return tls
        default: return false
        }
    }

    /// The text forms this type parses, for error messages.
    static let forms = "HOST:PORT, [V6]:PORT, unix:PATH, tls://HOST:PORT, ws://HOST:PORT/PATH or wss://HOST:PORT/PATH"

    /// Parses `HOST:PORT`, `[V6]:PORT`, `unix:PATH`, `tls://HOST:PORT`, `ws://HOST:PORT/PATH` or
    /// `wss://HOST:PORT/PATH` (PATH may be omitted for "/").
    public init(parsing text: String) throws(ParleyError) {
        func bad(_ why: String) -> ParleyError {
            ParleyError(code: .invalidArgument, message: "bad address \"\(text)\": \(why); use \(Self.forms)")
        }
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty else { throw bad("empty socket path") }
            guard path.utf8.count < 108 else { throw bad("socket path longer than 107 bytes") }
            self.kind = .unix(path: path)
            return
        }
        if let schemeEnd = text.firstRange(of: "://") {
            let scheme = text[..<schemeEnd.lowerBound]
            let rest = text[schemeEnd.upperBound...]
            switch scheme {
            case "tls":
                guard !rest.contains("/") else { throw bad("a tls address has no path") }
                let (host, port) = try Self.hostAndPort(rest, bad)
                self.kind = .tls(host: host, port: port)
            case "ws", "wss":
                let slash = rest.firstIndex(of: "/") ?? rest.endIndex
                let (host, port) = try Self.hostAndPort(rest[..<slash], bad)
                let path = slash == rest.endIndex ? "/" : String(rest[slash...])
                // The path goes into an HTTP request line as it is: no spaces, controls,
                // query or fragment.
                guard !path.contains(where: { $0 == "?" || $0 == "#" || $0.isWhitespace || $0.asciiValue.map { $0 < 0x20 || $0 == 0x7f } == true })
                else { throw bad("the path must not contain spaces, control characters, '?' or '#'") }
                self.kind = .webSocket(host: host, port: port, path: path, tls: scheme == "wss")
            default:
                throw bad("unknown scheme \"\(scheme)://\"")
            }
            return
        }
        let (host, port) = try Self.hostAndPort(text[...], bad)
        self.kind = .tcp(host: host, port: port)
    }

    /// Parses `HOST:PORT` or `[V6]:PORT`.
    private static func hostAndPort(_ text: Substring, _ bad: (String) -> ParleyError) throws(ParleyError) -> (String, Int) {
        let host: Substring
        let portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { throw bad("missing ']'") }
            host = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { throw bad("missing ':PORT' after ']'") }
            portText = rest.dropFirst()
            guard host.contains(":") else { throw bad("brackets are for IPv6 addresses") }
            guard Self.isIPv6(host) else { throw bad("\"\(host)\" is not an IPv6 address") }
        } else {
            guard let colon = text.lastIndex(of: ":") else { throw bad("missing ':PORT'") }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
            guard !host.contains(":") else { throw bad("an IPv6 address must be written in brackets") }
        }
        guard !host.isEmpty else { throw bad("empty host") }
        // ASCII digits only (Int() would take "+80" and "-0").
        guard (1...5).contains(portText.utf8.count), portText.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }),
              let port = Int(portText), (0...65535).contains(port)
        else { throw bad("port must be a number from 0 to 65535") }
        return (String(host), port)
    }

    /// An IPv6 address as text (RFC 4291 2.2, as `inet_pton` reads it), with an optional
    /// `%zone` (a scope, RFC 4007).
    static func isIPv6(_ text: Substring) -> Bool {
        var address = text
        if let percent = text.firstIndex(of: "%") {
            let zone = text[text.index(after: percent)...]
            guard !zone.isEmpty, zone.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "._-".contains($0)) }) else { return false }
            address = text[..<percent]
        }
        var parsed = in6_addr()
        return inet_pton(AF_INET6, String(address), &parsed) == 1
    }

    /// `HOST:PORT`, with an IPv6 host in brackets.
    private static func hostPort(_ host: String, _ port: Int) -> String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    public var description: String {
        switch self.kind {
        case .tcp(let host, let port): return Self.hostPort(host, port)
        case .unix(let path): return "unix:\(path)"
        case .tls(let host, let port): return "tls://" + Self.hostPort(host, port)
        case .webSocket(let host, let port, let path, let tls): return (tls ? "wss://" : "ws://") + Self.hostPort(host, port) + path
        case .inProcess: return "in-process"
        }
    }
}
