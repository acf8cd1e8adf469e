import Dispatch
import NIOConcurrencyHelpers
import NIOCore
import Parley
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A `BlockStore` whose bytes live on a remote device reached over a multipath session: what
/// lets `parley block map` serve a remote device on a local NBD endpoint with the NBD server.
/// The NBD server hands it its IO through `start` (`CompletingBlockStore`), which holds no
/// thread while the remote answers; the synchronous calls block their thread until the
/// multipath device answers (`nowait` calls return false at once).
public final class MultipathBlockStore: CompletingBlockStore {
    public let device: BlockMultipathDevice
    public let geometry: BlockGeometry
    /// The remote's largest IO: longer reads and writes go as several IOs at once.
    let maxIO: Int
    /// How many bytes a write of zeroes (a write-zeroes that must not deallocate) takes at
    /// once: 1 MiB in whole blocks; 0 when a block is larger (no such write then).
    let zeroPiece: Int

    public init(device: BlockMultipathDevice) {
        self.device = device
        let g = device.geometry
        let block = max(512, g.logicalBlockSize)
        self.maxIO = Self.largestIO(maxIoSize: g.maxIoSize, blockSize: block)
        self.zeroPiece = block > 1 << 20 ? 0 : min(self.maxIO, (1 << 20) / Int(block) * Int(block))
        self.geometry = BlockGeometry(
            size: g.sizeBytes, logicalBlockSize: max(512, g.logicalBlockSize), physicalBlockSize: max(g.physicalBlockSize, g.logicalBlockSize),
            // A block device, so that NBD advertises the remote block size as the minimum:
            // the remote refuses IO not aligned to it.
            isBlockDevice: true, rotational: g.rotational, writeCache: g.writeCache,
            discard: g.discardGranularity > 0, discardGranularity: max(g.discardGranularity, g.logicalBlockSize),
            maximumDiscard: g.maxDiscardSize
        )
    }

    /// The longest piece of a longer IO: the remote's largest, cut to a whole number of
    /// blocks (a piece must stay aligned), at least one block.
    static func largestIO(maxIoSize: UInt32, blockSize: UInt32) -> Int {
        Int(max(blockSize, maxIoSize / blockSize * blockSize))
    }

    static func storeError(_ what: String, _ e: BlockMultipathError) -> BlockStoreError {
        BlockStoreError(errno: e.errno, operation: "\(what): \(e.message)")
    }

    public func start(_ request: BlockStoreRequest, done: @escaping @Sendable (Result<ByteBufferPieces?, BlockStoreError>) -> Void) {
        let device = self.device
        switch request {
        case .read(let offset, let length):
            guard Int(length) > self.maxIO else {
                device.submit(.init(.read, offset: offset, length: UInt64(length)), dataPieces: nil) { done($0.mapError { Self.storeError("read", $0) }) }
                return
            }
            // Longer than the remote's largest IO: several reads at once, their answers
            // joined in order (as pieces: nothing copied).
            let count = Int(length), maxIO = self.maxIO
            let parts = (count + maxIO - 1) / maxIO
            let gather = NIOLockedValueBox<([ByteBufferPieces?], Int, BlockStoreError?)>((Array(repeating: nil, count: parts), parts, nil))
            for (part, start) in stride(from: 0, to: count, by: maxIO).enumerated() {
                let n = min(maxIO, count - start)
                device.submit(.init(.read, offset: offset + UInt64(start), length: UInt64(n)), dataPieces: nil) { result in
                    let finished = gather.withLockedValue { g -> Result<ByteBufferPieces?, BlockStoreError>? in
                        switch result {
                        case .success(let data?) where data.readableBytes == n: g.0[part] = data
                        case .success: g.2 = g.2 ?? BlockStoreError(errno: EIO, operation: "read: short answer")
                        case .failure(let e): g.2 = g.2 ?? Self.storeError("read", e)
                        }
                        g.1 -= 1
                        guard g.1 == 0 else { return nil }
                        return g.2.map { .failure($0) } ?? .success(ByteBufferPieces(g.0.flatMap { $0!.pieces }))
                    }
                    if let finished { done(finished) }
                }
            }
        case .write(let offset, let data, let fua):
            guard data.readableBytes > self.maxIO else {
                device.submit(.init(.write, offset: offset, length: UInt64(data.readableBytes)), fua: fua, dataPieces: data) {
                    done($0.mapError { Self.storeError("write", $0) })
                }
                return
            }
            let count = data.readableBytes, maxIO = self.maxIO
            let left = NIOLockedValueBox<(Int, BlockStoreError?)>(((count + maxIO - 1) / maxIO, nil))
            for start in stride(from: 0, to: count, by: maxIO) {
                let piece = data.slice(at: start, length: min(maxIO, count - start))
                device.submit(.init(.write, offset: offset + UInt64(start), length: UInt64(piece.readableBytes)), fua: fua, dataPieces: piece) { result in
                    let finished = left.withLockedValue { l -> Result<ByteBufferPieces?, BlockStoreError>? in
                        if case .failure(let e) = result { l.1 = l.1 ?? Self.storeError("write", e) }
                        l.0 -= 1
                        guard l.0 == 0 else { return nil }
                        return l.1.map { .failure($0) } ?? .success(nil)
                    }
                    if let finished { done(finished) }
                }
            }
        case .flush:
            device.submit(.init(.flush, offset: 0, length: 0), dataPieces: nil) { done($0.mapError { Self.storeError("flush", $0) }) }
        case .discard(let offset, let length, let fua):
            device.submit(.init(.discard, offset: offset, length: UInt64(length)), fua: fua, dataPieces: nil) { done($0.mapError { Self.storeError("discard", $0) }) }
        case .writeZeroes(let offset, let length, let fua, let fast, let noHole):
            // The block protocol has no "fast zero": say so, and the client writes zeroes itself.
            if fast {
                done(.failure(BlockStoreError(errno: EOPNOTSUPP, operation: "fast write-zeroes")))
                return
            }
            // The block protocol's write-zeroes may deallocate (docs/protocol.md 17.2): a
            // range that must stay allocated gets zeroes written.
            if noHole {
                self.writeZeroesAllocated(offset: offset, length: UInt64(length), fua: fua, done: done)
                return
            }
            device.submit(.init(.writeZeroes, offset: offset, length: UInt64(length)), fua: fua, dataPieces: nil) {
                done($0.mapError { Self.storeError("write-zeroes", $0) })
            }
        }
    }

    /// Zeroes in writes of `zeroPiece` bytes, one after the other (a long range would
    /// otherwise fill every path's queue at once), then one flush if `fua`; `done` after
    /// that, or at the first failure.
    private func writeZeroesAllocated(offset: UInt64, length: UInt64, fua: Bool,
                                      done: @escaping @Sendable (Result<ByteBufferPieces?, BlockStoreError>) -> Void) {
        guard self.zeroPiece > 0 else {
            return done(.failure(BlockStoreError(errno: EOPNOTSUPP, operation: "write-zeroes without deallocating (the remote's blocks are over 1 MiB)")))
        }
        let zeroes = ByteBuffer(repeating: 0, count: Int(min(UInt64(self.zeroPiece), length)))
        self.writeZeroes(zeroes, offset: offset, length: length, fua: fua, done: done)
    }

    private func writeZeroes(_ zeroes: ByteBuffer, offset: UInt64, length: UInt64, fua: Bool,
                             done: @escaping @Sendable (Result<ByteBufferPieces?, BlockStoreError>) -> Void) {
        guard length > 0 else {
            guard fua else { return done(.success(nil)) }
            return self.device.submit(.init(.flush, offset: 0, length: 0), dataPieces: nil) { done($0.mapError { Self.storeError("flush", $0) }) }
        }
        let n = Int(min(UInt64(zeroes.readableBytes), length))
        let piece = ByteBufferPieces(zeroes.getSlice(at: zeroes.readerIndex, length: n)!)
        self.device.submit(.init(.write, offset: offset, length: UInt64(n)), dataPieces: piece) { result in
            switch result {
            case .failure(let e): done(.failure(Self.storeError("write-zeroes (written as zeroes)", e)))
            case .success: self.writeZeroes(zeroes, offset: offset + UInt64(n), length: length - UInt64(n), fua: fua, done: done)
            }
        }
    }

    /// Runs `body` as a task and waits for it on this thread.
    private func wait<T: Sendable>(_ what: String, _ body: @escaping @Sendable () async throws -> T) throws(BlockStoreError) -> T {
        let box = NIOLockedValueBox<Result<T, any Error>?>(nil)
        let done = DispatchSemaphore(value: 0)
        Task {
            let r: Result<T, any Error>
            do { r = .success(try await body()) } catch { r = .failure(error) }
            box.withLockedValue { $0 = r }
            done.signal()
        }
        done.wait()
        switch box.withLockedValue({ $0 })! {
        case .success(let v): return v
        case .failure(let e as BlockMultipathError): throw BlockStoreError(errno: e.errno, operation: "\(what): \(e.message)")
        case .failure(let e): throw BlockStoreError(errno: EIO, operation: "\(what): \(e)")
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, nowait: Bool) throws(BlockStoreError) -> Bool {
        if nowait { return false }
        let device = self.device
        let count = buffer.count
        let maxIO = self.maxIO
        let pieces = try self.wait("read") {
            try await withThrowingTaskGroup(of: (Int, ByteBuffer).self) { group in
                for start in stride(from: 0, to: count, by: maxIO) {
                    let n = min(maxIO, count - start)
                    group.addTask { (start, try await device.read(offset: offset + UInt64(start), length: UInt32(n))) }
                }
                var all: [(Int, ByteBuffer)] = []
                for try await piece in group { all.append(piece) }
                return all
            }
        }
        for (start, data) in pieces {
            let want = min(maxIO, count - start)
            data.withUnsafeReadableBytes { src in
                let n = min(src.count, want)
                if n > 0 { (buffer.baseAddress! + start).copyMemory(from: src.baseAddress!, byteCount: n) }
                if n < want { (buffer.baseAddress! + start + n).initializeMemory(as: UInt8.self, repeating: 0, count: want - n) }
            }
        }
        return true
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64, durable: Bool, nowait: Bool) throws(BlockStoreError) -> Bool {
        if nowait { return false }
        let device = self.device
        let data = ByteBuffer(bytes: bytes)
        let maxIO = self.maxIO
        try self.wait("write") {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for start in stride(from: 0, to: data.readableBytes, by: maxIO) {
                    let piece = data.getSlice(at: start, length: min(maxIO, data.readableBytes - start))!
                    group.addTask { try await device.write(offset: offset + UInt64(start), data: piece, fua: durable) }
                }
                try await group.waitForAll()
            }
        }
        return true
    }

    public func flush() throws(BlockStoreError) {
        let device = self.device
        try self.wait("flush") { try await device.flush() }
    }

    public func discard(offset: UInt64, length: UInt64) throws(BlockStoreError) {
        guard let length = UInt32(exactly: length) else { throw BlockStoreError(errno: EINVAL, operation: "discard of \(length) bytes (at most 4 GiB at once)") }
        let device = self.device
        try self.wait("discard") { try await device.discard(offset: offset, length: length) }
    }

    public func writeZeroes(offset: UInt64, length: UInt64, mayDeallocate: Bool, fast: Bool) throws(BlockStoreError) {
        // The block protocol has no "fast zero": say so, and the client writes zeroes itself.
        if fast { throw BlockStoreError(errno: EOPNOTSUPP, operation: "fast write-zeroes") }
        guard let length = UInt32(exactly: length) else { throw BlockStoreError(errno: EINVAL, operation: "write-zeroes of \(length) bytes (at most 4 GiB at once)") }
        let device = self.device
        if mayDeallocate {
            try self.wait("write-zeroes") { try await device.writeZeroes(offset: offset, length: length) }
            return
        }
        try self.wait("write-zeroes") {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
                self.writeZeroesAllocated(offset: offset, length: UInt64(length), fua: false) { c.resume(with: $0.map { _ in () }) }
            }
        }
    }

    public func prefetch(offset: UInt64, length: UInt64) {}

    public func extents(offset: UInt64, length: UInt64) throws(BlockStoreError) -> [BlockExtent] {
        [BlockExtent(length: UInt32(clamping: min(length, UInt64(UInt32.max))), isHole: false)]
    }

    /// The device is closed by whoever opened it (`parley block map` on unmap or exit).
    public func close() {}
}
