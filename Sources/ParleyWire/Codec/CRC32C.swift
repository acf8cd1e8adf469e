import CParleyCRC32C
import NIOCore

/// CRC-32C (Castagnoli) as used by every Parley checksum.
public enum CRC32C {
    /// Checksum of `bytes`, continuing from `crc` (0 for a fresh checksum).
    @inlinable
    public static func checksum(_ bytes: UnsafeRawBufferPointer, continuing crc: UInt32 = 0) -> UInt32 {
        guard let base = bytes.baseAddress else { return crc }
        return parley_crc32c(crc, base, bytes.count)
    }

    public static func checksum(_ bytes: some Sequence<UInt8>) -> UInt32 {
        let array = Array(bytes)
        return array.withUnsafeBytes { checksum($0) }
    }

    /// Checksum of `length` readable bytes of `buffer` starting at `index`, without copying.
    @inlinable
    public static func checksum(_ buffer: ByteBuffer, at index: Int, length: Int) -> UInt32 {
        buffer.withUnsafeReadableBytes { raw in
            let start = index - buffer.readerIndex
            return checksum(UnsafeRawBufferPointer(rebasing: raw[start..<(start + length)]))
        }
    }

    /// Checksum of all readable bytes of `buffer`.
    @inlinable
    public static func checksum(_ buffer: ByteBuffer) -> UInt32 {
        buffer.withUnsafeReadableBytes { checksum($0) }
    }

    /// True when the SSE4.2 / ARMv8 instruction path is in use.
    public static var isHardwareAccelerated: Bool { parley_crc32c_hardware() != 0 }
}
