import NIOCore
import Parley

/// One storage operation handed to a `CompletingBlockStore`.
public enum BlockStoreRequest: Sendable {
    case read(offset: UInt64, length: UInt32)
    /// `data`: the bytes to write, in one buffer or as the reads that brought them.
    case write(offset: UInt64, data: ByteBufferPieces, fua: Bool)
    case flush
    case discard(offset: UInt64, length: UInt32, fua: Bool)
    /// `noHole`: the range must stay allocated (NBD's NO_HOLE), not be deallocated.
    case writeZeroes(offset: UInt64, length: UInt32, fua: Bool, fast: Bool, noHole: Bool)
}

/// A store whose operations complete later, elsewhere (a remote device): the NBD server
/// hands it reads, writes, flushes, discards and write-zeroes without holding an IO thread
/// for each, and answers each one when its completion runs. Its synchronous `BlockStore`
/// calls remain for everything else.
public protocol CompletingBlockStore: BlockStore {
    /// Starts `request`; `done` runs once, on any thread: the bytes read (exactly the
    /// length asked for, in one buffer or several) for a read, nil otherwise, or the error.
    func start(_ request: BlockStoreRequest, done: @escaping @Sendable (Result<ByteBufferPieces?, BlockStoreError>) -> Void)
}
