import Foundation
import NIOCore
import ParleyBlock
import ParleyWork
import ParleyServices
import ParleyWire
import SwiftProtobuf
import Testing

/// Checks docs/protocol.md against the ParleyWire codec.
///
/// Every fenced block with the info string `vector` is parsed (format: docs/protocol.md,
/// "Test vectors") and checked in both directions:
/// - valid vectors: encoding the described banner or frame gives exactly the `wire` bytes,
///   and decoding the `wire` bytes with `WireDecoder` (all at once and one byte at a time)
///   gives the described banner or frame, protobuf payloads included;
/// - invalid vectors: the stage they name fails with a `ParleyError` of the named code.
///
/// The suite fails if a vector block cannot be parsed, if a known frame tag, message kind or
/// required error has no vector, or if there are fewer vectors than the document had when the
/// suite was written, so that the check cannot pass on an empty or truncated document.
@Suite struct ProtocolDocumentTests {
    /// Vectors in docs/protocol.md when this suite was written; removing one fails the suite.
    static let minimumVectorCount = 82

    /// What must have at least one vector, besides every known frame tag and message kind.
    static let requiredCoverage: [String] = [
        "banner", "MESSAGE/data",
        "error/badMagic", "error/badPreambleCRC", "error/badSegmentCRC", "error/frameTooLarge",
        "error/unknownFrameTag", "error/truncated", "error/unsupportedVersion", "error/missingFeatures",
        // Parley Block (section 17): every exchange, a write and a read with data.
        "type/parley.block.v1.SessionInfo", "type/parley.block.v1.SessionInfoReply", "type/parley.block.v1.Open",
        "type/parley.block.v1.OpenReply", "type/parley.block.v1.Io", "type/parley.block.v1.IoReply",
        "type/parley.block.v1.Close", "type/parley.block.v1.CloseReply", "type/parley.block.v1.Fence", "type/parley.block.v1.FenceReply",
        "data/parley.block.v1.Io", "data/parley.block.v1.IoReply",
        // DIRECT IO (sections 7.16, 17.9): a request and an answer with data.
        "DIRECT/data",
        // Parley Work (section 19): asking for work, an assignment, a report and its ack.
        "type/parley.work.v1.RequestWork", "type/parley.work.v1.WorkAssignments", "type/parley.work.v1.ReportResult", "type/parley.work.v1.ReportAck",
        // Master-initiated commands (section 19.8): a command, its output, its result, a chunk.
        "type/parley.work.v1.Command", "type/parley.work.v1.CommandUpdate", "type/parley.work.v1.CommandResult", "data/parley.work.v1.TransferWrite",
        // Secure mode (section 5.1): both ciphers, a key update, the key schedule, the transcript.
        "sealed/aes-256-gcm", "sealed/chacha20-poly1305", "sealed/key-update", "secret", "transcript",
    ]

    @Test func documentHasAVectorForEveryKind() throws {
        let document = try ProtocolDocument.load()
        let vectors = document.vectors
        // A vector block the parser skipped would go unchecked: the fences must match.
        let fences = document.text.split(separator: "\n", omittingEmptySubsequences: false)
            .filter { $0.trimmingCharacters(in: .whitespaces) == "```vector" }.count
        #expect(fences == vectors.count, "\(fences) ```vector fences but \(vectors.count) vectors parsed")
        #expect(vectors.count >= Self.minimumVectorCount, "only \(vectors.count) vectors; expected at least \(Self.minimumVectorCount)")

        var required = Set(Self.requiredCoverage)
        for tag in FrameTag.allKnown { required.insert(tag.description) }
        for raw in UInt8(0)...UInt8(255) where MessageKind(rawValue: raw).isKnown {
            required.insert("MESSAGE/\(MessageKind(rawValue: raw))")
        }
        #expect(vectors.count >= required.count, "\(vectors.count) vectors cannot cover \(required.count) kinds")

        var covered = Set<String>()
        var names = Set<String>()
        for vector in vectors {
            #expect(names.insert(vector.name).inserted, "duplicate vector name \(vector.name)")
            covered.formUnion(try vector.coverage())
        }
        for item in required.sorted() {
            #expect(covered.contains(item), "docs/protocol.md has no test vector for \(item)")
        }
    }

    @Test func validVectorsEncodeToTheirWireBytes() throws {
        let vectors = try ProtocolDocument.load().vectors.filter { $0.kind == "banner" || $0.kind == "frame" }
        #expect(!vectors.isEmpty)
        for vector in vectors {
            switch try vector.described() {
            case .banner(let banner):
                var out = ByteBuffer()
                out.writeBanner(banner)
                expectBytes(Array(out.readableBytesView), vector.wire, vector)
            case .frame(let frame):
                var whole = ByteBuffer()
                whole.writeFrame(frame)
                expectBytes(Array(whole.readableBytesView), vector.wire, vector)
                // The vectored encoder (what connections use) must give the same bytes.
                var parts: [ByteBuffer] = []
                frame.encode(into: &parts, allocator: ByteBufferAllocator())
                expectBytes(parts.flatMap { Array($0.readableBytesView) }, vector.wire, vector)
                #expect(frame.wireSize == vector.wire.count, "\(vector.name): wireSize")
                // A MESSAGE must also be exactly what WireMessage builds (header, payload,
                // data segment with its alignment hint).
                if frame.tag == .message {
                    let message = try WireMessage(frame: frame)
                    let rebuilt = message.frame(allocator: ByteBufferAllocator())
                    #expect(rebuilt == frame, "\(vector.name): WireMessage.frame differs from the described frame")
                }
            }
        }
    }

    /// The DIRECT block vectors of section 17.9 mean what the text says: each one's segment 0,
    /// read by the block protocol's DIRECT codec, gives the operation, flags, device, offset,
    /// length or status listed here; and every `# block: status N (NAME)` or `operation N
    /// (name)` comment in the document names the value N has in block.proto. (The
    /// out-of-range answer carried status 5, NOT_FOUND, under the comment OUT_OF_RANGE: its
    /// bytes and CRCs were consistent, so only an independent client reading its meaning saw it.)
    @Test func directBlockVectorsMeanWhatTheirTextSays() throws {
        let document = try ProtocolDocument.load()
        let direct = document.vectors.filter { $0.name.hasPrefix("direct-block-") }
        let requests: [String: BlockDirect.Request] = [
            "direct-block-read": BlockDirect.Request(operation: 0, flags: 0, deviceID: 1, offset: 4096, length: 512),
            "direct-block-write-fua": BlockDirect.Request(operation: 1, flags: 1, deviceID: 1, offset: 8192, length: 512),
        ]
        let answers: [String: Parley_Block_V1_BlockStatus] = [
            "direct-block-read-answer": .ok, "direct-block-write-answer": .ok, "direct-block-out-of-range-answer": .outOfRange,
        ]
        #expect(Set(direct.map(\.name)) == Set(requests.keys).union(answers.keys), "the DIRECT block vectors: \(direct.map(\.name))")
        for vector in direct {
            let described = try #require(vector.values("segment").first)
            let segment = try ProtocolDocument.hexBytes(String(described.dropFirst("hex ".count)))
            var header = ByteBuffer(bytes: segment.dropFirst(DirectFrame.idSize))
            if let expected = requests[vector.name] {
                #expect(try BlockDirect.Request.decode(header).get() == expected, "\(vector.name)")
            } else if let expected = answers[vector.name] {
                #expect(segment.count == BlockDirect.answerSegment0Length, "\(vector.name)")
                let read = header.readInteger(endianness: .little, as: UInt32.self)
                let status = try #require(read)
                #expect(Parley_Block_V1_BlockStatus(rawValue: Int(status)) == expected, "\(vector.name): status \(status)")
            }
        }
        // Every comment that names a block status or operation by number names it rightly.
        let statusComment = try Regex(#"# block: status (\d+) \(([A-Z_]+)\)"#)
        let operationComment = try Regex(#"# block: operation (\d+) \(([a-z-]+)\)"#)
        var seen = 0
        for line in document.text.split(separator: "\n") {
            if let m = line.firstMatch(of: statusComment), let n = Int(m.output[1].substring ?? ""), let name = m.output[2].substring {
                guard n != 0 else {
                    #expect(name == "OK", "\(line): status 0 is OK")
                    seen += 1
                    continue
                }
                var reply = Parley_Block_V1_IoReply()
                reply.status = Parley_Block_V1_BlockStatus(rawValue: n) ?? .UNRECOGNIZED(n)
                let json = try reply.jsonString()
                #expect(json.contains("\"BLOCK_STATUS_\(name)\""), "\(line): status \(n) is \(json)")
                seen += 1
            }
            if let m = line.firstMatch(of: operationComment), let n = Int(m.output[1].substring ?? ""), let name = m.output[2].substring {
                let operations: [String: Parley_Block_V1_IoOperation] = ["read": .read, "write": .write, "flush": .flush, "discard": .discard, "write-zeroes": .writeZeroes]
                #expect(operations[String(name)] == Parley_Block_V1_IoOperation(rawValue: n), "\(line): operation \(n) is not \(name)")
                seen += 1
            }
        }
        #expect(seen >= direct.count, "\(seen) block comments checked")
    }

    @Test func validVectorsDecodeToTheirStructure() throws {
        let vectors = try ProtocolDocument.load().vectors.filter { $0.kind == "banner" || $0.kind == "frame" }
        #expect(!vectors.isEmpty)
        for vector in vectors {
            let described = try vector.described()
            let isBanner: Bool
            if case .banner = described { isBanner = true } else { isBanner = false }
            for chunk in [0, 1] {
                let decoded: [WireInbound]
                do {
                    decoded = try ProtocolDocument.decode(vector.wire, expectBanner: isBanner, chunk: chunk)
                } catch {
                    Issue.record("\(vector.name): decoding failed: \(error)")
                    continue
                }
                guard decoded.count == 1, let element = decoded.first else {
                    Issue.record("\(vector.name): decoded \(decoded.count) elements, expected 1")
                    continue
                }
                switch (described, element) {
                case (.banner(let expected), .banner(let banner)):
                    #expect(banner == expected, "\(vector.name)")
                case (.frame(let expected), .frame(let frame)):
                    #expect(frame.tag == expected.tag, "\(vector.name): tag")
                    #expect(frame.flags == expected.flags, "\(vector.name): flags")
                    #expect(frame.alignments == expected.alignments, "\(vector.name): alignments")
                    #expect(frame == expected, "\(vector.name): frame")
                    try checkSegments(frame, against: vector)
                    if frame.tag == .message {
                        let message = try WireMessage(frame: frame)
                        #expect(message.payload == frame.segments[1])
                        #expect(message.data == (frame.segments.count > 2 ? frame.segments[2] : nil))
                    }
                    if let expectation = vector.value("session") {
                        var session = SessionStateMachine(role: .client, features: .implemented)
                        let event = session.received(.frame(frame))
                        switch expectation {
                        case "ignored": #expect(event == .ignore, "\(vector.name): session gave \(event)")
                        default: Issue.record("\(vector.name): unknown session expectation \(expectation)")
                        }
                    }
                default:
                    Issue.record("\(vector.name): decoded \(element), described \(described)")
                }
            }
        }
    }

    @Test func sealedVectorsSealAndOpen() throws {
        let vectors = try ProtocolDocument.load().vectors.filter { $0.kind == "sealed" }
        #expect(vectors.count >= 3)
        for vector in vectors {
            guard case .frame(let frame) = try vector.described() else { continue }
            let keys = try vector.secureKeys()
            let counter = try ProtocolDocument.number(try vector.require("counter"), as: UInt64.self)
            let sealer = try SecureDirection(keys: keys, sealing: true, counter: counter)
            var out: [ByteBuffer] = []
            try frame.seal(with: sealer, into: &out, allocator: ByteBufferAllocator())
            expectBytes(out.flatMap { Array($0.readableBytesView) }, vector.wire, vector)
            for chunk in [0, 1] {
                var decoder = WireDecoder(expectBanner: false)
                decoder.startOpening(try SecureDirection(keys: keys, sealing: false, counter: counter))
                var pending = ByteBuffer()
                var decoded: [WireInbound] = []
                for piece in (chunk == 0 ? [vector.wire] : vector.wire.map { [$0] }) {
                    pending.writeBytes(piece)
                    while let element = try decoder.decode(buffer: &pending) { decoded.append(element) }
                }
                #expect(decoded == [.frame(frame)], "\(vector.name): opening gives \(decoded)")
            }
            try checkSegments(frame, against: vector)
        }
    }

    @Test func secretVectorFollowsFromItsInputs() throws {
        let vectors = try ProtocolDocument.load().vectors.filter { $0.kind == "secret" }
        #expect(vectors.count == 1)
        for v in vectors {
            func bytes(_ key: String) throws -> [UInt8] { try ProtocolDocument.hexBytes(try v.require(key)) }
            let entity = try v.require("entity")
            let cc = try bytes("client-challenge"), sc = try bytes("server-challenge")
            let cp = try bytes("client-share-private"), sp = try bytes("server-share-private")
            #expect(try SecretKeyShare.publicKey(privateKey: cp) == bytes("client-share"))
            #expect(try SecretKeyShare.publicKey(privateKey: sp) == bytes("server-share"))
            let shared = try SecretKeyShare.sharedSecret(privateKey: cp, peerPublicKey: try bytes("server-share"))
            #expect(try SecretKeyShare.sharedSecret(privateKey: sp, peerPublicKey: try bytes("client-share")) == shared)
            #expect(try shared == bytes("shared"))
            #expect(try SecretIdentity.seal(entity: entity, clientChallenge: cc, serverChallenge: sc, sharedSecret: shared) == bytes("sealed-entity"))
            #expect(try SecretIdentity.open(bytes("sealed-entity"), clientChallenge: cc, serverChallenge: sc, sharedSecret: shared) == entity)
            // An empty name opens (to be refused by the keyring, authenticationFailed, R-5.1-4);
            // a tag alone that does not open, or less than a tag, does not.
            let empty = SecretIdentity.seal(entity: "", clientChallenge: cc, serverChallenge: sc, sharedSecret: shared)
            #expect(empty.count == 16 && SecretIdentity.open(empty, clientChallenge: cc, serverChallenge: sc, sharedSecret: shared) == "")
            #expect(SecretIdentity.open(empty.map { $0 ^ 1 }, clientChallenge: cc, serverChallenge: sc, sharedSecret: shared) == nil)
            #expect(SecretIdentity.open(Array(empty.dropLast()), clientChallenge: cc, serverChallenge: sc, sharedSecret: shared) == nil)
            let schedule = SecretKeySchedule(entity: entity, key: try bytes("key"), clientChallenge: cc, serverChallenge: sc, sharedSecret: shared)
            #expect(try schedule.clientProof == bytes("client-proof"))
            #expect(try schedule.serverProof == bytes("server-proof"))
            #expect(try schedule.clientTranscriptMAC(bytes("t1")) == bytes("client-transcript-mac"))
            let globalID = try ProtocolDocument.number(try v.require("global-id"), as: UInt64.self)
            #expect(try schedule.serverTranscriptMAC(bytes("t2"), globalID: globalID) == bytes("server-transcript-mac"))
            let cipher = try #require(SecureCipher(rawValue: try v.require("cipher")))
            let keys = schedule.trafficKeys(cipher: cipher, transcript: try bytes("t2"))
            #expect(try keys.clientToServer.key == bytes("key-c2s") && keys.clientToServer.iv == bytes("iv-c2s"))
            #expect(try keys.serverToClient.key == bytes("key-s2c") && keys.serverToClient.iv == bytes("iv-s2c"))
        }
    }

    @Test func transcriptVectorHashesItsRecords() throws {
        let vectors = try ProtocolDocument.load().vectors.filter { $0.kind == "transcript" }
        #expect(vectors.count == 1)
        for v in vectors {
            var transcript = HandshakeTranscript()
            for line in v.values("record") {
                let parts = line.split(separator: " ", maxSplits: 2).map(String.init)
                let fromClient = parts[0] == "C"
                let tag = try ProtocolDocument.number(parts[1], as: UInt8.self)
                let bytes = try ProtocolDocument.hexBytes(parts.count > 2 ? parts[2] : "")
                switch (tag, fromClient) {
                case (0, true): transcript.clientBanner = bytes
                case (0, false): transcript.serverBanner = bytes
                case (1, true): transcript.clientHello = bytes
                case (1, false): transcript.serverHello = bytes
                default: transcript.auth.append(.init(fromClient: fromClient, tag: tag, bytes: bytes))
                }
            }
            #expect(try transcript.digest() == ProtocolDocument.hexBytes(try v.require("digest")), "\(v.name)")
        }
    }

    @Test func invalidVectorsFailWithTheirError() throws {
        let vectors = try ProtocolDocument.load().vectors.filter { $0.kind == "invalid" }
        #expect(!vectors.isEmpty)
        for vector in vectors {
            let expected = try vector.errorCode()
            let stage = try vector.require("stage")
            let got: ParleyError?
            switch stage {
            case "banner", "frame":
                do {
                    _ = try ProtocolDocument.decode(vector.wire, expectBanner: stage == "banner", chunk: 0)
                    got = nil
                } catch {
                    got = error
                }
            case "negotiation":
                let decoded = try ProtocolDocument.decode(vector.wire, expectBanner: true, chunk: 0)
                guard decoded.count == 1, case .banner(let theirs) = decoded[0] else {
                    Issue.record("\(vector.name): wire must hold exactly one valid banner")
                    continue
                }
                do {
                    _ = try Negotiation.check(ours: Banner(supported: .implemented), theirs: theirs)
                    got = nil
                } catch {
                    got = error
                }
            case "session", "session-direct":
                let decoded = try ProtocolDocument.decode(vector.wire, expectBanner: false, chunk: 0)
                var session = SessionStateMachine(role: .client, features: .implemented)
                if stage == "session-direct" { try session.enableDirect() }
                var violation: ParleyError?
                for element in decoded {
                    if case .violation(let error) = session.received(element) {
                        violation = error
                        break
                    }
                }
                got = violation
            default:
                Issue.record("\(vector.name): unknown stage \(stage)")
                continue
            }
            guard let got else {
                Issue.record("\(vector.name): no error; expected \(expected)")
                continue
            }
            #expect(got.code == expected, "\(vector.name): got \(got)")
        }
    }

    /// The tables of the document name every frame tag, error code and feature bit the codec defines.
    @Test func documentTablesMatchTheCodec() throws {
        let text = try ProtocolDocument.load().text
        for tag in FrameTag.allKnown {
            let row = "| `0x" + hex2(tag.rawValue) + "` | `\(tag)` |"
            #expect(text.contains(row), "frame tag table lacks \(row)")
        }
        for code in ParleyError.Code.allKnown {
            let row = "| \(code.rawValue) | `\(code)` |"
            #expect(text.contains(row), "error code table lacks \(row)")
        }
        for bit in 0..<64 {
            let feature = ParleyFeatures(rawValue: 1 << UInt64(bit))
            guard let name = feature.names.first, name != "bit\(bit)" else { continue }
            let row = "| \(bit) | `\(name)` |"
            #expect(text.contains(row), "feature table lacks \(row)")
        }
        #expect(text.contains("0x82F63B78") && text.contains("0xE3069283"))
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
    }

    /// Section 2's example of a packed repeated field is what the reference writes, and the
    /// reference reads both forms of it, even mixed, appending in order (section 2's rule).
    @Test func packedExampleOfSectionTwoIsWhatTheReferenceWrites() throws {
        let text = try ProtocolDocument.load().text
        #expect(text.contains("`Fence.connection_ids` = [3, 300] is `0a 03 03 ac 02`"))
        var fence = Parley_Block_V1_Fence()
        fence.connectionIds = [3, 300]
        #expect(Array(try fence.serializedData()) == [0x0A, 0x03, 0x03, 0xAC, 0x02])
        #expect(Array(try Parley_Block_V1_Fence().serializedData()).isEmpty)
        let mixed = try Parley_Block_V1_Fence(serializedBytes: [0x08, 0x07, 0x0A, 0x03, 0x03, 0xAC, 0x02, 0x08, 0x09] as [UInt8])
        #expect(mixed.connectionIds == [7, 3, 300, 9])
    }

    /// The schemas in the document are the .proto files, verbatim.
    @Test func documentQuotesTheProtoFilesVerbatim() throws {
        let text = try ProtocolDocument.load().text
        for path in ["Protos/parley/v1/parley.proto", "Protos/parley/echo/v1/echo.proto", "Protos/parley/block/v1/block.proto", "Protos/parley/work/v1/work.proto"] {
            let proto = try String(contentsOf: ProtocolDocument.root.appendingPathComponent(path), encoding: .utf8)
            #expect(text.contains("```protobuf\n" + proto + "```"), "docs/protocol.md does not quote \(path) verbatim")
        }
    }

    private func checkSegments(_ frame: Frame, against vector: ProtocolDocument.Vector) throws {
        let specs = try vector.segments()
        guard specs.count == frame.segments.count else {
            Issue.record("\(vector.name): \(frame.segments.count) segments decoded, \(specs.count) described")
            return
        }
        for (i, spec) in specs.enumerated() {
            var segment = frame.segments[i]
            switch spec {
            case .header(let expected):
                let header = try segment.readMessageHeader()
                #expect(header == expected, "\(vector.name): segment \(i) header")
            case .proto(let type, let json):
                let messageType = try ProtocolDocument.messageType(type)
                let decoded = try messageType.init(serializedBytes: Array(segment.readableBytesView))
                let expected = try messageType.init(jsonString: json)
                #expect(decoded.isEqualTo(message: expected), "\(vector.name): segment \(i) decodes to \(decoded), described \(expected)")
                if let controlType = ProtocolDocument.controlPayloadTypes[frame.tag.rawValue] {
                    #expect(type == controlType, "\(vector.name): a \(frame.tag) frame carries \(controlType)")
                }
            case .hex(let bytes):
                #expect(Array(segment.readableBytesView) == bytes, "\(vector.name): segment \(i) bytes")
            case .u64le(let value):
                #expect(segment.readableBytes == 8 && segment.getInteger(at: segment.readerIndex, endianness: .little, as: UInt64.self) == value,
                        "\(vector.name): segment \(i) is not the 8-byte value \(value)")
            }
        }
    }

    private func expectBytes(_ got: [UInt8], _ expected: [UInt8], _ vector: ProtocolDocument.Vector) {
        if got != expected {
            Issue.record("\(vector.name) (line \(vector.line)): encoding gives\n\(got.hexString)\nthe document says\n\(expected.hexString)")
        }
    }
}

private func hex2(_ byte: UInt8) -> String {
    let s = String(byte, radix: 16, uppercase: true)
    return s.count == 1 ? "0" + s : s
}

/// docs/protocol.md and its test vectors.
enum ProtocolDocument {
    struct Failure: Error, CustomStringConvertible {
        var description: String
        init(_ description: String) { self.description = description }
    }

    /// The repository root, found from this file's path (Tests/ParleyWireTests/...).
    static let root: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    struct Loaded {
        var text: String
        var vectors: [Vector]
    }

    static func load() throws -> Loaded {
        let url = root.appendingPathComponent("docs/protocol.md")
        let text = try String(contentsOf: url, encoding: .utf8)
        return Loaded(text: text, vectors: try parse(text))
    }

    /// One ```vector block: `key: value` lines in order; `wire:` may continue on indented lines.
    struct Vector {
        var line: Int
        var entries: [(key: String, value: String)]
        var wire: [UInt8]

        var name: String { self.value("name") ?? "line \(self.line)" }
        var kind: String { self.value("kind") ?? "" }

        func value(_ key: String) -> String? { self.entries.first { $0.key == key }?.value }
        func values(_ key: String) -> [String] { self.entries.filter { $0.key == key }.map(\.value) }
        func require(_ key: String) throws -> String {
            guard let v = self.value(key) else { throw Failure("\(self.name) (line \(self.line)): missing \(key)") }
            return v
        }
    }

    static func parse(_ text: String) throws -> [Vector] {
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        var vectors: [Vector] = []
        var i = 0
        while i < lines.count {
            guard lines[i].trimmingCharacters(in: .whitespaces) == "```vector" else {
                i += 1
                continue
            }
            let start = i + 1
            var entries: [(key: String, value: String)] = []
            var wireText: String?
            i += 1
            while true {
                guard i < lines.count else { throw Failure("vector at line \(start): no closing ```") }
                let line = lines[i]
                i += 1
                if line.trimmingCharacters(in: .whitespaces) == "```" { break }
                if line.trimmingCharacters(in: .whitespaces).isEmpty { continue }
                if line.first == " " || line.first == "\t" {
                    // A continuation line of `wire:`; `#` starts a comment.
                    guard wireText != nil else { throw Failure("line \(i): indented line outside wire:") }
                    wireText! += " " + String(line.prefix { $0 != "#" })
                    continue
                }
                guard let colon = line.firstIndex(of: ":") else { throw Failure("line \(i): expected key: value") }
                let key = String(line[..<colon])
                let value = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
                if key == "wire" {
                    wireText = String(value.prefix { $0 != "#" })
                } else {
                    entries.append((key, value))
                }
            }
            guard let wireText else { throw Failure("vector at line \(start): no wire:") }
            vectors.append(Vector(line: start, entries: entries, wire: try hexBytes(wireText)))
        }
        return vectors
    }

    static func hexBytes(_ text: String) throws -> [UInt8] {
        let digits = text.filter { !$0.isWhitespace }
        guard digits.count % 2 == 0 else { throw Failure("odd number of hex digits in \(text)") }
        var out: [UInt8] = []
        out.reserveCapacity(digits.count / 2)
        var index = digits.startIndex
        while index < digits.endIndex {
            let next = digits.index(index, offsetBy: 2)
            guard let byte = UInt8(digits[index..<next], radix: 16) else { throw Failure("bad hex \(digits[index..<next])") }
            out.append(byte)
            index = next
        }
        return out
    }

    static func number<T: FixedWidthInteger>(_ text: String, as: T.Type) throws -> T {
        let t = text.trimmingCharacters(in: .whitespaces)
        let parsed = t.hasPrefix("0x") ? T(t.dropFirst(2), radix: 16) : T(t, radix: 10)
        guard let parsed else { throw Failure("bad number \(text)") }
        return parsed
    }

    /// Decodes one direction of a connection: a banner (if `expectBanner`) then frames,
    /// `chunk` bytes at a time (0: all at once), then end of stream.
    static func decode(_ wire: [UInt8], expectBanner: Bool, chunk: Int) throws(ParleyError) -> [WireInbound] {
        var decoder = WireDecoder(expectBanner: expectBanner)
        var buffer = ByteBuffer()
        var out: [WireInbound] = []
        var offset = 0
        repeat {
            let end = chunk == 0 ? wire.count : min(wire.count, offset + chunk)
            buffer.writeBytes(wire[offset..<end])
            offset = end
            while let element = try decoder.decode(buffer: &buffer) { out.append(element) }
        } while offset < wire.count
        while let element = try decoder.decodeLast(buffer: &buffer, seenEOF: true) { out.append(element) }
        return out
    }

    // MARK: - Payload types

    static let messageTypes: [String: any SwiftProtobuf.Message.Type] = {
        let types: [any SwiftProtobuf.Message.Type] = [
            Parley_V1_Hello.self, Parley_V1_AuthRequest.self, Parley_V1_AuthBadMethod.self, Parley_V1_AuthMore.self,
            Parley_V1_AuthDone.self, Parley_V1_ClientIdent.self, Parley_V1_ServerMessage.self, Parley_V1_Nucleus.self,
            Parley_V1_ServerIdent.self, Parley_V1_Notice.self, Parley_V1_Status.self,
            Parley_V1_SessionReconnect.self, Parley_V1_SessionResumed.self, Parley_V1_SessionReset.self,
            Parley_Echo_V1_Work.self, Parley_Echo_V1_WorkDone.self,
            Parley_Work_V1_RequestWork.self, Parley_Work_V1_WorkAssignments.self, Parley_Work_V1_Assignment.self,
            Parley_Work_V1_SignedJob.self, Parley_Work_V1_ReportResult.self, Parley_Work_V1_ReportAck.self,
            Parley_Work_V1_Command.self, Parley_Work_V1_CommandUpdate.self, Parley_Work_V1_CommandResult.self, Parley_Work_V1_TransferWrite.self,
            Parley_Echo_V1_Echo.self, Parley_Echo_V1_EchoReply.self, Parley_Echo_V1_Ping.self,
            Parley_Echo_V1_Pong.self, Parley_Echo_V1_Count.self, Parley_Echo_V1_CountItem.self,
            Parley_Echo_V1_CountDone.self, Parley_Echo_V1_Sleep.self, Parley_Echo_V1_Slept.self,
            Parley_Block_V1_SessionInfo.self, Parley_Block_V1_SessionInfoReply.self, Parley_Block_V1_ListExports.self,
            Parley_Block_V1_ExportList.self, Parley_Block_V1_Open.self, Parley_Block_V1_OpenReply.self,
            Parley_Block_V1_Io.self, Parley_Block_V1_IoReply.self, Parley_Block_V1_Close.self, Parley_Block_V1_CloseReply.self,
            Parley_Block_V1_Fence.self, Parley_Block_V1_FenceReply.self,
        ]
        return Dictionary(uniqueKeysWithValues: types.map { ($0.protoMessageName, $0) })
    }()

    static func messageType(_ name: String) throws -> any SwiftProtobuf.Message.Type {
        guard let type = messageTypes[name] else { throw Failure("unknown protobuf type \(name)") }
        return type
    }

    /// The payload type of each one-segment control frame (docs/protocol.md, "Frame tags").
    static let controlPayloadTypes: [UInt8: String] = [
        FrameTag.hello.rawValue: "parley.v1.Hello", FrameTag.authRequest.rawValue: "parley.v1.AuthRequest",
        FrameTag.authBadMethod.rawValue: "parley.v1.AuthBadMethod", FrameTag.authReplyMore.rawValue: "parley.v1.AuthMore",
        FrameTag.authRequestMore.rawValue: "parley.v1.AuthMore", FrameTag.authDone.rawValue: "parley.v1.AuthDone",
        FrameTag.clientIdent.rawValue: "parley.v1.ClientIdent", FrameTag.serverIdent.rawValue: "parley.v1.ServerIdent",
        FrameTag.notice.rawValue: "parley.v1.Notice", FrameTag.close.rawValue: "parley.v1.Status",
        FrameTag.sessionReconnect.rawValue: "parley.v1.SessionReconnect", FrameTag.sessionResumed.rawValue: "parley.v1.SessionResumed",
        FrameTag.sessionReset.rawValue: "parley.v1.SessionReset",
    ]

    static let kindsByName: [String: MessageKind] = {
        var map: [String: MessageKind] = [:]
        for raw in UInt8(0)...UInt8(255) where MessageKind(rawValue: raw).isKnown {
            map[MessageKind(rawValue: raw).description] = MessageKind(rawValue: raw)
        }
        return map
    }()
}

extension ProtocolDocument.Vector {
    enum Segment {
        /// The 32-byte MESSAGE header and its type name.
        case header(MessageHeader)
        /// A protobuf message, given as its full name and proto3 JSON.
        case proto(type: String, json: String)
        case hex([UInt8])
        /// An 8-byte little-endian integer (KEEPALIVE timestamps).
        case u64le(UInt64)
    }

    enum Described {
        case banner(Banner)
        case frame(Frame)
    }

    typealias Failure = ProtocolDocument.Failure

    func segments() throws -> [Segment] {
        try self.values("segment").map { text in
            let (form, rest) = Self.split(text)
            switch form {
            case "header": return .header(try Self.header(rest))
            case "proto":
                let (type, json) = Self.split(rest)
                return .proto(type: type, json: json)
            case "hex": return .hex(try ProtocolDocument.hexBytes(rest))
            case "u64le": return .u64le(try ProtocolDocument.number(rest, as: UInt64.self))
            default: throw Failure("\(self.name): unknown segment form \(form)")
            }
        }
    }

    static func split(_ text: String) -> (String, String) {
        let t = text.trimmingCharacters(in: .whitespaces)
        guard let space = t.firstIndex(of: " ") else { return (t, "") }
        return (String(t[..<space]), t[t.index(after: space)...].trimmingCharacters(in: .whitespaces))
    }

    /// `seq=1 ack=0 id=1 kind=REQUEST flags=0 type=parley.echo.v1.Ping` (type last; may be empty).
    static func header(_ text: String) throws -> MessageHeader {
        var fields: [String: String] = [:]
        for token in text.split(separator: " ") {
            guard let eq = token.firstIndex(of: "=") else { throw Failure("bad header field \(token)") }
            fields[String(token[..<eq])] = String(token[token.index(after: eq)...])
        }
        guard Set(fields.keys) == ["seq", "ack", "id", "kind", "flags", "type"] else {
            throw Failure("a header needs seq, ack, id, kind, flags and type: \(text)")
        }
        guard let kind = ProtocolDocument.kindsByName[fields["kind"]!] else { throw Failure("unknown message kind \(fields["kind"]!)") }
        return MessageHeader(
            seq: try ProtocolDocument.number(fields["seq"]!, as: UInt64.self),
            ack: try ProtocolDocument.number(fields["ack"]!, as: UInt64.self),
            id: try ProtocolDocument.number(fields["id"]!, as: UInt64.self),
            kind: kind,
            flags: try ProtocolDocument.number(fields["flags"]!, as: UInt8.self),
            type: fields["type"]!
        )
    }

    func segmentBuffer(_ segment: Segment) throws -> ByteBuffer {
        var buffer = ByteBuffer()
        switch segment {
        case .header(let h): buffer.writeMessageHeader(h)
        case .proto(let type, let json):
            let message = try ProtocolDocument.messageType(type).init(jsonString: json)
            let bytes: [UInt8] = try message.serializedBytes()
            buffer.writeBytes(bytes)
        case .hex(let bytes): buffer.writeBytes(bytes)
        case .u64le(let v): buffer.writeInteger(v, endianness: .little)
        }
        return buffer
    }

    /// The banner or frame this vector describes (valid vectors only).
    func described() throws -> Described {
        switch self.kind {
        case "banner":
            return .banner(Banner(
                version: try ProtocolDocument.number(try self.require("version"), as: UInt16.self),
                supported: ParleyFeatures(rawValue: try ProtocolDocument.number(try self.require("supported"), as: UInt64.self)),
                required: ParleyFeatures(rawValue: try ProtocolDocument.number(try self.require("required"), as: UInt64.self))
            ))
        case "frame", "sealed":
            let tagField = try self.require("tag").split(separator: " ").map(String.init)
            let tag = FrameTag(rawValue: try ProtocolDocument.number(tagField[0], as: UInt8.self))
            if tagField.count > 1, tag.isKnown, tagField[1] != tag.description {
                throw Failure("\(self.name): tag \(tagField[0]) is \(tag), not \(tagField[1])")
            }
            var alignments = SegmentAlignments.none
            if let text = self.value("alignments") {
                let values = try text.split(separator: " ").map { try ProtocolDocument.number(String($0), as: UInt16.self) }
                guard values.count == 4 else { throw Failure("\(self.name): alignments needs 4 values") }
                for (i, v) in values.enumerated() { alignments[i] = v }
            }
            let segments = try self.segments()
            guard (1...Frame.maxSegments).contains(segments.count) else { throw Failure("\(self.name): \(segments.count) segments") }
            return .frame(Frame(
                tag: tag,
                flags: try ProtocolDocument.number(try self.require("flags"), as: UInt8.self),
                segments: try segments.map { try self.segmentBuffer($0) },
                alignments: alignments
            ))
        default:
            throw Failure("\(self.name): kind \(self.kind) is not banner or frame")
        }
    }

    /// The cipher, key and iv of a `sealed` vector.
    func secureKeys() throws -> SecureDirectionKeys {
        guard let cipher = SecureCipher(rawValue: try self.require("cipher")) else { throw Failure("\(self.name): unknown cipher") }
        return SecureDirectionKeys(
            cipher: cipher, key: try ProtocolDocument.hexBytes(try self.require("key")), iv: try ProtocolDocument.hexBytes(try self.require("iv"))
        )
    }

    func errorCode() throws -> ParleyError.Code {
        let name = try self.require("error")
        guard let code = ParleyError.Code.allKnown.first(where: { $0.description == name }) else {
            throw Failure("\(self.name): unknown error code \(name)")
        }
        return code
    }

    /// What this vector demonstrates: "banner", a tag name, "MESSAGE/<kind>", "MESSAGE/data", "error/<code>".
    func coverage() throws -> Set<String> {
        switch self.kind {
        case "banner":
            return ["banner"]
        case "invalid":
            return ["error/\(try self.errorCode())"]
        case "secret", "transcript":
            return [self.kind]
        case "sealed":
            var out: Set<String> = ["sealed/\(try self.require("cipher"))"]
            if try ProtocolDocument.number(try self.require("counter"), as: UInt64.self) % SecureDirection.keyUpdateInterval == 0,
               try ProtocolDocument.number(try self.require("counter"), as: UInt64.self) > 0 {
                out.insert("sealed/key-update")
            }
            return out
        default:
            guard case .frame(let frame) = try self.described() else { return [] }
            var out: Set<String> = [frame.tag.description]
            if frame.tag == .direct, frame.segments.count > 1 { out.insert("DIRECT/data") }
            if frame.tag == .message {
                let message = try WireMessage(frame: frame)
                out.insert("MESSAGE/\(message.header.kind)")
                out.insert("type/\(message.header.type)")
                if message.data != nil {
                    out.insert("MESSAGE/data")
                    out.insert("data/\(message.header.type)")
                }
            }
            return out
        }
    }
}
