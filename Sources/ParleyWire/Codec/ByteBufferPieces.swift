import NIOCore

/// Bytes held as one buffer or as several, in order: a large write's payload as the reads
/// that brought it, or a large DIRECT segment as the reads it arrived in. Holding them so
/// copies nothing; `gathered` copies them into one buffer when there are several. One buffer
/// (all small IO) is held without an array, so that wrapping it allocates nothing.
public struct ByteBufferPieces: Sendable, Hashable {
    @usableFromInline
    enum Storage: Sendable, Hashable {
        case one(ByteBuffer)
        /// Two or more buffers, none empty.
        case several([ByteBuffer], total: Int)
    }
    @usableFromInline
    var storage: Storage

    @inlinable
    public init(_ buffer: ByteBuffer) {
        self.storage = .one(buffer)
    }

    /// The buffers in order; empty ones are dropped, and one (or none) is held as `init(_:)`.
    public init(_ buffers: some Sequence<ByteBuffer>) {
        var kept: [ByteBuffer] = []
        var total = 0
        for b in buffers where b.readableBytes > 0 {
            kept.append(b)
            total += b.readableBytes
        }
        switch kept.count {
        case 0: self.storage = .one(ByteBuffer())
        case 1: self.storage = .one(kept[0])
        default: self.storage = .several(kept, total: total)
        }
    }

    /// The number of readable bytes of all the pieces together.
    @inlinable
    public var readableBytes: Int {
        switch self.storage {
        case .one(let b): return b.readableBytes
        case .several(_, let total): return total
        }
    }

    /// The number of buffers (1 for empty bytes).
    @inlinable
    public var pieceCount: Int {
        switch self.storage {
        case .one: return 1
        case .several(let pieces, _): return pieces.count
        }
    }

    /// The buffers, in order.
    public var pieces: [ByteBuffer] {
        switch self.storage {
        case .one(let b): return [b]
        case .several(let pieces, _): return pieces
        }
    }

    /// The only buffer, when there is one: nil when the bytes are in several.
    @inlinable
    public var single: ByteBuffer? {
        if case .one(let b) = self.storage { return b }
        return nil
    }

    /// The bytes in one buffer: the buffer itself when there is one, else a copy of all of
    /// them in a new buffer from `allocator`.
    public func gathered(allocator: ByteBufferAllocator = ByteBufferAllocator()) -> ByteBuffer {
        switch self.storage {
        case .one(let b):
            return b
        case .several(let pieces, let total):
            var out = allocator.buffer(capacity: total)
            for p in pieces { out.writeImmutableBuffer(p) }
            return out
        }
    }

    /// `length` bytes from `offset` (counted from the first readable byte), as slices of the
    /// pieces: nothing copied. Traps when the range is outside the bytes.
    public func slice(at offset: Int, length: Int) -> ByteBufferPieces {
        precondition(offset >= 0 && length >= 0 && offset + length <= self.readableBytes, "slice outside the bytes")
        switch self.storage {
        case .one(let b):
            return ByteBufferPieces(b.getSlice(at: b.readerIndex + offset, length: length)!)
        case .several(let pieces, _):
            var out: [ByteBuffer] = []
            var skip = offset, left = length
            for p in pieces where left > 0 {
                let n = p.readableBytes
                if skip >= n {
                    skip -= n
                    continue
                }
                let take = min(n - skip, left)
                out.append(p.getSlice(at: p.readerIndex + skip, length: take)!)
                skip = 0
                left -= take
            }
            return ByteBufferPieces(out)
        }
    }

    /// CRC-32C of all the bytes, chained across the pieces (`continuing` for a CRC begun
    /// elsewhere).
    public func crc32c(continuing crc: UInt32 = 0) -> UInt32 {
        switch self.storage {
        case .one(let b):
            return b.withUnsafeReadableBytes { CRC32C.checksum($0, continuing: crc) }
        case .several(let pieces, _):
            var crc = crc
            for p in pieces { crc = p.withUnsafeReadableBytes { CRC32C.checksum($0, continuing: crc) } }
            return crc
        }
    }

    /// Pieces per batch of `forEachBatch`: a `pwritev` takes at most 1,024, and each piece
    /// of a batch is one nested `withUnsafeReadableBytes` (a stack frame) while it runs.
    public static let batchSize = 64

    /// Calls `body` with the readable bytes of the pieces, `batchSize` at a time, in order,
    /// and how many bytes the batches before held (where this one starts); the pointers are
    /// valid only inside `body`. For vectored and gathered writes (`pwritev`).
    public func forEachBatch<E: Error>(_ body: ([UnsafeRawBufferPointer], _ skipped: Int) throws(E) -> Void) throws(E) {
        switch self.storage {
        case .one(let b):
            var failure: E?
            b.withUnsafeReadableBytes { raw in
                do throws(E) { try body([raw], 0) } catch { failure = error }
            }
            if let failure { throw failure }
        case .several(let pieces, _):
            var skipped = 0
            var next = 0
            while next < pieces.count {
                let batch = pieces[next..<min(next + Self.batchSize, pieces.count)]
                var pointers: [UnsafeRawBufferPointer] = []
                pointers.reserveCapacity(batch.count)
                try Self.withEach(batch, &pointers) { (pointers) throws(E) in try body(pointers, skipped) }
                skipped += batch.reduce(0) { $0 + $1.readableBytes }
                next += batch.count
            }
        }
    }

    private static func withEach<E: Error>(_ rest: ArraySlice<ByteBuffer>, _ pointers: inout [UnsafeRawBufferPointer],
                                           _ body: ([UnsafeRawBufferPointer]) throws(E) -> Void) throws(E) {
        guard let first = rest.first else { return try body(pointers) }
        var failure: E?
        first.withUnsafeReadableBytes { raw in
            pointers.append(raw)
            do throws(E) {
                try Self.withEach(rest.dropFirst(), &pointers, body)
            } catch {
                failure = error
            }
        }
        if let failure { throw failure }
    }

    /// Equal bytes, however they are cut.
    public static func == (l: Self, r: Self) -> Bool {
        guard l.readableBytes == r.readableBytes else { return false }
        if let a = l.single, let b = r.single { return a == b }
        return l.gathered() == r.gathered()
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(self.gathered())
    }
}

/// The bytes of one large payload collected as reads bring them (a DIRECT frame's body, an
/// NBD write's payload): slices of the reads where a slice is worth keeping, else copied into
/// buffers of the collector's own of up to 64 KiB, so that a payload trickled in a few bytes
/// per read holds one buffer per 64 KiB, not one per read, and whose capacity together stays
/// within twice what was copied into them and 64 KiB: a peer alternating reads worth keeping
/// with one-byte reads gets no 64 KiB buffer per byte.
public struct ReadPieceCollector: Sendable {
    public private(set) var pieces: [ByteBuffer] = []
    /// Bytes taken so far.
    public private(set) var count = 0
    /// The last piece is a buffer of the collector's own, which may have room left.
    private var lastIsOwn = false
    /// Bytes copied into buffers of the collector's own, and those buffers' capacity.
    private var ownBytes = 0
    private var ownCapacity = 0
    private let minimumSlice: Int
    private let halfTheBuffer: Bool

    /// - Parameters:
    ///   - minimumSlice: slices shorter than this are copied.
    ///   - halfTheBuffer: slices holding less than half of their read's buffer are copied
    ///     too, so that what is kept pins at most about twice what arrived (a peer's bytes
    ///     before it is known to be good); without it a slice of a full read is kept
    ///     whatever else the read holds (a client's pipelined writes, whose other parts are
    ///     kept as well).
    public init(minimumSlice: Int, halfTheBuffer: Bool) {
        self.minimumSlice = minimumSlice
        self.halfTheBuffer = halfTheBuffer
    }

    /// Takes all of `piece`'s readable bytes; `missing` more are expected after them (sizes a
    /// buffer of its own).
    public mutating func take(_ piece: inout ByteBuffer, missing: Int, allocator: ByteBufferAllocator) {
        let n = piece.readableBytes
        guard n > 0 else { return }
        self.count += n
        if n >= self.minimumSlice, !self.halfTheBuffer || n * 2 >= piece.storageCapacity {
            self.pieces.append(piece)
            piece.moveReaderIndex(forwardBy: n)
            self.lastIsOwn = false
        } else if self.lastIsOwn, self.pieces[self.pieces.count - 1].writableBytes >= n {
            self.pieces[self.pieces.count - 1].writeBuffer(&piece)
            self.ownBytes += n
        } else {
            self.ownBytes += n
            // Room for what is still missing, up to 64 KiB a buffer, as far as the capacity
            // of all own buffers stays within twice the bytes copied into them and 64 KiB.
            // NIO rounds a capacity up to a power of two: what is wanted is asked for where
            // that rounded up is allowed, else the largest power of two allowed (or n, which
            // rounds up to less than 2n).
            let budget = 2 * self.ownBytes + (64 << 10) - self.ownCapacity - n
            let limit = n + max(0, min((64 << 10) - n, budget))
            let wanted = min(limit, n + missing)
            let roundedUp = 1 << (Int.bitWidth - (wanted - 1).leadingZeroBitCount)
            let capacity = roundedUp <= limit ? wanted : max(n, 1 << (Int.bitWidth - 1 - limit.leadingZeroBitCount))
            var own = allocator.buffer(capacity: capacity)
            self.ownCapacity += own.capacity
            own.writeBuffer(&piece)
            self.pieces.append(own)
            self.lastIsOwn = true
        }
    }
}
