import Foundation

/// A MessagePack value (https://github.com/msgpack/msgpack/blob/master/spec.md), as Buildbot's
/// `msgpack_experimental_v7` worker protocol uses it: one map per WebSocket binary frame.
///
/// Written by hand: no maintained Swift MessagePack package is among the packages this
/// project can depend on, and the subset needed is small (no extension types; Buildbot's
/// `msgpack.packb(..., use_bin_type=True)` never sends them).
public enum MessagePack: Sendable, Hashable {
    case `nil`
    case bool(Bool)
    case int(Int64)
    case uint(UInt64)
    case double(Double)
    case string(String)
    case binary([UInt8])
    case array([MessagePack])
    /// Keys in the order they came (a map is a list of pairs on the wire).
    case map([(MessagePack, MessagePack)])

    public static func == (a: MessagePack, b: MessagePack) -> Bool {
        switch (a, b) {
        case (.nil, .nil): return true
        case (.bool(let x), .bool(let y)): return x == y
        case (.int(let x), .int(let y)): return x == y
        case (.uint(let x), .uint(let y)): return x == y
        case (.int(let x), .uint(let y)), (.uint(let y), .int(let x)): return x >= 0 && UInt64(x) == y
        case (.double(let x), .double(let y)): return x == y || (x.isNaN && y.isNaN)
        case (.string(let x), .string(let y)): return x == y
        case (.binary(let x), .binary(let y)): return x == y
        case (.array(let x), .array(let y)): return x == y
        case (.map(let x), .map(let y)):
            return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: return false
        }
    }

    public func hash(into hasher: inout Hasher) {
        switch self {
        case .nil: hasher.combine(0)
        case .bool(let b): hasher.combine(b)
        case .int(let i): hasher.combine(i >= 0 ? UInt64(i) : UInt64(bitPattern: i))
        case .uint(let u): hasher.combine(u)
        // Every NaN is equal to every other here (==): one hash for all of them (Double's
        // own hashes the bit pattern, and NaNs have many).
        case .double(let d): d.isNaN ? hasher.combine(UInt64.max) : hasher.combine(d)
        case .string(let s): hasher.combine(s)
        case .binary(let b): hasher.combine(b)
        case .array(let a): hasher.combine(a)
        case .map(let m):
            hasher.combine(m.count)
            for (k, v) in m {
                hasher.combine(k)
                hasher.combine(v)
            }
        }
    }

    // MARK: Reading values

    /// The value for `key` in a map whose keys are strings; nil if absent or not a map.
    public subscript(key: String) -> MessagePack? {
        guard case .map(let pairs) = self else { return nil }
        for (k, v) in pairs where k == .string(key) { return v }
        return nil
    }

    public var stringValue: String? {
        if case .string(let s) = self { return s }
        return nil
    }

    /// An integer that fits Int64, whichever way it was encoded.
    public var intValue: Int64? {
        switch self {
        case .int(let i): return i
        case .uint(let u): return u <= UInt64(Int64.max) ? Int64(u) : nil
        default: return nil
        }
    }

    /// A number (integer or float) as Double.
    public var doubleValue: Double? {
        switch self {
        case .int(let i): return Double(i)
        case .uint(let u): return Double(u)
        case .double(let d): return d
        default: return nil
        }
    }

    public var boolValue: Bool? {
        if case .bool(let b) = self { return b }
        return nil
    }

    public var binaryValue: [UInt8]? {
        if case .binary(let b) = self { return b }
        return nil
    }

    public var arrayValue: [MessagePack]? {
        if case .array(let a) = self { return a }
        return nil
    }

    public var mapValue: [(MessagePack, MessagePack)]? {
        if case .map(let m) = self { return m }
        return nil
    }

    public var isNil: Bool {
        if case .nil = self { return true }
        return false
    }

    /// A map with string keys, built in order.
    public static func object(_ pairs: KeyValuePairs<String, MessagePack>) -> MessagePack {
        .map(pairs.map { (.string($0.key), $0.value) })
    }
}

extension MessagePack: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByBooleanLiteral, ExpressibleByNilLiteral {
    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int64) { self = .int(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(nilLiteral: ()) { self = .nil }
}

extension MessagePack: CustomStringConvertible {
    /// JSON-like text for logs and errors; binary shown by size.
    public var description: String {
        switch self {
        case .nil: return "nil"
        case .bool(let b): return String(b)
        case .int(let i): return String(i)
        case .uint(let u): return String(u)
        case .double(let d): return String(d)
        case .string(let s): return "\"\(s)\""
        case .binary(let b): return "<\(b.count) bytes>"
        case .array(let a): return "[" + a.map(\.description).joined(separator: ", ") + "]"
        case .map(let m): return "{" + m.map { "\($0.0): \($0.1)" }.joined(separator: ", ") + "}"
        }
    }
}

/// Why bytes are not one MessagePack value.
public struct MessagePackError: Error, Sendable, Hashable, CustomStringConvertible {
    public var message: String
    /// Where in the input it was found.
    public var offset: Int
    public var description: String { "bad MessagePack at byte \(self.offset): \(self.message)" }
}

extension MessagePack {
    /// Limits on what a decoder accepts: a peer cannot make it recurse or allocate without end.
    public struct Limits: Sendable, Hashable {
        /// Arrays and maps nested deeper than this are refused.
        public var maxDepth: Int = 64
        /// Elements of one array, or pairs of one map.
        public var maxCount: Int = 1 << 20
        /// Values in the whole message (each element, key and container counts one). Every
        /// value takes a byte or more of the message and some 24 to 64 bytes of memory once
        /// decoded (an array of one element, `0x91`, a heap allocation): without a total,
        /// a 16 MiB message of nested one-element arrays would take about 1 GiB.
        public var maxValues: Int = 1 << 20
        public init(maxDepth: Int = 64, maxCount: Int = 1 << 20, maxValues: Int = 1 << 20) {
            self.maxDepth = maxDepth
            self.maxCount = maxCount
            self.maxValues = maxValues
        }
    }

    /// Decodes exactly one value filling `bytes`: trailing bytes, truncation, the reserved byte
    /// 0xc1, extension types, strings that are not UTF-8 and nesting past the limits are
    /// errors naming the byte.
    public static func decode(_ bytes: some Collection<UInt8>, limits: Limits = Limits()) throws(MessagePackError) -> MessagePack {
        var reader = Reader(bytes: Array(bytes), limits: limits)
        let value = try reader.value(depth: 0)
        guard reader.position == reader.bytes.count else {
            throw MessagePackError(message: "\(reader.bytes.count - reader.position) bytes after the value", offset: reader.position)
        }
        return value
    }

    /// The value's encoding, smallest form first, as the MessagePack spec asks.
    public func encoded() -> [UInt8] {
        var out: [UInt8] = []
        self.encode(into: &out)
        return out
    }

    public func encode(into out: inout [UInt8]) {
        switch self {
        case .nil: out.append(0xc0)
        case .bool(let b): out.append(b ? 0xc3 : 0xc2)
        case .int(let i):
            if i >= 0 {
                MessagePack.uint(UInt64(i)).encode(into: &out)
            } else if i >= -32 {
                out.append(UInt8(bitPattern: Int8(i)))
            } else if i >= Int64(Int8.min) {
                out.append(0xd0)
                out.append(UInt8(bitPattern: Int8(i)))
            } else if i >= Int64(Int16.min) {
                out.append(0xd1)
                Self.append(UInt64(UInt16(bitPattern: Int16(i))), bytes: 2, to: &out)
            } else if i >= Int64(Int32.min) {
                out.append(0xd2)
                Self.append(UInt64(UInt32(bitPattern: Int32(i))), bytes: 4, to: &out)
            } else {
                out.append(0xd3)
                Self.append(UInt64(bitPattern: i), bytes: 8, to: &out)
            }
        case .uint(let u):
            if u < 0x80 {
                out.append(UInt8(u))
            } else if u <= 0xff {
                out.append(0xcc)
                out.append(UInt8(u))
            } else if u <= 0xffff {
                out.append(0xcd)
                Self.append(u, bytes: 2, to: &out)
            } else if u <= 0xffff_ffff {
                out.append(0xce)
                Self.append(u, bytes: 4, to: &out)
            } else {
                out.append(0xcf)
                Self.append(u, bytes: 8, to: &out)
            }
        case .double(let d):
            out.append(0xcb)
            Self.append(d.bitPattern, bytes: 8, to: &out)
        case .string(let s):
            let utf8 = Array(s.utf8)
            if utf8.count < 32 {
                out.append(0xa0 | UInt8(utf8.count))
            } else {
                Self.header(utf8.count, one: 0xd9, two: 0xda, four: 0xdb, to: &out)
            }
            out.append(contentsOf: utf8)
        case .binary(let b):
            Self.header(b.count, one: 0xc4, two: 0xc5, four: 0xc6, to: &out)
            out.append(contentsOf: b)
        case .array(let a):
            if a.count < 16 {
                out.append(0x90 | UInt8(a.count))
            } else {
                Self.header(a.count, one: nil, two: 0xdc, four: 0xdd, to: &out)
            }
            for v in a { v.encode(into: &out) }
        case .map(let m):
            if m.count < 16 {
                out.append(0x80 | UInt8(m.count))
            } else {
                Self.header(m.count, one: nil, two: 0xde, four: 0xdf, to: &out)
            }
            for (k, v) in m {
                k.encode(into: &out)
                v.encode(into: &out)
            }
        }
    }

    private static func header(_ count: Int, one: UInt8?, two: UInt8, four: UInt8, to out: inout [UInt8]) {
        if let one, count <= 0xff {
            out.append(one)
            out.append(UInt8(count))
        } else if count <= 0xffff {
            out.append(two)
            Self.append(UInt64(count), bytes: 2, to: &out)
        } else {
            out.append(four)
            Self.append(UInt64(count), bytes: 4, to: &out)
        }
    }

    private static func append(_ value: UInt64, bytes: Int, to out: inout [UInt8]) {
        for i in stride(from: bytes - 1, through: 0, by: -1) {
            out.append(UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))))
        }
    }

    private struct Reader {
        let bytes: [UInt8]
        let limits: Limits
        var position = 0
        /// Values decoded so far.
        var values = 0

        mutating func byte() throws(MessagePackError) -> UInt8 {
            guard self.position < self.bytes.count else { throw MessagePackError(message: "truncated: the value needs more bytes", offset: self.position) }
            defer { self.position += 1 }
            return self.bytes[self.position]
        }

        mutating func integer(_ count: Int) throws(MessagePackError) -> UInt64 {
            guard self.bytes.count - self.position >= count else {
                throw MessagePackError(message: "truncated: a \(count)-byte number needs \(count - (self.bytes.count - self.position)) more bytes", offset: self.position)
            }
            var v: UInt64 = 0
            for i in 0..<count { v = v << 8 | UInt64(self.bytes[self.position + i]) }
            self.position += count
            return v
        }

        mutating func take(_ count: Int) throws(MessagePackError) -> ArraySlice<UInt8> {
            guard count <= self.bytes.count - self.position else {
                throw MessagePackError(message: "truncated: \(count) bytes announced, \(self.bytes.count - self.position) left", offset: self.position)
            }
            defer { self.position += count }
            return self.bytes[self.position..<self.position + count]
        }

        mutating func string(_ count: Int, at start: Int) throws(MessagePackError) -> MessagePack {
            let raw = try self.take(count)
            guard let s = String(validating: raw, as: UTF8.self) else {
                throw MessagePackError(message: "a string that is not UTF-8", offset: start)
            }
            return .string(s)
        }

        mutating func count(_ n: UInt64, at start: Int, minimumBytesEach: Int) throws(MessagePackError) -> Int {
            // Every element takes at least one byte: a count past what is left is a lie, caught
            // before anything is allocated.
            guard n <= UInt64(self.limits.maxCount) else {
                throw MessagePackError(message: "\(n) elements, more than the limit of \(self.limits.maxCount)", offset: start)
            }
            guard Int(n) * minimumBytesEach <= self.bytes.count - self.position else {
                throw MessagePackError(message: "truncated: \(n) elements announced, \(self.bytes.count - self.position) bytes left", offset: start)
            }
            return Int(n)
        }

        mutating func array(_ n: UInt64, depth: Int, at start: Int) throws(MessagePackError) -> MessagePack {
            let n = try self.count(n, at: start, minimumBytesEach: 1)
            var values: [MessagePack] = []
            values.reserveCapacity(n)
            for _ in 0..<n { values.append(try self.value(depth: depth + 1)) }
            return .array(values)
        }

        mutating func map(_ n: UInt64, depth: Int, at start: Int) throws(MessagePackError) -> MessagePack {
            let n = try self.count(n, at: start, minimumBytesEach: 2)
            var pairs: [(MessagePack, MessagePack)] = []
            pairs.reserveCapacity(n)
            for _ in 0..<n {
                let k = try self.value(depth: depth + 1)
                let v = try self.value(depth: depth + 1)
                pairs.append((k, v))
            }
            return .map(pairs)
        }

        mutating func value(depth: Int) throws(MessagePackError) -> MessagePack {
            let start = self.position
            guard depth <= self.limits.maxDepth else {
                throw MessagePackError(message: "arrays and maps nested deeper than \(self.limits.maxDepth)", offset: start)
            }
            self.values += 1
            guard self.values <= self.limits.maxValues else {
                throw MessagePackError(message: "more than \(self.limits.maxValues) values in one message", offset: start)
            }
            let b = try self.byte()
            switch b {
            case 0x00...0x7f: return .int(Int64(b))
            case 0x80...0x8f: return try self.map(UInt64(b & 0x0f), depth: depth, at: start)
            case 0x90...0x9f: return try self.array(UInt64(b & 0x0f), depth: depth, at: start)
            case 0xa0...0xbf: return try self.string(Int(b & 0x1f), at: start)
            case 0xc0: return .nil
            case 0xc1: throw MessagePackError(message: "the reserved byte 0xc1", offset: start)
            case 0xc2: return .bool(false)
            case 0xc3: return .bool(true)
            case 0xc4: return .binary(Array(try self.take(Int(try self.integer(1)))))
            case 0xc5: return .binary(Array(try self.take(Int(try self.integer(2)))))
            case 0xc6: return .binary(Array(try self.take(Int(try self.integer(4)))))
            case 0xc7, 0xc8, 0xc9, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8:
                throw MessagePackError(message: String(format: "an extension type (0x%02x), which this protocol never uses", b), offset: start)
            case 0xca: return .double(Double(Float(bitPattern: UInt32(try self.integer(4)))))
            case 0xcb: return .double(Double(bitPattern: try self.integer(8)))
            case 0xcc: return .int(Int64(try self.integer(1)))
            case 0xcd: return .int(Int64(try self.integer(2)))
            case 0xce: return .int(Int64(try self.integer(4)))
            case 0xcf:
                let u = try self.integer(8)
                return u <= UInt64(Int64.max) ? .int(Int64(u)) : .uint(u)
            case 0xd0: return .int(Int64(Int8(truncatingIfNeeded: try self.integer(1))))
            case 0xd1: return .int(Int64(Int16(truncatingIfNeeded: try self.integer(2))))
            case 0xd2: return .int(Int64(Int32(truncatingIfNeeded: try self.integer(4))))
            case 0xd3: return .int(Int64(bitPattern: try self.integer(8)))
            case 0xd9: return try self.string(Int(try self.integer(1)), at: start)
            case 0xda: return try self.string(Int(try self.integer(2)), at: start)
            case 0xdb: return try self.string(Int(try self.integer(4)), at: start)
            case 0xdc: return try self.array(try self.integer(2), depth: depth, at: start)
            case 0xdd: return try self.array(try self.integer(4), depth: depth, at: start)
            case 0xde: return try self.map(try self.integer(2), depth: depth, at: start)
            case 0xdf: return try self.map(try self.integer(4), depth: depth, at: start)
            default: return .int(Int64(Int8(bitPattern: b)))  // 0xe0...0xff: negative fixint
            }
        }
    }
}
