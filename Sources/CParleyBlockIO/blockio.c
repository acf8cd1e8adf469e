#define _GNU_SOURCE
#include "CParleyBlockIO.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif
#ifndef RWF_DSYNC
#define RWF_DSYNC 0x00000002
#endif

int64_t parley_pread(int fd, void *buf, size_t len, int64_t offset, int nowait) {
    struct iovec iov = {buf, len};
    ssize_t n;
    do {
        n = preadv2(fd, &iov, 1, offset, nowait ? RWF_NOWAIT : 0);
    } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

int64_t parley_pwrite(int fd, const void *buf, size_t len, int64_t offset, int nowait, int dsync) {
    struct iovec iov = {(void *)buf, len};
    int flags = (nowait ? RWF_NOWAIT : 0) | (dsync ? RWF_DSYNC : 0);
    ssize_t n;
    do {
        n = pwritev2(fd, &iov, 1, offset, flags);
    } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

int parley_punch_hole(int fd, int64_t offset, int64_t len) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len) < 0 ? -errno : 0;
}

int parley_zero_range(int fd, int64_t offset, int64_t len) {
    return fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, len) < 0 ? -errno : 0;
}

int64_t parley_seek(int fd, int64_t offset, int data) {
    off_t r = lseek(fd, offset, data ? SEEK_DATA : SEEK_HOLE);
    return r < 0 ? -errno : r;
}

int parley_willneed(int fd, int64_t offset, int64_t len) {
    return -posix_fadvise(fd, offset, len, POSIX_FADV_WILLNEED);
}

int parley_block_device_geometry(int fd, uint64_t *size, uint32_t *logical, uint32_t *physical) {
    int l = 0;
    unsigned int p = 0;
    if (ioctl(fd, BLKGETSIZE64, size) < 0) return -errno;
    if (ioctl(fd, BLKSSZGET, &l) < 0) return -errno;
    if (ioctl(fd, BLKPBSZGET, &p) < 0) return -errno;
    *logical = (uint32_t)l;
    *physical = (uint32_t)p;
    return 0;
}

int parley_fdatasync(int fd) {
    int r;
    do {
        r = fdatasync(fd);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int parley_keep_large_blocks(size_t largest, size_t retained) {
#if defined(__GLIBC__)
    // Without this, glibc serves every block above 128 KiB (or above the largest freed so
    // far) with mmap or returns the top of the heap with madvise when it is freed: each
    // 1 MiB reply costs a system call and 256 page faults on fresh, zeroed pages.
    if (mallopt(M_MMAP_THRESHOLD, (int)largest) != 1) return -1;
    if (mallopt(M_TRIM_THRESHOLD, (int)retained) != 1) return -1;
    return 0;
#else
    (void)largest;
    (void)retained;
    return -1;
#endif
}

int64_t parley_thread_sleeps(void) {
    struct rusage usage;
    if (getrusage(RUSAGE_THREAD, &usage) != 0) return -1;
    return (int64_t)usage.ru_nvcsw;
}

// The calling thread's burst: 0 none, 1 begun and not yet read, 2 read (burst_sleeps, at
// burst_read_ns).
static __thread int burst_state = 0;
static __thread int64_t burst_sleeps = 0;
static __thread int64_t burst_read_ns = 0;

void parley_burst_begin(void) { burst_state = 1; }

int parley_burst_join(void) {
    if (burst_state != 0) return 0;
    burst_state = 1;
    return 1;
}

void parley_burst_end(void) { burst_state = 0; }

int64_t parley_thread_sleeps_before(int64_t now_ns, int64_t valid_ns, int *cached) {
    *cached = 0;
    if (burst_state == 2) {
        if (now_ns - burst_read_ns <= valid_ns) {
            *cached = 1;
            return burst_sleeps;
        }
        burst_state = 0;  // a burst whose end was missed (its connection closed in the read): over
    }
    int64_t sleeps = parley_thread_sleeps();
    if (burst_state == 1 && sleeps >= 0) {
        burst_state = 2;
        burst_sleeps = sleeps;
        burst_read_ns = now_ns;
    }
    return sleeps;
}

void parley_burst_forget(void) {
    if (burst_state == 2) burst_state = 1;
}

// Pages present but still being read in (read-ahead under way) count as cached for
// cachestat(2); mincore(2) reports only pages that are up to date, so that sending them
// cannot wait for the disk.
int parley_resident(int fd, uint64_t offset, uint64_t len) {
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0 || len == 0) return -EINVAL;
    uint64_t start = offset - offset % (uint64_t)page;
    size_t span = (size_t)(offset + len - start);
    void *map = mmap(NULL, span, PROT_READ, MAP_SHARED, fd, (off_t)start);
    if (map == MAP_FAILED) return -errno;
    size_t pages = (span + (size_t)page - 1) / (size_t)page;
    unsigned char small[512];
    unsigned char *vec = pages <= sizeof small ? small : malloc(pages);
    int result = -ENOMEM;
    if (vec != NULL) {
        if (mincore(map, span, vec) != 0) {
            result = -errno;
        } else {
            result = 1;
            for (size_t i = 0; i < pages; i++) {
                if (!(vec[i] & 1)) { result = 0; break; }
            }
        }
        if (vec != small) free(vec);
    }
    munmap(map, span);
    return result;
}

int64_t parley_file_size(int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0) return -errno;
    return (int64_t)st.st_size;
}

int64_t parley_fs_type(int fd) {
    struct statfs st;
    if (fstatfs(fd, &st) != 0) return -errno;
    return (int64_t)(unsigned long)st.f_type;
}
