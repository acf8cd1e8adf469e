#ifndef CPARLEY_SPAWN_H
#define CPARLEY_SPAWN_H

#include <spawn.h>

/// pipe2(fds, O_CLOEXEC): both ends close on exec, with no window for another thread's
/// spawn to inherit them.
int parley_pipe_cloexec(int fds[2]);

/// posix_spawn_file_actions_addchdir_np: the child changes to `path` before it runs.
int parley_spawn_addchdir(posix_spawn_file_actions_t *actions, const char *path);

/// posix_spawn_file_actions_addclosefrom_np: the child closes every descriptor from `from` on.
int parley_spawn_addclosefrom(posix_spawn_file_actions_t *actions, int from);

#endif
