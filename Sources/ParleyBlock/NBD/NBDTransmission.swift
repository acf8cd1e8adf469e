import NIOCore

/// One NBD request header (28 bytes on the wire), with the payload of a write.
public struct NBDRequest: Sendable, Equatable {
    public var flags: UInt16
    public var type: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(flags: UInt16 = 0, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    public var command: NBD.Command? { NBD.Command(rawValue: self.type) }
    public var commandFlags: NBD.CommandFlags { NBD.CommandFlags(rawValue: self.flags) }

    public func write(to out: inout ByteBuffer) {
        out.writeInteger(NBD.requestMagic)
        out.writeInteger(self.flags)
        out.writeInteger(self.type)
        out.writeInteger(self.cookie)
        out.writeInteger(self.offset)
        out.writeInteger(self.length)
    }
}

/// Splits the transmission phase's client bytes into requests, sans-IO.
///
/// A write's payload comes out as a slice of the input buffer (no copy). A write announcing
/// more than `maximumWritePayload` bytes is not buffered: its header comes out with
/// `.oversizedWrite` and its payload is skipped as it arrives, so the server can answer
/// EINVAL and go on. A bad magic is fatal: the stream can no longer be framed.
public struct NBDRequestDecoder {
    public enum Item: Equatable {
        case request(NBDRequest, payload: ByteBuffer?)
        /// A write longer than the limit: answer it with an error; its payload is skipped.
        case oversizedWrite(NBDRequest)
    }

    public struct BadMagic: Error, Equatable, CustomStringConvertible {
        public var magic: UInt32
        public var description: String { "bad request magic 0x\(String(self.magic, radix: 16)) (expected 0x25609513)" }
    }

    public let maximumWritePayload: UInt32
    /// Payload bytes of an oversized write still to skip.
    public private(set) var skipping: UInt64 = 0

    public init(maximumWritePayload: UInt32) {
        self.maximumWritePayload = maximumWritePayload
    }

    /// The bytes the request at the front of `buffer` needs in all (header and write
    /// payload), when it is a write still missing part of its payload: the caller can make
    /// room for it once instead of growing its buffer with every read. Nil otherwise.
    public func bytesAwaited(in buffer: ByteBuffer) -> Int? {
        guard self.skipping == 0, buffer.readableBytes >= NBD.requestHeaderSize else { return nil }
        let i = buffer.readerIndex
        guard buffer.getInteger(at: i, as: UInt32.self) == NBD.requestMagic,
              buffer.getInteger(at: i + 6, as: UInt16.self) == NBD.Command.write.rawValue,
              let length = buffer.getInteger(at: i + 24, as: UInt32.self), length <= self.maximumWritePayload else { return nil }
        let total = NBD.requestHeaderSize + Int(length)
        return total > buffer.readableBytes ? total : nil
    }

    /// How many more bytes the request at the front of `buffer` needs before `next` can take
    /// it: the rest of its header, or of a write's payload; 0 when it is all there (or the
    /// front is not a request: `next` will say so). Nil while an oversized write's payload is
    /// being skipped. A caller whose buffer holds the start of a request cut by a read
    /// boundary can append just these bytes from the next read and take the rest of that
    /// read as it is, instead of appending all of it.
    public func bytesMissing(in buffer: ByteBuffer) -> Int? {
        guard self.skipping == 0 else { return nil }
        let readable = buffer.readableBytes
        if readable < NBD.requestHeaderSize { return NBD.requestHeaderSize - readable }
        return self.bytesAwaited(in: buffer).map { $0 - readable } ?? 0
    }

    /// Takes the header of a write of at least `minimum` bytes at the front of `buffer` whose
    /// payload has not all arrived, leaving `buffer` at the payload's first byte: the caller
    /// then collects the payload as the reads bring it, without copying it into one buffer.
    /// Nil (nothing taken) for anything else.
    public mutating func takeLargeWrite(_ buffer: inout ByteBuffer, minimum: Int) -> NBDRequest? {
        guard self.bytesAwaited(in: buffer) != nil else { return nil }
        let i = buffer.readerIndex
        let length = buffer.getInteger(at: i + 24, as: UInt32.self)!
        guard Int(length) >= minimum else { return nil }
        let request = NBDRequest(
            flags: buffer.getInteger(at: i + 4, as: UInt16.self)!, type: NBD.Command.write.rawValue,
            cookie: buffer.getInteger(at: i + 8, as: UInt64.self)!, offset: buffer.getInteger(at: i + 16, as: UInt64.self)!,
            length: length
        )
        buffer.moveReaderIndex(forwardBy: NBD.requestHeaderSize)
        return request
    }

    /// The next request, or nil when more bytes are needed.
    public mutating func next(_ buffer: inout ByteBuffer) throws(BadMagic) -> Item? {
        if self.skipping > 0 {
            let n = min(UInt64(buffer.readableBytes), self.skipping)
            buffer.moveReaderIndex(forwardBy: Int(n))
            self.skipping -= n
            if self.skipping > 0 { return nil }
        }
        guard buffer.readableBytes >= NBD.requestHeaderSize else { return nil }
        let i = buffer.readerIndex
        let magic = buffer.getInteger(at: i, as: UInt32.self)!
        guard magic == NBD.requestMagic else { throw BadMagic(magic: magic) }
        let request = NBDRequest(
            flags: buffer.getInteger(at: i + 4, as: UInt16.self)!, type: buffer.getInteger(at: i + 6, as: UInt16.self)!,
            cookie: buffer.getInteger(at: i + 8, as: UInt64.self)!, offset: buffer.getInteger(at: i + 16, as: UInt64.self)!,
            length: buffer.getInteger(at: i + 24, as: UInt32.self)!
        )
        guard request.type == NBD.Command.write.rawValue else {
            buffer.moveReaderIndex(forwardBy: NBD.requestHeaderSize)
            return .request(request, payload: nil)
        }
        if request.length > self.maximumWritePayload {
            buffer.moveReaderIndex(forwardBy: NBD.requestHeaderSize)
            self.skipping = UInt64(request.length)
            let n = min(UInt64(buffer.readableBytes), self.skipping)
            buffer.moveReaderIndex(forwardBy: Int(n))
            self.skipping -= n
            return .oversizedWrite(request)
        }
        guard buffer.readableBytes >= NBD.requestHeaderSize + Int(request.length) else { return nil }
        buffer.moveReaderIndex(forwardBy: NBD.requestHeaderSize)
        return .request(request, payload: buffer.readSlice(length: Int(request.length))!)
    }
}

/// What a validated request asks the storage to do.
public enum NBDOperation: Sendable, Equatable {
    case read(offset: UInt64, length: UInt32)
    case write(offset: UInt64, fua: Bool)
    case flush
    case trim(offset: UInt64, length: UInt32, fua: Bool)
    case writeZeroes(offset: UInt64, length: UInt32, fua: Bool, noHole: Bool, fastZero: Bool)
    case cache(offset: UInt64, length: UInt32)
    case blockStatus(offset: UInt64, length: UInt32, reqOne: Bool)
    case disconnect
}

/// A request that must be refused, with the error to send and why (for the log and, with
/// structured replies, the client).
public struct NBDRequestError: Error, Sendable, Equatable {
    public var errno: NBD.Errno
    public var message: String
    public init(_ errno: NBD.Errno, _ message: String) {
        self.errno = errno
        self.message = message
    }
}

extension NBDNegotiated {
    /// Checks a request against the negotiated export and options (sans-IO).
    public func validate(_ request: NBDRequest) -> Result<NBDOperation, NBDRequestError> {
        guard let command = request.command else {
            return .failure(.init(.inval, "unknown command \(request.type)"))
        }
        let flags = request.commandFlags
        if request.flags & ~NBD.CommandFlags.all.rawValue != 0 {
            return .failure(.init(.inval, "unknown command flags 0x\(String(request.flags, radix: 16))"))
        }
        let info = self.export
        let readOnly = info.flags.contains(.readOnly)
        func inRange() -> NBDRequestError? {
            let (end, overflow) = request.offset.addingReportingOverflow(UInt64(request.length))
            if overflow || end > info.size {
                // The NBD document: a write or write-zeroes past the end SHOULD be ENOSPC (the
                // device has no room there); anything else past the end is EINVAL.
                let error: NBD.Errno = command == .write || command == .writeZeroes ? .nospc : .inval
                return .init(error, "\(command) of \(request.length) bytes at offset \(request.offset) ends past the export's \(info.size) bytes")
            }
            return nil
        }
        func aligned() -> NBDRequestError? {
            let b = UInt64(info.minimumBlockSize)
            guard b > 1 else { return nil }
            if request.offset % b != 0 || UInt64(request.length) % b != 0 {
                return .init(.inval, "\(command) at offset \(request.offset), length \(request.length) is not aligned to the export's \(b)-byte blocks")
            }
            return nil
        }
        if flags.contains(.dontFragment) && (command != .read || !self.structuredReplies) {
            return .failure(.init(.inval, "NBD_CMD_FLAG_DF is only for reads with structured replies"))
        }
        if flags.contains(.reqOne) && command != .blockStatus {
            return .failure(.init(.inval, "NBD_CMD_FLAG_REQ_ONE is only for NBD_CMD_BLOCK_STATUS"))
        }
        if flags.contains(.noHole) && command != .writeZeroes {
            return .failure(.init(.inval, "NBD_CMD_FLAG_NO_HOLE is only for NBD_CMD_WRITE_ZEROES"))
        }
        if flags.contains(.fastZero) && command != .writeZeroes {
            return .failure(.init(.inval, "NBD_CMD_FLAG_FAST_ZERO is only for NBD_CMD_WRITE_ZEROES"))
        }
        let fua = flags.contains(.fua)
        switch command {
        case .read:
            if let e = inRange() ?? aligned() { return .failure(e) }
            if request.length > info.maximumPayload {
                return .failure(.init(.inval, "read of \(request.length) bytes is larger than the maximum \(info.maximumPayload)"))
            }
            return .success(.read(offset: request.offset, length: request.length))
        case .write:
            if readOnly { return .failure(.init(.perm, "write to a read-only export")) }
            if let e = inRange() ?? aligned() { return .failure(e) }
            return .success(.write(offset: request.offset, fua: fua))
        case .disconnect:
            return .success(.disconnect)
        case .flush:
            return .success(.flush)
        case .trim:
            if readOnly { return .failure(.init(.perm, "trim on a read-only export")) }
            if let e = inRange() ?? aligned() { return .failure(e) }
            return .success(.trim(offset: request.offset, length: request.length, fua: fua))
        case .writeZeroes:
            if readOnly { return .failure(.init(.perm, "write-zeroes on a read-only export")) }
            if let e = inRange() ?? aligned() { return .failure(e) }
            return .success(.writeZeroes(offset: request.offset, length: request.length, fua: fua,
                                         noHole: flags.contains(.noHole), fastZero: flags.contains(.fastZero)))
        case .cache:
            if let e = inRange() { return .failure(e) }
            return .success(.cache(offset: request.offset, length: request.length))
        case .blockStatus:
            guard self.baseAllocation else {
                return .failure(.init(.inval, "NBD_CMD_BLOCK_STATUS without a metadata context selected"))
            }
            if let e = inRange() { return .failure(e) }
            if request.length == 0 { return .failure(.init(.inval, "NBD_CMD_BLOCK_STATUS of length 0")) }
            return .success(.blockStatus(offset: request.offset, length: request.length, reqOne: flags.contains(.reqOne)))
        }
    }
}

/// Encoders of the server's transmission-phase replies.
public enum NBDReply {
    public static let simpleHeaderSize = 16
    public static let structuredHeaderSize = 20
    /// Header and offset of an NBD_REPLY_TYPE_OFFSET_DATA chunk.
    public static let offsetDataHeaderSize = 28

    public static func writeSimple(cookie: UInt64, error: NBD.Errno, into out: inout ByteBuffer) {
        out.writeInteger(NBD.simpleReplyMagic)
        out.writeInteger(error.rawValue)
        out.writeInteger(cookie)
    }

    public static func writeChunkHeader(cookie: UInt64, type: NBD.ReplyType, flags: UInt16, length: Int, into out: inout ByteBuffer) {
        out.writeInteger(NBD.structuredReplyMagic)
        out.writeInteger(flags)
        out.writeInteger(type.rawValue)
        out.writeInteger(cookie)
        out.writeInteger(UInt32(length))
    }

    /// The final NBD_REPLY_TYPE_NONE chunk of a successful command with no payload.
    public static func writeDone(cookie: UInt64, into out: inout ByteBuffer) {
        self.writeChunkHeader(cookie: cookie, type: .none, flags: NBD.replyFlagDone, length: 0, into: &out)
    }

    /// The header of a final OFFSET_DATA chunk: `length` data bytes follow it. A read of zero
    /// bytes is answered with a final NBD_REPLY_TYPE_NONE chunk instead: an OFFSET_DATA chunk
    /// carries at least one byte (its length is at least 9), and qemu drops a connection that
    /// sends a shorter one.
    public static func writeOffsetDataHeader(cookie: UInt64, offset: UInt64, length: Int, into out: inout ByteBuffer) {
        guard length > 0 else { return self.writeDone(cookie: cookie, into: &out) }
        self.writeChunkHeader(cookie: cookie, type: .offsetData, flags: NBD.replyFlagDone, length: 8 + length, into: &out)
        out.writeInteger(offset)
    }

    /// What comes before a successful read's data: an OFFSET_DATA chunk header with
    /// structured replies, else a simple reply.
    public static func writeReadHeader(cookie: UInt64, offset: UInt64, length: Int, structured: Bool, into out: inout ByteBuffer) {
        if structured {
            self.writeOffsetDataHeader(cookie: cookie, offset: offset, length: length, into: &out)
        } else {
            self.writeSimple(cookie: cookie, error: .ok, into: &out)
        }
    }

    public static func writeError(cookie: UInt64, error: NBD.Errno, message: String, into out: inout ByteBuffer) {
        let text = message.utf8.prefix(Int(UInt16.max / 4))  // short enough for its u16 length
        self.writeChunkHeader(cookie: cookie, type: .error, flags: NBD.replyFlagDone, length: 6 + text.count, into: &out)
        out.writeInteger(error.rawValue)
        out.writeInteger(UInt16(text.count))
        out.writeBytes(text)
    }

    /// A reply with no data: a structured NONE (or ERROR) chunk, or a simple reply.
    public static func write(cookie: UInt64, result: NBDRequestError?, structured: Bool, into out: inout ByteBuffer) {
        switch (result, structured) {
        case (nil, true): self.writeDone(cookie: cookie, into: &out)
        case (nil, false): self.writeSimple(cookie: cookie, error: .ok, into: &out)
        case (let e?, true): self.writeError(cookie: cookie, error: e.errno, message: e.message, into: &out)
        case (let e?, false): self.writeSimple(cookie: cookie, error: e.errno, into: &out)
        }
    }

    /// A final BLOCK_STATUS chunk for `base:allocation`.
    public static func writeBlockStatus(cookie: UInt64, extents: [BlockExtent], into out: inout ByteBuffer) {
        self.writeChunkHeader(cookie: cookie, type: .blockStatus, flags: NBD.replyFlagDone, length: 4 + 8 * extents.count, into: &out)
        out.writeInteger(NBD.baseAllocationID)
        for e in extents {
            out.writeInteger(e.length)
            out.writeInteger(e.isHole ? NBD.stateHole | NBD.stateZero : (e.isZero ? NBD.stateZero : 0))
        }
    }
}

/// A run of an export with one allocation state.
public struct BlockExtent: Sendable, Equatable {
    public var length: UInt32
    public var isHole: Bool
    public var isZero: Bool
    public init(length: UInt32, isHole: Bool, isZero: Bool = false) {
        self.length = length
        self.isHole = isHole
        self.isZero = isZero || isHole
    }
}
