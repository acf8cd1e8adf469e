import Crypto
import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import NIOConcurrencyHelpers
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// The file upload handler's requests, as the client 7.20 sends them (client/file_xfer.cpp):
///
///     <data_server_request> <core_client_major_version>7</...> ...
///     <get_file_size>NAME</get_file_size>
///     </data_server_request>
///
/// or a header left open, then the bytes:
///
///     <data_server_request> ... <file_upload> <file_info> <name>NAME</name>
///     <xml_signature>GRANT</xml_signature> ... </file_info>
///     <nbytes>N</nbytes> <md5_cksum>HEX</md5_cksum> <offset>O</offset> <data>
///     BYTES
///
/// The header is read with Foundation's event parser (`XMLParser`, the one under XMLCoder):
/// its elements are delivered as they come, so the open end (which is BOINC's framing, not an
/// error of the client's) leaves them intact, where XMLCoder would want a whole document.
public enum BOINCUpload {
    public struct Request: Sendable, Hashable {
        public var fileName: String
        public var kind: Kind
    }

    public enum Kind: Sendable, Hashable {
        /// How many bytes of the file the handler has (to resume an upload).
        case size
        /// Bytes of the file from `offset`; the whole file is `nbytes` long with MD5 `md5`;
        /// `grant`: the `<xml_signature>` the client sends back.
        case data(offset: Int64, nbytes: Int64, md5: String, grant: String, data: [UInt8])
    }

    static let dataTag = Array("<data>\n".utf8)

    public static func read(_ body: [UInt8], maxHeaderBytes: Int) -> Result<Request, BOINCRefusal> {
        let headerEnd = Self.find(Self.dataTag, in: body, within: maxHeaderBytes)
        let header = Array(body[..<(headerEnd ?? min(body.count, maxHeaderBytes + 1))])
        guard header.count <= maxHeaderBytes else {
            return .failure(.init(status: 413, message: "the upload request's header is over \(maxHeaderBytes) bytes"))
        }
        if let refusal = BOINCXMLText.encodingRefusal(header) {
            return .failure(.init(status: 400, message: "the upload request's header \(refusal)"))
        }
        let shape = BOINCXMLText.shape(header, depthLimit: 16)
        if let depth = shape.depth {
            return .failure(.init(status: 400, message: "the upload request nests elements \(depth) deep"))
        }
        guard !shape.declaration else {
            return .failure(.init(status: 400, message: "the upload request declares a document type or entities (<!...>), which BOINC clients do not send"))
        }
        let fields = HeaderReader.read(header)
        guard fields.root == "data_server_request" else {
            return .failure(.init(status: 400, message: "the upload request is not a <data_server_request>"))
        }
        if let name = fields.values["data_server_request/get_file_size"] {
            return Self.checked(name).map { Request(fileName: $0, kind: .size) }
        }
        guard let headerEnd else {
            return .failure(.init(status: 400, message: "the upload request has neither <get_file_size> nor <file_upload> with <data>"))
        }
        let path = "data_server_request/file_upload/"
        guard let name = fields.values[path + "file_info/name"], let nbytes = fields.values[path + "nbytes"].flatMap(Self.integer),
              let offset = fields.values[path + "offset"].flatMap(Self.integer) else {
            return .failure(.init(status: 400, message: "the upload request's header lacks its file's <name>, <nbytes> or <offset>"))
        }
        let md5 = fields.values[path + "md5_cksum"] ?? ""
        let grant = fields.values[path + "file_info/xml_signature"] ?? ""
        let data = Array(body[(headerEnd + Self.dataTag.count)...])
        return Self.checked(name).map { Request(fileName: $0, kind: .data(offset: offset, nbytes: nbytes, md5: md5, grant: grant, data: data)) }
    }

    static func checked(_ name: String) -> Result<String, BOINCRefusal> {
        let ok = (1...255).contains(name.utf8.count) && name.utf8.allSatisfy { c in
            (0x30...0x39).contains(c) || (0x41...0x5A).contains(c) || (0x61...0x7A).contains(c) || c == UInt8(ascii: "_") || c == UInt8(ascii: "-") || c == UInt8(ascii: ".")
        } && !name.hasPrefix(".")
        return ok ? .success(name) : .failure(.init(status: 400, message: "the file name '\(name.prefix(80))' is not one this project gives"))
    }

    /// BOINC prints sizes and offsets with `%.0f`.
    static func integer(_ text: String) -> Int64? {
        guard let value = Double(text.trimmingCharacters(in: .whitespacesAndNewlines)), value.isFinite, value >= 0, value < 1e15, value == value.rounded() else { return nil }
        return Int64(value)
    }

    /// Where `needle` starts in `haystack`, at `from` or after and at `within` or before.
    static func find(_ needle: [UInt8], in haystack: [UInt8], within: Int, from: Int = 0) -> Int? {
        guard !needle.isEmpty, haystack.count >= needle.count else { return nil }
        let last = min(haystack.count - needle.count, within)
        var i = max(0, from)
        while i <= last {
            if haystack[i] == needle[0] {
                var k = 1
                while k < needle.count && haystack[i + k] == needle[k] { k += 1 }
                if k == needle.count { return i }
            }
            i += 1
        }
        return nil
    }

    /// Collects the text of leaf elements by their path from the root.
    final class HeaderReader: NSObject, XMLParserDelegate {
        var root: String?
        var stack: [String] = []
        var text = ""
        var values: [String: String] = [:]

        static func read(_ header: [UInt8]) -> (root: String?, values: [String: String]) {
            let reader = HeaderReader()
            let parser = XMLParser(data: Data(header))
            parser.shouldResolveExternalEntities = false
            parser.delegate = reader
            _ = parser.parse()  // fails at the open end: what came before is kept
            return (reader.root, reader.values)
        }

        func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?, attributes: [String: String] = [:]) {
            if self.root == nil { self.root = name }
            self.stack.append(name)
            self.text = ""
            if self.stack.count > 16 { parser.abortParsing() }
        }

        func parser(_ parser: XMLParser, foundCharacters string: String) {
            if self.text.utf8.count < 4096 { self.text += string }
        }

        func parser(_ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?) {
            let path = self.stack.joined(separator: "/")
            if self.values[path] == nil { self.values[path] = self.text.trimmingCharacters(in: .whitespacesAndNewlines) }
            self.text = ""
            _ = self.stack.popLast()
        }
    }
}

/// Uploaded output files, in a directory, until their result is reported: a file is written
/// under a temporary name as its bytes come (an upload may resume at an offset), and takes
/// its name when all of it has come and its MD5 matches.
///
/// The file work runs on NIO's blocking thread pool, never on the tasks' shared threads, and
/// each file has a lock of its own: a slow disk or a large upload holds up only the calls
/// for the same file.
final class BOINCUploadStore: Sendable {
    let directory: String
    private let pool: NIOThreadPool
    /// Locks of the files in use, with how many calls hold or wait for each.
    private let locks = NIOLockedValueBox<[String: (lock: NIOLock, users: Int)]>([:])

    /// Called with a file's name under its lock, before any work on it (tests hold calls
    /// up with it).
    private let holding: (@Sendable (String) -> Void)?

    init(directory: String, pool: NIOThreadPool = .singleton, holding: (@Sendable (String) -> Void)? = nil) throws {
        self.directory = directory
        self.pool = pool
        self.holding = holding
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    private func path(_ name: String) -> String { self.directory + "/" + name }

    /// Runs `body` on the blocking pool holding the lock of file `name`.
    private func withFile<T: Sendable>(_ name: String, _ body: @escaping @Sendable () -> T) async throws -> T {
        try await self.pool.runIfActive { () -> T in
            let lock = self.locks.withLockedValue { locks -> NIOLock in
                let entry = locks[name] ?? (NIOLock(), 0)
                locks[name] = (entry.lock, entry.users + 1)
                return entry.lock
            }
            defer {
                self.locks.withLockedValue { locks in
                    if let entry = locks[name] { locks[name] = entry.users > 1 ? (entry.lock, entry.users - 1) : nil }
                }
            }
            return lock.withLock {
                self.holding?(name)
                return body()
            }
        }
    }

    /// Bytes of the file the handler has: all of it once complete, else what came so far.
    func size(_ name: String) async throws -> Int64 {
        try await self.withFile(name) {
            for p in [self.path(name), self.path(name) + ".part"] {
                if let attributes = try? FileManager.default.attributesOfItem(atPath: p), let size = attributes[.size] as? NSNumber {
                    return size.int64Value
                }
            }
            return 0
        }
    }

    /// An upload under way: its bytes are written at `position` as they come, and only
    /// while no later upload of the same file has begun (a client that gave up on a
    /// connection and resumed on another: the old one's bytes must not land in the new one's).
    struct Ticket: Sendable {
        let name: String
        let generation: UInt64
        /// Where this request's bytes start, and the whole file's length and MD5.
        let start: Int64
        let total: Int64
        let md5: String
        fileprivate(set) var position: Int64
    }

    enum Opened: Sendable {
        /// The file is already whole with this length and MD5: nothing to write.
        case whole
        case open(Ticket)
        case refused(BOINCRefusal)
    }

    /// The upload of each file under way now, by its generation.
    private let current = NIOLockedValueBox<(next: UInt64, by: [String: UInt64])>((1, [:]))

    /// Begins an upload of `name`'s bytes from `offset` (the whole file `total` bytes with
    /// MD5 `md5`): the part file is cut to `offset`, which must not be past what it holds.
    /// Every `begin` is ended by `finish` or `abandon`.
    func begin(_ name: String, offset: Int64, total: Int64, md5: String) async throws -> Opened {
        try await self.withFile(name) {
            let final = self.path(name), part = final + ".part"
            if let existing = FileManager.default.contents(atPath: final) {
                // Already whole: the same bytes again are fine; others do not replace them.
                return Int64(existing.count) == total && BOINCSigning.md5Hex(Array(existing)) == md5.lowercased()
                    ? .whole : .refused(.init(status: 409, message: "\(name) was already uploaded with other content; nothing was stored"))
            }
            let have = Self.size(of: part) ?? 0
            guard offset <= have else {
                return .refused(.init(status: 400, message: "\(name): an upload at offset \(offset), but only \(have) bytes came before"))
            }
            if !FileManager.default.fileExists(atPath: part) { _ = FileManager.default.createFile(atPath: part, contents: nil) }
            guard truncate(part, off_t(offset)) == 0 else {
                return .refused(.init(status: 500, message: "\(name): cannot write the upload: \(String(cString: strerror(errno)))"))
            }
            let generation = self.current.withLockedValue { current -> UInt64 in
                let g = current.next
                current.next += 1
                current.by[name] = g
                return g
            }
            return .open(Ticket(name: name, generation: generation, start: offset, total: total, md5: md5, position: offset))
        }
    }

    /// Writes `bytes` at the ticket's position. Refused when a later upload of the file has
    /// begun or the part file was removed meanwhile (its job ended).
    func append(_ ticket: inout Ticket, _ bytes: [UInt8]) async throws -> BOINCRefusal? {
        let t = ticket
        let refusal = try await self.withFile(t.name) { () -> BOINCRefusal? in
            guard self.current.withLockedValue({ $0.by[t.name] }) == t.generation else {
                return .init(status: 409, message: "\(t.name): another upload of this file began meanwhile; this one's bytes were not stored")
            }
            let part = self.path(t.name) + ".part"
            guard Self.size(of: part) == t.position, let handle = FileHandle(forUpdatingAtPath: part) else {
                return .init(status: 409, message: "\(t.name): the upload was removed meanwhile (its job ended); nothing more was stored")
            }
            defer { try? handle.close() }
            do {
                try handle.seek(toOffset: UInt64(t.position))
                try handle.write(contentsOf: bytes)
            } catch {
                return .init(status: 500, message: "\(t.name): cannot write the upload: \(error)")
            }
            return nil
        }
        if refusal == nil { ticket.position += Int64(bytes.count) }
        return refusal
    }

    /// Ends an upload whose bytes have all come: once the file is whole (`total` bytes) and
    /// matches its MD5 it takes its name; a file whose bytes do not match is removed.
    func finish(_ ticket: Ticket) async throws -> Result<Void, BOINCRefusal> {
        try await self.withFile(ticket.name) {
            guard self.end(ticket) else {
                return .failure(.init(status: 409, message: "\(ticket.name): another upload of this file began meanwhile"))
            }
            guard ticket.position == ticket.total else { return .success(()) }
            let final = self.path(ticket.name), part = final + ".part"
            guard let whole = FileManager.default.contents(atPath: part), Int64(whole.count) == ticket.total,
                  ticket.md5.isEmpty || BOINCSigning.md5Hex(Array(whole)) == ticket.md5.lowercased() else {
                try? FileManager.default.removeItem(atPath: part)
                return .failure(.init(status: 400, message: "\(ticket.name): the bytes do not match their MD5 \(ticket.md5.prefix(40)); nothing was stored"))
            }
            do {
                try FileManager.default.moveItem(atPath: part, toPath: final)
            } catch {
                return .failure(.init(status: 500, message: "\(ticket.name): cannot keep the upload: \(error)"))
            }
            return .success(())
        }
    }

    /// Ends an upload refused part way: what it wrote is cut off again (the part file as
    /// before the request), unless a later upload of the file has begun.
    func abandon(_ ticket: Ticket) async throws {
        try await self.withFile(ticket.name) {
            if self.end(ticket) { _ = truncate(self.path(ticket.name) + ".part", off_t(ticket.start)) }
        }
    }

    /// Forgets the ticket's generation if it is still the file's current one; whether it was.
    private func end(_ ticket: Ticket) -> Bool {
        self.current.withLockedValue { current in
            guard current.by[ticket.name] == ticket.generation else { return false }
            current.by[ticket.name] = nil
            return true
        }
    }

    private static func size(of path: String) -> Int64? {
        (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)?.int64Value
    }

    /// One request's bytes at once (begin, append, finish).
    func write(_ name: String, offset: Int64, data: [UInt8], total: Int64, md5: String) async throws -> Result<Void, BOINCRefusal> {
        switch try await self.begin(name, offset: offset, total: total, md5: md5) {
        case .whole: return .success(())
        case .refused(let refusal): return .failure(refusal)
        case .open(var ticket):
            if let refusal = try await self.append(&ticket, data) {
                try await self.abandon(ticket)
                return .failure(refusal)
            }
            return try await self.finish(ticket)
        }
    }

    /// A complete upload, at most `limit` bytes.
    func read(_ name: String, limit: Int) async throws -> [UInt8]? {
        try await self.withFile(name) {
            guard let data = FileManager.default.contents(atPath: self.path(name)), data.count <= limit else { return nil }
            return Array(data)
        }
    }

    /// The regular files of the upload directory (uploads and part files), with their last
    /// change; nothing else there (directories, links) is listed.
    func files() async throws -> [(name: String, modified: Date)] {
        try await self.pool.runIfActive {
            ((try? FileManager.default.contentsOfDirectory(atPath: self.directory)) ?? []).compactMap { name -> (name: String, modified: Date)? in
                guard let attributes = try? FileManager.default.attributesOfItem(atPath: self.path(name)),
                      attributes[.type] as? FileAttributeType == .typeRegular, let date = attributes[.modificationDate] as? Date else { return nil }
                return (name, date)
            }
        }
    }

    /// Removes file `name` (an upload, or a part file) under its upload's lock.
    func remove(file name: String) async throws {
        let upload = name.hasSuffix(".part") ? String(name.dropLast(".part".count)) : name
        try await self.withFile(upload) { try? FileManager.default.removeItem(atPath: self.path(name)) }
    }

    /// Forgets the uploads whose names start with `prefix` (a lease's).
    func remove(prefix: String) async throws {
        let names = try await self.pool.runIfActive {
            ((try? FileManager.default.contentsOfDirectory(atPath: self.directory)) ?? []).filter { $0.hasPrefix(prefix) }
        }
        for name in names {
            // A part file goes with its upload's lock: the upload may be under way.
            let upload = name.hasSuffix(".part") ? String(name.dropLast(".part".count)) : name
            try await self.withFile(upload) { try? FileManager.default.removeItem(atPath: self.path(name)) }
        }
    }
}
