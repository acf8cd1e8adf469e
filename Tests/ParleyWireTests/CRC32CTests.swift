import CParleyCRC32C
import NIOCore
import ParleyTestSupport
import ParleyWire
import Testing

@Suite struct CRC32CTests {
    @Test func checkValue() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8]()) == 0)
        // RFC 3720 (iSCSI) B.4: 32 bytes of zeros, of 0xFF, and an ascending run.
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
        #expect(CRC32C.checksum((0..<32).map { UInt8($0) }) == 0x46DD_794E)
    }

    @Test func hardwareAndPortableAgreeAtEveryLengthAndAlignment() {
        var rng = SplitMix(seed: 42)
        let data = (0..<100_100).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        data.withUnsafeBytes { raw in
            for offset in 0..<9 {
                // Past 768 and 24,576 bytes the hardware path interleaves three streams.
                for length in [0, 1, 2, 7, 8, 9, 15, 16, 63, 64, 65, 767, 768, 769, 1000, 4096, 24_575, 24_576, 24_577, 30_000, 100_000]
                where offset + length <= raw.count {
                    let slice = UnsafeRawBufferPointer(rebasing: raw[offset..<(offset + length)])
                    let a = parley_crc32c(0, slice.baseAddress, length)
                    let b = parley_crc32c_portable(0, slice.baseAddress, length)
                    #expect(a == b, "offset \(offset) length \(length)")
                }
            }
        }
    }

    @Test func chainingEqualsOneCall() {
        let data = Array("The quick brown fox jumps over the lazy dog".utf8)
        let whole = CRC32C.checksum(data)
        for split in 0...data.count {
            let first = data[..<split].withUnsafeBytes { CRC32C.checksum($0) }
            let both = data[split...].withUnsafeBytes { CRC32C.checksum($0, continuing: first) }
            #expect(both == whole)
        }
    }
}
