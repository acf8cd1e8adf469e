// Socket helpers for waiting on a peer without sleeping (`ReplyPolling`), for which Swift's
// Glibc module and SwiftNIO have nothing: finding a channel's descriptor, and polling it.
#ifndef CPARLEY_SOCKET_H
#define CPARLEY_SOCKET_H
#include <stddef.h>
#include <stdint.h>

/// The descriptor of this process's socket whose SO_COOKIE is `cookie`, or -1: SwiftNIO
/// does not hand out its channels' descriptors, and `parley_await_bytes` needs one.
/// Scans /proc/self/fd once; a cookie is unique to one socket for the life of the system.
int parley_socket_with_cookie(uint64_t cookie);
/// The same for `count` cookies in one scan: `fds[i]` is the socket whose cookie is
/// `cookies[i]`, or -1 (also for a cookie of 0). 0, or -errno when /proc/self/fd cannot be
/// read (then every `fds[i]` is -1).
int parley_sockets_with_cookies(const uint64_t *cookies, int *fds, size_t count);
/// The SO_COOKIE of socket `fd`, or 0 when it has none (not a socket, closed).
uint64_t parley_socket_cookie(int fd);
/// Busy-waits up to `nanoseconds` for bytes to arrive on socket `fd`, asking the kernel
/// (FIONREAD) without ever sleeping, and once some came, until no more come for `settle`
/// nanoseconds (a peer sending several frames in a row is read in one go): 1 when
/// bytes are waiting, 0 when the time ran out with none, -errno on failure.
int parley_await_bytes(int fd, uint64_t nanoseconds, uint64_t settle);
#endif
