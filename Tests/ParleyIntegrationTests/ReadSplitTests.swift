import NIOCore
import NIOEmbedded
@testable import ParleyNIO
import ParleyWire
import Testing

/// Frames arriving split across reads at every kind of place: inside a banner-sized run,
/// inside a preamble, inside a body, inside a tag, in one-byte reads and in large ones. The
/// connection handler gathers an unfinished frame across reads; in secure mode a body arriving
/// in pieces is opened as it comes. Whatever the cuts, every message arrives whole, in order,
/// with its bytes.
@Suite struct ReadSplitTests {
    /// Small messages, and messages whose data segment is larger than one read.
    static func messages() -> [WireMessage] {
        var out: [WireMessage] = []
        for i in 0..<60 {
            let id = UInt64(100 + i)
            let payload = ByteBuffer(bytes: (0..<(i * 7 % 150)).map { UInt8(truncatingIfNeeded: $0 &+ i) })
            var data = ByteBuffer()
            if i % 15 == 4 {
                let size = [70_000, 300_001, 1 << 20, 65_536][i / 15]
                data.writeBytes((0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) })
            }
            out.append(WireMessage(header: MessageHeader(id: id, kind: .request, type: "t.Split"), payload: payload, data: data.readableBytes > 0 ? data : nil))
        }
        return out
    }

    /// The client's bytes cut into reads of these sizes, in turn.
    static let cuts = [1, 5, 31, 32, 33, 47, 48, 49, 100, 17, 4096, 65_536, 2, 200_000, 63, 64, 65, 3]

    /// crc mode, and secure mode with each cipher (AES-256-GCM bodies are decrypted piece by
    /// piece, ChaCha20-Poly1305 ones gathered and opened whole).
    @Test(arguments: [(ConnectionMode.crc, SecureCipher.aes256GCM), (.secure, .aes256GCM), (.secure, .chacha20Poly1305)])
    func messagesCutAnywhereArriveWhole(mode: ConnectionMode, cipher: SecureCipher) throws {
        let (client, server, channels) = try FirstCallTests.run(mode: mode, ciphers: [cipher])
        try #require(client.result?.connectionMode == mode)
        if mode == .secure { try #require(client.result?.cipher == cipher) }
        let before = server.received.count
        let sent = Self.messages()
        for message in sent { client.outlet!.write(.message(message)) }
        var bytes = try #require(try ReadBurstFlushTests.take(channels.client))
        var reads = 0
        while bytes.readableBytes > 0 {
            let size = min(Self.cuts[reads % Self.cuts.count], bytes.readableBytes)
            // A read of its own buffer, as a socket read would give.
            let piece = ByteBuffer(bytes: bytes.readBytes(length: size)!)
            try ReadBurstFlushTests.burst(piece, into: channels.server)
            reads += 1
        }
        let received = Array(server.received.dropFirst(before))
        #expect(received.count == sent.count, "\(reads) reads")
        for (got, want) in zip(received, sent) {
            #expect(got.header.id == want.header.id)
            #expect(got.payload == want.payload, "payload of \(want.header.id)")
            #expect(got.data ?? ByteBuffer() == want.data ?? ByteBuffer(), "data of \(want.header.id) (\(want.data?.readableBytes ?? 0) bytes)")
        }
        // The answers, in one read, all arrive at the client.
        let answers = try #require(try ReadBurstFlushTests.take(channels.server))
        try ReadBurstFlushTests.burst(answers, into: channels.client)
        #expect(client.received.suffix(sent.count).map(\.header.id) == sent.map(\.header.id))
    }

    /// The decoder's size of its next step, by which the handler completes only the piece a
    /// read cut in crc mode: a preamble's 32 bytes, then the body's (segments and their
    /// CRCs), then a preamble again; none for the banner.
    @Test func bytesForNextStepFollowsThePreambleAndTheBody() throws {
        #expect(WireDecoder(expectBanner: true).bytesForNextStep == nil, "the banner has no step size")
        var decoder = WireDecoder(expectBanner: false)
        #expect(decoder.bytesForNextStep == Frame.preambleSize)
        let frame = Frame(tag: .message, segments: [ByteBuffer(bytes: [1, 2, 3]), ByteBuffer(bytes: [4, 5])])
        var bytes = ByteBuffer()
        bytes.writeFrame(frame)
        var preamble = bytes.readSlice(length: Frame.preambleSize)!
        #expect(try decoder.decode(buffer: &preamble) == nil)
        #expect(decoder.bytesForNextStep == 3 + 2 + 4 * 2, "the body: 5 segment bytes and two CRCs")
        #expect(decoder.bytesForNextStep == bytes.readableBytes)
        #expect(try decoder.decode(buffer: &bytes) == .frame(frame))
        #expect(decoder.bytesForNextStep == Frame.preambleSize)
    }
}
