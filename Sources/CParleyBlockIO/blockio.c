#define _GNU_SOURCE
#include "CParleyBlockIO.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <dirent.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <sys/resource.h>
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

#ifndef SO_COOKIE
#define SO_COOKIE 57
#endif

int parley_socket_with_cookie(uint64_t cookie) {
    DIR *dir = opendir("/proc/self/fd");
    if (dir == NULL) return -1;
    int found = -1;
    struct dirent *entry;
    while (found < 0 && (entry = readdir(dir)) != NULL) {
        char *end;
        long fd = strtol(entry->d_name, &end, 10);
        if (*end != '\0' || end == entry->d_name || fd < 0 || fd == dirfd(dir)) continue;
        uint64_t value = 0;
        socklen_t length = sizeof(value);
        if (getsockopt((int)fd, SOL_SOCKET, SO_COOKIE, &value, &length) == 0 && length == sizeof(value) && value == cookie) {
            found = (int)fd;
        }
    }
    closedir(dir);
    return found;
}

static uint64_t parley_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

int parley_await_bytes(int fd, uint64_t nanoseconds, uint64_t settle) {
    uint64_t start = parley_now_ns(), changed = 0;
    int seen = 0;
    for (;;) {
        int waiting = 0;
        if (ioctl(fd, FIONREAD, &waiting) != 0) return -errno;
        uint64_t now = parley_now_ns();
        if (waiting > seen) {
            seen = waiting;
            changed = now;
        }
        if (seen > 0 && now - changed >= settle) return 1;
        if (now - start >= nanoseconds) return seen > 0 ? 1 : 0;
    }
}
