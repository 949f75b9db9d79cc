// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * handoff's steering program for one SO_REUSEPORT group.
 *
 * The daemon loads one instance of this program, with its own maps, per group (the
 * kernel only lets bpf_sk_select_reuseport pick a socket of the group the program runs
 * for). Every new connection, and every request migrated off a closing listener, goes
 * to the active generation's block of sockarray slots; see handoff.h for the layouts.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "handoff.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* The listeners of every generation, by daemon-assigned slot. Holds no reference. */
struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, HANDOFF_SOCK_SLOTS);
	__type(key, __u32);
	/* 8-byte values so that userspace lookups return the socket cookie. */
	__type(value, __u64);
} socks SEC(".maps");

/* Immutable steering records; `current` says which one is in force. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, HANDOFF_RECORDS);
	__type(key, __u32);
	__type(value, struct handoff_record);
} records SEC(".maps");

/*
 * Index of the record in force. Mmapable so the daemon flips it with one atomic 4-byte
 * store: a map update is a memcpy and could be seen half-written.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u32);
} current SEC(".maps");

/* Decision counters, read by the daemon for metrics and tests. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, HANDOFF_CTR_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/*
 * The probes and check connections the daemon registered, each with what it asks and the
 * slot the program chose for its SYN. Only root (the map is the daemon's) can register.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, HANDOFF_PROBE_SLOTS);
	__type(key, struct handoff_probe_key);
	__type(value, struct handoff_probe);
} probes SEC(".maps");

/* skb->protocol values (network order in ctx->eth_protocol). */
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD

static __always_inline void count(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&counters, &which);

	if (n)
		*n += 1; /* per-CPU: no other writer */
}

/*
 * The connection hash's two halves: the low one picks the listener within a generation,
 * the high one decides a canary's share. Taking both from the whole hash would correlate
 * them (with 25 listeners and weight 10, hash % 25 fixes hash % 100 to four values in
 * each residue class: only some listeners would ever see canary traffic).
 */
static __always_inline __u32 pick_bits(__u32 hash)
{
	return hash & 0xffff;
}

/* A percentile, 0 to 99, uniform over the high half of the hash. */
static __always_inline __u32 share_of(__u32 hash)
{
	return ((hash >> 16) * 100) >> 16;
}

/*
 * Select a listener in [first, first + len), starting at first + hash % len and trying
 * the others in order: the pick keeps the kernel's 4-tuple spread over the generation's
 * listeners, and a slot whose socket has closed (the map drops it by itself) is skipped.
 * Returns the chosen slot, or -1 when no slot of the block holds a socket.
 */
static __always_inline __s64 select_in(struct sk_reuseport_md *ctx, __u32 first, __u32 len,
				       __u32 hash, int *retried)
{
	__u32 start, i;

	if (len == 0 || len > HANDOFF_GEN_SLOTS)
		return -1;
	start = hash % len;
	for (i = 0; i < HANDOFF_GEN_SLOTS; i++) {
		__u32 slot;

		if (i >= len)
			break;
		slot = first + (start + i) % len;
		if (bpf_sk_select_reuseport(ctx, &socks, &slot, 0) == 0) {
			*retried = i > 0;
			return slot;
		}
	}
	return -1;
}

/*
 * The registration of this SYN if the daemon registered it as a probe, else NULL.
 *
 * A probe's IP source equals its IP destination, a local address: an IPv4 packet from
 * outside with a local source address is dropped as a martian before it gets here
 * (fib_validate_source, unless accept_local is set), and one with a loopback source
 * address on any interface but lo, for IPv4 and IPv6 alike. The source port is an
 * ephemeral port the kernel picked for the daemon a moment ago and which the daemon
 * holds: no other socket on the host has it.
 */
static __always_inline struct handoff_probe *probe_of(struct sk_reuseport_md *ctx)
{
	struct handoff_probe_key key;
	__u16 ports[2];

	/* On a migration there is no packet (the skb is empty): never a probe. */
	if (ctx->migrating_sk || ctx->len < sizeof(ports))
		return NULL;
	/* On the SYN path the data starts at the TCP header: source, then destination port. */
	if (bpf_skb_load_bytes(ctx, 0, ports, sizeof(ports)))
		return NULL; /* no TCP header to read: a client's SYN, served */
	__builtin_memset(&key, 0, sizeof(key));
	key.sport = bpf_ntohs(ports[0]);
	key.dport = bpf_ntohs(ports[1]);
	if (ctx->eth_protocol == bpf_htons(ETH_P_IP)) {
		__u32 addrs[2];

		/* saddr and daddr: bytes 12..20 of the IPv4 header. */
		if (bpf_skb_load_bytes_relative(ctx, 12, addrs, sizeof(addrs), BPF_HDR_START_NET))
			return NULL; /* no IP header to read: not a probe */
		if (addrs[0] != addrs[1])
			return NULL; /* source is not the destination: never the daemon's probe */
		__builtin_memcpy(key.saddr, &addrs[0], 4);
		key.family = 4;
	} else if (ctx->eth_protocol == bpf_htons(ETH_P_IPV6)) {
		__u64 addrs[4];

		/* saddr and daddr: bytes 8..40 of the IPv6 header. */
		if (bpf_skb_load_bytes_relative(ctx, 8, addrs, sizeof(addrs), BPF_HDR_START_NET))
			return NULL; /* no IP header to read: not a probe */
		if (addrs[0] != addrs[2] || addrs[1] != addrs[3])
			return NULL; /* source is not the destination: never the daemon's probe */
		__builtin_memcpy(key.saddr, addrs, 16);
		key.family = 6;
	} else {
		return NULL; /* neither IPv4 nor IPv6: not a probe */
	}
	/* NULL unless the daemon registered exactly this source and port a moment ago. */
	return bpf_map_lookup_elem(&probes, &key);
}

/*
 * A health-check connection: sent to exactly the listener the daemon named (the
 * candidate's, which no client is steered to yet), or dropped if that slot has no socket.
 */
static __always_inline int check(struct sk_reuseport_md *ctx, struct handoff_probe *probe)
{
	__u32 slot = probe->target;

	count(HANDOFF_CTR_CHECK);
	if (slot < HANDOFF_SOCK_SLOTS && bpf_sk_select_reuseport(ctx, &socks, &slot, 0) == 0) {
		/* A 4-byte store; the daemon reads it after its connect() returned. */
		probe->chosen = slot;
		return SK_PASS;
	}
	probe->chosen = HANDOFF_PROBE_NO_SOCKET;
	return SK_DROP;
}

/*
 * The slot `rec` sends this connection to, or -1 for none; `*which` says which counter
 * the decision is.
 */
static __always_inline __s64 decide(struct sk_reuseport_md *ctx, struct handoff_record *rec,
				    __u32 *which)
{
	__u32 pick = pick_bits(ctx->hash);
	int retried = 0;
	__s64 slot;

	if (rec->canary_len && share_of(ctx->hash) < rec->weight) {
		slot = select_in(ctx, rec->canary_first, rec->canary_len, pick, &retried);
		if (slot >= 0) {
			*which = HANDOFF_CTR_CANARY;
			return slot;
		}
		/* A canary without a listener left: its share goes to the active generation. */
	}
	slot = select_in(ctx, rec->active_first, rec->active_len, pick, &retried);
	if (slot >= 0) {
		*which = retried ? HANDOFF_CTR_ACTIVE_RETRY : HANDOFF_CTR_ACTIVE;
		return slot;
	}
	/*
	 * The active generation has no listener left (it crashed, or closed them all): the
	 * previous one still serves, which beats the kernel's hash over every generation that
	 * happens to listen.
	 */
	slot = select_in(ctx, rec->prev_first, rec->prev_len, pick, &retried);
	*which = slot >= 0 ? HANDOFF_CTR_FALLBACK : HANDOFF_CTR_KERNEL_HASH;
	return slot;
}

SEC("sk_reuseport/migrate")
int handoff_select(struct sk_reuseport_md *ctx)
{
	struct handoff_record *rec;
	struct handoff_probe *probe;
	__u32 zero = 0, *idx, which;
	int migrating;
	__s64 slot;

	probe = probe_of(ctx);
	if (probe && probe->target != HANDOFF_PROBE_UNSET)
		return check(ctx, probe);
	migrating = ctx->migrating_sk != 0;

	idx = bpf_map_lookup_elem(&current, &zero);
	if (!idx)
		/* Unreachable (a one-entry array always has entry 0); kernel hash as without us. */
		return SK_PASS;
	rec = bpf_map_lookup_elem(&records, idx);
	if (!rec)
		/* The daemon never stores an index outside the ring; kernel hash as a last resort. */
		return SK_PASS;

	slot = decide(ctx, rec, &which);
	if (probe) {
		/* A 4-byte store; the daemon reads it after its connect() returned. */
		probe->chosen = slot >= 0 ? (__u32)slot : HANDOFF_PROBE_NO_SOCKET;
		count(HANDOFF_CTR_PROBE);
		/*
		 * A probe only asks which listener would be chosen: drop it so that no
		 * application ever sees it (the root-owned prober gets a reset).
		 */
		return SK_DROP;
	}
	count(which);
	if (migrating)
		count(HANDOFF_CTR_MIGRATED);
	/*
	 * SK_PASS with a selection: the selected socket takes the connection. SK_PASS without
	 * one (no listener of the canary, active or previous generation): the kernel hashes
	 * over the whole group, or, for a migration, over the listeners that remain; that
	 * still serves the client, where SK_DROP would reset it.
	 */
	return SK_PASS;
}
