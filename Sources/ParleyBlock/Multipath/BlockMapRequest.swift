/// What `parley block map` is asked to map: from its flags, or from RNBD's `map_device` line.
public struct BlockMapRequest: Sendable, Equatable {
    public var session: String
    /// Addresses in `ParleyAddress` text form.
    public var paths: [String]
    public var device: String
    /// ro, rw or migration.
    public var access: String

    public init(session: String, paths: [String], device: String, access: String) {
        self.session = session
        self.paths = paths
        self.device = device
        self.access = access
    }

    /// RNBD's `map_device` line: `sessname=NAME path=ip:ADDR [path=...] device_path=PATH
    /// [access_mode=ro|rw|migration]`. A path may be `ip:HOST`, `ip:HOST:PORT`, `HOST:PORT`,
    /// `unix:PATH`, or RNBD's `SRC,DST` pair (the source is ignored: the system picks it);
    /// without a port it is the block protocol's (7421). `nr_poll_queues=` is accepted and
    /// ignored (RDMA polling has no meaning over TCP).
    public init(rnbd line: String) throws(BlockError) {
        var session: String?
        var paths: [String] = []
        var device: String?
        var access = "rw"
        var seen: Set<Substring> = []
        // Any white space separates words (a line from a file with CRLF endings included).
        for word in line.split(whereSeparator: { $0.isWhitespace }) {
            guard let eq = word.firstIndex(of: "=") else {
                throw BlockError(.invalid, "bad RNBD word \"\(word)\": expected KEY=VALUE (sessname=, path=, device_path=, access_mode=)")
            }
            let key = word[..<eq], value = String(word[word.index(after: eq)...])
            guard key == "path" || seen.insert(key).inserted else {
                throw BlockError(.invalid, "\(key)= is given twice in the RNBD line")
            }
            switch key {
            case "sessname": session = value
            case "path": paths.append(try Self.rnbdPath(value))
            case "device_path":
                // RNBD's server joins its dev_search_path ("/" by default) and device_path, so
                // `/dev/ram0` is the usual form; a Parley server takes paths relative to its
                // search path: the leading slashes go, the join stays the same.
                let relative = String(value.drop { $0 == "/" })
                guard !relative.isEmpty else { throw BlockError(.invalid, "device_path=\(value) names no device") }
                device = relative
            case "access_mode":
                guard ["ro", "rw", "migration"].contains(value) else {
                    throw BlockError(.invalid, "bad access_mode \"\(value)\": use ro, rw or migration")
                }
                access = value
            case "nr_poll_queues":
                break
            default:
                throw BlockError(.invalid, "unknown RNBD word \"\(key)=\": use sessname=, path=, device_path=, access_mode=")
            }
        }
        guard let session else { throw BlockError(.invalid, "the RNBD line has no sessname=") }
        guard !paths.isEmpty else { throw BlockError(.invalid, "the RNBD line has no path=") }
        guard let device else { throw BlockError(.invalid, "the RNBD line has no device_path=") }
        self.init(session: session, paths: paths, device: device, access: access)
    }

    static func rnbdPath(_ text: String) throws(BlockError) -> String {
        // "src,dst": the destination is what matters (and must be there: "src," is no path).
        guard !text.isEmpty else { throw BlockError(.invalid, "empty path in \"path=\"") }
        let parts = text.split(separator: ",", omittingEmptySubsequences: false)
        guard parts.count <= 2, !(parts.last ?? "").isEmpty else {
            throw BlockError(.invalid, "bad path=\(text): use ip:ADDRESS or ip:SOURCE,ip:DESTINATION")
        }
        var p = String(parts.last!)
        if p.hasPrefix("ip:") { p.removeFirst(3) }
        if p.hasPrefix("gid:") { throw BlockError(.invalid, "path \"\(text)\": gid: addresses are InfiniBand's; use ip:ADDRESS") }
        guard !p.isEmpty else { throw BlockError(.invalid, "empty path in \"path=\(text)\"") }
        if p.hasPrefix("unix:") || p.contains("://") { return p }
        if p.hasPrefix("[") {
            // [V6] without a port: the block protocol's port, as for the other forms.
            return p.hasSuffix("]") ? "\(p):\(BlockServer.Configuration.defaultPort)" : p
        }
        // An address without a port (RNBD's form): the block protocol's port.
        let colons = p.filter { $0 == ":" }.count
        if colons == 0 { return "\(p):\(BlockServer.Configuration.defaultPort)" }
        if colons > 1 { return "[\(p)]:\(BlockServer.Configuration.defaultPort)" }  // a bare IPv6 address
        return p
    }
}
