/* Start a command inside a cgroup: clone3(CLONE_INTO_CGROUP|CLONE_PIDFD), then
 * C only until execve. Loaded by agentcg/client/_clone.py through ctypes.
 *
 * The child of a multi-threaded process is a copy of the calling thread only:
 * a lock another thread held at the clone (the Python interpreter's, malloc's,
 * stdio's) stays held forever in the child. So between the clone and the execve
 * the child makes raw system calls only (no errno, no libc function, no
 * allocation) and never returns to its caller.
 *
 * Two ways to make the child:
 *   share_memory=1  CLONE_VM|CLONE_VFORK on a stack of its own, as glibc's
 *                   posix_spawn does: no copy of the caller's page tables, the
 *                   calling thread waits until the child has exec'd or exited.
 *                   x86-64 only (the child's entry needs a few instructions of
 *                   assembly); elsewhere the fork below is used.
 *   share_memory=0  a fork: the kernel copies the caller's page tables.
 * Either way all signals are blocked across the clone; the child sets every
 * caught signal (and SIGPIPE, SIGXFSZ: Python ignores them) back to its
 * default before it restores the caller's mask, so that no handler of the
 * caller runs in the child.
 *
 * Build: cc -O2 -fPIC -shared -fno-stack-protector -o _spawn.so spawn.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#define AGENTCG_CLONE_PIDFD 0x00001000ULL
#define AGENTCG_CLONE_VM 0x00000100ULL
#define AGENTCG_CLONE_VFORK 0x00004000ULL
#define AGENTCG_CLONE_INTO_CGROUP 0x200000000ULL
#define AGENTCG_CLOSE_RANGE_CLOEXEC (1U << 2)
#define CHILD_STACK_BYTES (64 * 1024)
#define KERNEL_NSIG 64

/* What Python fills in (ctypes mirror: _clone.SpawnRequest). */
struct agentcg_spawn {
    const char *path;
    char *const *argv;
    char *const *envp;
    const char *cwd;              /* NULL: the caller's */
    const int32_t *dups;          /* n_dups pairs (src, target) */
    const int32_t *keep;          /* n_keep descriptors passed on */
    const char *oom_score_adj;    /* NULL: inherited */
    int32_t n_dups;
    int32_t n_keep;
    int32_t oom_len;
    int32_t cgroup_fd;
    int32_t share_memory;
    int32_t pidfd;                /* out */
    int32_t exec_errno;           /* out: 0 when the exec worked */
    int32_t errno_fd;             /* the child's end of the errno pipe (fork only) */
};

struct clone_args_v2 {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
        set_tid, set_tid_size, cgroup;
};

/* struct sigaction as the kernel reads it (handler, flags, restorer, mask), with room to spare */
struct ksigaction {
    uintptr_t handler;
    unsigned long flags;
    uintptr_t restorer;
    uint64_t mask;
    uint64_t spare[4];
};

/* Raw system calls: -errno on failure, errno itself untouched. */
#if defined(__x86_64__)
static inline __attribute__((always_inline)) long raw6(long n, long a, long b, long c, long d, long e, long f) {
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#define HAVE_SHARED_MEMORY_CHILD 1
#else
/* Only the fork child runs this, in its own copy of the memory: the errno
 * that syscall(2) sets is the child's. */
static inline __attribute__((always_inline)) long raw6(long n, long a, long b, long c, long d, long e, long f) {
    long r = syscall(n, a, b, c, d, e, f);
    return r == -1 ? -(long)errno : r;
}
#define HAVE_SHARED_MEMORY_CHILD 0
#endif
#define raw(n, a, b, c) raw6((n), (long)(a), (long)(b), (long)(c), 0, 0, 0)

static inline __attribute__((always_inline)) void child_signals(const uint64_t *caller_mask) {
    for (int sig = 1; sig <= KERNEL_NSIG; sig++) {
        struct ksigaction sa = {0};
        if (sig == SIGKILL || sig == SIGSTOP)
            continue;
        if (raw6(SYS_rt_sigaction, sig, 0, (long)&sa, 8, 0, 0) != 0)
            continue;
        int caught = sa.handler != (uintptr_t)SIG_DFL && sa.handler != (uintptr_t)SIG_IGN;
        if (caught || sig == SIGPIPE || sig == SIGXFSZ) {
            struct ksigaction dfl = {0};
            raw6(SYS_rt_sigaction, sig, (long)&dfl, 0, 8, 0, 0);
        }
    }
    raw6(SYS_rt_sigprocmask, SIG_SETMASK, (long)caller_mask, 0, 8, 0, 0);
}

struct child_ctx {
    struct agentcg_spawn *req;
    const uint64_t *caller_mask;
};

/* The child, from the clone to the execve; returns only to exit 127. */
static int child_main(void *arg) {
    struct child_ctx *ctx = arg;
    struct agentcg_spawn *req = ctx->req;
    long err;
    child_signals(ctx->caller_mask);
    raw(SYS_close_range, 3, ~0U, AGENTCG_CLOSE_RANGE_CLOEXEC);
    for (int i = 0; i < req->n_dups; i++) {
        int src = req->dups[2 * i], target = req->dups[2 * i + 1];
        if (src == target)
            raw(SYS_fcntl, target, F_SETFD, 0);
        else
            raw(SYS_dup3, src, target, 0);     /* the copy is inheritable */
    }
    for (int i = 0; i < req->n_keep; i++)
        raw(SYS_fcntl, req->keep[i], F_SETFD, 0);
    if (req->oom_score_adj != NULL) {
        long fd = raw6(SYS_openat, AT_FDCWD, (long)"/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC, 0, 0, 0);
        if (fd >= 0) {
            raw(SYS_write, fd, req->oom_score_adj, req->oom_len);
            raw(SYS_close, fd, 0, 0);
        }
    }
    err = req->cwd != NULL ? raw(SYS_chdir, req->cwd, 0, 0) : 0;
    if (err == 0)
        err = raw(SYS_execve, req->path, req->argv, req->envp);
    int code = (int)-err;
    if (req->share_memory)
        req->exec_errno = code;            /* the caller reads it once we are gone */
    else
        raw(SYS_write, req->errno_fd, &code, sizeof code);
    return 127;
}

#if HAVE_SHARED_MEMORY_CHILD
/* long agentcg_clone3_run(struct clone_args_v2 *args, size_t size, int (*fn)(void *), void *arg):
 * clone3; the child starts on args->stack, calls fn(arg) and exits with its result. */
long agentcg_clone3_run(struct clone_args_v2 *, size_t, int (*)(void *), void *)
    __attribute__((visibility("hidden")));
__asm__(
    ".pushsection .text\n"
    ".globl agentcg_clone3_run\n"
    ".hidden agentcg_clone3_run\n"
    ".type agentcg_clone3_run,@function\n"
    ".p2align 4\n"
    "agentcg_clone3_run:\n"
    "  mov %rdx, %r8\n"          /* fn, arg: in registers that survive the syscall */
    "  mov %rcx, %r9\n"
    "  mov $435, %eax\n"         /* SYS_clone3 */
    "  syscall\n"
    "  test %rax, %rax\n"
    "  jz 1f\n"
    "  ret\n"
    "1:\n"
    "  xor %ebp, %ebp\n"         /* the child: a fresh stack, no frame above it */
    "  mov %r9, %rdi\n"
    "  call *%r8\n"
    "  mov %eax, %edi\n"
    "  mov $231, %eax\n"         /* SYS_exit_group */
    "  syscall\n"
    "  hlt\n"
    ".size agentcg_clone3_run, .-agentcg_clone3_run\n"
    ".popsection\n");
#endif

static long spawn_shared(struct clone_args_v2 *args, struct child_ctx *ctx) {
#if HAVE_SHARED_MEMORY_CHILD
    /* The child's stack, freed once CLONE_VFORK lets this thread go on (the
     * child has exec'd or exited). Not the caller's stack: a thread's may be small. */
    void *stack = mmap(NULL, CHILD_STACK_BYTES, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED)
        return -(long)errno;
    args->flags |= AGENTCG_CLONE_VM | AGENTCG_CLONE_VFORK;
    args->stack = (uint64_t)(uintptr_t)stack;
    args->stack_size = CHILD_STACK_BYTES;
    long pid = agentcg_clone3_run(args, sizeof *args, child_main, ctx);
    munmap(stack, CHILD_STACK_BYTES);
    return pid;
#else
    (void)args; (void)ctx;
    return -ENOSYS;
#endif
}

static long spawn_fork(struct clone_args_v2 *args, struct child_ctx *ctx) {
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) != 0)
        return -(long)errno;
    ctx->req->errno_fd = pipefd[1];
    long pid = raw(SYS_clone3, args, sizeof *args, 0);
    if (pid == 0)
        raw(SYS_exit_group, child_main(ctx), 0, 0);
    close(pipefd[1]);
    if (pid > 0) {
        int code = 0;
        ssize_t got, have = 0;
        while (have < (ssize_t)sizeof code) {
            got = read(pipefd[0], (char *)&code + have, sizeof code - have);
            if (got > 0)
                have += got;
            else if (!(got < 0 && errno == EINTR))
                break;
        }
        ctx->req->exec_errno = have == sizeof code ? code : 0;
    }
    close(pipefd[0]);
    return pid;
}

int agentcg_spawn_can_share_memory(void) { return HAVE_SHARED_MEMORY_CHILD; }

/* Start req's command inside req->cgroup_fd. Returns the child's pid (its
 * pidfd in req->pidfd, an exec failure's errno in req->exec_errno: the child
 * then exits 127), or -errno when no child was made (clone3's errno). */
long agentcg_spawn(struct agentcg_spawn *req) {
    uint64_t all = ~0ULL, caller_mask = 0;
    struct child_ctx ctx = {req, &caller_mask};
    struct clone_args_v2 args = {0};
    long pid;
    req->pidfd = -1;
    req->exec_errno = 0;
    args.flags = AGENTCG_CLONE_INTO_CGROUP | AGENTCG_CLONE_PIDFD;
    args.pidfd = (uint64_t)(uintptr_t)&req->pidfd;
    args.exit_signal = SIGCHLD;
    args.cgroup = (uint64_t)req->cgroup_fd;
    if (raw6(SYS_rt_sigprocmask, SIG_SETMASK, (long)&all, (long)&caller_mask, 8, 0, 0) != 0)
        return -EINVAL;
    if (req->share_memory && HAVE_SHARED_MEMORY_CHILD)
        pid = spawn_shared(&args, &ctx);
    else
        pid = (req->share_memory = 0, spawn_fork(&args, &ctx));
    raw6(SYS_rt_sigprocmask, SIG_SETMASK, (long)&caller_mask, 0, 8, 0, 0);
    return pid;
}
