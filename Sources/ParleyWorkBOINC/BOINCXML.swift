import Foundation
import XMLCoder

// The scheduler RPC's documents (XML over HTTP POST), as the BOINC client 7.20 writes and
// reads them (client/cs_scheduler.cpp, client/scheduler_op.cpp, lib/parse.cpp); only the
// parts the front end uses are declared, everything else is ignored. XMLCoder reads and
// writes them.
//
// Two things of BOINC's own XML parser shape the replies: a flag is written `<tag>1</tag>`
// (its parser reads `<tag/>` but takes XMLCoder's `<tag />` for an opening tag with an
// attribute), and no empty element is written at all.

/// A scheduler request: `<scheduler_request>`.
public struct BOINCSchedulerRequest: Decodable, Sendable, Hashable {
    public var authenticator: String?
    public var hostid: Int?
    public var rpcSeqno: Int?
    public var coreClientMajorVersion: Int?
    public var coreClientMinorVersion: Int?
    public var coreClientRelease: Int?
    public var platformName: String?
    public var alternatePlatforms: [String]
    public var workReqSeconds: Double?
    public var cpuReqSecs: Double?
    public var cpuReqInstances: Double?
    public var dontSendWork: Int?
    /// The project's code-signing key, once the client holds one.
    public var codeSignKey: String?
    public var hostInfo: HostInfo?
    /// Results being reported.
    public var results: [ReportedResult]

    public struct HostInfo: Decodable, Sendable, Hashable {
        public var hostCpid: String?
        public var domainName: String?
        public var pNcpus: Int?
        public var osName: String?

        enum CodingKeys: String, CodingKey {
            case hostCpid = "host_cpid", domainName = "domain_name", pNcpus = "p_ncpus", osName = "os_name"
        }

        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            self.hostCpid = try c.decodeIfPresent(String.self, forKey: .hostCpid)?.boincTrimmed
            self.domainName = try c.decodeIfPresent(String.self, forKey: .domainName)?.boincTrimmed
            self.pNcpus = try c.decodeIfPresent(Int.self, forKey: .pNcpus)
            self.osName = try c.decodeIfPresent(String.self, forKey: .osName)?.boincTrimmed
        }

        init(hostCpid: String?) { self.hostCpid = hostCpid }
    }

    /// A finished result, as the client reports it.
    public struct ReportedResult: Decodable, Sendable, Hashable {
        public var name: String
        public var exitStatus: Int?
        public var state: Int?
        public var finalCpuTime: Double?
        public var finalElapsedTime: Double?
        /// The text of `<stderr_out>`: the client's own lines and, in CDATA, the app's stderr.
        public var stderrOut: String
        /// The output files the client uploaded.
        public var fileInfos: [FileInfo]

        public struct FileInfo: Decodable, Sendable, Hashable {
            public var name: String
            public var nbytes: Double?
            public var md5Cksum: String?
            enum CodingKeys: String, CodingKey { case name, nbytes, md5Cksum = "md5_cksum" }

            public init(from decoder: any Decoder) throws {
                let c = try decoder.container(keyedBy: CodingKeys.self)
                self.name = try c.decode(String.self, forKey: .name).boincTrimmed
                self.nbytes = try c.decodeIfPresent(Double.self, forKey: .nbytes)
                self.md5Cksum = try c.decodeIfPresent(String.self, forKey: .md5Cksum)?.boincTrimmed
            }
        }

        enum CodingKeys: String, CodingKey {
            case name, state
            case exitStatus = "exit_status", finalCpuTime = "final_cpu_time", finalElapsedTime = "final_elapsed_time"
            case stderrOut = "stderr_out", fileInfos = "file_info"
        }

        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            self.name = try c.decode(String.self, forKey: .name).boincTrimmed
            self.exitStatus = try c.decodeIfPresent(Int.self, forKey: .exitStatus)
            self.state = try c.decodeIfPresent(Int.self, forKey: .state)
            self.finalCpuTime = try c.decodeIfPresent(Double.self, forKey: .finalCpuTime)
            self.finalElapsedTime = try c.decodeIfPresent(Double.self, forKey: .finalElapsedTime)
            // <stderr_out> mixes elements (<core_client_version>, <message>) with CDATA text.
            self.stderrOut = (try? c.decodeIfPresent(StderrOut.self, forKey: .stderrOut))?.text ?? ""
            self.fileInfos = try c.decodeIfPresent([FileInfo].self, forKey: .fileInfos) ?? []
        }

        public init(name: String, exitStatus: Int?, state: Int?, stderrOut: String = "", fileInfos: [FileInfo] = []) {
            self.name = name
            self.exitStatus = exitStatus
            self.state = state
            self.stderrOut = stderrOut
            self.fileInfos = fileInfos
        }
    }

    /// `<stderr_out>`: its text (what the client wrote as text or CDATA: the app's stderr
    /// in `<stderr_txt>`, or the client's `<message>` about an error), its elements left out.
    struct StderrOut: Decodable {
        var text: String
        init(from decoder: any Decoder) throws {
            // XMLCoder keeps an element's CDATA under "#CDATA" and its text under "" (as a
            // single value, an element with children reads as "").
            let c = try? decoder.container(keyedBy: Keys.self)
            let parts = [Keys.value, Keys.cdata].compactMap { try? c?.decodeIfPresent(String.self, forKey: $0) }.filter { !$0.isEmpty }
            self.text = parts.isEmpty ? ((try? decoder.singleValueContainer().decode(String.self)) ?? "") : parts.joined(separator: "\n")
        }
        enum Keys: String, CodingKey { case value = "", cdata = "#CDATA" }
    }

    enum CodingKeys: String, CodingKey {
        case authenticator, hostid, results = "result", platformName = "platform_name", alternatePlatforms = "alt_platform"
        case rpcSeqno = "rpc_seqno", coreClientMajorVersion = "core_client_major_version", coreClientMinorVersion = "core_client_minor_version"
        case coreClientRelease = "core_client_release", workReqSeconds = "work_req_seconds", cpuReqSecs = "cpu_req_secs"
        case cpuReqInstances = "cpu_req_instances", dontSendWork = "dont_send_work", codeSignKey = "code_sign_key", hostInfo = "host_info"
    }

    struct AltPlatform: Decodable { var name: String }



    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.authenticator = try c.decodeIfPresent(String.self, forKey: .authenticator)?.boincTrimmed
        self.hostid = try c.decodeIfPresent(Int.self, forKey: .hostid)
        self.rpcSeqno = try c.decodeIfPresent(Int.self, forKey: .rpcSeqno)
        self.coreClientMajorVersion = try c.decodeIfPresent(Int.self, forKey: .coreClientMajorVersion)
        self.coreClientMinorVersion = try c.decodeIfPresent(Int.self, forKey: .coreClientMinorVersion)
        self.coreClientRelease = try c.decodeIfPresent(Int.self, forKey: .coreClientRelease)
        self.platformName = try c.decodeIfPresent(String.self, forKey: .platformName)?.boincTrimmed
        self.alternatePlatforms = (try c.decodeIfPresent([AltPlatform].self, forKey: .alternatePlatforms) ?? []).map(\.name.boincTrimmed)
        self.workReqSeconds = try c.decodeIfPresent(Double.self, forKey: .workReqSeconds)
        self.cpuReqSecs = try c.decodeIfPresent(Double.self, forKey: .cpuReqSecs)
        self.cpuReqInstances = try c.decodeIfPresent(Double.self, forKey: .cpuReqInstances)
        self.dontSendWork = try c.decodeIfPresent(Int.self, forKey: .dontSendWork)
        self.codeSignKey = try c.decodeIfPresent(String.self, forKey: .codeSignKey)?.boincTrimmed
        self.hostInfo = try c.decodeIfPresent(HostInfo.self, forKey: .hostInfo)
        self.results = try c.decodeIfPresent([ReportedResult].self, forKey: .results) ?? []
    }

    public init(authenticator: String? = nil, platformName: String? = nil, hostCpid: String? = nil, workReqSeconds: Double? = nil,
                cpuReqInstances: Double? = nil, codeSignKey: String? = nil, results: [ReportedResult] = [], coreClientMajorVersion: Int? = 7) {
        self.authenticator = authenticator
        self.platformName = platformName
        self.alternatePlatforms = []
        self.hostInfo = hostCpid.map { HostInfo(hostCpid: $0) }
        self.workReqSeconds = workReqSeconds
        self.cpuReqInstances = cpuReqInstances
        self.codeSignKey = codeSignKey
        self.results = results
        self.coreClientMajorVersion = coreClientMajorVersion
    }

    /// Seconds of work asked for (the larger of the whole request and the CPU's).
    public var secondsWanted: Double {
        guard self.dontSendWork ?? 0 == 0 else { return 0 }
        let seconds = max(self.workReqSeconds ?? 0, self.cpuReqSecs ?? 0)
        return seconds.isFinite ? max(0, seconds) : 0
    }
}

/// A scheduler reply: `<scheduler_reply>`. Elements come out in this order, each kind
/// together: the nucleus (version, project, messages, request delay), the key, the job
/// descriptions (apps, files, app versions, workunits, results), then the acks.
public struct BOINCSchedulerReply: Encodable, Sendable, Hashable {
    public var schedulerVersion = 720
    public var projectName: String
    public var masterURL: String?
    public var requestDelay: Double?
    public var messages: [Message] = []
    public var codeSignKey: String?
    public var apps: [App] = []
    public var fileInfos: [FileInfo] = []
    public var appVersions: [AppVersion] = []
    public var workunits: [Workunit] = []
    public var results: [Result] = []
    public var resultAcks: [String] = []

    public init(projectName: String) { self.projectName = projectName }

    /// A message to the user: only priority "notice" becomes a notice in the client's
    /// manager; "high" and "low" are lines of its event log.
    public struct Message: Encodable, Sendable, Hashable, DynamicNodeEncoding {
        public var priority: String
        public var text: String
        public init(priority: String, _ text: String) {
            self.priority = priority
            self.text = text
        }
        enum CodingKeys: String, CodingKey { case priority, text = "" }
        public static func nodeEncoding(for key: any CodingKey) -> XMLEncoder.NodeEncoding {
            key.stringValue == CodingKeys.priority.rawValue ? .attribute : .element
        }
    }

    public struct App: Encodable, Sendable, Hashable {
        public var name: String
        public var userFriendlyName: String
        enum CodingKeys: String, CodingKey { case name, userFriendlyName = "user_friendly_name" }
    }

    public struct FileInfo: Encodable, Sendable, Hashable {
        public var name: String
        public var url: String?
        public var uploadURL: String?
        public var md5Cksum: String?
        public var nbytes: Double?
        public var maxNbytes: Double?
        public var executable = false
        public var generatedLocally = false
        public var fileSignature: String?
        /// An upload certificate the client sends back with the file (`BOINCUploadGrant`).
        public var xmlSignature: String?

        public init(name: String) { self.name = name }

        enum CodingKeys: String, CodingKey {
            case name, url, nbytes, executable
            case uploadURL = "upload_url", md5Cksum = "md5_cksum", maxNbytes = "max_nbytes", generatedLocally = "generated_locally"
            case uploadWhenPresent = "upload_when_present", fileSignature = "file_signature", xmlSignature = "xml_signature"
        }

        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(self.name, forKey: .name)
            try c.encodeIfPresent(self.url, forKey: .url)
            try c.encodeIfPresent(self.uploadURL, forKey: .uploadURL)
            try c.encodeIfPresent(self.md5Cksum, forKey: .md5Cksum)
            try c.encodeIfPresent(self.nbytes.map(BOINCNumber.init), forKey: .nbytes)
            try c.encodeIfPresent(self.maxNbytes.map(BOINCNumber.init), forKey: .maxNbytes)
            if self.executable { try c.encode(1, forKey: .executable) }
            if self.generatedLocally {
                try c.encode(1, forKey: .generatedLocally)
                try c.encode(1, forKey: .uploadWhenPresent)
            }
            if let signature = self.fileSignature { try c.encode("\n" + signature, forKey: .fileSignature) }
            if let signature = self.xmlSignature { try c.encode(signature, forKey: .xmlSignature) }
        }
    }

    public struct FileRef: Encodable, Sendable, Hashable {
        public var fileName: String
        public var openName: String?
        public var mainProgram = false
        public var copyFile = false

        enum CodingKeys: String, CodingKey { case fileName = "file_name", openName = "open_name", mainProgram = "main_program", copyFile = "copy_file" }

        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(self.fileName, forKey: .fileName)
            try c.encodeIfPresent(self.openName, forKey: .openName)
            if self.mainProgram { try c.encode(1, forKey: .mainProgram) }
            if self.copyFile { try c.encode(1, forKey: .copyFile) }
        }
    }

    public struct AppVersion: Encodable, Sendable, Hashable {
        public var appName: String
        public var versionNum: Int
        public var platform: String
        public var avgNcpus: Double = 1
        public var flops: Double
        public var fileRef: FileRef

        enum CodingKeys: String, CodingKey {
            case platform, flops
            case appName = "app_name", versionNum = "version_num", avgNcpus = "avg_ncpus", fileRef = "file_ref"
        }

        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(self.appName, forKey: .appName)
            try c.encode(self.versionNum, forKey: .versionNum)
            try c.encode(self.platform, forKey: .platform)
            try c.encode(BOINCNumber(self.avgNcpus), forKey: .avgNcpus)
            try c.encode(BOINCNumber(self.flops), forKey: .flops)
            try c.encode(self.fileRef, forKey: .fileRef)
        }
    }

    public struct Workunit: Encodable, Sendable, Hashable {
        public var name: String
        public var appName: String
        public var versionNum: Int
        public var rscFpopsEst: Double
        public var rscFpopsBound: Double
        public var rscMemoryBound: Double
        public var rscDiskBound: Double
        public var fileRefs: [FileRef]

        enum CodingKeys: String, CodingKey {
            case name
            case appName = "app_name", versionNum = "version_num", rscFpopsEst = "rsc_fpops_est", rscFpopsBound = "rsc_fpops_bound"
            case rscMemoryBound = "rsc_memory_bound", rscDiskBound = "rsc_disk_bound", fileRefs = "file_ref"
        }

        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(self.name, forKey: .name)
            try c.encode(self.appName, forKey: .appName)
            try c.encode(self.versionNum, forKey: .versionNum)
            try c.encode(BOINCNumber(self.rscFpopsEst), forKey: .rscFpopsEst)
            try c.encode(BOINCNumber(self.rscFpopsBound), forKey: .rscFpopsBound)
            try c.encode(BOINCNumber(self.rscMemoryBound), forKey: .rscMemoryBound)
            try c.encode(BOINCNumber(self.rscDiskBound), forKey: .rscDiskBound)
            if !self.fileRefs.isEmpty { try c.encode(self.fileRefs, forKey: .fileRefs) }
        }
    }

    public struct Result: Encodable, Sendable, Hashable {
        public var name: String
        public var wuName: String
        public var platform: String
        public var versionNum: Int
        /// Unix seconds: the lease's deadline.
        public var reportDeadline: Int64
        public var fileRefs: [FileRef]

        enum CodingKeys: String, CodingKey {
            case name, platform
            case wuName = "wu_name", versionNum = "version_num", reportDeadline = "report_deadline", fileRefs = "file_ref"
            case reportImmediately = "report_immediately"
        }

        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(self.name, forKey: .name)
            try c.encode(self.wuName, forKey: .wuName)
            try c.encode(self.platform, forKey: .platform)
            try c.encode(self.versionNum, forKey: .versionNum)
            try c.encode(self.reportDeadline, forKey: .reportDeadline)
            if !self.fileRefs.isEmpty { try c.encode(self.fileRefs, forKey: .fileRefs) }
            // Reported at once, not held back for a later RPC: the lease ends sooner.
            try c.encode(1, forKey: .reportImmediately)
        }
    }

    struct Ack: Encodable { var name: String }

    enum CodingKeys: String, CodingKey {
        case schedulerVersion = "scheduler_version", projectName = "project_name", masterURL = "master_url", requestDelay = "request_delay"
        case messages = "message", codeSignKey = "code_sign_key", apps = "app", fileInfos = "file_info", appVersions = "app_version"
        case workunits = "workunit", results = "result", resultAcks = "result_ack"
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(self.schedulerVersion, forKey: .schedulerVersion)
        try c.encode(self.projectName, forKey: .projectName)
        try c.encodeIfPresent(self.masterURL, forKey: .masterURL)
        if !self.messages.isEmpty { try c.encode(self.messages, forKey: .messages) }
        try c.encodeIfPresent(self.requestDelay.map(BOINCNumber.init), forKey: .requestDelay)
        if let key = self.codeSignKey { try c.encode("\n" + key, forKey: .codeSignKey) }
        if !self.apps.isEmpty { try c.encode(self.apps, forKey: .apps) }
        if !self.fileInfos.isEmpty { try c.encode(self.fileInfos, forKey: .fileInfos) }
        if !self.appVersions.isEmpty { try c.encode(self.appVersions, forKey: .appVersions) }
        if !self.workunits.isEmpty { try c.encode(self.workunits, forKey: .workunits) }
        if !self.results.isEmpty { try c.encode(self.results, forKey: .results) }
        if !self.resultAcks.isEmpty { try c.encode(self.resultAcks.map(Ack.init), forKey: .resultAcks) }
    }

    /// The reply as the client reads it (no XML declaration: BOINC's parser expects the
    /// document element first).
    public func xml() throws -> [UInt8] {
        let encoder = XMLEncoder()
        encoder.outputFormatting = [.prettyPrinted]
        encoder.prettyPrintIndentation = .spaces(2)
        return Array(try encoder.encode(self, withRootKey: "scheduler_reply")) + [0x0A]
    }
}

/// A number as BOINC prints it (`%f`-like, never an exponent that its `atof` would not
/// read, and no "1e+10" Swift may print): integers without a fraction.
struct BOINCNumber: Encodable, Hashable {
    var value: Double
    init(_ value: Double) { self.value = value }
    func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        if self.value.isFinite, self.value == self.value.rounded(), abs(self.value) < 1e18 {
            try c.encode(String(Int64(self.value)))
        } else {
            try c.encode(String(format: "%f", self.value.isFinite ? self.value : 0))
        }
    }
}

/// A file upload handler reply: `<data_server_reply>`.
public struct BOINCDataServerReply: Encodable, Sendable, Hashable {
    /// 0: done; -1: a permanent error (the client gives the upload up); 1: try again later.
    public var status: Int
    public var message: String?
    public var fileSize: Int64?

    public init(status: Int, message: String? = nil, fileSize: Int64? = nil) {
        self.status = status
        self.message = message
        self.fileSize = fileSize
    }

    enum CodingKeys: String, CodingKey { case status, message, fileSize = "file_size" }

    public func xml() -> [UInt8] {
        let encoder = XMLEncoder()
        encoder.outputFormatting = [.prettyPrinted]
        return ((try? encoder.encode(self, withRootKey: "data_server_reply")).map(Array.init) ?? Array("<data_server_reply><status>-1</status></data_server_reply>".utf8)) + [0x0A]
    }
}

extension String {
    /// Without the whitespace around it (the request is decoded without trimming every text
    /// node; the strings the front end reads are trimmed here).
    var boincTrimmed: String { self.trimmingCharacters(in: .whitespacesAndNewlines) }
}
