import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A TCP port on 127.0.0.1 that nothing listens on now (bound, read and closed): for a
/// program that needs a fixed address across its restarts, or one given before it starts.
public func freeLoopbackPort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = 0
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) { pointer in
        pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
    }
    guard bound else { throw ParleyTestFailure("no free port on 127.0.0.1") }
    return Int(UInt16(bigEndian: address.sin_port))
}

/// Stops a process a test started, by its PID: `signal` (SIGTERM), then SIGKILL after `grace`
/// seconds; returns once it has ended. Sleeps the task, not the thread (see `runProcess`).
public func stopProcess(_ process: Process, signal: Int32 = SIGTERM, grace: Double = 5) async {
    guard process.isRunning else { return }
    kill(process.processIdentifier, signal)
    await waitForExit(process, killAfter: grace)
}

/// `stopProcess` for a `defer` or other synchronous code: blocks its thread, for up to
/// `grace` seconds; use the async form wherever a test can await.
public func stopProcessBlocking(_ process: Process, signal: Int32 = SIGTERM, grace: Double = 5) {
    guard process.isRunning else { return }
    kill(process.processIdentifier, signal)
    for _ in 0..<Int(grace * 100) where process.isRunning { usleep(10_000) }
    if process.isRunning { kill(process.processIdentifier, SIGKILL) }
    process.waitUntilExit()
}

/// Runs blocking `body` (a blocking socket read, say) on a thread of its own and awaits its
/// result: Swift's pool has one thread per CPU, and a test blocking one starves the others.
public func onOwnThread<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        Thread { continuation.resume(returning: body()) }.start()
    }
}
