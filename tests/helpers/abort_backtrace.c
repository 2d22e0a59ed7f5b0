/* Preloaded into torchrun's ranks by tests/helpers/abort_backtrace.py: on SIGABRT, writes the aborting thread's
 * native backtrace and every thread's name to stderr, then aborts as before. A rank that dies in interpreter
 * finalization ("terminate called without an active exception") has no Python frame for faulthandler to show. */
#define _GNU_SOURCE
#include <dirent.h>
#include <execinfo.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

static void say(const char *text, int len) {
    if (len > 0 && write(2, text, (size_t)len) < 0) { /* nothing to do: stderr is gone */ }
}

static void on_abort(int sig) {
    void *frames[128];
    char line[160];
    int n = backtrace(frames, 128);
    say(line, snprintf(line, sizeof line, "\n=== SIGABRT in thread %ld: %d native frames ===\n",
                       (long)syscall(SYS_gettid), n));
    backtrace_symbols_fd(frames, n, 2);
    DIR *tasks = opendir("/proc/self/task");
    for (struct dirent *task; tasks && (task = readdir(tasks));) {
        if (task->d_name[0] == '.') continue;
        char path[300], name[64] = {0};
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", task->d_name);
        int fd = open(path, O_RDONLY);
        if (fd < 0) continue;
        ssize_t got = read(fd, name, sizeof name - 1);
        close(fd);
        if (got > 0) say(line, snprintf(line, sizeof line, "thread %s %s", task->d_name, name));
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

__attribute__((constructor)) static void install(void) { signal(SIGABRT, on_abort); }
