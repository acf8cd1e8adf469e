import Foundation
import ParleyTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `parley block serve` used by the real NBD programs of Debian's libnbd-bin, qemu-utils and
/// fio, installed by `.ci/run`.
@Suite(.timeLimit(.minutes(5)))
struct NBDInteropTests {
    @Test func nbdinfoListShowsExportsSizesAndBlockSizes() async throws {
        let nbdinfo = try Tools.require("nbdinfo", package: "libnbd-bin")
        let scratch = try ScratchDirectory()
        try scratch.sparseFile("a.img", size: 64 << 20)
        try scratch.sparseFile("b.img", size: 8 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: [
            "--export", "alpha=\(scratch.file("a.img"))", "--export", "beta=\(scratch.file("b.img")),read-only,block-size=4096",
        ])
        defer { server.stop() }
        let out = try await Tools.run(nbdinfo, ["--list", server.nbdURI])
        #expect(out.status == 0, "\(out.combined)")
        #expect(out.stdout.contains("export=\"alpha\""))
        #expect(out.stdout.contains("export=\"beta\""))
        #expect(out.stdout.contains("export-size: 67108864"))
        #expect(out.stdout.contains("export-size: 8388608"))
        #expect(out.stdout.contains("block_size_minimum: 4096"))
        #expect(out.stdout.contains("is_read_only: true"))
        #expect(out.stdout.contains("base:allocation"))
        // Over the Unix socket too.
        let unix = try await Tools.run(nbdinfo, [server.nbdUnixURI("alpha")])
        #expect(unix.status == 0, "\(unix.combined)")
        #expect(unix.stdout.contains("export-size: 67108864"))
        #expect(unix.stdout.contains("can_multi_conn: true"))
        #expect(unix.stdout.contains("can_df: true"), "NBD_FLAG_SEND_DF once structured replies are on")
    }

    @Test func nbdinfoAndQemuImgUseTLSWithTheDevelopmentCertificates() async throws {
        let nbdinfo = try Tools.require("nbdinfo", package: "libnbd-bin")
        let qemuImg = try Tools.require("qemu-img", package: "qemu-utils")
        let scratch = try ScratchDirectory()
        try scratch.sparseFile("a.img", size: 16 << 20)
        let certs = scratch.file("certs")
        let made = try await Tools.run(try Tools.parley, ["cert", "init", "--dir", certs])
        #expect(made.status == 0, "\(made.combined)")
        let server = try await BlockServerProcess(scratch: scratch, arguments: [
            "--export", "alpha=\(scratch.file("a.img"))", "--cert", certs, "--nbd-tls", "require",
        ])
        defer { server.stop() }
        let secured = try await Tools.run(nbdinfo, ["nbds://127.0.0.1:\(server.nbdPort)/alpha?tls-certificates=\(certs)"])
        #expect(secured.status == 0, "\(secured.combined)")
        #expect(secured.stdout.contains("with TLS"))
        #expect(secured.stdout.contains("export-size: 16777216"))
        // Without TLS the server refuses the export.
        let plain = try await Tools.run(nbdinfo, ["\(server.nbdURI)/alpha"])
        #expect(plain.status != 0)
        // A client that does not trust the server's CA fails the TLS handshake.
        let other = scratch.file("other")
        _ = try await Tools.run(try Tools.parley, ["cert", "init", "--dir", other])
        let untrusted = try await Tools.run(nbdinfo, ["nbds://127.0.0.1:\(server.nbdPort)/alpha?tls-certificates=\(other)"])
        #expect(untrusted.status != 0)
        // qemu with its own TLS stack (GnuTLS through qemu's crypto layer).
        let info = try await Tools.run(qemuImg, [
            "info", "--object", "tls-creds-x509,id=tls0,dir=\(certs),endpoint=client", "--image-opts",
            "driver=nbd,host=127.0.0.1,port=\(server.nbdPort),export=alpha,tls-creds=tls0",
        ])
        #expect(info.status == 0, "\(info.combined)")
        #expect(info.stdout.contains("16 MiB"))
    }

    @Test func qemuImgConvertsAQcow2ImageInAndOut() async throws {
        let qemuImg = try Tools.require("qemu-img", package: "qemu-utils")
        let qemuIO = try Tools.require("qemu-io", package: "qemu-utils")
        let scratch = try ScratchDirectory()
        let source = scratch.file("source.qcow2")
        #expect(try await Tools.run(qemuImg, ["create", "-f", "qcow2", source, "48M"]).status == 0)
        let fill = try await Tools.run(qemuIO, ["-c", "write -P 0xab 1M 3M", "-c", "write -P 0x5c 17M 64k", "-c", "write -P 0x01 40M 8M", source])
        #expect(fill.status == 0, "\(fill.combined)")
        try scratch.sparseFile("disk.img", size: 48 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(scratch.file("disk.img"))"])
        defer { server.stop() }
        let into = try await Tools.run(qemuImg, ["convert", "-n", "-f", "qcow2", "-O", "raw", source, "\(server.nbdURI)/disk"])
        #expect(into.status == 0, "\(into.combined)")
        let back = scratch.file("back.qcow2")
        let out = try await Tools.run(qemuImg, ["convert", "-f", "raw", "-O", "qcow2", server.nbdUnixURI("disk"), back])
        #expect(out.status == 0, "\(out.combined)")
        let compare = try await Tools.run(qemuImg, ["compare", "-f", "qcow2", "-F", "qcow2", source, back])
        #expect(compare.status == 0, "\(compare.combined)")
        #expect(compare.stdout.contains("Images are identical"))
        // And the export itself matches the source.
        let direct = try await Tools.run(qemuImg, ["compare", "-f", "qcow2", "-F", "raw", source, scratch.file("disk.img")])
        #expect(direct.status == 0, "\(direct.combined)")
    }

    @Test func nbdcopyRoundTripsRandomDataByteForByte() async throws {
        let nbdcopy = try Tools.require("nbdcopy", package: "libnbd-bin")
        let mib = Int(ProcessInfo.processInfo.environment["PARLEY_BLOCK_COPY_MIB"] ?? "") ?? 256
        let scratch = try ScratchDirectory()
        let random = scratch.file("random.bin")
        let dd = try await Tools.run("/bin/dd", ["if=/dev/urandom", "of=\(random)", "bs=1M", "count=\(mib)", "status=none"])
        #expect(dd.status == 0)
        try scratch.sparseFile("disk.img", size: mib << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(scratch.file("disk.img"))"])
        defer { server.stop() }
        let up = try await Tools.run(nbdcopy, [random, "\(server.nbdURI)/disk"], seconds: 240)
        #expect(up.status == 0, "\(up.combined)")
        let back = scratch.file("back.bin")
        let down = try await Tools.run(nbdcopy, [server.nbdUnixURI("disk"), back], seconds: 240)
        #expect(down.status == 0, "\(down.combined)")
        let cmp = try await Tools.run("/usr/bin/cmp", [random, back])
        #expect(cmp.status == 0, "copies differ: \(cmp.combined)")
        // And over TCP, where large reads of cached pages go out with sendfile.
        let backTCP = scratch.file("back-tcp.bin")
        let downTCP = try await Tools.run(nbdcopy, ["\(server.nbdURI)/disk", backTCP], seconds: 240)
        #expect(downTCP.status == 0, "\(downTCP.combined)")
        let cmpTCP = try await Tools.run("/usr/bin/cmp", [random, backTCP])
        #expect(cmpTCP.status == 0, "copies differ: \(cmpTCP.combined)")
    }

    @Test func fioWritesAndVerifiesRandomDataAtQueueDepth32() async throws {
        let fio = try Tools.require("fio", package: "fio")
        let scratch = try ScratchDirectory()
        try scratch.sparseFile("disk.img", size: 64 << 20)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "disk=\(scratch.file("disk.img"))"])
        defer { server.stop() }
        let out = try await Tools.run(fio, [
            "--name=verify", "--ioengine=nbd", "--uri=\(server.nbdURI)/disk", "--rw=randwrite", "--bs=4k", "--iodepth=32",
            "--size=32M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json",
        ], seconds: 240)
        #expect(out.status == 0, "\(out.combined)")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(out.stdout.utf8[out.stdout.utf8.firstIndex(of: UInt8(ascii: "{"))!...])) as? [String: Any])
        let job = try #require((json["jobs"] as? [[String: Any]])?.first)
        #expect(job["error"] as? Int == 0)
        let read = try #require(job["read"] as? [String: Any])
        let write = try #require(job["write"] as? [String: Any])
        // Every block written was read back and verified.
        #expect(write["io_bytes"] as? Int == 32 << 20)
        #expect(read["io_bytes"] as? Int == 32 << 20)
    }

    @Test func nbdinfoMapShowsTheHolesOfASparseExport() async throws {
        let nbdinfo = try Tools.require("nbdinfo", package: "libnbd-bin")
        let scratch = try ScratchDirectory()
        let path = try scratch.sparseFile("sparse.img", size: 16 << 20)
        let fd = open(path, O_RDWR)
        let block = [UInt8](repeating: 0x42, count: 1 << 20)
        #expect(pwrite(fd, block, block.count, 4 << 20) == block.count)
        #expect(pwrite(fd, block, block.count, 10 << 20) == block.count)
        close(fd)
        let server = try await BlockServerProcess(scratch: scratch, arguments: ["--export", "sparse=\(path),read-only"])
        defer { server.stop() }
        let out = try await Tools.run(nbdinfo, ["--map", "\(server.nbdURI)/sparse"])
        #expect(out.status == 0, "\(out.combined)")
        let rows = out.stdout.split(separator: "\n").map { $0.split(separator: " ", omittingEmptySubsequences: true).map(String.init) }
        let extents = rows.compactMap { r -> (Int, Int, Int)? in
            guard r.count >= 3, let o = Int(r[0]), let l = Int(r[1]), let t = Int(r[2]) else { return nil }
            return (o, l, t)
        }
        let expected: [(Int, Int, Int)] = [(0, 4 << 20, 3), (4 << 20, 1 << 20, 0), (5 << 20, 5 << 20, 3), (10 << 20, 1 << 20, 0), (11 << 20, 5 << 20, 3)]
        #expect(extents.count == expected.count, "\(out.stdout)")
        for (a, b) in zip(extents, expected) {
            #expect(a == b, "\(out.stdout)")
        }
    }
}
