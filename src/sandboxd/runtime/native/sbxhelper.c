/*
 * sbxhelper: the privileged, short-lived half of sandboxd's namespace runtime.
 *
 * The server is a big Python process; forking it for every sandbox or command is the dominant
 * cost (measured: a fork of the server takes several ms). This helper is small, so the hot path is one
 * fork+exec of it.
 *
 *   sbxhelper create  [options]          build a sandbox and leave its init (PID 1) running
 *   sbxhelper exec    [options] -- argv  run argv inside a running sandbox, relay its exit status
 *   sbxhelper broker  [options]          open/mutate paths inside a sandbox for the server (see below)
 *   sbxhelper attach  [options]          mount a volume's directory at a path inside a running sandbox
 *
 * Namespace ownership (the heart of the design):
 *   The sandbox's processes live in a user namespace of their own (uid 0 inside = SHIFT outside), owned
 *   by SHIFT (the kernel charges per-user counts made inside up the chain to the owner). The UTS and
 *   network namespaces are the host's (owned by the initial user namespace): capabilities in the
 *   sandbox's user namespace are worth nothing against them, so sethostname() and network configuration
 *   fail with EPERM even before seccomp and the capability bounding set say no. The mount, IPC, cgroup and
 *   PID namespaces are made inside the user namespace and belong to it (so that CRIU can checkpoint the
 *   tree, see docs/architecture.md); sandbox processes hold none of the capabilities that act on them
 *   (no CAP_SYS_ADMIN in the bounding set; mount, unshare and setns are refused by seccomp as well), and
 *   the mounts the helper made as host root (/sys, /dev, read-only copies) are locked in their copy.
 *
 * create (run as host root; cgroups already made by the server):
 *   join cgroups -> unshare(mnt|uts[|net]) -> overlay root -> hostname, lo up -> /sys, /dev, copies, /etc
 *   -> fork: child takes uid SHIFT, unshare(user), the parent writes uid/gid maps -> child becomes the
 *   namespace's root, unshare(mnt|ipc|cgroup|pid) -> fork: PID 1 -> /proc, masks, views, pivot_root ->
 *   drops everything, seccomp, and reaps forever. The helper prints init's host PID and exits. The mounts
 *   live only in the sandbox's mount namespaces, so they disappear with them: nothing can leak on the host.
 *   --disk IMAGE:DIR (the disk quota, see runtime/quota.py): before the overlay, IMAGE is attached
 *   to a free loop device with LO_FLAGS_AUTOCLEAR and mounted on DIR, in the new mount namespace
 *   only; when the sandbox's last process exits, the mount goes and the loop device detaches itself.
 *
 * exec: join cgroups -> setns(pidfd, all but user) -> setns(pidfd, user) -> fork -> child: ids,
 *   caps, no_new_privs, seccomp, chdir, execvpe. On --report-fd the child writes `c <pid inside>`
 *   and the parent `h <host pid>`; the parent then waits and exits with the child's status (or dies of the same signal).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <ftw.h>
#include <grp.h>
#include <stdint.h>
#include <linux/capability.h>
#include <linux/securebits.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/loop.h>
#include <net/if.h>
#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <linux/magic.h>
#include <sys/un.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CLONE_NEWCGROUP
#define CLONE_NEWCGROUP 0x02000000
#endif
#ifndef CLONE_NEWTIME
#define CLONE_NEWTIME 0x00000080
#endif

#define MAX_CGROUPS 16
#define MAX_BINDS 8

/* Read-only copies of host directories in the sandbox (sandboxd's own in-sandbox code): a tmpfs with
 * the directory's regular files, so that no host path shows in the sandbox's mountinfo, as a bind
 * mount's source would. */
static const char *copy_src[MAX_BINDS], *copy_dst[MAX_BINDS];
static const char *view_dir; /* --view: files shown over /proc and /sys files (see stage_views) */
static int ncopies;
#define MAX_COPY_FILE (1 << 20)
static char *argv_end; /* end of the argument strings, for scrubbing a broker's command line */
/* create: the fd on which the exec'd init says it runs */
#define INIT_REPORT_FD 3
#define MAX_INHERIT 512 /* --inherit-fd of a restore: three per kept command (pipes to their keepers) */
#define HANDSHAKE_WAIT_MS 120000 /* a snapshot's copy of the files, at most (checkpoint --handshake) */
#define MAX_TTYS 256    /* --external-tty of a checkpoint: the sandbox's terminals (kept commands) */
#define MAX_VOLUMES 16  /* --volume of a restore, --external-mount of a checkpoint: core/volume_mounts.py's */
#define INIT_DIR "/dev/.sandboxd" /* in the sandbox: init's program (attach_init), on no layer of its files */

static void mount_disk(const char *image, const char *dir);
static int restore_tree(const char *criu, const char *images, unsigned shift, char **inherit, int ninherit,
                        const int *volumes, int nvolumes, int devpts);
static int read_all(int fd, char *buf, size_t n);

static void die(const char *fmt, ...) {
    va_list ap;
    int e = errno;
    fputs("sbxhelper: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    if (e) fprintf(stderr, ": %s", strerror(e));
    fputc('\n', stderr);
    exit(125);
}

static void write_file(const char *path, const char *data) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) die("open %s", path);
    size_t n = strlen(data);
    if (write(fd, data, n) != (ssize_t)n) die("write %s", path);
    close(fd);
}

static void write_file_at(int dirfd, const char *path, const char *data) {
    int fd = openat(dirfd, path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) die("open /proc/%s", path);
    size_t n = strlen(data);
    if (write(fd, data, n) != (ssize_t)n) die("write /proc/%s", path);
    close(fd);
}

static void join_cgroups(char **cgroups, int n) {
    char path[4096], pid[32];
    snprintf(pid, sizeof pid, "%d", getpid());
    for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/cgroup.procs", cgroups[i]);
        write_file(path, pid);
    }
}

/*
 * Seccomp: the whole policy is here. A deny-list modelled on Docker's default profile (whose
 * allow-list leaves out everything below): anything that reconfigures the kernel, the mount table or
 * namespaces, loads code into the kernel, reads kernel memory, or reaches past the sandbox's own
 * objects fails with EPERM (address families: EAFNOSUPPORT, as the kernel says for one it lacks).
 * Only the native x86-64 ABI is allowed: an i386 (int 0x80) or x32 syscall kills the thread
 * (libseccomp's bad-architecture action), so no syscall can slip past these rules under another number.
 */
static const char *const denied_syscalls[] = {
    /* the mount table and root: mount namespaces are the host's to manage */
    "mount", "umount", "umount2", "pivot_root", "mount_setattr", "fsopen", "fsconfig", "fsmount", "fspick",
    "move_mount", "open_tree",
    /* namespaces: a sandbox never makes or joins one (clone with CLONE_NEW* flags: below) */
    "unshare", "setns",
    /* kernel code and machine state */
    "init_module", "finit_module", "delete_module", "create_module", "get_kernel_syms", "query_module",
    "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct", "syslog", "lookup_dcookie",
    "quotactl", "quotactl_fd", "nfsservctl", "uselib", "ustat", "sysfs", "_sysctl", "vhangup",
    "sethostname", "setdomainname", "lsm_set_self_attr",
    /* clocks shared with the host */
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "stime",
    /* raw hardware access */
    "iopl", "ioperm", "vm86", "vm86old",
    /* programs in the kernel, kernel-wide observation */
    "bpf", "perf_event_open", "fanotify_init",
    /* file handles bypass path-based checks (CVE-2014-9357 "shocker") */
    "open_by_handle_at", "name_to_handle_at",
    /* the kernel keyring is not namespaced */
    "keyctl", "add_key", "request_key",
    /* userfaultfd stalls kernel page faults: a classic race-exploit primitive */
    "userfaultfd",
    /* io_uring: a second syscall interface with its own history of escapes (Docker blocks it since 25.0) */
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    /* reaching into other processes' memory placement or descriptors */
    "move_pages", "migrate_pages", "pidfd_getfd", "kcmp",
    /* memory hidden from the kernel's own inspection */
    "memfd_secret",
    /* newer than the libseccomp this is built with: numbered in newer_syscalls below */
    "open_tree_attr",
    NULL,
};

/* Syscalls libseccomp 2.5 (Debian 12) cannot name yet, by their x86-64 number. */
static const struct {
    const char *name;
    int nr;
} newer_syscalls[] = {{"lsm_set_self_attr", 460}, {"open_tree_attr", 467}};

static int syscall_number(const char *name) {
    int nr = seccomp_syscall_resolve_name(name);
#ifdef __x86_64__
    for (size_t i = 0; nr == __NR_SCMP_ERROR && i < sizeof newer_syscalls / sizeof newer_syscalls[0]; i++)
        if (!strcmp(newer_syscalls[i].name, name)) nr = newer_syscalls[i].nr;
#endif
    return nr;
}

/* Socket families a sandbox may use: local, IPv4, IPv6, and netlink (route queries by libc and ip).
 * Everything else (AF_VSOCK reaches the hypervisor and is not namespaced; AF_PACKET, AF_KEY, AF_ALG,
 * AF_BLUETOOTH, ...) is refused. */
static const int allowed_families[] = {AF_UNIX, AF_INET, AF_INET6, AF_NETLINK};
#define MAX_FAMILY 64 /* > AF_MAX on any current kernel */
#define NETLINK_KOBJECT_UEVENT_ 15

static int family_allowed(int f) {
    for (size_t i = 0; i < sizeof allowed_families / sizeof allowed_families[0]; i++)
        if (allowed_families[i] == f) return 1;
    return 0;
}

/* The filter, built with libseccomp. */
static scmp_filter_ctx build_filter(void) {
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    if (!ctx) die("seccomp_init");
    /* libseccomp sets no_new_privs on load by default: callers decide (commands run without it, so that
     * sudo works; init and the broker set it themselves before this). */
    if (seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0) < 0) die("seccomp_attr_set");
    for (int i = 0; denied_syscalls[i]; i++) {
        int nr = syscall_number(denied_syscalls[i]);
        if (nr == __NR_SCMP_ERROR) continue; /* i386-only names (umount, stime, vm86): not on this ABI */
        if (seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), nr, 0) < 0) die("seccomp rule %s", denied_syscalls[i]);
    }
    /* clone() that would make a namespace */
    static const unsigned long flags[] = {CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER,
                                          CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP, CLONE_NEWTIME};
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        if (seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(clone), 1,
                             SCMP_A0(SCMP_CMP_MASKED_EQ, flags[i], flags[i])) < 0)
            die("seccomp clone rule");
    /* clone3 passes flags in memory that seccomp cannot read: ENOSYS makes libc fall back to clone. */
    if (seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0) < 0) die("seccomp clone3");
    /* ioctl(TIOCSTI) injects input into a terminal; TIOCLINUX reads and writes the console. */
    static const unsigned long ioctls[] = {TIOCSTI, TIOCLINUX};
    for (size_t i = 0; i < sizeof ioctls / sizeof ioctls[0]; i++)
        if (seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(ioctl), 1,
                             SCMP_A1(SCMP_CMP_MASKED_EQ, 0xffffffffUL, ioctls[i])) < 0)
            die("seccomp ioctl rule");
    /* socket families: everything outside allowed_families */
    for (int f = 0; f <= MAX_FAMILY; f++) {
        if (family_allowed(f)) continue;
        if (seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EAFNOSUPPORT), SCMP_SYS(socket), 1, SCMP_A0(SCMP_CMP_EQ, f)) < 0 ||
            seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EAFNOSUPPORT), SCMP_SYS(socketpair), 1, SCMP_A0(SCMP_CMP_EQ, f)) < 0)
            die("seccomp socket rule");
    }
    if (seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EAFNOSUPPORT), SCMP_SYS(socket), 1, SCMP_A0(SCMP_CMP_GT, MAX_FAMILY)) < 0 ||
        seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EAFNOSUPPORT), SCMP_SYS(socketpair), 1,
                         SCMP_A0(SCMP_CMP_GT, MAX_FAMILY)) < 0)
        die("seccomp socket rule");
    /* kobject uevents are broadcast into every network namespace the initial user namespace owns, which
     * the sandbox's is: they would show host device events. The kernel reads these arguments as 32-bit
     * ints: compare only the low half, or a value with high bits set would slip past. (The family rules
     * above need no mask: a value with high bits set is above MAX_FAMILY and refused.) */
    if (seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPROTONOSUPPORT), SCMP_SYS(socket), 2,
                         SCMP_A0(SCMP_CMP_MASKED_EQ, 0xffffffffUL, AF_NETLINK),
                         SCMP_A2(SCMP_CMP_MASKED_EQ, 0xffffffffUL, NETLINK_KOBJECT_UEVENT_)) < 0)
        die("seccomp uevent rule");
    return ctx;
}

/*
 * --seccomp FILE: the same filter as BPF, compiled once per server by `sbxhelper seccomp-bpf` (the server
 * keeps it in a sealed memfd and names it /proc/<server>/fd/N). Compiling it costs ~1.7 ms of every
 * create and exec here; loading the compiled program costs microseconds. It is read while the option is
 * parsed, on the host side, before any namespace is entered. Without the option, the filter is built here.
 */
static struct sock_filter *compiled;
static unsigned short compiled_len;

static void read_compiled(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("open --seccomp %s", path);
    struct stat st;
    size_t unit = sizeof(struct sock_filter);
    if (fstat(fd, &st) < 0 || st.st_size <= 0 || (size_t)st.st_size % unit || (size_t)st.st_size > BPF_MAXINSNS * unit)
        die("--seccomp %s is not a BPF program", path);
    compiled = malloc((size_t)st.st_size);
    if (!compiled) die("malloc");
    if (read_all(fd, (char *)compiled, (size_t)st.st_size) != (int)st.st_size) die("read --seccomp %s", path);
    close(fd);
    compiled_len = (unsigned short)((size_t)st.st_size / unit);
}

static void apply_seccomp(void) {
    if (compiled) {
        /* As libseccomp loads it with CTL_NNP off: no flags, no_new_privs left to the caller. */
        struct sock_fprog prog = {.len = compiled_len, .filter = compiled};
        if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0) die("seccomp");
        return;
    }
    scmp_filter_ctx ctx = build_filter();
    if (seccomp_load(ctx) < 0) die("seccomp_load");
    seccomp_release(ctx);
}

/* Docker's default capability set, for sandbox root. */
static const int keep_caps[] = {
    CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FSETID, CAP_FOWNER, CAP_MKNOD, CAP_NET_RAW, CAP_SETGID,
    CAP_SETUID, CAP_SETFCAP, CAP_SETPCAP, CAP_NET_BIND_SERVICE, CAP_SYS_CHROOT, CAP_KILL, CAP_AUDIT_WRITE,
};

static int is_kept(int cap) {
    for (size_t i = 0; i < sizeof keep_caps / sizeof keep_caps[0]; i++)
        if (keep_caps[i] == cap) return 1;
    return 0;
}

/* Called while still holding full caps in the sandbox userns, before changing ids. */
static void drop_bounding_set(int keep_default) {
    int last = CAP_LAST_CAP;
    FILE *f = fopen("/proc/sys/kernel/cap_last_cap", "re");
    if (f) {
        if (fscanf(f, "%d", &last) != 1) last = CAP_LAST_CAP;
        fclose(f);
    }
    for (int cap = 0; cap <= last; cap++)
        if (!(keep_default && is_kept(cap)) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
            die("PR_CAPBSET_DROP %d", cap);
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
}

/* After setresuid(0): restrict effective/permitted/inheritable to the kept set. */
static void set_root_caps(void) {
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    for (size_t i = 0; i < sizeof keep_caps / sizeof keep_caps[0]; i++) {
        int c = keep_caps[i];
        data[c / 32].effective |= 1u << (c % 32);
        data[c / 32].permitted |= 1u << (c % 32);
    }
    if (syscall(SYS_capset, &hdr, data) < 0) die("capset");
}

static void clear_caps(void) {
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capset, &hdr, data) < 0) die("capset");
}

static void lo_up(void) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) die("socket");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) die("SIOCGIFFLAGS lo");
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) die("SIOCSIFFLAGS lo");
    close(s);
}

/* --resolv TEXT: the sandbox's /etc/resolv.conf (its DNS server is sandboxd's resolver on the gateway).
 * Written into the new overlay as the sandbox's root, one path component at a time without following a
 * symlink (the template's /etc/resolv.conf may be one: it is replaced, never written through). */
struct open_how_ {
    uint64_t flags, mode, resolve;
};
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#define RESOLVE_NO_MAGICLINKS_ 0x02
#define RESOLVE_IN_ROOT_ 0x10

/* A path of a sandbox's root, opened by the helper (host root, in the host's root directory): its symlinks and
 * ".." resolve inside the sandbox's root, as the sandbox would see them, never to a host path (the files of a
 * sandbox booting again, or of a snapshot, are the sandbox's own making). */
static int open_in_root(int root, const char *path, int flags, mode_t mode) {
    int creating = (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE;
    struct open_how_ how = {(uint64_t)(flags | O_CLOEXEC), creating ? mode : 0,
                            RESOLVE_IN_ROOT_ | RESOLVE_NO_MAGICLINKS_};
    int fd;
    do fd = (int)syscall(SYS_openat2, root, path, &how, sizeof how);
    while (fd < 0 && errno == EAGAIN); /* (a rename anywhere on the host while ".." resolved) */
    return fd;
}

static void write_resolv(const char *merged, const char *text, unsigned owner) {
    int root = open(merged, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root < 0) die("open %s", merged);
    int etc = openat(root, "etc", O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    close(root);
    if (etc < 0) return; /* no /etc (or a symlink): nothing to point at the resolver */
    if (unlinkat(etc, "resolv.conf", 0) < 0 && errno != ENOENT) die("unlink /etc/resolv.conf");
    int fd = openat(etc, "resolv.conf", O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    close(etc);
    if (fd < 0) die("create /etc/resolv.conf");
    size_t len = strlen(text);
    if (write(fd, text, len) != (ssize_t)len) die("write /etc/resolv.conf");
    if (fchown(fd, owner, owner) < 0) die("chown /etc/resolv.conf");
    close(fd);
}

static void xmount(const char *src, const char *dst, const char *type, unsigned long flags, const char *data) {
    if (mount(src, dst, type, flags, data) < 0) die("mount %s on %s", type ? type : src, dst);
}

static void xmkdir(const char *path, mode_t mode) {
    if (mkdir(path, mode) < 0 && errno != EEXIST) die("mkdir %s", path);
}

static void mknod_dev(const char *dev, const char *name, int major, int minor, unsigned shift) {
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dev, name);
    if (mknod(p, S_IFCHR | 0666, makedev(major, minor)) < 0) die("mknod %s", p);
    if (chmod(p, 0666) < 0) die("chmod %s", p);
    if (chown(p, shift, shift) < 0) die("chown %s", p);
}

/* A /dev of device nodes on a tmpfs at DEV (a user namespace may not mknod: host root makes it), with pts/ and
 * shm/ to mount on. */
static void dev_tmpfs(const char *dev, unsigned shift) {
    char p[4096], opts[256];
    xmkdir(dev, 0755);
    snprintf(opts, sizeof opts, "mode=755,size=65536k,uid=%u,gid=%u", shift, shift);
    xmount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, opts);
    mknod_dev(dev, "null", 1, 3, shift);
    mknod_dev(dev, "zero", 1, 5, shift);
    mknod_dev(dev, "full", 1, 7, shift);
    mknod_dev(dev, "random", 1, 8, shift);
    mknod_dev(dev, "urandom", 1, 9, shift);
    mknod_dev(dev, "tty", 5, 0, shift);
    snprintf(p, sizeof p, "%s/pts", dev);
    xmkdir(p, 0755);
    snprintf(p, sizeof p, "%s/ptmx", dev);
    if (symlink("pts/ptmx", p) < 0) die("symlink ptmx");
    snprintf(p, sizeof p, "%s/shm", dev);
    xmkdir(p, 01777);
    snprintf(p, sizeof p, "%s/.sandboxd", dev); /* (INIT_DIR) */
    xmkdir(p, 0755);
    static const char *links[][2] = {{"/proc/self/fd", "fd"}, {"/proc/self/fd/0", "stdin"},
                                     {"/proc/self/fd/1", "stdout"}, {"/proc/self/fd/2", "stderr"},
                                     {"/proc/kcore", "core"}};
    for (size_t i = 0; i < sizeof links / sizeof links[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", dev, links[i][1]);
        if (symlink(links[i][0], p) < 0) die("symlink %s", p);
    }
}

/* A sandbox's own terminals: a devpts instance with these options (its group tty, 5, the sandbox's); a restore's
 * made by the server gets them by a remount (restore_tree). */
#define DEVPTS_OPTIONS "ptmxmode=0666,mode=0620,gid=%u"

static void mount_devpts(const char *at, unsigned shift) {
    char opts[256];
    snprintf(opts, sizeof opts, "newinstance," DEVPTS_OPTIONS, shift + 5);
    xmount("devpts", at, "devpts", MS_NOSUID | MS_NOEXEC, opts);
}

static void setup_dev(const char *root, unsigned shift) {
    char dev[4096], p[4096], opts[256];
    snprintf(dev, sizeof dev, "%s/dev", root);
    dev_tmpfs(dev, shift);
    snprintf(p, sizeof p, "%s/pts", dev);
    mount_devpts(p, shift);
    snprintf(p, sizeof p, "%s/shm", dev);
    snprintf(opts, sizeof opts, "mode=1777,size=65536k,uid=%u,gid=%u", shift, shift);
    xmount("shm", p, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts);
}

static int read_all(int fd, char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return (int)got;
        got += (size_t)r;
    }
    return (int)got;
}

/* A read-only tmpfs at DST of the sandbox's root (resolved inside it: see open_in_root) holding a copy of the
 * files of the host directory SRC. */
static void copy_into_tmpfs(const char *src, const char *root, const char *dst, unsigned shift) {
    char opts[128], from[4096], at[64];
    int rootfd = open(root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (rootfd < 0) die("open %s", root);
    const char *slash = strrchr(dst, '/'), *base = slash + 1;
    char parent[4096];
    snprintf(parent, sizeof parent, "%.*s", (int)(slash - dst), dst);
    int pfd = open_in_root(rootfd, parent[0] ? parent : "/", O_PATH | O_DIRECTORY, 0);
    if (pfd < 0) die("open %s in the sandbox", parent);
    if (mkdirat(pfd, base, 0755) < 0 && errno != EEXIST) die("mkdir %s", dst);
    int target = openat(pfd, base, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (target < 0) die("%s in the sandbox is not a directory", dst);
    close(pfd);
    snprintf(opts, sizeof opts, "mode=755,size=8m,nr_inodes=1024,uid=%u,gid=%u", shift, shift);
    snprintf(at, sizeof at, "/proc/self/fd/%d", target);
    xmount("tmpfs", at, "tmpfs", MS_NOSUID | MS_NODEV, opts);
    close(target);
    int mnt = open_in_root(rootfd, dst, O_PATH | O_DIRECTORY, 0); /* (the tmpfs now) */
    if (mnt < 0) die("open %s in the sandbox", dst);
    close(rootfd);
    DIR *d = opendir(src);
    if (!d) die("opendir %s", src);
    static char buf[MAX_COPY_FILE];
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_type != DT_REG) continue; /* files only: no links, no subdirectories */
        snprintf(from, sizeof from, "%s/%s", src, e->d_name);
        int in = open(from, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (in < 0) die("open %s", from);
        ssize_t n = read_all(in, buf, sizeof buf);
        close(in);
        if (n < 0 || (size_t)n == sizeof buf) die("%s: unreadable or over %d bytes", from, MAX_COPY_FILE);
        int out = openat(mnt, e->d_name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
        if (out < 0 || write(out, buf, (size_t)n) != n) die("write %s/%s", dst, e->d_name);
        if (fchown(out, shift, shift) < 0) die("chown %s/%s", dst, e->d_name);
        close(out);
    }
    closedir(d);
    snprintf(at, sizeof at, "/proc/self/fd/%d", mnt);
    xmount(NULL, at, NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, opts);
    close(mnt);
}

/*
 * --view DIR: what the sandbox's own /proc/meminfo, /proc/cpuinfo and /sys/devices/system/cpu/online show
 * (its memory limit and usage, its CPUs: runtime/views.py writes them), so that `free`, `nproc`-like
 * counts and programs sizing themselves read the sandbox, not the host. Each file is copied into a small
 * tmpfs of this mount namespace and bound over the kernel's file; the staging mount is detached at once
 * (the binds keep it), so mountinfo shows `/meminfo` on a tmpfs, no host path. The copies are owned by
 * host root (no uid inside: sandbox root cannot write or chmod them) and read-only to everyone; meminfo's
 * bind stays writable so that the server can refresh it through /proc/<init>/root (views.refresh).
 */
static const struct {
    const char *name, *dst;
    int writable;
} views[] = {
    {"meminfo", "/proc/meminfo", 1},
    {"cpuinfo", "/proc/cpuinfo", 0},
    {"cpu-online", "/sys/devices/system/cpu/online", 0},
};

/* The helper (host root) writes the view files into a staging tmpfs over --view DIR, in its own mount
 * namespace; the sandbox's copy of that namespace inherits the tmpfs, and init binds each file over the
 * kernel's once its /proc is mounted (bind_views). The staging mount goes with the old root at pivot_root. */
static void stage_views(void) {
    if (!view_dir) return;
    char from[4096], to[4096];
    static char buf[MAX_COPY_FILE];
    int fds[sizeof views / sizeof views[0]];
    for (size_t i = 0; i < sizeof views / sizeof views[0]; i++) {
        snprintf(from, sizeof from, "%s/%s", view_dir, views[i].name);
        fds[i] = open(from, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fds[i] < 0) die("open %s", from);
    }
    /* the staging tmpfs hides the sources: read above */
    xmount("tmpfs", view_dir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755,size=256k,nr_inodes=16");
    for (size_t i = 0; i < sizeof views / sizeof views[0]; i++) {
        ssize_t n = read_all(fds[i], buf, sizeof buf);
        close(fds[i]);
        if (n < 0 || (size_t)n == sizeof buf) die("view %s: unreadable or over %d bytes", views[i].name, MAX_COPY_FILE);
        snprintf(to, sizeof to, "%s/%s", view_dir, views[i].name);
        int out = open(to, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0444);
        if (out < 0 || write(out, buf, (size_t)n) != n) die("write %s", to);
        close(out);
    }
}

static void bind_views(const char *root) {
    if (!view_dir) return;
    char from[4096], dst[4096];
    const char *name = strrchr(view_dir, '/'); /* the state dir's view/ (runtime/views.py), from the state dir */
    name = name && name[1] ? name + 1 : view_dir;
    for (size_t i = 0; i < sizeof views / sizeof views[0]; i++) {
        snprintf(from, sizeof from, "%s/%s", name, views[i].name);
        snprintf(dst, sizeof dst, "%s%s", root, views[i].dst);
        if (access(dst, F_OK) != 0) continue; /* a kernel without this file: nothing to cover */
        xmount(from, dst, NULL, MS_BIND, NULL);
        if (!views[i].writable)
            xmount(NULL, dst, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    }
}

/* Hide host-kernel knobs that userns root could otherwise read: as Docker's masked paths. */
static void mask_proc(const char *root) {
    static const char *masked[] = {"/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug",
                                   "/proc/sysrq-trigger", "/proc/kallsyms", NULL};
    char dst[4096], src[4096];
    snprintf(src, sizeof src, "%s/dev/null", root);
    for (int i = 0; masked[i]; i++) {
        snprintf(dst, sizeof dst, "%s%s", root, masked[i]);
        if (access(dst, F_OK) == 0) mount(src, dst, NULL, MS_BIND, NULL);
    }
    static const char *ro[] = {"/proc/sys", "/proc/irq", "/proc/bus", "/proc/fs", NULL};
    for (int i = 0; ro[i]; i++) {
        snprintf(dst, sizeof dst, "%s%s", root, ro[i]);
        if (access(dst, F_OK) != 0) continue;
        if (mount(dst, dst, NULL, MS_BIND | MS_REC, NULL) == 0)
            mount(NULL, dst, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    }
}

/* A file of the sandbox's /etc made anew (whatever was there: a symlink is replaced, not followed). */
static void write_etc_file(int etc, const char *name, const char *text, unsigned shift) {
    if (unlinkat(etc, name, 0) < 0 && errno != ENOENT && errno != EISDIR) die("unlink /etc/%s", name);
    int fd = openat(etc, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) {
        if (errno == EEXIST) return; /* (a directory of that name: the sandbox's own business) */
        die("create /etc/%s", name);
    }
    size_t len = strlen(text);
    if (write(fd, text, len) != (ssize_t)len) die("write /etc/%s", name);
    if (fchown(fd, shift, shift) < 0) die("chown /etc/%s", name);
    close(fd);
}

static void write_etc(const char *root, const char *hostname, unsigned shift) {
    char buf[1024];
    int rootfd = open(root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (rootfd < 0) die("open %s", root);
    int etc = open_in_root(rootfd, "etc", O_PATH | O_DIRECTORY, 0);
    close(rootfd);
    if (etc < 0) return; /* no /etc (nor one a symlink leads to, inside the sandbox): nothing to write */
    snprintf(buf, sizeof buf, "%s\n", hostname);
    write_etc_file(etc, "hostname", buf, shift);
    snprintf(buf, sizeof buf, "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t%s\n",
             hostname);
    write_etc_file(etc, "hosts", buf, shift);
    close(etc);
}

static void attach_init(const char *dst);

/* The host-root parts of a new sandbox's root, made by the helper in its own mount namespace before the
 * sandbox's user namespace exists (a user namespace may not mknod, and sysfs may be mounted only by an
 * owner of the network namespace, which is the host's): the sandbox's mount namespace inherits them, locked. */
static void prepare_root(const char *merged, const char *hostname, unsigned shift) {
    char p[4096];
    snprintf(p, sizeof p, "%s/proc", merged);
    xmkdir(p, 0555);
    snprintf(p, sizeof p, "%s/sys", merged);
    xmkdir(p, 0555);
    xmount("sysfs", p, "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, NULL);
    setup_dev(merged, shift);
    snprintf(p, sizeof p, "%s" INIT_DIR, merged);
    attach_init(p);
    stage_views();
    for (int i = 0; i < ncopies; i++) {
        copy_into_tmpfs(copy_src[i], merged, copy_dst[i], shift);
    }
    write_etc(merged, hostname, shift);
    snprintf(p, sizeof p, "%s/tmp", merged);
    xmkdir(p, 01777);
}

/* The sandbox's PID 1, forked inside the sandbox's user namespace (as its root, with every capability over
 * the namespaces made there: mount, IPC, cgroup, PID). Errors go to `toparent` as text. */
static void init_child(int toparent, const char *merged) {
    char p[4096];
    /* Redirect our own diagnostics to the helper. */
    dup2(toparent, 2);
    /* The root came from the helper's mount namespace: locked here, and pivot_root refuses it; a recursive
     * bind of it onto itself, made in our own namespace, is not. */
    xmount(merged, merged, NULL, MS_BIND | MS_REC, NULL); /* (relative: from the state dir) */
    snprintf(p, sizeof p, "%s/proc", merged);
    xmount("proc", p, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mask_proc(merged);
    bind_views(merged);

    if (chdir(merged) < 0) die("chdir %s", merged);
    if (syscall(SYS_pivot_root, ".", ".") < 0) die("pivot_root");
    if (umount2(".", MNT_DETACH) < 0) die("umount old root");
    if (chdir("/") < 0) die("chdir /");

    drop_bounding_set(0);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) die("no_new_privs");
    clear_caps(); /* init keeps no capabilities at all (and an exec as root gets none: the bounding set is empty) */
    apply_seccomp(); /* (kept across the exec, as no_new_privs and the blocked signals are) */
    sigset_t set;
    sigfillset(&set);
    sigprocmask(SIG_BLOCK, &set, NULL);
    /* Exec ourselves again, inside the sandbox's user namespace: init's memory then belongs to it (so a
     * checkpoint, which looks at init from that namespace, may read init's /proc entries though init is not
     * dumpable), and its command line is its own ("sandbox-init": no host path in /proc/1/cmdline). */
    if ((toparent == INIT_REPORT_FD ? fcntl(toparent, F_SETFD, 0) : dup2(toparent, INIT_REPORT_FD)) < 0) die("dup2");
    char *args[] = {"sandbox-init", NULL}, *env[] = {NULL};
    execve(INIT_DIR "/init", args, env);
    die("exec " INIT_DIR "/init");
}

/*
 * Commands are init's children (cmd_exec: the helper's child forks the command and exits, so the kernel gives
 * the command to the PID namespace's init): a checkpoint of init's tree then holds every command. Init reaps
 * them; a command's keeper, which no longer is its parent, learns how it ended from init. Keepers talk to init
 * on an abstract datagram socket in the sandbox's network namespace: a request {op, pid} with one descriptor,
 * a socket the answer {state, status} goes to (sent without waiting; the descriptor is closed at once, so
 * init holds nothing of the host's). REGISTER asks init to keep the status of a child it will reap (the
 * helper sends it before its own child exits, so before init can reap the command); QUERY asks for it (and
 * forgets it once ended). The table is bounded: when it is full, the helper keeps today's way (its child stays
 * the command's parent and relays its status). Any process of the sandbox may send the same requests: they
 * cost init's own time (the sandbox's), and tell nothing the sandbox does not know.
 */
#define INIT_SOCK "sandboxd-init"
#define INIT_TABLE 4096
enum { INIT_REGISTER = 1, INIT_QUERY = 2 };
enum { CHILD_RUNNING = 1, CHILD_ENDED = 2, CHILD_UNKNOWN = 3, CHILD_FULL = 4 };
struct init_req {
    uint32_t op;
    int32_t pid;
};
struct init_rep {
    uint32_t state;
    int32_t status; /* a wait status, when ended */
};
static struct {
    pid_t pid; /* 0: a free entry */
    uint32_t state;
    int status;
} registered[INIT_TABLE];

static int init_find(pid_t pid) {
    for (int i = 0; i < INIT_TABLE; i++)
        if (registered[i].pid == pid) return i;
    return -1;
}

static void init_reaped(pid_t pid, int status) {
    int i = init_find(pid);
    if (i >= 0 && registered[i].state == CHILD_RUNNING) {
        registered[i].state = CHILD_ENDED;
        registered[i].status = status;
    }
}

static struct init_rep init_answer(const struct init_req *r) {
    struct init_rep rep = {CHILD_UNKNOWN, 0};
    if (r->pid <= 1) return rep;
    int i = init_find(r->pid);
    if (r->op == INIT_REGISTER) {
        if (i < 0) i = init_find(0);
        /* full: an entry for a PID that names no process goes (so what stays is bounded by the sandbox's own
         * PID limit), else an ended one nobody asked about */
        for (int j = 0; i < 0 && j < INIT_TABLE; j++)
            if (registered[j].state == CHILD_RUNNING && kill(registered[j].pid, 0) < 0 && errno == ESRCH) i = j;
        for (int j = 0; i < 0 && j < INIT_TABLE; j++)
            if (registered[j].state == CHILD_ENDED) i = j;
        if (i < 0) return (struct init_rep){CHILD_FULL, 0};
        registered[i].pid = r->pid;
        registered[i].state = CHILD_RUNNING;
        registered[i].status = 0;
        return (struct init_rep){CHILD_RUNNING, 0};
    }
    if (r->op != INIT_QUERY || i < 0) return rep;
    int status;
    if (registered[i].state == CHILD_RUNNING && waitpid(r->pid, &status, WNOHANG) == r->pid)
        init_reaped(r->pid, status);
    rep.state = registered[i].state;
    rep.status = registered[i].status;
    if (rep.state == CHILD_ENDED) registered[i].pid = 0;
    return rep;
}

/* Attach `n` descriptors to `msg` (SCM_RIGHTS), in `control`: CMSG_SPACE(n * sizeof(int)) bytes at least, aligned
 * for a cmsghdr. With none, `msg` carries no control data. */
static void attach_fds(struct msghdr *msg, void *control, const int *fds, int n) {
    if (n <= 0) return;
    size_t len = (size_t)n * sizeof(int);
    memset(control, 0, CMSG_SPACE(len));
    msg->msg_control = control;
    msg->msg_controllen = CMSG_SPACE(len);
    struct cmsghdr *cm = CMSG_FIRSTHDR(msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(len);
    memcpy(CMSG_DATA(cm), fds, len);
}

/* The first descriptor a received `msg` carried (-1: none); any other is closed (a buffer sized for one takes a
 * second in its padding; the kernel closed those that did not fit). */
static int take_one_fd(struct msghdr *msg) {
    int fd = -1;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(msg); cm; cm = CMSG_NXTHDR(msg, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
        for (size_t k = 0; k < (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int); k++) {
            int got;
            memcpy(&got, CMSG_DATA(cm) + k * sizeof(int), sizeof got);
            if (fd < 0) fd = got;
            else close(got);
        }
    }
    return fd;
}

/* Up to 64 requests waiting on the socket; never blocks. */
static void init_serve(int sock) {
    for (int m = 0; m < 64; m++) {
        struct init_req req;
        union {
            char buf[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } control;
        struct iovec iov = {&req, sizeof req};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf, .msg_controllen = sizeof control.buf};
        ssize_t n = recvmsg(sock, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0) {
            if (errno == EINTR) continue;
            return;
        }
        int fd = take_one_fd(&msg); /* the answer's way */
        if (fd < 0) continue;
        if (n == (ssize_t)sizeof req && !(msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
            struct init_rep rep = init_answer(&req);
            (void)!send(fd, &rep, sizeof rep, MSG_DONTWAIT | MSG_NOSIGNAL);
        }
        close(fd);
    }
}

static socklen_t init_address(struct sockaddr_un *a) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    memcpy(a->sun_path + 1, INIT_SOCK, sizeof INIT_SOCK - 1); /* abstract: sun_path[0] is 0 */
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + sizeof INIT_SOCK - 1);
}

/* The sandbox's PID 1 once it exec'd itself (init_child): tell the helper it runs, close what it inherited,
 * reap orphans forever. All signals are blocked; only SIGKILL (from the host) ends it. */
static int init_main(void) {
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0) return 125; /* no process of the sandbox may trace it */
    prctl(PR_SET_NAME, "sandbox-init", 0, 0, 0);                /* (an exec through an fd named it by number) */
    setsid(); /* its session was the helper's, outside the sandbox */
    /* (bound before "R": a command may be started as soon as the helper reports) */
    int sock = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    struct sockaddr_un addr;
    socklen_t alen = init_address(&addr);
    if (sock >= 0 && bind(sock, (struct sockaddr *)&addr, alen) < 0) {
        close(sock);
        sock = -1; /* (keepers then keep their commands as their own children) */
    }
    if (write(INIT_REPORT_FD, "R", 1) != 1) return 125;
    /* init never execs again, so close-on-exec does nothing for it: close every inherited fd by hand, or the
     * helper would wait forever for EOF on a pipe that init still holds. It holds no host file at all (the
     * template store learns which templates are in use from holds, templates/store.py). */
    int devnull = open("/dev/null", O_RDWR);
    for (int fd = 0; fd < 3; fd++) dup2(devnull, fd);
    int above = 3; /* (all but the socket) */
    if (sock >= 3) {
        if (sock > 3) syscall(SYS_close_range, 3, sock - 1, 0);
        above = sock + 1;
    }
    syscall(SYS_close_range, above, ~0U, 0);
    sigset_t set;
    sigfillset(&set);
    sigprocmask(SIG_BLOCK, &set, NULL);
    int sfd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0) return 125;
    for (;;) {
        struct pollfd p[2] = {{sfd, POLLIN, 0}, {sock, POLLIN, 0}};
        if (poll(p, sock >= 0 ? 2 : 1, -1) < 0) continue;
        if (p[0].revents) {
            struct signalfd_siginfo si[16];
            while (read(sfd, si, sizeof si) > 0) {
            }
            pid_t pid;
            int status;
            while ((pid = waitpid(-1, &status, WNOHANG)) > 0) init_reaped(pid, status);
        }
        if (sock >= 0 && p[1].revents) init_serve(sock);
    }
}

/* The sandbox's user namespace and what belongs to it, made by a child of the helper: it takes the
 * sandbox's own host uid (SHIFT) and makes the user namespace, so that the namespace is owned by that uid,
 * not by host root (the kernel charges per-user counts made inside -- inotify instances and watches,
 * pending signals, ... -- up the chain to the owner, so one sandbox exhausts only its own share); the
 * helper writes its id maps; then, as the namespace's root, it makes the mount, IPC, cgroup and PID
 * namespaces (owned by it: CRIU can checkpoint such a tree) and forks init. The UTS and network namespaces
 * stay the host's (made or joined by the helper): sandbox root cannot rename the host or configure the
 * network even with a capability. Reports init's host PID on `pidfd`. */
static void userns_child(int ready, int mapped, int pidfd, int toparent, const char *merged, unsigned shift) {
    char c;
    dup2(toparent, 2);
    if (setgroups(0, NULL) < 0) die("setgroups");
    if (setresgid(shift, shift, shift) < 0) die("setresgid %u", shift);
    if (setresuid(shift, shift, shift) < 0) die("setresuid %u", shift);
    if (unshare(CLONE_NEWUSER) < 0) die("unshare(user)");
    if (write(ready, "U", 1) != 1) die("sync write");
    if (read_all(mapped, &c, 1) != 1 || c != 'M') _exit(125); /* the helper failed to map ids */
    if (setresgid(0, 0, 0) < 0) die("setresgid");
    if (setgroups(0, NULL) < 0) die("setgroups");
    if (setresuid(0, 0, 0) < 0) die("setresuid");
    if (unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWCGROUP | CLONE_NEWPID) < 0) die("unshare");
    pid_t init = fork();
    if (init < 0) die("fork");
    if (init == 0) {
        close(pidfd);
        init_child(toparent, merged);
        _exit(125);
    }
    if (write(pidfd, &init, sizeof init) != (ssize_t)sizeof init) die("report init");
    _exit(0);
}

/*
 * An idmapped clone of the template's root filesystem: files stored with the template's uids
 * (FROM..FROM+RANGE-1 on disk) appear as this sandbox's own host uids (SHIFT..SHIFT+RANGE-1), so that
 * every sandbox has a uid range of its own while all of them share one copy of the template. The
 * mapping is carried by a user namespace made for the purpose (no process stays in it).
 */
#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#define OPEN_TREE_CLONE_ 1
#define MOVE_MOUNT_F_EMPTY_PATH_ 0x00000004
#define MOVE_MOUNT_T_EMPTY_PATH_ 0x00000040
#define MOUNT_ATTR_RDONLY_ 0x00000001
#define MOUNT_ATTR_NOSUID_ 0x00000002
#define MOUNT_ATTR_NODEV_ 0x00000004
#define MOUNT_ATTR_IDMAP_ 0x00100000
struct mount_attr_ {
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};

static int mapping_userns(int procfd, unsigned from, unsigned to, unsigned range) {
    int sync[2];
    if (pipe2(sync, O_CLOEXEC) < 0) die("pipe");
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        char c;
        if (unshare(CLONE_NEWUSER) < 0) _exit(1);
        close(sync[1]);
        /* Stay until the parent has the namespace: it closes the pipe (or dies). */
        (void)!read(sync[0], &c, 1);
        _exit(0);
    }
    close(sync[0]);
    /* The child may not have unshared yet: wait until its user namespace differs from ours. */
    char path[64], map[64];
    struct stat ours, theirs;
    if (stat("/proc/self/ns/user", &ours) < 0) die("stat ns/user");
    snprintf(path, sizeof path, "%d/ns/user", child);
    for (int i = 0;; i++) {
        if (fstatat(procfd, path, &theirs, 0) == 0 && theirs.st_ino != ours.st_ino) break;
        if (i > 100000) die("mapping namespace did not appear");
        sched_yield();
    }
    snprintf(map, sizeof map, "%u %u %u\n", from, to, range);
    snprintf(path, sizeof path, "%d/uid_map", child);
    write_file_at(procfd, path, map);
    snprintf(path, sizeof path, "%d/gid_map", child);
    write_file_at(procfd, path, map);
    snprintf(path, sizeof path, "%d/ns/user", child);
    int fd = openat(procfd, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("open mapping namespace");
    close(sync[1]);
    waitpid(child, NULL, 0);
    return fd;
}

/* A detached clone of SRC's mount, its ids mapped through USERNS, with the MOUNT_ATTR_* ATTRS too. */
static int idmapped_tree(int userns, const char *src, uint64_t attrs) {
    int tree = (int)syscall(SYS_open_tree, AT_FDCWD, src, OPEN_TREE_CLONE_ | O_CLOEXEC);
    if (tree < 0) die("open_tree %s", src);
    struct mount_attr_ attr = {MOUNT_ATTR_IDMAP_ | attrs, 0, 0, (uint64_t)userns};
    if (syscall(SYS_mount_setattr, tree, "", AT_EMPTY_PATH, &attr, sizeof attr) < 0) die("idmap %s", src);
    return tree;
}

static void attach_idmapped(int userns, const char *src, const char *dst) {
    int tree = idmapped_tree(userns, src, MOUNT_ATTR_RDONLY_ | MOUNT_ATTR_NOSUID_ | MOUNT_ATTR_NODEV_);
    if (syscall(SYS_move_mount, tree, "", AT_FDCWD, dst, MOVE_MOUNT_F_EMPTY_PATH_) < 0) die("move_mount %s", dst);
    close(tree);
}

/* init's program (INIT_DIR/init): a clone of the server's read-only tmpfs holding a copy of the helper
 * (runtime/native, init_mount; --init-mount names its fd), shared by all of the server's sandboxes, host root's
 * (sandbox root cannot change it). A file in the sandbox: a checkpoint restores init's program from a file it
 * finds there (it cannot from the sealed memfd the helper runs from). */
static const char *init_mount_path;

static void attach_init(const char *dst) {
    if (!init_mount_path) die("create needs --init-mount");
    int tree = (int)syscall(SYS_open_tree, AT_FDCWD, init_mount_path, OPEN_TREE_CLONE_ | O_CLOEXEC);
    if (tree < 0) die("open_tree %s", init_mount_path);
    if (syscall(SYS_move_mount, tree, "", AT_FDCWD, dst, MOVE_MOUNT_F_EMPTY_PATH_) < 0) die("move_mount %s", dst);
    close(tree);
}

/* A template is one root filesystem or a stack of layers (templates/layers.py): --lower is given once
 * per layer, topmost first, and each becomes one overlay lower dir. */
#define MAX_LOWERS 128

static int remove_entry(const char *path, const struct stat *st, int type, struct FTW *ftw) {
    (void)st;
    (void)ftw;
    return (type == FTW_DP ? rmdir(path) : unlink(path)) < 0 ? -1 : 0;
}

static int cmd_create(int argc, char **argv) {
    const char *lowers[MAX_LOWERS], *dir = NULL, *hostname = "sandbox", *netns = NULL, *resolv = NULL;
    const char *restore = NULL, *uts = NULL, *criu = NULL; /* --restore IMAGES: see restore_tree */
    char *inherit[MAX_INHERIT];
    const char *volumes[MAX_VOLUMES];
    int nlowers = 0, ninherit = 0, nvolumes = 0;
    char *disk = NULL;
    unsigned shift = 100000, range = 65536, idmap_from = 0;
    int idmap = 0, resume = 0, devpts = -1;
    char *cgroups[MAX_CGROUPS];
    int ncg = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) die("missing value for %s", a);
        if (!strcmp(a, "--lower")) {
            if (nlowers == MAX_LOWERS) die("too many layers (at most %d)", MAX_LOWERS);
            lowers[nlowers++] = v;
        }
        else if (!strcmp(a, "--state-dir")) dir = v;
        else if (!strcmp(a, "--hostname")) hostname = v;
        else if (!strcmp(a, "--seccomp")) read_compiled(v);
        else if (!strcmp(a, "--view")) view_dir = v;
        else if (!strcmp(a, "--netns")) netns = v;
        else if (!strcmp(a, "--resolv")) resolv = v;
        else if (!strcmp(a, "--restore")) restore = v;
        else if (!strcmp(a, "--init-mount")) init_mount_path = v;
        else if (!strcmp(a, "--uts")) uts = v;
        else if (!strcmp(a, "--criu")) criu = v;
        else if (!strcmp(a, "--inherit-fd")) {
            if (ninherit == MAX_INHERIT) die("too many --inherit-fd (at most %d)", MAX_INHERIT);
            inherit[ninherit++] = (char *)v;
        }
        else if (!strcmp(a, "--volume")) { /* a volume's host directory, for a restore: see restore_tree */
            if (nvolumes == MAX_VOLUMES) die("too many --volume (at most %d)", MAX_VOLUMES);
            volumes[nvolumes++] = v;
        }
        else if (!strcmp(a, "--devpts-fd")) { /* a detached devpts mount, for a restore: see restore_tree */
            devpts = (int)strtol(v, NULL, 10);
            struct statfs fs;
            if (devpts < 3 || fstatfs(devpts, &fs) < 0 || fs.f_type != DEVPTS_SUPER_MAGIC) die("bad --devpts-fd %s", v);
            fcntl(devpts, F_SETFD, FD_CLOEXEC);
        }
        else if (!strcmp(a, "--disk")) disk = (char *)v; /* IMAGE:DIR */
        else if (!strcmp(a, "--resume")) resume = !strcmp(v, "1"); /* it boots again from kept files */
        else if (!strcmp(a, "--shift")) shift = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--range")) range = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--idmap-from")) {
            idmap_from = (unsigned)strtoul(v, NULL, 10);
            idmap = 1;
        } else if (!strcmp(a, "--ro-copy")) {
            /* --ro-copy SRC:DST (DST absolute inside the sandbox, no "..") */
            char *colon = strchr(v, ':');
            if (!colon || colon[1] != '/' || strstr(colon, "..") || ncopies == MAX_BINDS) die("bad --ro-copy %s", v);
            *colon = 0;
            copy_src[ncopies] = v;
            copy_dst[ncopies++] = colon + 1;
        }
        else if (!strcmp(a, "--cgroup")) {
            if (ncg == MAX_CGROUPS) die("too many cgroups");
            cgroups[ncg++] = (char *)v;
        } else die("unknown option %s", a);
        i++;
    }
    if (!nlowers || !dir) die("create needs --lower and --state-dir");
    if (restore && !criu) die("--restore needs --criu");
    if (restore) resume = 1; /* its overlay was mounted before: the marker goes (see below) */
    char merged[4096];
    snprintf(merged, sizeof merged, "%s/merged", dir);
    join_cgroups(cgroups, ncg);
    /* --netns: a namespace the server prepared (eth0, address, routes: runtime/network.py); else a new one
     * with only lo. */
    if (netns) {
        int nfd = open(netns, O_RDONLY | O_CLOEXEC);
        if (nfd < 0) die("open %s", netns);
        if (setns(nfd, CLONE_NEWNET) < 0) die("setns(net)");
        close(nfd);
    }
    if (uts) {
        int ufd = open(uts, O_RDONLY | O_CLOEXEC);
        if (ufd < 0) die("open %s", uts);
        if (setns(ufd, CLONE_NEWUTS) < 0) die("setns(uts)");
        close(ufd);
    }
    if (unshare(CLONE_NEWNS | (uts ? 0 : CLONE_NEWUTS) | (netns ? 0 : CLONE_NEWNET)) < 0) die("unshare");
    xmount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL);
    /* The child's pivot_root also moves our root (same mount namespace): keep the host /proc open. */
    int procfd = open("/proc", O_DIRECTORY | O_CLOEXEC);
    if (procfd < 0) die("open /proc");
    if (chdir(dir) < 0) die("chdir %s", dir);
    /* Relative names: the sandbox's /proc/self/mountinfo shows no host path for its root. One layer keeps
     * the name "lower" (as sandboxes made before layers had it); more are "lower.1", "lower.2", ... */
    char lowerdir[4096];
    size_t used = 0;
    int userns = idmap && idmap_from != shift ? mapping_userns(procfd, idmap_from, shift, range) : -1;
    /* The volumes of a restore, cloned and idmapped here as `attach` does (their files are stored with ids from
     * --idmap-from): CRIU binds each where the checkpoint had it. */
    int volume_trees[MAX_VOLUMES];
    if (nvolumes && !idmap) die("--volume needs --idmap-from");
    for (int i = 0; i < nvolumes; i++) {
        int vns = idmap_from != shift ? userns : mapping_userns(procfd, idmap_from, shift, range);
        volume_trees[i] = idmapped_tree(vns, volumes[i], MOUNT_ATTR_NOSUID_ | MOUNT_ATTR_NODEV_);
        if (vns != userns) close(vns);
    }
    for (int i = 0; i < nlowers; i++) {
        char name[32];
        const char *layer = lowers[i];
        if (userns >= 0) {
            if (i == 0) snprintf(name, sizeof name, "lower");
            else snprintf(name, sizeof name, "lower.%d", i);
            if (mkdir(name, 0700) < 0 && errno != EEXIST) die("mkdir %s", name);
            attach_idmapped(userns, lowers[i], name);
            layer = name;
        }
        int n = snprintf(lowerdir + used, sizeof lowerdir - used, "%s%s", i ? ":" : "", layer);
        if (n < 0 || (size_t)n >= sizeof lowerdir - used) die("layer paths too long");
        used += (size_t)n;
    }
    if (userns >= 0) close(userns);
    const char *layers = ""; /* where upper/ and work/ are: the state dir, or the sandbox's own disk */
    if (disk) {
        char *colon = strrchr(disk, ':');
        if (!colon) die("bad --disk %s", disk);
        *colon = 0;
        mount_disk(disk, colon + 1);
        layers = "disk/";
        /* the image is formatted once for every sandbox: its upper dir becomes this sandbox's root's */
        if (chown("disk/upper", shift, shift) < 0) die("chown disk/upper");
    }
    if (resume) {
        /* Booting again from the files a stopped sandbox kept (a filesystem-only pause): its volatile
         * overlay left the marker that refuses a second mount, and the server synced the upper dir when the
         * sandbox stopped (runtime/namespaces.py, stop), so the marker goes. */
        char scratch[4200];
        snprintf(scratch, sizeof scratch, "%swork/work", layers); /* overlayfs's scratch dir: it makes a new one */
        if (nftw(scratch, remove_entry, 16, FTW_DEPTH | FTW_PHYS) < 0 && errno != ENOENT) die("remove %s", scratch);
    }
    /* Relative layer names: the sandbox's /proc/self/mountinfo shows no host path for its root. */
    char opts[8192];
    snprintf(opts, sizeof opts, "lowerdir=%s,upperdir=%supper,workdir=%swork,volatile", lowerdir, layers, layers);
    xmount("overlay", "merged", "overlay", 0, opts);
    /* init (the sandbox's root, no host uid) finishes the root from here, and CRIU (as that uid) checkpoints
     * and restores it: they may pass through the state dir, nothing more (the data dir above it stays host
     * root's only) */
    if (chmod(".", 0711) < 0) die("chmod %s", dir);
    /* (a restore without --uts: a new sandbox from a snapshot's images, in a UTS namespace of its own) */
    if (restore && !uts) { /* a new sandbox: its name and resolver in its files too, as a create writes them */
        if (sethostname(hostname, strlen(hostname)) < 0) die("sethostname");
        write_etc("merged", hostname, shift);
        if (resolv) write_resolv("merged", resolv, shift);
        if (!netns) lo_up(); /* (a network namespace of its own: its loopback, as a create's) */
    }
    if (restore) return restore_tree(criu, restore, shift, inherit, ninherit, volume_trees, nvolumes, devpts);
    if (devpts >= 0) die("--devpts-fd is for --restore");
    if (nvolumes) die("--volume is for --restore");
    if (resolv) write_resolv("merged", resolv, shift);
    if (sethostname(hostname, strlen(hostname)) < 0) die("sethostname");
    lo_up();
    /* ICMP echo sockets for everyone in the sandbox's own network namespace: `ping` works unprivileged,
     * as it does on Debian hosts (iputils falls back to them without CAP_NET_RAW). */
    int pg = open("/proc/sys/net/ipv4/ping_group_range", O_WRONLY | O_CLOEXEC);
    if (pg >= 0) {
        (void)!write(pg, "0 2147483647", 12);
        close(pg);
    }
    /* Ports below 1024 for every user of the sandbox, on its own addresses (as in a Docker container): a
     * template's service on :80 needs no root. */
    int up = open("/proc/sys/net/ipv4/ip_unprivileged_port_start", O_WRONLY | O_CLOEXEC);
    if (up >= 0) {
        (void)!write(up, "0", 1);
        close(up);
    }
    prepare_root("merged", hostname, shift);

    int ready[2], mapped[2], pids[2], c2p[2];
    if (pipe2(ready, O_CLOEXEC) < 0 || pipe2(mapped, O_CLOEXEC) < 0 || pipe2(pids, O_CLOEXEC) < 0 ||
        pipe2(c2p, O_CLOEXEC) < 0)
        die("pipe");
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        close(ready[0]);
        close(mapped[1]);
        close(pids[0]);
        close(c2p[0]);
        userns_child(ready[1], mapped[0], pids[1], c2p[1], "merged", shift);
        _exit(125);
    }
    close(ready[1]);
    close(mapped[0]);
    close(pids[1]);
    close(c2p[1]);
    char buf[4096];
    pid_t init = -1;
    int n = 0;
    if (read_all(ready[0], buf, 1) != 1 || buf[0] != 'U') goto child_failed;
    char path[64], map[64];
    snprintf(map, sizeof map, "0 %u %u\n", shift, range);
    snprintf(path, sizeof path, "%d/uid_map", child);
    write_file_at(procfd, path, map);
    snprintf(path, sizeof path, "%d/gid_map", child);
    write_file_at(procfd, path, map);
    if (write(mapped[1], "M", 1) != 1) die("sync write");
    if (read_all(pids[0], (char *)&init, sizeof init) != (int)sizeof init) goto child_failed;
    waitpid(child, NULL, 0);
    n = read_all(c2p[0], buf, 1);
    if (n != 1 || buf[0] != 'R') goto child_failed;
    printf("%d\n", init);
    fflush(stdout);
    return 0;

child_failed : {
    /* The children wrote their error text to the pipe (they dup'ed it onto stderr). */
    int off = n > 0 && buf[0] == 'R' ? 0 : n;
    int more = read_all(c2p[0], buf + off, sizeof buf - 1 - (size_t)off);
    buf[off + (more > 0 ? more : 0)] = 0;
    if (init > 0) kill(init, SIGKILL);
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    fprintf(stderr, "%s", buf[0] ? buf : "sbxhelper: sandbox init failed\n");
    return 125;
}
}

/* The sandbox's disk (runtime/quota.py): a sparse ext4 image on a loop device that detaches itself
 * when its last user (this mount, in the sandbox's mount namespace only) is gone. */
static void mount_disk(const char *image, const char *dir) {
    int ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (ctl < 0) die("open /dev/loop-control (the disk quota needs loop devices; --disk-mb 0 turns it off)");
    int img = open(image, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (img < 0) die("open %s", image);
    char dev[64];
    int loop = -1, direct = 1;
    for (int tries = 0; loop < 0; tries++) {
        /* Another create may take the same free device between GET_FREE and CONFIGURE: EBUSY, retry. */
        int n = ioctl(ctl, LOOP_CTL_GET_FREE);
        if (n < 0) die("LOOP_CTL_GET_FREE");
        snprintf(dev, sizeof dev, "/dev/loop%d", n);
        int fd = open(dev, O_RDWR | O_CLOEXEC);
        if (fd < 0) die("open %s", dev);
        struct loop_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.fd = (unsigned)img;
        cfg.block_size = 4096;
        /* direct I/O: the image's pages are not cached a second time in the host's page cache */
        cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR | (direct ? LO_FLAGS_DIRECT_IO : 0);
        if (ioctl(fd, LOOP_CONFIGURE, &cfg) == 0) {
            loop = fd;
            break;
        }
        int e = errno;
        close(fd);
        if (e == EINVAL && direct) {
            direct = 0; /* a backing filesystem without O_DIRECT: buffered I/O */
            continue;
        }
        errno = e;
        if (e != EBUSY || tries > 64) die("LOOP_CONFIGURE %s", dev);
    }
    close(img);
    close(ctl);
    if (mount(dev, dir, "ext4", MS_NOSUID | MS_NODEV, "discard,noinit_itable") < 0) die("mount %s on %s", dev, dir);
    close(loop); /* the mount holds the device now: with AUTOCLEAR, unmounting it detaches it */
}

/* Options shared by exec and broker: which sandbox, which identity. */
struct entry {
    pid_t target;
    uid_t uid;
    gid_t gid;
    gid_t groups[64];
    int ngroups, pty, report_fd, sock_fd, env_fd;
    unsigned long long start_time; /* the init's start time (clock ticks): tells it from a recycled PID */
    const char *cwd;
    const char *keep; /* --keep DIR: see keep_relay */
    int session_fd;   /* --session-fd, with --keep */
    long long keep_bytes; /* --keep-bytes: how much of its output is logged (1 MiB unless said) */
    int pty_master, pty_slave; /* --pty-master-fd, --pty-slave-fd: with --keep --pty */
    /* --adopt NS:HOST:START, --adopt-fds OUT:ERR:IN (-1: none): with --keep, keep a command that runs already
     * (restored from a snapshot into a new sandbox, init's child there) instead of starting one: its PID in the
     * sandbox and on the host, its start time, and our ends of its stdout, stderr and stdin pipes */
    const char *adopt, *adopt_fds;
    char *cgroups[MAX_CGROUPS];
    int ncg;
};

/* Parses options up to `--` (or the end); returns the index of the first argument after them. */
static int parse_entry(int argc, char **argv, struct entry *e) {
    memset(e, 0, sizeof *e);
    e->report_fd = e->sock_fd = e->env_fd = e->session_fd = e->pty_master = e->pty_slave = -1;
    int i;
    for (i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--")) return i + 1;
        if (!strcmp(a, "--pty")) {
            e->pty = 1;
            continue;
        }
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) die("missing value for %s", a);
        if (!strcmp(a, "--pid")) e->target = (pid_t)strtol(v, NULL, 10);
        else if (!strcmp(a, "--uid")) e->uid = (uid_t)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--gid")) e->gid = (gid_t)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--group")) {
            if (e->ngroups < 64) e->groups[e->ngroups++] = (gid_t)strtoul(v, NULL, 10);
        } else if (!strcmp(a, "--cwd")) e->cwd = v;
        else if (!strcmp(a, "--keep")) e->keep = v;
        else if (!strcmp(a, "--adopt")) e->adopt = v;
        else if (!strcmp(a, "--adopt-fds")) e->adopt_fds = v;
        else if (!strcmp(a, "--session-fd")) e->session_fd = (int)strtol(v, NULL, 10);
        else if (!strcmp(a, "--keep-bytes")) e->keep_bytes = strtoll(v, NULL, 10);
        else if (!strcmp(a, "--pty-master-fd")) e->pty_master = (int)strtol(v, NULL, 10);
        else if (!strcmp(a, "--pty-slave-fd")) e->pty_slave = (int)strtol(v, NULL, 10);
        else if (!strcmp(a, "--report-fd")) e->report_fd = (int)strtol(v, NULL, 10);
        else if (!strcmp(a, "--env-fd")) e->env_fd = (int)strtol(v, NULL, 10);
        else if (!strcmp(a, "--pid-start")) e->start_time = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--seccomp")) read_compiled(v);
        else if (!strcmp(a, "--sock")) e->sock_fd = (int)strtol(v, NULL, 10);
        else if (!strcmp(a, "--cgroup")) {
            if (e->ncg == MAX_CGROUPS) die("too many cgroups");
            e->cgroups[e->ncg++] = (char *)v;
        } else die("unknown option %s", a);
        i++;
    }
    return i;
}

/* The start time (field 22 of PID/stat, clock ticks since boot) of a process, 0 if unknown: in the proc
 * file system open as `procfd` (AT_FDCWD: /proc). */
static unsigned long long start_time_in(int procfd, pid_t pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "%s%d/stat", procfd == AT_FDCWD ? "/proc/" : "", pid);
    int fd = openat(procfd, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may contain anything: fields start after its ')' */
    if (!p) return 0;
    p++;
    for (int field = 3; field < 22 && p; field++) p = strchr(p + 1, ' '); /* p: before field 22 */
    return p ? strtoull(p + 1, NULL, 10) : 0;
}

static unsigned long long start_time_of(pid_t pid) {
    return start_time_in(AT_FDCWD, pid);
}

/* Join the sandbox's cgroups and namespaces (user namespace last: see the header comment). */
/* A pidfd of the sandbox's init (--pid), checked to be the process started at --pid-start (0: unchecked). */
static int open_init(pid_t target, unsigned long long start) {
    if (target <= 0) die("--pid is required");
    int pidfd = (int)syscall(SYS_pidfd_open, target, 0);
    if (pidfd < 0) die("sandbox init %d is gone", target);
    /* A PID names the init only while the init lives: check, through the pidfd, that it is the process
     * started at --pid-start and that it was still alive after the check (so the check read its /proc). */
    if (start && (start_time_of(target) != start || syscall(SYS_pidfd_send_signal, pidfd, 0, NULL, 0) < 0)) {
        errno = 0;
        die("sandbox init %d is gone (the PID now names another process)", target);
    }
    return pidfd;
}

static void enter_sandbox(const struct entry *e) {
    int pidfd = open_init(e->target, e->start_time);
    join_cgroups((char **)e->cgroups, e->ncg);
    if (setns(pidfd, CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWCGROUP) < 0)
        die("setns");
    if (setns(pidfd, CLONE_NEWUSER) < 0) die("setns(user)");
    close(pidfd);
}

/*
 * In the forked child: become the sandbox user, with the sandbox's restrictions.
 *
 * for_exec: a command. Its bounding set is Docker's default set whoever runs it, and no_new_privs is
 * NOT set, so that a setuid-root program of the sandbox (sudo, su, ping) works as it does on E2B and in
 * Docker: it becomes root *of the sandbox* (host uid BASE, Docker's capabilities inside the sandbox's
 * user namespace only) -- exactly what `commands.run(user="root")` already gives any API client. The
 * seccomp filter is installed before this (the caller still holds CAP_SYS_ADMIN in the sandbox's user
 * namespace, which the kernel requires without no_new_privs) and stays across every exec.
 * Otherwise (the file broker, which never execs): root keeps Docker's set, anyone else none, and
 * no_new_privs.
 */
static void become_user(const struct entry *e, int for_exec) {
    drop_bounding_set(for_exec || e->uid == 0);
    if (setgroups((size_t)e->ngroups, e->groups) < 0) die("setgroups");
    if (setresgid(e->gid, e->gid, e->gid) < 0) die("setresgid %u", e->gid);
    if (setresuid(e->uid, e->uid, e->uid) < 0) die("setresuid %u", e->uid);
    /* The kernel clears capabilities on setuid only when the old uid was root *of the current user
     * namespace*; ours was host root, unmapped here, so it did not. Set them explicitly: Docker's set
     * for sandbox root, none at all for anyone else (exec would drop them too; the broker never execs). */
    if (e->uid == 0) set_root_caps();
    else clear_caps();
    if (!for_exec && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) die("no_new_privs");
}

/* A request to the sandbox's init (see init_serve); -1 if it does not answer within 2 s (gone, or frozen). */
static int ask_init(uint32_t op, pid_t pid, struct init_rep *rep) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) return -1;
    int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct timeval tv = {2, 0};
    struct init_req req = {op, pid};
    struct sockaddr_un a;
    socklen_t alen = init_address(&a);
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {&req, sizeof req};
    struct msghdr msg = {.msg_name = &a, .msg_namelen = alen, .msg_iov = &iov, .msg_iovlen = 1};
    attach_fds(&msg, control.buf, &sv[1], 1);
    int ok = s >= 0 && setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) == 0 &&
             setsockopt(sv[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0 && sendmsg(s, &msg, MSG_NOSIGNAL) == (ssize_t)sizeof req;
    if (s >= 0) close(s);
    close(sv[1]);
    ssize_t n = -1;
    if (ok)
        while ((n = recv(sv[0], rep, sizeof *rep, 0)) < 0 && errno == EINTR) {}
    close(sv[0]);
    return n == (ssize_t)sizeof *rep ? 0 : -1;
}

/*
 * The command, started: `host`/`ns` its PID seen from the host and from the sandbox, `pidfd` one of it
 * (readable once it ends). `via_init`: it is init's child (registered with init, which tells how it ended);
 * else the helper's child `mid` stays its parent and exits as it does (init's table was full, or init did
 * not answer), and `pidfd` is mid's.
 */
struct spawned {
    pid_t mid, host, ns;
    int pidfd, via_init;
    unsigned long long start;
};

/* The command's wait status, once `sp->pidfd` said it ended; -1 if not yet. */
static int command_status(struct spawned *sp) {
    int status;
    if (!sp->via_init) return waitpid(sp->mid, &status, WNOHANG) == sp->mid ? status : -1;
    struct init_rep rep;
    if (ask_init(INIT_QUERY, sp->ns, &rep) < 0 || rep.state == CHILD_UNKNOWN) return SIGKILL; /* init is gone: killed with it */
    return rep.state == CHILD_ENDED ? rep.status : -1;
}

/* Blocks until the command ends; its wait status. */
static int command_wait(struct spawned *sp) {
    for (int tries = 0;; tries++) {
        struct pollfd p = {sp->pidfd, POLLIN, 0};
        if (poll(&p, 1, -1) < 0 && errno != EINTR) return SIGKILL;
        int status = command_status(sp);
        if (status >= 0) return status;
        if (tries > 200) return SIGKILL; /* ended, and init never reaps it: it is gone with init */
        usleep(10000);
    }
}

/* Parent side of exec and broker: report the child's host PID, then relay its exit status. */
static int relay_status(int status);

/* The helper's side of exec, once the command runs: report its host PID and start time (the server's
 * signals go through a pidfd checked against them), outlive the signals meant for the command's terminal or
 * session, and name ourselves. */
static void become_relay(const struct spawned *sp, int report_fd) {
    if (report_fd >= 0) {
        if (sp->host > 0) dprintf(report_fd, "h %d %llu\n", sp->host, sp->start);
        close(report_fd);
    }
    signal(SIGINT, SIG_IGN);
    signal(SIGTERM, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    prctl(PR_SET_NAME, "sandbox-exec", 0, 0, 0);
}

static int wait_and_relay(struct spawned *sp, int report_fd) {
    become_relay(sp, report_fd);
    /* Our stdio belongs to the child now. */
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull >= 0) {
        dup2(devnull, 0);
        dup2(devnull, 1);
        dup2(devnull, 2);
    }
    return relay_status(command_wait(sp));
}

/* Exit as the command did: with its exit code, or killed by the same signal. */
static int relay_status(int status) {
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    int sig = WTERMSIG(status);
    signal(sig, SIG_DFL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0); /* no core file for the relayed signal */
    kill(getpid(), sig);
    return 128 + sig;
}

/* The command's environment comes on a descriptor (`K=V\0` records), read only here, inside the sandbox
 * and under the user's identity: the environment an API client chose never reaches this host-root helper
 * while it is outside (its own environment is empty). */
#define MAX_ENV_BYTES (8 << 20)
static char **read_env(int fd) {
    struct stat st;
    if (fstat(fd, &st) < 0 || st.st_size < 0 || st.st_size > MAX_ENV_BYTES) die("bad --env-fd");
    size_t n = (size_t)st.st_size;
    char *buf = malloc(n + 1);
    if (!buf) die("malloc");
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, buf + got, n - got, (off_t)got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) die("read --env-fd");
        got += (size_t)r;
    }
    buf[n] = 0;
    close(fd);
    size_t count = 0;
    for (size_t i = 0; i < n; i++)
        if (!buf[i]) count++;
    char **envp = calloc(count + 1, sizeof *envp);
    if (!envp) die("calloc");
    size_t k = 0;
    for (size_t i = 0; i < n && k < count; i += strlen(buf + i) + 1) envp[k++] = buf + i;
    envp[k] = NULL;
    return envp;
}

/*
 * --keep DIR (exec): this helper keeps the command's I/O, so that the command outlives the
 * server (envd/processes.py, "kept processes"). The command gets pipes of ours; we relay its output to
 * the server's descriptors (our 1 and 2, blocking: the server's pace is the command's, as before) and log
 * it in DIR (out.0 / out.1, each truncated in turn: the last --keep-bytes/2..--keep-bytes of it), and relay our 0
 * to its stdin. The server also holds a session socket with us (--session-fd): "c" on it means that the
 * client closed stdin (the command then gets EOF once what was written is through); the session's end
 * means that the server went away: the command runs on, its output only logged, its stdin open. A new
 * server attaches through DIR/ctl (a SOCK_SEQPACKET socket in a directory only host root reaches): it sends the output
 * offset to start from and three descriptors (stdout, stderr, stdin); the logged output from that offset
 * is written to them first, and that connection is the new session. If no server is there at the
 * command's exit, DIR/status says how it ended; else (the usual end) DIR is removed. With --pty, the command's stdio is the terminal's slave and we relay its master
 * instead (the session also carries "r" + rows + cols: a resize).
 * DIR's files are opened (and ctl bound) before we enter the sandbox: they are host paths.
 */
#include <time.h>

#define KEEP_CHUNK 65536
#define KEEP_GRACE_MS 200 /* after the command's exit, how long output still held open (a background
                           * grandchild) is waited for */

struct keep_rec {
    uint32_t kind, len; /* kind: 1 stdout, 2 stderr */
    uint64_t offset;    /* of its first byte in all the output so far */
};

struct keep {
    int dir, parent, log[2], cur, listen_fd, session;
    char name[64]; /* DIR's name in its parent */
    int attached; /* a server other than our parent follows us: it learns the end from DIR/status */
    int pty; /* the terminal's master (--pty): resized on the session's request */
    off_t size, half; /* bytes in the current file; its limit */
    uint64_t offset;
};

static void keep_open(struct keep *k, const char *dir, int session, long long bytes) {
    memset(k, 0, sizeof *k);
    k->session = session;
    k->pty = k->log[0] = k->log[1] = -1;
    k->half = bytes / 2 < 4096 ? 4096 : (off_t)(bytes / 2);
    k->dir = open(dir, O_DIRECTORY | O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (k->dir < 0) die("open %s", dir);
    const char *slash = strrchr(dir, '/');
    if (!slash || strlen(slash + 1) >= sizeof k->name) die("bad --keep %s", dir);
    snprintf(k->name, sizeof k->name, "%s", slash + 1);
    k->parent = openat(k->dir, "..", O_DIRECTORY | O_RDONLY | O_CLOEXEC);
    if (k->parent < 0) die("open %s/..", dir);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "/proc/self/fd/%d/ctl", k->dir); /* any length of DIR */
    k->listen_fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (k->listen_fd < 0 || bind(k->listen_fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(k->listen_fd, 4) < 0)
        die("ctl socket in %s", dir);
}

/* A file of DIR, made when first needed (a command that writes nothing makes none): through the directory's
 * descriptor, opened while the host's paths were ours. */
static int keep_file(struct keep *k, const char *name) {
    return openat(k->dir, name, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
}

static void keep_log(struct keep *k, uint32_t kind, const char *buf, size_t n) {
    if (k->log[k->cur] < 0 || k->size >= k->half) {
        if (k->log[k->cur] >= 0) k->cur ^= 1;
        if (k->log[k->cur] < 0) k->log[k->cur] = keep_file(k, k->cur ? "out.1" : "out.0");
        else if (ftruncate(k->log[k->cur], 0) < 0) return;
        if (k->log[k->cur] < 0) return;
        k->size = 0;
    }
    struct keep_rec h = {kind, (uint32_t)n, k->offset};
    k->offset += n;
    /* best effort: a full host disk costs the log, never the command */
    if (pwrite(k->log[k->cur], &h, sizeof h, k->size) != (ssize_t)sizeof h) return;
    if (pwrite(k->log[k->cur], buf, n, k->size + (off_t)sizeof h) != (ssize_t)n) return;
    k->size += (off_t)(sizeof h + n);
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

/* The logged output from `from` on, to the server's new descriptors (older file first). */
static void keep_replay(struct keep *k, uint64_t from, int *out, int *err) {
    static char buf[KEEP_CHUNK];
    for (int i = 0; i < 2; i++) {
        int fd = k->log[i == 0 ? k->cur ^ 1 : k->cur];
        if (fd < 0) continue;
        off_t pos = 0, end = lseek(fd, 0, SEEK_END);
        struct keep_rec h;
        while (pos + (off_t)sizeof h <= end && pread(fd, &h, sizeof h, pos) == (ssize_t)sizeof h) {
            pos += (off_t)sizeof h;
            if (h.len > KEEP_CHUNK || pos + h.len > end) break;
            if (h.offset >= from) {
                int *to = h.kind == 2 ? err : out;
                if (*to >= 0 && (pread(fd, buf, h.len, pos) != (ssize_t)h.len || write_all(*to, buf, h.len) < 0))
                    close_fd(to);
            }
            pos += h.len;
        }
    }
}

/* A server attaches: {uint64 offset} + SCM_RIGHTS {stdout, stderr, stdin}. */
static void keep_attach(struct keep *k, int *out, int *err, int *in) {
    /* Only host root reaches DIR (0700 directories of root's, outside every sandbox's mount namespace);
     * SO_PEERCRED would not say more: we are in the sandbox's user namespace, where host root is unmapped. */
    int c = accept4(k->listen_fd, NULL, NULL, SOCK_CLOEXEC);
    if (c < 0) return;
    uint64_t from = 0;
    char control[CMSG_SPACE(3 * sizeof(int))];
    struct iovec iov = {&from, sizeof from};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    ssize_t n = recvmsg(c, &msg, MSG_CMSG_CLOEXEC);
    struct cmsghdr *cm = n == (ssize_t)sizeof from ? CMSG_FIRSTHDR(&msg) : NULL;
    if (!cm || cm->cmsg_type != SCM_RIGHTS || cm->cmsg_len != CMSG_LEN(3 * sizeof(int))) {
        if (cm && cm->cmsg_type == SCM_RIGHTS) /* close whatever came */
            for (int *f = (int *)CMSG_DATA(cm); (char *)f < (char *)cm + cm->cmsg_len; f++) close(*f);
        close(c);
        return;
    }
    int fds[3];
    memcpy(fds, CMSG_DATA(cm), sizeof fds);
    close_fd(out);
    close_fd(err);
    close_fd(in);
    *out = fds[0];
    *err = fds[1];
    *in = fds[2];
    fcntl(*in, F_SETFL, O_NONBLOCK);
    keep_replay(k, from, out, err);
    close_fd(&k->session);
    k->session = c; /* open while that server lives */
    k->attached = 1;
    (void)!write(c, "k", 1);
}

/*
 * The relay's state, and what the server may ask on the session (one SOCK_SEQPACKET message each):
 *   "c"            the client closed stdin
 *   "r" rows cols  a terminal's new size (uint16 each, host order)
 *   "s"            suspend: the sandbox is being checkpointed; the command's end (its pipes' EOF, its pidfd) is
 *                  no end until "g". Answer: "S" + uint64 inode of the out, err and in pipes (0: none), CRIU's
 *                  names of the files the command holds of ours.
 *   "n"            new pipes for the restored command: answer "N" + SCM_RIGHTS its ends of new out, err and in
 *                  pipes (those it had: nonzero inodes above, in that order); ours replace the old ones.
 *   "n" + master   a terminal's: the master of the new terminal the restored command gets (its slave goes to
 *                  CRIU, in place of the old one); answer "N".
 *   "t"            which terminal: answer "T" + uint64 rdev and dev of its slave (0 0: none), CRIU's name of
 *                  the terminal the command holds of ours (tty[RDEV:DEV]).
 *   "g" + pidfd    go on, following the restored command (a pidfd of it, which init's child it is again);
 *   "g"            without one: it ended before the checkpoint (init, restored, says how).
 *   "u"            go on as before (the checkpoint failed: the command ran on).
 *   "e"            the command is gone (the sandbox ended while checkpointed): it ended killed.
 */
struct relay {
    struct spawned *sp;
    int c_out, c_err, c_in;
    int closing, suspended, gone, ended, want_new;
    int new_pty; /* a terminal's new master ("n" with one): taken where the old one was */
    uint64_t ino[3];
    uint64_t tty[2]; /* a terminal's slave (rdev, dev) when suspended: what the dump wrote (see keep_which_tty) */
};

static uint64_t inode_of(int fd) {
    struct stat st;
    return fd >= 0 && fstat(fd, &st) == 0 ? (uint64_t)st.st_ino : 0;
}

/* The terminal's slave (the command's), as CRIU names it: rdev and dev (0 0: none). */
static void pty_slave_id(struct keep *k, uint64_t id[2]) {
    id[0] = id[1] = 0;
    int slave = k->pty >= 0 ? ioctl(k->pty, TIOCGPTPEER, O_RDONLY | O_NOCTTY | O_NONBLOCK | O_CLOEXEC) : -1;
    struct stat st;
    if (slave >= 0 && fstat(slave, &st) == 0) {
        id[0] = (uint64_t)st.st_rdev;
        id[1] = (uint64_t)st.st_dev;
    }
    if (slave >= 0) close(slave);
}

static void relay_suspend(struct keep *k, struct relay *r) {
    /* (suspended already, a new server asks again after a restart: a pipe closed since, by the dump, keeps the
     * inode it had) */
    int fds[3] = {r->c_out, r->c_err, r->c_in};
    for (int i = 0; i < 3; i++)
        if (fds[i] >= 0 || !r->suspended) r->ino[i] = inode_of(fds[i]);
    if (k->pty >= 0) r->ino[0] = r->ino[1] = r->ino[2] = 0; /* a terminal: nothing CRIU could restore */
    if (!r->suspended) pty_slave_id(k, r->tty);
    r->suspended = 1;
    char m[1 + sizeof r->ino];
    m[0] = 'S';
    memcpy(m + 1, r->ino, sizeof r->ino);
    (void)!send(k->session, m, sizeof m, MSG_NOSIGNAL);
}

static void relay_new_pipes(struct keep *k, struct relay *r) {
    int theirs[3], n = 0;
    int *ours[3] = {&r->c_out, &r->c_err, &r->c_in};
    for (int i = 0; i < 3; i++) {
        int p[2];
        if (!r->ino[i]) continue;
        if (pipe2(p, O_CLOEXEC) < 0) break;
        close_fd(ours[i]);
        *ours[i] = i < 2 ? p[0] : p[1];
        fcntl(*ours[i], F_SETFL, O_NONBLOCK);
        theirs[n++] = i < 2 ? p[1] : p[0];
    }
    union {
        char buf[CMSG_SPACE(3 * sizeof(int))];
        struct cmsghdr align;
    } control;
    char tag = 'N';
    struct iovec iov = {&tag, 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    attach_fds(&msg, control.buf, theirs, n);
    (void)!sendmsg(k->session, &msg, MSG_NOSIGNAL);
    for (int i = 0; i < n; i++) close(theirs[i]);
}

/* "t": which terminal the command has of ours (see above); suspended, the one it had at the dump (a new server
 * asks again after a restart, maybe after a restore that failed once it had given us a new terminal). */
static void keep_which_tty(struct keep *k, struct relay *r) {
    uint64_t id[2];
    if (r->suspended) memcpy(id, r->tty, sizeof id);
    else pty_slave_id(k, id);
    char m[1 + sizeof id];
    m[0] = 'T';
    memcpy(m + 1, id, sizeof id);
    (void)!send(k->session, m, sizeof m, MSG_NOSIGNAL);
}

/* Everything the server sent on the session so far; -1 if it is gone (or went), 0 otherwise. */
static int keep_session(struct keep *k, struct relay *r) {
    for (;;) {
        if (k->session < 0) return -1;
        unsigned char m[8];
        union {
            char buf[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } control;
        struct iovec iov = {m, sizeof m};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf, .msg_controllen = sizeof control.buf};
        ssize_t n = recvmsg(k->session, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
        if (n <= 0) {
            close_fd(&k->session);
            return -1;
        }
        int fd = take_one_fd(&msg); /* (the server's: one at most, with "g") */
        if (m[0] == 'r' && n == 5 && k->pty >= 0) {
            uint16_t rc[2];
            memcpy(rc, m + 1, sizeof rc);
            struct winsize ws = {.ws_row = rc[0], .ws_col = rc[1]};
            ioctl(k->pty, TIOCSWINSZ, &ws);
        } else if (m[0] == 'c') r->closing = 1;
        else if (m[0] == 's') relay_suspend(k, r);
        else if (m[0] == 'n' && r->suspended) {
            r->want_new = 1; /* (the relay drains the old pipes first) */
            if (fd >= 0 && k->pty >= 0 && r->new_pty < 0) {
                r->new_pty = fd;
                fd = -1;
            }
        } else if (m[0] == 't') keep_which_tty(k, r);
        else if (m[0] == 'g' && r->suspended && fd >= 0) {
            close(r->sp->pidfd);
            r->sp->pidfd = fd;
            r->sp->via_init = 1;
            r->suspended = 0;
            fd = -1;
        } else if (m[0] == 'g' && r->suspended) {
            r->suspended = 0;
            r->ended = 1;
        } else if (m[0] == 'u') r->suspended = 0;
        else if (m[0] == 'e') r->gone = 1;
        if (fd >= 0) close(fd);
    }
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

/* One read of the command's output from *FROM, logged (as KIND) and relayed to *TO (closed once the server is
 * gone): 1 if there may be more now, 0 if not (EAGAIN), -1 at its end (*FROM closed; a terminal's master says
 * EIO there). */
static int relay_chunk(struct keep *k, int *from, uint32_t kind, int *to, char *buf, size_t size) {
    ssize_t n = read(*from, buf, size);
    if (n < 0 && errno == EINTR) return 1;
    if (n < 0 && errno == EAGAIN) return 0;
    if (n <= 0) {
        close_fd(from);
        return -1;
    }
    keep_log(k, kind, buf, (size_t)n);
    if (*to >= 0 && write_all(*to, buf, (size_t)n) < 0) close_fd(to);
    return 1;
}

/* The relay (see above); returns the command's wait status. */
static int keep_relay(struct keep *k, struct spawned *sp, int c_out, int c_err, int c_in) {
    uint32_t out_kind = k->pty >= 0 ? 3 : 1; /* 3: a terminal's output (the server's "pty" events) */
    static char buf[KEEP_CHUNK], inbuf[KEEP_CHUNK];
    struct relay r = {.sp = sp, .c_out = c_out, .c_err = c_err, .c_in = c_in, .new_pty = -1};
    int srv_out = 1, srv_err = 2, srv_in = c_in >= 0 ? 0 : -1;
    if (srv_in >= 0) fcntl(srv_in, F_SETFL, O_NONBLOCK);
    fcntl(r.c_out, F_SETFL, O_NONBLOCK);
    if (r.c_err >= 0) fcntl(r.c_err, F_SETFL, O_NONBLOCK);
    if (r.c_in >= 0) fcntl(r.c_in, F_SETFL, O_NONBLOCK);
    size_t in_len = 0, in_off = 0;
    int in_eof = 0, status = 0, reaped = 0, asked = 0;
    long long exited_at = 0;
    for (;;) {
        if (r.want_new) {
            /* The new pipes replace the old ones, whose writer (the dumped command) is gone: what it wrote that
             * we had not read yet (CRIU's images keep it, but a restore that inherits a pipe does not refill
             * it) is read to its end first, logged and relayed as any output. */
            while (r.c_out >= 0 && relay_chunk(k, &r.c_out, out_kind, &srv_out, buf, sizeof buf) > 0) continue;
            while (r.c_err >= 0 && relay_chunk(k, &r.c_err, 2, &srv_err, buf, sizeof buf) > 0) continue;
            /* And what we wrote to its stdin that it had not read yet: still in the old pipe, which its reader's
             * end (the dumped command's) no longer holds; read back through a new read end of it, it goes first
             * into the new one (empty: it takes a pipe's worth at once). */
            static char unread[1 << 16];
            ssize_t n_unread = 0;
            if (k->pty >= 0) { /* a terminal: the new one's master (what was typed and not read is lost with the old) */
                if (r.new_pty >= 0) {
                    close_fd(&r.c_out);
                    close_fd(&r.c_in);
                    close(k->pty);
                    k->pty = r.new_pty;
                    r.new_pty = -1;
                    fcntl(k->pty, F_SETFD, FD_CLOEXEC);
                    r.c_out = fcntl(k->pty, F_DUPFD_CLOEXEC, 3);
                    r.c_in = fcntl(k->pty, F_DUPFD_CLOEXEC, 3);
                    if (r.c_out >= 0) fcntl(r.c_out, F_SETFL, O_NONBLOCK);
                    if (r.c_in >= 0) fcntl(r.c_in, F_SETFL, O_NONBLOCK);
                }
                (void)!send(k->session, "N", 1, MSG_NOSIGNAL);
                r.want_new = 0;
                continue;
            }
            if (r.c_in >= 0) {
                char path[64];
                snprintf(path, sizeof path, "/proc/self/fd/%d", r.c_in);
                int rd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
                if (rd >= 0) {
                    n_unread = read(rd, unread, sizeof unread);
                    close(rd);
                }
            }
            relay_new_pipes(k, &r);
            if (n_unread > 0 && r.c_in >= 0) (void)!write(r.c_in, unread, (size_t)n_unread);
            r.want_new = 0;
        }
        if ((r.gone || r.ended) && !reaped) {
            status = r.ended ? command_status(sp) : SIGKILL;
            if (status < 0) status = SIGKILL;
            reaped = 1;
            exited_at = now_ms() - (r.gone ? KEEP_GRACE_MS : 0);
        }
        if (reaped && r.c_out < 0 && r.c_err < 0) break;
        int timeout = -1;
        if (reaped) {
            long long left = exited_at + KEEP_GRACE_MS - now_ms();
            if (left <= 0) break;
            timeout = (int)left;
        }
        struct pollfd p[7];
        int np = 0, i_out = -1, i_err = -1, i_sin = -1, i_cin = -1, i_pid = -1, i_ses = -1, i_lis;
        if (k->session >= 0) { p[np] = (struct pollfd){k->session, POLLIN, 0}; i_ses = np++; }
        if (r.c_out >= 0) { p[np] = (struct pollfd){r.c_out, POLLIN, 0}; i_out = np++; }
        if (r.c_err >= 0) { p[np] = (struct pollfd){r.c_err, POLLIN, 0}; i_err = np++; }
        if (srv_in >= 0 && !in_len && r.c_in >= 0) { p[np] = (struct pollfd){srv_in, POLLIN, 0}; i_sin = np++; }
        if (r.c_in >= 0 && in_len) { p[np] = (struct pollfd){r.c_in, POLLOUT, 0}; i_cin = np++; }
        if (!reaped && !r.suspended) { p[np] = (struct pollfd){sp->pidfd, POLLIN, 0}; i_pid = np++; }
        p[np] = (struct pollfd){k->listen_fd, POLLIN, 0};
        i_lis = np++;
        int n_poll = poll(p, (nfds_t)np, timeout);
        if (n_poll < 0 && errno == EINTR) continue;
        if (n_poll < 0) break;
        if (i_out >= 0 && p[i_out].revents) relay_chunk(k, &r.c_out, out_kind, &srv_out, buf, sizeof buf);
        if (i_err >= 0 && p[i_err].revents) relay_chunk(k, &r.c_err, 2, &srv_err, buf, sizeof buf);
        if (i_ses >= 0 && p[i_ses].revents) keep_session(k, &r);
        if (i_sin >= 0 && p[i_sin].revents) {
            ssize_t n = read(srv_in, inbuf, sizeof inbuf);
            if (n > 0) {
                in_len = (size_t)n;
                in_off = 0;
            } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
                close_fd(&srv_in);
                /* the client closed stdin ("c" comes before the pipe's end); else the server went away and
                 * the command's stdin stays open for the next one */
                keep_session(k, &r);
                if (r.closing) in_eof = 1;
            }
        }
        if (i_cin >= 0 && p[i_cin].revents) {
            ssize_t w = write(r.c_in, inbuf + in_off, in_len - in_off);
            if (w > 0) {
                in_off += (size_t)w;
                if (in_off == in_len) in_len = in_off = 0;
            } else if (w < 0 && errno != EAGAIN && errno != EINTR) {
                close_fd(&r.c_in); /* the command closed its stdin (or it was checkpointed: a new one comes) */
                if (!r.suspended) in_len = in_off = 0;
            }
        }
        if (in_eof && !in_len) close_fd(&r.c_in);
        if (i_pid >= 0 && p[i_pid].revents) { /* it ended: how, init says (or our child, see spawned) */
            int st = command_status(sp);
            if (st < 0 && ++asked > 200) st = SIGKILL; /* init never reaps it: gone with init */
            if (st < 0) usleep(10000);
            else {
                status = st;
                reaped = 1;
                exited_at = now_ms();
            }
        }
        if (p[i_lis].revents) {
            keep_attach(k, &srv_out, &srv_err, &srv_in);
            /* a new server: the last one died while it checkpointed the sandbox; if the command still runs,
             * the checkpoint did not happen (it asks again if it does it) */
            if (r.suspended && syscall(SYS_pidfd_send_signal, sp->pidfd, 0, NULL, 0) == 0) r.suspended = 0;
        }
    }
    if (!reaped) status = command_wait(sp);
    char line[64];
    int n = WIFEXITED(status) ? snprintf(line, sizeof line, "exit %d\n", WEXITSTATUS(status))
                              : snprintf(line, sizeof line, "signal %d\n", WTERMSIG(status));
    if (k->attached || keep_session(k, &r) < 0) { /* no server hears it from our exit status: it goes in DIR */
        int fd = keep_file(k, "status");
        if (fd >= 0) (void)!pwrite(fd, line, (size_t)n, 0);
    } else { /* the usual end: the server that started us hears it; nothing of DIR is needed any more */
        static const char *const files[] = {"ctl", "meta.json", "out.0", "out.1"};
        /* (the server may be writing meta.json right now, for a command this short: then again) */
        for (int tries = 0; tries < 3; tries++) {
            for (size_t i = 0; i < sizeof files / sizeof *files; i++) unlinkat(k->dir, files[i], 0);
            if (unlinkat(k->parent, k->name, AT_REMOVEDIR) == 0 || errno != ENOTEMPTY) break;
        }
    }
    return status;
}

/* In the command's process: its stdio, a session of its own, the sandbox's confinement and the user's
 * identity, then the program. */
static void run_command(const struct entry *e, char **cmd, const int *c_out, const int *c_err, const int *c_in) {
    signal(SIGPIPE, SIG_DFL);
    if (e->keep && e->pty && (dup2(e->pty_slave, 0) < 0 || dup2(e->pty_slave, 1) < 0 || dup2(e->pty_slave, 2) < 0))
        die("dup2");
    if (e->keep && !e->pty && (dup2(c_out[1], 1) < 0 || dup2(c_err[1], 2) < 0 || (c_in[0] >= 0 && dup2(c_in[0], 0) < 0)))
        die("dup2");
    /* The host's /dev/null given as stdio becomes the sandbox's own (a checkpoint takes no file of a mount that
     * is not the sandbox's; we are in its mount namespace). */
    int devnull = -1;
    for (int fd = 0; fd < 3; fd++) {
        struct stat st;
        if (fstat(fd, &st) < 0 || !S_ISCHR(st.st_mode) || st.st_rdev != makedev(1, 3)) continue;
        if (devnull < 0 && (devnull = open("/dev/null", O_RDWR | O_CLOEXEC)) < 0) die("open /dev/null");
        if (dup2(devnull, fd) < 0) die("dup2");
    }
    /* Our PID as the sandbox sees it (report_fd is close-on-exec: gone once we exec). */
    if (e->report_fd >= 0) dprintf(e->report_fd, "c %d\n", getpid());
    /* A session (and process group) of its own, inside the sandbox: signals go to its group, and a
     * checkpoint finds no session leader outside the sandbox's PID namespace. */
    if (setsid() < 0) die("setsid");
    if (e->pty && ioctl(0, TIOCSCTTY, 0) < 0) die("TIOCSCTTY");
    apply_seccomp(); /* first: without no_new_privs, installing it needs the caps we still hold */
    become_user(e, 1);
    if (e->cwd && chdir(e->cwd) < 0) {
        int err = errno;
        dprintf(2, "sandboxd: cannot use working directory '%s': %s\n", e->cwd, strerror(err));
        _exit(1);
    }
    if (e->env_fd >= 0) environ = read_env(e->env_fd);
    execvpe(cmd[0], cmd, environ);
    int err = errno;
    dprintf(2, "sandboxd: cannot execute '%s': %s\n", cmd[0], strerror(err));
    _exit(err == ENOENT ? 127 : 126);
}

/*
 * Start the command as init's child (see init_serve): our child ("mid") forks it and reports its PID in the
 * sandbox; we find its host PID (mid's only child, in the host's /proc: `hostproc`), open a pidfd of it and
 * register it with init while mid, its parent, still lives (so init, which reaps it once mid is gone, keeps
 * its status for us); then mid exits. If init does not take it, mid stays its parent and relays its end.
 */
static void spawn_command(struct spawned *sp, int hostproc, int initfd, const struct entry *e, char **cmd,
                          const int *c_out, const int *c_err, const int *c_in) {
    int rep[2], ctl[2];
    if (pipe2(rep, O_CLOEXEC) < 0 || pipe2(ctl, O_CLOEXEC) < 0) die("pipe");
    memset(sp, 0, sizeof *sp);
    sp->pidfd = -1;
    if ((sp->mid = fork()) < 0) die("fork");
    if (sp->mid == 0) {
        /* the sandbox's namespaces (its PID namespace: ours already, as the helper chose it for its children) */
        if (setns(initfd, CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP) < 0) die("setns");
        if (setns(initfd, CLONE_NEWUSER) < 0) die("setns(user)");
        close(initfd);
        pid_t child = fork();
        if (child < 0) die("fork");
        if (child == 0) {
            close(hostproc);
            run_command(e, cmd, c_out, c_err, c_in);
        }
        if (write(rep[1], &child, sizeof child) != (ssize_t)sizeof child) _exit(125);
        /* hold nothing of the command's or the server's: only ctl[0] */
        int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
        for (int fd = 0; fd < 3; fd++) dup2(devnull, fd);
        if (dup2(ctl[0], 3) < 0) _exit(125);
        syscall(SYS_close_range, 4, ~0U, 0);
        char c = 0;
        if (read_all(3, &c, 1) != 1 || c != 'w') _exit(0);
        int status;
        while (waitpid(child, &status, 0) < 0)
            if (errno != EINTR) _exit(125);
        _exit(relay_status(status));
    }
    close(rep[1]);
    close(ctl[0]);
    int got = read_all(rep[0], (char *)&sp->ns, sizeof sp->ns);
    close(rep[0]);
    if (got != (int)sizeof sp->ns || sp->ns <= 1) {
        waitpid(sp->mid, NULL, 0);
        die("the command could not be started");
    }
    char path[64], buf[64];
    snprintf(path, sizeof path, "%d/task/%d/children", sp->mid, sp->mid);
    int fd = openat(hostproc, path, O_RDONLY | O_CLOEXEC);
    got = fd >= 0 ? read_all(fd, buf, sizeof buf - 1) : -1;
    if (fd >= 0) close(fd);
    buf[got > 0 ? got : 0] = 0;
    sp->host = (pid_t)strtol(buf, NULL, 10); /* (mid's only child: even if it ended already, a zombie) */
    if (sp->host > 0) {
        sp->pidfd = (int)syscall(SYS_pidfd_open, sp->host, 0);
        sp->start = start_time_in(hostproc, sp->host);
    }
    struct init_rep r;
    sp->via_init = sp->pidfd >= 0 && sp->start && ask_init(INIT_REGISTER, sp->ns, &r) == 0 && r.state == CHILD_RUNNING;
    if (write(ctl[1], sp->via_init ? "x" : "w", 1) != 1) die("write");
    close(ctl[1]);
    if (sp->via_init) {
        while (waitpid(sp->mid, NULL, 0) < 0 && errno == EINTR) {}
    } else {
        if (sp->pidfd >= 0) close(sp->pidfd);
        if ((sp->pidfd = (int)syscall(SYS_pidfd_open, sp->mid, 0)) < 0) die("pidfd_open");
    }
}

/* exec --keep ... --adopt: see struct entry. The command is not started, only kept (its relay as any other). */
static int adopt_command(struct entry *e, char **cmd) {
    (void)cmd; /* (the command's record, for the server: it runs already) */
    struct keep k;
    int fds[3] = {-1, -1, -1};
    pid_t ns = 0, host = 0;
    unsigned long long start = 0;
    if (!e->keep || e->session_fd < 0 || !e->adopt_fds) die("--adopt needs --keep, --session-fd, --adopt-fds");
    if (sscanf(e->adopt, "%d:%d:%llu", &ns, &host, &start) != 3 || ns <= 0 || host <= 0 || !start)
        die("bad --adopt %s", e->adopt);
    if (sscanf(e->adopt_fds, "%d:%d:%d", &fds[0], &fds[1], &fds[2]) != 3 || fds[0] < 0)
        die("bad --adopt-fds %s", e->adopt_fds);
    for (int i = 0; i < 3; i++)
        if (fds[i] >= 0 && (fds[i] < 3 || fcntl(fds[i], F_SETFD, FD_CLOEXEC) < 0)) die("bad --adopt-fds %s", e->adopt_fds);
    fcntl(e->session_fd, F_SETFD, FD_CLOEXEC);
    keep_open(&k, e->keep, e->session_fd, e->keep_bytes > 0 ? e->keep_bytes : 1 << 20);
    if (e->pty) { /* --pty: OUT is its terminal's master (ERR, IN: -1), relayed both ways as cmd_exec does */
        if (fds[1] >= 0 || fds[2] >= 0) die("--adopt --pty: --adopt-fds MASTER:-1:-1");
        k.pty = fds[0];
        fds[0] = fcntl(k.pty, F_DUPFD_CLOEXEC, 3);
        fds[2] = fcntl(k.pty, F_DUPFD_CLOEXEC, 3);
        if (fds[0] < 0 || fds[2] < 0) die("dup");
    }
    int initfd = open_init(e->target, e->start_time);
    join_cgroups((char **)e->cgroups, e->ncg);
    if (setns(initfd, CLONE_NEWNET) < 0) die("setns");
    close(initfd);
    struct spawned sp = {.mid = -1, .host = host, .ns = ns, .via_init = 1, .start = start};
    sp.pidfd = open_init(host, start); /* (the command, checked by its start time as init is) */
    if (e->report_fd >= 0) dprintf(e->report_fd, "c %d\n", ns);
    become_relay(&sp, e->report_fd);
    return relay_status(keep_relay(&k, &sp, fds[0], fds[1], fds[2]));
}

static int cmd_exec(int argc, char **argv) {
    struct entry e;
    int i = parse_entry(argc, argv, &e);
    if (e.report_fd >= 0) fcntl(e.report_fd, F_SETFD, FD_CLOEXEC);
    if (e.env_fd >= 0) fcntl(e.env_fd, F_SETFD, FD_CLOEXEC);
    if (i >= argc) die("exec needs -- argv");
    char **cmd = argv + i;
    struct keep k;
    int c_out[2] = {-1, -1}, c_err[2] = {-1, -1}, c_in[2] = {-1, -1};
    if (e.adopt) return adopt_command(&e, cmd);
    if (e.keep) {
        if (e.session_fd < 0) die("--keep needs --session-fd");
        fcntl(e.session_fd, F_SETFD, FD_CLOEXEC);
        keep_open(&k, e.keep, e.session_fd, e.keep_bytes > 0 ? e.keep_bytes : 1 << 20);
        struct stat st;
        if (e.pty) {
            /* a terminal: the command's stdio is its slave, we relay its master (output and input) */
            if (e.pty_master < 0 || e.pty_slave < 0) die("--keep --pty needs --pty-master-fd and --pty-slave-fd");
            fcntl(e.pty_master, F_SETFD, FD_CLOEXEC);
            fcntl(e.pty_slave, F_SETFD, FD_CLOEXEC);
            k.pty = e.pty_master;
            c_out[0] = fcntl(e.pty_master, F_DUPFD_CLOEXEC, 3);
            c_in[1] = fcntl(e.pty_master, F_DUPFD_CLOEXEC, 3);
            if (c_out[0] < 0 || c_in[1] < 0) die("dup");
        } else if (pipe2(c_out, O_CLOEXEC) < 0 || pipe2(c_err, O_CLOEXEC) < 0 ||
                   /* our stdin is the server's pipe (relayed), or /dev/null (given to the command as it is) */
                   (fstat(0, &st) == 0 && !S_ISCHR(st.st_mode) && pipe2(c_in, O_CLOEXEC) < 0))
            die("pipe");
    }
    int hostproc = open("/proc", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (hostproc < 0) die("open /proc");
    /* We join only the sandbox's cgroups (what we cost is the sandbox's), network namespace (init's socket)
     * and, for our children, PID namespace: holding none of its mount namespace, we never keep its files
     * mounted (its disk is let go of once its processes end: a checkpoint, which we outlive). */
    int initfd = open_init(e.target, e.start_time);
    join_cgroups((char **)e.cgroups, e.ncg);
    if (setns(initfd, CLONE_NEWNET | CLONE_NEWPID) < 0) die("setns");
    struct spawned sp;
    spawn_command(&sp, hostproc, initfd, &e, cmd, c_out, c_err, c_in);
    close(initfd);
    close(hostproc);
    if (!e.keep) return wait_and_relay(&sp, e.report_fd);
    if (e.pty) close(e.pty_slave); /* the command's end of it: EIO on the master once it and its children close theirs */
    if (c_out[1] >= 0) close(c_out[1]);
    if (c_err[1] >= 0) close(c_err[1]);
    if (c_in[0] >= 0) close(c_in[0]);
    become_relay(&sp, e.report_fd);
    return relay_status(keep_relay(&k, &sp, c_out[0], c_err[0], c_in[1]));
}

/*
 * broker: file operations inside the sandbox, as one of its users, for the server's filesystem API.
 *
 * Paths are resolved here, in the sandbox's mount namespace with its root as ours, under the user's
 * identity and the sandbox's seccomp filter: exactly as a process in the sandbox would. Whatever the
 * sandbox plants (symlinks, .., bind tricks, FIFOs) can therefore reach nothing it could not reach
 * itself. Opened files go back to the server as file descriptors (SCM_RIGHTS), so the server moves
 * data without ever resolving a sandbox path on the host.
 *
 * Protocol on the SOCK_SEQPACKET socket --sock: request = struct broker_req + path1 (len1 bytes)
 * + path2 (rest); reply = struct broker_rep (+ one fd for OPEN). EOF on the socket ends the broker.
 */
enum {
    OP_OPEN = 1, OP_MKDIR = 2, OP_MKDIRS = 3, OP_RENAME = 4, OP_UNLINK = 5, OP_REMOVE_ALL = 6, OP_RMDIR = 7,
    OP_READLINK = 8, OP_REALPATH = 9, OP_COUNT_DIRS = 10, OP_INOTIFY = 11,
};

/* OP_COUNT_DIRS: directories under a path (itself included, symlinks not followed), counting stops
 * past a limit. Lets the server refuse a recursive watch over too large a tree at once, with the walk
 * done here, in the sandbox and on its CPU, rather than one round trip per directory. */
static long count_dirs_seen, count_dirs_limit;
static int count_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)path;
    (void)st;
    (void)ftw;
    if (flag == FTW_D && ++count_dirs_seen > count_dirs_limit) return 1; /* enough: stop the walk */
    return 0;
}

/* (openat2: see open_in_root) a broker request never follows a magic link of /proc (/proc/self/exe,
 * /proc/<pid>/fd/N, map_files, ...): they lead to objects outside the path hierarchy. */

static int open_no_magic(const char *path, int flags, mode_t mode) {
    /* a mode only with O_CREAT or O_TMPFILE (whose bits include O_DIRECTORY's): openat2 rejects it otherwise */
    int creating = (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE;
    struct open_how_ how = {(uint64_t)(flags | O_CLOEXEC), creating ? mode : 0, RESOLVE_NO_MAGICLINKS_};
    return (int)syscall(SYS_openat2, AT_FDCWD, path, &how, sizeof how);
}

struct broker_req {
    uint32_t op, flags, mode, len1;
};
struct broker_rep {
    int32_t err, value;
};

static int mkdirs(char *path, mode_t mode) {
    size_t n = strlen(path);
    for (size_t i = 1; i <= n; i++) {
        if (path[i] != '/' && path[i] != 0) continue;
        char saved = path[i];
        path[i] = 0;
        int r = mkdir(path, mode);
        int err = errno;
        path[i] = saved;
        if (r < 0 && err != EEXIST) return err;
        if (r < 0) {
            struct stat st;
            path[i] = 0;
            int sr = stat(path, &st);
            path[i] = saved;
            if (sr < 0) return errno;
            if (!S_ISDIR(st.st_mode)) return ENOTDIR;
        }
    }
    return 0;
}

static int remove_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st;
    (void)ftw;
    int r = (flag == FTW_DP) ? rmdir(path) : unlink(path);
    return r < 0 && errno != ENOENT ? errno : 0;
}

static void broker_loop(int sock) {
    char buf[2 * 4096 + sizeof(struct broker_req) + 8];
    for (;;) {
        ssize_t n = recv(sock, buf, sizeof buf - 2, 0);
        if (n == 0) _exit(0);
        if (n < 0) {
            if (errno == EINTR) continue;
            _exit(0);
        }
        struct broker_rep rep = {0, 0};
        int fd = -1;
        char text[4096]; /* reply payload (readlink, realpath) */
        size_t text_len = 0;
        if ((size_t)n < sizeof(struct broker_req)) {
            rep.err = EINVAL;
            goto reply;
        }
        struct broker_req req;
        memcpy(&req, buf, sizeof req);
        size_t rest = (size_t)n - sizeof req;
        if (req.len1 > rest || req.len1 > 4095 || rest - req.len1 > 4095) {
            rep.err = ENAMETOOLONG;
            goto reply;
        }
        char p1[4096], p2[4096];
        memcpy(p1, buf + sizeof req, req.len1);
        p1[req.len1] = 0;
        memcpy(p2, buf + sizeof req + req.len1, rest - req.len1);
        p2[rest - req.len1] = 0;
        if (strlen(p1) != req.len1) {
            rep.err = EINVAL; /* NUL inside a path */
            goto reply;
        }
        switch (req.op) {
        case OP_OPEN:
            fd = open_no_magic(p1, (int)req.flags, (mode_t)req.mode);
            if (fd < 0) rep.err = errno;
            break;
        case OP_READLINK: {
            ssize_t n = readlink(p1, text, sizeof text);
            if (n < 0) rep.err = errno;
            else if ((size_t)n >= sizeof text) rep.err = ENAMETOOLONG;
            else text_len = (size_t)n;
            break;
        }
        case OP_REALPATH: {
            char *r = realpath(p1, NULL);
            if (!r) rep.err = errno;
            else if (strlen(r) >= sizeof text) rep.err = ENAMETOOLONG;
            else {
                text_len = strlen(r);
                memcpy(text, r, text_len);
            }
            free(r);
            break;
        }
        case OP_COUNT_DIRS: {
            count_dirs_seen = 0;
            count_dirs_limit = (long)req.flags;
            if (nftw(p1, count_one, 32, FTW_PHYS) < 0) rep.err = errno;
            text_len = (size_t)snprintf(text, sizeof text, "%ld", count_dirs_seen);
            break;
        }
        case OP_INOTIFY:
            /* an inotify instance made by the sandbox's user: it and its watches are charged to the
             * sandbox (up its user namespace's chain), not to the server's host root */
            fd = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
            if (fd < 0) rep.err = errno;
            break;
        case OP_MKDIR:
            if (mkdir(p1, (mode_t)req.mode) < 0) rep.err = errno;
            break;
        case OP_MKDIRS:
            rep.err = mkdirs(p1, (mode_t)req.mode);
            break;
        case OP_RENAME:
            if (rename(p1, p2) < 0) rep.err = errno;
            break;
        case OP_UNLINK:
            if (unlink(p1) < 0) rep.err = errno;
            break;
        case OP_RMDIR:
            if (rmdir(p1) < 0) rep.err = errno;
            break;
        case OP_REMOVE_ALL: {
            struct stat st;
            if (lstat(p1, &st) < 0) rep.err = errno == ENOENT ? 0 : errno;
            else if (!S_ISDIR(st.st_mode)) rep.err = unlink(p1) < 0 ? errno : 0;
            else {
                int r = nftw(p1, remove_one, 32, FTW_DEPTH | FTW_PHYS);
                rep.err = r == 0 ? 0 : r > 0 ? r : errno;
            }
            break;
        }
        default:
            rep.err = ENOSYS;
        }
    reply : {
        rep.value = (int32_t)text_len;
        struct iovec iov[2] = {{&rep, sizeof rep}, {text, text_len}};
        union {
            char b[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } ctl;
        struct msghdr msg = {0};
        msg.msg_iov = iov;
        msg.msg_iovlen = text_len ? 2 : 1;
        attach_fds(&msg, ctl.b, &fd, fd >= 0);
        while (sendmsg(sock, &msg, MSG_NOSIGNAL) < 0)
            if (errno != EINTR) _exit(0);
        if (fd >= 0) close(fd);
    }
    }
}

static int cmd_broker(int argc, char **argv) {
    struct entry e;
    parse_entry(argc, argv, &e);
    if (e.sock_fd < 0) die("broker needs --sock");
    fcntl(e.sock_fd, F_SETFD, FD_CLOEXEC);
    enter_sandbox(&e);
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        become_user(&e, 0);
        /* Not ptrace-able by the sandbox's processes, which share our uid. */
        if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0) die("dumpable");
        apply_seccomp();
        umask(022);
        if (chdir("/") < 0) die("chdir /");
        prctl(PR_SET_NAME, "sandbox-files", 0, 0, 0);
        /* Our arguments name host paths (cgroups, the init's host PID): the sandbox sees our
         * /proc/PID/cmdline, so overwrite them. */
        memset(argv[0], 0, (size_t)(argv_end - argv[0]));
        strcpy(argv[0], "sandbox-files");
        broker_loop(e.sock_fd);
        _exit(0);
    }
    close(e.sock_fd);
    /* (the broker stays our child: it ends with the server's socket, and never with a checkpoint's tree) */
    struct spawned sp = {.mid = child, .pidfd = (int)syscall(SYS_pidfd_open, child, 0)};
    if (sp.pidfd < 0) die("pidfd_open");
    return wait_and_relay(&sp, -1);
}

/*
 * Checkpoints (pause to disk, docs/architecture.md): CRIU runs `--unprivileged` as the sandbox's owner uid
 * with every capability kept (become_owner): the restored user namespace is then the sandbox's own again,
 * and the rlimits and /proc entries of the sandbox's processes are readable to it. The UTS and network
 * namespaces are the host's: CRIU runs inside them (it dumps only namespaces that differ from its own,
 * and restored processes inherit them); the server holds both while the sandbox is checkpointed.
 * Mounts the helper makes as host root are external (criu_external): a restore binds them again.
 */
#define MAX_CRIU_ARGS (64 + 2 * MAX_INHERIT + 2 * MAX_VOLUMES + 2 * MAX_TTYS)
static const struct {
    const char *key, *path, *source; /* path inside the sandbox; source under /tmp/sbx/ at a restore */
    int view;
} criu_external[] = {
    {"sbx-dev", "/dev", "dev", 0},
    {"sbx-devpts", "/dev/pts", "devpts", 0}, /* (a devpts of the restore's: its terminals' new pairs, see restore_tree) */
    {"sbx-init", INIT_DIR, "init", 0},
    {"sbx-sys", "/sys", "sys", 0},
    {"sbx-meminfo", "/proc/meminfo", "meminfo", 1},
    {"sbx-cpuinfo", "/proc/cpuinfo", "cpuinfo", 1},
    {"sbx-cpu-online", "/sys/devices/system/cpu/online", "cpu-online", 1},
};

/* Capabilities CRIU has no use for here, which it runs without (it parses state a sandbox shaped, with the host's
 * capabilities: a bug in it must not load a module, write raw devices or files' capabilities, make device nodes,
 * set the clock, reboot, or reach BPF, perf, audit or the LSMs). Dropped from its bounding set too. */
static const int criu_denied[] = {CAP_LINUX_IMMUTABLE, CAP_NET_RAW, CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_SYS_PACCT,
                                  CAP_SYS_BOOT, CAP_SYS_TIME, CAP_SYS_TTY_CONFIG, CAP_MKNOD, CAP_LEASE, CAP_AUDIT_WRITE,
                                  CAP_AUDIT_CONTROL, CAP_SETFCAP, CAP_MAC_OVERRIDE, CAP_MAC_ADMIN, CAP_SYSLOG,
                                  CAP_WAKE_ALARM, CAP_BLOCK_SUSPEND, CAP_AUDIT_READ, CAP_PERFMON, CAP_BPF};

static void become_owner(unsigned uid) {
    if (prctl(PR_SET_SECUREBITS, SECBIT_KEEP_CAPS | SECBIT_NO_SETUID_FIXUP, 0, 0, 0) < 0) die("securebits");
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &hdr, data) < 0) die("capget");
    for (size_t i = 0; i < sizeof criu_denied / sizeof criu_denied[0]; i++) {
        int cap = criu_denied[i];
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL) die("drop capability %d", cap);
        data[cap / 32].permitted &= ~(1u << (cap % 32));
        data[cap / 32].effective &= ~(1u << (cap % 32));
    }
    data[0].inheritable = data[0].permitted;
    data[1].inheritable = data[1].permitted;
    if (syscall(SYS_capset, &hdr, data) < 0) die("capset");
    for (int cap = 0; cap <= 63; cap++) prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0);
    /* real uid too: programs CRIU runs (iptables-save) refuse to start with differing real and effective ids */
    if (setresuid(uid, uid, 0) < 0) die("setresuid %u", uid);
}

static void criu_add(const char **args, int *n, const char *arg) {
    if (*n >= MAX_CRIU_ARGS - 1) die("too many arguments for criu");
    args[(*n)++] = arg;
    args[*n] = NULL;
}

/* checkpoint --pid P --pid-start S --shift U --criu PATH --images DIR [--leave-running 1]: CRIU dumps the
 * sandbox's tree (its init and everything under it) into DIR (made here, the owner's), and ends it unless
 * --leave-running. CRIU's log is DIR/dump.log; its exit status is ours. */
static int cmd_checkpoint(int argc, char **argv) {
    pid_t target = 0;
    unsigned long long start = 0;
    unsigned shift = 0;
    const char *criu = NULL, *images = NULL, *mounts[MAX_VOLUMES], *handshake = NULL, *ttys[MAX_TTYS];
    int leave = 0, nmounts = 0, nttys = 0;
    for (int i = 2; i < argc; i += 2) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) die("missing value for %s", a);
        if (!strcmp(a, "--pid")) target = (pid_t)strtol(v, NULL, 10);
        else if (!strcmp(a, "--pid-start")) start = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--shift")) shift = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--criu")) criu = v;
        else if (!strcmp(a, "--images")) images = v;
        else if (!strcmp(a, "--leave-running")) leave = !strcmp(v, "1");
        else if (!strcmp(a, "--handshake")) handshake = v; /* DIR, see below */
        else if (!strcmp(a, "--external-mount")) { /* a volume's path in the sandbox: restored from --volume */
            if (nmounts == MAX_VOLUMES) die("too many --external-mount (at most %d)", MAX_VOLUMES);
            if (v[0] != '/' || strpbrk(v, "[]:") || strlen(v) > 4000) die("bad --external-mount %s", v);
            mounts[nmounts++] = v;
        }
        else if (!strcmp(a, "--external-tty")) { /* RDEV:DEV (hex) of a terminal whose master is a keeper's */
            if (nttys == MAX_TTYS) die("too many --external-tty (at most %d)", MAX_TTYS);
            size_t hex = strspn(v, "0123456789abcdef");
            if (!hex || hex > 16 || v[hex] != ':' || !v[hex + 1] || strspn(v + hex + 1, "0123456789abcdef") != strlen(v + hex + 1) ||
                strlen(v + hex + 1) > 16)
                die("bad --external-tty %s", v);
            ttys[nttys++] = v;
        }
        else die("unknown option %s", a);
    }
    if (!criu || !images || !shift) die("checkpoint needs --pid, --shift, --criu and --images");
    if (mkdir(images, 0700) < 0 && errno != EEXIST) die("mkdir %s", images);
    if (chown(images, shift, shift) < 0) die("chown %s", images);
    int pidfd = open_init(target, start);
    if (setns(pidfd, CLONE_NEWUTS | CLONE_NEWNET) < 0) die("setns(uts, net)");
    close(pidfd);
    static char pid[32], ext[sizeof criu_external / sizeof criu_external[0]][4200], vol[MAX_VOLUMES][4100];
    static char tty[MAX_TTYS][48];
    snprintf(pid, sizeof pid, "%d", target);
    const char *args[MAX_CRIU_ARGS];
    int n = 0;
    const char *fixed[] = {criu, "dump", "-t", pid, "-D", images, "-o", "dump.log", "-v4", "--unprivileged",
                           "--network-lock", "skip", "--ghost-limit", "16M", "--tcp-established", "--file-locks"};
    for (size_t i = 0; i < sizeof fixed / sizeof *fixed; i++) criu_add(args, &n, fixed[i]);
    for (size_t i = 0; i < sizeof criu_external / sizeof criu_external[0]; i++) {
        snprintf(ext[i], sizeof ext[i], "mnt[%s]:%s", criu_external[i].path, criu_external[i].key);
        criu_add(args, &n, "--external");
        criu_add(args, &n, ext[i]);
    }
    for (int i = 0; i < nmounts; i++) {
        snprintf(vol[i], sizeof vol[i], "mnt[%s]:sbx-volume-%d", mounts[i], i);
        criu_add(args, &n, "--external");
        criu_add(args, &n, vol[i]);
    }
    for (int i = 0; i < nttys; i++) { /* (a restore gives the processes a new slave: --inherit-fd ...:tty[...]) */
        snprintf(tty[i], sizeof tty[i], "tty[%s]", ttys[i]);
        criu_add(args, &n, "--external");
        criu_add(args, &n, tty[i]);
    }
    if (leave) criu_add(args, &n, "--leave-running");
    /* --handshake DIR (the server's, holding the FIFOs "told" and "go": CRIU runs its action scripts with no
     * descriptor but stdio): once everything is dumped, while the tree is still stopped, CRIU's post-dump
     * action writes "dumped" to DIR/told and waits for "go" on DIR/go (the server copies the sandbox's files
     * meanwhile: a snapshot whose files and memory are of the same instant); anything else undoes the dump. */
    if (handshake) { /* the action script is this program (see action_script), as the server ran it */
        if (handshake[0] != '/' || strlen(handshake) > 4000) die("bad --handshake %s", handshake);
        if (argv[0][0] != '/') die("checkpoint --handshake: run this helper by its absolute path");
        if (setenv("SBX_HANDSHAKE", handshake, 1) < 0) die("setenv");
        criu_add(args, &n, "--action-script");
        criu_add(args, &n, argv[0]);
    }
    if (chdir("/") < 0) die("chdir /");
    become_owner(shift);
    execv(criu, (char *const *)args);
    die("exec %s", criu);
    return 125;
}

/* create --restore IMAGES: the sandbox's root is made again as for a create, the sources of CRIU's external
 * mounts are gathered beside it (under /tmp/sbx, see below), and CRIU restores the tree into it, in the UTS
 * (--uts) and network (--netns) namespaces the server held, in the sandbox's cgroups (joined here: CRIU run
 * --unprivileged leaves cgroups alone). Prints the restored init's host PID as create does. */
static int restore_tree(const char *criu, const char *images, unsigned shift, char **inherit, int ninherit,
                        const int *volumes, int nvolumes, int devpts) {
    /* What the restored processes mount (the root, the external mounts' sources) is looked up by them, in the
     * sandbox's user namespace: without a capability over the host's files, they could not pass through the
     * data dir (host root's only). So all of it is gathered under a tmpfs over /tmp, in this mount namespace
     * only (CRIU's own scratch dirs go there too). */
    const char *log_dir = images;
    enum { NVIEWS = sizeof views / sizeof views[0] };
    /* (opened first: the state dir may be under /tmp itself) */
    int root_fd = open("merged", O_PATH | O_DIRECTORY | O_CLOEXEC), images_fd = open(images, O_PATH | O_DIRECTORY | O_CLOEXEC);
    int view_fds[NVIEWS];
    if (root_fd < 0 || images_fd < 0) die("open the root or %s", images);
    stage_views();
    for (size_t i = 0; view_dir && i < NVIEWS; i++) {
        char from[4200];
        snprintf(from, sizeof from, "%s/%s", view_dir, views[i].name);
        if ((view_fds[i] = open(from, O_PATH | O_CLOEXEC | O_NOFOLLOW)) < 0) die("open %s", from);
    }
    xmount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=4m");
    xmkdir("/tmp/sbx", 0711);
    char from[64];
    xmkdir("/tmp/sbx/root", 0755);
    snprintf(from, sizeof from, "/proc/self/fd/%d", root_fd);
    xmount(from, "/tmp/sbx/root", NULL, MS_BIND | MS_REC, NULL);
    xmkdir("/tmp/sbx/images", 0700);
    snprintf(from, sizeof from, "/proc/self/fd/%d", images_fd);
    xmount(from, "/tmp/sbx/images", NULL, MS_BIND, NULL);
    dev_tmpfs("/tmp/sbx/dev", shift);
    /* The sandbox's /dev/pts: the devpts instance the server made for the restore (--devpts-fd, a detached
     * mount) when its terminals come back, their processes given new slaves of it in place of theirs (CRIU's
     * external ttys, --inherit-fd); else a new one. Terminals the sandbox made itself are restored in it. */
    xmkdir("/tmp/sbx/devpts", 0755);
    if (devpts >= 0) {
        if (syscall(SYS_move_mount, devpts, "", AT_FDCWD, "/tmp/sbx/devpts", MOVE_MOUNT_F_EMPTY_PATH_) < 0)
            die("move_mount the devpts");
        close(devpts);
        char opts[256]; /* (made with the defaults: the sandbox's options now) */
        snprintf(opts, sizeof opts, DEVPTS_OPTIONS, shift + 5);
        xmount(NULL, "/tmp/sbx/devpts", NULL, MS_REMOUNT | MS_NOSUID | MS_NOEXEC, opts);
        /* The new slaves are the sandbox root's (CRIU, in the sandbox's user namespace, gives them the owner the
         * old ones had: it may change only what it can map) */
        for (int i = 0; i < ninherit; i++) {
            int fd = -1;
            const char *colon = strchr(inherit[i], ':');
            if (colon && !strncmp(colon + 1, "tty[", 4) && sscanf(inherit[i], "fd[%d]", &fd) == 1 && fd >= 0 &&
                (fchown(fd, shift, shift + 5) < 0 || fchmod(fd, 0620) < 0))
                die("chown a new terminal");
        }
    } else mount_devpts("/tmp/sbx/devpts", shift);
    xmkdir("/tmp/sbx/init", 0755);
    attach_init("/tmp/sbx/init");
    xmkdir("/tmp/sbx/sys", 0555);
    xmount("sysfs", "/tmp/sbx/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, NULL);
    for (size_t i = 0; view_dir && i < NVIEWS; i++) { /* (criu_external's view sources are these names) */
        char to[64];
        snprintf(to, sizeof to, "/tmp/sbx/%s", views[i].name);
        int fd = open(to, O_WRONLY | O_CREAT | O_CLOEXEC, 0444);
        if (fd < 0) die("create %s", to);
        close(fd);
        snprintf(from, sizeof from, "/proc/self/fd/%d", view_fds[i]);
        xmount(from, to, NULL, MS_BIND, NULL);
    }
    static char vol[MAX_VOLUMES][64];
    for (int i = 0; i < nvolumes; i++) { /* the volumes' idmapped clones (cmd_create), keys as the checkpoint's */
        char to[64];
        snprintf(to, sizeof to, "/tmp/sbx/volume-%d", i);
        xmkdir(to, 0755);
        if (syscall(SYS_move_mount, volumes[i], "", AT_FDCWD, to, MOVE_MOUNT_F_EMPTY_PATH_) < 0) die("move_mount %s", to);
        close(volumes[i]);
        snprintf(vol[i], sizeof vol[i], "mnt[sbx-volume-%d]:%s", i, to);
    }
    images = "/tmp/sbx/images";
    static char pidfile[4200], ext[sizeof criu_external / sizeof criu_external[0]][256];
    snprintf(pidfile, sizeof pidfile, "%s/restored.pid", images);
    unlink(pidfile);
    const char *args[MAX_CRIU_ARGS];
    int n = 0;
    const char *fixed[] = {criu, "restore", "-D", images, "-o", "restore.log", "-v4", "--unprivileged",
                           "-d", "--root", "/tmp/sbx/root", "--pidfile", pidfile, "--tcp-established", "--file-locks"};
    for (size_t i = 0; i < sizeof fixed / sizeof *fixed; i++) criu_add(args, &n, fixed[i]);
    for (size_t i = 0; i < sizeof criu_external / sizeof criu_external[0]; i++) {
        snprintf(ext[i], sizeof ext[i], "mnt[%s]:/tmp/sbx/%s", criu_external[i].key, criu_external[i].source);
        if (!view_dir && criu_external[i].view) continue;
        criu_add(args, &n, "--external");
        criu_add(args, &n, ext[i]);
    }
    for (int i = 0; i < ninherit; i++) {
        criu_add(args, &n, "--inherit-fd");
        criu_add(args, &n, inherit[i]);
    }
    for (int i = 0; i < nvolumes; i++) {
        criu_add(args, &n, "--external");
        criu_add(args, &n, vol[i]);
    }
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        if (chdir("/") < 0) die("chdir /");
        become_owner(shift);
        execv(criu, (char *const *)args);
        die("exec %s", criu);
    }
    int status;
    while (waitpid(child, &status, 0) < 0)
        if (errno != EINTR) die("wait for criu");
    if (!WIFEXITED(status) || WEXITSTATUS(status)) {
        errno = 0;
        die("criu could not restore the sandbox (its log: %s/restore.log)", log_dir);
    }
    char buf[32];
    int fd = open(pidfile, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    int got = fd >= 0 ? read_all(fd, buf, sizeof buf - 1) : -1;
    if (got <= 0) die("criu wrote no pidfile");
    buf[got] = 0;
    printf("%d\n", atoi(buf));
    fflush(stdout);
    return 0;
}

/*
 * attach: mount a volume (a host directory: volumes/store.py) at a path inside a running sandbox.
 *   The source is cloned and idmapped (--idmap-from.. -> the sandbox's range) here, in the host's mount
 *   namespace; then only the sandbox's mount namespace is entered (as host root: the namespace is owned by
 *   the initial user namespace, see the header). Our root is then the sandbox's root, so the destination
 *   resolves inside it whatever symlinks or ".." it meets (and never through a /proc magic link); missing
 *   directories are made, owned by sandbox root, and the mount is moved onto the destination's fd.
 *   The sandbox cannot unmount it: it holds no capability over a namespace it does not own.
 */
static int cmd_attach(int argc, char **argv) {
    const char *src = NULL, *dst = NULL;
    pid_t target = 0;
    unsigned long long start = 0;
    unsigned from = 0, shift = 0, range = 0;
    for (int i = 2; i < argc; i += 2) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) die("missing value for %s", a);
        if (!strcmp(a, "--pid")) target = (pid_t)strtol(v, NULL, 10);
        else if (!strcmp(a, "--pid-start")) start = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--src")) src = v;
        else if (!strcmp(a, "--dst")) dst = v;
        else if (!strcmp(a, "--idmap-from")) from = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--shift")) shift = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--range")) range = (unsigned)strtoul(v, NULL, 10);
        else die("unknown option %s", a);
    }
    if (!src || !dst || dst[0] != '/' || !dst[1] || target <= 0 || !shift || !range)
        die("attach needs --pid, --src, --dst (absolute, not /), --shift and --range");
    if (strlen(dst) >= 4096) die("destination too long");
    int procfd = open("/proc", O_DIRECTORY | O_CLOEXEC);
    if (procfd < 0) die("open /proc");
    int userns = mapping_userns(procfd, from, shift, range);
    int tree = idmapped_tree(userns, src, MOUNT_ATTR_NOSUID_ | MOUNT_ATTR_NODEV_);
    close(userns);
    close(procfd);
    int pidfd = open_init(target, start);
    if (setns(pidfd, CLONE_NEWNS) < 0) die("setns(mnt)");
    close(pidfd);
    /* Component by component from the sandbox's root (ours now): each prefix opened without magic links. */
    char path[4096];
    int dirfd = -1;
    size_t n = strlen(dst);
    for (size_t i = 1; i <= n; i++) {
        if (dst[i] != '/' && dst[i] != 0) continue;
        memcpy(path, dst, i);
        path[i] = 0;
        const char *name = strrchr(path, '/') + 1;
        if (!*name) continue; /* "//" */
        if (!strcmp(name, ".") || !strcmp(name, "..")) die("bad destination %s", dst);
        int fd = open_no_magic(path, O_PATH | O_DIRECTORY, 0);
        if (fd < 0 && errno == ENOENT) {
            if (mkdir(path, 0755) == 0) {
                if (lchown(path, shift, shift) < 0) die("chown %s", path);
            } else if (errno != EEXIST) die("mkdir %s", path);
            fd = open_no_magic(path, O_PATH | O_DIRECTORY, 0);
        }
        if (fd < 0) die("%s", path);
        if (dirfd >= 0) close(dirfd);
        dirfd = fd;
    }
    if (dirfd < 0) die("bad destination %s", dst);
    if (syscall(SYS_move_mount, tree, "", dirfd, "", MOVE_MOUNT_F_EMPTY_PATH_ | MOVE_MOUNT_T_EMPTY_PATH_) < 0)
        die("move_mount onto %s", dst);
    return 0;
}

/* CRIU's action script of a `checkpoint --handshake DIR` (run by CRIU at each step of a dump, its step in
 * CRTOOLS_SCRIPT_ACTION): after the dump, while the tree is still stopped, "dumped" to DIR/told, then "go"
 * from DIR/go or CRIU undoes the dump. */
static int action_script(const char *action) {
    if (strcmp(action, "post-dump")) return 0;
    const char *dir = getenv("SBX_HANDSHAKE");
    char path[4200];
    if (!dir) return 1;
    snprintf(path, sizeof path, "%s/told", dir);
    int w = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC); /* (the server has its end open: ENXIO if not) */
    if (w < 0 || write(w, "dumped\n", 7) != 7) return 1;
    close(w);
    snprintf(path, sizeof path, "%s/go", dir);
    int r = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (r < 0) return 1;
    /* The server answers once the files are copied; one that does not within HANDSHAKE_WAIT_MS, or dies (its
     * SBX_SERVER "PID:START" checked every 100 ms), never will: CRIU undoes the dump, and the sandbox's
     * processes, stopped meanwhile, run on (and CRIU lets go of the sandbox's mounts). */
    const char *server = getenv("SBX_SERVER");
    int spid = 0;
    unsigned long long sstart = 0;
    if (!server || sscanf(server, "%d:%llu", &spid, &sstart) != 2 || spid <= 0) return 1;
    char answer[8] = {0};
    size_t got = 0;
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (got < sizeof answer - 1) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        long left = HANDSHAKE_WAIT_MS - (now.tv_sec - t0.tv_sec) * 1000 - (now.tv_nsec - t0.tv_nsec) / 1000000;
        if (left <= 0 || start_time_of(spid) != sstart) return 1;
        struct pollfd p = {r, POLLIN, 0};
        int ready = poll(&p, 1, left < 100 ? (int)left : 100);
        if (ready < 0 && errno != EINTR) return 1;
        if (ready <= 0) continue;
        ssize_t k = read(r, answer + got, 1);
        if (k < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (k <= 0 || answer[got] == '\n') break;
        got++;
    }
    return strncmp(answer, "go\n", 3) == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
    /* init, exec'd by itself in its sandbox (init_child): PID 1 of its PID namespace, nothing else */
    if (argc == 1 && !strcmp(argv[0], "sandbox-init") && getpid() == 1) return init_main();
    const char *action = getenv("CRTOOLS_SCRIPT_ACTION");
    if (argc == 1 && action) return action_script(action);
    argv_end = argv[argc - 1] + strlen(argv[argc - 1]);
    /* The server runs with umask 077 (its own files are root's only); sandboxes get the usual 022. */
    umask(022);
    if (argc < 2) {
        fprintf(stderr, "usage: sbxhelper create|exec|broker|attach|checkpoint|seccomp-bpf|version ...\n");
        return 2;
    }
    if (!strcmp(argv[1], "create")) return cmd_create(argc, argv);
    if (!strcmp(argv[1], "exec")) return cmd_exec(argc, argv);
    if (!strcmp(argv[1], "broker")) return cmd_broker(argc, argv);
    if (!strcmp(argv[1], "attach")) return cmd_attach(argc, argv);
    if (!strcmp(argv[1], "checkpoint")) return cmd_checkpoint(argc, argv);
    if (!strcmp(argv[1], "seccomp-bpf")) { /* the filter, compiled, on stdout (see read_compiled) */
        scmp_filter_ctx ctx = build_filter();
        if (seccomp_export_bpf(ctx, 1) < 0) die("seccomp_export_bpf");
        seccomp_release(ctx);
        return 0;
    }
    if (!strcmp(argv[1], "version")) {
        puts("sbxhelper 1");
        return 0;
    }
    fprintf(stderr, "sbxhelper: unknown command %s\n", argv[1]);
    return 2;
}
