// Thin wrappers over Linux system calls the block server needs and that Swift's Glibc
// module does not expose (preadv2/pwritev2 flags, fallocate modes, block-device ioctls).
// Each returns 0 or a byte count on success and -errno on failure.
#ifndef CPARLEY_BLOCK_IO_H
#define CPARLEY_BLOCK_IO_H
#include <stdint.h>
#include <stddef.h>

/// preadv2 with RWF_NOWAIT when `nowait`: -EAGAIN when the data is not in the page cache.
int64_t parley_pread(int fd, void *buf, size_t len, int64_t offset, int nowait);
/// pwritev2; `nowait` adds RWF_NOWAIT, `dsync` RWF_DSYNC (the write is durable when it returns).
int64_t parley_pwrite(int fd, const void *buf, size_t len, int64_t offset, int nowait, int dsync);
/// Punches a hole (the range reads as zeroes, the file keeps its size).
int parley_punch_hole(int fd, int64_t offset, int64_t len);
/// FALLOC_FL_ZERO_RANGE|KEEP_SIZE: zeroes a range without writing it.
int parley_zero_range(int fd, int64_t offset, int64_t len);
/// lseek with SEEK_DATA (`data` != 0) or SEEK_HOLE. -ENXIO past the end.
int64_t parley_seek(int fd, int64_t offset, int data);
/// posix_fadvise(WILLNEED).
int parley_willneed(int fd, int64_t offset, int64_t len);
/// BLKGETSIZE64, BLKSSZGET and BLKPBSZGET of a block device.
int parley_block_device_geometry(int fd, uint64_t *size, uint32_t *logical, uint32_t *physical);
int parley_fdatasync(int fd);
/// Keeps freed blocks of up to `largest` bytes in the process instead of returning them to
/// the kernel (glibc: M_MMAP_THRESHOLD and M_TRIM_THRESHOLD). 0 on success, -1 where the C
/// library has no such setting.
int parley_keep_large_blocks(size_t largest, size_t retained);
/// How many times the calling thread has slept in the kernel (its voluntary context
/// switches, getrusage RUSAGE_THREAD), or -1. Being preempted does not count.
int64_t parley_thread_sleeps(void);
/// A burst of work on the calling thread during which it does not sleep on purpose (one
/// event-loop turn's reads): the thread's sleeps are read once, at the first
/// `parley_thread_sleeps_before`, not before every inline write. `parley_burst_end` ends it.
void parley_burst_begin(void);
void parley_burst_end(void);
/// Begins a burst if none is under way: 1 if it began one (the caller then ends it).
int parley_burst_join(void);
/// The thread's sleeps before an inline write at `now_ns` (monotonic): within a burst, the
/// count read at its first write if that was at most `valid_ns` ago (`*cached` 1); otherwise
/// read now (`*cached` 0; a burst older than that is over).
int64_t parley_thread_sleeps_before(int64_t now_ns, int64_t valid_ns, int *cached);
/// Drops the burst's reading: the next inline write reads the count afresh.
void parley_burst_forget(void);
/// 1 if every page of [offset, offset + len) is in the page cache and up to date (read in:
/// mincore(2) of a short-lived mapping), 0 if not, -errno if that cannot be told.
int parley_resident(int fd, uint64_t offset, uint64_t len);
/// The size of the file open as `fd` (fstat st_size), or -errno.
int64_t parley_file_size(int fd);
/// The file system type of `fd` (statfs f_type), or -errno.
int64_t parley_fs_type(int fd);
#endif
