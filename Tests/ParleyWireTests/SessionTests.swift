import NIOCore
import ParleyWire
import Testing

@Suite struct SessionTests {
    func message(seq: UInt64, kind: MessageKind = .request, data: ByteBuffer? = nil) -> WireInbound {
        .frame(WireMessage(header: MessageHeader(seq: seq, ack: 0, id: seq, kind: kind, type: "t"), payload: ByteBuffer(), data: data)
            .frame(allocator: ByteBufferAllocator()))
    }

    @Test func outboundSeqAndAck() throws {
        var s = SessionStateMachine(role: .client, features: .implemented)
        _ = s.received(self.message(seq: 1))
        _ = s.received(self.message(seq: 2))
        let m = WireMessage(header: MessageHeader(id: 5, kind: .request, type: "x"), payload: ByteBuffer())
        let f1 = try s.frame(for: m, allocator: ByteBufferAllocator())
        let f2 = try s.frame(for: m, allocator: ByteBufferAllocator())
        let h1 = try WireMessage(frame: f1).header
        let h2 = try WireMessage(frame: f2).header
        #expect(h1.seq == 1 && h1.ack == 2)
        #expect(h2.seq == 2 && h2.ack == 2)
    }

    @Test func inboundSeqMustBeInOrder() {
        var s = SessionStateMachine(role: .server, features: .implemented)
        guard case .message = s.received(self.message(seq: 1)) else { Issue.record("message expected"); return }
        guard case .violation(let e) = s.received(self.message(seq: 3)) else { Issue.record("violation expected"); return }
        #expect(e.message.contains("expected 2"))
        #expect(s.isClosed)
        #expect(s.received(self.message(seq: 2)) == .ignore, "closed machine refuses everything")
    }

    @Test func streamKindsNeedTheStreamsFeature() {
        var s = SessionStateMachine(role: .server, features: [.notice])
        guard case .violation = s.received(self.message(seq: 1, kind: .cancel)) else { Issue.record("violation expected"); return }
        var t = SessionStateMachine(role: .server, features: [.notice])
        guard case .violation = t.received(self.message(seq: 1, kind: .streamItem)) else { Issue.record("violation expected"); return }
    }

    @Test func dataSegmentNeedsItsFeature() {
        var s = SessionStateMachine(role: .server, features: [.streams])
        guard case .violation = s.received(self.message(seq: 1, data: ByteBuffer(bytes: [1]))) else { Issue.record("violation expected"); return }
        var t = SessionStateMachine(role: .server, features: .implemented)
        guard case .message(let m) = t.received(self.message(seq: 1, data: ByteBuffer(bytes: [1]))) else { Issue.record("message expected"); return }
        #expect(m.data == ByteBuffer(bytes: [1]))
    }

    @Test func unknownKindAndFlagsAreViolations() {
        var s = SessionStateMachine(role: .server, features: .implemented)
        guard case .violation = s.received(self.message(seq: 1, kind: MessageKind(rawValue: 9))) else { Issue.record("violation expected"); return }
        var t = SessionStateMachine(role: .server, features: .implemented)
        var f = WireMessage(header: MessageHeader(seq: 1, id: 1, kind: .request, type: "t"), payload: ByteBuffer()).frame(allocator: ByteBufferAllocator())
        f.flags = 1
        guard case .violation = t.received(.frame(f)) else { Issue.record("violation expected"); return }
    }

    @Test func keepaliveIsAnswered() {
        var s = SessionStateMachine(role: .server, features: .implemented)
        #expect(s.received(.frame(SessionStateMachine.keepaliveFrame(tag: .keepalive, timestamp: 42))) == .reply(SessionStateMachine.keepaliveFrame(tag: .keepaliveAck, timestamp: 42)))
        #expect(s.received(.frame(SessionStateMachine.keepaliveFrame(tag: .keepaliveAck, timestamp: 9))) == .keepaliveAck(9))
        guard case .violation = s.received(.frame(Frame(tag: .keepalive, segments: [ByteBuffer(bytes: [1, 2])]))) else { Issue.record("violation expected"); return }
        var n = SessionStateMachine(role: .server, features: [.streams])
        guard case .violation = n.received(.frame(SessionStateMachine.keepaliveFrame(tag: .keepalive, timestamp: 1))) else { Issue.record("violation expected"); return }
    }

    @Test func noticeOnlyToClients() {
        var notice = Parley_V1_Notice()
        notice.nucleus.requestDelaySeconds = 3
        var c = SessionStateMachine(role: .client, features: .implemented)
        #expect(c.received(.frame(notice.frame(tag: .notice))) == .notice(notice.nucleus))
        var s = SessionStateMachine(role: .server, features: .implemented)
        guard case .violation(let e) = s.received(.frame(notice.frame(tag: .notice))) else { Issue.record("violation expected"); return }
        #expect(e.code == .unexpectedFrame)
    }

    @Test func strayFrames() {
        var s = SessionStateMachine(role: .client, features: .implemented)
        #expect(s.received(.frame(Frame(tag: FrameTag(rawValue: 0xEE), segments: [ByteBuffer()]))) == .ignore)
        guard case .violation(let e) = s.received(.frame(Parley_V1_Hello().frame(tag: .hello))) else { Issue.record("violation expected"); return }
        #expect(e.code == .unexpectedFrame)
        var t = SessionStateMachine(role: .client, features: .implemented)
        guard case .violation(let u) = t.received(.frame(Frame(tag: FrameTag(rawValue: 0x30), segments: [ByteBuffer()]))) else { Issue.record("violation expected"); return }
        #expect(u.code == .unknownFrameTag)
        var v = SessionStateMachine(role: .client, features: .implemented)
        guard case .violation = v.received(.banner(Banner(supported: []))) else { Issue.record("violation expected"); return }
    }

    @Test func peerClose() {
        var s = SessionStateMachine(role: .client, features: .implemented)
        let status = ParleyError(code: .shuttingDown, message: "bye").status
        #expect(s.received(.frame(status.frame(tag: .close))) == .peerClosed(ParleyError(code: .shuttingDown, message: "peer closed the connection: bye")))
        #expect(s.isClosed)
    }

    @Test func outboundRefusesWhatThePeerWouldReject() {
        var s = SessionStateMachine(role: .server, features: [.notice], maxPeerFrameSize: 100)
        let cancel = WireMessage(header: MessageHeader(id: 1, kind: .cancel, type: ""), payload: ByteBuffer())
        #expect(ParleyError.code { _ = try s.frame(for: cancel, allocator: ByteBufferAllocator()) } == .invalidArgument)
        let withData = WireMessage(header: MessageHeader(id: 1, kind: .request, type: "t"), payload: ByteBuffer(), data: ByteBuffer(bytes: [1]))
        #expect(ParleyError.code { _ = try s.frame(for: withData, allocator: ByteBufferAllocator()) } == .invalidArgument)
        let big = WireMessage(header: MessageHeader(id: 1, kind: .request, type: "t"), payload: ByteBuffer(repeating: 0, count: 68))
        #expect(ParleyError.code { _ = try s.frame(for: big, allocator: ByteBufferAllocator()) } == .frameTooLarge)
        let fits = WireMessage(header: MessageHeader(id: 1, kind: .request, type: "t"), payload: ByteBuffer(repeating: 0, count: 67))
        #expect((try? s.frame(for: fits, allocator: ByteBufferAllocator())) != nil)
        #expect(s.nextSeq == 2, "refused messages use no seq")
        let client = SessionStateMachine(role: .client, features: .implemented)
        #expect(ParleyError.code { try client.mayControl(.notice) } == .invalidArgument)
        #expect(ParleyError.code { try s.mayControl(.keepalive) } == .invalidArgument)
        #expect(ParleyError.code { try s.mayControl(.notice) } == nil)
    }
}
