/// The 64-bit feature masks exchanged in the banner.
///
/// A connection uses a feature only when both sides list it as supported. A side that
/// *requires* a feature its peer does not support refuses the connection (`missingFeatures`).
/// Bits this implementation does not know are carried and compared like any other.
public struct ParleyFeatures: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Bit 0: request streams (MESSAGE kinds STREAM_ITEM and CANCEL).
    public static let streams = ParleyFeatures(rawValue: 1 << 0)
    /// Bit 1: KEEPALIVE / KEEPALIVE_ACK frames.
    public static let keepalive = ParleyFeatures(rawValue: 1 << 1)
    /// Bit 2: NOTICE frames (nucleus fields after SERVER_IDENT).
    public static let notice = ParleyFeatures(rawValue: 1 << 2)
    /// Bit 3: the data segment (segment 2 of MESSAGE frames) for bulk bytes.
    public static let dataSegment = ParleyFeatures(rawValue: 1 << 3)
    /// Bit 4: DIRECT frames (tag 0x16), a service's lean exchange beside MESSAGE, used on a
    /// connection once a service enables it there (docs/protocol.md 7.16).
    public static let direct = ParleyFeatures(rawValue: 1 << 4)
    /// Bit 8: secure mode (AEAD frames); offered when a secure mode is configured.
    public static let secureMode = ParleyFeatures(rawValue: 1 << 8)
    /// Bit 9: lossless sessions (replay after reconnect); offered by servers that keep
    /// sessions and by clients that ask for them.
    public static let reconnect = ParleyFeatures(rawValue: 1 << 9)

    /// What this implementation supports.
    public static let implemented: ParleyFeatures = [.streams, .keepalive, .notice, .dataSegment, .direct]

    static let names: [(UInt64, String)] = [
        (1 << 0, "streams"), (1 << 1, "keepalive"), (1 << 2, "notice"), (1 << 3, "dataSegment"), (1 << 4, "direct"),
        (1 << 8, "secureMode"), (1 << 9, "reconnect"),
    ]

    /// Names of the set bits; unknown bits are shown as `bitN`.
    public var names: [String] {
        (0..<64).compactMap { bit -> String? in
            let mask = UInt64(1) << UInt64(bit)
            guard self.rawValue & mask != 0 else { return nil }
            return Self.names.first { $0.0 == mask }?.1 ?? "bit\(bit)"
        }
    }

    public var description: String {
        "0x" + String(self.rawValue, radix: 16) + " [" + self.names.joined(separator: ", ") + "]"
    }
}
