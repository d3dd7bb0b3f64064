# sandboxd's change to criu/sk-tcp.c (perl -0pi, from build-criu.sh): see build-criu.sh.
# A restored task (in a user namespace of its own) may not set TCP_REPAIR on a socket of the network namespace
# the sandbox's server made (owned by the host's user namespace): CRIU's usernsd, in the host's, sets it on
# (restore_one_tcp), and CRIU itself sets it off once every socket is restored and the network unlocked, on
# the tasks' connected sockets taken through pidfds (rst_tcp_repair_off_for_tasks: their restorer's own try fails).
s{(int restore_one_tcp\(int fd, struct inet_sk_info \*ii\)\n\{\n\tstruct libsoccr_sk \*sk;\n)}
 {static int usernsd_set_repair(void *arg, int fd, pid_t pid)
{
	int on = *(int *)arg;

	if (setsockopt(fd, SOL_TCP, TCP_REPAIR, &on, sizeof(on)) < 0) {
		pr_perror("usernsd: setting TCP_REPAIR to %d", on);
		return -1;
	}
	return 0;
}

static int set_repair_through_usernsd(int fd, int on) /* sandboxd: see build-criu.sh */
{
	return userns_call(usernsd_set_repair, 0, &on, sizeof(on), fd);
}

$1
	libsoccr_set_repair = set_repair_through_usernsd;
};
s{\z}{
/* sandboxd: see build-criu.sh. Every restored task's connected TCP socket (each was restored in repair mode), taken
 * through a pidfd of the task (as it is now: the numbers are the kernel's, not the images'). */
void rst_tcp_repair_off_for_tasks(void)
{
	struct pstree_item *item;

	if (!(root_ns_mask & CLONE_NEWUSER) || opts.tcp_close)
		return;
	for_each_pstree_item(item) {
		char dir[64];
		struct dirent *de;
		DIR *fds;
		int pidfd;

		if (!task_alive(item))
			continue;
		snprintf(dir, sizeof(dir), "/proc/%d/fd", item->pid->real);
		pidfd = syscall(SYS_pidfd_open, item->pid->real, 0);
		fds = pidfd < 0 ? NULL : opendir(dir);
		if (!fds) {
			pr_perror("the descriptors of %d", item->pid->real);
			if (pidfd >= 0)
				close(pidfd);
			continue;
		}
		while ((de = readdir(fds))) {
			char link[384], target[32];
			struct tcp_info ti;
			socklen_t len;
			ssize_t n;
			int sk, proto = 0, off = 0;

			if (de->d_name[0] == '.')
				continue;
			snprintf(link, sizeof(link), "%s/%s", dir, de->d_name);
			n = readlink(link, target, sizeof(target) - 1);
			if (n <= 0)
				continue;
			target[n] = 0;
			if (strncmp(target, "socket:[", 8))
				continue;
			sk = syscall(SYS_pidfd_getfd, pidfd, atoi(de->d_name), 0);
			if (sk < 0)
				continue;
			len = sizeof(proto);
			if (getsockopt(sk, SOL_SOCKET, SO_PROTOCOL, &proto, &len) == 0 && proto == IPPROTO_TCP) {
				len = sizeof(ti);
				if (getsockopt(sk, SOL_TCP, TCP_INFO, &ti, &len) == 0 && ti.tcpi_state == TCP_ESTABLISHED) {
					if (setsockopt(sk, SOL_TCP, TCP_REPAIR, &off, sizeof(off)) < 0)
						pr_perror("turning TCP repair off on %s of %d", de->d_name, item->pid->real);
					else
						pr_info("TCP repair off on %s of %d\\n", de->d_name, item->pid->real);
				}
			}
			close(sk);
		}
		closedir(fds);
		close(pidfd);
	}
}
};
s{(#include "images/tcp-stream.pb-c.h"\n)}{$1#include <dirent.h>\n#include <stdio.h>\n#include <sys/syscall.h>\n#include "pstree.h"\n};
