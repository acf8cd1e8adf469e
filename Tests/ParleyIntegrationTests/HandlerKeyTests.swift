import Foundation
import NIOCore
import Parley
import ParleyServices
import ParleyTestSupport
import ParleyWire
import Testing

/// Requests and one-way messages being handled are known apart: a peer that picks a request
/// id equal to the key a one-way message had (UInt64.max - seq) no longer has the one-way
/// message's entry overwrite the request's, which then ran untracked (no CANCEL, no cap on
/// handlers, no drain).
@Suite(.timeLimit(.minutes(2)))
struct HandlerKeyTests {
    @Test func aCancelReachesARequestWhoseIdMatchesAOneWaysSeq() async throws {
        let id = UInt64.max - 2  // a one-way message at seq 2 was filed under this
        var work = Parley_Echo_V1_Work()
        work.delayMs = 30_000
        var ping = Parley_Echo_V1_Ping()
        ping.sequence = 1
        let messages = [
            WireMessage(header: MessageHeader(id: id, kind: .request, type: Parley_Echo_V1_Work.protoMessageName), payload: work.parleyPayload()),
            WireMessage(header: MessageHeader(id: 0, kind: .oneWay, type: Parley_Echo_V1_Ping.protoMessageName), payload: ping.parleyPayload()),
            WireMessage(header: MessageHeader(id: id, kind: .cancel, type: ""), payload: ByteBuffer()),
        ]
        let bytes = clientSessionBytes(messages: messages)
        try await withServer(configure: { $0.limits.handlersOnEventLoop = false }) { server, addresses in
            let (reply, _) = try await RawPeer.connect(addresses[0]).exchange(bytes, seconds: 20, halfClose: false) { received in
                Self.answer(to: id, in: received) != nil
            }
            let answer = try #require(Self.answer(to: id, in: reply), "the cancelled request was never answered")
            #expect(answer.header.kind == .error)
            let status = try Parley_V1_Status(parleyPayload: answer.payload)
            #expect(ParleyError.Code(rawValue: status.code) == .cancelled, "\(status)")
        }
    }

    static func answer(to id: UInt64, in bytes: ByteBuffer) -> WireMessage? {
        var names = MessageTypeNames()
        for frame in frames(in: bytes) where frame.tag == .message {
            guard let m = try? WireMessage(frame: frame, names: &names) else { continue }
            if m.header.id == id, m.header.kind == .response || m.header.kind == .error { return m }
        }
        return nil
    }
}
