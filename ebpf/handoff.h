/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Layouts shared by handoff.bpf.c and userspace. This file is the one source of truth:
 * common/src/maps.rs mirrors it with #[repr(C)] types and compile-time size checks.
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

/* Probe connections come from these loopback source ports (below 1024: root only). */
#define HANDOFF_PROBE_PORT_FIRST 600
#define HANDOFF_PROBE_PORTS 100
/* The value a probe slot holds until the program records a decision in it. */
#define HANDOFF_PROBE_UNSET 0xffffffffu
/* A probe that found no socket to select (the kernel's hash would have chosen). */
#define HANDOFF_PROBE_NO_SOCKET 0xfffffffeu

/* One group's steering state; immutable while `current` can point at it. */
struct handoff_record {
	/* First slot and number of listeners of the active generation. */
	__u32 active_first;
	__u32 active_len;
	/* The same for the previous generation (len 0: none). */
	__u32 prev_first;
	__u32 prev_len;
};

/* Per-CPU counters of the program's decisions, indexes into the `counters` map. */
enum handoff_counter {
	/* The hashed pick in the active generation's block took the connection. */
	HANDOFF_CTR_ACTIVE = 0,
	/* The hashed pick had closed; another listener of the active generation took it. */
	HANDOFF_CTR_ACTIVE_RETRY = 1,
	/* The active generation had no listener; the previous generation took it. */
	HANDOFF_CTR_PREVIOUS = 2,
	/* No listener of either generation: left to the kernel's hash over the group. */
	HANDOFF_CTR_KERNEL_HASH = 3,
	/* Decisions for a request migrated off a closing listener (also counted above). */
	HANDOFF_CTR_MIGRATED = 4,
	/* Probe connections recognised and dropped (not counted above). */
	HANDOFF_CTR_PROBE = 5,
	HANDOFF_CTR_MAX = 6,
};

#endif
