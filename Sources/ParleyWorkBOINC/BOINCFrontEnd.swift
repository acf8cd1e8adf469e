import Crypto
import Foundation
import Logging
import NIOCore
import Parley
import ParleyWork
import SwiftProtobuf

/// Parley Work's BOINC front end (issue 12): the master page, the scheduler RPC (XML over
/// HTTP POST), the file upload handler and the downloads of inputs and apps, on the same job
/// store as native workers. Each endpoint is a function from the request's bytes to a
/// `BOINCResponse` (`BOINCHTTP` is the thin Hummingbird layer around them); what a request
/// means is decided by pure functions (`BOINCScheduling`, `BOINCJobs`, `BOINCName`,
/// `BOINCUpload`), and only the store and the upload directory are touched here.
public final class BOINCFrontEnd: Sendable {
    public struct Configuration: Sendable {
        /// The project's URL as clients attach to it (its master page), ending in "/".
        public var url: String
        /// The scheduler URLs listed on the master page, in order: a client that fails with
        /// one tries the next in the same RPC. The front end answers on all their paths.
        public var schedulerURLs: [String]
        public var projectName = "Parley Work"
        /// The project's BOINC code-signing key: every program handed out is signed with it.
        public var key: BOINCSigning.PrivateKey
        /// Parley Work keys whose jobs are handed out (checked before a job goes out, as a
        /// native worker would); empty: not checked.
        public var trust: [WorkSigning.PublicKey] = []
        /// With a keyring, a client's authenticator must be the key of one of its entities
        /// (not revoked or expired); without one, any authenticator is accepted.
        public var keyring: ParleyKeyring?
        /// With a keyring: the entity also needs capability work.worker (or work.*).
        public var requireCapabilities = false
        /// How long a BOINC client's lease lasts: its result's report deadline.
        public var leaseDuration: Duration = .seconds(3600)
        /// Sent in every reply: the client waits this long before its next scheduler RPC.
        public var requestDelay: Double?
        /// Sent in every reply as notices (the client's manager shows them to the user).
        public var notices: [String] = []
        /// Applications BOINC clients run besides their platforms' names (a job whose
        /// JobSpec.app is one of these, or a platform's name, or none goes to them).
        public var apps: [String] = []
        /// Clients older than this major version are told to upgrade and get no work.
        public var minimumClientMajorVersion = 7
        /// Jobs handed out in one reply, at most.
        public var maxJobsPerRequest = 8
        /// The most leases one client may hold at once (nil: no cap), as for Parley's workers.
        public var maxLeasesPerWorker: Int?
        /// Scheduler requests larger than this are refused (413).
        public var maxRequestBytes = 4 << 20
        /// XML nested deeper than this is refused (400).
        public var maxDepth = 32
        /// An uploaded file larger than this is refused (413).
        public var maxUploadBytes = WorkFiles.maxOutputBytes
        /// The command's stdout kept (its end), as a native worker keeps its tail.
        public var maxStdout = 1 << 20
        /// Where uploaded output files wait for their report.
        public var uploadDirectory: String
        /// A connection is closed this long after it was accepted, done or not: a client that
        /// sends a request a byte at a time (each within the idle timeout) cannot hold it
        /// for ever. A BOINC client makes one request per connection; an upload cut by this
        /// keeps the bytes that came, and the client resumes it from there.
        public var connectionLifetime: Duration = .seconds(3600)
        /// Connections open at once, at most; more are closed as they are accepted.
        public var maxConnections = 1024
        /// Connections open at once from one peer (an IPv4 address, an IPv6 /64), at most;
        /// more from it are closed as they are accepted. A BOINC client makes one request at
        /// a time; this leaves room for many behind one NAT, and keeps one host from taking
        /// every connection, or the body budget (each connection holds one body of at most
        /// `maxRequestBytes`: 32 of 4 MiB are half of it). Nil or 0: no cap (behind a
        /// reverse proxy every client has the proxy's address).
        public var maxConnectionsPerPeer: Int? = 32
        /// Bytes of request bodies held in memory at once, together, counted as they arrive
        /// (an upload's until they are written, 64 KiB and a read each besides its header); the
        /// request whose bytes would pass it gets 503, which a BOINC client retries later (an
        /// upload resumes where its bytes were kept).
        public var maxBufferedBodyBytes = 256 << 20
        /// How often uploads no report can use any more are removed (`sweepUploads`), and
        /// how long an upload is kept at most without its report.
        public var uploadSweepInterval: Duration = .seconds(600)
        public var uploadRetention: Duration = .seconds(7 * 86_400)
        /// An upload's bytes are written whenever this many have gathered (so at most this
        /// and one network read are held per upload, whatever its pace).
        var uploadBatchBytes = 64 << 10

        public init(url: String, key: BOINCSigning.PrivateKey, uploadDirectory: String, schedulerURLs: [String] = []) {
            let base = url.hasSuffix("/") ? url : url + "/"
            self.url = base
            self.key = key
            self.uploadDirectory = uploadDirectory
            self.schedulerURLs = schedulerURLs.isEmpty ? [base + "scheduler"] : schedulerURLs
        }
    }

    public let configuration: Configuration
    let store: any WorkStore
    let logger: Logger
    let uploads: BOINCUploadStore
    let grant: BOINCUploadGrant

    public init(configuration: Configuration, store: any WorkStore, logger: Logger) throws {
        self.configuration = configuration
        self.store = store
        self.logger = logger
        self.uploads = try BOINCUploadStore(directory: configuration.uploadDirectory)
        self.grant = BOINCUploadGrant(boincKey: configuration.key)
    }

    // MARK: - Master page

    /// The master page: the scheduler URLs in both forms the client looks for, `<scheduler>`
    /// and exactly `<link rel="boinc_scheduler" href="URL">` (BOINC matches that text
    /// literally, one line at a time, so it is written as text rather than through an XML
    /// encoder, each URL escaped).
    public func masterPage() -> BOINCResponse {
        let name = Self.escape(self.configuration.projectName)
        var lines = ["<html><head><title>\(name)</title>"]
        for url in self.configuration.schedulerURLs { lines.append("<scheduler>\(Self.escape(url))</scheduler>") }
        for url in self.configuration.schedulerURLs { lines.append("<link rel=\"boinc_scheduler\" href=\"\(Self.escape(url))\">") }
        lines.append("</head><body><h1>\(name)</h1><p>A Parley Work master. Attach a BOINC client to \(Self.escape(self.configuration.url)).</p></body></html>")
        return BOINCResponse(status: 200, contentType: "text/html; charset=utf-8", body: Array((lines.joined(separator: "\n") + "\n").utf8))
    }

    /// What `get_project_config.php` answers (the manager's attach wizard asks it).
    public func projectConfig() -> BOINCResponse {
        struct Config: Encodable {
            var name: String
            var masterURL: String
            var minPasswdLength = 6
            enum CodingKeys: String, CodingKey { case name, masterURL = "master_url", minPasswdLength = "min_passwd_length" }
        }
        return BOINCResponse.xml(200, BOINCXMLText.encode(Config(name: self.configuration.projectName, masterURL: self.configuration.url), root: "project_config"))
    }

    static func escape(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
    }

    // MARK: - Scheduler RPC

    /// One scheduler RPC: reports first (each acknowledged), then work.
    public func schedule(body: [UInt8]) async -> BOINCResponse {
        let request: BOINCSchedulerRequest
        switch BOINCScheduling.read(body, maxBytes: self.configuration.maxRequestBytes, maxDepth: self.configuration.maxDepth) {
        case .success(let r): request = r
        case .failure(let refusal): return self.refuse(refusal)
        }
        var reply = BOINCSchedulerReply(projectName: self.configuration.projectName)
        reply.masterURL = self.configuration.url
        reply.requestDelay = self.configuration.requestDelay
        reply.messages = self.configuration.notices.map { .init(priority: "notice", $0) }
        let worker: String
        switch BOINCScheduling.worker(for: request, keyring: self.configuration.keyring, requireCapabilities: self.configuration.requireCapabilities, now: Date()) {
        case .success(let w): worker = w
        case .failure(.refused(let refusal)): return self.refuse(refusal)
        case .failure(.unknownAccount(let message)):
            // As BOINC's own server does: a notice, a long delay, nothing else done.
            reply.messages.append(.init(priority: "notice", message))
            reply.requestDelay = max(reply.requestDelay ?? 0, 3600)
            return self.encode(reply)
        }
        self.logger.debug("boinc scheduler rpc", metadata: [
            "worker": "\(worker)", "results": "\(request.results.count)", "seconds": "\(request.secondsWanted)", "seqno": "\(request.rpcSeqno ?? -1)",
        ])
        // The key goes to a client that has none yet (trust on first use); a client holding
        // another key would need a rotation statement, which this front end does not make.
        if (request.codeSignKey ?? "").isEmpty { reply.codeSignKey = self.configuration.key.publicKey.text }
        do {
            // Every reported result is acknowledged (a client resends an unacknowledged one
            // every few seconds, for ever); the refused ones with a message saying why.
            for (name, message) in try await self.report(request.results, worker: worker) {
                reply.resultAcks.append(name)
                if let message { reply.messages.append(.init(priority: "low", message)) }
            }
            if let major = request.coreClientMajorVersion, major < self.configuration.minimumClientMajorVersion {
                reply.messages.append(.init(priority: "notice", "This project needs BOINC \(self.configuration.minimumClientMajorVersion) or later; your client is version \(major). Please upgrade it to get work."))
            } else if !BOINCScheduling.runsPOSIXShell(request.platformName ?? "") {
                reply.messages.append(.init(priority: "notice", "This project's jobs run on Linux, macOS and other POSIX systems; there is no work for platform \(request.platformName ?? "")."))
            } else if request.secondsWanted > 0 {
                try await self.handOut(request, worker: worker, into: &reply)
            }
        } catch {
            self.logger.warning("boinc scheduler: store error", metadata: ["error": "\(error)"])
            return self.refuse(.init(status: 503, message: "the job store failed: \(error); try again later"))
        }
        return self.encode(reply)
    }

    func encode(_ reply: BOINCSchedulerReply) -> BOINCResponse {
        do {
            return BOINCResponse.xml(200, try reply.xml())
        } catch {
            return self.refuse(.init(status: 500, message: "the reply could not be encoded: \(error)"))
        }
    }

    /// Reported results taken from one scheduler request (see `report`).
    static let maxResultsPerReport = 500
    /// Bytes of uploaded outputs and stdout read for one scheduler request's results.
    static let reportReadBudget = 64 << 20

    func refuse(_ refusal: BOINCRefusal) -> BOINCResponse {
        var reply = BOINCSchedulerReply(projectName: self.configuration.projectName)
        reply.messages = [.init(priority: "low", refusal.message)]
        reply.requestDelay = 60
        return BOINCResponse.xml(refusal.status, (try? reply.xml()) ?? Array(refusal.message.utf8))
    }

    /// The reported results, in one store transaction: each one's name, and a message for
    /// the client's log when it was refused.
    ///
    /// A result named twice counts once. At most `maxResultsPerReport` results, and results
    /// until `reportReadBudget` bytes of uploaded files have been read, are taken from one
    /// request; the others are left unacknowledged, and the client reports them again with its
    /// next request (otherwise one request of 10,000 results would have every one's files,
    /// up to 16 MiB each, read into memory before the store saw any).
    func report(_ results: [BOINCSchedulerRequest.ReportedResult], worker: String) async throws -> [(String, String?)] {
        var answers: [(String, String?)] = []
        var inputs: [(name: BOINCName, result: BOINCSchedulerRequest.ReportedResult, input: ReportInput)] = []
        var seen = Set<String>()
        var budget = Self.reportReadBudget
        for result in results where seen.insert(result.name).inserted {
            guard seen.count <= Self.maxResultsPerReport, budget > 0 else { break }
            guard let name = BOINCName.parse(result: result.name) else {
                answers.append((result.name, "result \(result.name.prefix(80)) refused: it is not a result this project sent; nothing was stored"))
                continue
            }
            let spec = try await self.store.spec(name.jobID).flatMap { try? Parley_Work_V1_JobSpec(serializedBytes: $0) }
            var outputs: [Parley_Work_V1_OutputFile]? = nil
            if let spec, BOINCScheduling.succeeded(result) { outputs = try await self.collectOutputs(name, spec: spec) }
            let stdout = try await self.uploads.read(name.stdout, limit: self.configuration.maxStdout) ?? []
            budget -= stdout.count + (outputs ?? []).reduce(0) { $0 + $1.content.count }
            inputs.append((name, result, BOINCScheduling.reportInput(result, name: name, worker: worker, spec: spec, outputs: outputs, stdout: stdout)))
        }
        guard !inputs.isEmpty else { return answers }
        let verdicts = try await self.store.report(inputs.map(\.input), now: WorkService.now())
        for (report, verdict) in zip(inputs, verdicts) {
            let result = report.result
            switch verdict {
            case .rejected(let why):
                self.logger.info("boinc report refused", metadata: ["result": "\(result.name)", "why": "\(why)"])
                answers.append((result.name, "result \(result.name) refused: \(why); nothing was stored"))
            case .accepted, .alreadyAccepted, .retrying, .failed, .superseded:
                self.logger.info("boinc report", metadata: ["result": "\(result.name)", "worker": "\(worker)", "verdict": "\(verdict)"])
                try await self.uploads.remove(prefix: report.name.workunit + "_")
                answers.append((result.name, nil))
            }
        }
        return answers
    }

    /// The uploaded outputs of a lease, as a native worker sends them back; nil if one is
    /// missing.
    func collectOutputs(_ name: BOINCName, spec: Parley_Work_V1_JobSpec) async throws -> [Parley_Work_V1_OutputFile]? {
        var outputs: [Parley_Work_V1_OutputFile] = []
        for (i, output) in spec.outputs.enumerated() {
            guard let bytes = try await self.uploads.read(name.output(i), limit: self.configuration.maxUploadBytes) else { return nil }
            var file = Parley_Work_V1_OutputFile()
            file.name = output
            file.size = UInt64(bytes.count)
            file.sha256 = Data(SHA256.hash(data: bytes))
            file.content = Data(bytes)
            outputs.append(file)
        }
        return outputs
    }

    /// Claims jobs for a work request and describes them in the reply.
    func handOut(_ request: BOINCSchedulerRequest, worker: String, into reply: inout BOINCSchedulerReply) async throws {
        let platform = request.platformName ?? ""
        var claim = BOINCScheduling.claimRequest(request, worker: worker, extraApps: self.configuration.apps, maxJobs: self.configuration.maxJobsPerRequest)
        claim.maxHeld = self.configuration.maxLeasesPerWorker
        let now = WorkService.now()
        let lease = self.configuration.leaseDuration.components
        let leaseNanoseconds = lease.seconds * 1_000_000_000 + lease.attoseconds / 1_000_000_000
        var claimed = try await self.store.claim([claim], now: now, leaseDuration: leaseNanoseconds)[0]
        let kept = WorkService.covering(seconds: request.secondsWanted, claimed.map { BOINCScheduling.estimate(of: $0.spec) })
        for job in claimed[kept...] {
            try await self.store.handBack(jobID: job.id, leaseID: job.lease.id, worker: worker)
        }
        claimed = Array(claimed[..<kept])
        var apps = Set<String>()
        for job in claimed {
            let spec: Parley_Work_V1_JobSpec
            switch BOINCScheduling.check(job, trust: self.configuration.trust) {
            case .success(let s): spec = s
            case .failure(let why):
                // Refused here, as a native worker would refuse it: the attempt fails.
                _ = try await self.store.report([ReportInput(jobID: job.id, report: LeaseReport(leaseID: job.lease.id, worker: worker, outcome: .failure(why.reason)), result: [])], now: WorkService.now())
                self.logger.warning("boinc: job refused before handing it out", metadata: ["job": "\(job.id)", "why": "\(why.reason)"])
                continue
            }
            let documents = try BOINCJobs.documents(job: job, spec: spec, platform: platform, base: self.configuration.url, key: self.configuration.key, grant: self.grant, maxOutput: self.configuration.maxStdout)
            if apps.insert(documents.app.name).inserted { reply.apps.append(documents.app) }
            reply.fileInfos += documents.fileInfos
            reply.appVersions.append(documents.appVersion)
            reply.workunits.append(documents.workunit)
            reply.results.append(documents.result)
            self.logger.info("boinc: job handed out", metadata: ["job": "\(job.id)", "lease": "\(job.lease.id)", "worker": "\(worker)"])
        }
    }

    // MARK: - Downloads

    /// A lease's program or inline input, made again from the job's signed spec.
    public func download(name: String) async -> BOINCResponse {
        guard let (file, kind) = BOINCName.parse(file: name) else { return .text(404, "no file \(name.prefix(100))") }
        do {
            guard let job = try await self.store.job(file.jobID), job.record.leases.contains(where: { $0.id == file.leaseID }),
                  let specBytes = try await self.store.spec(file.jobID), let spec = try? Parley_Work_V1_JobSpec(serializedBytes: specBytes) else {
                return .text(404, "no file \(name): no such lease was handed out")
            }
            switch kind {
            case .program:
                return BOINCResponse(status: 200, contentType: "application/octet-stream",
                                     body: BOINCJobs.script(jobID: file.jobID, leaseID: file.leaseID, spec: spec, maxOutput: self.configuration.maxStdout))
            case .input(let i) where i < spec.inputs.count && !spec.inputs[i].content.isEmpty:
                return BOINCResponse(status: 200, contentType: "application/octet-stream", body: Array(spec.inputs[i].content))
            default:
                return .text(404, "no file \(name): not a file this front end serves")
            }
        } catch {
            return .text(503, "the job store failed: \(error)")
        }
    }

    // MARK: - Uploads

    /// The file upload handler: `<data_server_request>` with `<get_file_size>` or
    /// `<file_upload>` (its header, then `<data>` and the bytes), all in `body`.
    public func upload(body: [UInt8]) async -> BOINCResponse {
        let (chunks, continuation) = AsyncStream.makeStream(of: ByteBuffer.self)
        continuation.yield(ByteBuffer(bytes: body))
        continuation.finish()
        return await self.upload(chunks: chunks, budget: HTTPAllowance(Int.max))
    }

    /// The file upload handler, its body read as it comes (`chunks`): the header, up to
    /// `<data>`, whole (at most 64 KiB), then the file's bytes written as they come, whenever
    /// `Configuration.uploadBatchBytes` have gathered. So an upload cut part way (a lost connection,
    /// the connection's lifetime, the budget) keeps what came, and the client resumes it where
    /// `<get_file_size>` says, as BOINC's own handler allows. The bytes held in memory are
    /// taken from `budget` as they arrive and given back once written.
    func upload<Chunks: AsyncSequence>(chunks: Chunks, budget: HTTPAllowance) async -> BOINCResponse where Chunks.Element == ByteBuffer {
        let maxHeader = 64 << 10, tag = BOINCUpload.dataTag
        let busy = BOINCResponse.dataServer(503, .init(status: 1, message: "the server holds too many uploads at once; try again later"))
        var held = 0
        defer { budget.give(held) }
        var iterator = chunks.makeAsyncIterator()
        var head: [UInt8] = []
        var searched = 0
        do {
            while head.count <= maxHeader + tag.count, BOINCUpload.find(tag, in: head, within: maxHeader, from: searched) == nil {
                searched = max(0, head.count - tag.count + 1)
                guard let chunk = try await iterator.next() else { break }
                guard budget.take(chunk.readableBytes) else { return busy }
                held += chunk.readableBytes
                head.append(contentsOf: chunk.readableBytesView)
            }
        } catch {
            return .dataServer(400, .init(status: -1, message: "the upload's body could not be read: \(error)"))
        }
        let request: BOINCUpload.Request
        switch BOINCUpload.read(head, maxHeaderBytes: maxHeader) {
        case .success(let r): request = r
        case .failure(let refusal): return .dataServer(refusal.status, .init(status: -1, message: refusal.message))
        }
        head = []
        let limit: Int
        switch await self.uploadLimit(request.fileName) {
        case .success(let l): limit = l
        case .failure(let refused): return refused.response
        }
        do {
            switch request.kind {
            case .size:
                return .dataServer(200, .init(status: 0, fileSize: try await self.uploads.size(request.fileName)))
            case .data(let offset, let nbytes, let md5, let grant, let initial):
                guard self.grant.check(grant, for: request.fileName) else {
                    return .dataServer(403, .init(status: -1, message: "\(request.fileName): the upload's <xml_signature> is not the one this project gave with the file; nothing was stored"))
                }
                func pastLimit() -> BOINCResponse {
                    .dataServer(413, .init(status: -1, message: "\(request.fileName): \(nbytes) bytes is over this project's limit of \(limit) (or the data runs past it); nothing was stored"))
                }
                guard nbytes <= Int64(limit), offset <= nbytes, offset + Int64(initial.count) <= nbytes else { return pastLimit() }
                // The header's bytes are no longer held; the data's are until written.
                budget.give(held - initial.count)
                held = initial.count
                var ticket: BOINCUploadStore.Ticket
                switch try await self.uploads.begin(request.fileName, offset: offset, total: nbytes, md5: md5) {
                case .whole: return .dataServer(200, .init(status: 0))
                case .refused(let refusal): return .dataServer(refusal.status, .init(status: -1, message: refusal.message))
                case .open(let t): ticket = t
                }
                var pending = initial
                /// Writes what is pending; a refusal ends the upload, its bytes cut off.
                func write() async throws -> BOINCResponse? {
                    guard !pending.isEmpty else { return nil }
                    if let refusal = try await self.uploads.append(&ticket, pending) {
                        try await self.uploads.abandon(ticket)
                        return .dataServer(refusal.status, .init(status: -1, message: refusal.message))
                    }
                    budget.give(pending.count)
                    held -= pending.count
                    pending.removeAll(keepingCapacity: true)
                    return nil
                }
                while true {
                    let next: ByteBuffer?
                    do {
                        next = try await iterator.next()
                    } catch {
                        // The connection was lost: what came is kept for the client's resume.
                        if try await write() == nil { _ = try await self.uploads.finish(ticket) }
                        return .dataServer(400, .init(status: -1, message: "the upload's body could not be read: \(error)"))
                    }
                    guard let chunk = next else { break }
                    guard ticket.position + Int64(pending.count + chunk.readableBytes) <= nbytes else {
                        try await self.uploads.abandon(ticket)
                        return pastLimit()
                    }
                    if !budget.take(chunk.readableBytes) {
                        // What came is kept: the client resumes there.
                        if let refused = try await write() { return refused }
                        _ = try await self.uploads.finish(ticket)
                        return busy
                    }
                    held += chunk.readableBytes
                    pending.append(contentsOf: chunk.readableBytesView)
                    if pending.count >= self.configuration.uploadBatchBytes, let refused = try await write() { return refused }
                }
                if let refused = try await write() { return refused }
                let came = ticket.position
                switch try await self.uploads.finish(ticket) {
                case .success where came < nbytes:
                    // The body ended before the file did: kept, and a transient error, as
                    // BOINC's handler answers ("EOF on socket read"), so that the client
                    // resumes from here rather than take the file as uploaded.
                    return .dataServer(200, .init(status: 1, message: "\(request.fileName): \(came) of its \(nbytes) bytes came; send the rest from there"))
                case .success: return .dataServer(200, .init(status: 0))
                case .failure(let refusal): return .dataServer(refusal.status, .init(status: -1, message: refusal.message))
                }
            }
        } catch {
            return .dataServer(503, .init(status: 1, message: "the upload store failed: \(error)"))
        }
    }

    /// The most bytes file `name` may have, if this project takes uploads of it now: an
    /// output or the stdout of a lease whose report could still count; else the refusal.
    private func uploadLimit(_ fileName: String) async -> Result<Int, BOINCResponseError> {
        guard let (name, kind) = BOINCName.parse(file: fileName) else {
            return .failure(.init(.dataServer(403, .init(status: -1, message: "\(fileName.prefix(100)) is not a file this project asked for"))))
        }
        let index: Int?
        switch kind {
        case .output(let i): index = i
        case .stdout: index = nil
        case .program, .input: return .failure(.init(.dataServer(403, .init(status: -1, message: "\(fileName) is not an output file"))))
        }
        do {
            // A lease whose report could still count: not one that reported a failure, nor
            // of a job another lease completed. A job failed because this lease expired
            // still takes its late success (LeaseRules.report), and so its outputs.
            guard let job = try await self.store.job(name.jobID), job.record.leases.contains(where: { $0.id == name.leaseID }),
                  !job.record.failedLeases.contains(name.leaseID), !Self.succeeded(job.record.state),
                  let specBytes = try await self.store.spec(name.jobID), let spec = try? Parley_Work_V1_JobSpec(serializedBytes: specBytes),
                  index.map({ $0 < spec.outputs.count }) ?? true else {
                return .failure(.init(.dataServer(403, .init(status: -1, message: "\(fileName) was never handed out, or its job has ended; nothing was stored"))))
            }
        } catch {
            return .failure(.init(.dataServer(503, .init(status: 1, message: "the job store failed: \(error)"))))
        }
        return .success(index == nil ? self.configuration.maxStdout : self.configuration.maxUploadBytes)
    }

    /// Removes the uploads no report can use any more: of a job the store does not have or
    /// that succeeded, of a lease it never gave or that reported a failure, and any unchanged
    /// for `uploadRetention` (a client that never reports: a lease that expired may still
    /// report a late success, so its uploads stay until then). Only regular files named as
    /// this project names uploads (and their part files) are touched: anything else in the
    /// directory is someone else's. Returns how many files went.
    @discardableResult
    public func sweepUploads(now: Date = Date()) async throws -> Int {
        let retention = Double(self.configuration.uploadRetention.components.seconds)
        var records: [UInt64: JobRecord?] = [:]
        var removed = 0
        for (file, modified) in try await self.uploads.files() {
            let upload = file.hasSuffix(".part") ? String(file.dropLast(".part".count)) : file
            guard let (name, kind) = BOINCName.parse(file: upload), BOINCName.isUpload(kind) else { continue }
            var stale = now.timeIntervalSince(modified) > retention
            if !stale {
                let record: JobRecord?
                if let known = records[name.jobID] {
                    record = known
                } else {
                    record = try await self.store.job(name.jobID)?.record
                    records[name.jobID] = record
                }
                stale = record.map { Self.succeeded($0.state) || !$0.leases.contains { $0.id == name.leaseID } || $0.failedLeases.contains(name.leaseID) } ?? true
            }
            if stale {
                try await self.uploads.remove(file: file)
                removed += 1
            }
        }
        return removed
    }

    static func succeeded(_ state: JobRecord.State) -> Bool {
        if case .succeeded = state { return true }
        return false
    }
}

/// What an endpoint answers: an HTTP status, and its body.
public struct BOINCResponse: Sendable, Hashable {
    public var status: Int
    public var contentType: String
    public var body: [UInt8]

    public init(status: Int, contentType: String, body: [UInt8]) {
        self.status = status
        self.contentType = contentType
        self.body = body
    }

    static func xml(_ status: Int, _ body: [UInt8]) -> BOINCResponse { .init(status: status, contentType: "text/xml", body: body) }
    static func text(_ status: Int, _ text: String) -> BOINCResponse { .init(status: status, contentType: "text/plain", body: Array((text + "\n").utf8)) }
    static func dataServer(_ status: Int, _ reply: BOINCDataServerReply) -> BOINCResponse { .xml(status, reply.xml()) }
}

/// A response as an error (a refusal decided before the work).
struct BOINCResponseError: Error {
    let response: BOINCResponse
    init(_ response: BOINCResponse) { self.response = response }
}

/// A request refused as a whole: its HTTP status and why.
public struct BOINCRefusal: Error, Sendable, Hashable {
    public var status: Int
    public var message: String
    public init(status: Int, message: String) {
        self.status = status
        self.message = message
    }
}
