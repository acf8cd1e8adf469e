import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The server processes this process started, by PID, so that every way out (normal end,
/// error, SIGINT/SIGTERM) stops them.
///
/// A child also exits by itself when its standard input reaches end of file, which happens
/// when this process dies in a way that runs no cleanup (SIGKILL, a crash).
final class ChildProcesses: Sendable {
    static let shared = ChildProcesses()
    private let running = Mutex<Set<pid_t>>([])

    func add(_ pid: pid_t) { self.running.withLock { _ = $0.insert(pid) } }

    /// Stops one child: SIGTERM, then SIGKILL if it is still there after `grace`; reaps it.
    /// Safe to call from two threads at once (a signal handler and the normal way out): both
    /// return once the child is gone.
    func stop(_ pid: pid_t, grace: Duration = .seconds(2)) {
        guard self.running.withLock({ $0.contains(pid) }) else { return }
        defer { self.running.withLock { _ = $0.remove(pid) } }
        kill(pid, SIGTERM)
        let deadline = ContinuousClock.now + grace
        var status: Int32 = 0
        while ContinuousClock.now < deadline {
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid || (r == -1 && errno != EINTR) { return }
            usleep(5_000)
        }
        kill(pid, SIGKILL)
        while waitpid(pid, &status, 0) == -1 && errno == EINTR {}
    }

    func stopAll() {
        for pid in self.running.withLock({ Array($0) }) { self.stop(pid) }
    }

    /// On SIGINT or SIGTERM: stop the children, remove `directory` (the temporary keyring and
    /// certificates), then exit. Keep the result alive.
    func stopOnSignals(removing directory: String? = nil) -> [any DispatchSourceSignal] {
        [SIGINT, SIGTERM].map { sig in
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler {
                FileHandle.standardError.write(Data("\nparley-bench: signal \(sig): stopping the servers\n".utf8))
                ChildProcesses.shared.stopAll()
                if let directory { try? FileManager.default.removeItem(atPath: directory) }
                exit(128 + sig)
            }
            source.resume()
            return source
        }
    }
}

/// A benchmark server running in a child process (`parley-bench server --system S`).
struct ServerChild: Sendable {
    let system: System
    let pid: pid_t
    let port: Int
    /// Our end of the child's standard input: closing it makes the child exit.
    private let stdinWriter: Int32

    /// Starts this executable again as `server --system <system>` (then `arguments`) and
    /// reads the port it prints.
    static func spawn(_ system: System, arguments: [String] = [], timeout: Duration = .seconds(60)) async throws -> ServerChild {
        let executable = try currentExecutable()
        let (pid, stdinWriter, stdoutReader) = try spawnProcess(executable, ["server", "--system", system.rawValue] + arguments)
        let child = ServerChild(system: system, pid: pid, port: 0, stdinWriter: stdinWriter!)

        // Read the first line ("PORT <n>") off the cooperative pool; kill the child if it
        // takes too long, which ends the read with end of file.
        let answered = Flag()
        let watchdog = Task {
            try await Task.sleep(for: timeout)
            if !answered.isSet { ChildProcesses.shared.stop(pid) }
        }
        let line: String? = await withCheckedContinuation { continuation in
            DispatchQueue.global().async {
                let line = readLine(fd: stdoutReader)
                answered.set()
                close(stdoutReader)
                continuation.resume(returning: line)
            }
        }
        watchdog.cancel()
        guard let line, line.hasPrefix("PORT "), let port = Int(line.dropFirst(5)) else {
            child.stop()
            throw BenchError("the \(system.title) server process did not report its port (got \(line.map { "\"\($0)\"" } ?? "nothing"))")
        }
        return ServerChild(system: system, pid: pid, port: port, stdinWriter: stdinWriter!)
    }

    /// Stops the child by its PID (SIGTERM, then SIGKILL) and reaps it.
    func stop() {
        ChildProcesses.shared.stop(self.pid)
        close(self.stdinWriter)
    }
}

/// Starts `executable` with `arguments` (argv[0] is the executable), its standard output a
/// pipe to us, its standard input a pipe from us (`stdinPipe`) or /dev/null. Registers the
/// child with `ChildProcesses` (stopped by PID on every way out). Returns the PID, our end of
/// its standard input (nil with /dev/null) and our end of its standard output.
func spawnProcess(_ executable: String, _ arguments: [String], stdinPipe: Bool = true) throws -> (pid: pid_t, stdinWriter: Int32?, stdoutReader: Int32) {
    let (stdoutReader, stdoutWriter) = try makePipe()
    var stdinReader: Int32 = -1, stdinWriter: Int32 = -1
    if stdinPipe {
        do { (stdinReader, stdinWriter) = try makePipe() } catch {
            close(stdoutReader)
            close(stdoutWriter)
            throw error
        }
    }

    #if os(Linux)
    var actions = posix_spawn_file_actions_t()
    #else
    var actions: posix_spawn_file_actions_t?
    #endif
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    if stdinPipe {
        posix_spawn_file_actions_adddup2(&actions, stdinReader, 0)
    } else {
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    }
    posix_spawn_file_actions_adddup2(&actions, stdoutWriter, 1)

    let args = [executable] + arguments
    let env = ProcessInfo.processInfo.environment.map { "\($0.key)=\($0.value)" }
    let argv: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
    let envp: [UnsafeMutablePointer<CChar>?] = env.map { strdup($0) } + [nil]
    defer { (argv + envp).forEach { free($0) } }

    var spawned: pid_t = 0
    let rc = posix_spawn(&spawned, executable, &actions, nil, argv, envp)
    if stdinPipe { close(stdinReader) }
    close(stdoutWriter)
    guard rc == 0 else {
        if stdinPipe { close(stdinWriter) }
        close(stdoutReader)
        throw BenchError("cannot start \(executable): \(String(cString: strerror(rc)))")
    }
    ChildProcesses.shared.add(spawned)
    return (spawned, stdinPipe ? stdinWriter : nil, stdoutReader)
}

final class Flag: Sendable {
    private let value = Mutex(false)
    var isSet: Bool { self.value.withLock { $0 } }
    func set() { self.value.withLock { $0 = true } }
}

/// The path of the running executable.
func currentExecutable() throws -> String {
    #if os(Linux)
    var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    if n > 0 { return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) }
    #endif
    guard let path = Bundle.main.executablePath ?? CommandLine.arguments.first else {
        throw BenchError("cannot find the path of this executable")
    }
    return path
}

/// A pipe whose two ends are closed on exec (the child gets its end through dup2, which
/// clears the flag), so that a later child does not inherit an earlier child's pipes.
private func makePipe() throws -> (reader: Int32, writer: Int32) {
    var fds: [Int32] = [-1, -1]
    guard pipe(&fds) == 0 else { throw BenchError("pipe failed: errno \(errno)") }
    for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    return (fds[0], fds[1])
}

/// Reads bytes up to a newline or end of file (blocking).
func readLine(fd: Int32) -> String? {
    var bytes: [UInt8] = []
    var byte: UInt8 = 0
    while true {
        let n = read(fd, &byte, 1)
        if n == 1 {
            if byte == UInt8(ascii: "\n") { break }
            bytes.append(byte)
        } else if n == -1 && errno == EINTR {
            continue
        } else {
            break
        }
    }
    return bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self)
}

/// In a server child: exit as soon as standard input reaches end of file (the parent is gone
/// or has closed it).
func exitWhenStandardInputCloses() {
    let thread = Thread {
        var byte: UInt8 = 0
        while true {
            let n = read(0, &byte, 1)
            if n == 0 || (n == -1 && errno != EINTR) { exit(0) }
        }
    }
    thread.start()
}
