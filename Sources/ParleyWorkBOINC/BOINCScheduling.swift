import Crypto
import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import Parley
import ParleyWork
import SwiftProtobuf
import XMLCoder

/// The scheduler RPC's decisions, as pure functions: reading a request (with its limits),
/// who the client is, what a reported result means for its lease, what a work request claims.
public enum BOINCScheduling {
    /// Elements a scheduler request may have: a client's usual request has a few hundred;
    /// 10,000 reported results of about 15 each fit.
    public static let maxElements = 200_000
    /// Reads a scheduler request: at most `maxBytes`, nested at most `maxDepth` deep, an XML
    /// document whose element is `<scheduler_request>` naming its platform.
    public static func read(_ body: [UInt8], maxBytes: Int, maxDepth: Int) -> Result<BOINCSchedulerRequest, BOINCRefusal> {
        guard body.count <= maxBytes else {
            return .failure(.init(status: 413, message: "the scheduler request is \(body.count) bytes, over this project's limit of \(maxBytes)"))
        }
        guard !body.isEmpty else { return .failure(.init(status: 400, message: "the scheduler request is empty")) }
        if let refusal = BOINCXMLText.encodingRefusal(body) {
            return .failure(.init(status: 400, message: "the scheduler request \(refusal)"))
        }
        let shape = BOINCXMLText.shape(body, depthLimit: maxDepth)
        if let depth = shape.depth {
            return .failure(.init(status: 400, message: "the scheduler request nests elements \(depth) deep, over this project's limit of \(maxDepth)"))
        }
        // Counted before parsing too: XMLCoder builds a tree of every element, some hundred
        // bytes each, from a few bytes of `<a/>`.
        guard shape.elements <= Self.maxElements else {
            return .failure(.init(status: 413, message: "the scheduler request has \(shape.elements) elements, over this project's limit of \(Self.maxElements)"))
        }
        guard !shape.declaration else {
            return .failure(.init(status: 400, message: "the scheduler request declares a document type or entities (<!...>), which BOINC clients do not send"))
        }
        guard BOINCXMLText.rootName(body) == "scheduler_request" else {
            return .failure(.init(status: 400, message: "the request is not a <scheduler_request> XML document"))
        }
        // The guard above reads tags as a well-formed document has them; the parser, which
        // recovers from errors, can see more (a quote in an end tag hid 18,000 levels, or a
        // million elements, from the guard): the parser's own events are counted before
        // XMLCoder builds its tree.
        switch BOINCXMLText.parsedShape(body, depthLimit: maxDepth, elementLimit: Self.maxElements) {
        case .tooDeep(let depth):
            return .failure(.init(status: 400, message: "the scheduler request nests elements \(depth) deep, over this project's limit of \(maxDepth)"))
        case .tooMany(let elements):
            return .failure(.init(status: 413, message: "the scheduler request has over \(elements - 1) elements, over this project's limit of \(Self.maxElements)"))
        case .within:
            break
        }
        let request: BOINCSchedulerRequest
        do {
            let decoder = XMLDecoder()
            decoder.shouldProcessNamespaces = false
            // Not trimming every text node (the strings read are trimmed one by one as they are
            // decoded) makes reading a real client's 6 KB request 1.7 times faster (poll
            // RPCs per second, docs/performance.md).
            decoder.trimValueWhitespaces = false
            request = try decoder.decode(BOINCSchedulerRequest.self, from: Data(body))
        } catch {
            return .failure(.init(status: 400, message: "the scheduler request is not well-formed: \(BOINCXMLText.describe(error))"))
        }
        guard let platform = request.platformName, !platform.isEmpty, platform.utf8.count <= 64 else {
            return .failure(.init(status: 400, message: "the scheduler request names no platform (<platform_name>)"))
        }
        guard request.results.count <= 10_000 else {
            return .failure(.init(status: 413, message: "the scheduler request reports \(request.results.count) results, over this project's limit of 10,000"))
        }
        return .success(request)
    }

    public enum Identity: Error, Sendable, Hashable {
        case refused(BOINCRefusal)
        /// The authenticator is no account of this project.
        case unknownAccount(String)
    }

    /// The worker a request speaks for, as leases name it: `boinc:<HOST_CPID>` (the host's id,
    /// which the client keeps), or `boinc:<ENTITY>:<HOST_CPID>` when a keyring says whose
    /// authenticator it is.
    public static func worker(for request: BOINCSchedulerRequest, keyring: ParleyKeyring?, requireCapabilities: Bool, now: Date) -> Result<String, Identity> {
        guard let cpid = request.hostInfo?.hostCpid, (1...64).contains(cpid.utf8.count),
              cpid.utf8.allSatisfy({ (0x30...0x39).contains($0) || (0x61...0x7A).contains($0) || (0x41...0x5A).contains($0) }) else {
            return .failure(.refused(.init(status: 400, message: "the scheduler request names no host (<host_info><host_cpid>, up to 64 letters and digits)")))
        }
        guard let keyring else { return .success("boinc:\(cpid)") }
        let given = request.authenticator ?? ""
        let unknown = Identity.unknownAccount("Invalid or missing account key. To fix, remove this project and attach again with the key you were given.")
        guard !given.isEmpty, let entity = keyring.entities.first(where: { $0.keyMatches(given) }) else { return .failure(unknown) }
        guard entity.refusal(now: now) == nil else { return .failure(unknown) }
        if requireCapabilities, !entity.grants("work.worker") {
            return .failure(.unknownAccount("The account \(entity.name) may not run work for this project (it lacks capability work.worker)."))
        }
        return .success("boinc:\(entity.name):\(cpid)")
    }


    /// BOINC's result states (client/result.h): RESULT_FILES_UPLOADED is the end of a result
    /// that ran and sent its files.
    public static let filesUploaded = 5

    /// The result ran to its end with status 0 and its files were uploaded.
    public static func succeeded(_ result: BOINCSchedulerRequest.ReportedResult) -> Bool {
        (result.exitStatus ?? -1) == 0 && (result.state ?? filesUploaded) == filesUploaded
    }

    /// The report a reported result makes on its lease. `outputs`: the uploaded outputs, nil
    /// if one is missing (or the result failed).
    public static func reportInput(
        _ result: BOINCSchedulerRequest.ReportedResult, name: BOINCName, worker: String, spec: Parley_Work_V1_JobSpec?,
        outputs: [Parley_Work_V1_OutputFile]?, stdout: [UInt8]
    ) -> ReportInput {
        var report = Parley_Work_V1_ReportResult()
        report.worker = worker
        report.jobID = name.jobID
        report.leaseID = name.leaseID
        report.exitStatus = Int32(clamping: result.exitStatus ?? -1)
        report.wallMs = UInt64(max(0, min(1e15, (result.finalElapsedTime ?? 0) * 1000)))
        report.cpuMs = UInt64(max(0, min(1e15, (result.finalCpuTime ?? 0) * 1000)))
        let tail = spec.map { WorkService.tailLimit($0, fallback: UInt64(WorkService.maxTail)) } ?? WorkService.maxTail
        report.stdoutTail = Data(stdout.suffix(tail))
        report.stderrTail = Data(BOINCJobs.stderr(of: result.stderrOut).suffix(tail))
        let outcome: LeaseReport.Outcome
        if self.succeeded(result) {
            if let outputs, let spec, outputs.count == spec.outputs.count {
                do throws(WorkFiles.FileError) {
                    // What a native worker's report may carry (16 MiB together): each file
                    // was held to that alone by the client's max_nbytes.
                    try WorkFiles.check(outputs: outputs)
                    report.outputs = outputs
                    outcome = .success
                } catch {
                    report.errorKind = .upload
                    report.message = "the BOINC client's outputs cannot be reported: \(error.message)"
                    outcome = .failure("output failed: \(report.message)")
                }
            } else {
                report.errorKind = .upload
                report.message = "the BOINC client reported success but an output file was not uploaded"
                outcome = .failure("output failed: \(report.message)")
            }
        } else {
            let why = self.describeFailure(result)
            report.errorKind = why.hasPrefix("refused by the BOINC client") ? .signature : .compute
            report.message = why
            outcome = .failure(why)
        }
        let bytes = (try? report.serializedBytes()) ?? []
        return ReportInput(jobID: name.jobID, report: LeaseReport(leaseID: name.leaseID, worker: worker, outcome: outcome), result: outcome == .success ? bytes : [])
    }

    /// Why a reported result failed, in the words of the job's record. A file the client
    /// could not get (a program whose signature its key does not verify: -120) is reported as
    /// the result's download error (-186) with a `<file_xfer_error>` in `<stderr_out>`.
    public static func describeFailure(_ result: BOINCSchedulerRequest.ReportedResult) -> String {
        let status = result.exitStatus ?? 0
        let state = result.state.map { "state \($0)" } ?? "no state"
        let transfer = self.transferError(in: result.stderrOut)
        let code = transfer?.errorCode.flatMap { Int($0.split(separator: " ").first ?? "") } ?? status
        let file = transfer?.fileName.map { " on \($0)" } ?? ""
        switch code {
        case -120:
            return "refused by the BOINC client: bad signature (ERR_RSA_FAILED, -120\(file)): the program's signature does not verify with the code-signing key the client holds"
        case -123:
            return "refused by the BOINC client: no signature (ERR_NO_SIGNATURE, -123\(file))"
        default:
            if let transfer {
                return "the BOINC client could not get\(file): \(transfer.errorCode ?? "?") \(transfer.errorMessage ?? "") (exit status \(status), \(state))"
            }
            let last = String(decoding: BOINCJobs.stderr(of: result.stderrOut), as: UTF8.self).split(whereSeparator: \.isNewline).last.map { ": " + String($0.prefix(200)) } ?? ""
            return "the BOINC client reported exit status \(status) (\(state))\(last)"
        }
    }

    /// `<file_xfer_error>` as the client writes it into a result's `<stderr_out>`.
    public struct TransferError: Decodable, Sendable, Hashable {
        public var fileName: String?
        public var errorCode: String?
        public var errorMessage: String?
        enum CodingKeys: String, CodingKey { case fileName = "file_name", errorCode = "error_code", errorMessage = "error_message" }
    }

    /// The first `<file_xfer_error>` element in the text of `<stderr_out>` (which holds it as
    /// text, inside CDATA), read with XMLCoder. The text is the client's, not checked by the
    /// request's guard (it was CDATA there): it is read only if it is small and flat (XMLCoder
    /// builds its tree recursively, so a deeply nested one would overflow the stack).
    public static func transferError(in stderrOut: String) -> TransferError? {
        guard let start = stderrOut.range(of: "<file_xfer_error>"),
              let end = stderrOut.range(of: "</file_xfer_error>", range: start.upperBound..<stderrOut.endIndex) else { return nil }
        let text = Array(stderrOut[start.lowerBound..<end.upperBound].utf8)
        guard text.count <= 64 << 10 else { return nil }
        let shape = BOINCXMLText.shape(text, depthLimit: 4)
        guard BOINCXMLText.encodingRefusal(text) == nil else { return nil }
        guard shape.depth == nil, shape.elements <= 64, !shape.declaration,
              BOINCXMLText.parsedShape(text, depthLimit: 4, elementLimit: 64) == .within else { return nil }
        return try? XMLDecoder().decode(TransferError.self, from: Data(text))
    }

    /// The claim a work request makes: up to one job per CPU instance asked for (at least one,
    /// at most `maxJobs`), of the applications the client runs: its platforms' names and the
    /// project's BOINC apps (a job needing none goes to anyone).
    public static func claimRequest(_ request: BOINCSchedulerRequest, worker: String, extraApps: [String], maxJobs: Int) -> ClaimRequest {
        let instances = request.cpuReqInstances.flatMap { $0.isFinite ? Int(min(1e6, max(1, $0.rounded(.up)))) : nil } ?? 1
        var apps: [String] = []
        for app in [request.platformName ?? ""] + request.alternatePlatforms.prefix(16) + extraApps where !app.isEmpty && !apps.contains(app) {
            if (try? WorkService.check(app: app)) != nil { apps.append(app) }
        }
        return ClaimRequest(worker: worker, limit: max(1, min(maxJobs, instances)), apps: apps)
    }

    /// Whether a BOINC platform runs the front end's programs (POSIX sh scripts): every one
    /// but Windows ("windows_x86_64", "windows_intelx86", ...).
    public static func runsPOSIXShell(_ platform: String) -> Bool { !platform.hasPrefix("windows") }

    /// A job's estimated run time in seconds (its spec's, or WorkService's default).
    public static func estimate(of spec: [UInt8]) -> Double {
        let seconds = (try? Parley_Work_V1_JobSpec(serializedBytes: spec))?.estimatedSeconds ?? 0
        return seconds > 0 ? Double(seconds) : WorkService.defaultEstimate
    }

    public struct JobRefusal: Error, Sendable, Hashable { public var reason: String }

    /// A claimed job's spec, after the checks a native worker makes before running it: its
    /// signature (with `trust`), its decoding, its files. The failure is the attempt's reason.
    public static func check(_ job: ClaimedJob, trust: [WorkSigning.PublicKey]) -> Result<Parley_Work_V1_JobSpec, JobRefusal> {
        if !trust.isEmpty {
            do throws(WorkSigningError) {
                try WorkSigning.verify(job: job.spec, signature: job.signature, byAnyOf: trust)
            } catch {
                return .failure(.init(reason: "refused: bad signature (\(error.message))"))
            }
        }
        guard let spec = try? Parley_Work_V1_JobSpec(serializedBytes: job.spec), !spec.argv.isEmpty else {
            return .failure(.init(reason: "refused: the spec does not decode or has no command"))
        }
        do throws(WorkFiles.FileError) {
            try WorkFiles.check(spec: spec)
        } catch {
            return .failure(.init(reason: "refused: \(error.message)"))
        }
        return .success(spec)
    }
}

/// Small helpers around XML text that XMLCoder does not offer.
enum BOINCXMLText {
    /// Why Foundation's XML parser must not see `bytes`, or nil. On Linux it traps (the
    /// process dies) on an element or attribute name that is not UTF-8, which libxml2, told
    /// to recover from errors, hands it as it came (seen with bytes that are not UTF-8, with
    /// and without a declaration of another encoding). BOINC clients send UTF-8 and declare
    /// no other encoding: anything else is refused before parsing (a declared encoding as a
    /// precaution: libxml2 converts by it before the names reach Foundation).
    static func encodingRefusal(_ bytes: [UInt8]) -> String? {
        // The standard library's validation first (every request passes here); the scalar
        // walk only to name the first bad byte.
        if String(validating: bytes, as: UTF8.self) == nil {
            var iterator = bytes.makeIterator()
            var decoder = UTF8()
            var offset = 0
            while case .scalarValue(let scalar) = decoder.decode(&iterator) { offset += UTF8.width(scalar) }
            return "is not UTF-8 (byte \(offset) is 0x\(String(bytes[offset], radix: 16)))"
        }
        // The declaration, if any, is first (after a byte order mark and white space).
        var start = 0
        if bytes.starts(with: [0xEF, 0xBB, 0xBF]) { start = 3 }
        while start < bytes.count, [0x20, 0x09, 0x0A, 0x0D].contains(bytes[start]) { start += 1 }
        guard bytes[start...].starts(with: Array("<?xml".utf8)) else { return nil }
        // To its end, however long (white space between its attributes is legal).
        guard let end = bytes[start...].firstIndex(of: UInt8(ascii: ">")) else {
            return "has an XML declaration that does not end"
        }
        let text = String(decoding: bytes[start..<end], as: UTF8.self).lowercased()
        guard let range = text.range(of: "encoding") else { return nil }
        let rest = text[range.upperBound...].drop { $0 == " " || $0 == "=" || $0 == "\"" || $0 == "'" }
        let name = String(rest.prefix { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == "." })
        guard ["utf-8", "utf8", "us-ascii", "ascii"].contains(name) else {
            return "declares the encoding \"\(name)\"; BOINC clients send UTF-8"
        }
        return nil
    }

    enum ParsedShape: Equatable {
        case within
        /// The depth reached past the limit.
        case tooDeep(Int)
        /// The count of elements reached past the limit.
        case tooMany(Int)
    }

    /// Whether the elements stay within `depthLimit` levels and `elementLimit` in number as
    /// Foundation's parser reports them (the parser XMLCoder uses, with the same options: it
    /// recovers from errors, so its events, not the text's tags, are what XMLCoder builds
    /// its tree of). Stops at the first element past a limit; builds nothing.
    static func parsedShape(_ bytes: [UInt8], depthLimit: Int, elementLimit: Int) -> ParsedShape {
        let counter = ShapeCounter(depthLimit: depthLimit, elementLimit: elementLimit)
        let parser = XMLParser(data: Data(bytes))
        parser.shouldProcessNamespaces = false
        parser.shouldReportNamespacePrefixes = false
        parser.shouldResolveExternalEntities = false
        parser.delegate = counter
        _ = parser.parse()
        return counter.shape
    }

    private final class ShapeCounter: NSObject, XMLParserDelegate {
        let depthLimit: Int
        let elementLimit: Int
        var depth = 0
        var elements = 0
        var shape = ParsedShape.within
        init(depthLimit: Int, elementLimit: Int) {
            self.depthLimit = depthLimit
            self.elementLimit = elementLimit
        }
        func parser(_ parser: XMLParser, didStartElement elementName: String, namespaceURI: String?, qualifiedName qName: String?, attributes attributeDict: [String: String] = [:]) {
            self.depth += 1
            self.elements += 1
            if self.depth > self.depthLimit {
                self.shape = .tooDeep(self.depth)
                parser.abortParsing()
            } else if self.elements > self.elementLimit {
                self.shape = .tooMany(self.elements)
                parser.abortParsing()
            }
        }
        func parser(_ parser: XMLParser, didEndElement elementName: String, namespaceURI: String?, qualifiedName qName: String?) {
            self.depth = max(0, self.depth - 1)
        }
    }

    /// The depth past `limit` that the document's elements reach, or nil if they stay within
    /// it. A guard before parsing, not a parser: it counts start and end tags (skipping
    /// comments, CDATA, processing instructions and declarations), so that a document nested
    /// without end is refused before XMLCoder builds (recursively) its tree.
    static func depthExceeding(_ bytes: [UInt8], _ limit: Int) -> Int? {
        Self.shape(bytes, depthLimit: limit).depth
    }

    /// What a guard before parsing learns of a document: the depth past `depthLimit` its
    /// elements reach (nil: within it; the scan stops there), its number of elements, and
    /// whether it has a declaration (`<!DOCTYPE`, `<!ENTITY`: entities that expand, which
    /// no BOINC client sends).
    static func shape(_ bytes: [UInt8], depthLimit limit: Int) -> (depth: Int?, elements: Int, declaration: Bool) {
        let n = bytes.count
        func starts(_ s: StaticString, at j: Int) -> Bool {
            let count = s.utf8CodeUnitCount
            guard j + count <= n else { return false }
            return s.withUTF8Buffer { u in (0..<count).allSatisfy { bytes[j + $0] == u[$0] } }
        }
        func skip(to end: StaticString, from j: Int) -> Int {
            var k = j
            while k < n {
                if starts(end, at: k) { return k + end.utf8CodeUnitCount }
                k += 1
            }
            return n
        }
        var depth = 0
        var elements = 0
        var declaration = false
        var i = 0
        while i < n {
            guard bytes[i] == UInt8(ascii: "<") else { i += 1; continue }
            if starts("<!--", at: i) { i = skip(to: "-->", from: i + 4); continue }
            if starts("<![CDATA[", at: i) { i = skip(to: "]]>", from: i + 9); continue }
            // A processing instruction ends at "?>", not at the first ">": tags inside it
            // are text to the parser, and counted here they would lower the depth.
            if starts("<?", at: i) { i = skip(to: "?>", from: i + 2); continue }
            if starts("<!", at: i) {
                declaration = true
                i = skip(to: ">", from: i + 2)
                continue
            }
            let closing = i + 1 < n && bytes[i + 1] == UInt8(ascii: "/")
            var j = i + 1
            var quote: UInt8?
            while j < n {
                let c = bytes[j]
                if let q = quote { if c == q { quote = nil } } else if c == UInt8(ascii: "\"") || c == UInt8(ascii: "'") { quote = c } else if c == UInt8(ascii: ">") { break }
                j += 1
            }
            let selfClosing = j < n && j > i + 1 && bytes[j - 1] == UInt8(ascii: "/")
            if closing {
                // More end tags than start tags (not well-formed) buy no depth for later ones.
                depth = max(0, depth - 1)
            } else {
                elements += 1
                if !selfClosing {
                    depth += 1
                    if depth > limit { return (depth, elements, declaration) }
                }
            }
            i = j + 1
        }
        return (nil, elements, declaration)
    }

    /// The name of the document's first element.
    static func rootName(_ bytes: [UInt8]) -> String? {
        var i = 0
        while i < bytes.count {
            if bytes[i] == UInt8(ascii: "<"), i + 1 < bytes.count, bytes[i + 1] != UInt8(ascii: "?"), bytes[i + 1] != UInt8(ascii: "!") {
                var j = i + 1
                while j < bytes.count, ![UInt8(ascii: ">"), UInt8(ascii: " "), UInt8(ascii: "\n"), UInt8(ascii: "\t"), UInt8(ascii: "\r"), UInt8(ascii: "/")].contains(bytes[j]) { j += 1 }
                return String(decoding: bytes[(i + 1)..<j], as: UTF8.self)
            }
            i += 1
        }
        return nil
    }

    static func describe(_ error: any Error) -> String {
        switch error {
        case DecodingError.dataCorrupted(let context): return context.underlyingError.map { "\($0)" } ?? context.debugDescription
        case DecodingError.typeMismatch(_, let context), DecodingError.valueNotFound(_, let context):
            return "\(context.codingPath.map(\.stringValue).joined(separator: "/")): \(context.debugDescription)"
        case DecodingError.keyNotFound(let key, let context):
            return "\((context.codingPath + [key]).map(\.stringValue).joined(separator: "/")) is missing"
        default: return "\(error)"
        }
    }

    static func encode<T: Encodable>(_ value: T, root: String) -> [UInt8] {
        let encoder = XMLEncoder()
        encoder.outputFormatting = [.prettyPrinted]
        return ((try? encoder.encode(value, withRootKey: root)).map(Array.init) ?? []) + [0x0A]
    }
}
