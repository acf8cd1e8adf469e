import NIOCore
import ParleyWire
import SwiftProtobuf
import Testing

@Suite struct BannerTests {
    @Test func roundTrip() throws {
        let banner = Banner(supported: ParleyFeatures(rawValue: 0xF | 1 << 40), required: .streams)
        var b = ByteBuffer()
        #expect(b.writeBanner(banner) == 32)
        #expect(b.readableBytes == 32)
        #expect(Array(b.readableBytesView.prefix(8)) == Array("PARLEY\r\n".utf8))
        #expect(try b.readBanner() == banner)
        #expect(b.readableBytes == 0)
    }

    @Test func waitsForAllBytesAndChecksMagicEarly() throws {
        var full = ByteBuffer()
        full.writeBanner(Banner(supported: .implemented))
        for n in 0..<32 {
            var part = full.getSlice(at: 0, length: n)!
            #expect(try part.readBanner() == nil)
            #expect(part.readableBytes == n, "nothing consumed")
        }
        var wrong = ByteBuffer(string: "GET / HTTP/1.1\r\n")
        #expect(ParleyError.code { _ = try wrong.readBanner() } == .badMagic)
        var oneByte = ByteBuffer(bytes: [0x51])
        #expect(ParleyError.code { _ = try oneByte.readBanner() } == .badMagic)
    }

    @Test func badCRC() {
        var b = ByteBuffer()
        b.writeBanner(Banner(supported: .implemented))
        b.setInteger(UInt8(0x10), at: 12)
        #expect(ParleyError.code { _ = try b.readBanner() } == .badPreambleCRC)
    }
}

@Suite struct FrameCodecTests {
    /// A side's own limit is at most 1 GiB: a frame and what is read ahead of it must fit
    /// in one buffer (NIO's hold less than 4 GiB; one near UInt32.max trapped on append).
    /// A peer may announce more: that only bounds what is sent to it.
    @Test func ownLimitsAreAtMostOneGibibyte() throws {
        try Frame.validateLimit(Frame.minimumMaxFrameSize)
        try Frame.validateLimit(1 << 30)
        for bad in [Frame.minimumMaxFrameSize - 1, (1 << 30) + 1, Int(UInt32.max)] {
            #expect(throws: ParleyError.self, "\(bad)") { try Frame.validateLimit(bad) }
        }
        #expect(Frame.peerLimit(announced: .max) == Int(UInt32.max))
    }

    static func sampleFrames() -> [Frame] {
        var hello = Parley_V1_Hello()
        hello.entityType = .client
        hello.peerAddress = "127.0.0.1:7420"
        var auth = Parley_V1_AuthRequest()
        auth.method = "none"
        auth.offeredMethods = ["none"]
        var bad = Parley_V1_AuthBadMethod()
        bad.method = "x"
        bad.allowedMethods = ["none"]
        var more = Parley_V1_AuthMore()
        more.payload = Data([1, 2, 3])
        var done = Parley_V1_AuthDone()
        done.method = "none"
        done.connectionMode = "crc"
        var ci = Parley_V1_ClientIdent()
        ci.platform = "p"
        ci.implementation = "i"
        ci.version = "1.0"
        var si = Parley_V1_ServerIdent()
        si.nucleus.requestDelaySeconds = 2
        var notice = Parley_V1_Notice()
        notice.nucleus.redirects = ["127.0.0.1:1"]
        var status = Parley_V1_Status()
        status.code = 14
        status.message = "bye"
        let big = ByteBuffer(repeating: 0xAB, count: 100_000)
        var frames: [Frame] = [
            hello.frame(tag: .hello), auth.frame(tag: .authRequest), bad.frame(tag: .authBadMethod),
            more.frame(tag: .authReplyMore), more.frame(tag: .authRequestMore), done.frame(tag: .authDone),
            ci.frame(tag: .clientIdent), si.frame(tag: .serverIdent), notice.frame(tag: .notice),
            SessionStateMachine.keepaliveFrame(tag: .keepalive, timestamp: 7),
            SessionStateMachine.keepaliveFrame(tag: .keepaliveAck, timestamp: 7), status.frame(tag: .close),
            Frame(tag: FrameTag(rawValue: 0xF0), segments: [buffer([9, 9])]),
            Frame(tag: .message, segments: [ByteBuffer(), ByteBuffer(), ByteBuffer(), ByteBuffer()]),
        ]
        for kind in [MessageKind.request, .response, .streamItem, .error, .cancel, .oneWay] {
            let m = WireMessage(header: MessageHeader(seq: 3, ack: 2, id: 99, kind: kind, type: "parley.echo.v1.Ping"), payload: buffer([8, 1]))
            frames.append(m.frame(allocator: ByteBufferAllocator()))
        }
        frames.append(WireMessage(header: MessageHeader(seq: 1, id: 1, kind: .request, type: "t"), payload: ByteBuffer(), data: big)
            .frame(allocator: ByteBufferAllocator()))
        frames.append(Frame(tag: .message, segments: [big, buffer([1]), big, buffer([2])]))
        return frames
    }

    @Test func everyFrameKindRoundTrips() throws {
        for frame in Self.sampleFrames() {
            let bytes = frameBytes(frame)
            #expect(bytes.readableBytes == frame.wireSize)
            var decoder = WireDecoder(expectBanner: false)
            let out = try decodeAll(bytes, decoder: &decoder)
            #expect(out == [.frame(frame)], "\(frame.tag)")
        }
    }

    @Test func vectoredEncodingEqualsContiguousAndDoesNotCopyBulk() {
        for frame in Self.sampleFrames() {
            var parts: [ByteBuffer] = []
            frame.encode(into: &parts, allocator: ByteBufferAllocator())
            var joined = ByteBuffer()
            for var p in parts { joined.writeBuffer(&p) }
            #expect(joined == frameBytes(frame), "\(frame.tag)")
            #expect(!parts.contains { $0.readableBytes == 0 }, "no empty writes")
            for segment in frame.segments where segment.readableBytes >= zeroCopySegmentThreshold {
                let same = parts.contains { part in
                    part.readableBytes == segment.readableBytes
                        && part.withUnsafeReadableBytes { a in segment.withUnsafeReadableBytes { b in a.baseAddress == b.baseAddress } }
                }
                #expect(same, "bulk segment passed on as the same storage")
            }
        }
    }

    /// The direct MESSAGE encoder writes exactly what building a `Frame` and encoding it does,
    /// for every mix of small and bulk payload and data, and passes bulk on uncopied.
    @Test func directMessageEncodingEqualsFrameEncoding() {
        let small = ByteBuffer(bytes: (0..<100).map { UInt8($0) })
        let bulk = ByteBuffer(repeating: 0xA5, count: zeroCopySegmentThreshold + 3)
        let edge = ByteBuffer(repeating: 0x5A, count: zeroCopySegmentThreshold - 1)
        var messages: [WireMessage] = []
        for type in ["", "parley.echo.v1.Echo", String(repeating: "t", count: 1024)] {
            for payload in [ByteBuffer(), small, edge, bulk] {
                for data in [nil, ByteBuffer(), small, edge, bulk] as [ByteBuffer?] {
                    messages.append(WireMessage(
                        header: MessageHeader(seq: 7, ack: 3, id: 0x1122_3344_5566_7788, kind: .request, type: type),
                        payload: payload, data: data
                    ))
                }
            }
        }
        for message in messages {
            var direct: [ByteBuffer] = []
            message.encodeFrame(into: &direct, allocator: ByteBufferAllocator())
            var viaFrame: [ByteBuffer] = []
            message.frame(allocator: ByteBufferAllocator()).encode(into: &viaFrame, allocator: ByteBufferAllocator())
            #expect(direct == viaFrame, "payload \(message.payload.readableBytes), data \(message.data?.readableBytes ?? -1)")
            for segment in [message.payload, message.data].compactMap({ $0 }) where segment.readableBytes >= zeroCopySegmentThreshold {
                let same = direct.contains { part in
                    part.withUnsafeReadableBytes { a in segment.withUnsafeReadableBytes { b in a.baseAddress == b.baseAddress } }
                }
                #expect(same, "bulk segment passed on as the same storage")
            }
        }
    }

    @Test(arguments: [1, 2, 3, 7, 31, 33, 1000])
    func splitDelivery(chunk: Int) throws {
        var stream = ByteBuffer()
        stream.writeBanner(Banner(supported: .implemented))
        let frames = Self.sampleFrames()
        for f in frames { stream.writeFrame(f) }
        let out = try decodeAll(stream, chunk: chunk)
        #expect(out == [.banner(Banner(supported: .implemented))] + frames.map { .frame($0) })
    }

    @Test func segmentsAreSlicesNotCopies() throws {
        var stream = frameBytes(Frame(tag: .message, segments: [buffer([1, 2, 3]), ByteBuffer(repeating: 7, count: 50_000)]))
        var decoder = WireDecoder(expectBanner: false)
        let frame = try #require(try decoder.decode(buffer: &stream))
        guard case .frame(let f) = frame else { Issue.record("not a frame"); return }
        // Segment 1 starts after the 32-byte preamble and the 3-byte segment 0, in the input's own storage.
        let expected = stream.withVeryUnsafeBytes { $0.baseAddress! + 32 + 3 }
        let actual = f.segments[1].withUnsafeReadableBytes { $0.baseAddress! }
        let inside = expected == actual
        #expect(inside)
    }

    // MARK: error paths

    @Test func badPreambleCRC() {
        var b = frameBytes(Parley_V1_Hello().frame(tag: .hello))
        b.setInteger(UInt8(0x02), at: 0)  // tag changed, CRC not
        var d = WireDecoder(expectBanner: false)
        #expect(ParleyError.code { _ = try decodeAll(b, decoder: &d) } == .badPreambleCRC)
        // The decoder stays failed.
        var more = frameBytes(Parley_V1_Hello().frame(tag: .hello))
        #expect(ParleyError.code { _ = try d.decode(buffer: &more) } == .badPreambleCRC)
    }

    @Test func badSegmentCRC() {
        var hello = Parley_V1_Hello()
        hello.peerAddress = "x"
        var b = frameBytes(Frame(tag: .hello, segments: [hello.parleyPayload(), buffer([1, 2])]))
        let lastPayloadByte = b.readableBytes - 8 - 1  // last byte of segment 1, before two CRCs
        b.setInteger(b.getInteger(at: lastPayloadByte, as: UInt8.self)! ^ 0x01, at: lastPayloadByte)
        var d = WireDecoder(expectBanner: false)
        #expect(ParleyError.code { _ = try decodeAll(b, decoder: &d) } == .badSegmentCRC)
    }

    @Test func frameTooLargeIsRefusedFromThePreambleAlone() {
        let frame = Frame(tag: .message, segments: [ByteBuffer(repeating: 1, count: 2000)])
        var preambleOnly = frameBytes(frame).getSlice(at: 0, length: 32)!
        var d = WireDecoder(maxFrameSize: 1999, expectBanner: false)
        #expect(ParleyError.code { _ = try d.decode(buffer: &preambleOnly) } == .frameTooLarge)
        var ok = WireDecoder(maxFrameSize: 2000, expectBanner: false)
        #expect((try? decodeAll(frameBytes(frame), decoder: &ok).count) == 1)
    }

    @Test func hugeDeclaredLengthIsRefused() {
        var p = ByteBuffer()
        p.writeMultipleIntegers(FrameTag.message.rawValue, UInt8(0), UInt8(1), UInt8(0))
        p.writeMultipleIntegers(UInt32.max, UInt16(0), endianness: .little)
        for _ in 0..<3 { p.writeMultipleIntegers(UInt32(0), UInt16(0), endianness: .little) }
        p.writeInteger(CRC32C.checksum(p), endianness: .little)
        var d = WireDecoder(expectBanner: false)
        #expect(ParleyError.code { _ = try d.decode(buffer: &p) } == .frameTooLarge)
    }

    static func preamble(count: UInt8, reserved: UInt8 = 0, extra: UInt32 = 0) -> ByteBuffer {
        var p = ByteBuffer()
        p.writeMultipleIntegers(FrameTag.hello.rawValue, UInt8(0), count, reserved)
        p.writeMultipleIntegers(UInt32(0), UInt16(0), endianness: .little)
        p.writeMultipleIntegers(UInt32(0), UInt16(0), endianness: .little)
        p.writeMultipleIntegers(UInt32(0), UInt16(0), endianness: .little)
        p.writeMultipleIntegers(extra, UInt16(0), endianness: .little)
        p.writeInteger(CRC32C.checksum(p), endianness: .little)
        return p
    }

    @Test func malformedPreambles() {
        for (p, what) in [(Self.preamble(count: 0), "zero segments"), (Self.preamble(count: 5), "five segments"),
                          (Self.preamble(count: 1, reserved: 1), "reserved byte"), (Self.preamble(count: 1, extra: 4), "unused descriptor")] {
            var b = p
            var d = WireDecoder(expectBanner: false)
            #expect(ParleyError.code { _ = try d.decode(buffer: &b) } == .protocolViolation, "\(what)")
        }
    }

    @Test func truncatedStreams() throws {
        var full = ByteBuffer()
        full.writeBanner(Banner(supported: .implemented))
        full.writeFrame(Parley_V1_Hello().frame(tag: .hello))
        // Cut at every position: a clean cut between elements is fine, any other is `truncated`.
        for cut in 0...full.readableBytes {
            let error = Self.drainToEOF(full.getSlice(at: 0, length: cut)!)
            if let error {
                #expect(error.code == .truncated)
                #expect(error.message.contains("connection ended inside"))
            }
            let clean = error == nil
            #expect(clean == [0, 32, full.readableBytes].contains(cut), "cut at \(cut)")
        }
    }

    static func drainToEOF(_ bytes: ByteBuffer) -> ParleyError? {
        var part = bytes
        var d = WireDecoder()
        do {
            while try d.decode(buffer: &part) != nil {}
            _ = try d.decodeLast(buffer: &part, seenEOF: true)
            return nil
        } catch {
            return error
        }
    }

    @Test func wrongMagicThroughTheDecoder() {
        var d = WireDecoder()
        var b = ByteBuffer(string: "SSH-2.0-OpenSSH_9.2\r\n")
        let error = #expect(throws: ParleyError.self) { try d.decode(buffer: &b) }
        #expect(error?.code == .badMagic)
        #expect(error?.message.contains("53 53 48") == true, "names the bytes received")
    }
}

@Suite struct MessageHeaderTests {
    @Test func roundTrip() throws {
        let h = MessageHeader(seq: 1 << 40, ack: 5, id: 77, kind: .streamItem, type: "parley.echo.v1.CountItem")
        var b = ByteBuffer()
        b.writeMessageHeader(h)
        #expect(b.readableBytes == 32 + h.type.utf8.count)
        #expect(try b.readMessageHeader() == h)
    }

    @Test func errors() {
        var short = ByteBuffer(repeating: 0, count: 31)
        #expect(ParleyError.code { _ = try short.readMessageHeader() } == .malformedPayload)
        var b = ByteBuffer()
        b.writeMessageHeader(MessageHeader(id: 1, kind: .request, type: "abc"))
        var longName = b
        longName.setInteger(UInt16(4), at: 26, endianness: .little)
        #expect(ParleyError.code { _ = try longName.readMessageHeader() } == .malformedPayload)
        var reserved = b
        reserved.setInteger(UInt8(1), at: 28)
        #expect(ParleyError.code { _ = try reserved.readMessageHeader() } == .malformedPayload)
        var badUTF8 = ByteBuffer()
        badUTF8.writeMessageHeader(MessageHeader(id: 1, kind: .request, type: "ab"))
        badUTF8.setInteger(UInt8(0xFF), at: 32)
        #expect(ParleyError.code { _ = try badUTF8.readMessageHeader() } == .malformedPayload)
        // A 3-byte invalid sequence that a lenient decoder would repair into one U+FFFD.
        var repairable = ByteBuffer()
        repairable.writeMessageHeader(MessageHeader(id: 1, kind: .request, type: "abc"))
        repairable.setBytes([0xF0, 0x90, 0x80], at: 32)
        #expect(ParleyError.code { _ = try repairable.readMessageHeader() } == .malformedPayload)
        let oneSegment = Frame(tag: .message, segments: [b])
        #expect(ParleyError.code { _ = try WireMessage(frame: oneSegment) } == .malformedPayload)
    }

    static func header(_ type: String) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeMessageHeader(MessageHeader(id: 1, kind: .request, type: type))
        return b
    }

    /// A connection's recent type names: a name seen before comes back as the same string,
    /// names that differ in length or in any byte (before, at or after an 8-byte word) are
    /// told apart, names that are not UTF-8 never enter, and the oldest makes room.
    @Test func typeNamesSeenLately() throws {
        var names = MessageTypeNames(capacity: 3)
        let long = "parley.block.v1.OpenReply"  // 25 bytes: three words and a tail
        for type in ["a", "parley.echo.v1.Ping", long, "", "é.v1.Nom"] {
            var first = Self.header(type), again = Self.header(type)
            #expect(try first.readMessageHeader(names: &names).type == type)
            #expect(try again.readMessageHeader(names: &names).type == type)
        }
        // Lookalikes: a byte changed at each position, one byte shorter, one longer.
        for i in long.utf8.indices {
            var bytes = Array(long.utf8)
            bytes[long.utf8.distance(from: long.utf8.startIndex, to: i)] ^= 0x01
            let other = String(decoding: bytes, as: UTF8.self)
            var b = Self.header(other)
            #expect(try b.readMessageHeader(names: &names).type == other)
            var again = Self.header(long)
            #expect(try again.readMessageHeader(names: &names).type == long)
        }
        for other in [String(long.dropLast()), long + "x"] {
            var b = Self.header(other)
            #expect(try b.readMessageHeader(names: &names).type == other)
        }
        // Invalid UTF-8 is refused whether or not a valid name of the same length is known.
        var known = Self.header("ab")
        _ = try known.readMessageHeader(names: &names)
        var bad = Self.header("ab")
        bad.setInteger(UInt8(0xFF), at: 32)
        #expect(ParleyError.code { _ = try bad.readMessageHeader(names: &names) } == .malformedPayload)
        var repairable = Self.header("abc")
        repairable.setBytes([0xF0, 0x90, 0x80], at: 32)
        #expect(ParleyError.code { _ = try repairable.readMessageHeader(names: &names) } == .malformedPayload)
        // A name seen lately comes back as the same string (the same storage, not a copy);
        // at capacity the oldest makes room.
        func storage(_ s: String) -> UnsafeRawPointer? { s.utf8.withContiguousStorageIfAvailable { UnsafeRawPointer($0.baseAddress) } ?? nil }
        func read(_ type: String, _ names: inout MessageTypeNames) throws -> String {
            var b = Self.header(type)
            return try b.readMessageHeader(names: &names).type
        }
        var three = MessageTypeNames(capacity: 3)
        let (a, b, c, d) = ("parley.test.v1.FirstName", "parley.test.v1.SecondName", "parley.test.v1.ThirdName", "parley.test.v1.FourthName")
        let firstA = try read(a, &three), firstC = try read(c, &three)
        _ = try read(b, &three)
        #expect(storage(try read(a, &three)) == storage(firstA) && storage(firstA) != nil)
        #expect(three.count == 3)
        _ = try read(d, &three)  // replaces a, the oldest
        #expect(three.count == 3)
        #expect(storage(try read(c, &three)) == storage(firstC))
        #expect(storage(try read(a, &three)) != storage(firstA))
        // Without a cache every read is a new string.
        var none = MessageTypeNames(capacity: 0)
        let (x, y) = (try read(a, &none), try read(a, &none))
        withExtendedLifetime((x, y)) { #expect(storage(x) != storage(y) && none.count == 0) }
        // Through a session: the same names, decoded once.
        var session = SessionStateMachine(role: .server, features: .implemented)
        var client = SessionStateMachine(role: .client, features: .implemented)
        for n in 0..<5 {
            let m = WireMessage(header: MessageHeader(id: UInt64(n + 1), kind: .request, type: n % 2 == 0 ? long : "x.Y"), payload: ByteBuffer())
            guard case .message(let got) = session.received(.frame(try client.frame(for: m, allocator: ByteBufferAllocator()))) else {
                Issue.record("message \(n) not received")
                return
            }
            #expect(got.header.type == m.header.type)
        }
    }
}

@Suite struct AddressTests {
    @Test(arguments: [
        ("127.0.0.1:7420", "127.0.0.1:7420"), ("[::1]:80", "[::1]:80"), ("localhost:0", "localhost:0"),
        ("unix:/tmp/p.sock", "unix:/tmp/p.sock"), ("[::]:1", "[::]:1"), ("[fe80::1%eth0]:7420", "[fe80::1%eth0]:7420"),
        ("[1:2:3:4:5:6:7:8]:65535", "[1:2:3:4:5:6:7:8]:65535"), ("[::ffff:192.0.2.1]:80", "[::ffff:192.0.2.1]:80"),
        ("[2001:db8::]:80", "[2001:db8::]:80"), ("host:00080", "host:80"),
    ])
    func parses(text: String, back: String) throws {
        #expect(try ParleyAddress(parsing: text).description == back)
    }

    @Test(arguments: ["127.0.0.1", "::1:80", "[::1]", "[::1]80", "host:99999", "host:x", ":80", "unix:", "[127.0.0.1]:1",
                      "host:+80", "host:-0", "host:", "host:000080", "[:]:80", "[zz:qq]:1", "[1:2:3:4:5:6:7:8:9]:1", "[1::2::3]:1",
                      "[12345::1]:1", "[::1%]:1", "[1:2:3:4:5:6:7]:1", "[::256.1.1.1]:1", "[::1.2.3]:1"])
    func rejects(text: String) {
        let error = #expect(throws: ParleyError.self) { try ParleyAddress(parsing: text) }
        #expect(error?.code == .invalidArgument)
        #expect(error?.message.contains(text) == true)
    }
}

import Foundation

@Suite struct ProtobufPayloadTests {
    /// A message with every field at its default encodes to no bytes (one shared empty
    /// buffer, no storage of its own); a payload appended to afterwards is its own copy, and
    /// the next empty payload is still empty.
    @Test func anEmptyMessageHasAnEmptyPayloadThatCopiesOnWrite() throws {
        var first = Parley_V1_AuthMore().parleyPayload()
        #expect(first.readableBytes == 0)
        first.writeBytes([1, 2, 3])
        let second = Parley_V1_AuthMore().parleyPayload()
        #expect(second.readableBytes == 0)
        #expect(try Parley_V1_AuthMore(parleyPayload: second) == Parley_V1_AuthMore())
        var more = Parley_V1_AuthMore()
        more.payload = Data([9, 8, 7])
        let encoded = more.parleyPayload()
        #expect(encoded.readableBytes > 0)
        #expect(try Parley_V1_AuthMore(parleyPayload: encoded) == more)
    }
}
