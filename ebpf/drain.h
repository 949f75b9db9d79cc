/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Layouts shared by drain.bpf.c and userspace (mirrored in common/src/maps/records.rs
 * and common/src/maps/counters.rs).
 */
#ifndef HANDOFF_DRAIN_H
#define HANDOFF_DRAIN_H

/* Processes to tag in the next pass: tgid -> struct handoff_member. */
#define HANDOFF_MAX_MEMBERS 65536
/* Draining generations counted at once: tag -> signed count. */
#define HANDOFF_MAX_TAGS 4096
/* Ports whose bind() may be reported: port -> 1. */
#define HANDOFF_MAX_PORTS 1024
/* Watched service addresses (each with the wildcard of its family). */
#define HANDOFF_MAX_WATCHED 4096
/* Bind events let through per watched address and window: 32 per 100 ms, 320/s. */
#define HANDOFF_BIND_BUDGET 32
#define HANDOFF_BIND_WINDOW_NS 100000000ULL
/* A watch's uids[0] before the service's uid is known: every uid passes. */
#define HANDOFF_ANY_UID 0xffffffffU

struct handoff_member {
	/* The draining generation's tag (never 0). */
	__u32 tag;
	/* The service port: only connections on it are counted. */
	__u32 port;
};

/* A bound local address: the key of `watched`. */
struct handoff_addr {
	/* AF_INET or AF_INET6. */
	__u32 family;
	/* Host byte order. */
	__u32 port;
	/* Network byte order; IPv4 in addr[0], the rest zero. */
	__u32 addr[4];
};

/* A watched address: whose binds count, and its rate limit. */
struct handoff_watch {
	/* The uids whose binds are reported (HANDOFF_ANY_UID in uids[0]: any). */
	__u32 uids[2];
	/* The current window (ktime / HANDOFF_BIND_WINDOW_NS) and the events it let through. */
	__u64 window;
	__u64 used;
};

/* Indices of the per-CPU `stats` counters. */
enum handoff_stat {
	/* A zero event did not fit its ring. */
	HANDOFF_STAT_LOST_ZEROS = 0,
	/* A bind event did not fit its ring. */
	HANDOFF_STAT_LOST_BINDS = 1,
	/* A bind event over the budget, not written. */
	HANDOFF_STAT_SUPPRESSED = 2,
	/* A bind of a watched port refused by namespace, address or uid. */
	HANDOFF_STAT_FILTERED = 3,
	HANDOFF_STATS = 4,
};

/* What the rings carry. */
enum handoff_event_kind {
	/* A tag's count dropped to zero: value = the tag. */
	HANDOFF_EV_ZERO = 1,
	/* Someone bound a watched port (a listener may be coming): value = the port. */
	HANDOFF_EV_BIND = 2,
	/*
	 * The first bind event a watched address's window holds back: value = the port. Wakes
	 * the daemon to read the counters (then again while they move), at most once a window.
	 */
	HANDOFF_EV_HELD = 3,
};

struct handoff_event {
	__u32 kind;
	__u32 value;
	/* HANDOFF_EV_BIND: the process (tgid) that bound the port; 0 otherwise. */
	__u32 pid;
	__u32 reserved;
};

/* What the listener iterator writes for each listening socket it finds. */
struct handoff_listener {
	__u32 tgid;
	__u32 fd;
	/* The socket's inode, as sock_diag reports it. */
	__u64 inode;
};

/* What the process table iterator writes for each process. */
struct handoff_proc {
	__u32 tgid;
	/* The parent's tgid (0 for the roots). */
	__u32 ppid;
};

#endif
