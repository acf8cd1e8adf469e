import Foundation

/// The built `parley` executable: next to the test bundle, or in the package's .build/debug.
/// `filePath` is the caller's `#filePath` (a file two folders below the package root).
public func parleyExecutablePath(filePath: String = #filePath) -> String? {
    var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    for _ in 0..<4 {
        let candidate = dir.appendingPathComponent("parley").path
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        dir = dir.deletingLastPathComponent()
    }
    let fallback = URL(fileURLWithPath: filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent(".build/debug/parley").path
    return FileManager.default.isExecutableFile(atPath: fallback) ? fallback : nil
}

/// What a finished program printed, and how it ended.
public struct ProcessOutput: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String
    public var combined: String { self.stdout + self.stderr }
}

/// Runs a program to completion, bounded by `seconds` (killed by PID after that). Output
/// goes through files rather than pipes: nothing to drain concurrently, nothing can block.
/// It waits by sleeping the task, never the thread: Swift's pool has one thread per CPU (two
/// here), and a test blocking one for a child's whole life (fio, a copy, a worker) stalled
/// every other test of a parallel run for up to 80 s.
public func runProcess(_ executable: String, _ arguments: [String], stdin: Data? = nil, seconds: Double) async throws -> ProcessOutput {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    let base = FileManager.default.temporaryDirectory.appendingPathComponent("parley-run-\(UUID().uuidString)").path
    let outPath = base + ".stdout", errPath = base + ".stderr", inPath = base + ".stdin"
    _ = FileManager.default.createFile(atPath: outPath, contents: nil)
    _ = FileManager.default.createFile(atPath: errPath, contents: nil)
    _ = FileManager.default.createFile(atPath: inPath, contents: stdin ?? Data())
    defer { for p in [outPath, errPath, inPath] { try? FileManager.default.removeItem(atPath: p) } }
    process.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: outPath))
    process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: errPath))
    process.standardInput = try FileHandle(forReadingFrom: URL(fileURLWithPath: inPath))
    try process.run()
    await waitForExit(process, killAfter: seconds)
    return ProcessOutput(
        status: process.terminationStatus,
        stdout: String(decoding: FileManager.default.contents(atPath: outPath) ?? Data(), as: UTF8.self),
        stderr: String(decoding: FileManager.default.contents(atPath: errPath) ?? Data(), as: UTF8.self)
    )
}

/// Waits (sleeping the task, polling every 10 ms) until `process` has ended; SIGKILLs it by
/// PID after `killAfter` seconds, or at once when the waiting task is cancelled.
public func waitForExit(_ process: Process, killAfter seconds: Double) async {
    let deadline = ContinuousClock.now.advanced(by: .milliseconds(Int64(seconds * 1000)))
    while process.isRunning && ContinuousClock.now < deadline {
        do { try await Task.sleep(for: .milliseconds(10)) } catch { break }
    }
    if process.isRunning { kill(process.processIdentifier, SIGKILL) }
    // A killed process ends at once; its reaping is noticed by Foundation's SIGCHLD handler.
    for _ in 0..<6000 where process.isRunning { try? await Task.sleep(for: .milliseconds(10)) }
    process.waitUntilExit()
}

/// A test's own failure, with what went wrong.
public struct ParleyTestFailure: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Where a test process keeps its files: one directory per process, `/tmp/parley-tests-PID`,
/// removed with everything in it when the process exits, unless `PARLEY_KEEP_TEST_FILES` is
/// set (then its path is printed, for looking at what a run left: servers' logs, stores).
/// A process that crashes leaves it behind, as it is.
public let testScratchRoot: String = {
    let root = FileManager.default.temporaryDirectory.appendingPathComponent("parley-tests-\(getpid())").path
    try? FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
    atexit {
        if getenv("PARLEY_KEEP_TEST_FILES") != nil {
            print("test files kept in \(testScratchRoot) (PARLEY_KEEP_TEST_FILES is set)")
        } else {
            try? FileManager.default.removeItem(atPath: testScratchRoot)
        }
    }
    return root
}()

/// A path for a test's file or directory under `testScratchRoot` (not created).
public func testScratchPath(_ name: String) -> String { testScratchRoot + "/" + name }
