/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Layouts shared by drain.bpf.c and userspace (mirrored in common/src/maps.rs).
 */
#ifndef HANDOFF_DRAIN_H
#define HANDOFF_DRAIN_H

/* Processes to tag in the next pass: tgid -> struct handoff_member. */
#define HANDOFF_MAX_MEMBERS 65536
/* Draining generations counted at once: tag -> signed count. */
#define HANDOFF_MAX_TAGS 4096
/* Ports whose bind() is reported: port -> 1. */
#define HANDOFF_MAX_PORTS 1024

struct handoff_member {
	/* The draining generation's tag (never 0). */
	__u32 tag;
	/* The service port: only connections on it are counted. */
	__u32 port;
};

/* What the ring buffer carries. */
enum handoff_event_kind {
	/* A tag's count dropped to zero: value = the tag. */
	HANDOFF_EV_ZERO = 1,
	/* Someone bound a watched port (a listener may be coming): value = the port. */
	HANDOFF_EV_BIND = 2,
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
