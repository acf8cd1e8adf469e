import Foundation
import NIOCore
import SwiftProtobuf
import Testing

@testable import ParleyWire

private func message(_ id: UInt64, _ kind: MessageKind = .request, bytes: Int = 0) -> WireMessage {
    WireMessage(header: MessageHeader(id: id, kind: kind, type: "t"), payload: ByteBuffer(repeating: 1, count: bytes))
}

private func header(seq: UInt64, ack: UInt64) -> MessageHeader {
    MessageHeader(seq: seq, ack: ack, id: 1, kind: .oneWay, type: "t")
}

/// The ledger of a lossless session (docs/protocol.md 5.2): numbering, acks, replay, reset.
@Suite struct SessionLedgerTests {
    @Test func numbersKeepsAndTransmitsInOrderWithTheCurrentAck() {
        var ledger = SessionLedger()
        #expect(ledger.append(message(1)) == 1)
        #expect(ledger.append(message(2)) == 2)
        #expect(ledger.received(header(seq: 1, ack: 0)) == .deliver)
        let first = ledger.nextToTransmit()
        #expect(first?.header.seq == 1 && first?.header.ack == 1)
        #expect(ledger.received(header(seq: 2, ack: 1)) == .deliver)
        #expect(ledger.nextToTransmit()?.header.ack == 2)
        #expect(ledger.nextToTransmit() == nil)
        #expect(ledger.keptCount == 1 && ledger.everTransmittedSeq == 2, "the peer's ack 1 dropped seq 1")
        #expect(!ledger.needsAck)
    }

    /// [R-5.2-13] Past 16,384 kept messages sent without waiting for room (answers, one-way
    /// replies sent at once; or four times the count bound) a message from the peer ends the
    /// session; an ack that frees them ends the overrun. What this side sent by waiting for
    /// room does not count (many senders woken at once may overshoot the bound).
    @Test func aPeerThatNeverAcknowledgesOverrunsTheLimit() throws {
        #expect(SessionLedger.unacknowledgedLimit(.init()) == 16_384)
        #expect(SessionLedger.unacknowledgedLimit(.init(maxBytes: 1 << 20, maxMessages: 16)) == 16_384)
        #expect(SessionLedger.unacknowledgedLimit(.init(maxBytes: 1 << 20, maxMessages: 10_000)) == 40_000)
        // Huge bounds saturate instead of trapping (the bounds are public; `--replay-bytes` takes any Int).
        #expect(SessionLedger.unacknowledgedLimit(.init(maxBytes: 1 << 20, maxMessages: .max / 2)) == .max)
        #expect(SessionLedger.unacknowledgedByteLimit(.init(maxBytes: .max / 4, maxMessages: 16)) == .max)
        #expect(SessionLedger.unacknowledgedByteLimit(.init(maxBytes: 1 << 20, maxMessages: 16)) == 1 << 30)
        var ledger = SessionLedger()
        let bounds = SessionLedger.Bounds()
        for i in 1...16_384 { ledger.append(message(UInt64(i), .response), unwaited: true) }
        while ledger.nextToTransmit() != nil {}
        #expect(ledger.overrun(bounds) == nil, "at the limit")
        ledger.append(message(16_385, .response), unwaited: true)
        let error = try #require(ledger.overrun(bounds))
        #expect(error.code == .protocolViolation)
        #expect(error.message.contains("16385 answers unacknowledged") && error.message.contains("8192 requests"), "\(error.message)")
        _ = ledger.nextToTransmit()
        #expect(try ledger.acknowledge(10))
        #expect(ledger.overrun(bounds) == nil, "acknowledged: back under the limit")
        #expect(ledger.keptCount == 16_375 && ledger.keptUnwaited == 16_375)
        // One-way replies sent at once count too (a peer that sends one-way messages a
        // handler answers at once, and never acknowledges, made the other side keep every
        // reply); what was sent by waiting does not, however much of it there is.
        var oneWays = SessionLedger()
        for i in 1...20_000 { oneWays.append(message(UInt64(i), .request)) }
        for i in 1...16_384 { oneWays.append(message(UInt64(i), i % 2 == 0 ? .oneWay : .error), unwaited: true) }
        #expect(oneWays.overrun(bounds) == nil, "36,384 kept, 16,384 of them unwaited")
        oneWays.append(message(16_385, .oneWay), unwaited: true)
        #expect(oneWays.overrun(bounds) != nil, "one-way replies sent at once are kept as answers are")
        _ = oneWays.reset()
        #expect(oneWays.keptCount == 0 && oneWays.keptUnwaited == 0 && oneWays.overrun(bounds) == nil)
    }

    /// [R-5.2-13] Past 1 GiB of kept answers (or 128 times the byte bound) a message from the
    /// peer ends the session too, however few they are: 128 answers of 8 MiB (one buffer
    /// shared by all, so the test holds 8 MiB).
    @Test func aPeerThatNeverAcknowledgesLargeAnswersOverrunsTheByteLimit() throws {
        #expect(SessionLedger.unacknowledgedByteLimit(.init()) == 1 << 30)
        #expect(SessionLedger.unacknowledgedByteLimit(.init(maxBytes: 16 << 20, maxMessages: 16)) == 2 << 30)
        let data = ByteBuffer(repeating: 7, count: 8 << 20)
        func answer(_ id: UInt64, _ kind: MessageKind = .response) -> WireMessage {
            WireMessage(header: MessageHeader(id: id, kind: kind, type: "t"), payload: ByteBuffer(), data: data)
        }
        let size = (8 << 20) + MessageHeader.fixedSize + 1
        var ledger = SessionLedger()
        let bounds = SessionLedger.Bounds()
        for i in 1...127 { ledger.append(answer(UInt64(i)), unwaited: true) }
        ledger.append(message(128, .oneWay, bytes: 64 << 20))  // sent by waiting: not counted
        while ledger.nextToTransmit() != nil {}
        let (count, bytes) = (ledger.keptUnwaited, ledger.keptUnwaitedBytes)
        #expect(count == 127 && bytes == 127 * size)
        let under = ledger.overrun(bounds)
        #expect(under == nil, "127 answers of 8 MiB are under 1 GiB")
        ledger.append(answer(129, .error), unwaited: true)
        _ = ledger.nextToTransmit()
        let all = ledger.keptUnwaitedBytes
        #expect(all == 128 * size)
        // (Not `#require(ledger.overrun(...))`: a failure would print the ledger, 1 GiB of it.)
        let overrun = ledger.overrun(bounds)
        let error = try #require(overrun, "errors are answers: 128 x (8 MiB + header) > 1 GiB")
        #expect(error.code == .protocolViolation)
        #expect(error.message.contains("128 answers unacknowledged (\(128 * size) bytes)") && error.message.contains("1073741824 bytes"), "\(error.message)")
        #expect(try ledger.acknowledge(1))
        let acknowledged = ledger.overrun(bounds), left = ledger.keptUnwaitedBytes
        #expect(acknowledged == nil && left == 127 * size, "acknowledged: back under the limit")
        _ = ledger.reset()
        let afterReset = ledger.keptUnwaitedBytes
        #expect(afterReset == 0)
    }

    @Test func acksDropKeptMessagesAndFreeRoom() throws {
        var ledger = SessionLedger()
        let bounds = SessionLedger.Bounds(maxBytes: 1 << 20, maxMessages: 3)
        for i in 1...3 { ledger.append(message(UInt64(i), bytes: 10)) }
        #expect(ledger.isFull(bounds))
        while ledger.nextToTransmit() != nil {}
        #expect(try ledger.acknowledge(2))
        #expect(ledger.keptCount == 1 && !ledger.isFull(bounds))
        #expect(try !ledger.acknowledge(2), "the same ack again frees nothing")
        let byBytes = SessionLedger.Bounds(maxBytes: 40, maxMessages: 100)
        ledger.append(message(4, bytes: 10))
        #expect(ledger.isFull(byBytes), "two messages of 10 + 33 bytes reach 40 bytes")
    }

    @Test func refusesAcksThatGoBackOrCoverWhatWasNeverSent() throws {
        var ledger = SessionLedger()
        ledger.append(message(1))
        ledger.append(message(2))
        #expect(throws: ParleyError.self) { try ledger.acknowledge(1) }  // not transmitted yet
        _ = ledger.nextToTransmit()
        try ledger.acknowledge(1)
        #expect(throws: ParleyError.self) { try ledger.acknowledge(0) }
        #expect(ledger.received(header(seq: 1, ack: 2)) != .deliver, "ack 2 covers a message never transmitted")
    }

    @Test func refusesGapsAndRepeatsInReceivedSeqs() {
        var ledger = SessionLedger()
        #expect(ledger.received(header(seq: 2, ack: 0)) != .deliver)
        #expect(ledger.received(header(seq: 1, ack: 0)) == .deliver)
        #expect(ledger.received(header(seq: 1, ack: 0)) != .deliver)
        #expect(ledger.needsAck && ledger.unacknowledgedReceived == 1)
        #expect(ledger.ackTransmitted() == 1 && !ledger.needsAck)
    }

    @Test func resumeRetransmitsExactlyWhatThePeerLacks() throws {
        var ledger = SessionLedger()
        for i in 1...5 { ledger.append(message(UInt64(i))) }
        while ledger.nextToTransmit() != nil {}
        try ledger.acknowledge(1)
        // The connection broke; the peer says it got up to 3.
        try ledger.resume(peerLastReceived: 3)
        #expect(ledger.keptCount == 2)
        #expect(ledger.nextToTransmit()?.header.seq == 4)
        ledger.append(message(6))
        #expect(ledger.nextToTransmit()?.header.seq == 5)
        #expect(ledger.nextToTransmit()?.header.seq == 6)
        #expect(ledger.nextToTransmit() == nil)
        // A resume below an earlier ack (a racing attempt's stale snapshot) restarts after the
        // ack; one that claims more than was sent is refused.
        try ledger.resume(peerLastReceived: 2)
        #expect(ledger.transmittedSeq == 3 && ledger.nextToTransmit()?.header.seq == 4)
        #expect(throws: ParleyError.self) { try ledger.resume(peerLastReceived: 7) }
    }

    @Test func resetSplitsTransmittedFromUntransmittedAndRestartsNumbering() throws {
        var ledger = SessionLedger()
        for i in 1...4 { ledger.append(message(UInt64(i))) }
        _ = ledger.nextToTransmit()
        _ = ledger.nextToTransmit()
        try ledger.acknowledge(1)
        // A reconnect restarts transmission after 1: seq 2 was transmitted once and stays "transmitted".
        try ledger.resume(peerLastReceived: 1)
        let abandoned = ledger.reset()
        #expect(abandoned.transmitted.map(\.header.id) == [2])
        #expect(abandoned.untransmitted.map(\.header.id) == [3, 4])
        #expect(ledger.nextSeq == 1 && ledger.keptCount == 0 && ledger.lastReceivedSeq == 0)
    }
}

/// Prints the lossless-session vectors of docs/protocol.md section 5.2 from the
/// implementation (`PARLEY_PRINT_SESSION_VECTORS=1 swift test --filter printSessionVectors`);
/// the document tests then check the document against the implementation.
@Suite struct SessionVectorPrinter {
    @Test(.enabled(if: ProcessInfo.processInfo.environment["PARLEY_PRINT_SESSION_VECTORS"] != nil))
    func printSessionVectors() throws {
        func vector(_ name: String, tag: String, segments: [String], frame: Frame, session: String? = nil) {
            var out: [ByteBuffer] = []
            frame.encode(into: &out, allocator: ByteBufferAllocator())
            var bytes: [UInt8] = []
            for b in out { bytes += b.readableBytesView }
            print("```vector\nname: \(name)\nkind: frame\ntag: \(tag)\nflags: 0")
            for s in segments { print("segment: \(s)") }
            if let session { print("session: \(session)") }
            let lines = stride(from: 0, to: bytes.count, by: 16).map { "  " + bytes[$0..<min($0 + 16, bytes.count)].map { String(format: "%02x", $0) }.joined(separator: " ") }
            print("wire:\n" + lines.joined(separator: "\n") + "\n```\n")
        }
        func json(_ m: some SwiftProtobuf.Message) throws -> String { try m.jsonString() }
        let token = Data((0..<16).map { UInt8(0xa0 + $0) })
        var ident = Parley_V1_ServerIdent()
        ident.nucleus = Parley_V1_Nucleus()
        ident.implementation = "parley-swift"
        ident.version = "0.1.0"
        ident.name = "parley"
        ident.serverNonce = 81985529216486895
        ident.sessionToken = token
        vector("server-ident-lossless", tag: "0x08 SERVER_IDENT", segments: ["proto parley.v1.ServerIdent \(try json(ident))"], frame: ident.frame(tag: .serverIdent))
        var client = Parley_V1_ClientIdent()
        client.implementation = "parley-swift"
        client.version = "0.1.0"
        client.name = "parley-ping"
        var reconnect = Parley_V1_SessionReconnect()
        reconnect.ident = client
        reconnect.sessionToken = token
        reconnect.serverNonce = 81985529216486895
        reconnect.lastReceivedSeq = 41
        reconnect.connectSeq = 1
        vector("session-reconnect", tag: "0x09 SESSION_RECONNECT", segments: ["proto parley.v1.SessionReconnect \(try json(reconnect))"], frame: reconnect.frame(tag: .sessionReconnect))
        var resumed = Parley_V1_SessionResumed()
        resumed.ident = ident
        resumed.lastReceivedSeq = 17
        vector("session-resumed", tag: "0x0a SESSION_RESUMED", segments: ["proto parley.v1.SessionResumed \(try json(resumed))"], frame: resumed.frame(tag: .sessionResumed))
        var reset = Parley_V1_SessionReset()
        reset.reason = "the server restarted since the session began"
        vector("session-reset", tag: "0x0b SESSION_RESET", segments: ["proto parley.v1.SessionReset \(try json(reset))"], frame: reset.frame(tag: .sessionReset))
        vector("ack", tag: "0x15 ACK", segments: ["u64le 42"], frame: SessionStateMachine.ackFrame(42))
    }
}
