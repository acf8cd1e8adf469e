import Foundation
#if canImport(Glibc)
import CoreFoundation
import Glibc
#endif

/// A directory as a POSIX ustar stream, read a chunk at a time (the `upload_directory`
/// command, §19.8): directories, regular files and symbolic links (not followed), in a
/// stable order, names relative to the directory. Written by hand: no maintained Swift tar
/// package is available to this project, and writing ustar is a few fixed-width fields.
///
/// Not thread-safe: one task reads it at a time.
public final class WorkTarStream: @unchecked Sendable {
    enum Kind { case file, directory, symlink }

    struct Entry {
        var name: String
        var path: String
        var kind: Kind
        var size: UInt64
        var mode: UInt32
        var mtime: Int64
        var link: String
    }

    private var entries: [Entry]
    private var index = 0
    private var pending: [UInt8] = []
    private var fd: Int32 = -1
    private var remaining: UInt64 = 0
    private var padding = 0
    private var finished = false

    /// Lists `root` (a directory): every entry's header is made before anything is read, so a
    /// name too long for ustar (over 255 bytes, or a last part over 100) fails here.
    public init(root: String) throws(WorkFiles.FileError) {
        var entries: [Entry] = []
        func walk(_ relative: String) throws(WorkFiles.FileError) {
            let full = relative.isEmpty ? root : root + "/" + relative
            guard let names = try? FileManager.default.contentsOfDirectory(atPath: full) else {
                throw WorkFiles.FileError("cannot list '\(relative.isEmpty ? "." : relative)'")
            }
            for name in names.sorted() {
                let rel = relative.isEmpty ? name : relative + "/" + name
                let path = root + "/" + rel
                // attributesOfItem does not follow a symbolic link: the link itself is sent.
                guard let attributes = try? FileManager.default.attributesOfItem(atPath: path) else { continue }
                let mode = UInt32((attributes[.posixPermissions] as? NSNumber)?.uint32Value ?? 0o644) & 0o7777
                let mtime = Int64(saturating: (attributes[.modificationDate] as? Date)?.timeIntervalSince1970 ?? 0)
                switch attributes[.type] as? FileAttributeType {
                case .typeDirectory?:
                    entries.append(Entry(name: rel + "/", path: path, kind: .directory, size: 0, mode: mode, mtime: mtime, link: ""))
                    try walk(rel)
                case .typeRegular?:
                    let size = (attributes[.size] as? NSNumber)?.uint64Value ?? 0
                    entries.append(Entry(name: rel, path: path, kind: .file, size: size, mode: mode, mtime: mtime, link: ""))
                case .typeSymbolicLink?:
                    let link = (try? FileManager.default.destinationOfSymbolicLink(atPath: path)) ?? ""
                    entries.append(Entry(name: rel, path: path, kind: .symlink, size: 0, mode: mode, mtime: mtime, link: link))
                default:
                    continue  // FIFOs, sockets and devices are not sent
                }
                _ = try Self.header(entries[entries.count - 1])
            }
        }
        try walk("")
        self.entries = entries
    }

    deinit { if self.fd >= 0 { close(self.fd) } }

    /// The stream's size if the files keep their sizes: headers, contents, padding, the end.
    public var expectedSize: UInt64 {
        self.entries.reduce(1024) { $0 + 512 + ($1.size + 511) / 512 * 512 }
    }

    /// Up to `max` next bytes of the stream; empty at its end.
    public func next(max: Int) throws(WorkFiles.FileError) -> [UInt8] {
        var out: [UInt8] = []
        while out.count < max {
            if !self.pending.isEmpty {
                let n = min(max - out.count, self.pending.count)
                out += self.pending[0..<n]
                self.pending.removeFirst(n)
                continue
            }
            if self.remaining > 0 {
                var buffer = [UInt8](repeating: 0, count: Int(min(UInt64(max - out.count), self.remaining)))
                let n = buffer.withUnsafeMutableBytes { read(self.fd, $0.baseAddress, $0.count) }
                if n < 0 { throw WorkFiles.FileError("cannot read '\(self.entries[self.index - 1].name)': \(String(cString: strerror(errno)))") }
                if n == 0 {
                    // The file shrank while it was sent: zeros keep the stream's framing.
                    buffer = [UInt8](repeating: 0, count: buffer.count)
                    out += buffer
                    self.remaining -= UInt64(buffer.count)
                } else {
                    out += buffer[0..<n]
                    self.remaining -= UInt64(n)
                }
                if self.remaining == 0 { self.closeFile() }
                continue
            }
            if self.padding > 0 {
                self.pending = [UInt8](repeating: 0, count: self.padding)
                self.padding = 0
                continue
            }
            guard self.index < self.entries.count else {
                if self.finished { break }
                self.finished = true
                self.pending = [UInt8](repeating: 0, count: 1024)  // two zero blocks end the archive
                continue
            }
            let entry = self.entries[self.index]
            self.index += 1
            if entry.kind == .file {
                let fd = open(entry.path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
                guard fd >= 0 else { throw WorkFiles.FileError("cannot open '\(entry.name)': \(String(cString: strerror(errno)))") }
                self.fd = fd
                self.remaining = entry.size
                self.padding = Int((512 - entry.size % 512) % 512)
                if entry.size == 0 { self.closeFile() }
            }
            self.pending = try Self.header(entry)
        }
        return out
    }

    private func closeFile() {
        if self.fd >= 0 { close(self.fd) }
        self.fd = -1
    }

    /// The largest time a ustar header holds (11 octal digits).
    static let maxTarTime: UInt64 = 0o77777777777

    /// A ustar header block.
    static func header(_ entry: Entry) throws(WorkFiles.FileError) -> [UInt8] {
        var block = [UInt8](repeating: 0, count: 512)
        let name = Array(entry.name.utf8)
        var prefix: [UInt8] = []
        var last = name
        if name.count > 100 {
            // Split at a '/' so that the prefix fits 155 bytes and the rest 100.
            guard let cut = name.indices.filter({ name[$0] == UInt8(ascii: "/") && $0 <= 155 && name.count - $0 - 1 <= 100 && $0 > 0 }).last else {
                throw WorkFiles.FileError("'\(entry.name)' is too long a name for a tar stream (ustar: 255 bytes, 100 after the last '/')")
            }
            prefix = Array(name[..<cut])
            last = Array(name[(cut + 1)...])
        }
        let link = Array(entry.link.utf8)
        guard link.count <= 100 else { throw WorkFiles.FileError("the link '\(entry.name)' points too far for a tar stream (ustar: 100 bytes)") }
        func put(_ bytes: [UInt8], at offset: Int) { block.replaceSubrange(offset..<offset + bytes.count, with: bytes) }
        func octal(_ value: UInt64, width: Int) -> [UInt8] {
            Array(String(String(value, radix: 8).suffix(width - 1)).leftPadded(to: width - 1).utf8) + [0]
        }
        put(last, at: 0)
        put(octal(UInt64(entry.mode), width: 8), at: 100)
        put(octal(0, width: 8), at: 108)
        put(octal(0, width: 8), at: 116)
        guard entry.size < 1 << 33 else { throw WorkFiles.FileError("'\(entry.name)' is over 8 GiB, too large for a ustar stream") }
        put(octal(entry.size, width: 12), at: 124)
        // The field holds 11 octal digits: a time before 1970 is 0, one past 2242 the largest.
        put(octal(min(UInt64(max(0, entry.mtime)), Self.maxTarTime), width: 12), at: 136)
        put(Array("        ".utf8), at: 148)
        block[156] = entry.kind == .directory ? UInt8(ascii: "5") : entry.kind == .symlink ? UInt8(ascii: "2") : UInt8(ascii: "0")
        put(link, at: 157)
        put(Array("ustar".utf8) + [0], at: 257)
        put(Array("00".utf8), at: 263)
        put(prefix, at: 345)
        let sum = block.reduce(0) { $0 + Int($1) }
        put(Array(String(String(sum, radix: 8)).leftPadded(to: 6).utf8) + [0, UInt8(ascii: " ")], at: 148)
        return block
    }
}

extension String {
    fileprivate func leftPadded(to width: Int) -> String {
        self.count >= width ? self : String(repeating: "0", count: width - self.count) + self
    }
}
