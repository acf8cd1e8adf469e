import CParleyBOINCRSA
import Crypto
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// BOINC's code signing, as the client checks it (lib/crypt.cpp): RSA of at most 1024 bits; a
/// file's signature is the private-key operation on the 32 ASCII characters of the file's MD5
/// in hex, padded with PKCS#1 v1.5 block type 1 and no DigestInfo; keys and signatures are
/// written in BOINC's text format (`BOINCKeyText`). The client refuses an executable without a
/// signature (-123) or with one that its key does not verify (-120), and it has no other
/// scheme. The RSA itself is BoringSSL's (`CParleyBOINCRSA`).
public enum BOINCSigning {
    /// BOINC's MAX_RSA_MODULUS_BITS.
    public static let maxBits = 1024
    /// The lengths of BOINC's key bodies (R_RSA_PRIVATE_KEY, R_RSA_PUBLIC_KEY) and of a modulus.
    public static let privateLength = 704, publicLength = 256, modulusLength = 128

    public struct PrivateKey: Sendable, Hashable {
        /// BOINC's R_RSA_PRIVATE_KEY body (704 bytes).
        public let body: [UInt8]
        public let bits: Int

        /// A new key (BoringSSL's generator, exponent 65537).
        public init(bits: Int = BOINCSigning.maxBits) throws(BOINCKeyError) {
            guard (512...BOINCSigning.maxBits).contains(bits) else { throw BOINCKeyError("a BOINC key has 512 to 1024 bits, not \(bits)") }
            var body = [UInt8](repeating: 0, count: BOINCSigning.privateLength)
            guard body.withUnsafeMutableBufferPointer({ cparley_boinc_rsa_generate(Int32(bits), $0.baseAddress) }) == 1 else {
                throw BOINCKeyError("BoringSSL could not make an RSA key")
            }
            self.body = body
            self.bits = bits
        }

        public init(body: [UInt8], bits: Int) throws(BOINCKeyError) {
            guard body.count == BOINCSigning.privateLength else {
                throw BOINCKeyError("a BOINC private key holds \(BOINCSigning.privateLength) bytes, not \(body.count)")
            }
            guard (512...BOINCSigning.maxBits).contains(bits) else { throw BOINCKeyError("a BOINC key has 512 to 1024 bits, not \(bits)") }
            self.body = body
            self.bits = bits
        }

        /// Reads BOINC's text format (`code_sign_private`).
        public init(text: String) throws(BOINCKeyError) {
            let (bits, body) = try BOINCKeyText.parse(text, length: BOINCSigning.privateLength, what: "private key")
            try self.init(body: body, bits: bits)
        }

        public var text: String { BOINCKeyText.format(bits: self.bits, body: self.body) }

        public var publicKey: PublicKey {
            // Its modulus and public exponent are the first 256 bytes of the private body.
            PublicKey(unchecked: Array(self.body.prefix(BOINCSigning.publicLength)), bits: self.bits)
        }

        /// The signature of `message` (raw: block type 1 padding, no DigestInfo).
        public func sign(_ message: [UInt8]) throws(BOINCKeyError) -> [UInt8] {
            var out = [UInt8](repeating: 0, count: BOINCSigning.modulusLength)
            var length = 0
            let ok = self.body.withUnsafeBufferPointer { body in
                message.withUnsafeBufferPointer { message in
                    out.withUnsafeMutableBufferPointer { out in
                        cparley_boinc_rsa_sign(body.baseAddress, message.baseAddress, message.count, out.baseAddress, out.count, &length)
                    }
                }
            }
            guard ok == 1 else { throw BOINCKeyError("the BOINC key could not sign (a malformed key?)") }
            return Array(out.prefix(length))
        }

        /// A file's signature as a BOINC client checks it: over the file's MD5 in hex, in
        /// BOINC's text format (hex lines and a "." line, no bits line).
        public func signature(ofFile bytes: [UInt8]) throws(BOINCKeyError) -> String {
            BOINCKeyText.hexBlock(try self.sign(Array(BOINCSigning.md5Hex(bytes).utf8)))
        }
    }

    public struct PublicKey: Sendable, Hashable {
        /// BOINC's R_RSA_PUBLIC_KEY body (256 bytes).
        public let body: [UInt8]
        public let bits: Int

        init(unchecked body: [UInt8], bits: Int) {
            self.body = body
            self.bits = bits
        }

        public init(body: [UInt8], bits: Int) throws(BOINCKeyError) {
            guard body.count == BOINCSigning.publicLength else {
                throw BOINCKeyError("a BOINC public key holds \(BOINCSigning.publicLength) bytes, not \(body.count)")
            }
            self.body = body
            self.bits = bits
        }

        /// Reads BOINC's text format (`code_sign_public`).
        public init(text: String) throws(BOINCKeyError) {
            let (bits, body) = try BOINCKeyText.parse(text, length: BOINCSigning.publicLength, what: "public key")
            try self.init(body: body, bits: bits)
        }

        public var text: String { BOINCKeyText.format(bits: self.bits, body: self.body) }

        /// The message a signature carries, or nil if this key did not make it.
        public func recover(_ signature: [UInt8]) -> [UInt8]? {
            var out = [UInt8](repeating: 0, count: BOINCSigning.modulusLength)
            var length = 0
            let ok = self.body.withUnsafeBufferPointer { body in
                signature.withUnsafeBufferPointer { signature in
                    out.withUnsafeMutableBufferPointer { out in
                        cparley_boinc_rsa_recover(body.baseAddress, signature.baseAddress, signature.count, out.baseAddress, out.count, &length)
                    }
                }
            }
            return ok == 1 ? Array(out.prefix(length)) : nil
        }

        /// Checks a file's signature (text format) as a BOINC client does.
        public func verify(file bytes: [UInt8], signature text: String) -> Bool {
            guard let signature = BOINCKeyText.parseHex(text) else { return false }
            return self.recover(signature) == Array(BOINCSigning.md5Hex(bytes).utf8)
        }
    }

    /// An MD5 in lower-case hex, as BOINC writes `md5_cksum`.
    public static func md5Hex(_ bytes: [UInt8]) -> String {
        Insecure.MD5.hash(data: bytes).map { String(format: "%02x", $0) }.joined()
    }

    /// Reads a private key file; refuses one that others may read (as `WorkSigning` does).
    public static func readPrivateKey(_ path: String) throws(BOINCKeyError) -> PrivateKey {
        guard let attributes = try? FileManager.default.attributesOfItem(atPath: path),
              let mode = (attributes[.posixPermissions] as? NSNumber)?.intValue else {
            throw BOINCKeyError("cannot read \(path): no such file")
        }
        guard mode & 0o077 == 0 else {
            throw BOINCKeyError("\(path) is readable by others (mode \(String(mode, radix: 8))): chmod 600 it")
        }
        guard let data = FileManager.default.contents(atPath: path) else { throw BOINCKeyError("cannot read \(path)") }
        do {
            return try PrivateKey(text: String(decoding: data, as: UTF8.self))
        } catch {
            throw BOINCKeyError("\(path): \(error.message)")
        }
    }

    /// Writes `code_sign_private` (mode 0600) and `code_sign_public` into `directory`, BOINC's
    /// names for them; refuses to overwrite.
    public static func writeKeyPair(_ key: PrivateKey, directory: String) throws(BOINCKeyError) {
        let privatePath = directory + "/code_sign_private", publicPath = directory + "/code_sign_public"
        for path in [privatePath, publicPath] where FileManager.default.fileExists(atPath: path) {
            throw BOINCKeyError("\(path) exists: not overwriting a key")
        }
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        } catch {
            throw BOINCKeyError("cannot create \(directory): \(error)")
        }
        try self.create(privatePath, key.text, mode: 0o600)
        try self.create(publicPath, key.publicKey.text, mode: 0o644)
    }

    /// Creates a file with its mode from the start (never readable by others, even briefly).
    private static func create(_ path: String, _ text: String, mode: mode_t) throws(BOINCKeyError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL, mode)
        guard fd >= 0 else { throw BOINCKeyError("cannot create \(path): errno \(errno)") }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        guard bytes.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == bytes.count else {
            throw BOINCKeyError("cannot write \(path): errno \(errno)")
        }
    }
}

/// BOINC's text format for keys and signatures (lib/crypt.cpp, `print_key_hex` /
/// `scan_key_hex`, `print_hex_data` / `sscan_hex_data`): a key is its size in bits on a line,
/// then its body in hex, 32 bytes a line, then a line holding ".". A signature is the same
/// without the bits line.
public enum BOINCKeyText {
    public static func hexBlock(_ bytes: [UInt8]) -> String {
        var text = ""
        for start in stride(from: 0, to: bytes.count, by: 32) {
            text += bytes[start..<min(bytes.count, start + 32)].map { String(format: "%02x", $0) }.joined() + "\n"
        }
        return text + ".\n"
    }

    public static func format(bits: Int, body: [UInt8]) -> String { "\(bits)\n" + self.hexBlock(body) }

    /// The bytes of a hex block (up to its "." line), or nil if it is not one.
    public static func parseHex(_ text: String) -> [UInt8]? {
        var bytes: [UInt8] = []
        var high: UInt8?
        for byte in text.utf8 {
            if byte == UInt8(ascii: ".") { return high == nil ? bytes : nil }
            if byte == 0x20 || byte == 0x0A || byte == 0x0D || byte == 0x09 { continue }
            guard let nibble = Self.nibble(byte) else { return nil }
            if let h = high {
                bytes.append(h << 4 | nibble)
                high = nil
            } else {
                high = nibble
            }
            if bytes.count > 4096 { return nil }
        }
        return nil
    }

    static func parse(_ text: String, length: Int, what: String) throws(BOINCKeyError) -> (bits: Int, body: [UInt8]) {
        let trimmed = text.drop { $0.isWhitespace }
        guard let newline = trimmed.firstIndex(of: "\n"), let bits = Int(trimmed[..<newline].trimmingCharacters(in: .whitespaces)) else {
            throw BOINCKeyError("a BOINC \(what) starts with its size in bits on a line")
        }
        guard (512...BOINCSigning.maxBits).contains(bits) else { throw BOINCKeyError("a BOINC \(what) has 512 to 1024 bits, not \(bits)") }
        guard let body = self.parseHex(String(trimmed[newline...])) else {
            throw BOINCKeyError("a BOINC \(what)'s body is hex lines ending with a \".\" line")
        }
        guard body.count == length else { throw BOINCKeyError("a BOINC \(what) holds \(length) bytes, not \(body.count)") }
        return (bits, body)
    }

    private static func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}

public struct BOINCKeyError: Error, Sendable, Hashable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { self.message }
}
