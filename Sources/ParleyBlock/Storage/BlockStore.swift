import CParleyBlockIO
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import Synchronization
#if canImport(Glibc)
// stat and its fields: in a release build (whole module) another file's Foundation import
// makes them CoreFoundation's, and MemberImportVisibility wants that module named.
import CoreFoundation
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The shape of a device, as both protocols report it.
public struct BlockGeometry: Sendable, Equatable {
    public var size: UInt64
    public var logicalBlockSize: UInt32
    public var physicalBlockSize: UInt32
    public var isBlockDevice: Bool
    public var rotational: Bool
    public var writeCache: Bool
    /// Discard (hole punching) works on this device.
    public var discard: Bool
    public var discardGranularity: UInt32
    public var maximumDiscard: UInt32

    public init(size: UInt64, logicalBlockSize: UInt32 = 512, physicalBlockSize: UInt32 = 4096, isBlockDevice: Bool = false,
                rotational: Bool = false, writeCache: Bool = true, discard: Bool = true,
                discardGranularity: UInt32 = 4096, maximumDiscard: UInt32 = 1 << 30) {
        self.size = size
        self.logicalBlockSize = logicalBlockSize
        self.physicalBlockSize = physicalBlockSize
        self.isBlockDevice = isBlockDevice
        self.rotational = rotational
        self.writeCache = writeCache
        self.discard = discard
        self.discardGranularity = discardGranularity
        self.maximumDiscard = maximumDiscard
    }
}

/// A storage error: the system's errno and what was being done.
public struct BlockStoreError: Error, Sendable, Equatable, CustomStringConvertible {
    public var errno: Int32
    public var operation: String
    public init(errno: Int32, operation: String) {
        self.errno = errno
        self.operation = operation
    }
    public var description: String { "\(self.operation): \(String(cString: strerror(self.errno)))" }

    /// The NBD error value for this errno.
    public var nbd: NBD.Errno {
        switch self.errno {
        case EPERM, EROFS, EACCES: return .perm
        case ENOSPC, EDQUOT, EFBIG: return .nospc
        case EINVAL: return .inval
        case EOPNOTSUPP: return .notsup
        case ENOMEM: return .nomem
        default: return .io
        }
    }
}

/// Where a device's bytes live. Every call may block (except where `nowait` is passed and
/// honoured): the servers call it on their IO threads, or with `nowait` on an event loop.
public protocol BlockStore: Sendable {
    var geometry: BlockGeometry { get }
    /// Reads exactly `buffer.count` bytes at `offset` (zeroes past the end of a short file).
    /// With `nowait`, returns false instead of waiting for the disk (then all of it is to be
    /// read again; part may have been).
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, nowait: Bool) throws(BlockStoreError) -> Bool
    /// Writes all of `bytes` at `offset`; `durable` makes it reach stable storage before
    /// returning. With `nowait`, returns false instead of blocking (then all of it is to be
    /// written again: part may have been written).
    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64, durable: Bool, nowait: Bool) throws(BlockStoreError) -> Bool
    /// Writes `pieces` one after the other from `offset` (one large write arriving in several
    /// network reads), not durable; may block.
    func write(gathered pieces: [UnsafeRawBufferPointer], at offset: UInt64) throws(BlockStoreError)
    /// The same without blocking the caller (an event loop) where the store can tell: returns
    /// false, having written nothing, where the write must go to a thread that may block.
    func writeInline(gathered pieces: [UnsafeRawBufferPointer], at offset: UInt64) throws(BlockStoreError) -> Bool
    /// Makes every completed write durable.
    func flush() throws(BlockStoreError)
    /// Deallocates a range (it then reads as zeroes).
    func discard(offset: UInt64, length: UInt64) throws(BlockStoreError)
    /// Makes a range read as zeroes; `mayDeallocate` allows punching a hole. With `fast`
    /// (NBD_CMD_FLAG_FAST_ZERO) it never falls back to writing zeroes: EOPNOTSUPP instead.
    func writeZeroes(offset: UInt64, length: UInt64, mayDeallocate: Bool, fast: Bool) throws(BlockStoreError)
    /// Starts reading a range into the cache (advice; may do nothing).
    func prefetch(offset: UInt64, length: UInt64)
    /// The allocation of a range, from `offset`, covering at least one byte.
    func extents(offset: UInt64, length: UInt64) throws(BlockStoreError) -> [BlockExtent]
    func close()
}

extension BlockStore {
    /// A write of each piece in turn.
    public func write(gathered pieces: [UnsafeRawBufferPointer], at offset: UInt64) throws(BlockStoreError) {
        var at = offset
        for piece in pieces {
            _ = try self.write(piece, at: at, durable: false, nowait: false)
            at += UInt64(piece.count)
        }
    }

    /// Never inline: the caller hands the write to a thread that may block.
    public func writeInline(gathered pieces: [UnsafeRawBufferPointer], at offset: UInt64) throws(BlockStoreError) -> Bool { false }

    /// Write-zeroes that may fall back to writing zeroes.
    public func writeZeroes(offset: UInt64, length: UInt64, mayDeallocate: Bool) throws(BlockStoreError) {
        try self.writeZeroes(offset: offset, length: length, mayDeallocate: mayDeallocate, fast: false)
    }
}

/// A regular file (sparse where the file system allows) or a block device.
public final class FileBlockStore: BlockStore, @unchecked Sendable {
    // @unchecked: `fd` is set once in init and only read after; `closed` is guarded by the lock.
    public let path: String
    public let geometry: BlockGeometry
    public let writable: Bool
    private let fd: Int32
    private var closed = false
    private let lock = NIOLock()
    /// False once the file system has refused an RWF_NOWAIT write (ext4 before Linux 6.x
    /// does): later writes then go straight to the IO threads without trying.
    private let nowaitWrites = Atomic<Bool>(true)
    /// Where RWF_NOWAIT writes are refused: which plain writes are done inline all the same.
    public let inlineWrites: InlineWritePolicy
    /// Monotonic nanoseconds until which inline writes are paused (after a slow one).
    private let inlinePausedUntil = Atomic<Int64>(.min)
    private let inlinePauses = Atomic<Int>(0)
    /// How often a slow inline write has paused inline writes on this store; all stores'
    /// pauses are counted in `parley_block_inline_write_pauses_total` (swift-metrics).
    public var inlineWritePauses: Int { self.inlinePauses.load(ordering: .relaxed) }
    private static let pauseCounter = Counter(label: "parley_block_inline_write_pauses_total")
    private let inlinePreempted = Atomic<Int>(0)
    /// How many slow inline writes paused nothing because their thread never slept (it was
    /// preempted); all stores' in `parley_block_inline_write_preempted_total`.
    public var inlineWritesPreempted: Int { self.inlinePreempted.load(ordering: .relaxed) }
    private static let preemptedCounter = Counter(label: "parley_block_inline_write_preempted_total")
    /// The calling thread's sleeps in the kernel so far (`parley_thread_sleeps`), and before
    /// an inline write at a given time (within a burst, read once: `beginBurst`); tests pass
    /// their own count for both.
    private let threadSleeps: @Sendable () -> Int64
    private let threadSleepsBefore: @Sendable (Int64) -> (sleeps: Int64, cached: Bool)
    /// How long the sleeps read at a burst's first inline write stand for later ones: a
    /// burst that has not ended by then (its end was missed) reads them again. A burst
    /// lasts tens to hundreds of microseconds.
    static let burstSleepsValid: Int64 = 50_000_000

    /// Opens `path` read-only or read-write.
    public convenience init(path: String, writable: Bool, inlineWrites: InlineWritePolicy = InlineWritePolicy()) throws(BlockStoreError) {
        try self.init(path: path, writable: writable, inlineWrites: inlineWrites, threadSleeps: nil)
    }

    /// How many times the calling thread has slept in the kernel (voluntary context switches),
    /// or -1 where that cannot be read.
    static func threadSleeps() -> Int64 { parley_thread_sleeps() }

    /// The calling thread begins a burst of requests taken from one event-loop turn's reads,
    /// during which it does not sleep but in a blocked write: the inline writes in it read
    /// the thread's sleeps once, at the first one, instead of a `getrusage` before each
    /// (4.4% of the server's CPU at 4 KiB writes, queue depth 32: session 30 in
    /// docs/performance.md). How a slow write is judged then: `inline`. Ended by `endBurst`,
    /// by the next `beginBurst`, or once its reading is `burstSleepsValid` old.
    public static func beginBurst() { parley_burst_begin() }
    public static func endBurst() { parley_burst_end() }

    /// For a caller on `eventLoop` that does not see where the turn's reads end (a request
    /// handler behind Parley's API): begins a burst unless one is under way, ended by a
    /// task on the loop, which runs once the loop has handled this turn's IO and before it
    /// waits for more.
    public static func joinBurst(on eventLoop: any EventLoop) {
        guard eventLoop.inEventLoop, parley_burst_join() == 1 else { return }
        eventLoop.execute { parley_burst_end() }
    }

    /// The sleeps before an inline write starting at `now` (see `beginBurst`).
    static func threadSleepsBefore(now: Int64) -> Int64 { Self.sleepsBefore(now).sleeps }

    private static func sleepsBefore(_ now: Int64) -> (sleeps: Int64, cached: Bool) {
        var cached: CInt = 0
        let sleeps = parley_thread_sleeps_before(now, Self.burstSleepsValid, &cached)
        return (sleeps, cached != 0)
    }

    init(path: String, writable: Bool, inlineWrites: InlineWritePolicy, threadSleeps: (@Sendable () -> Int64)?) throws(BlockStoreError) {
        self.inlineWrites = inlineWrites
        if let threadSleeps {
            self.threadSleeps = threadSleeps
            self.threadSleepsBefore = { _ in (threadSleeps(), false) }
        } else {
            self.threadSleeps = Self.threadSleeps
            self.threadSleepsBefore = { Self.sleepsBefore($0) }
        }
        // O_NONBLOCK: opening a FIFO (or a device that waits for a carrier) read-only would
        // block until a writer came, and the caller holds the device table's lock on an
        // event loop. The type is checked below; the flag is cleared for what is kept.
        let fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else {
            let e = errno
            // A directory (EISDIR) or a socket (ENXIO) fails to open before its type is
            // checked: named as what it is, not as a storage failure.
            var st = stat()
            if stat(path, &st) == 0, st.st_mode & S_IFMT != S_IFREG, st.st_mode & S_IFMT != S_IFBLK {
                throw BlockStoreError(errno: EINVAL, operation: "\(path) is neither a regular file nor a block device")
            }
            throw BlockStoreError(errno: e, operation: "open \(path)")
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = errno
            Glibc.close(fd)
            throw BlockStoreError(errno: e, operation: "stat \(path)")
        }
        let kind = st.st_mode & S_IFMT
        if kind == S_IFBLK {
            var size: UInt64 = 0
            var logical: UInt32 = 0
            var physical: UInt32 = 0
            let r = parley_block_device_geometry(fd, &size, &logical, &physical)
            guard r == 0 else {
                Glibc.close(fd)
                throw BlockStoreError(errno: -r, operation: "block device geometry of \(path)")
            }
            self.geometry = BlockGeometry(size: size, logicalBlockSize: max(logical, 512), physicalBlockSize: max(physical, logical),
                                          isBlockDevice: true, rotational: Self.rotational(major: st.st_rdev), discard: true,
                                          discardGranularity: max(physical, 4096))
        } else if kind == S_IFREG {
            self.geometry = BlockGeometry(size: UInt64(st.st_size), logicalBlockSize: 512,
                                          physicalBlockSize: UInt32(clamping: max(st.st_blksize, 512)), discard: true,
                                          discardGranularity: UInt32(clamping: max(st.st_blksize, 512)))
        } else {
            Glibc.close(fd)
            throw BlockStoreError(errno: EINVAL, operation: "\(path) is neither a regular file nor a block device")
        }
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0, fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) == 0 else {
            let e = errno
            Glibc.close(fd)
            throw BlockStoreError(errno: e, operation: "fcntl \(path)")
        }
        self.fd = fd
        self.path = path
        self.writable = writable
    }

    /// For reads sent straight from the page cache to the socket (sendfile, `NBDServer`): a
    /// descriptor of its own on this file, for the caller to close; nil once closed, for a
    /// block device, and on file systems whose splice reads may wait other than for the disk
    /// (XFS takes the inode's lock behind writers; NFS and FUSE may ask their server): only
    /// ext2/3/4 and tmpfs.
    public func zeroCopyDescriptor() -> Int32? {
        guard !self.geometry.isBlockDevice, Self.zeroCopyFileSystems.contains(parley_fs_type(self.fd)) else { return nil }
        return self.lock.withLock { () -> Int32? in
            guard !self.closed else { return nil }
            let copy = dup(self.fd)
            guard copy >= 0 else { return nil }
            _ = fcntl(copy, F_SETFD, FD_CLOEXEC)
            return copy
        }
    }

    /// statfs f_type of ext2/3/4 and tmpfs.
    static let zeroCopyFileSystems: Set<Int64> = [0xEF53, 0x0102_1994]

    /// Whether every page of the range is in the page cache and read in, so that sending it
    /// cannot wait for the disk (mincore(2) of a short-lived mapping: a page still being read
    /// ahead is not counted, where cachestat(2) would count it); false where that cannot be
    /// told, and for a range that runs past the end of the file.
    public func isCached(offset: UInt64, length: Int) -> Bool {
        guard length > 0, offset + UInt64(length) <= self.geometry.size else { return false }
        return parley_resident(self.fd, offset, UInt64(length)) == 1
    }

    private static func rotational(major rdev: UInt) -> Bool {
        let major = (rdev >> 8) & 0xfff
        let minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00)
        guard let f = fopen("/sys/dev/block/\(major):\(minor)/queue/rotational", "r") else { return false }
        defer { fclose(f) }
        return fgetc(f) == 0x31  // "1"
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, nowait: Bool) throws(BlockStoreError) -> Bool {
        var done = 0
        while done < buffer.count {
            let n = parley_pread(self.fd, buffer.baseAddress! + done, buffer.count - done, Int64(offset) + Int64(done), nowait ? 1 : 0)
            if n == -Int64(EAGAIN) || (n == -Int64(EOPNOTSUPP) && nowait) {
                // Part may be read (the start of the range was cached): the caller reads it all
                // again on an IO thread, cheaply from the cache, rather than this thread
                // waiting for the disk for the rest.
                return false
            }
            if n < 0 { throw BlockStoreError(errno: Int32(-n), operation: "read \(buffer.count) bytes at \(offset)") }
            if n == 0 {
                // Past the end of a file that shrank: the rest reads as zeroes.
                (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done)
                return true
            }
            done += Int(n)
        }
        return true
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64, durable: Bool, nowait: Bool) throws(BlockStoreError) -> Bool {
        if nowait, !self.nowaitWrites.load(ordering: .relaxed) {
            // The file system cannot say "would block": a small whole-page write is done
            // plainly (it copies into the page cache) unless inline writes were slow lately.
            guard !durable else { return false }
            return try self.inline(offset: offset, length: bytes.count) { () throws(BlockStoreError) in
                _ = try self.write(bytes, at: offset, durable: false, nowait: false)
            }
        }
        var done = 0
        while done < bytes.count {
            let n = parley_pwrite(self.fd, bytes.baseAddress! + done, bytes.count - done, Int64(offset) + Int64(done),
                                  nowait ? 1 : 0, durable ? 1 : 0)
            if nowait, n == -Int64(EAGAIN) || n == -Int64(EOPNOTSUPP) {
                if n == -Int64(EOPNOTSUPP) { self.nowaitWrites.store(false, ordering: .relaxed) }
                // Part may be written: the caller writes it all again on an IO thread (the
                // same bytes at the same place) rather than this thread waiting for the rest.
                return false
            }
            if n < 0 { throw BlockStoreError(errno: Int32(-n), operation: "write \(bytes.count) bytes at \(offset)") }
            done += Int(n)
        }
        return true
    }

    /// A gathered write done on the caller's thread when `inlineWrites` allows its total
    /// length, whether or not the file system takes RWF_NOWAIT (a partial non-blocking write
    /// of several buffers would leave the rest to an IO thread anyway); a slow one pauses
    /// inline writes as a single one does.
    public func writeInline(gathered pieces: [UnsafeRawBufferPointer], at offset: UInt64) throws(BlockStoreError) -> Bool {
        try self.inline(offset: offset, length: pieces.reduce(0) { $0 + $1.count }) { () throws(BlockStoreError) in
            try self.write(gathered: pieces, at: offset)
        }
    }

    /// Runs `write` here if `inlineWrites` takes `length` bytes at `offset` now (else false,
    /// nothing written); one slower than the policy's bound during which the thread slept
    /// pauses inline writes (counted), one only preempted is counted apart. Within a burst
    /// the count before the write may have been read at an earlier write: a slow write that
    /// then finds it changed is not judged (the thread may have slept between the two
    /// writes, not in this one), and the next inline write reads the count afresh.
    private func inline(offset: UInt64, length: Int, _ write: () throws(BlockStoreError) -> Void) throws(BlockStoreError) -> Bool {
        let now = Self.monotonicNanoseconds()
        guard self.inlineWrites.allows(offset: offset, length: length, now: now,
                                       pausedUntil: self.inlinePausedUntil.load(ordering: .relaxed)) else { return false }
        let (sleeps, cached) = self.threadSleepsBefore(now)
        try write()
        let end = Self.monotonicNanoseconds()
        guard self.inlineWrites.isSlow(end - now) else { return true }
        // Unknown (-1) counts as slept: pause, as before the count was read.
        let after = self.threadSleeps()
        let slept = sleeps < 0 || after != sleeps
        if slept, cached {
            parley_burst_forget()
            return true
        }
        if let until = self.inlineWrites.pause(after: end - now, slept: slept, at: end) {
            self.inlinePausedUntil.store(until, ordering: .relaxed)
            self.inlinePauses.add(1, ordering: .relaxed)
            Self.pauseCounter.increment()
        } else {
            self.inlinePreempted.add(1, ordering: .relaxed)
            Self.preemptedCounter.increment()
        }
        return true
    }

    /// One pwritev for up to IOV_MAX pieces: one hold of the inode's lock for the whole write
    /// (a pwrite per piece took it once each, and the IO threads writing a file at queue depth 8
    /// spun on it: rwsem_spin_on_owner was 8% of the server's 1 MiB sequential-write profile).
    public func write(gathered pieces: [UnsafeRawBufferPointer], at offset: UInt64) throws(BlockStoreError) {
        var vectors = pieces.filter { $0.count > 0 }.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
        var done = 0
        var first = 0
        while first < vectors.count {
            let count = min(vectors.count - first, 1024)
            let n = vectors.withUnsafeBufferPointer { pwritev(self.fd, $0.baseAddress! + first, Int32(count), off_t(offset) + off_t(done)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw BlockStoreError(errno: errno, operation: "write \(pieces.reduce(0) { $0 + $1.count }) bytes at \(offset)")
            }
            done += Int(n)
            // Past what was written: whole vectors dropped, a partly written one advanced.
            var left = Int(n)
            while first < vectors.count, left >= vectors[first].iov_len {
                left -= vectors[first].iov_len
                first += 1
            }
            if left > 0 {
                vectors[first].iov_base += left
                vectors[first].iov_len -= left
            }
        }
    }

    private static func monotonicNanoseconds() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }

    public func flush() throws(BlockStoreError) {
        let r = parley_fdatasync(self.fd)
        if r < 0 { throw BlockStoreError(errno: -r, operation: "fdatasync") }
    }

    public func discard(offset: UInt64, length: UInt64) throws(BlockStoreError) {
        guard length > 0 else { return }
        let r = parley_punch_hole(self.fd, Int64(offset), Int64(length))
        if r < 0 { throw BlockStoreError(errno: -r, operation: "punch hole of \(length) bytes at \(offset)") }
    }

    public func writeZeroes(offset: UInt64, length: UInt64, mayDeallocate: Bool, fast: Bool) throws(BlockStoreError) {
        guard length > 0 else { return }
        if mayDeallocate, parley_punch_hole(self.fd, Int64(offset), Int64(length)) == 0 { return }
        if parley_zero_range(self.fd, Int64(offset), Int64(length)) == 0 { return }
        if fast { throw BlockStoreError(errno: EOPNOTSUPP, operation: "fast zero of \(length) bytes at \(offset)") }
        // The file system cannot do it: write zeroes, a megabyte at a time.
        let chunk = 1 << 20
        let zeroes = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { zeroes.deallocate() }
        zeroes.initializeMemory(as: UInt8.self, repeating: 0)
        var at = offset
        let end = offset + length
        while at < end {
            let n = Int(min(UInt64(chunk), end - at))
            _ = try self.write(UnsafeRawBufferPointer(rebasing: zeroes[..<n]), at: at, durable: false, nowait: false)
            at += UInt64(n)
        }
    }

    public func prefetch(offset: UInt64, length: UInt64) {
        _ = parley_willneed(self.fd, Int64(offset), Int64(length))
    }

    public func extents(offset: UInt64, length: UInt64) throws(BlockStoreError) -> [BlockExtent] {
        let size = self.geometry.size
        guard offset < size else { return [] }
        let end = min(size, offset + length)
        var result: [BlockExtent] = []
        var at = offset
        // At most 1024 extents per answer; the client asks again from where it stops.
        while at < end, result.count < 1024 {
            let data = parley_seek(self.fd, Int64(at), 1)
            if data == -Int64(ENXIO) {  // only a hole up to the end
                result.append(contentsOf: Self.split(end - at, hole: true))
                break
            }
            if data < 0 {
                if data == -Int64(EINVAL) || data == -Int64(EOPNOTSUPP) {  // no SEEK_DATA: all data
                    result.append(contentsOf: Self.split(end - at, hole: false))
                    break
                }
                throw BlockStoreError(errno: Int32(-data), operation: "SEEK_DATA at \(at)")
            }
            if UInt64(data) > at {
                result.append(contentsOf: Self.split(min(UInt64(data), end) - at, hole: true))
                at = UInt64(data)
                continue
            }
            let hole = parley_seek(self.fd, Int64(at), 0)
            if hole < 0 { throw BlockStoreError(errno: Int32(-hole), operation: "SEEK_HOLE at \(at)") }
            let stop = min(UInt64(hole), end)
            result.append(contentsOf: Self.split(stop - at, hole: false))
            at = stop
        }
        return result
    }

    /// One run as extents of at most 4 GiB - 512 bytes each (the field is 32 bits).
    static func split(_ length: UInt64, hole: Bool) -> [BlockExtent] {
        var out: [BlockExtent] = []
        var left = length
        let most = UInt64(UInt32.max) & ~511
        while left > 0 {
            let n = min(left, most)
            out.append(BlockExtent(length: UInt32(n), isHole: hole))
            left -= n
        }
        return out
    }

    public func close() {
        let shouldClose = self.lock.withLock { () -> Bool in
            if self.closed { return false }
            self.closed = true
            return true
        }
        if shouldClose { Glibc.close(self.fd) }
    }

    deinit { self.close() }
}
