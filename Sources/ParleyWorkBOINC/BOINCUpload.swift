import Crypto
import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import NIOConcurrencyHelpers
import NIOPosix

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

    static func find(_ needle: [UInt8], in haystack: [UInt8], within: Int) -> Int? {
        guard !needle.isEmpty, haystack.count >= needle.count else { return nil }
        let last = min(haystack.count - needle.count, within)
        var i = 0
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

    func write(_ name: String, offset: Int64, data: [UInt8], total: Int64, md5: String) async throws -> Result<Void, BOINCRefusal> {
        try await self.withFile(name) {
            let final = self.path(name), part = final + ".part"
            if let existing = FileManager.default.contents(atPath: final) {
                // Already whole: the same bytes again are fine; others do not replace them.
                return Int64(existing.count) == total && BOINCSigning.md5Hex(Array(existing)) == md5.lowercased()
                    ? .success(()) : .failure(.init(status: 409, message: "\(name) was already uploaded with other content; nothing was stored"))
            }
            let have = (try? FileManager.default.attributesOfItem(atPath: part)[.size] as? NSNumber)?.int64Value ?? 0
            guard offset <= have else {
                return .failure(.init(status: 400, message: "\(name): an upload at offset \(offset), but only \(have) bytes came before"))
            }
            if !FileManager.default.fileExists(atPath: part) { _ = FileManager.default.createFile(atPath: part, contents: nil) }
            guard let handle = FileHandle(forUpdatingAtPath: part) else {
                return .failure(.init(status: 500, message: "\(name): cannot write the upload"))
            }
            defer { try? handle.close() }
            do {
                try handle.truncate(atOffset: UInt64(offset))
                try handle.seek(toOffset: UInt64(offset))
                try handle.write(contentsOf: data)
            } catch {
                return .failure(.init(status: 500, message: "\(name): cannot write the upload: \(error)"))
            }
            let size = offset + Int64(data.count)
            guard size == total else { return .success(()) }
            guard let whole = FileManager.default.contents(atPath: part), md5.isEmpty || BOINCSigning.md5Hex(Array(whole)) == md5.lowercased() else {
                try? FileManager.default.removeItem(atPath: part)
                return .failure(.init(status: 400, message: "\(name): the bytes do not match their MD5 \(md5.prefix(40)); nothing was stored"))
            }
            do {
                try FileManager.default.moveItem(atPath: part, toPath: final)
            } catch {
                return .failure(.init(status: 500, message: "\(name): cannot keep the upload: \(error)"))
            }
            return .success(())
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
