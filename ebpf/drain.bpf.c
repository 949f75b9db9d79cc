// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * handoff's drain accounting: counts the connections each draining generation holds and
 * wakes the daemon the moment a count reaches zero, without rescanning anything.
 *
 * - iter/task_file (run once when a drain starts, and again to confirm a zero): tags each
 *   TCP socket on the service port held by a member of the draining generation, once, in
 *   socket storage, and counts it for that generation.
 * - cgroup/sock_release (attached at the cgroup v2 root; runs when the last file
 *   reference of a socket goes: close, exit, a child's close): untags the socket and
 *   decrements its generation's count; at zero it writes an event to the ring buffer.
 * - cgroup/post_bind4, cgroup/post_bind6 (Linux >= 4.17; attached at the root): report a
 *   successful TCP bind() of a watched service address, in the daemon's network namespace,
 *   by the service's uid, so the daemon looks for a new listener (a respawned worker) of
 *   the generation it steers. These run after the port is taken: a bind that fails
 *   (EADDRINUSE) never reaches them, unlike cgroup/bind4/6, which run before the kernel
 *   looks for a conflict. Whatever passes the filters is rate-limited per watched address
 *   (HANDOFF_BIND_BUDGET per 100 ms); what is held back is counted, the first one of a
 *   window wakes the daemon, and the daemon looks for listeners itself while that count
 *   moves, so a worker's new listener is never missed for long.
 *
 * Two rings (Linux >= 5.8): `zeros` carries only count-reached-zero events and is sized so
 * that it cannot overflow (see there); `binds` carries bind events. Anything binds do,
 * however many, cannot take room a zero event needs. Every failed reservation is counted
 * in `stats`, which the daemon reads each time it wakes.
 * - iter/task_file (run over the processes of a candidate): writes the fd and inode of
 *   each of their TCP listeners on the service port, without a readlink per fd.
 * - iter/task: writes the process table (tgid, parent) in one read, so finding a process
 *   tree costs one pass in the kernel instead of a read of every /proc/PID/stat.
 *
 * Kernel types are declared here minimally, with preserve_access_index: field offsets
 * are relocated against the running kernel's BTF at load time (CO-RE).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "drain.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define TCP_CLOSE 7
#define TCP_LISTEN 10
#define SOCK_STREAM 1
#define EEXIST 17

static const __u32 one = 1;

struct sock_common {
	unsigned short skc_family;
	volatile unsigned char skc_state;
	__u16 skc_num;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	__u16 sk_protocol;
} __attribute__((preserve_access_index));

struct socket {
	struct sock *sk;
} __attribute__((preserve_access_index));

struct task_struct {
	int pid;
	int tgid;
	struct task_struct *real_parent;
} __attribute__((preserve_access_index));

struct inode {
	unsigned long i_ino;
} __attribute__((preserve_access_index));

struct file {
	struct inode *f_inode;
} __attribute__((preserve_access_index));

struct seq_file;

struct bpf_iter_meta {
	struct seq_file *seq;
	__u64 session_id;
	__u64 seq_num;
} __attribute__((preserve_access_index));

/* The process table iterator's context: fixed by the kernel's bpf_iter__task. */
struct bpf_iter__task {
	struct bpf_iter_meta *meta;
	struct task_struct *task;
};

/* The iterator's context: offsets fixed by the kernel's bpf_iter__task_file. */
struct bpf_iter__task_file {
	struct bpf_iter_meta *meta;
	struct task_struct *task;
	__u32 fd;
	struct file *file;
};

/* Per socket: the tag of the generation it was counted for (0: not counted). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u32);
} tags SEC(".maps");

/* Connections counted per tag. Signed: a release may run between a pass's tag and count. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, HANDOFF_MAX_TAGS);
	__type(key, __u32);
	__type(value, __s64);
} counts SEC(".maps");

/* The processes the next pass tags for, by tgid. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, HANDOFF_MAX_MEMBERS);
	__type(key, __u32);
	__type(value, struct handoff_member);
} members SEC(".maps");

/* Ports whose bind() may be reported: port -> 1 (the first, cheap test of every bind). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, HANDOFF_MAX_PORTS);
	__type(key, __u32);
	__type(value, __u32);
} ports SEC(".maps");

/* Service addresses (and the wildcard of their family) whose bind is reported. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, HANDOFF_MAX_WATCHED);
	__type(key, struct handoff_addr);
	__type(value, struct handoff_watch);
} watched SEC(".maps");

/*
 * Tags with a zero event written and not yet taken by the daemon: tag -> 1. A release
 * writes a zero event only if it adds the tag here; the daemon removes it before it counts
 * the tag again (and when it forgets the tag). So the `zeros` ring holds at most one
 * event per tag, and tags are at most HANDOFF_MAX_TAGS (a release only writes for a tag
 * in `counts`, whose size that is).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, HANDOFF_MAX_TAGS);
	__type(key, __u32);
	__type(value, __u32);
} zero_pending SEC(".maps");

/*
 * Count-reached-zero events only. By `zero_pending`, at most HANDOFF_MAX_TAGS records are
 * ever unread, each 16 bytes plus the ring's 8-byte record header: 4096 * 24 = 96 KiB,
 * rounded up to the power of two the kernel requires. A failed reservation here is
 * counted anyway (HANDOFF_STAT_LOST_ZEROS) and makes the daemon recount every drain.
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 128 * 1024);
} zeros SEC(".maps");

/* Bind events, at most HANDOFF_BIND_BUDGET + 1 per 100 ms per watched address. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} binds SEC(".maps");

/* Per-CPU counters, indexed by enum handoff_stat; summed by the daemon. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, HANDOFF_STATS);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/*
 * The daemon's network namespace (its SO_NETNS_COOKIE), set at load time; 0: unknown,
 * binds of every namespace pass (the daemon warns).
 */
const volatile __u64 daemon_netns = 0;

static __always_inline void stat_add(__u32 index)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &index);

	if (v)
		*v += 1;
}

static __always_inline void emit(void *ring, __u32 lost, __u32 kind, __u32 value, __u32 pid)
{
	struct handoff_event *ev = bpf_ringbuf_reserve(ring, sizeof(*ev), 0);

	/* A full ring: counted; the daemon sees the count move when it wakes and catches up. */
	if (!ev) {
		stat_add(lost);
		return;
	}
	ev->kind = kind;
	ev->value = value;
	ev->pid = pid;
	ev->reserved = 0;
	bpf_ringbuf_submit(ev, 0);
}

/* The TCP socket behind `file` if it is on `port`, in state LISTEN or not as `listen` says. */
static __always_inline struct sock *tcp_on_port(struct file *file, __u32 port, int listen)
{
	struct socket *socket = bpf_sock_from_file(file);
	struct sock *sk;

	if (!socket)
		return 0;
	sk = socket->sk;
	if (!sk)
		return 0;
	if (sk->__sk_common.skc_family != AF_INET && sk->__sk_common.skc_family != AF_INET6)
		return 0;
	if (sk->sk_protocol != IPPROTO_TCP || sk->__sk_common.skc_num != port)
		return 0;
	if ((sk->__sk_common.skc_state == TCP_LISTEN) != listen)
		return 0;
	/*
	 * CLOSE: a listener shut down but not closed (its fd still open), or a connection
	 * already reset. Neither carries a client any more, and neither is ever released
	 * while the process keeps the fd: counting it would hold the drain to its timeout.
	 */
	if (sk->__sk_common.skc_state == TCP_CLOSE)
		return 0;
	return sk;
}

SEC("iter/task_file")
int handoff_tag(struct bpf_iter__task_file *ctx)
{
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	struct handoff_member *m;
	struct sock *sk;
	__u32 tgid, *tag;
	__s64 *count;

	if (!task || !file)
		return 0;
	tgid = task->tgid;
	m = bpf_map_lookup_elem(&members, &tgid);
	if (!m)
		return 0;
	sk = tcp_on_port(file, m->port, 0);
	if (!sk)
		return 0;
	tag = bpf_sk_storage_get(&tags, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	/*
	 * Already counted for this drain (a shared fd, an earlier pass): count each socket
	 * once. A tag of an earlier drain of the same process tree (a generation rolled back
	 * to and draining again) is stale: its count is gone, so take the socket over.
	 */
	if (!tag || *tag == m->tag)
		return 0;
	count = bpf_map_lookup_elem(&counts, &m->tag);
	if (!count)
		return 0;
	*tag = m->tag;
	__sync_fetch_and_add(count, 1);
	return 0;
}

SEC("iter/task_file")
int handoff_listeners(struct bpf_iter__task_file *ctx)
{
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	struct handoff_listener l;
	struct handoff_member *m;
	__u32 tgid;

	if (!task || !file)
		return 0;
	tgid = task->tgid;
	m = bpf_map_lookup_elem(&members, &tgid);
	if (!m || !tcp_on_port(file, m->port, 1))
		return 0;
	l.tgid = tgid;
	l.fd = ctx->fd;
	l.inode = file->f_inode ? file->f_inode->i_ino : 0;
	bpf_seq_write(ctx->meta->seq, &l, sizeof(l));
	return 0;
}

SEC("cgroup/sock_release")
int handoff_release(struct bpf_sock *ctx)
{
	__u32 *tag, t;
	__s64 *count;

	tag = bpf_sk_storage_get(&tags, ctx, 0, 0);
	/* Not a socket we counted. Always 1: this hook only observes, it never vetoes. */
	if (!tag || !*tag)
		return 1;
	t = *tag;
	*tag = 0;
	count = bpf_map_lookup_elem(&counts, &t);
	/* A forgotten tag, or connections left: nothing to report (1: never a veto). */
	if (!count || __sync_fetch_and_add(count, -1) != 1)
		return 1;
	/*
	 * -EEXIST: a zero event of this tag is still unread; the daemon counts the tag when it
	 * takes that one, after this release. Any other failure cannot happen while tags fit
	 * in `counts`; the event is written anyway (losing it is the worse outcome).
	 */
	if (bpf_map_update_elem(&zero_pending, &t, &one, BPF_NOEXIST) == -EEXIST)
		return 1;
	emit(&zeros, HANDOFF_STAT_LOST_ZEROS, HANDOFF_EV_ZERO, t, 0);
	/* 1: the release goes on; this hook only observes. */
	return 1;
}

/* Whether the binding process's uid is one `w` allows (any, before the first promote). */
static __always_inline int owner_ok(struct handoff_watch *w)
{
	__u32 uid = (__u32)bpf_get_current_uid_gid();

	return w->uids[0] == HANDOFF_ANY_UID || w->uids[0] == uid || w->uids[1] == uid;
}

/*
 * How many events `w`'s window let through before this one (>= HANDOFF_BIND_BUDGET: over
 * the budget). The window's reset is not atomic with the count: two CPUs crossing a window
 * edge together may both reset it, and a few extra events pass; the budget is a bound on
 * the daemon's work, not an exact figure.
 */
static __always_inline __u64 used_before(struct handoff_watch *w)
{
	__u64 window = bpf_ktime_get_ns() / HANDOFF_BIND_WINDOW_NS;

	if (w->window != window) {
		w->window = window;
		w->used = 0;
	}
	return __sync_fetch_and_add(&w->used, 1);
}

/* Reports the bind of `key`'s address if it passes every filter and the rate limit. */
static __always_inline void watch_bind(struct bpf_sock *ctx, struct handoff_addr *key)
{
	struct handoff_watch *w;
	__u64 used;

	/* Only TCP listeners are steered. */
	if (ctx->protocol != IPPROTO_TCP || ctx->type != SOCK_STREAM)
		return;
	key->port = ctx->src_port;
	/* Not a service port: the common case, one lookup, not counted. */
	if (!bpf_map_lookup_elem(&ports, &key->port))
		return;
	w = bpf_map_lookup_elem(&watched, key);
	/* Another namespace, address or uid: no listener of the service can come from it. */
	if ((daemon_netns && bpf_get_netns_cookie(ctx) != daemon_netns) || !w || !owner_ok(w)) {
		stat_add(HANDOFF_STAT_FILTERED);
		return;
	}
	used = used_before(w);
	/*
	 * Over the budget: counted; the daemon looks for listeners itself when it sees the
	 * count move. The first one of a window also wakes it (the binds let through before
	 * may all have been someone else's, and nothing else may follow).
	 */
	if (used >= HANDOFF_BIND_BUDGET) {
		stat_add(HANDOFF_STAT_SUPPRESSED);
		if (used == HANDOFF_BIND_BUDGET)
			emit(&binds, HANDOFF_STAT_LOST_BINDS, HANDOFF_EV_HELD, key->port, 0);
		return;
	}
	emit(&binds, HANDOFF_STAT_LOST_BINDS, HANDOFF_EV_BIND, key->port,
	     bpf_get_current_pid_tgid() >> 32);
}

SEC("cgroup/post_bind4")
int handoff_post_bind4(struct bpf_sock *ctx)
{
	struct handoff_addr key = { .family = AF_INET };

	key.addr[0] = ctx->src_ip4;
	watch_bind(ctx, &key);
	/* 1: keep the bind; 0 would undo a bind that already succeeded (EPERM). */
	return 1;
}

SEC("cgroup/post_bind6")
int handoff_post_bind6(struct bpf_sock *ctx)
{
	struct handoff_addr key = { .family = AF_INET6 };

	key.addr[0] = ctx->src_ip6[0];
	key.addr[1] = ctx->src_ip6[1];
	key.addr[2] = ctx->src_ip6[2];
	key.addr[3] = ctx->src_ip6[3];
	watch_bind(ctx, &key);
	/* 1: keep the bind; 0 would undo a bind that already succeeded (EPERM). */
	return 1;
}

SEC("iter/task")
int handoff_procs(struct bpf_iter__task *ctx)
{
	struct task_struct *task = ctx->task;
	struct task_struct *parent;
	struct handoff_proc p;

	/* NULL once after the last task; threads other than the leader add nothing. */
	if (!task || task->pid != task->tgid)
		return 0;
	parent = task->real_parent;
	p.tgid = task->tgid;
	p.ppid = parent ? parent->tgid : 0;
	bpf_seq_write(ctx->meta->seq, &p, sizeof(p));
	return 0;
}
