import NIOCore
import ParleyWire

/// Encodes what a side sends into the bytes on the wire.
func wireBytes(_ elements: [WireOutbound]) -> ByteBuffer {
    var out = ByteBuffer()
    for e in elements {
        switch e {
        case .banner(let b): out.writeBanner(b)
        case .frame(let f):
            var parts: [ByteBuffer] = []
            f.encode(into: &parts, allocator: ByteBufferAllocator())
            for var p in parts { out.writeBuffer(&p) }
        case .startSealing:
            preconditionFailure("wireBytes encodes crc mode only; secure tests use SecurePair")
        }
    }
    return out
}

/// Feeds bytes to a decoder in chunks of `chunk` bytes (0: all at once); returns what came out.
func decodeAll(_ bytes: ByteBuffer, decoder: inout WireDecoder, chunk: Int = 0) throws -> [WireInbound] {
    var out: [WireInbound] = []
    var pending = ByteBuffer()
    var input = bytes
    while input.readableBytes > 0 {
        var piece = input.readSlice(length: chunk == 0 ? input.readableBytes : min(chunk, input.readableBytes))!
        pending.writeBuffer(&piece)
        while let element = try decoder.decode(buffer: &pending) { out.append(element) }
    }
    return out
}

func decodeAll(_ bytes: ByteBuffer, chunk: Int = 0, maxFrameSize: Int = Frame.defaultMaxFrameSize) throws -> [WireInbound] {
    var decoder = WireDecoder(maxFrameSize: maxFrameSize)
    return try decodeAll(bytes, decoder: &decoder, chunk: chunk)
}

func buffer(_ bytes: [UInt8]) -> ByteBuffer { ByteBuffer(bytes: bytes) }

func buffer(_ string: String) -> ByteBuffer { ByteBuffer(string: string) }

func frameBytes(_ frame: Frame) -> ByteBuffer {
    var b = ByteBuffer()
    b.writeFrame(frame)
    return b
}

extension ParleyError {
    static func code(of body: () throws -> Void) -> ParleyError.Code? {
        do {
            try body()
            return nil
        } catch let e as ParleyError {
            return e.code
        } catch {
            return nil
        }
    }
}
