// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * handoff's guard: a cgroup/setsockopt program, attached at the cgroup v2 root, that
 * keeps a steered group's sk_reuseport program handoff's. Anyone may attach a program to
 * a reuseport group they have a socket of (SO_ATTACH_REUSEPORT_CBPF needs no privilege)
 * or detach it; on TCP sockets bound to a watched service address (network namespace,
 * address and port: not the same port number elsewhere) only handoffd may.
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
#define AF_INET 2
#define AF_INET6 10
/*
 * The kernel copies at most PAGE_SIZE bytes of optval for the program. A program that
 * leaves a larger optlen as it was makes the call fail with EFAULT on kernels before
 * 6.5; setting optlen to 0 tells every kernel to use the caller's own optval. 4096 is
 * the smallest page size: on larger pages this only takes the same path more often.
 */
#define GUARD_PAGE_SIZE 4096

/* A watched service address: the key of `guard_ports`, written by handoffd. */
struct guard_key {
	/* The network namespace's cookie (bpf_get_netns_cookie). */
	__u64 netns;
	/* AF_INET or AF_INET6. */
	__u32 family;
	/* Host byte order. */
	__u32 port;
	/* Network byte order; IPv4 in addr[0], the rest zero. */
	__u32 addr[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct guard_key);
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
	struct guard_key key = {};
	__u32 tgid, zero = 0;
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
	key.family = sk->family;
	key.port = sk->src_port;
	if (key.family == AF_INET) {
		key.addr[0] = sk->src_ip4;
	} else if (key.family == AF_INET6) {
		key.addr[0] = sk->src_ip6[0];
		key.addr[1] = sk->src_ip6[1];
		key.addr[2] = sk->src_ip6[2];
		key.addr[3] = sk->src_ip6[3];
	}
	/* The socket's namespace (Linux >= 5.14 for cgroup/sockopt programs). */
	key.netns = bpf_get_netns_cookie(ctx);
	if (!bpf_map_lookup_elem(&guard_ports, &key))
		/*
		 * Not bound to a watched address in the daemon's namespace (another container,
		 * another address, or not bound yet: a new group is probed): none of handoff's.
		 */
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
