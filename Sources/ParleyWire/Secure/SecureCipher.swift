import CParleyAEAD
import Crypto
import NIOCore

/// The AEAD ciphers of secure mode (docs/protocol.md, "Secure mode").
public enum SecureCipher: String, Sendable, Hashable, CaseIterable {
    case aes256GCM = "aes-256-gcm"
    case chacha20Poly1305 = "chacha20-poly1305"

    public static let keySize = 32
    public static let nonceSize = 12
    public static let tagSize = 16

    var cValue: Int32 {
        switch self {
        case .aes256GCM: return Int32(CPARLEY_AEAD_AES_256_GCM)
        case .chacha20Poly1305: return Int32(CPARLEY_AEAD_CHACHA20_POLY1305)
        }
    }

    /// This machine's order of preference: AES-256-GCM first when the CPU has AES
    /// instructions, ChaCha20-Poly1305 first otherwise (it is faster in software).
    public static let preferred: [SecureCipher] =
        cparley_aead_cpu_has_aes() == 1 ? [.aes256GCM, .chacha20Poly1305] : [.chacha20Poly1305, .aes256GCM]
}

/// One direction's traffic secret: the cipher key and the nonce base (docs/protocol.md,
/// "Key schedule").
public struct SecureDirectionKeys: Hashable, Sendable {
    public var cipher: SecureCipher
    /// 32 bytes.
    public var key: [UInt8]
    /// 12 bytes, XORed with the message counter to make each nonce.
    public var iv: [UInt8]

    public init(cipher: SecureCipher, key: [UInt8], iv: [UInt8]) {
        precondition(key.count == SecureCipher.keySize && iv.count == SecureCipher.nonceSize)
        self.cipher = cipher
        self.key = key
        self.iv = iv
    }
}

/// One direction of a secure connection: an AEAD context and its message counter.
///
/// Every AEAD message (a frame has two: its preamble and its segments) uses the next counter
/// value; the nonce is `iv XOR counter` (the counter little-endian in bytes 0-7). When the
/// counter reaches a multiple of 2^32 the key is replaced by
/// `HKDF-Expand(key, "parley v1 key update", 32)` on both sides, without any frame saying so,
/// so that no key seals more than 2^32 messages. A counter never repeats: the direction
/// refuses to go past 2^64 - 2 (`keyExhausted`).
///
/// Used by one connection on its event loop; it owns a BoringSSL AEAD context, freed with it.
public final class SecureDirection {
    public let sealing: Bool
    // Not checked for exclusive access at run time (those checks, a thread-local lookup per
    // access, were about 1% of the samples of a secure 64 B pipelined run): a direction
    // belongs to one connection and is used on its event loop only, one call at a time, and
    // no access to these overlaps another.
    @exclusivity(unchecked) public private(set) var keys: SecureDirectionKeys
    /// The counter of the next message.
    @exclusivity(unchecked) public private(set) var counter: UInt64
    @exclusivity(unchecked) private var context: OpaquePointer
    /// AES-256-GCM opening piece by piece (made on first use; replaced with the key).
    @exclusivity(unchecked) private var stream: OpaquePointer?

    /// Messages sealed under one key before the next key update.
    public static let keyUpdateInterval: UInt64 = 1 << 32
    /// The last counter value a direction uses.
    public static let lastCounter: UInt64 = UInt64.max - 1

    /// - Parameter counter: where the counter starts: 0 on the wire. Tests start it near a
    ///   key update or near its end (on both sides); `keys` are then taken as the keys in
    ///   force at that counter value.
    public init(keys: SecureDirectionKeys, sealing: Bool, counter: UInt64 = 0) throws(ParleyError) {
        self.sealing = sealing
        self.keys = keys
        self.counter = counter
        self.context = try Self.makeContext(keys)
    }

    deinit {
        cparley_aead_free(self.context)
        cparley_gcm_stream_free(self.stream)
    }

    private static func makeContext(_ keys: SecureDirectionKeys) throws(ParleyError) -> OpaquePointer {
        guard let context = keys.key.withUnsafeBufferPointer({ cparley_aead_new(keys.cipher.cValue, $0.baseAddress) }) else {
            throw ParleyError(code: .protocolViolation, message: "internal: cannot create the \(keys.cipher.rawValue) context")
        }
        return context
    }

    static func updatedKey(_ key: [UInt8]) -> [UInt8] {
        let next = HKDF<SHA256>.expand(
            pseudoRandomKey: SymmetricKey(data: key), info: Array("parley v1 key update".utf8), outputByteCount: SecureCipher.keySize
        )
        return next.withUnsafeBytes { Array($0) }
    }

    /// The nonce of counter value `counter`.
    public static func nonce(iv: [UInt8], counter: UInt64) -> [UInt8] {
        var nonce = iv
        for i in 0..<8 { nonce[i] ^= UInt8(truncatingIfNeeded: counter >> (8 * UInt64(i))) }
        return nonce
    }

    /// Checks that a frame still fits before the counter's end. The last two counter values
    /// are kept for a CLOSE, so that a side that runs out can still say why.
    public func ensureRoom(forClose: Bool) throws(ParleyError) {
        let left = Self.lastCounter &- self.counter &+ 1  // counter <= lastCounter + 1
        guard self.counter <= Self.lastCounter, left >= (forClose ? 2 : 4) else {
            throw ParleyError(
                code: .keyExhausted,
                message: "secure mode message counter exhausted after \(self.counter) messages in this direction; the connection must be re-established"
            )
        }
    }

    /// Takes the next counter value: checks it, updates the key at an interval boundary, and
    /// returns the message's nonce (12 bytes, inline).
    private func next() throws(ParleyError) -> (UInt64, UInt32) {
        guard self.counter <= Self.lastCounter else {
            throw ParleyError(
                code: .keyExhausted,
                message: "secure mode message counter exhausted after \(self.counter) messages in this direction; the connection must be re-established"
            )
        }
        if self.counter > 0, self.counter % Self.keyUpdateInterval == 0 {
            self.keys.key = Self.updatedKey(self.keys.key)
            cparley_aead_free(self.context)
            self.context = try Self.makeContext(self.keys)
            cparley_gcm_stream_free(self.stream)
            self.stream = nil
        }
        var nonce: (UInt64, UInt32) = (0, 0)
        withUnsafeMutableBytes(of: &nonce) { n in
            self.keys.iv.withUnsafeBytes { n.copyMemory(from: $0) }
            n.storeBytes(of: n.load(as: UInt64.self) ^ self.counter.littleEndian, as: UInt64.self)
        }
        self.counter += 1
        return nonce
    }

    /// Seals one message in place: `length` bytes at `p`, its tag written at `p + length`.
    func seal(_ p: UnsafeMutableRawPointer, length: Int) throws(ParleyError) {
        var nonce = try self.next()
        let data = p.assumingMemoryBound(to: UInt8.self)
        let ok = withUnsafeBytes(of: &nonce) { n in
            cparley_aead_seal(self.context, n.baseAddress!.assumingMemoryBound(to: UInt8.self), data, length, data + length)
        }
        guard ok == 1 else { throw ParleyError(code: .protocolViolation, message: "internal: AEAD seal failed") }
    }

    /// Seals one message made of `length` bytes at `p` (in place) followed by the bytes of
    /// `extra`, encrypted straight into `p + length` (and the tag after them): a large data
    /// segment is read once and never copied.
    func seal(_ p: UnsafeMutableRawPointer, length: Int, extra: UnsafeRawBufferPointer) throws(ParleyError) {
        var nonce = try self.next()
        let data = p.assumingMemoryBound(to: UInt8.self)
        let ok = withUnsafeBytes(of: &nonce) { n in
            cparley_aead_seal_extra(
                self.context, n.baseAddress!.assumingMemoryBound(to: UInt8.self), data, length,
                extra.baseAddress?.assumingMemoryBound(to: UInt8.self), extra.count, data + length
            )
        }
        guard ok == 1 else { throw ParleyError(code: .protocolViolation, message: "internal: AEAD seal failed") }
    }

    /// Opens one message: decrypts `length` bytes from `from` to `to` (equal, or not
    /// overlapping) and checks the tag at `tag`. False if the tag is wrong.
    func open(from: UnsafeRawPointer, to: UnsafeMutableRawPointer, length: Int, tag: UnsafeRawPointer) throws(ParleyError) -> Bool {
        var nonce = try self.next()
        return withUnsafeBytes(of: &nonce) { n in
            cparley_aead_open(
                self.context, n.baseAddress!.assumingMemoryBound(to: UInt8.self), from.assumingMemoryBound(to: UInt8.self),
                to.assumingMemoryBound(to: UInt8.self), length, tag.assumingMemoryBound(to: UInt8.self)
            )
        } == 1
    }
}

extension SecureDirection {
    /// True if a message can be opened piece by piece (`beginOpening`): AES-256-GCM.
    var opensInPieces: Bool { !self.sealing && self.keys.cipher == .aes256GCM }

    /// Starts opening a message piece by piece: takes its counter value, like `open`. The
    /// pieces then go through `openPiece` in order and the tag through `finishOpening`; the
    /// plaintext means nothing until that returns true.
    func beginOpening() throws(ParleyError) {
        precondition(self.opensInPieces)
        var nonce = try self.next()
        if self.stream == nil {
            self.stream = self.keys.key.withUnsafeBufferPointer { cparley_gcm_stream_new($0.baseAddress) }
        }
        guard let stream = self.stream,
              withUnsafeBytes(of: &nonce, { cparley_gcm_stream_begin(stream, $0.baseAddress!.assumingMemoryBound(to: UInt8.self)) }) == 1
        else {
            throw ParleyError(code: .protocolViolation, message: "internal: cannot start an \(self.keys.cipher.rawValue) opening")
        }
    }

    /// Decrypts the next `length` bytes of the message begun with `beginOpening`.
    func openPiece(from: UnsafeRawPointer, to: UnsafeMutableRawPointer, length: Int) throws(ParleyError) {
        guard length > 0 else { return }
        guard let stream = self.stream,
              cparley_gcm_stream_update(stream, from.assumingMemoryBound(to: UInt8.self), to.assumingMemoryBound(to: UInt8.self), length) == 1
        else {
            throw ParleyError(code: .protocolViolation, message: "internal: \(self.keys.cipher.rawValue) decryption failed")
        }
    }

    /// Checks the tag of the message begun with `beginOpening`: false if it is wrong.
    func finishOpening(tag: UnsafeRawPointer) -> Bool {
        guard let stream = self.stream else { return false }
        return cparley_gcm_stream_finish(stream, tag.assumingMemoryBound(to: UInt8.self)) == 1
    }
}

/// The secure keys of both directions, as a handshake settles them.
public struct SecureSwitch: Hashable, Sendable {
    public var keys: SecureDirectionKeys
    public init(keys: SecureDirectionKeys) { self.keys = keys }
}

// MARK: - Sealed frames

/// Size of a sealed preamble on the wire: 32 bytes of ciphertext and a 16-byte tag.
public let sealedPreambleSize = Frame.preambleSize + SecureCipher.tagSize

extension Frame {
    /// Bytes on the wire in secure mode: sealed preamble, segments, one tag.
    public var sealedWireSize: Int { sealedPreambleSize + self.payloadSize + SecureCipher.tagSize }

    /// Seals the frame into one buffer appended to `out`: the preamble sealed alone, then all
    /// segments sealed as one message whose tag replaces the CRC epilogue. The segments are
    /// copied into the outgoing buffer and encrypted there in place.
    public func seal(with direction: SecureDirection, into out: inout [ByteBuffer], allocator: ByteBufferAllocator) throws(ParleyError) {
        try direction.ensureRoom(forClose: self.tag == .close)
        let total = self.payloadSize
        var buffer = allocator.buffer(capacity: self.sealedWireSize)
        buffer.writePreamble(self)
        try buffer.sealTail(segments: self.segments, total: total, with: direction)
        out.append(buffer)
    }
}

extension SecureDirection {
    /// `preamble` (32 bytes) sealed on its own: the 48 bytes a sender writes before a frame's
    /// segments. For checks that send a sealed preamble without its body, as a receiver must
    /// act on it before the body comes (a frame over the size limit).
    public func sealPreamble(_ preamble: ByteBuffer) throws(ParleyError) -> ByteBuffer {
        guard preamble.readableBytes == Frame.preambleSize else {
            throw ParleyError(code: .invalidArgument, message: "a preamble is \(Frame.preambleSize) bytes, not \(preamble.readableBytes)")
        }
        var out = ByteBuffer()
        out.writeImmutableBuffer(preamble)
        out.writeRepeatingByte(0, count: SecureCipher.tagSize)
        var failure: ParleyError?
        out.withUnsafeMutableReadableBytes { raw in
            do throws(ParleyError) {
                try self.seal(raw.baseAddress!, length: Frame.preambleSize)
            } catch {
                failure = error
            }
        }
        if let failure { throw failure }
        return out
    }
}

extension ByteBuffer {
    /// Seals the 32-byte preamble just written at the end of this (fresh, uniquely owned)
    /// buffer in place, then encrypts `segments` after its tag and appends the segments' tag.
    /// The buffer must have room for `16 + total + 16` more bytes.
    mutating func sealTail(segments: [ByteBuffer], total: Int, with direction: SecureDirection) throws(ParleyError) {
        let preambleStart = self.writerIndex - Frame.preambleSize
        var failure: ParleyError?
        let written = self.withVeryUnsafeMutableBytes { raw -> Int in
            precondition(raw.count >= preambleStart + sealedPreambleSize + total + SecureCipher.tagSize)
            let base = raw.baseAddress! + preambleStart
            // The segments side by side after the preamble's tag, then sealed there in place.
            var offset = sealedPreambleSize
            for segment in segments {
                let to = base + offset
                segment.withUnsafeReadableBytes { bytes in
                    if let from = bytes.baseAddress { to.copyMemory(from: from, byteCount: bytes.count) }
                }
                offset += segment.readableBytes
            }
            do {
                try direction.seal(base, length: Frame.preambleSize)
                try direction.seal(base + sealedPreambleSize, length: total)
                return SecureCipher.tagSize + total + SecureCipher.tagSize
            } catch {
                failure = error as? ParleyError ?? ParleyError(code: .protocolViolation, message: "internal: \(error)")
                return 0
            }
        }
        if let failure { throw failure }
        self.moveWriterIndex(forwardBy: written)
    }
}
