#define _GNU_SOURCE
#include "CParleySocket.h"
#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>

#ifndef SO_COOKIE
#define SO_COOKIE 57
#endif

uint64_t parley_socket_cookie(int fd) {
    uint64_t value = 0;
    socklen_t length = sizeof(value);
    if (getsockopt(fd, SOL_SOCKET, SO_COOKIE, &value, &length) != 0 || length != sizeof(value)) return 0;
    return value;
}

int parley_sockets_with_cookies(const uint64_t *cookies, int *fds, size_t count) {
    size_t missing = 0;
    for (size_t i = 0; i < count; i++) {
        fds[i] = -1;
        if (cookies[i] != 0) missing++;
    }
    DIR *dir = opendir("/proc/self/fd");
    if (dir == NULL) return -errno;
    struct dirent *entry;
    while (missing > 0 && (entry = readdir(dir)) != NULL) {
        char *end;
        long fd = strtol(entry->d_name, &end, 10);
        if (*end != '\0' || end == entry->d_name || fd < 0 || fd == dirfd(dir)) continue;
        uint64_t cookie = parley_socket_cookie((int)fd);
        if (cookie == 0) continue;
        for (size_t i = 0; i < count; i++) {
            if (cookies[i] == cookie && fds[i] < 0) {
                fds[i] = (int)fd;
                missing--;
                break;
            }
        }
    }
    closedir(dir);
    return 0;
}

int parley_socket_with_cookie(uint64_t cookie) {
    int fd = -1;
    return parley_sockets_with_cookies(&cookie, &fd, 1) == 0 ? fd : -1;
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
