/// Where a Parley server listens or a client connects.
///
/// Text forms (used by the `parley` command and in redirects):
/// `HOST:PORT` (IPv4 address or host name), `[V6]:PORT`, and `unix:PATH`.
public struct ParleyAddress: Hashable, Sendable, CustomStringConvertible {
    public enum Kind: Hashable, Sendable {
        case tcp(host: String, port: Int)
        case unix(path: String)
        /// The in-process transport (a connected socket pair, no address).
        case inProcess
    }

    public var kind: Kind

    /// The default port of `parley serve`.
    public static let defaultPort = 7420

    public static func tcp(host: String, port: Int) -> ParleyAddress { ParleyAddress(kind: .tcp(host: host, port: port)) }
    public static func unix(path: String) -> ParleyAddress { ParleyAddress(kind: .unix(path: path)) }

    public init(kind: Kind) { self.kind = kind }

    /// Parses `HOST:PORT`, `[V6]:PORT` or `unix:PATH`.
    public init(parsing text: String) throws(ParleyError) {
        func bad(_ why: String) -> ParleyError {
            ParleyError(code: .invalidArgument, message: "bad address \"\(text)\": \(why); use HOST:PORT, [V6]:PORT or unix:PATH")
        }
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty else { throw bad("empty socket path") }
            guard path.utf8.count < 108 else { throw bad("socket path longer than 107 bytes") }
            self.kind = .unix(path: path)
            return
        }
        let host: Substring
        let portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { throw bad("missing ']'") }
            host = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { throw bad("missing ':PORT' after ']'") }
            portText = rest.dropFirst()
            guard host.contains(":") else { throw bad("brackets are for IPv6 addresses") }
        } else {
            guard let colon = text.lastIndex(of: ":") else { throw bad("missing ':PORT'") }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
            guard !host.contains(":") else { throw bad("an IPv6 address must be written in brackets") }
        }
        guard !host.isEmpty else { throw bad("empty host") }
        guard let port = Int(portText), (0...65535).contains(port) else { throw bad("port must be a number from 0 to 65535") }
        self.kind = .tcp(host: String(host), port: port)
    }

    public var description: String {
        switch self.kind {
        case .tcp(let host, let port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .unix(let path): return "unix:\(path)"
        case .inProcess: return "in-process"
        }
    }
}
