import Crypto
import Foundation
import ParleyWork

/// How a Parley Work job becomes a BOINC job, as pure functions (no store, no clock).
///
/// One lease is one BOINC workunit with one result. Every name carries the job id and the
/// lease id (`BOINCName`), so that a report, an upload or a download maps back to the lease
/// without any state of the front end's own. The job's command runs inside a small POSIX-sh
/// program made for the lease (`script`): it is the BOINC app version's only file, so BOINC's
/// signature over it covers exactly what runs. Inputs are BOINC input files copied into the
/// slot directory; outputs (and the command's stdout) are BOINC output files uploaded to the
/// front end.
public enum BOINCJobs {
    /// The BOINC app a job runs under: its own application's name, or "parley".
    public static func appName(_ spec: Parley_Work_V1_JobSpec) -> String {
        spec.app.isEmpty ? "parley" : spec.app
    }

    /// The app version's number: the lease id (BOINC's is an int), unique for every lease, so
    /// that every lease's program is a new app version the client fetches and checks.
    public static func versionNumber(leaseID: UInt64) -> Int { Int(leaseID % UInt64(Int32.max)) }

    /// The FLOPS the app versions claim: a job's seconds are its FLOPs divided by this.
    public static let flops: Double = 1e9

    /// The program that runs the job in the client's slot directory: moves the inputs to their
    /// names, checks them against their signed SHA-256 (the spec's), applies the CPU and
    /// memory limits, runs the command with only the spec's environment (stdout to a file, kept
    /// to its last `maxOutput` bytes), moves the outputs to the files BOINC uploads, writes
    /// `boinc_finish_called` (the client's sign that a plain app ended by itself) and exits with
    /// the command's status. Deterministic: the download handler makes it again, byte for byte,
    /// from the spec.
    public static func script(jobID: UInt64, leaseID: UInt64, spec: Parley_Work_V1_JobSpec, maxOutput: Int) -> [UInt8] {
        let q = Self.quote
        let maxOutput = WorkService.tailLimit(spec, fallback: UInt64(max(0, maxOutput)), cap: maxOutput)
        var lines = [
            "#!/bin/sh",
            "# Parley Work job \(jobID), lease \(leaseID): made by the BOINC front end of parley work serve,",
            "# signed with the project's BOINC key.",
            "finish() { printf '%s\\n' \"$1\" > boinc_finish_called; exit \"$1\"; }",
            "fail() { printf '%s\\n' \"$1\" >&2; finish \"$2\"; }",
        ]
        for (i, input) in spec.inputs.enumerated() {
            let name = input.name, staged = BOINCName.inputOpenName(i)
            if let slash = name.lastIndex(of: "/") {
                lines.append("mkdir -p \(q(String(name[..<slash]))) || fail \(q("cannot make the directory of input \(name)")) 196")
            }
            lines.append("mv -f \(q(staged)) \(q(name)) || fail \(q("input \(name) is missing")) 196")
            let hex = input.sha256.map { String(format: "%02x", $0) }.joined()
            lines.append("if command -v sha256sum >/dev/null 2>&1; then")
            lines.append("  [ \"$(sha256sum < \(q(name)) | cut -c1-64)\" = \(hex) ] || fail \(q("input \(name) does not match its signed SHA-256")) 197")
            lines.append("fi")
        }
        if spec.maxCpuSeconds > 0 { lines.append("ulimit -t \(spec.maxCpuSeconds) || fail 'cannot limit CPU time' 198") }
        if spec.maxMemoryBytes > 0 { lines.append("ulimit -v \(max(1, spec.maxMemoryBytes / 1024)) || fail 'cannot limit memory' 198") }
        var command = ["env", "-i"] + spec.env.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
        if spec.shell {
            command += ["/bin/sh", "-c", spec.argv.joined(separator: " ")]
        } else {
            command += spec.argv
        }
        lines.append(command.map(q).joined(separator: " ") + " > parley_stdout_all")
        lines.append("status=$?")
        lines.append("tail -c \(max(1, maxOutput)) parley_stdout_all > \(q(BOINCName.stdoutOpenName)); rm -f parley_stdout_all")
        for (i, output) in spec.outputs.enumerated() {
            lines.append("[ -f \(q(output)) ] && mv -f \(q(output)) \(q(BOINCName.outputOpenName(i)))")
        }
        lines.append("finish \"$status\"")
        return Array((lines.joined(separator: "\n") + "\n").utf8)
    }

    /// A word for sh, in single quotes.
    static func quote(_ word: String) -> String {
        "'" + word.replacingOccurrences(of: "'", with: "'\\''") + "'"
    }

    /// The BOINC documents for one lease: what a scheduler reply carries to hand it out.
    public struct Documents: Sendable, Hashable {
        public var app: BOINCSchedulerReply.App
        public var fileInfos: [BOINCSchedulerReply.FileInfo]
        public var appVersion: BOINCSchedulerReply.AppVersion
        public var workunit: BOINCSchedulerReply.Workunit
        public var result: BOINCSchedulerReply.Result
    }

    /// The documents of a claimed job for a client of `platform`; `base` is the front end's URL
    /// (ending in "/").
    public static func documents(
        job: ClaimedJob, spec: Parley_Work_V1_JobSpec, platform: String, base: String, key: BOINCSigning.PrivateKey, grant: BOINCUploadGrant, maxOutput: Int
    ) throws(BOINCKeyError) -> Documents {
        let name = BOINCName(jobID: job.id, leaseID: job.lease.id)
        let app = Self.appName(spec)
        let version = Self.versionNumber(leaseID: job.lease.id)
        let program = Self.script(jobID: job.id, leaseID: job.lease.id, spec: spec, maxOutput: maxOutput)
        var programInfo = BOINCSchedulerReply.FileInfo(name: name.program)
        programInfo.url = base + "download/" + name.program
        programInfo.md5Cksum = BOINCSigning.md5Hex(program)
        programInfo.nbytes = Double(program.count)
        programInfo.executable = true
        programInfo.fileSignature = try key.signature(ofFile: program)
        var files = [programInfo]
        var workunitRefs: [BOINCSchedulerReply.FileRef] = []
        for (i, input) in spec.inputs.enumerated() {
            var info = BOINCSchedulerReply.FileInfo(name: name.input(i))
            if input.content.isEmpty && !input.url.isEmpty && input.size > 0 {
                // Fetched by the client from where the spec says; the program checks its SHA-256.
                info.url = input.url
            } else {
                info.url = base + "download/" + name.input(i)
                info.md5Cksum = BOINCSigning.md5Hex(Array(input.content))
            }
            info.nbytes = Double(input.size)
            files.append(info)
            workunitRefs.append(.init(fileName: name.input(i), openName: BOINCName.inputOpenName(i), copyFile: true))
        }
        var resultRefs: [BOINCSchedulerReply.FileRef] = []
        // Output files are held to what a report may carry (together, checked at the report);
        // max_output_bytes is about stdout and stderr, not them.
        let maxOutputFile = Double(WorkFiles.maxOutputBytes)
        for (i, _) in spec.outputs.enumerated() {
            files.append(Self.outputInfo(name.output(i), base: base, max: maxOutputFile, grant: grant))
            resultRefs.append(.init(fileName: name.output(i), openName: BOINCName.outputOpenName(i), copyFile: true))
        }
        files.append(Self.outputInfo(name.stdout, base: base, max: Double(WorkService.tailLimit(spec, fallback: UInt64(max(0, maxOutput)), cap: maxOutput)), grant: grant))
        resultRefs.append(.init(fileName: name.stdout, openName: BOINCName.stdoutOpenName, copyFile: true))
        let estimate = Double(spec.estimatedSeconds > 0 ? spec.estimatedSeconds : 60)
        let wall = Double(spec.maxWallSeconds > 0 ? spec.maxWallSeconds : 86_400)
        return Documents(
            app: .init(name: app, userFriendlyName: app == "parley" ? "Parley Work job" : "Parley Work: \(app)"),
            fileInfos: files,
            appVersion: .init(appName: app, versionNum: version, platform: platform, flops: Self.flops, fileRef: .init(fileName: name.program, mainProgram: true)),
            workunit: .init(
                name: name.workunit, appName: app, versionNum: version, rscFpopsEst: estimate * Self.flops, rscFpopsBound: wall * Self.flops,
                rscMemoryBound: Double(spec.maxMemoryBytes > 0 ? spec.maxMemoryBytes : 100_000_000), rscDiskBound: 1e9, fileRefs: workunitRefs
            ),
            result: .init(
                name: name.result, wuName: name.workunit, platform: platform, versionNum: version,
                reportDeadline: job.lease.deadline / 1_000_000_000, fileRefs: resultRefs
            )
        )
    }

    static func outputInfo(_ name: String, base: String, max: Double, grant: BOINCUploadGrant) -> BOINCSchedulerReply.FileInfo {
        var info = BOINCSchedulerReply.FileInfo(name: name)
        info.uploadURL = base + "file_upload_handler"
        info.maxNbytes = max
        info.generatedLocally = true
        info.xmlSignature = grant.token(for: name)
        return info
    }

    /// The app's stderr from a reported `<stderr_out>`: the text of its `<stderr_txt>` (the
    /// client's own lines are left out), or all of it when there is none.
    public static func stderr(of stderrOut: String) -> [UInt8] {
        if let start = stderrOut.range(of: "<stderr_txt>\n"), let end = stderrOut.range(of: "</stderr_txt>", range: start.upperBound..<stderrOut.endIndex) {
            return Array(stderrOut[start.upperBound..<end.lowerBound].utf8)
        }
        return Array(stderrOut.utf8)
    }
}

/// The names of a lease's BOINC objects: `parley_j<JOB>_l<LEASE>` for the workunit, with
/// `_r` for its result, `.sh` for its program, `_in<N>` for its inputs, `_out<N>` for its
/// outputs and `_stdout` for the command's stdout.
public struct BOINCName: Sendable, Hashable {
    public var jobID: UInt64
    public var leaseID: UInt64

    public init(jobID: UInt64, leaseID: UInt64) {
        self.jobID = jobID
        self.leaseID = leaseID
    }

    public var workunit: String { "parley_j\(self.jobID)_l\(self.leaseID)" }
    public var result: String { self.workunit + "_r" }
    public var program: String { self.workunit + ".sh" }
    public func input(_ i: Int) -> String { self.workunit + "_in\(i)" }
    public func output(_ i: Int) -> String { self.workunit + "_out\(i)" }
    public var stdout: String { self.workunit + "_stdout" }

    /// The names the files have in the client's slot directory.
    static func inputOpenName(_ i: Int) -> String { "parley_in\(i)" }
    static func outputOpenName(_ i: Int) -> String { "parley_out\(i)" }
    static let stdoutOpenName = "parley_stdout"

    /// A file of a lease: what it is.
    public enum File: Sendable, Hashable {
        case program, input(Int), output(Int), stdout
    }

    /// Whether files of `kind` are uploaded by clients (outputs and stdout).
    static func isUpload(_ kind: File) -> Bool {
        switch kind {
        case .output, .stdout: true
        case .program, .input: false
        }
    }

    /// Reads a result's name.
    public static func parse(result: String) -> BOINCName? {
        guard result.hasSuffix("_r") else { return nil }
        return self.parseBase(result.dropLast(2))
    }

    /// Reads a file's name.
    public static func parse(file: String) -> (BOINCName, File)? {
        if file.hasSuffix(".sh") { return self.parseBase(file.dropLast(3)).map { ($0, .program) } }
        if file.hasSuffix("_stdout") { return self.parseBase(file.dropLast(7)).map { ($0, .stdout) } }
        for (tag, make) in [("_in", File.input), ("_out", File.output)] {
            guard let range = file.range(of: tag, options: .backwards), let i = Self.number(file[range.upperBound...]), i < 1 << 20 else { continue }
            if let base = self.parseBase(file[..<range.lowerBound]) { return (base, make(Int(i))) }
        }
        return nil
    }

    private static func parseBase(_ text: Substring) -> BOINCName? {
        guard text.hasPrefix("parley_j"), let l = text.range(of: "_l") else { return nil }
        guard let job = Self.number(text[text.index(text.startIndex, offsetBy: 8)..<l.lowerBound]), let lease = Self.number(text[l.upperBound...]) else { return nil }
        return BOINCName(jobID: job, leaseID: lease)
    }

    private static func number(_ text: Substring) -> UInt64? {
        guard !text.isEmpty, text.count <= 20, text.utf8.allSatisfy({ (0x30...0x39).contains($0) }) else { return nil }
        return UInt64(text)
    }
}

/// An upload certificate, in the place of BOINC's: the scheduler puts an `<xml_signature>` in
/// each output file's `<file_info>`, and the client sends it back with the file's upload (its
/// header's `<file_info>`). BOINC signs the file_info with RSA; this front end puts an
/// HMAC-SHA256 of the file's name (which names its job and lease) there, keyed from the
/// project's BOINC key, so that only the host the lease went to can upload its files, and a
/// master restarted with the same key still knows its grants.
public struct BOINCUploadGrant: Sendable {
    let key: SymmetricKey

    public init(boincKey: BOINCSigning.PrivateKey) {
        self.key = SymmetricKey(data: SHA256.hash(data: Array("parley-work boinc upload grant v1\0".utf8) + boincKey.body))
    }

    public func token(for fileName: String) -> String {
        HMAC<SHA256>.authenticationCode(for: Array(fileName.utf8), using: self.key).map { String(format: "%02x", $0) }.joined()
    }

    public func check(_ token: String, for fileName: String) -> Bool {
        guard token.utf8.count == 64, let bytes = BOINCKeyText.parseHex(token + "\n.") else { return false }
        return HMAC<SHA256>.isValidAuthenticationCode(bytes, authenticating: Array(fileName.utf8), using: self.key)
    }
}
