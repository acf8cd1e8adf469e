import Foundation
import ParleyWork
import Testing

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
        let dir = NSTemporaryDirectory() + "work-keys-\(UUID().uuidString.prefix(8))"
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
