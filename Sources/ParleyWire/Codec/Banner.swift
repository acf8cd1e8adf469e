import NIOCore

/// The 32 bytes each side sends first (docs/protocol.md, "Banner").
///
/// ```
/// offset size  field
///   0     8    magic "PARLEY\r\n"  (50 41 52 4C 45 59 0D 0A)
///   8     2    protocol version, little-endian (1)
///  10     2    reserved, sent as 0, ignored on receipt
///  12     8    supported features, little-endian
///  20     8    required features, little-endian
///  28     4    CRC-32C of bytes 0..<28, little-endian
/// ```
public struct Banner: Hashable, Sendable {
    public static let magic: [UInt8] = Array("PARLEY\r\n".utf8)
    public static let size = 32
    /// The protocol version this implementation speaks.
    public static let currentVersion: UInt16 = 1

    public var version: UInt16
    public var supported: ParleyFeatures
    public var required: ParleyFeatures

    public init(version: UInt16 = Banner.currentVersion, supported: ParleyFeatures, required: ParleyFeatures = []) {
        self.version = version
        self.supported = supported
        self.required = required
    }
}

extension ByteBuffer {
    @discardableResult
    public mutating func writeBanner(_ banner: Banner) -> Int {
        let start = self.writerIndex
        self.writeBytes(Banner.magic)
        self.writeInteger(banner.version, endianness: .little)
        self.writeInteger(UInt16(0), endianness: .little)
        self.writeInteger(banner.supported.rawValue, endianness: .little)
        self.writeInteger(banner.required.rawValue, endianness: .little)
        let crc = CRC32C.checksum(self, at: start, length: 28)
        self.writeInteger(crc, endianness: .little)
        return Banner.size
    }

    /// Reads a banner if 32 bytes are available; returns nil (consuming nothing) otherwise.
    /// The magic is checked as soon as the bytes present allow, so a wrong peer is refused
    /// without waiting for 32 bytes.
    public mutating func readBanner() throws(ParleyError) -> Banner? {
        let available = min(self.readableBytes, 8)
        if let prefix = self.getBytes(at: self.readerIndex, length: available), prefix != Array(Banner.magic.prefix(available)) {
            throw ParleyError(
                code: .badMagic,
                message: "bad banner magic: expected \"PARLEY\\r\\n\" (50 41 52 4c 45 59 0d 0a), got \(prefix.hexString)"
            )
        }
        guard self.readableBytes >= Banner.size else { return nil }
        let start = self.readerIndex
        let expected = CRC32C.checksum(self, at: start, length: 28)
        let stored = self.getInteger(at: start + 28, endianness: .little, as: UInt32.self)!
        guard expected == stored else {
            throw ParleyError(
                code: .badPreambleCRC,
                message: "banner CRC mismatch: computed 0x\(String(expected, radix: 16)), banner says 0x\(String(stored, radix: 16))"
            )
        }
        self.moveReaderIndex(forwardBy: 8)
        let version = self.readInteger(endianness: .little, as: UInt16.self)!
        _ = self.readInteger(endianness: .little, as: UInt16.self)!
        let supported = self.readInteger(endianness: .little, as: UInt64.self)!
        let required = self.readInteger(endianness: .little, as: UInt64.self)!
        self.moveReaderIndex(forwardBy: 4)
        return Banner(version: version, supported: ParleyFeatures(rawValue: supported), required: ParleyFeatures(rawValue: required))
    }
}

extension Sequence<UInt8> {
    /// Lower-case hex with a space between bytes, for error messages and dumps.
    public var hexString: String {
        self.map { byte in
            let s = String(byte, radix: 16)
            return s.count == 1 ? "0" + s : s
        }.joined(separator: " ")
    }
}
