// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * handoff's guard: a cgroup/setsockopt program, attached at the cgroup v2 root, that
 * keeps a steered group's sk_reuseport program handoff's. Anyone may attach a program to
 * a reuseport group they have a socket of (SO_ATTACH_REUSEPORT_CBPF needs no privilege)
 * or detach it; on TCP sockets bound to a watched service port only handoffd may.
 *
 * Every other setsockopt passes untouched. A 32-bit process's setsockopt does not run
 * cgroup programs: the daemon's periodic probe is the backstop for that.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define SOL_SOCKET 1
#define SO_ATTACH_REUSEPORT_CBPF 51
#define SO_ATTACH_REUSEPORT_EBPF 52
#define SO_DETACH_REUSEPORT_BPF 68
#define IPPROTO_TCP 6
/*
 * The kernel copies at most PAGE_SIZE bytes of optval for the program. A program that
 * leaves a larger optlen as it was makes the call fail with EFAULT on kernels before
 * 6.5; setting optlen to 0 tells every kernel to use the caller's own optval. 4096 is
 * the smallest page size: on larger pages this only takes the same path more often.
 */
#define GUARD_PAGE_SIZE 4096

/* Watched service ports (host order), written by handoffd. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} guard_ports SEC(".maps");

/* The processes (tgid) that may change programs on watched ports: handoffd. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u32);
} guard_allowed SEC(".maps");

/* Refusals, one counter: read by the daemon for metrics. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} guard_refused SEC(".maps");

SEC("cgroup/setsockopt")
int handoff_guard(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	__u32 port, tgid, zero = 0;
	__u64 *n;

	/*
	 * Before any decision: every path that lets the call through (other options, an
	 * unwatched port, handoffd's own calls) must hand back a large optval untouched. A
	 * refusal ignores optlen.
	 */
	if (ctx->optlen > GUARD_PAGE_SIZE)
		ctx->optlen = 0;
	if (ctx->level != SOL_SOCKET ||
	    (ctx->optname != SO_ATTACH_REUSEPORT_CBPF && ctx->optname != SO_ATTACH_REUSEPORT_EBPF &&
	     ctx->optname != SO_DETACH_REUSEPORT_BPF))
		/* Not a reuseport program option: the kernel handles it as without us. */
		return 1;
	if (!sk || sk->protocol != IPPROTO_TCP)
		/* Not TCP (a UDP group on the same port is none of handoff's): allowed. */
		return 1;
	port = sk->src_port;
	if (!bpf_map_lookup_elem(&guard_ports, &port))
		/* Not bound to a watched port (or not bound yet: a new group is probed). */
		return 1;
	tgid = bpf_get_current_pid_tgid() >> 32;
	if (bpf_map_lookup_elem(&guard_allowed, &tgid))
		/* handoffd itself attaching or detaching its program. */
		return 1;
	n = bpf_map_lookup_elem(&guard_refused, &zero);
	if (n)
		*n += 1; /* per-CPU: no other writer */
	/* Anyone else on a steered port: refused, the caller gets EPERM. */
	return 0;
}
