import ParleyBlock
import Testing

/// RNBD's `map_device` words, as `parley block map --rnbd` reads them.
@Suite struct BlockMapRequestTests {
    @Test func rnbdLines() throws {
        let seed = try BlockMapRequest(rnbd: "sessname=blya path=ip:10.50.100.66 device_path=/dev/ram0")
        #expect(seed == BlockMapRequest(session: "blya", paths: ["10.50.100.66:7421"], device: "/dev/ram0", access: "rw"))
        let multi = try BlockMapRequest(rnbd: """
            sessname=s1 path=ip:10.0.0.2,ip:10.0.0.1 path=ip:10.0.1.1:7500 path=unix:/run/b.sock path=ip:fe80::1 \
            device_path=vm/disk access_mode=ro nr_poll_queues=4
            """)
        #expect(multi.session == "s1")
        #expect(multi.paths == ["10.0.0.1:7421", "10.0.1.1:7500", "unix:/run/b.sock", "[fe80::1]:7421"])
        #expect(multi.device == "vm/disk" && multi.access == "ro")
        #expect(try BlockMapRequest(rnbd: "sessname=m path=ip:h device_path=d access_mode=migration").access == "migration")
    }

    @Test(arguments: [
        ("path=ip:h device_path=d", "no sessname="),
        ("sessname=s device_path=d", "no path="),
        ("sessname=s path=ip:h", "no device_path="),
        ("sessname=s path=ip:h device_path=d access_mode=rx", "bad access_mode"),
        ("sessname=s path=gid:fe80::1 device_path=d", "InfiniBand"),
        ("sessname=s path=ip:h device_path=d size=3", "unknown RNBD word \"size=\""),
        ("sessname=s path=ip:h device_path", "expected KEY=VALUE"),
        ("sessname=s path= device_path=d", "empty path"),
    ])
    func badLines(line: String, complaint: String) {
        do {
            _ = try BlockMapRequest(rnbd: line)
            Issue.record("accepted \(line)")
        } catch {
            #expect(error.status == .invalid)
            #expect(error.message.contains(complaint), "\(error.message)")
        }
    }
}
