/* A fault-injecting shim for tests (LD_PRELOAD): fails the I/O SQLite does on files whose
   path contains $FAULT_MATCH, as the control file $FAULT_CTL says at the time of each call:
     fsync    fsync and fdatasync fail with EIO
     enospc   pwrite fails with ENOSPC (a full disk)
     eio      pwrite fails with EIO
   An empty control file injects nothing. Built by tests/integration/test_sqlite_disk_faults.py. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static int fault_on(const char *token) {
    const char *ctl = getenv("FAULT_CTL");
    char buf[128];
    if (!ctl) return 0;
    int fd = (int)syscall(SYS_openat, AT_FDCWD, ctl, O_RDONLY);
    if (fd < 0) return 0;
    long n = syscall(SYS_read, fd, buf, sizeof buf - 1);
    syscall(SYS_close, fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    return strstr(buf, token) != NULL;
}

static int matches(int fd) {
    const char *match = getenv("FAULT_MATCH");
    char link[64], path[512];
    if (!match) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    long n = syscall(SYS_readlinkat, AT_FDCWD, link, path, sizeof path - 1);
    if (n < 0) return 0;
    path[n] = 0;
    return strstr(path, match) != NULL;
}

#define REAL(name) static __typeof__(name) *real_##name; \
    if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name)

int fsync(int fd) {
    REAL(fsync);
    if (matches(fd) && fault_on("fsync")) { errno = EIO; return -1; }
    return real_fsync(fd);
}

int fdatasync(int fd) {
    REAL(fdatasync);
    if (matches(fd) && fault_on("fsync")) { errno = EIO; return -1; }
    return real_fdatasync(fd);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite64);
    if (matches(fd)) {
        if (fault_on("enospc")) { errno = ENOSPC; return -1; }
        if (fault_on("eio")) { errno = EIO; return -1; }
    }
    return real_pwrite64(fd, buf, count, offset);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    return pwrite64(fd, buf, count, offset);
}
