import Foundation
import ParleyTestSupport
import Testing

/// `Tests/Interop/python/parley_block_client.py` was written from docs/protocol.md alone
/// (section 17 and its DIRECT IO, 17.9; the Parley layer comes from `parley_client.py`), by
/// someone who did not read the implementation: it checks that the document is enough to
/// write a compatible block client in another language. Its self-test checks every vector of
/// 17.7 and 17.9; its live run, against a real `parley block serve`, writes and reads back
/// patterns of several offsets and sizes, many IOs in flight, flush, FUA, write-zeroes and
/// discard, and expects the documented refusals (unaligned, past the end, over max_io_size,
/// bad flags and operations, wrong data segments, unknown device and path, read-only open and
/// export, a second session's writer, Open before SessionInfo), once over Io messages and once
/// over DIRECT frames, and checks the writes in the exported file itself. Then 17.8 and the
/// Fence exchange of 17.1, over Io messages and DIRECT frames: several paths of one
/// `client_instance`, every Fence refusal (another session or instance, its own id, an id never
/// given out, instance 0, before SessionInfo), an ended connection fenced already, a Fence of a
/// path with IO in flight (new IO `FENCED`, an Open `NO_SESSION`, nothing of the fenced path
/// landing after the FenceReply), and a client's failover (write A, write B on a path taken for
/// dead, Fence, B again on the other path, a later overlapping write not overwritten).
@Suite(.serialized, .timeLimit(.minutes(10)))
struct PythonBlockClientTests {
    static let python: String? = ["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"].first { FileManager.default.isExecutableFile(atPath: $0) }
    static var script: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Interop/python/parley_block_client.py").path
    }

    /// Runs the live workload against `address` and expects exit 0 (the output on failure).
    static func live(_ python: String, _ address: String, _ extra: [String]) async throws -> ToolOutput {
        let out = try await Tools.run(python, [Self.script, address, "--export", "disk"] + extra, seconds: 300)
        #expect(out.status == 0 && out.stdout.contains("OK: every check passed"), "\(address): \(out.combined)")
        return out
    }

    @Test func selfTestChecksEveryBlockVector() async throws {
        let python = try #require(Self.python, "python3 is needed (.ci/run installs it)")
        let out = try await Tools.run(python, [Self.script, "--self-test"], seconds: 120)
        #expect(out.status == 0 && out.stdout.contains("19 block vectors (14 of 17.7, 5 of 17.9), 0 failed"), "\(out.combined)")
    }

    @Test func liveWorkloadOverTCPAndAUnixSocketWithDirectIO() async throws {
        let python = try #require(Self.python, "python3 is needed (.ci/run installs it)")
        let scratch = try ScratchDirectory("pyblock")
        let path = try scratch.sparseFile("disk.img", size: 64 << 20)
        let ro = try scratch.sparseFile("ro.img", size: 1 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(path)", "--export", "ro=\(ro),read-only"])
        defer { server.stop() }
        #expect(server.blockPort > 0, "\(server.log)")
        let common = ["--ro-export", "ro", "--file", path, "--expect-direct", "yes"]
        let tcp = try await Self.live(python, "127.0.0.1:\(server.blockPort)", common)
        #expect(tcp.stdout.contains("pass over DIRECT frames"), "\(tcp.combined)")
        #expect(tcp.stdout.contains("pass of 17.8 over Io messages done") && tcp.stdout.contains("pass of 17.8 over DIRECT frames done"), "\(tcp.combined)")
        let unix = try await Self.live(python, "unix:\(server.blockSocket)", common)
        #expect(unix.stdout.contains("pass over DIRECT frames"), "\(unix.combined)")
        #expect(unix.stdout.contains("pass of 17.8 over Io messages done") && unix.stdout.contains("pass of 17.8 over DIRECT frames done"), "\(unix.combined)")
        #expect(server.isRunning, "the server stopped during the runs: \(server.log)")
    }

    /// A server started with `--no-direct` refuses DIRECT IO (17.9): the client sees
    /// `direct_io` false in the SessionInfoReply and sends every IO as an Io message.
    @Test func liveWorkloadAgainstAServerWithoutDirectIO() async throws {
        let python = try #require(Self.python, "python3 is needed (.ci/run installs it)")
        let scratch = try ScratchDirectory("pyblock-nodirect")
        let path = try scratch.sparseFile("disk.img", size: 64 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--no-direct", "--export", "disk=\(path),block-size=4096"])
        defer { server.stop() }
        let out = try await Self.live(python, "unix:\(server.blockSocket)", ["--file", path, "--expect-direct", "no"])
        #expect(out.stdout.contains("DIRECT granted: False") && out.stdout.contains("logical block 4096"), "\(out.combined)")
        #expect(out.stdout.contains("pass of 17.8 over Io messages done"), "\(out.combined)")
    }

    /// 17.8's Fence with one IO thread and no inline writes: path 1's FUA writes queue behind
    /// the thread, so a Fence finds modifications admitted and not yet started, which the server
    /// drops (an Io message: ERROR `cancelled`; DIRECT: `FENCED`, R-17.9-3). The client checks
    /// that none of them is carried out and that every write answered OK is on the device when
    /// the FenceReply comes (whether a drop happens is timing: printed, not required).
    @Test func liveMultipathFenceWithOneIOThread() async throws {
        let python = try #require(Self.python, "python3 is needed (.ci/run installs it)")
        let scratch = try ScratchDirectory("pyblock-fence")
        let path = try scratch.sparseFile("disk.img", size: 64 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--io-threads", "1", "--inline-writes", "0", "--export", "disk=\(path)"])
        defer { server.stop() }
        #expect(server.blockPort > 0, "\(server.log)")
        let out = try await Self.live(python, "127.0.0.1:\(server.blockPort)", ["--file", path, "--expect-direct", "yes"])
        #expect(out.stdout.contains("pass of 17.8 over Io messages done") && out.stdout.contains("pass of 17.8 over DIRECT frames done"), "\(out.combined)")
        #expect(server.isRunning, "the server stopped during the run: \(server.log)")
    }
}
