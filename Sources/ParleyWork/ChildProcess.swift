import CParleySpawn
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A job's or a command's child process, started with posix_spawn(3) rather than
/// Foundation's `Process`, for three things `Process` does not give on Linux:
/// - the child starts with no signal blocked and every signal at its default action (it
///   would otherwise inherit the runtime threads' mask, which blocks SIGTERM and SIGINT, and
///   the ignored SIGPIPE);
/// - its end is seen by waitpid(2) on the child itself: `Process` sees it through a socket
///   the child inherits, so a grandchild that leaves the process group (setsid) and keeps
///   running kept the job from ending;
/// - no descriptor of the worker but the three standard ones reaches the child.
/// swift-subprocess does the first too, but not yet the process-group and no-reap waiting
/// the worker needs (kill the group before the leader is reaped), so this is written by hand.
struct ChildProcess: Sendable {
    let pid: pid_t
    /// The read ends of the child's stdout and stderr.
    let stdout: Int32
    let stderr: Int32

    struct SpawnError: Error, CustomStringConvertible {
        var description: String
    }

    /// Starts `arguments[0]` (an absolute path) with `arguments`, exactly `environment`, in
    /// `directory`, stdin from /dev/null, as the leader of a new process group.
    static func spawn(arguments: [String], environment: [String: String], directory: String) throws -> ChildProcess {
        var out: [Int32] = [-1, -1], err: [Int32] = [-1, -1]
        guard parley_pipe_cloexec(&out) == 0 else { throw SpawnError(description: "pipe: \(String(cString: strerror(errno)))") }
        guard parley_pipe_cloexec(&err) == 0 else {
            close(out[0]); close(out[1])
            throw SpawnError(description: "pipe: \(String(cString: strerror(errno)))")
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, out[1], 1)
        posix_spawn_file_actions_adddup2(&actions, err[1], 2)
        parley_spawn_addclosefrom(&actions, 3)
        parley_spawn_addchdir(&actions, directory)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigmask(&attributes, &none)
        var all = sigset_t()
        sigfillset(&all)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setpgroup(&attributes, 0)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP))
        let argv = arguments.map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for p in argv { free(p) }
            for p in envp { free(p) }
        }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, arguments[0], &actions, &attributes, argv, envp)
        close(out[1])
        close(err[1])
        guard rc == 0 else {
            close(out[0]); close(err[0])
            throw SpawnError(description: "cannot run \(arguments[0]): \(String(cString: strerror(rc)))")
        }
        return ChildProcess(pid: pid, stdout: out[0], stderr: err[0])
    }

    /// Waits (on a thread of its own) until the child has ended, without reaping it: its
    /// process group can then still be killed with no risk of the pid being reused.
    func waitForEnd() async {
        let pid = self.pid
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let thread = Thread {
                var info = siginfo_t()
                while waitid(P_PID, id_t(pid), &info, WEXITED | WNOWAIT) != 0, errno == EINTR {}
                continuation.resume()
            }
            thread.start()
        }
    }

    /// Reaps the ended child: its exit status, or the signal that ended it, and the CPU time
    /// (user and system) of it and of the descendants it waited for, in milliseconds.
    func reap() -> (exitStatus: Int32, signal: Int32, cpuMs: UInt64) {
        var status: Int32 = 0
        var usage = rusage()
        while wait4(self.pid, &status, 0, &usage) < 0, errno == EINTR {}
        let cpu = (Int64(usage.ru_utime.tv_sec) + Int64(usage.ru_stime.tv_sec)) * 1000
            + (Int64(usage.ru_utime.tv_usec) + Int64(usage.ru_stime.tv_usec)) / 1000
        // WIFEXITED / WEXITSTATUS / WTERMSIG, which Swift does not import.
        let signal = status & 0x7f
        return signal == 0 ? ((status >> 8) & 0xff, 0, UInt64(max(0, cpu))) : (0, signal, UInt64(max(0, cpu)))
    }
}
