import Crypto
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
#if canImport(Glibc)
import Glibc
#endif

/// Jobs' input and output files: the rules for their names, their checks, and the worker's
/// side (fetching inputs, reading outputs back). A name is a relative path inside the job's
/// directory; anything that could leave it (an absolute path, "..", a NUL, a symbolic link
/// that points out) is refused, by the master at submission and in reports, and by the worker.
public enum WorkFiles {
    /// The most a report's output files may hold together.
    public static let maxOutputBytes = 16 << 20
    /// The most an input may be.
    public static let maxInputBytes: UInt64 = 1 << 30

    public struct FileError: Error, Sendable, Hashable, CustomStringConvertible {
        public var message: String
        public init(_ message: String) { self.message = message }
        public var description: String { self.message }
    }

    /// Checks a file name of a job: a relative path whose parts are neither empty, "." nor
    /// "..", without NUL, at most 4,096 bytes.
    public static func check(name: String) throws(FileError) {
        guard !name.isEmpty else { throw FileError("a file name is empty") }
        guard name.utf8.count <= 4096 else { throw FileError("the file name '\(name.prefix(40))...' is longer than 4,096 bytes") }
        guard !name.hasPrefix("/") else { throw FileError("the file name '\(name)' is absolute: it must stay in the job's directory") }
        guard !name.utf8.contains(0) else { throw FileError("the file name '\(name)' holds a NUL byte") }
        for part in name.split(separator: "/", omittingEmptySubsequences: false) {
            guard !part.isEmpty, part != ".", part != ".." else {
                throw FileError("the file name '\(name)' has a part '\(part)': it must stay in the job's directory")
            }
        }
    }

    public static func sha256(_ bytes: some DataProtocol) -> [UInt8] {
        Array(SHA256.hash(data: bytes))
    }

    /// Whether `bytes` are `size` long and hash to `sha256`.
    static func matches(_ bytes: Data, size: UInt64, sha256: Data) -> Bool {
        UInt64(bytes.count) == size && self.sha256(bytes) == Array(sha256)
    }

    /// What a master checks of a job's files at submission.
    public static func check(spec: Parley_Work_V1_JobSpec) throws(FileError) {
        var names = Set<String>()
        for input in spec.inputs {
            try self.check(name: input.name)
            guard names.insert(input.name).inserted else { throw FileError("the input '\(input.name)' is named twice") }
            guard input.sha256.count == 32 else { throw FileError("the input '\(input.name)' has no SHA-256 (32 bytes)") }
            guard input.size <= self.maxInputBytes else { throw FileError("the input '\(input.name)' is over \(self.maxInputBytes) bytes") }
            if input.content.isEmpty && input.size > 0 {
                guard let url = URL(string: input.url), ["http", "https"].contains(url.scheme ?? "") else {
                    throw FileError("the input '\(input.name)' has neither its content nor an http(s) URL")
                }
            } else {
                guard self.matches(input.content, size: input.size, sha256: input.sha256) else {
                    throw FileError("the input '\(input.name)' does not match its size and SHA-256")
                }
            }
        }
        // Each output's name (and some 50 bytes of size and SHA-256) goes into the report
        // beside 16 MiB of files, in a frame of 16 MiB + 64 KiB: at most 100 outputs whose
        // names take 16 KiB together leave the report room (WorkWorker.fitTails).
        guard spec.outputs.count <= 100 else { throw FileError("the job names \(spec.outputs.count) outputs, over the limit of 100") }
        let nameBytes = spec.outputs.reduce(0) { $0 + $1.utf8.count }
        guard nameBytes <= 16 << 10 else { throw FileError("the job's output names take \(nameBytes) bytes together, over the limit of 16384") }
        var outputs = Set<String>()
        for output in spec.outputs {
            try self.check(name: output)
            // A report carries each output once: a name given twice could never be reported.
            guard outputs.insert(output).inserted else { throw FileError("the output '\(output)' is named twice") }
        }
    }

    /// What a master checks of a report's output files.
    public static func check(outputs: [Parley_Work_V1_OutputFile]) throws(FileError) {
        var total = 0
        for output in outputs {
            try self.check(name: output.name)
            total += output.content.count
            guard total <= self.maxOutputBytes else { throw FileError("the output files are over \(self.maxOutputBytes) bytes together") }
            guard self.matches(output.content, size: output.size, sha256: output.sha256) else {
                throw FileError("the output '\(output.name)' does not match its size and SHA-256")
            }
        }
    }

    /// The worker's side: writes the inputs into `directory` (fetching those given by URL),
    /// each checked against its signed size and SHA-256 first.
    static func writeInputs(_ inputs: [Parley_Work_V1_InputFile], into directory: String) async throws(FileError) {
        for input in inputs {
            try self.check(name: input.name)
            var bytes = input.content
            if bytes.isEmpty && input.size > 0 {
                bytes = try await self.fetch(input.url, name: input.name, size: input.size)
            }
            guard UInt64(bytes.count) == input.size else {
                throw FileError("the input '\(input.name)' is \(bytes.count) bytes, not \(input.size)")
            }
            guard self.sha256(bytes) == Array(input.sha256) else {
                throw FileError("the input '\(input.name)' does not match its SHA-256")
            }
            let path = directory + "/" + input.name
            do {
                try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
                try bytes.write(to: URL(fileURLWithPath: path))
            } catch {
                throw FileError("cannot write the input '\(input.name)': \(error)")
            }
        }
    }

    static func fetch(_ url: String, name: String, size: UInt64) async throws(FileError) -> Data {
        guard let address = URL(string: url), ["http", "https"].contains(address.scheme ?? "") else {
            throw FileError("the input '\(name)' has no http(s) URL")
        }
        var request = URLRequest(url: address)
        request.timeoutInterval = 60
        // Received in pieces and stopped at size + 1 bytes: the URL is signed, what a server
        // sends is not, and a server could send without end.
        let fetcher = CappedFetch(limit: Int(min(size, self.maxInputBytes)) + 1)
        let session = URLSession(configuration: .ephemeral, delegate: fetcher, delegateQueue: nil)
        defer { session.finishTasksAndInvalidate() }
        // Cancelling the calling task stops the download (a server trickling bytes would
        // otherwise hold it for as long as it likes: the timeout counts only silence).
        let outcome = await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Result<(Data, Int), any Error>, Never>) in
                fetcher.start(session.dataTask(with: request), then: c)
            }
        } onCancel: {
            fetcher.cancel()
        }
        if Task.isCancelled { throw FileError("fetching the input '\(name)' from \(url): stopped") }
        switch outcome {
        case .success((let data, let status)):
            guard status == 200 else { throw FileError("fetching the input '\(name)' from \(url): HTTP \(status)") }
            return data
        case .failure(let error):
            throw FileError("fetching the input '\(name)' from \(url): \(error.localizedDescription)")
        }
    }

    /// The worker's side: reads the outputs a job left in `directory`. A name that resolves
    /// outside the directory (through a symbolic link) is refused.
    static func readOutputs(_ names: [String], from directory: String) throws(FileError) -> [Parley_Work_V1_OutputFile] {
        let root = URL(fileURLWithPath: directory).resolvingSymlinksInPath().path
        var total = 0
        return try names.map { name throws(FileError) in
            try self.check(name: name)
            let resolved = URL(fileURLWithPath: directory + "/" + name).resolvingSymlinksInPath().path
            guard resolved.hasPrefix(root + "/") else { throw FileError("the output '\(name)' leads out of the job's directory") }
            let data = try self.readRegularFile(directory + "/" + name, name: name, budget: self.maxOutputBytes - total)
            total += data.count
            var output = Parley_Work_V1_OutputFile()
            output.name = name
            output.size = UInt64(data.count)
            output.sha256 = Data(self.sha256(data))
            output.content = data
            return output
        }
    }

    /// Reads a regular file (not a link, a FIFO or a device) of at most `budget` bytes,
    /// without reading more than that.
    static func readRegularFile(_ path: String, name: String, budget: Int) throws(FileError) -> Data {
        // The type as lstat sees it: a link is not followed.
        guard let attributes = try? FileManager.default.attributesOfItem(atPath: path) else { throw FileError("the job left no output '\(name)'") }
        guard attributes[.type] as? FileAttributeType == .typeRegular else { throw FileError("the output '\(name)' is not a regular file") }
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { throw FileError("cannot open the output '\(name)': \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        // Never more than the budget and one byte, whatever the file says of its size.
        var data = Data()
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, min($0.count, budget + 1 - data.count)) }
            guard n >= 0 else { throw FileError("cannot read the output '\(name)': \(String(cString: strerror(errno)))") }
            if n == 0 { break }
            data.append(contentsOf: chunk[0..<n])
            guard data.count <= budget else { throw FileError("the outputs are over \(self.maxOutputBytes) bytes together") }
        }
        return data
    }
}

/// A download that keeps at most `limit` bytes and then stops (URLSession's `data(for:)`
/// would keep whatever the server sends).
private final class CappedFetch: NSObject, URLSessionDataDelegate, @unchecked Sendable {
    // Touched from URLSession's delegate queue (serial) and once from `start`.
    private let limit: Int
    private let lock = NSLock()
    private var data = Data()
    private var status = 0
    private var continuation: CheckedContinuation<Result<(Data, Int), any Error>, Never>?

    init(limit: Int) {
        self.limit = limit
    }

    private var task: URLSessionDataTask?
    private var cancelled = false

    func start(_ task: URLSessionDataTask, then continuation: CheckedContinuation<Result<(Data, Int), any Error>, Never>) {
        let cancelled = self.lock.withLock { () -> Bool in
            self.continuation = continuation
            self.task = task
            return self.cancelled
        }
        task.resume()
        if cancelled { task.cancel() }
    }

    /// Stops the download: the task completes with an error (at once if not started yet).
    func cancel() {
        let task = self.lock.withLock { () -> URLSessionDataTask? in
            self.cancelled = true
            return self.task
        }
        task?.cancel()
    }

    private func finish(_ result: Result<(Data, Int), any Error>) {
        let c = self.lock.withLock { () -> CheckedContinuation<Result<(Data, Int), any Error>, Never>? in
            defer { self.continuation = nil }
            return self.continuation
        }
        c?.resume(returning: result)
    }

    func urlSession(_ session: URLSession, dataTask: URLSessionDataTask, didReceive response: URLResponse,
                    completionHandler: @escaping (URLSession.ResponseDisposition) -> Void) {
        self.lock.withLock { self.status = (response as? HTTPURLResponse)?.statusCode ?? 0 }
        completionHandler(.allow)
    }

    func urlSession(_ session: URLSession, dataTask: URLSessionDataTask, didReceive data: Data) {
        let over = self.lock.withLock { () -> Bool in
            self.data.append(data.prefix(max(0, self.limit - self.data.count)))
            return self.data.count >= self.limit
        }
        if over {
            // The caller sees limit bytes: more than the signed size, so it is refused.
            dataTask.cancel()
            self.finish(.success(self.lock.withLock { (self.data, self.status) }))
        }
    }

    func urlSession(_ session: URLSession, task: URLSessionTask, didCompleteWithError error: (any Error)?) {
        if let error {
            self.finish(.failure(error))
        } else {
            self.finish(.success(self.lock.withLock { (self.data, self.status) }))
        }
    }
}
