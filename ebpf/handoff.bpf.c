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

/* For each probe source port, the slot the program chose for that probe's SYN. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, HANDOFF_PROBE_PORTS);
	__type(key, __u32);
	__type(value, __u32);
} probes SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&counters, &which);

	if (n)
		*n += 1; /* per-CPU: no other writer */
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

/* The probe's source port if this is a probe SYN, else 0. */
static __always_inline __u32 probe_index(struct sk_reuseport_md *ctx)
{
	__u16 sport_be;
	__u32 sport;

	/* On a migration there is no packet (the skb is empty): never a probe. */
	if (ctx->migrating_sk || ctx->len < sizeof(sport_be))
		return 0;
	/* On the SYN path the data starts at the TCP header: source port first. */
	if (bpf_skb_load_bytes(ctx, 0, &sport_be, sizeof(sport_be)))
		return 0;
	sport = bpf_ntohs(sport_be);
	if (sport < HANDOFF_PROBE_PORT_FIRST ||
	    sport >= HANDOFF_PROBE_PORT_FIRST + HANDOFF_PROBE_PORTS)
		return 0;
	return sport - HANDOFF_PROBE_PORT_FIRST + 1;
}

SEC("sk_reuseport/migrate")
int handoff_select(struct sk_reuseport_md *ctx)
{
	struct handoff_record *rec;
	__u32 zero = 0, *idx, probe;
	__u32 chosen = HANDOFF_PROBE_NO_SOCKET;
	int retried = 0, migrating;
	__s64 slot;

	probe = probe_index(ctx);
	migrating = ctx->migrating_sk != 0;

	idx = bpf_map_lookup_elem(&current, &zero);
	if (!idx)
		/* Unreachable (a one-entry array always has entry 0); kernel hash as without us. */
		return SK_PASS;
	rec = bpf_map_lookup_elem(&records, idx);
	if (!rec)
		/* The daemon never stores an index outside the ring; kernel hash as a last resort. */
		return SK_PASS;

	slot = select_in(ctx, rec->active_first, rec->active_len, ctx->hash, &retried);
	if (slot >= 0) {
		chosen = slot;
		if (!probe)
			count(retried ? HANDOFF_CTR_ACTIVE_RETRY : HANDOFF_CTR_ACTIVE);
	} else {
		/*
		 * The active generation has no listener left (it crashed, or closed them all):
		 * the previous one still serves, which beats the kernel's hash over every
		 * generation that happens to listen.
		 */
		slot = select_in(ctx, rec->prev_first, rec->prev_len, ctx->hash, &retried);
		if (slot >= 0) {
			chosen = slot;
			if (!probe)
				count(HANDOFF_CTR_PREVIOUS);
		} else if (!probe) {
			count(HANDOFF_CTR_KERNEL_HASH);
		}
	}

	if (probe) {
		__u32 key = probe - 1;

		bpf_map_update_elem(&probes, &key, &chosen, BPF_ANY);
		count(HANDOFF_CTR_PROBE);
		/*
		 * A probe only asks which listener would be chosen: drop it so that no
		 * application ever sees it (the root-owned prober gets a reset).
		 */
		return SK_DROP;
	}
	if (migrating)
		count(HANDOFF_CTR_MIGRATED);
	/*
	 * SK_PASS with a selection: the selected socket takes the connection. SK_PASS without
	 * one (no listener of the active or previous generation): the kernel hashes over the
	 * whole group, or, for a migration, over the listeners that remain; that still serves
	 * the client, where SK_DROP would reset it.
	 */
	return SK_PASS;
}
