// Glibc functions the worker's child processes need that Swift's Glibc module does not
// expose (they are behind _GNU_SOURCE).
#define _GNU_SOURCE
#include <fcntl.h>
#include <spawn.h>
#include <unistd.h>
#include "CParleySpawn.h"

int parley_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

int parley_spawn_addchdir(posix_spawn_file_actions_t *actions, const char *path) {
    return posix_spawn_file_actions_addchdir_np(actions, path);
}

int parley_spawn_addclosefrom(posix_spawn_file_actions_t *actions, int from) {
    return posix_spawn_file_actions_addclosefrom_np(actions, from);
}
