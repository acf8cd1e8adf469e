import Foundation
import NIOCore
import ParleyServices
import ParleyWire
import SwiftProtobuf

/// The checks of `parley conform`, each named by the requirement id of docs/protocol.md it
/// tests. Illegal input is built byte by byte (`rawFrame`), never through an API that would
/// refuse to send it.
enum ConformanceChecks {
    static let echoType = Parley_Echo_V1_Echo.protoMessageName
    static let pingType = Parley_Echo_V1_Ping.protoMessageName
    static let unknownType = "conform.v1.NoSuchMessage"

    static var all: [ConformanceCheck] {
        banner + frames + secure + secureSession + lossless + losslessExchange + handshake + session + direct
    }

    // MARK: - Helpers

    /// Sends `bytes` on a fresh connection and checks that the server refuses: it closes the
    /// connection without going on with the handshake; a CLOSE it sends has code `code`.
    static func expectRefusal(_ c: CheckContext, _ bytes: ByteBuffer, _ code: ParleyError.Code, _ why: String) async throws {
        let peer = try await c.connect()
        defer { peer.close() }
        await peer.send(bytes)
        let expected = "the connection closed (with at most CLOSE \(code)) because of \(why), the handshake going no further"
        var seen: [String] = []
        let deadline = ContinuousClock.now.advanced(by: c.timeout)
        while ContinuousClock.now < deadline {
            let event = await peer.next(deadline - ContinuousClock.now)
            switch event {
            case .banner: continue
            case .frame(let f) where f.tag == .hello: continue
            case .frame(let f) where f.tag == .close:
                let status = try decode(Parley_V1_Status.self, f)
                if status.code != code.rawValue { throw fail(expected, describe(f)) }
                seen.append(describe(f))
            case .frame(let f):
                throw fail(expected, (seen + [describe(f)]).joined(separator: "; "))
            case .closed:
                return
            case .undecodable(let e):
                throw fail(expected, (seen + ["bytes that do not decode: \(e)"]).joined(separator: "; "))
            case .timeout:
                break
            }
        }
        throw fail(expected, (seen + ["the connection still open after \(c.timeout)"]).joined(separator: "; "))
    }

    /// Opens a session, sends `bytes` and expects CLOSE `code`.
    static func expectViolation(
        _ c: CheckContext, options: ClientOptions = ClientOptions(), _ code: ParleyError.Code, _ why: String,
        _ build: (ClientSession) -> ByteBuffer
    ) async throws {
        let s = try await ClientSession.open(context: c, options: options)
        defer { s.peer.close() }
        try await s.peer.sendFrames(build(s))
        try await s.expectClose(code, because: why)
    }

    /// A first flight written by hand: banner, HELLO, AUTH_REQUEST, CLIENT_IDENT, then `more`.
    static func wholeHandshake(_ options: ClientOptions = ClientOptions()) -> ByteBuffer {
        var b = options.firstFlight()
        for f in options.beforeIdent { b.writeFrame(f) }
        b.writeFrame(options.ident)
        return b
    }

    static func messageBytes(seq: UInt64, id: UInt64, kind: MessageKind, type: String, payload: ByteBuffer = ByteBuffer(), data: ByteBuffer? = nil) -> ByteBuffer {
        ByteBuffer(frame: WireMessage(header: MessageHeader(seq: seq, id: id, kind: kind, type: type), payload: payload, data: data).frame(allocator: ByteBufferAllocator()))
    }

    static func pingPayload(_ n: UInt64) -> ByteBuffer {
        var p = Parley_Echo_V1_Ping()
        p.sequence = n
        return p.parleyPayload()
    }

    static func expectPong(_ s: ClientSession, _ id: UInt64, _ what: String = "") async throws {
        let answer = try await s.answer(id)
        guard answer.header.kind == .response, answer.header.type == Parley_Echo_V1_Pong.protoMessageName else {
            throw fail("RESPONSE parley.echo.v1.Pong to request \(id)\(what)", "\(answer.header.kind) \(answer.header.type)")
        }
    }

    static func errorCode(_ m: WireMessage) -> ParleyError.Code? {
        guard m.header.kind == .error, let status = try? Parley_V1_Status(parleyPayload: m.payload) else { return nil }
        return ParleyError.Code(rawValue: status.code)
    }

    /// Every frame of a session that exercises what the server sends: answers with and
    /// without a data segment, a stream, a KEEPALIVE_ACK, an ERROR.
    static func sample(_ c: CheckContext) async throws -> (ClientSession, [Frame]) {
        try c.requireEcho()
        let s = try await ClientSession.open(context: c)
        var echo = Parley_Echo_V1_Echo()
        echo.text = "sample"
        var ids: [UInt64] = []
        ids.append(try await s.request(echoType, echo.parleyPayload(), data: s.features.contains(.dataSegment) ? ByteBuffer(repeating: 7, count: 5000) : nil))
        ids.append(try await s.request(pingType, pingPayload(3)))
        ids.append(try await s.request(unknownType, ByteBuffer()))
        if s.features.contains(.streams) {
            var count = Parley_Echo_V1_Count()
            count.count = 2
            ids.append(try await s.request(Parley_Echo_V1_Count.protoMessageName, count.parleyPayload()))
        }
        if s.features.contains(.keepalive) {
            try await s.send([SessionStateMachine.keepaliveFrame(tag: .keepalive, timestamp: 42)])
        }
        for id in ids { _ = try await s.answer(id) }
        if s.features.contains(.keepalive) && !s.controls.contains(where: { $0.tag == .keepaliveAck }) {
            _ = try await s.nextEvent()
        }
        let frames = s.peer.received.compactMap { e -> Frame? in
            if case .frame(let f) = e { return f }
            return nil
        }
        return (s, frames)
    }

    // MARK: - Section 2 and 3: payloads and the banner

    static let banner: [ConformanceCheck] = [
        ConformanceCheck("R-2-2", "a CLIENT_IDENT whose name is not UTF-8 is refused (malformedPayload)") { c in
            try c.requireNoneSession()
            var o = ClientOptions()
            // field 4 (name), 2 bytes: ff fe
            o.ident = Frame(tag: .clientIdent, segments: [ByteBuffer(bytes: [0x22, 0x02, 0xFF, 0xFE])])
            let peer = try await c.connect()
            defer { peer.close() }
            await peer.send(wholeHandshake(o))
            var frames: [Frame] = []
            var closed = false
            let deadline = ContinuousClock.now.advanced(by: c.timeout)
            loop: while ContinuousClock.now < deadline {
                switch await peer.next(deadline - ContinuousClock.now) {
                case .frame(let f): frames.append(f)
                case .closed: closed = true; break loop
                case .timeout: break loop
                case .undecodable(let e): throw fail("frames that decode", "\(e)")
                case .banner: continue
                }
            }
            if let ident = frames.first(where: { $0.tag == .serverIdent }) { throw fail("CLOSE malformedPayload instead of SERVER_IDENT", describe(ident)) }
            try expectCloseFrame(.malformedPayload, because: "a string that is not UTF-8", in: (frames, closed))
        },
        ConformanceCheck("R-3-1", "an HTTP request instead of a banner is refused (badMagic)") { c in
            var b = ByteBuffer(string: "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            b.writeRepeatingByte(0x20, count: 8)
            try await expectRefusal(c, b, .badMagic, "a bad magic")
        },
        ConformanceCheck("R-3-2", "a banner with a wrong CRC is refused (badPreambleCRC)") { c in
            var b = ClientOptions().firstFlight()
            b.setInteger(b.getInteger(at: 28, as: UInt8.self)! ^ 0xFF, at: 28)
            try await expectRefusal(c, b, .badPreambleCRC, "a wrong banner CRC")
        },
        ConformanceCheck("R-3-3", "a banner with version 0 is refused") { c in
            try c.requireHandshake()
            var o = ClientOptions()
            o.version = 0
            try await expectRefusal(c, wholeHandshake(o), .unsupportedVersion, "version 0")
        },
        ConformanceCheck("R-3-4", "a banner with version 65535 is accepted and answered in version 1") { c in
            var o = ClientOptions()
            o.version = 0xFFFF
            let s = try await ClientSession.open(context: c, options: o)
            defer { s.peer.close() }
            guard s.serverBanner.version >= 1 else { throw fail("a server banner of version 1 or more", "version \(s.serverBanner.version)") }
            if c.hasEcho { try await expectPong(s, try await s.request(pingType, pingPayload(1))) }
        },
        ConformanceCheck("R-3-6", "the server requires no feature it does not support") { c in
            let b = c.serverBanner
            guard b.required.isSubset(of: b.supported) else {
                throw fail("required features within supported \(b.supported)", "required \(b.required)")
            }
        },
        ConformanceCheck("R-3-7", "a client requiring an unknown feature bit (40) is refused") { c in
            try c.requireHandshake()
            var o = ClientOptions()
            o.required = ParleyFeatures(rawValue: 1 << 40)
            o.supported.insert(o.required)
            try await expectRefusal(c, wholeHandshake(o), .missingFeatures, "a required unknown feature")
        },
        ConformanceCheck("R-3-8", "a client supporting unknown feature bits (20, 40, 63) is accepted") { c in
            var o = ClientOptions()
            o.supported.insert(ParleyFeatures(rawValue: 1 << 20 | 1 << 40 | 1 << 63))
            let s = try await ClientSession.open(context: c, options: o)
            defer { s.peer.close() }
            if c.hasEcho { try await expectPong(s, try await s.request(pingType, pingPayload(1))) }
        },
        ConformanceCheck("R-3-9", "a client without optional features gets no stream item, data segment, NOTICE or KEEPALIVE") { c in
            try c.requireEcho()
            var o = ClientOptions()
            o.supported = []
            let s = try await ClientSession.open(context: c, options: o)
            defer { s.peer.close() }
            var count = Parley_Echo_V1_Count()
            count.count = 3
            let ids = [
                try await s.request(Parley_Echo_V1_Count.protoMessageName, count.parleyPayload()),
                try await s.request(echoType, Parley_Echo_V1_Echo().parleyPayload()),
                try await s.request(pingType, pingPayload(1)),
            ]
            for id in ids { _ = try await s.answer(id) }
            if let bad = s.messages.first(where: { $0.header.kind == .streamItem || $0.data != nil }) {
                throw fail("answers of two segments and no STREAM_ITEM", "\(bad.header.kind) id \(bad.header.id) with \(bad.data == nil ? "2" : "3") segments")
            }
            if let bad = s.controls.first(where: { [FrameTag.notice, .keepalive, .keepaliveAck, .ack].contains($0.tag) }) {
                throw fail("no frame that needs a feature", describe(bad))
            }
        },
    ]

    // MARK: - Section 4: frames

    static let frames: [ConformanceCheck] = [
        ConformanceCheck("R-4.1-1", "the server's preambles have byte 3 and unused descriptors zero") { c in
            // The frame decoder refuses a non-zero byte 3 or unused descriptor: reading every
            // frame of a sample session is the check.
            let (s, _) = try await sample(c)
            s.peer.close()
        },
        ConformanceCheck("R-4.4-1", "a frame with a wrong preamble CRC is refused (badPreambleCRC)") { c in
            try await expectViolation(c, .badPreambleCRC, "a wrong preamble CRC") { s in
                rawFrame(tag: 0x10, segments: s.message(kind: .request, id: 1, type: pingType, payload: pingPayload(1)).segments, corruptPreambleCRC: true)
            }
        },
        ConformanceCheck("R-4.4-2", "a frame of 0 segments is refused (protocolViolation)") { c in
            try await expectViolation(c, .protocolViolation, "segment count 0") { _ in rawFrame(tag: 0x12, count: 0, segments: [], descriptors: []) }
        },
        ConformanceCheck("R-4.4-2", "a frame of 5 segments is refused (protocolViolation)") { c in
            try await expectViolation(c, .protocolViolation, "segment count 5") { _ in
                rawFrame(tag: 0x12, count: 5, segments: [ByteBuffer(repeating: 0, count: 8)])
            }
        },
        ConformanceCheck("R-4.4-2", "a preamble with byte 3 set is refused (protocolViolation)") { c in
            try await expectViolation(c, .protocolViolation, "preamble byte 3 = 1") { _ in
                rawFrame(tag: 0x12, byte3: 1, segments: [ByteBuffer(repeating: 0, count: 8)])
            }
        },
        ConformanceCheck("R-4.4-2", "an unused segment descriptor that is not zero is refused (protocolViolation)") { c in
            try await expectViolation(c, .protocolViolation, "segment 3's alignment set in a 1-segment frame") { _ in
                rawFrame(tag: 0x12, segments: [ByteBuffer(repeating: 0, count: 8)], descriptors: [(8, 0), (0, 0), (0, 0), (0, 64)])
            }
        },
        ConformanceCheck("R-4.4-3", "a preamble announcing one byte more than the server's limit is refused at once (frameTooLarge)") { c in
            // Only the preamble is sent: the server must refuse before waiting for the body.
            try await expectViolation(c, .frameTooLarge, "a frame of \(c.serverLimit + 1) bytes, the limit being \(c.serverLimit)") { _ in
                rawFrame(tag: 0x10, count: 2, segments: [], descriptors: [(51, 0), (UInt32(c.serverLimit + 1 - 51), 0)])
            }
        },
        ConformanceCheck("R-4.4-3", "a MESSAGE of exactly the server's limit is accepted and echoed") { c in
            try c.requireEcho()
            try c.require(.dataSegment, "dataSegment")
            guard c.serverLimit <= Frame.maximumOwnLimit - Frame.minimumMaxFrameSize else {
                throw CheckSkip(reason: "the server's limit (\(c.serverLimit) bytes) is more than this tool sends or takes back (\(Frame.maximumOwnLimit - Frame.minimumMaxFrameSize) bytes)")
            }
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            let headerSize = MessageHeader.fixedSize + echoType.utf8.count
            let data = ByteBuffer(repeating: 0x5A, count: c.serverLimit - headerSize)
            let id = try await s.request(echoType, ByteBuffer(), data: data)
            let answer = try await s.answer(id, timeout: c.timeout * 4)
            guard answer.header.kind == .response, answer.data == data else {
                throw fail("RESPONSE EchoReply with the \(data.readableBytes) data bytes", "\(answer.header.kind) \(answer.header.type) with \(answer.data?.readableBytes ?? 0) data bytes")
            }
        },
        ConformanceCheck("R-4.4-4", "a frame with a wrong segment CRC is refused (badSegmentCRC)") { c in
            try await expectViolation(c, .badSegmentCRC, "a wrong segment CRC") { s in
                rawFrame(tag: 0x10, segments: s.message(kind: .request, id: 1, type: pingType, payload: pingPayload(1)).segments, corruptSegmentCRC: true)
            }
        },
        ConformanceCheck("R-4.4-5", "nothing after a frame error is read: a request behind a bad CRC gets no answer") { c in
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            var b = rawFrame(tag: 0x12, segments: [ByteBuffer(repeating: 1, count: 8)], corruptSegmentCRC: true)
            b.writeImmutableBuffer(ByteBuffer(frame: s.ping(1, id: 77)))
            try await s.peer.sendFrames(b)
            let drained = try await s.drainUntilClosed()
            if let answer = s.messages.first(where: { $0.header.id == 77 }) {
                throw fail("no answer to the request after the bad frame", "\(answer.header.kind) id 77")
            }
            try expectCloseFrame(.badSegmentCRC, because: "a wrong segment CRC", in: drained)
        },
        ConformanceCheck("R-4.5-1", "the server's frame-size limit is 0 (default) or at least 65536") { c in
            let s = try await ClientSession.open(context: c)
            s.peer.close()
            let limit = s.serverHello.maxFrameSize
            guard limit == 0 || limit >= 65_536 else { throw fail("HELLO max_frame_size 0 or at least 65536", "\(limit)") }
        },
        ConformanceCheck("R-4.5-2", "a client announcing max_frame_size 1 (counts as 65536) gets no larger frame") { c in
            try c.requireEcho()
            var o = ClientOptions()
            o.maxFrameSize = 1
            let s = try await ClientSession.open(context: c, options: o, maxFrameSize: 65_536)
            defer { s.peer.close() }
            try await expectPong(s, try await s.request(pingType, pingPayload(1)), " (a 1-byte limit counts as 65536)")
            // An Echo whose request fits the server's limit (it may be 65536 too) and whose
            // EchoReply would not fit the client's 65536.
            let id = s.newId()
            func sizes(_ n: Int) -> (request: Int, reply: Int) {
                var echo = Parley_Echo_V1_Echo()
                echo.payload = Data(repeating: 1, count: n)
                var reply = Parley_Echo_V1_EchoReply()
                reply.payload = echo.payload
                return (s.nextMessageSize(kind: .request, id: id, type: echoType, payload: echo.parleyPayload()),
                        s.nextMessageSize(kind: .response, id: id, type: Parley_Echo_V1_EchoReply.protoMessageName, payload: reply.parleyPayload()))
            }
            var n = 65_500
            while n > 0, sizes(n).request > c.serverLimit { n -= sizes(n).request - c.serverLimit }
            guard n > 0, sizes(n).reply > 65_536 else {
                throw CheckSkip(reason: "no Echo fits the server's limit (\(c.serverLimit) bytes) whose EchoReply passes 65536 bytes")
            }
            var echo = Parley_Echo_V1_Echo()
            echo.payload = Data(repeating: 1, count: n)
            let answer = try await s.answer(try await s.request(echoType, echo.parleyPayload(), id: id))
            guard errorCode(answer) == .frameTooLarge else {
                throw fail("ERROR frameTooLarge (the EchoReply would exceed 65536 bytes)", "\(answer.header.kind) \(answer.header.type)")
            }
        },
        ConformanceCheck("R-4.7-1", "a CLIENT_IDENT with an extra segment is accepted") { c in
            var o = ClientOptions()
            o.ident.segments.append(ByteBuffer(bytes: [1, 2, 3]))
            let s = try await ClientSession.open(context: c, options: o)
            defer { s.peer.close() }
            if c.hasEcho { try await expectPong(s, try await s.request(pingType, pingPayload(1))) }
        },
        ConformanceCheck("R-4.7-1", "a MESSAGE with a fourth segment is read from its first three") { c in
            try c.requireEcho()
            try c.require(.dataSegment, "dataSegment")
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            var f = s.message(kind: .request, id: 5, type: echoType, payload: Parley_Echo_V1_Echo().parleyPayload(), data: ByteBuffer(bytes: [9, 9]))
            f.segments.append(ByteBuffer(bytes: [4, 4, 4, 4]))
            try await s.send([f])
            let answer = try await s.answer(5)
            guard answer.header.kind == .response, answer.data == ByteBuffer(bytes: [9, 9]) else {
                throw fail("RESPONSE with data 09 09", "\(answer.header.kind) data \(answer.data.map { Array($0.readableBytesView).hexString } ?? "none")")
            }
        },
        ConformanceCheck("R-4.7-2", "the server sends control frames of 1 segment and MESSAGEs of 2 or 3") { c in
            let (s, frames) = try await sample(c)
            s.peer.close()
            for f in frames {
                let ok = f.tag == .message ? (2...3).contains(f.segments.count) : f.segments.count == 1
                if !ok { throw fail("the segment count section 4.7 lists", "\(f.tag) with \(f.segments.count) segments") }
            }
        },
        ConformanceCheck("R-4.7-3", "a HELLO whose payload does not decode is refused (malformedPayload)") { c in
            try c.requireHandshake()
            var o = ClientOptions()
            o.hello = Frame(tag: .hello, segments: [ByteBuffer(bytes: [0x12, 0x7F, 0x41])])
            let peer = try await c.connect()
            defer { peer.close() }
            await peer.send(o.firstFlight())
            try await expectCloseOnPeer(peer, c, .malformedPayload, "a HELLO payload that ends inside a field")
        },
        ConformanceCheck("R-4.8-1", "unknown ignorable tags (0xA5) in the handshake and the session are skipped") { c in
            var o = ClientOptions()
            o.beforeAuth = [Frame(tag: FrameTag(rawValue: 0xA5), segments: [ByteBuffer(bytes: [1, 2, 3])])]
            o.beforeIdent = [Frame(tag: FrameTag(rawValue: 0xFF), segments: [ByteBuffer()])]
            let s = try await ClientSession.open(context: c, options: o)
            defer { s.peer.close() }
            try await s.send([Frame(tag: FrameTag(rawValue: 0x80), flags: 0x01, segments: [ByteBuffer(repeating: 0xEE, count: 100), ByteBuffer()])])
            if c.hasEcho { try await expectPong(s, try await s.request(pingType, pingPayload(1))) }
        },
        ConformanceCheck("R-4.8-2", "a HELLO in the session with an undecodable payload is unexpectedFrame, not malformedPayload") { c in
            try await expectViolation(c, .unexpectedFrame, "a HELLO in the session") { _ in
                ByteBuffer(frame: Frame(tag: .hello, segments: [ByteBuffer(bytes: [0xFF, 0xFF, 0xFF])]))
            }
        },
        ConformanceCheck("R-4.8-3", "an unknown critical tag (0x30) is refused (unknownFrameTag)") { c in
            try await expectViolation(c, .unknownFrameTag, "tag 0x30") { _ in ByteBuffer(frame: Frame(tag: FrameTag(rawValue: 0x30), segments: [ByteBuffer()])) }
        },
        ConformanceCheck("R-4.8-4", "a HELLO in the session is refused (unexpectedFrame)") { c in
            try await expectViolation(c, .unexpectedFrame, "a HELLO in the session") { _ in ByteBuffer(frame: ClientOptions().helloFrame()) }
        },
        ConformanceCheck("R-4.8-4", "a NOTICE sent to the server is refused (unexpectedFrame)") { c in
            try await expectViolation(c, .unexpectedFrame, "a NOTICE from a client") { _ in
                ByteBuffer(frame: Parley_V1_Notice().frame(tag: .notice))
            }
        },
        ConformanceCheck("R-4.8-4", "a SERVER_IDENT from the client in place of CLIENT_IDENT is refused (unexpectedFrame)") { c in
            try c.requireNoneSession()
            var o = ClientOptions()
            o.ident = Parley_V1_ServerIdent().frame(tag: .serverIdent)
            let peer = try await c.connect()
            defer { peer.close() }
            await peer.send(wholeHandshake(o))
            try await expectCloseOnPeer(peer, c, .unexpectedFrame, "a SERVER_IDENT from a client")
        },
        ConformanceCheck("R-4.8-5", "a CLOSE in the handshake ends it: no answer, no CLOSE back") { c in
            try c.requireHandshake()
            let peer = try await c.connect()
            defer { peer.close() }
            var b = ByteBuffer()
            b.writeBanner(Banner(supported: ClientOptions.announced))
            b.writeFrame(ClientOptions().helloFrame())
            var status = Parley_V1_Status()
            status.code = ParleyError.Code.connectionClosed.rawValue
            b.writeFrame(status.frame(tag: .close))
            b.writeFrame(ClientOptions.authRequest())
            await peer.send(b)
            try await expectSilentClose(peer, c, "after the client's CLOSE")
        },
        ConformanceCheck("R-4.9-1", "flags on a CLIENT_IDENT and a KEEPALIVE are ignored") { c in
            var o = ClientOptions()
            o.ident.flags = 0x80
            let s = try await ClientSession.open(context: c, options: o)
            defer { s.peer.close() }
            guard s.features.contains(.keepalive) else { return }
            var k = SessionStateMachine.keepaliveFrame(tag: .keepalive, timestamp: 7)
            k.flags = 0x41
            try await s.send([k])
            let event = try await s.nextEvent()
            guard case .frame(let f) = event, f.tag == .keepaliveAck else { throw fail("KEEPALIVE_ACK", event.summary) }
        },
        ConformanceCheck("R-4.9-2", "the server sends every frame with flags 0") { c in
            let (s, frames) = try await sample(c)
            s.peer.close()
            if let f = frames.first(where: { $0.flags != 0 }) { throw fail("flags 0", "\(describe(f)) with flags 0x\(String(f.flags, radix: 16))") }
        },
        ConformanceCheck("R-4.9-3", "a MESSAGE with frame flags 0x01 is refused (protocolViolation)") { c in
            try await expectViolation(c, .protocolViolation, "frame flags 0x01 on a MESSAGE") { s in
                var f = s.ping(1)
                f.flags = 1
                return ByteBuffer(frame: f)
            }
        },
    ]

    static func expectCloseOnPeer(_ peer: ConformancePeer, _ c: CheckContext, _ code: ParleyError.Code, _ why: String) async throws {
        var frames: [Frame] = []
        let deadline = ContinuousClock.now.advanced(by: c.timeout)
        while ContinuousClock.now < deadline {
            switch await peer.next(deadline - ContinuousClock.now) {
            case .frame(let f): frames.append(f)
            case .closed: return try expectCloseFrame(code, because: why, in: (frames, true))
            case .timeout: return try expectCloseFrame(code, because: why, in: (frames, false))
            case .undecodable(let e): throw fail("frames that decode", "\(e)")
            case .banner: continue
            }
        }
        try expectCloseFrame(code, because: why, in: (frames, false))
    }

    /// The server closes without sending anything more than its banner and HELLO.
    static func expectSilentClose(_ peer: ConformancePeer, _ c: CheckContext, _ why: String) async throws {
        let deadline = ContinuousClock.now.advanced(by: c.timeout)
        while ContinuousClock.now < deadline {
            let event = await peer.next(deadline - ContinuousClock.now)
            switch event {
            case .banner: continue
            case .frame(let f) where f.tag == .hello: continue
            case .closed: return
            default: throw fail("the connection closed with nothing sent \(why)", event.summary)
            }
        }
        throw fail("the connection closed \(why)", "the connection still open")
    }

    // MARK: - Section 5.1: secure mode (what can be checked without a key)

    /// Starts a handshake with method `secret` and the given AUTH_REQUEST payload; returns
    /// the connection after the server's HELLO, or skips when the server does not allow the
    /// method (it answers AUTH_BAD_METHOD).
    static func secretStart(_ c: CheckContext, payload: Data) async throws -> ConformancePeer {
        // This client offers secure mode too (it never gets as far as sealing), so that a
        // server whose only mode is secure is checked as well.
        let supported = ParleyFeatures.implemented.union(.secureMode)
        let missing = c.serverBanner.required.subtracting(supported)
        guard missing.isEmpty else { throw CheckSkip(reason: "the server requires features \(missing) that parley conform does not speak") }
        let peer = try await c.connect()
        var auth = Parley_V1_AuthRequest()
        auth.method = AuthMethod.secret
        auth.offeredMethods = [AuthMethod.secret]
        auth.offeredModes = [ConnectionMode.crc.rawValue, ConnectionMode.secure.rawValue]
        auth.offeredCiphers = SecureCipher.preferred.map(\.rawValue)
        auth.payload = payload
        var b = ByteBuffer()
        b.writeBanner(Banner(supported: supported))
        b.writeFrame(ClientOptions().helloFrame())
        b.writeFrame(auth.frame(tag: .authRequest))
        await peer.send(b)
        _ = try await ClientSession.expectBanner(peer, c.timeout)
        _ = try await ClientSession.expect(.hello, peer, c.timeout, "HELLO")
        return peer
    }

    /// A correct SecretAuthRequest, and what the client needs to go on.
    static func secretRequest() throws -> (HandshakeRandomness, Data) {
        let randomness = HandshakeRandomness.generate()
        var request = Parley_V1_SecretAuthRequest()
        request.clientChallenge = Data(randomness.challenge)
        request.clientKeyShare = Data(try randomness.publicKey())
        return (randomness, try request.serializedBytes())
    }

    /// Runs method `secret` up to AUTH_REPLY_MORE, sends the AUTH_REQUEST_MORE payload `proof`
    /// builds, and expects CLOSE `code`.
    static func secretProof(
        _ c: CheckContext, _ code: ParleyError.Code, _ why: String,
        proof: (_ randomness: HandshakeRandomness, _ challenge: Parley_V1_SecretAuthChallenge) throws -> Data
    ) async throws {
        let (randomness, request) = try secretRequest()
        let peer = try await secretStart(c, payload: request)
        defer { peer.close() }
        let reply = try await ClientSession.expectOneOf([.authReplyMore, .authBadMethod], peer, c.timeout, "AUTH_REPLY_MORE")
        if reply.tag == .authBadMethod { throw CheckSkip(reason: "the server does not allow method secret") }
        let more = try decode(Parley_V1_AuthMore.self, reply)
        let challenge: Parley_V1_SecretAuthChallenge
        do { challenge = try Parley_V1_SecretAuthChallenge(serializedBytes: more.payload) } catch {
            throw fail("an AUTH_REPLY_MORE carrying a SecretAuthChallenge", "\(error)")
        }
        var answer = Parley_V1_AuthMore()
        answer.payload = try proof(randomness, challenge)
        await peer.send(ByteBuffer(frame: answer.frame(tag: .authRequestMore)))
        try await expectCloseOnPeer(peer, c, code, why)
    }

    /// A proof that seals `entity` correctly under the identity key, with zero proofs.
    static func sealedProof(_ entity: String, _ randomness: HandshakeRandomness, _ challenge: Parley_V1_SecretAuthChallenge, tamper: Bool) throws -> Data {
        let shared = try randomness.sharedSecret(peerPublicKey: Array(challenge.serverKeyShare))
        var sealed = SecretIdentity.seal(entity: entity, clientChallenge: randomness.challenge, serverChallenge: Array(challenge.serverChallenge), sharedSecret: shared)
        if tamper { sealed[0] ^= 0x01 }
        var proof = Parley_V1_SecretAuthProof()
        proof.clientProof = Data(repeating: 0, count: 32)
        proof.transcriptMac = Data(repeating: 0, count: 32)
        proof.sealedEntity = Data(sealed)
        return try proof.serializedBytes()
    }

    static let secure: [ConformanceCheck] = [
        ConformanceCheck("R-5.1-1", "method tls on a connection that is not TLS is answered AUTH_BAD_METHOD") { c in
            try c.requireHandshake()
            guard !c.target.address.usesTLS else { throw CheckSkip(reason: "the connection is TLS") }
            let peer = try await c.connect()
            defer { peer.close() }
            var b = ByteBuffer()
            b.writeBanner(Banner(supported: ClientOptions.announced))
            b.writeFrame(ClientOptions().helloFrame())
            b.writeFrame(ClientOptions.authRequest(AuthMethod.tls))
            await peer.send(b)
            _ = try await ClientSession.expectBanner(peer, c.timeout)
            _ = try await ClientSession.expect(.hello, peer, c.timeout, "HELLO")
            let f = try await ClientSession.expect(.authBadMethod, peer, c.timeout, "AUTH_BAD_METHOD for method tls")
            let bad = try decode(Parley_V1_AuthBadMethod.self, f)
            guard bad.method == AuthMethod.tls, !bad.allowedMethods.contains(AuthMethod.tls) else {
                throw fail("AUTH_BAD_METHOD method \"tls\", tls not among the allowed methods", "method \"\(bad.method)\" allowed \(bad.allowedMethods)")
            }
        },
        ConformanceCheck("R-5.1-2", "a SecretAuthRequest with a 16-byte challenge is refused (malformedPayload)") { c in
            let randomness = HandshakeRandomness.generate()
            var request = Parley_V1_SecretAuthRequest()
            request.clientChallenge = Data(randomness.challenge.prefix(16))
            request.clientKeyShare = Data(try randomness.publicKey())
            let peer = try await secretStart(c, payload: try request.serializedBytes())
            defer { peer.close() }
            var frames: [Frame] = []
            let deadline = ContinuousClock.now.advanced(by: c.timeout)
            var closed = false
            loop: while ContinuousClock.now < deadline {
                switch await peer.next(deadline - ContinuousClock.now) {
                case .frame(let f) where f.tag == .authBadMethod: throw CheckSkip(reason: "the server does not allow method secret")
                case .frame(let f): frames.append(f)
                case .closed: closed = true; break loop
                case .timeout: break loop
                case .undecodable(let e): throw fail("frames that decode", "\(e)")
                case .banner: continue
                }
            }
            try expectCloseFrame(.malformedPayload, because: "a 16-byte client challenge", in: (frames, closed))
        },
        ConformanceCheck("R-5.1-11", "method none offering secure mode only is refused (authenticationFailed: no common mode)") { c in
            try c.requireHandshake()
            guard c.allowsNone else { throw CheckSkip(reason: "it writes a method-none handshake by hand, and this server gave no method-none crc session (or --secure-sessions)") }
            var auth = Parley_V1_AuthRequest()
            auth.method = AuthMethod.none
            auth.offeredMethods = [AuthMethod.none]
            auth.offeredModes = [ConnectionMode.secure.rawValue]
            var o = ClientOptions()
            o.supported.insert(.secureMode)
            var b = ByteBuffer()
            b.writeBanner(Banner(version: o.version, supported: o.supported, required: o.required))
            b.writeFrame(o.helloFrame())
            b.writeFrame(auth.frame(tag: .authRequest))
            try await expectRefusal(c, b, .authenticationFailed, "method none offered with secure mode only, which it cannot give")
        },
        ConformanceCheck("R-5.1-4", "an AUTH_REQUEST_MORE that does not decode is refused (malformedPayload)") { c in
            try await secretProof(c, .malformedPayload, "a SecretAuthProof that does not decode") { _, _ in Data([0x0A, 0x7F, 0x01]) }
        },
        ConformanceCheck("R-5.1-4", "a sealed entity that does not open is refused (handshakeTampered), before the entity is looked up") { c in
            try await secretProof(c, .handshakeTampered, "a sealed entity altered in transit") { r, ch in try sealedProof("conform.no-such-entity", r, ch, tamper: true) }
        },
        ConformanceCheck("R-5.1-4", "an unknown entity is refused (authenticationFailed), before the proofs are checked") { c in
            try await secretProof(c, .authenticationFailed, "an unknown entity") { r, ch in try sealedProof("conform.no-such-entity", r, ch, tamper: false) }
        },
    ]

    /// A secure session sends `bytes`; the server answers CLOSE `code` (sealed) and closes.
    static func secureViolation(_ c: CheckContext, _ code: ParleyError.Code, _ why: String, _ build: (SecureClientSession) throws -> ByteBuffer) async throws {
        let s = try await SecureClientSession.open(c)
        defer { s.peer.close() }
        await s.peer.send(try build(s))
        try await expectCloseOnPeer(s.peer, c, code, why)
    }

    static let secureSession: [ConformanceCheck] = [
        ConformanceCheck("R-5.1-5", "with a key, the server's AUTH_DONE passes the client's checks and the secure session carries a request and its answer") { c in
            let s = try await SecureClientSession.open(c)
            defer { s.peer.close() }
            guard s.result.connectionMode == .secure else { throw fail("secure mode (the only mode offered)", "\(s.result.connectionMode)") }
            await s.peer.send(try s.sealed(s.ping(id: 1)))
            while true {
                let event = await s.peer.next(c.timeout)
                guard case .frame(let f) = event else { throw fail("a sealed Pong", event.summary) }
                guard f.tag == .message else { continue }
                let m = try WireMessage(frame: f)
                // A Pong from the echo service; a server without it answers ERROR.
                guard m.header.id == 1, m.header.kind == .response || m.header.kind == .error else { throw fail("the answer to request 1", describe(f)) }
                return
            }
        },
        ConformanceCheck("R-6.1-6", "two sealed requests right after CLIENT_IDENT, before SERVER_IDENT, are answered after it, and a third after them") { c in
            let s = try await SecureClientSession.open(c, early: [{ SecureClientSession.ping(id: 1, seq: $0) }, { SecureClientSession.ping(id: 2, seq: $0) }])
            defer { s.peer.close() }
            guard s.result.connectionMode == .secure else { throw fail("secure mode (the only mode offered)", "\(s.result.connectionMode)") }
            await s.peer.send(try s.sealed(s.ping(id: 3)))
            var answered: [UInt64] = []
            while answered.count < 3 {
                let event = await s.peer.next(c.timeout)
                guard case .frame(let f) = event else { throw fail("sealed answers to requests 1, 2 and 3", "\(answered) answered, then \(event.summary)") }
                guard f.tag == .message else { continue }
                let m = try WireMessage(frame: f)
                // Pongs from the echo service; a server without it answers ERROR.
                guard m.header.kind == .response || m.header.kind == .error else { throw fail("answers to requests 1, 2 and 3", describe(f)) }
                answered.append(m.header.id)
            }
            guard answered.sorted() == [1, 2, 3] else { throw fail("answers to requests 1, 2 and 3", "answers to \(answered)") }
        },
        ConformanceCheck("R-5.1-7", "a sealed preamble with a bit flipped in a segment length is refused (badAuthTag), not acted upon") { c in
            try await secureViolation(c, .badAuthTag, "a sealed preamble altered in its length") { s in
                var b = try s.sealed(s.ping(id: 1))
                b.setInteger(b.getInteger(at: b.readerIndex + 6, as: UInt8.self)! ^ 0x40, at: b.readerIndex + 6)
                return b
            }
        },
        ConformanceCheck("R-5.1-8", "a sealed frame with a bit flipped in its body is refused (badAuthTag)") { c in
            try await secureViolation(c, .badAuthTag, "a sealed body altered") { s in
                var b = try s.sealed(s.ping(id: 1))
                let at = b.readerIndex + sealedPreambleSize + 2
                b.setInteger(b.getInteger(at: at, as: UInt8.self)! ^ 0x01, at: at)
                return b
            }
        },
        ConformanceCheck("R-5.1-8", "a clear frame in a secure session is refused (badAuthTag)") { c in
            try await secureViolation(c, .badAuthTag, "a frame in the clear after the switch") { s in
                // A sealed Ping, then one in the clear (not the first frame after the switch,
                // where only a clear CLOSE is let through).
                var b = try s.sealed(s.ping(id: 2))
                b.writeImmutableBuffer(ByteBuffer(frame: s.ping(id: 3)))
                return b
            }
        },
    ]

    // MARK: - Section 5.2: lossless sessions

    static let lossless: [ConformanceCheck] = [
        ConformanceCheck("R-5.2-1", "two lossless sessions get two different 16-byte session tokens") { c in
            try c.require(.reconnect, "lossless sessions (bit 9)")
            var o = ClientOptions()
            o.supported.insert(.reconnect)
            let a = try await ClientSession.open(context: c, options: o)
            let b = try await ClientSession.open(context: c, options: o)
            a.peer.close()
            b.peer.close()
            let tokens = [a.serverIdent.sessionToken, b.serverIdent.sessionToken]
            guard tokens.allSatisfy({ $0.count == 16 }), tokens[0] != tokens[1] else {
                throw fail("two different 16-byte tokens", tokens.map { Array($0).hexString }.joined(separator: " and "))
            }
        },
        ConformanceCheck("R-5.2-3", "a one-way message of a lossless session is acknowledged by itself") { c in
            try c.require(.reconnect, "lossless sessions (bit 9)")
            var o = ClientOptions()
            o.supported.insert(.reconnect)
            let s = try await ClientSession.open(context: c, options: o)
            defer { s.peer.close() }
            try await s.send([s.message(kind: .oneWay, id: 0, type: unknownType)])
            while true {
                let event = try await s.nextEvent()
                switch event {
                case .frame(let f) where f.tag == .ack:
                    let value = f.segments[0].getInteger(at: f.segments[0].readerIndex, endianness: .little, as: UInt64.self)
                    guard value == 1 else { throw fail("ACK 1", "ACK \(value.map { "\($0)" } ?? "of \(f.segments[0].readableBytes) bytes")") }
                    return
                case .frame(let f) where f.tag == .message:
                    if s.messages.last!.header.ack >= 1 { return }
                case .frame:
                    continue
                default:
                    throw fail("an ACK of seq 1 within \(c.timeout)", event.summary)
                }
            }
        },
    ]

    static var losslessOptions: ClientOptions {
        var o = ClientOptions()
        o.supported.insert(.reconnect)
        return o
    }

    /// A whole handshake with SESSION_RECONNECT in place of CLIENT_IDENT; returns the
    /// connection and what the server answered it with.
    static func reconnect(_ c: CheckContext, _ r: Parley_V1_SessionReconnect, lossless: Bool = true) async throws -> (ConformancePeer, PeerEvent) {
        var o = lossless ? losslessOptions : ClientOptions()
        if c.secure {
            // Method secret in secure mode, the SESSION_RECONNECT sealed in place of CLIENT_IDENT
            // (a reconnect of a secure session authenticates and keys its connection anew).
            try c.requireSession()
            let peer = try await c.connect()
            let event = try await SecureClientSession.reconnect(
                peer: peer, context: c, banner: Banner(supported: o.supported.union(.secureMode)), reconnect: r.frame(tag: .sessionReconnect)
            )
            return (peer, event)
        }
        try c.requireNoneSession()
        o.ident = r.frame(tag: .sessionReconnect)
        let peer = try await c.connect()
        await peer.send(wholeHandshake(o))
        _ = try await ClientSession.expectBanner(peer, c.timeout)
        _ = try await ClientSession.expect(.hello, peer, c.timeout, "HELLO")
        _ = try await ClientSession.expect(.authDone, peer, c.timeout, "AUTH_DONE")
        while true {
            let event = await peer.next(c.timeout)
            if case .frame(let f) = event, f.tag.isIgnorable && !f.tag.isKnown { continue }
            return (peer, event)
        }
    }

    static func reconnectRequest(_ s: ClientSession?, token: Data? = nil, lastReceived: UInt64 = 0, connectSeq: UInt64 = 1) -> Parley_V1_SessionReconnect {
        var r = Parley_V1_SessionReconnect()
        r.ident = (try? Parley_V1_ClientIdent(parleyPayload: ClientOptions().ident.segments[0])) ?? Parley_V1_ClientIdent()
        r.sessionToken = token ?? s?.serverIdent.sessionToken ?? Data(repeating: 0xC0, count: 16)
        r.serverNonce = s?.serverIdent.serverNonce ?? 1
        r.lastReceivedSeq = lastReceived
        r.connectSeq = connectSeq
        return r
    }

    /// A lossless session in which one Ping (id 1, seq 1) was answered; its connection is
    /// then broken (closed without CLOSE).
    static func brokenSession(_ c: CheckContext) async throws -> ClientSession {
        try c.requireEcho()
        try c.require(.reconnect, "lossless sessions (bit 9)")
        let s = try await ClientSession.open(context: c, options: losslessOptions)
        try await s.send([s.ping(7, id: 1)])
        try await expectPong(s, 1)
        s.peer.close()
        try await Task.sleep(for: .milliseconds(50))
        return s
    }

    static let losslessExchange: [ConformanceCheck] = [
        ConformanceCheck("R-5.2-5", "an ACK without lossless sessions negotiated is refused (unexpectedFrame)") { c in
            try await expectViolation(c, .unexpectedFrame, "ACK without bit 9") { _ in ByteBuffer(frame: SessionStateMachine.ackFrame(0)) }
        },
        ConformanceCheck("R-5.2-5", "an ACK of 7 bytes is refused (malformedPayload)") { c in
            try c.require(.reconnect, "lossless sessions (bit 9)")
            try await expectViolation(c, options: losslessOptions, .malformedPayload, "a 7-byte ACK") { _ in
                ByteBuffer(frame: Frame(tag: .ack, segments: [ByteBuffer(repeating: 0, count: 7)]))
            }
        },
        ConformanceCheck("R-5.2-6", "an ack of a seq the server never sent is refused (protocolViolation)") { c in
            try c.require(.reconnect, "lossless sessions (bit 9)")
            try await expectViolation(c, options: losslessOptions, .protocolViolation, "ack 5 when the server sent nothing") { _ in
                ByteBuffer(frame: WireMessage(header: MessageHeader(seq: 1, ack: 5, id: 0, kind: .oneWay, type: unknownType), payload: ByteBuffer()).frame(allocator: ByteBufferAllocator()))
            }
        },
        ConformanceCheck("R-5.2-6", "a MESSAGE repeating the last seq is dropped, not delivered") { c in
            try c.requireEcho()
            try c.require(.reconnect, "lossless sessions (bit 9)")
            let s = try await ClientSession.open(context: c, options: losslessOptions)
            defer { s.peer.close() }
            try await s.send([s.ping(1, id: 1), s.ping(2, id: 2).withSeq(1), s.ping(3, id: 3).withSeq(2)])
            try await expectPong(s, 1)
            try await expectPong(s, 3)
            _ = try await s.drainUntilClosed(.milliseconds(300))
            if let m = s.messages.first(where: { $0.header.id == 2 }) { throw fail("no answer to the repeated seq 1 (id 2)", describe(m)) }
        },
        ConformanceCheck("R-5.2-7", "SESSION_RECONNECT without lossless sessions negotiated is refused (unexpectedFrame)") { c in
            try c.requireSession()
            let (peer, event) = try await reconnect(c, reconnectRequest(nil), lossless: false)
            defer { peer.close() }
            try await expectCloseAfter(peer, c, event, .unexpectedFrame, "SESSION_RECONNECT without bit 9")
        },
        ConformanceCheck("R-5.2-7", "a SESSION_RECONNECT with a 15-byte token is refused (malformedPayload)") { c in
            try c.requireSession()
            try c.require(.reconnect, "lossless sessions (bit 9)")
            let (peer, event) = try await reconnect(c, reconnectRequest(nil, token: Data(repeating: 1, count: 15)))
            defer { peer.close() }
            try await expectCloseAfter(peer, c, event, .malformedPayload, "a 15-byte session token")
        },
        ConformanceCheck("R-5.2-8", "a SESSION_RECONNECT for an unknown session is answered SESSION_RESET") { c in
            try c.requireSession()
            try c.require(.reconnect, "lossless sessions (bit 9)")
            let (peer, event) = try await reconnect(c, reconnectRequest(nil))
            defer { peer.close() }
            guard case .frame(let f) = event, f.tag == .sessionReset else { throw fail("SESSION_RESET", event.summary) }
        },
        ConformanceCheck("R-5.2-12", "after SESSION_RESET, CLIENT_IDENT starts a new session; a second SESSION_RECONNECT is refused") { c in
            try c.requireSession()
            try c.require(.reconnect, "lossless sessions (bit 9)")
            let (peer, event) = try await reconnect(c, reconnectRequest(nil))
            defer { peer.close() }
            guard case .frame(let f) = event, f.tag == .sessionReset else { throw fail("SESSION_RESET", event.summary) }
            try await peer.sendFrames(ByteBuffer(frame: ClientOptions().ident))
            let identFrame = try await ClientSession.expect(.serverIdent, peer, c.timeout, "SERVER_IDENT after CLIENT_IDENT")
            let ident = try decode(Parley_V1_ServerIdent.self, identFrame)
            guard ident.sessionToken.count == 16 else { throw fail("SERVER_IDENT with a new 16-byte session token", "a token of \(ident.sessionToken.count) bytes") }
            let (second, secondEvent) = try await reconnect(c, reconnectRequest(nil))
            defer { second.close() }
            guard case .frame(let reset) = secondEvent, reset.tag == .sessionReset else { throw fail("SESSION_RESET", secondEvent.summary) }
            try await second.sendFrames(ByteBuffer(frame: reconnectRequest(nil).frame(tag: .sessionReconnect)))
            try await expectCloseOnPeer(second, c, .unexpectedFrame, "a second SESSION_RECONNECT")
        },
        ConformanceCheck("R-5.2-11", "a broken session resumes: SESSION_RESUMED, then the answer the client lacked is sent again") { c in
            let s = try await brokenSession(c)
            guard let pong = s.messages.first(where: { $0.header.id == 1 }) else { throw fail("a Pong before the break", "none") }
            let (peer, event) = try await reconnect(c, reconnectRequest(s, lastReceived: 0, connectSeq: 1))
            defer { peer.close() }
            guard case .frame(let f) = event, f.tag == .sessionResumed else { throw fail("SESSION_RESUMED", event.summary) }
            let resumed = try decode(Parley_V1_SessionResumed.self, f)
            guard resumed.lastReceivedSeq == 1 else { throw fail("SESSION_RESUMED with last_received_seq 1 (the Ping)", "\(resumed.lastReceivedSeq)") }
            let again = await peer.next(c.timeout)
            guard case .frame(let m) = again, m.tag == .message, let message = try? WireMessage(frame: m),
                  message.header.seq == pong.header.seq, message.header.id == 1, message.header.kind == .response, message.payload == pong.payload
            else { throw fail("the Pong sent again: seq \(pong.header.seq), id 1, the same payload", again.summary) }
        },
        ConformanceCheck("R-5.2-9", "a reconnect not newer than the accepted one is refused (sessionSuperseded)") { c in
            let s = try await brokenSession(c)
            let (first, event) = try await reconnect(c, reconnectRequest(s, lastReceived: 1, connectSeq: 2))
            defer { first.close() }
            guard case .frame(let f) = event, f.tag == .sessionResumed else { throw fail("SESSION_RESUMED", event.summary) }
            let (late, lateEvent) = try await reconnect(c, reconnectRequest(s, lastReceived: 1, connectSeq: 1))
            defer { late.close() }
            try await expectCloseAfter(late, c, lateEvent, .sessionSuperseded, "connect_seq 1 after 2 was accepted")
        },
        ConformanceCheck("R-5.2-10", "a reconnect claiming a seq the server never sent is refused (protocolViolation)") { c in
            let s = try await brokenSession(c)
            let (peer, event) = try await reconnect(c, reconnectRequest(s, lastReceived: 5, connectSeq: 1))
            defer { peer.close() }
            try await expectCloseAfter(peer, c, event, .protocolViolation, "last_received_seq 5 when the server sent 1")
        },
    ]

    /// Like `expectCloseOnPeer`, with the first event already read.
    static func expectCloseAfter(_ peer: ConformancePeer, _ c: CheckContext, _ first: PeerEvent, _ code: ParleyError.Code, _ why: String) async throws {
        switch first {
        case .frame(let f) where f.tag == .close:
            let closed: Bool
            if case .closed = await peer.next(c.timeout) { closed = true } else { closed = false }
            try expectCloseFrame(code, because: why, in: ([f], closed))
        case .frame(let f):
            throw fail("CLOSE \(code) (\(why))", describe(f))
        default:
            throw fail("CLOSE \(code) (\(why))", first.summary)
        }
    }

    // MARK: - Section 6: the handshake

    static let handshake: [ConformanceCheck] = [
        ConformanceCheck("R-6.1-1", "any peer_address text is accepted (empty, and not an address)") { c in
            for text in ["", "\u{1F99C} not an address at all"] {
                var o = ClientOptions()
                o.peerAddress = text
                let s = try await ClientSession.open(context: c, options: o)
                s.peer.close()
            }
        },
        ConformanceCheck("R-6.1-3", "a HELLO with entity type SERVER from the client is refused (protocolViolation)") { c in
            try c.requireHandshake()
            var o = ClientOptions()
            var h = Parley_V1_Hello()
            h.entityType = .server
            o.hello = h.frame(tag: .hello)
            let peer = try await c.connect()
            defer { peer.close() }
            await peer.send(o.firstFlight())
            try await expectCloseOnPeer(peer, c, .protocolViolation, "a client HELLO with ENTITY_TYPE_SERVER")
        },
        ConformanceCheck("R-6.1-4", "an unknown method is answered AUTH_BAD_METHOD naming it and the allowed methods") { c in
            try c.requireHandshake()
            let peer = try await c.connect()
            defer { peer.close() }
            var b = ByteBuffer()
            b.writeBanner(Banner(supported: ClientOptions.announced))
            b.writeFrame(ClientOptions().helloFrame())
            b.writeFrame(ClientOptions.authRequest("conform-no-such-method"))
            await peer.send(b)
            _ = try await ClientSession.expectBanner(peer, c.timeout)
            _ = try await ClientSession.expect(.hello, peer, c.timeout, "HELLO")
            let f = try await ClientSession.expect(.authBadMethod, peer, c.timeout, "AUTH_BAD_METHOD")
            let bad = try decode(Parley_V1_AuthBadMethod.self, f)
            guard bad.method == "conform-no-such-method", !bad.allowedMethods.isEmpty else {
                throw fail("AUTH_BAD_METHOD method \"conform-no-such-method\" with the allowed methods", "method \"\(bad.method)\" allowed \(bad.allowedMethods)")
            }
        },
        ConformanceCheck("R-6.1-5", "a whole handshake and three requests in one write are answered") { c in
            try await pipelined(c, pieces: nil)
        },
        ConformanceCheck("R-6.1-5", "a whole handshake and three requests in one-byte writes are answered") { c in
            try await pipelined(c, pieces: 1)
        },
    ]

    static func pipelined(_ c: CheckContext, pieces: Int?) async throws {
        try c.requireNoneSession()
        try c.requireEcho()
        let o = ClientOptions()
        var b = wholeHandshake(o)
        for n in 1...3 { b.writeImmutableBuffer(messageBytes(seq: UInt64(n), id: UInt64(n), kind: .request, type: pingType, payload: pingPayload(UInt64(n)))) }
        let peer = try await c.connect()
        defer { peer.close() }
        await peer.send(b, pieces: pieces)
        var pongs: Set<UInt64> = []
        let deadline = ContinuousClock.now.advanced(by: c.timeout * 2)
        while pongs.count < 3, ContinuousClock.now < deadline {
            let event = await peer.next(deadline - ContinuousClock.now)
            switch event {
            case .banner: continue
            case .frame(let f) where f.tag == .message:
                let m = try WireMessage(frame: f)
                if m.header.kind == .response { pongs.insert(m.header.id) }
            case .frame(let f) where [FrameTag.hello, .authDone, .serverIdent].contains(f.tag) || f.tag.isIgnorable:
                continue
            default:
                throw fail("answers to requests 1, 2 and 3", "\(pongs.sorted()) answered, then \(event.summary)")
            }
        }
        guard pongs == [1, 2, 3] else { throw fail("answers to requests 1, 2 and 3", "answers to \(pongs.sorted())") }
    }

    // MARK: - Section 7 to 10: the session

    /// A DIRECT request (section 7.16): id 0 and a zeroed 24-byte header, the shape of a
    /// block IO (section 17.9).
    static func directFrame() -> Frame {
        Frame(tag: .direct, segments: [ByteBuffer(repeating: 0, count: 32)])
    }

    /// DIRECT frames where no service enabled them (a checked server's connection has not
    /// been through any service's grant: section 7.16). Against a server that does not offer
    /// bit 4 the first check meets the "not negotiated" case, as the second does everywhere.
    static let direct: [ConformanceCheck] = [
        ConformanceCheck("R-7.16-2", "a DIRECT frame on a connection where no service enabled DIRECT (or without bit 4) is refused (unexpectedFrame)") { c in
            try await expectViolation(c, .unexpectedFrame, "a DIRECT frame no service enabled") { _ in ByteBuffer(frame: directFrame()) }
        },
        ConformanceCheck("R-7.16-2", "a DIRECT frame without feature bit 4 negotiated is refused (unexpectedFrame)") { c in
            var o = ClientOptions()
            o.supported.remove(.direct)
            try await expectViolation(c, options: o, .unexpectedFrame, "a DIRECT frame without bit 4") { _ in ByteBuffer(frame: directFrame()) }
        },
        ConformanceCheck("R-7.16-2", "a DIRECT frame in the handshake (after HELLO, before AUTH_REQUEST) is refused (unexpectedFrame)") { c in
            // Before any method is chosen, so the same bytes check servers of every method
            // and mode (the frames up to AUTH_REQUEST are never sealed).
            try c.requireHandshake()
            var o = ClientOptions()
            o.beforeAuth = [directFrame()]
            try await expectRefusal(c, o.firstFlight(), .unexpectedFrame, "a DIRECT frame in the handshake")
        },
        ConformanceCheck("R-7.16-1", "a DIRECT request sent as soon as the grant is read is answered, with its id (echo service: EnableDirect)") { c in
            let s = try await directSession(c)
            defer { s.peer.close() }
            let request = directRequest(id: 1, header: Array(0..<24), data: nil)
            try await s.send([request])
            let answers = try await directAnswers(s, ids: [1], "the answer to DIRECT request 1")
            try expectEcho(answers[1]!, of: request)
        },
        ConformanceCheck("R-7.16-7", "every DIRECT request is answered once with its own id: 64 in one write, ids out of order, with and without data") { c in
            let s = try await directSession(c)
            defer { s.peer.close() }
            let ids = (1...64).map { UInt64($0 * 7919 % 1009 + 1) }  // distinct, not in order
            let requests = ids.enumerated().map { i, id in
                directRequest(id: id, header: Array(repeating: UInt8(i), count: 8 + i % 17),
                              data: i % 3 == 0 ? nil : ByteBuffer(repeating: UInt8(truncatingIfNeeded: i * 5), count: i * 97))
            }
            try await s.send(requests)
            let answers = try await directAnswers(s, ids: Set(ids), "answers to the 64 DIRECT requests")
            for request in requests {
                try expectEcho(answers[request.directID!]!, of: request)
            }
        },
        ConformanceCheck("R-7.16-5", "a second DIRECT request with the id of one not yet answered is refused (protocolViolation)") { c in
            let s = try await directSession(c, delayMs: 3_000)
            defer { s.peer.close() }
            try await s.send([directRequest(id: 9, header: [1], data: nil), directRequest(id: 9, header: [2], data: nil)])
            try await s.expectClose(.protocolViolation, because: "DIRECT id 9 sent again before its answer")
        },
        ConformanceCheck("R-7.16-4", "a DIRECT frame whose segment 0 is shorter than its 8-byte id is refused (malformedPayload)") { c in
            let s = try await directSession(c)
            defer { s.peer.close() }
            try await s.send([Frame(tag: .direct, segments: [ByteBuffer(bytes: [1, 0, 0, 0])])])
            try await s.expectClose(.malformedPayload, because: "a DIRECT segment 0 of 4 bytes")
        },
        ConformanceCheck("R-7.16-4", "a DIRECT frame with frame flags set is refused (protocolViolation)") { c in
            let s = try await directSession(c)
            defer { s.peer.close() }
            var request = directRequest(id: 1, header: [], data: nil)
            request.flags = 0x01
            try await s.send([request])
            try await s.expectClose(.protocolViolation, because: "a DIRECT frame with flags 0x01")
        },
        ConformanceCheck("R-7.16-3", "DIRECT frames do not count in seq or ack: MESSAGEs around them are numbered on") { c in
            let s = try await directSession(c)
            defer { s.peer.close() }
            let first = try await s.request(pingType, pingPayload(1))
            try await s.send([directRequest(id: 1, header: [7], data: nil), directRequest(id: 2, header: [8], data: ByteBuffer(repeating: 3, count: 10))])
            let second = try await s.request(pingType, pingPayload(2))
            _ = try await directAnswers(s, ids: [1, 2], "the answers to DIRECT requests 1 and 2")
            try await expectPong(s, first)
            try await expectPong(s, second, ", numbered as if the DIRECT frames before it were not there")
            guard s.seqFaults.isEmpty else { throw fail("the server's MESSAGEs numbered 1, 2, 3, ... around its DIRECT answers", s.seqFaults.joined(separator: "; ")) }
        },
        ConformanceCheck("R-7.16-3", "a lossless session (bit 9) is not granted DIRECT (echo service: EnableDirect answered ERROR invalidArgument)") { c in
            try c.requireEcho()
            try c.require(.reconnect, "lossless sessions (bit 9)")
            try c.require(.direct, "DIRECT frames (bit 4)")
            let s = try await ClientSession.open(context: c, options: losslessOptions)
            defer { s.peer.close() }
            let answer = try await s.answer(try await s.request(enableDirectType, Parley_Echo_V1_EnableDirect().parleyPayload()))
            if errorCode(answer) == .unknownMessageType { throw CheckSkip(reason: Self.noDirectEcho) }
            guard errorCode(answer) == .invalidArgument else { throw fail("ERROR invalidArgument to EnableDirect in a lossless session", "\(answer.header.kind) \(answer.header.type) \(describe(answer))") }
        },
    ]

    static let enableDirectType = Parley_Echo_V1_EnableDirect.protoMessageName
    static let noDirectEcho = "the server's echo service does not grant DIRECT (parley.echo.v1.EnableDirect, section 12), which this check uses"

    /// A session in which the echo service granted DIRECT, its answers after `delayMs`.
    static func directSession(_ c: CheckContext, delayMs: UInt32 = 0) async throws -> ClientSession {
        try c.requireEcho()
        try c.require(.direct, "DIRECT frames (bit 4)")
        let s = try await ClientSession.open(context: c)
        guard s.features.contains(.direct) else {
            s.peer.close()
            throw CheckSkip(reason: "DIRECT frames (bit 4) were not negotiated")
        }
        var enable = Parley_Echo_V1_EnableDirect()
        enable.delayMs = delayMs
        let answer = try await s.answer(try await s.request(enableDirectType, enable.parleyPayload()))
        if errorCode(answer) == .unknownMessageType {
            s.peer.close()
            throw CheckSkip(reason: noDirectEcho)
        }
        guard answer.header.kind == .response, answer.header.type == Parley_Echo_V1_DirectGranted.protoMessageName else {
            s.peer.close()
            throw fail("RESPONSE parley.echo.v1.DirectGranted to EnableDirect", "\(answer.header.kind) \(answer.header.type) \(describe(answer))")
        }
        return s
    }

    /// A DIRECT request: segment 0 the id then `header`, segment 1 `data` if given.
    static func directRequest(id: UInt64, header: [UInt8], data: ByteBuffer?) -> Frame {
        var segment0 = ByteBuffer()
        segment0.writeInteger(id, endianness: .little)
        segment0.writeBytes(header)
        return Frame(tag: .direct, segments: data.map { [segment0, $0] } ?? [segment0])
    }

    /// Reads until a DIRECT answer for every id of `ids` came; fails on one for another id or
    /// a second for the same, on the end of the connection, and on silence.
    static func directAnswers(_ s: ClientSession, ids: Set<UInt64>, _ what: String) async throws -> [UInt64: Frame] {
        var answers: [UInt64: Frame] = [:]
        while answers.count < ids.count {
            let event = try await s.nextEvent()
            switch event {
            case .frame(let f) where f.tag == .direct:
                guard let id = f.directID else {
                    throw fail(what, "a DIRECT answer whose segment 0 is shorter than an id: \(describe(f))")
                }
                guard ids.contains(id), answers[id] == nil else {
                    throw fail(what, "a DIRECT answer for id \(id), \(ids.contains(id) ? "a second one" : "which was not sent")")
                }
                answers[id] = f
            case .frame(let f) where f.tag == .message || f.tag == .ack || f.tag == .notice || f.tag == .keepaliveAck:
                continue
            default:
                throw fail(what, "\(answers.count) of \(ids.count) answered, then \(event.summary)")
            }
        }
        return answers
    }

    /// The echo service's answer to `request`: its segment 0 and its segment 1, as sent.
    static func expectEcho(_ answer: Frame, of request: Frame) throws {
        let id = request.directID!
        let sent = request.segments.map { Array($0.readableBytesView) }
        let got = answer.segments.map { Array($0.readableBytesView) }
        guard got == sent else {
            throw fail("the DIRECT answer to id \(id) echoing its segments (\(sent.map(\.count)) bytes)", "segments of \(got.map(\.count)) bytes\(got.first == sent.first ? "" : ", segment 0 differs")")
        }
    }

    static let session: [ConformanceCheck] = [
        ConformanceCheck("R-7.1-1", "a MESSAGE of one segment is refused (malformedPayload)") { c in
            try await expectViolation(c, .malformedPayload, "a MESSAGE with one segment") { s in
                var f = s.ping(1)
                f.segments.removeLast()
                return ByteBuffer(frame: f)
            }
        },
        ConformanceCheck("R-7.1-2", "the server's MESSAGEs have at most 3 segments") { c in
            let (s, frames) = try await sample(c)
            s.peer.close()
            if let f = frames.first(where: { $0.tag == .message && $0.segments.count > 3 }) { throw fail("2 or 3 segments", "\(f.segments.count)") }
        },
        ConformanceCheck("R-7.1-3", "the server's data segments have alignment hint 4096") { c in
            try c.require(.dataSegment, "dataSegment")
            let (s, frames) = try await sample(c)
            s.peer.close()
            for f in frames where f.tag == .message && f.segments.count == 3 {
                if f.alignments[2] != 4096 { throw fail("alignment 4096", "\(f.alignments[2])") }
            }
        },
        ConformanceCheck("R-7.2-1", "the server's message headers have bytes 28-31 zero") { c in
            // WireMessage(frame:) refuses a header with non-zero reserved bytes.
            let (s, _) = try await sample(c)
            s.peer.close()
        },
        ConformanceCheck("R-7.2-2", "a message header of 20 bytes is refused (malformedPayload)") { c in
            try await expectViolation(c, .malformedPayload, "a 20-byte header") { _ in
                ByteBuffer(frame: Frame(tag: .message, segments: [ByteBuffer(repeating: 0, count: 20), ByteBuffer()]))
            }
        },
        ConformanceCheck("R-7.2-2", "a message header with reserved bytes 28-31 set is refused (malformedPayload)") { c in
            try await expectViolation(c, .malformedPayload, "header bytes 28-31 = 1") { s in
                var f = s.ping(1)
                f.segments[0].setInteger(UInt32(1), at: f.segments[0].readerIndex + 28, endianness: .little)
                return ByteBuffer(frame: f)
            }
        },
        ConformanceCheck("R-7.2-2", "a type name of 1025 bytes is refused (malformedPayload)") { c in
            try await expectViolation(c, .malformedPayload, "a 1025-byte type name") { s in
                var head = ByteBuffer()
                head.writeMultipleIntegers(s.nextSeq, UInt64(0), UInt64(1), UInt8(1), UInt8(0), UInt16(1025), UInt32(0), endianness: .little)
                head.writeRepeatingByte(0x61, count: 1025)
                return ByteBuffer(frame: Frame(tag: .message, segments: [head, ByteBuffer()]))
            }
        },
        ConformanceCheck("R-7.2-2", "a header whose segment is longer than 32 + N is refused (malformedPayload)") { c in
            try await expectViolation(c, .malformedPayload, "a header segment 1 byte longer than its type name says") { s in
                var f = s.ping(1)
                f.segments[0].writeInteger(UInt8(0))
                return ByteBuffer(frame: f)
            }
        },
        ConformanceCheck("R-7.2-2", "a type name that is not UTF-8 is refused (malformedPayload)") { c in
            try await expectViolation(c, .malformedPayload, "type name bytes c3 28") { s in
                var head = ByteBuffer()
                head.writeMultipleIntegers(s.nextSeq, UInt64(0), UInt64(1), UInt8(1), UInt8(0), UInt16(2), UInt32(0), endianness: .little)
                head.writeBytes([0xC3, 0x28])
                return ByteBuffer(frame: Frame(tag: .message, segments: [head, ByteBuffer()]))
            }
        },
        ConformanceCheck("R-7.2-3", "a first MESSAGE with seq 2 is refused (protocolViolation)") { c in
            try await expectViolation(c, .protocolViolation, "seq 2 where 1 was due") { s in ByteBuffer(frame: s.ping(1).withSeq(2)) }
        },
        ConformanceCheck("R-7.2-4", "a MESSAGE of kind 7 is refused (protocolViolation)") { c in
            try await expectViolation(c, .protocolViolation, "kind 7") { s in
                ByteBuffer(frame: s.message(kind: MessageKind(rawValue: 7), id: 1, type: pingType, payload: pingPayload(1)))
            }
        },
        ConformanceCheck("R-7.2-5", "a CANCEL without streams negotiated is refused (protocolViolation)") { c in
            var o = ClientOptions()
            o.supported.remove(.streams)
            try await expectViolation(c, options: o, .protocolViolation, "CANCEL without streams") { s in
                ByteBuffer(frame: s.message(kind: .cancel, id: 1, type: ""))
            }
        },
        ConformanceCheck("R-7.2-6", "a data segment without dataSegment negotiated is refused (protocolViolation)") { c in
            var o = ClientOptions()
            o.supported.remove(.dataSegment)
            try await expectViolation(c, options: o, .protocolViolation, "a data segment without dataSegment") { s in
                ByteBuffer(frame: s.message(kind: .request, id: 1, type: echoType, data: ByteBuffer(bytes: [1])))
            }
        },
        ConformanceCheck("R-7.2-7", "a MESSAGE with header flags 0x01 is refused (protocolViolation)") { c in
            try await expectViolation(c, .protocolViolation, "header flags 0x01") { s in
                ByteBuffer(frame: s.message(kind: .request, id: 1, type: pingType, payload: pingPayload(1), headerFlags: 1))
            }
        },
        ConformanceCheck("R-7.3-1", "the server's ack is the last seq it had received") { c in
            try c.requireEcho()
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            try await s.send((1...5).map { n in s.ping(UInt64(n), id: UInt64(n)) })
            for id in UInt64(1)...5 {
                let m = try await s.answer(id)
                guard m.header.ack >= id, m.header.ack <= 5 else {
                    throw fail("the answer to request \(id) (seq \(id)) with an ack from \(id) to 5", "ack \(m.header.ack)")
                }
            }
            let acks = s.messages.map(\.header.ack)
            guard acks == acks.sorted() else { throw fail("acks that never go down", "\(acks)") }
        },
        ConformanceCheck("R-7.3-2", "the server numbers its MESSAGEs 1, 2, 3, ...") { c in
            try c.requireEcho()
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            try await s.send((1...20).map { n in s.ping(UInt64(n), id: UInt64(n)) })
            for id in UInt64(1)...20 { _ = try await s.answer(id) }
            guard s.seqFaults.isEmpty, s.messages.first?.header.seq == 1 else {
                throw fail("seq 1 to \(s.messages.count)", s.seqFaults.joined(separator: ", "))
            }
        },
        ConformanceCheck("R-7.4-1", "a REQUEST reusing the id of a request still served is refused (protocolViolation)") { c in
            try c.requireEcho()
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            var sleep = Parley_Echo_V1_Sleep()
            sleep.delayMs = 2000
            try await s.send([s.message(kind: .request, id: 9, type: Parley_Echo_V1_Sleep.protoMessageName, payload: sleep.parleyPayload()), s.ping(1, id: 9)])
            let drained = try await s.drainUntilClosed()
            if let m = s.messages.first(where: { $0.header.id == 9 }) { throw fail("CLOSE protocolViolation and no answer with id 9", "\(m.header.kind) id 9 \(m.header.type)") }
            try expectCloseFrame(.protocolViolation, because: "id 9 already in use", in: drained)
        },
        ConformanceCheck("R-7.5-1", "a request of an unknown type is answered ERROR unknownMessageType") { c in
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            let answer = try await s.answer(try await s.request(unknownType, ByteBuffer()))
            guard errorCode(answer) == .unknownMessageType else { throw fail("ERROR unknownMessageType", "\(answer.header.kind) \(answer.header.type)") }
        },
        ConformanceCheck("R-7.5-2", "200 pipelined requests get one answer each, matched by id") { c in
            try c.requireEcho()
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            var b = ByteBuffer()
            for n in UInt64(1)...200 { b.writeFrame(s.ping(n, id: 1000 + n)) }
            try await s.peer.sendFrames(b)
            for n in UInt64(1)...200 {
                let m = try await s.answer(1000 + n)
                let pong = try Parley_Echo_V1_Pong(parleyPayload: m.payload)
                guard pong.sequence == n else { throw fail("Pong \(n) for request \(1000 + n)", "Pong \(pong.sequence)") }
            }
            _ = try await s.drainUntilClosed(.milliseconds(200))
            let answers = s.messages.filter { $0.header.kind == .response || $0.header.kind == .error }.count
            guard answers == 200 else { throw fail("200 answers", "\(answers)") }
        },
        ConformanceCheck("R-7.5-2", "a request whose payload does not decode is answered ERROR malformedPayload") { c in
            try c.requireEcho()
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            let answer = try await s.answer(try await s.request(pingType, ByteBuffer(bytes: [0x08])))
            guard errorCode(answer) == .malformedPayload else { throw fail("ERROR malformedPayload", describe(answer)) }
        },
        ConformanceCheck("R-7.5-2", "a slow request and a quick one are both answered, the quick one first") { c in
            try c.requireEcho()
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            var sleep = Parley_Echo_V1_Sleep()
            sleep.delayMs = 300
            try await s.send([s.message(kind: .request, id: 1, type: Parley_Echo_V1_Sleep.protoMessageName, payload: sleep.parleyPayload()), s.ping(1, id: 2)])
            _ = try await s.answer(2)
            if s.messages.contains(where: { $0.header.id == 1 }) { throw fail("the Pong before the Slept (answers out of order)", "the Slept first") }
            let slept = try await s.answer(1)
            guard slept.header.kind == .response else { throw fail("RESPONSE Slept", describe(slept)) }
        },
        ConformanceCheck("R-7.6-1", "a Count request without streams negotiated gets no STREAM_ITEM") { c in
            try c.requireEcho()
            var o = ClientOptions()
            o.supported.remove(.streams)
            let s = try await ClientSession.open(context: c, options: o)
            defer { s.peer.close() }
            var count = Parley_Echo_V1_Count()
            count.count = 3
            _ = try await s.answer(try await s.request(Parley_Echo_V1_Count.protoMessageName, count.parleyPayload()))
            if let item = s.messages.first(where: { $0.header.kind == .streamItem }) { throw fail("a final answer and no STREAM_ITEM", describe(item)) }
        },
        ConformanceCheck("R-7.6-3", "a Count of 5 is answered by 5 STREAM_ITEMs in order, then one RESPONSE") { c in
            try c.requireEcho()
            try c.require(.streams, "streams")
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            var count = Parley_Echo_V1_Count()
            count.count = 5
            let id = try await s.request(Parley_Echo_V1_Count.protoMessageName, count.parleyPayload())
            let done = try await s.answer(id)
            let items = try s.messages.filter { $0.header.id == id && $0.header.kind == .streamItem }.map { try Parley_Echo_V1_CountItem(parleyPayload: $0.payload).index }
            guard items == [0, 1, 2, 3, 4], done.header.kind == .response, done.header.type == Parley_Echo_V1_CountDone.protoMessageName else {
                throw fail("items 0 to 4, then RESPONSE CountDone", "items \(items), then \(describe(done))")
            }
        },
        ConformanceCheck("R-7.7-1", "a cancelled Sleep is stopped: no RESPONSE for it") { c in
            try c.requireEcho()
            try c.require(.streams, "streams (CANCEL needs it)")
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            let start = ContinuousClock.now
            var sleep = Parley_Echo_V1_Sleep()
            sleep.delayMs = 3000
            try await s.send([s.message(kind: .request, id: 1, type: Parley_Echo_V1_Sleep.protoMessageName, payload: sleep.parleyPayload())])
            try await Task.sleep(for: .milliseconds(100))
            try await s.send([s.message(kind: .cancel, id: 1, type: ""), s.ping(2, id: 2)])
            try await expectPong(s, 2)
            // Wait past the end of the sleep: a server that ignored the CANCEL answers then.
            wait: while ContinuousClock.now - start < .milliseconds(3500), !s.messages.contains(where: { $0.header.id == 1 }) {
                guard case .frame = try await s.nextEvent(.milliseconds(3500) - (ContinuousClock.now - start)) else { break wait }
            }
            if let answer = s.messages.first(where: { $0.header.id == 1 }), answer.header.kind != .error || errorCode(answer) != .cancelled {
                throw fail("no answer to the cancelled request, or ERROR cancelled", describe(answer))
            }
        },
        ConformanceCheck("R-7.7-1", "a REQUEST and its CANCEL in one write: the request is stopped and its id is free again") { c in
            try c.requireEcho()
            try c.require(.streams, "streams (CANCEL needs it)")
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            var sleep = Parley_Echo_V1_Sleep()
            sleep.delayMs = 30_000
            try await s.send([
                s.message(kind: .request, id: 9, type: Parley_Echo_V1_Sleep.protoMessageName, payload: sleep.parleyPayload()),
                s.message(kind: .cancel, id: 9, type: ""), s.ping(2, id: 2),
            ])
            try await expectPong(s, 2)
            // The stopped request's final answer, if the server sends one (ERROR cancelled).
            let deadline = ContinuousClock.now.advanced(by: c.timeout)
            wait: while ContinuousClock.now < deadline, !s.messages.contains(where: { $0.header.id == 9 }) {
                guard case .frame = try await s.nextEvent(deadline - ContinuousClock.now) else { break wait }
            }
            if let answer = s.messages.first(where: { $0.header.id == 9 }), answer.header.kind != .error || errorCode(answer) != .cancelled {
                throw fail("no answer to the cancelled request, or ERROR cancelled", describe(answer))
            }
            // Stopped, so no longer served: id 9 may be used again (section 7.4).
            try await s.send([s.ping(3, id: 9)])
            while true {
                let event = try await s.nextEvent()
                if case .frame(let f) = event, f.tag == .notice || f.tag == .keepaliveAck { continue }
                guard case .frame(let f) = event, f.tag == .message, let m = s.messages.last, m.header.id == 9,
                    m.header.kind == .response, m.header.type == Parley_Echo_V1_Pong.protoMessageName
                else {
                    throw fail("a Pong for a new request with the cancelled request's id 9", event.summary)
                }
                return
            }
        },
        ConformanceCheck("R-7.7-2", "a CANCEL for an id that is not being served is ignored") { c in
            try c.require(.streams, "streams (CANCEL needs it)")
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            try await s.send([s.message(kind: .cancel, id: 424_242, type: "")])
            let answer = try await s.answer(try await s.request(unknownType, ByteBuffer()))
            guard answer.header.kind == .error else { throw fail("the session going on (ERROR unknownMessageType)", describe(answer)) }
            if let other = s.messages.first(where: { $0.header.id == 424_242 }) { throw fail("nothing for the cancelled id", describe(other)) }
        },
        ConformanceCheck("R-7.8-1", "a ONE_WAY of an unknown type gets no answer") { c in
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            try await s.send([s.message(kind: .oneWay, id: 0, type: unknownType)])
            let id = try await s.request(unknownType, ByteBuffer())
            _ = try await s.answer(id)
            _ = try await s.drainUntilClosed(.milliseconds(300))
            if let other = s.messages.first(where: { $0.header.id != id }) { throw fail("no answer to the ONE_WAY", describe(other)) }
        },
        ConformanceCheck("R-7.9-1", "a CLOSE with an unknown code (999) ends the session quietly") { c in
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            var status = Parley_V1_Status()
            status.code = 999
            status.message = "conformance"
            var b = ByteBuffer(frame: status.frame(tag: .close))
            if c.hasEcho { b.writeFrame(s.ping(1, id: 1)) }
            try await s.peer.sendFrames(b)
            let drained = try await s.drainUntilClosed()
            if let f = drained.frames.first { throw fail("the connection closed, nothing sent back (section 7.13)", describe(f)) }
            guard drained.closed else { throw fail("the connection closed", "the connection still open") }
        },
        ConformanceCheck("R-7.10-1", "an empty data segment is echoed as an empty data segment") { c in
            try c.requireEcho()
            try c.require(.dataSegment, "dataSegment")
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            let answer = try await s.answer(try await s.request(echoType, ByteBuffer(), data: ByteBuffer()))
            guard answer.header.kind == .response, answer.data == ByteBuffer() else {
                throw fail("RESPONSE with an empty data segment (3 segments)", "\(describe(answer)) with \(answer.data == nil ? "no data segment" : "\(answer.data!.readableBytes) data bytes")")
            }
        },
        ConformanceCheck("R-7.10-2", "an Echo without dataSegment negotiated is answered without a data segment") { c in
            try c.requireEcho()
            var o = ClientOptions()
            o.supported.remove(.dataSegment)
            let s = try await ClientSession.open(context: c, options: o)
            defer { s.peer.close() }
            let answer = try await s.answer(try await s.request(echoType, Parley_Echo_V1_Echo().parleyPayload()))
            if answer.data != nil { throw fail("an answer of 2 segments", "a data segment of \(answer.data!.readableBytes) bytes") }
        },
        ConformanceCheck("R-7.12-1", "a KEEPALIVE is answered at once by a KEEPALIVE_ACK with the same 8 bytes, byte for byte") { c in
            try c.require(.keepalive, "keepalive")
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            let timestamp: UInt64 = 1_700_000_000_123_456_789
            try await s.send([SessionStateMachine.keepaliveFrame(tag: .keepalive, timestamp: timestamp)])
            let event = try await s.nextEvent()
            let expected = ByteBuffer(frame: SessionStateMachine.keepaliveFrame(tag: .keepaliveAck, timestamp: timestamp))
            guard case .frame(let f) = event, ByteBuffer(frame: f) == expected else {
                var seen = event.summary
                if case .frame(let f) = event { seen = Array(ByteBuffer(frame: f).readableBytesView).hexString }
                throw fail(Array(expected.readableBytesView).hexString, seen)
            }
        },
        ConformanceCheck("R-7.12-2", "a KEEPALIVE of 7 bytes is refused (malformedPayload)") { c in
            try c.require(.keepalive, "keepalive")
            try await expectViolation(c, .malformedPayload, "a 7-byte KEEPALIVE") { _ in
                ByteBuffer(frame: Frame(tag: .keepalive, segments: [ByteBuffer(repeating: 1, count: 7)]))
            }
        },
        ConformanceCheck("R-7.12-3", "a KEEPALIVE without keepalive negotiated is refused (unexpectedFrame)") { c in
            var o = ClientOptions()
            o.supported.remove(.keepalive)
            try await expectViolation(c, options: o, .unexpectedFrame, "KEEPALIVE without keepalive") { _ in
                ByteBuffer(frame: SessionStateMachine.keepaliveFrame(tag: .keepalive, timestamp: 1))
            }
        },
        ConformanceCheck("R-7.13-1", "after the client's CLOSE nothing is processed: a request behind it gets no answer") { c in
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            var status = Parley_V1_Status()
            status.code = ParleyError.Code.connectionClosed.rawValue
            var b = ByteBuffer(frame: status.frame(tag: .close))
            b.writeFrame(s.message(kind: .request, id: 1, type: unknownType))
            try await s.peer.sendFrames(b)
            let drained = try await s.drainUntilClosed()
            if let f = drained.frames.first { throw fail("the connection closed, nothing sent back", describe(f)) }
            guard drained.closed else { throw fail("the connection closed", "the connection still open") }
        },
        ConformanceCheck("R-7.15-2", "256 requests of 64 KiB written in one burst are all answered") { c in
            try c.requireEcho()
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            // 64 KiB of payload, less if the server's limit is smaller (it may be 65536).
            var echo = Parley_Echo_V1_Echo()
            echo.payload = Data(repeating: 0x33, count: 64 * 1024)
            let over = s.nextMessageSize(kind: .request, id: 256, type: echoType, payload: echo.parleyPayload()) + 4 - c.serverLimit
            if over > 0 { echo.payload = Data(repeating: 0x33, count: 64 * 1024 - over) }
            let payload = echo.parleyPayload()
            var b = ByteBuffer()
            for n in UInt64(1)...256 { b.writeFrame(s.message(kind: .request, id: n, type: echoType, payload: payload)) }
            try await s.peer.sendFrames(b)
            for n in UInt64(1)...256 {
                let m = try await s.answer(n, timeout: c.timeout * 2)
                guard m.header.kind == .response, m.payload.readableBytes == payload.readableBytes else { throw fail("RESPONSE EchoReply to \(n)", describe(m)) }
            }
        },
        ConformanceCheck("R-9-1", "a KEEPALIVE with preamble byte 3 set is refused (protocolViolation)") { c in
            try await expectViolation(c, .protocolViolation, "preamble byte 3 = 0x80") { _ in
                rawFrame(tag: 0x12, byte3: 0x80, segments: [ByteBuffer(repeating: 0, count: 8)])
            }
        },
        ConformanceCheck("R-10-1", "the server's ERROR and CLOSE carry a specific code") { c in
            let s = try await ClientSession.open(context: c)
            defer { s.peer.close() }
            let answer = try await s.answer(try await s.request(unknownType, ByteBuffer()))
            guard let code = errorCode(answer), code != .unspecified else { throw fail("ERROR with a code other than 0", describe(answer)) }
            try await s.peer.sendFrames(ByteBuffer(frame: Frame(tag: FrameTag(rawValue: 0x31), segments: [ByteBuffer()])))
            let drained = try await s.drainUntilClosed()
            guard let close = drained.frames.last(where: { $0.tag == .close }) else {
                throw fail("CLOSE with a code other than 0 (tag 0x31 is unknown and critical)", drained.frames.last.map { describe($0) } ?? (drained.closed ? "the connection closed without CLOSE" : "nothing"))
            }
            if let status = try? Parley_V1_Status(parleyPayload: close.segments[0]), status.code == 0 {
                throw fail("CLOSE with a code other than 0", describe(close))
            }
        },
    ]
}

func describe(_ m: WireMessage) -> String {
    describe(m.frame(allocator: ByteBufferAllocator()))
}

extension Frame {
    /// The same MESSAGE frame with another seq.
    func withSeq(_ seq: UInt64) -> Frame {
        var f = self
        f.segments[0].setInteger(seq, at: f.segments[0].readerIndex, endianness: .little)
        return f
    }
}
