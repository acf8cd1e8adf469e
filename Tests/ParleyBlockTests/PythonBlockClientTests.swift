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
/// over DIRECT frames, and checks the writes in the exported file itself.
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
        let unix = try await Self.live(python, "unix:\(server.blockSocket)", common)
        #expect(unix.stdout.contains("pass over DIRECT frames"), "\(unix.combined)")
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
    }
}
