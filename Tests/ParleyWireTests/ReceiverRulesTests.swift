import Foundation
import NIOCore
import ParleyWire
import ParleyServices
import SwiftProtobuf
import Testing

/// Receiver rules the document once left to "the reference implementation does X"
/// (docs/protocol.md, each rule named by its requirement id), now rules every receiver follows.
@Suite struct ReceiverRulesTests {
    private func session(_ features: ParleyFeatures = .implemented) -> SessionStateMachine {
        SessionStateMachine(role: .client, features: features)
    }

    /// [R-4.7-1] Segments after those a frame's table lists are ignored: a control frame is
    /// read from its segment 0, a MESSAGE from its first three.
    @Test func segmentsBeyondThoseListedAreIgnored() throws {
        var s = self.session()
        var keepalive = SessionStateMachine.keepaliveFrame(tag: .keepalive, timestamp: 5)
        keepalive.segments.append(ByteBuffer(bytes: [1, 2, 3]))
        guard case .reply(let ack) = s.received(.frame(keepalive)) else { Issue.record("KEEPALIVE with an extra segment not answered"); return }
        #expect(ack.segments[0].getInteger(at: 0, endianness: .little, as: UInt64.self) == 5)
        var frame = WireMessage(header: MessageHeader(seq: 1, id: 1, kind: .request, type: "t"), payload: ByteBuffer(bytes: [8, 1]), data: ByteBuffer(bytes: [9]))
            .frame(allocator: ByteBufferAllocator())
        frame.segments.append(ByteBuffer(bytes: [7, 7]))
        guard case .message(let m) = s.received(.frame(frame)) else { Issue.record("MESSAGE with a fourth segment refused"); return }
        #expect(m.data == ByteBuffer(bytes: [9]) && m.payload == ByteBuffer(bytes: [8, 1]))
    }

    /// [R-4.9-1] The flags of frames other than MESSAGE are ignored.
    @Test func flagsOfOtherFramesAreIgnored() {
        var s = self.session()
        var keepalive = SessionStateMachine.keepaliveFrame(tag: .keepalive, timestamp: 9)
        keepalive.flags = 0x80
        guard case .reply = s.received(.frame(keepalive)) else { Issue.record("KEEPALIVE with flags not answered"); return }
    }

    /// [R-4.8-2] A known frame in the wrong phase is `unexpectedFrame` whatever its payload:
    /// the phase is checked before the payload is decoded.
    @Test func theWrongPhaseIsCheckedBeforeThePayload() {
        var s = self.session()
        let garbage = Frame(tag: .hello, segments: [ByteBuffer(bytes: [0xFF, 0xFF, 0xFF])])
        guard case .violation(let e) = s.received(.frame(garbage)) else { Issue.record("HELLO in the session accepted"); return }
        #expect(e.code == .unexpectedFrame)
        var client = ClientHandshakeStateMachine(configuration: .init(
            banner: Banner(supported: .implemented), maxFrameSize: 1 << 20, ident: Parley_V1_ClientIdent(), serverAddress: "x"
        ))
        _ = client.start()
        _ = client.received(.banner(Banner(supported: .implemented)))
        let step = client.received(.frame(Frame(tag: .serverIdent, segments: [ByteBuffer(bytes: [0xFF, 0xFF])])))
        guard case .failed(let error)? = step.outcome else { Issue.record("SERVER_IDENT before HELLO accepted"); return }
        #expect(error.code == .unexpectedFrame)
    }

    /// [R-7.10-1] An empty data segment is present (three segments, the third empty), not
    /// absent, on the wire and after decoding.
    @Test func anEmptyDataSegmentIsPresent() throws {
        let m = WireMessage(header: MessageHeader(seq: 1, id: 1, kind: .request, type: "t"), payload: ByteBuffer(), data: ByteBuffer())
        let frame = m.frame(allocator: ByteBufferAllocator())
        #expect(frame.segments.count == 3 && frame.segments[2].readableBytes == 0)
        let back = try WireMessage(frame: frame)
        #expect(back.data != nil && back.data?.readableBytes == 0)
        let none = try WireMessage(frame: WireMessage(header: m.header, payload: ByteBuffer()).frame(allocator: ByteBufferAllocator()))
        #expect(none.data == nil)
    }

    /// [R-2-1] A varint of more than 10 bytes does not decode (`malformedPayload`); in a
    /// 10th byte the bits above the 64th are ignored, as mainstream protobuf libraries do
    /// (swift-protobuf here, Python's `protobuf`), and a 64-bit value wider than its field
    /// is truncated to the field (uint32 keeps the low 32 bits).
    @Test func aVarintOfMoreThanTenBytesIsMalformed() throws {
        let eleven = ByteBuffer(bytes: [0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01])
        #expect(throws: ParleyError.self) { _ = try Parley_Echo_V1_Ping(parleyPayload: eleven) }
        // Ten bytes whose value needs 70 bits: the bits above the 64th are dropped.
        let wide = ByteBuffer(bytes: [0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F])
        #expect(try Parley_Echo_V1_Ping(parleyPayload: wide).sequence == UInt64.max)
        #expect(try Parley_V1_Status(parleyPayload: wide).code == UInt32.max)
    }
}
