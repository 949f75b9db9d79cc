/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Layouts shared by handoff.bpf.c and userspace. This file is the one source of truth:
 * common/src/maps/records.rs mirrors each record with #[repr(C)] types and compile-time
 * size checks (a test compares them with the BTF of the built objects), and
 * common/src/maps/counters.rs the counters.
 */
#ifndef HANDOFF_H
#define HANDOFF_H

/*
 * Sockarray slots. The daemon gives every generation a block of HANDOFF_GEN_SLOTS
 * consecutive slots per group; its listeners fill the block from the start. A block is
 * not reused while any steering record refers to it.
 */
#define HANDOFF_GEN_SLOTS 64
#define HANDOFF_BLOCKS 64
#define HANDOFF_SOCK_SLOTS (HANDOFF_GEN_SLOTS * HANDOFF_BLOCKS)

/* Steering records: a ring, written by the daemon, never while `current` points at it. */
#define HANDOFF_RECORDS 16

/*
 * Probes and check connections registered at once. Each is registered only for its own
 * connect, one after the other; at most a probe, a promote's check and a watch window's
 * check of one group run at a time, and a second daemon instance may probe during a
 * restart. The rest is headroom (a hash map preallocates every entry).
 */
#define HANDOFF_PROBE_SLOTS 64
/* `chosen` until the program records a decision; as `target`: a probe, not a check. */
#define HANDOFF_PROBE_UNSET 0xffffffffu
/* A probe that found no socket to select (the kernel's hash would have chosen). */
#define HANDOFF_PROBE_NO_SOCKET 0xfffffffeu

/*
 * A probe connection, registered by the daemon before it connects and removed after:
 * only a SYN with exactly this source address, source port and destination port is a
 * probe. The daemon binds the source address to the destination address (loopback for a
 * wildcard group), so a probe's IP source equals its IP destination.
 */
struct handoff_probe_key {
	/* IP source address: 16 bytes for IPv6; IPv4 in the first 4, the rest zero. */
	__u8 saddr[16];
	/* TCP source port (the kernel's ephemeral pick), host byte order. */
	__u16 sport;
	/* TCP destination port (the service port), host byte order. */
	__u16 dport;
	/* 4 or 6. */
	__u32 family;
};

/*
 * What the program does with a registered connection: `target` HANDOFF_PROBE_UNSET makes
 * it a probe (the program records the slot it would choose in `chosen` and drops the
 * SYN); any other `target` makes it a health check of that one listener (the program
 * selects exactly that slot, records it, and lets the connection through; if the slot
 * holds no socket it records HANDOFF_PROBE_NO_SOCKET and drops the SYN).
 */
struct handoff_probe {
	__u32 target;
	/* HANDOFF_PROBE_UNSET until the program saw the SYN. */
	__u32 chosen;
};

/*
 * One group's steering state; immutable while `current` can point at it. New connections
 * go to the active generation's listeners, except that a canary (canary_len > 0) takes
 * `weight` percent of them; a canary without a listener left gives its share to the
 * active generation, and an active generation without one to the previous generation.
 */
struct handoff_record {
	/* First slot and number of listeners of the canary (len 0: none). */
	__u32 canary_first;
	__u32 canary_len;
	/* First slot and number of listeners of the active generation. */
	__u32 active_first;
	__u32 active_len;
	/* The same for the previous generation (len 0: none). */
	__u32 prev_first;
	__u32 prev_len;
	/* Percent (0 to 100) of new connections for the canary. */
	__u32 weight;
	/* Zero. */
	__u32 reserved;
};

/* Per-CPU counters of the program's decisions, indexes into the `counters` map. */
enum handoff_counter {
	/* The hashed pick in the active generation's block took the connection. */
	HANDOFF_CTR_ACTIVE = 0,
	/* The hashed pick had closed; another listener of the active generation took it. */
	HANDOFF_CTR_ACTIVE_RETRY = 1,
	/* The active generation had no listener; the one it falls back to took it. */
	HANDOFF_CTR_FALLBACK = 2,
	/* No listener of either generation: left to the kernel's hash over the group. */
	HANDOFF_CTR_KERNEL_HASH = 3,
	/* Decisions for a request migrated off a closing listener (also counted above). */
	HANDOFF_CTR_MIGRATED = 4,
	/* Probe connections recognised and dropped (not counted above). */
	HANDOFF_CTR_PROBE = 5,
	/* The canary's share: a listener of the canary took the connection. */
	HANDOFF_CTR_CANARY = 6,
	/* Health-check connections sent to the listener they named (not counted above). */
	HANDOFF_CTR_CHECK = 7,
	HANDOFF_CTR_MAX = 8,
};

#endif
