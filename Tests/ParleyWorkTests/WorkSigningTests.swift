import Foundation
import NIOCore
import ParleyWire
@testable import ParleyWork
import SwiftProtobuf
import Testing
import ParleyTestSupport

/// Ed25519 job signing: jobs, key rotation, key files.
@Suite struct WorkSigningTests {
    @Test func aSignedJobVerifiesAndAnyChangeIsRefused() throws {
        let key = WorkSigning.PrivateKey()
        let job = Array("run: make test\n".utf8)
        let signature = try key.sign(job: job)
        try key.publicKey.verify(job: job, signature: signature)
        var altered = job
        altered[0] ^= 1
        #expect(throws: WorkSigningError.self) { try key.publicKey.verify(job: altered, signature: signature) }
        var badSignature = signature
        badSignature[10] ^= 0x40
        #expect(throws: WorkSigningError.self) { try key.publicKey.verify(job: job, signature: badSignature) }
        let missing = #expect(throws: WorkSigningError.self) { try key.publicKey.verify(job: job, signature: []) }
        #expect(missing?.message == "the job is not signed")
        #expect(throws: WorkSigningError.self) { try WorkSigning.PrivateKey().publicKey.verify(job: job, signature: signature) }
    }

    @Test func aRotationIsVouchedForByTheOldKeyAndCannotPassForAJob() throws {
        let old = WorkSigning.PrivateKey(), new = WorkSigning.PrivateKey()
        let statement = try old.signRotation(to: new.publicKey)
        try old.publicKey.verifyRotation(to: new.publicKey, signature: statement)
        #expect(throws: WorkSigningError.self) { try old.publicKey.verifyRotation(to: WorkSigning.PrivateKey().publicKey, signature: statement) }
        #expect(throws: WorkSigningError.self) { try new.publicKey.verifyRotation(to: new.publicKey, signature: try new.signRotation(to: old.publicKey)) }
        // Domain separation: a job whose bytes are the new key does not verify with the rotation's signature.
        #expect(throws: WorkSigningError.self) { try old.publicKey.verify(job: new.publicKey.rawRepresentation, signature: statement) }
    }

    @Test func keyFilesRoundTripAndTheirMistakesAreNamed() throws {
        let dir = testScratchPath("work-keys-\(UUID().uuidString.prefix(8))")
        let key = WorkSigning.PrivateKey()
        try WorkSigning.writeKeyPair(key, directory: dir)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(try WorkSigning.readPrivateKey(dir + "/work.key").rawRepresentation == key.rawRepresentation)
        #expect(try WorkSigning.readPublicKey(dir + "/work.pub") == key.publicKey)
        let again = #expect(throws: WorkSigningError.self) { try WorkSigning.writeKeyPair(WorkSigning.PrivateKey(), directory: dir) }
        #expect(again?.message.contains("not overwriting") == true)
        #expect(chmod(dir + "/work.key", 0o644) == 0)
        let loose = #expect(throws: WorkSigningError.self) { _ = try WorkSigning.readPrivateKey(dir + "/work.key") }
        #expect(loose?.message.contains("chmod 600") == true)
        let wrong = #expect(throws: WorkSigningError.self) { _ = try WorkSigning.readPrivateKey(dir + "/work.pub") }
        #expect(wrong?.message.contains("readable by others") == true || wrong?.message.contains("not a parley-work-ed25519-private-key") == true)
        #expect(throws: WorkSigningError.self) { _ = try WorkSigning.readPublicKey(dir + "/nothing") }
    }
}

/// Prints the Work protocol's vectors of docs/protocol.md section 19 from the implementation
/// (`PARLEY_PRINT_WORK_VECTORS=1 swift test --filter printWorkVectors`).
@Suite struct WorkVectorPrinter {
    @Test(.enabled(if: ProcessInfo.processInfo.environment["PARLEY_PRINT_WORK_VECTORS"] != nil))
    func printWorkVectors() throws {
        let key = try WorkSigning.PrivateKey(rawRepresentation: Array(repeating: 0x42, count: 32))
        var spec = Parley_Work_V1_JobSpec()
        spec.argv = ["/bin/echo", "hello"]
        spec.env = ["PATH": "/usr/bin:/bin"]
        let specBytes: [UInt8] = try spec.serializedBytes()
        let signature = try key.sign(job: specBytes)
        print("public key: \(key.publicKey.rawRepresentation.map { String(format: "%02x", $0) }.joined())")
        print("spec: \(specBytes.map { String(format: "%02x", $0) }.joined())")
        print("signature: \(signature.map { String(format: "%02x", $0) }.joined())")
        func vector(_ name: String, seq: UInt64, ack: UInt64, id: UInt64, kind: MessageKind, _ message: some SwiftProtobuf.Message) throws {
            let wire = WireMessage(header: MessageHeader(seq: seq, ack: ack, id: id, kind: kind, type: type(of: message).protoMessageName), payload: message.parleyPayload())
            var out: [ByteBuffer] = []
            wire.frame(allocator: ByteBufferAllocator()).encode(into: &out, allocator: ByteBufferAllocator())
            var bytes: [UInt8] = []
            for b in out { bytes += b.readableBytesView }
            print("```vector\nname: \(name)\nkind: frame\ntag: 0x10 MESSAGE\nflags: 0")
            print("segment: header seq=\(seq) ack=\(ack) id=\(id) kind=\(kind) flags=0 type=\(type(of: message).protoMessageName)")
            print("segment: proto \(type(of: message).protoMessageName) \(try message.jsonString())")
            print("wire:\n" + stride(from: 0, to: bytes.count, by: 16).map { "  " + bytes[$0..<min($0 + 16, bytes.count)].map { String(format: "%02x", $0) }.joined(separator: " ") }.joined(separator: "\n") + "\n```\n")
        }
        var request = Parley_Work_V1_RequestWork()
        request.worker = "worker-1"
        request.slots = 1
        try vector("work-request-work", seq: 2, ack: 1, id: 2, kind: .request, request)
        var assignments = Parley_Work_V1_WorkAssignments()
        var a = Parley_Work_V1_Assignment()
        a.jobID = 7
        a.leaseID = 12
        a.deadlineUnixMs = 1_764_500_000_000
        a.job.spec = Data(specBytes)
        a.job.signature = Data(signature)
        assignments.assignments = [a]
        try vector("work-assignments", seq: 2, ack: 2, id: 2, kind: .response, assignments)
        var report = Parley_Work_V1_ReportResult()
        report.worker = "worker-1"
        report.jobID = 7
        report.leaseID = 12
        report.wallMs = 3
        report.stdoutTail = Data("hello\n".utf8)
        try vector("work-report-result", seq: 3, ack: 2, id: 3, kind: .request, report)
        var ack = Parley_Work_V1_ReportAck()
        ack.verdict = .accepted
        try vector("work-report-ack", seq: 3, ack: 3, id: 3, kind: .response, ack)
    }
}

/// The signature printed in docs/protocol.md section 19.5 verifies with the key printed there,
/// and the key is the one the seed gives.
@Suite struct WorkDocumentTests {
    @Test func theDocumentsSignatureVerifies() throws {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("docs/protocol.md")
        let text = try String(contentsOf: url, encoding: .utf8)
        let section = try #require(text.range(of: "### 19.5 Vectors")).upperBound
        let hexes = text[section...].split(separator: "`").map(String.init).filter { $0.count >= 64 && $0.allSatisfy(\.isHexDigit) }
        #expect(hexes.count >= 3, "public key, spec and signature in hex")
        func bytes(_ hex: String) -> [UInt8] { stride(from: 0, to: hex.count, by: 2).map { UInt8(hex.dropFirst($0).prefix(2), radix: 16)! } }
        let (publicKey, spec, signature) = (bytes(hexes[0]), bytes(hexes[1]), bytes(hexes[2]))
        let key = try WorkSigning.PublicKey(rawRepresentation: publicKey)
        #expect(key == (try WorkSigning.PrivateKey(rawRepresentation: Array(repeating: 0x42, count: 32))).publicKey)
        try key.verify(job: spec, signature: signature)
        let decoded = try Parley_Work_V1_JobSpec(serializedBytes: spec)
        #expect(decoded.argv == ["/bin/echo", "hello"] && decoded.env == ["PATH": "/usr/bin:/bin"])
    }
}

/// A job's output tail keeps the last bytes of each stream, whatever the chunk sizes.
@Suite struct OutputTailTests {
    @Test func theTailKeepsTheLastBytes() {
        let tail = OutputTail(limit: 10)
        for i in 0..<1000 { tail.append(Data([UInt8(i % 256)])) }
        #expect(tail.bytes == (990..<1000).map { UInt8($0 % 256) })
        tail.append(Data((0..<100).map { UInt8($0) }))
        #expect(tail.bytes == Array(90..<100).map(UInt8.init))
    }
}
