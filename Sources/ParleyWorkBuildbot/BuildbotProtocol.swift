import Foundation
import ParleyWork

/// Buildbot's `msgpack_experimental_v7` worker protocol, sans-IO: the shape of its messages
/// and the bookkeeping of sequence numbers (docs/buildbot.md). One MessagePack map per
/// WebSocket binary frame; each side numbers its own requests from 0 per connection and
/// answers the other's with `{op: "response", seq_number, result[, is_exception: true]}`.
public enum BuildbotMessage: Sendable, Hashable {
    /// A request from the peer: its `op`, its `seq_number` and the whole map (the fields
    /// beside `op` and `seq_number` depend on the op).
    case request(op: String, seq: Int64, body: MessagePack)
    /// An answer to one of our requests.
    case response(seq: Int64, result: MessagePack, isException: Bool)

    /// Reads one decoded frame.
    public static func parse(_ value: MessagePack) throws(BuildbotProtocolError) -> BuildbotMessage {
        guard case .map = value else { throw BuildbotProtocolError("a message must be a map, not \(value.kindName)") }
        guard let op = value["op"]?.stringValue else { throw BuildbotProtocolError("a message without a string \"op\"") }
        guard let seq = value["seq_number"]?.intValue else { throw BuildbotProtocolError("\(op): no integer \"seq_number\"") }
        guard seq >= 0 else { throw BuildbotProtocolError("\(op): negative seq_number \(seq)") }
        if op == "response" {
            return .response(seq: seq, result: value["result"] ?? .nil, isException: value["is_exception"]?.boolValue ?? false)
        }
        return .request(op: op, seq: seq, body: value)
    }

    /// A request map: `op`, `seq_number`, then `fields`.
    public static func request(op: String, seq: Int64, _ fields: [(String, MessagePack)] = []) -> MessagePack {
        .map([(.string("op"), .string(op)), (.string("seq_number"), .int(seq))] + fields.map { (.string($0.0), $0.1) })
    }

    /// A response map; an exception carries its text as the result.
    public static func response(seq: Int64, result: MessagePack = .nil, exception: Bool = false) -> MessagePack {
        var pairs: [(MessagePack, MessagePack)] = [(.string("op"), .string("response")), (.string("seq_number"), .int(seq)), (.string("result"), result)]
        if exception { pairs.append((.string("is_exception"), .bool(true))) }
        return .map(pairs)
    }
}

/// A message that breaks the protocol: the connection is closed with this text logged.
public struct BuildbotProtocolError: Error, Sendable, Hashable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { self.message }
}

/// Our side's requests: numbers them, and checks that every response answers one that is
/// outstanding (a response with an unknown or repeated sequence number is a protocol error,
/// not a crash: the stock worker dies of a KeyError there).
public struct BuildbotRequests: Sendable {
    public private(set) var next: Int64 = 0
    public private(set) var outstanding: Set<Int64> = []
    /// At most this many of our requests may wait for answers.
    public var limit: Int

    public init(limit: Int = 4096) { self.limit = limit }

    /// Takes the next sequence number for a request.
    public mutating func send() throws(BuildbotProtocolError) -> Int64 {
        guard self.outstanding.count < self.limit else { throw BuildbotProtocolError("\(self.limit) requests already wait for answers") }
        let seq = self.next
        self.next += 1
        self.outstanding.insert(seq)
        return seq
    }

    /// A response arrived: it must answer an outstanding request.
    public mutating func receive(_ seq: Int64) throws(BuildbotProtocolError) {
        guard self.outstanding.remove(seq) != nil else {
            if seq < self.next {
                throw BuildbotProtocolError("a second response to request \(seq)")
            }
            throw BuildbotProtocolError("a response to request \(seq), which was never sent (the next is \(self.next))")
        }
    }

    /// The connection ended: every outstanding request fails.
    public mutating func drain() -> Set<Int64> {
        defer { self.outstanding = [] }
        return self.outstanding
    }
}

extension MessagePack {
    /// The kind of value, for errors.
    public var kindName: String {
        switch self {
        case .nil: return "nil"
        case .bool: return "a boolean"
        case .int, .uint: return "an integer"
        case .double: return "a float"
        case .string: return "a string"
        case .binary: return "binary"
        case .array: return "an array"
        case .map: return "a map"
        }
    }
}

/// What a worker's `update` messages say about a command: Buildbot sends a list of
/// `[key, value]` pairs per update.
public enum BuildbotUpdate: Sendable, Hashable {
    case stdout(String)
    case stderr(String)
    case header(String)
    case log(name: String, text: String)
    case rc(Int64)
    case elapsed(Double)
    /// glob and listdir.
    case files([String])
    /// stat: the ten values of Python's os.stat.
    case stat([Int64])
    case failureReason(String)
    /// A key this front end does not use.
    case other(String)

    /// Reads the `args` of an `update` message.
    public static func parse(_ args: MessagePack) throws(BuildbotProtocolError) -> [BuildbotUpdate] {
        guard let list = args.arrayValue else { throw BuildbotProtocolError("update: args must be a list of [key, value], not \(args.kindName)") }
        var updates: [BuildbotUpdate] = []
        for item in list {
            guard let pair = item.arrayValue, pair.count == 2, let key = pair[0].stringValue else {
                throw BuildbotProtocolError("update: an item that is not [key, value]: \(item)")
            }
            let value = pair[1]
            switch key {
            case "stdout", "stderr", "header":
                // [text, [newline indexes], [timestamps]] in this protocol; a bare string is taken too.
                let text = value.arrayValue?.first?.stringValue ?? value.stringValue
                guard let text else { throw BuildbotProtocolError("update: \(key) without text") }
                updates.append(key == "stdout" ? .stdout(text) : key == "stderr" ? .stderr(text) : .header(text))
            case "log":
                guard let parts = value.arrayValue, parts.count >= 2, let name = parts[0].stringValue else {
                    throw BuildbotProtocolError("update: log must be [name, [text, ...]]")
                }
                let text = parts[1].arrayValue?.first?.stringValue ?? parts[1].stringValue ?? ""
                updates.append(.log(name: name, text: text))
            case "rc":
                guard let rc = value.intValue else { throw BuildbotProtocolError("update: rc must be an integer, not \(value.kindName)") }
                updates.append(.rc(rc))
            case "elapsed":
                updates.append(.elapsed(value.doubleValue ?? 0))
            case "files":
                guard let files = value.arrayValue?.compactMap(\.stringValue) else { throw BuildbotProtocolError("update: files must be a list of strings") }
                updates.append(.files(files))
            case "stat":
                guard let values = value.arrayValue else { throw BuildbotProtocolError("update: stat must be a list") }
                // Held to Int64's range, not refused: an inode number can be above Int64.max,
                // and a float time is rounded toward zero (NaN, like a value that is not a
                // number, is 0).
                updates.append(.stat(values.map { $0.intValue ?? Int64(saturating: $0.doubleValue ?? 0) }))
            case "failure_reason":
                updates.append(.failureReason(value.stringValue ?? "\(value)"))
            default:
                updates.append(.other(key))
            }
        }
        return updates
    }
}
