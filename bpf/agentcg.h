/* SPDX-License-Identifier: Apache-2.0 */
/*
 * agentcg.h - the one contract between the BPF programs and Python.
 *
 * Every .bpf.c includes this file, and so does the host-side layout dumper
 * (layout.c) that writes bpf/.output/layout.json at build time. The ctypes
 * mirror in agentcg/adapters/bpf_types.py is checked against that JSON by a
 * unit test, so a field added here without its mirror fails the build's tests.
 *
 * Only fixed-width types: this header is compiled both with vmlinux.h
 * (BPF side) and with <stdint.h> (host side).
 */
#ifndef AGENTCG_H
#define AGENTCG_H

#ifndef __VMLINUX_H__
#include <stdint.h>
typedef uint8_t __u8;
typedef uint32_t __u32;
typedef int32_t __s32;
typedef uint64_t __u64;
#endif

/* Limits. */
#define AGENTCG_COMM_LEN 16          /* TASK_COMM_LEN */
#define AGENTCG_FILENAME_LEN 128     /* exec'd path, truncated, NUL-terminated */
#define AGENTCG_ARGS_LEN 256         /* argv, NUL-separated, truncated */
#define AGENTCG_RUNQ_SLOTS 32        /* log2(ns) buckets: 1 ns .. ~4.3 s, last is open */
#define AGENTCG_RINGBUF_BYTES (1 << 20)
#define AGENTCG_MAX_CGROUPS 8192     /* per-cgroup stats and policy maps */
#define AGENTCG_MAX_TASKS 65536      /* run-queue start timestamps */
#define AGENTCG_MAX_AGENTS 1024      /* registered agents (automatic mode) */
#define AGENTCG_MAX_STOPPED 4096     /* processes stopped at exec, waiting for placement */

/* Event kinds carried in struct agentcg_event.type. */
enum agentcg_event_type {
	AGENTCG_EV_FORK = 1,   /* a new process (not a thread): pid/tgid = child, ppid = parent tgid */
	AGENTCG_EV_EXEC = 2,   /* filename + args set */
	AGENTCG_EV_EXIT = 3,   /* last thread of a process exited; exit_code = raw wait status */
	AGENTCG_EV_OOM = 4,    /* OOM killer chose pid as victim */
	NR_AGENTCG_EV,
};

/* Event flags. */
enum agentcg_event_flag {
	AGENTCG_EVF_ARGS_TRUNCATED = 1,
	AGENTCG_EVF_STOPPED = 2,   /* EXEC: SIGSTOP sent before user space; the daemon continues it */
	NR_AGENTCG_EVF = 4,
};

/* Network intent per cgroup (value of the netpolicy map). */
enum agentcg_net_mode {
	AGENTCG_NET_FULL = 0,    /* absent from the map means full */
	AGENTCG_NET_LOCAL = 1,   /* IP sockets allowed, only to/from loopback addresses */
	AGENTCG_NET_NONE = 2,    /* no AF_INET/AF_INET6 sockets at all; AF_UNIX works */
	NR_AGENTCG_NET,
};

/* Indices of the per-CPU counter array "counters". */
enum agentcg_counter {
	AGENTCG_CTR_RINGBUF_DROPS = 0,  /* events lost: ring buffer full */
	AGENTCG_CTR_EVENTS = 1,         /* events submitted */
	AGENTCG_CTR_RUNQ_MISSES = 2,    /* runq samples lost: start map full */
	AGENTCG_CTR_NET_DENIED = 3,     /* socket/connect/sendmsg/bind refused */
	AGENTCG_CTR_EXEC_STOPS = 4,     /* agent children stopped at exec until placed */
	AGENTCG_CTR_STOP_FAILS = 5,     /* bpf_send_signal(SIGSTOP) refused: ran unstopped */
	NR_AGENTCG_CTR,
};

/* One ring-buffer record. Fixed size; unused text fields are zeroed. */
struct agentcg_event {
	__u32 type;            /* enum agentcg_event_type */
	__u32 flags;           /* enum agentcg_event_flag bits */
	__u32 pid;             /* thread id of the subject */
	__u32 tgid;            /* process id of the subject */
	__u32 ppid;            /* parent's tgid (real_parent) */
	__s32 exit_code;       /* EXIT: task->exit_code (wait status); else 0 */
	__u64 ts_ns;           /* bpf_ktime_get_ns() = CLOCK_MONOTONIC */
	__u64 cgroup_id;       /* cgroup v2 id (inode number) of the subject */
	__u64 start_ns;        /* subject's start_time (monotonic) */
	char comm[AGENTCG_COMM_LEN];
	char filename[AGENTCG_FILENAME_LEN];
	__u32 args_len;        /* bytes used in args */
	__u32 _pad;
	char args[AGENTCG_ARGS_LEN];
};

/*
 * Stop until placed (automatic mode): hash map "agent_cgs" (key = an agent
 * cgroup's id, value = struct agentcg_agent) names the agents; the array map
 * "stop_ctl" (one __u32, key 0) is 1 while the daemon consumes events; hash
 * map "stopped" (key = tgid) holds each process stopped at exec until it is
 * continued (deleted by the daemon, or by the exit hook if it dies stopped).
 */
struct agentcg_agent {
	__u32 tgid;            /* the agent's process id: its direct children are stopped at exec */
	__u32 _pad;
};

struct agentcg_stopped {
	__u64 stop_ns;         /* bpf_ktime_get_ns() when SIGSTOP was sent */
	__u64 start_boottime_ns; /* task->start_boottime: /proc/PID/stat starttime, to tell pid reuse */
};

/* Per-cgroup counters (hash map "cg_stats", key = cgroup id). */
struct agentcg_cg_stats {
	__u64 forks;           /* new processes started in this cgroup */
	__u64 execs;
	__u64 exits;           /* processes ended in this cgroup */
	__u64 oom_kills;       /* OOM victims chosen in this cgroup */
};

/* Per-cgroup network counters (netpolicy's hash map "net_stats", key = cgroup id). */
struct agentcg_net_stats {
	__u64 tx_bytes;        /* cgroup_skb egress, IP packets incl. headers */
	__u64 rx_bytes;        /* cgroup_skb ingress */
	__u64 tx_packets;
	__u64 rx_packets;
	__u64 denied;          /* socket/connect/sendmsg/bind refused by network intent */
};

/* Run-queue latency histogram (hash map "runq_hist", key = cgroup id). */
struct agentcg_runq_hist {
	__u64 slots[AGENTCG_RUNQ_SLOTS];  /* slot i counts delays in [2^i, 2^(i+1)) ns; slot 0 also 0 */
	__u64 count;
	__u64 sum_ns;
};

/* sched_ext weights (hash map "sched_cg", key = cgroup id). */
struct agentcg_sched_cg {
	__u32 weight;          /* 1..10000, like cpu.weight; 100 = normal */
	__u32 boost;           /* 1 = the agent is waiting on this cgroup: dispatch first */
};

#define AGENTCG_SCHED_WEIGHT_MIN 1
#define AGENTCG_SCHED_WEIGHT_DFL 100
#define AGENTCG_SCHED_WEIGHT_MAX 10000

_Static_assert(sizeof(struct agentcg_event) % 8 == 0, "event must stay 8-byte aligned in the ring buffer");
_Static_assert(sizeof(struct agentcg_event) <= 1024, "event must stay small: it is copied per fork/exec/exit");
_Static_assert(AGENTCG_RINGBUF_BYTES >= 64 * sizeof(struct agentcg_event), "ring buffer must hold a burst");
_Static_assert((AGENTCG_RINGBUF_BYTES & (AGENTCG_RINGBUF_BYTES - 1)) == 0, "ring buffer size must be a power of 2");
_Static_assert((AGENTCG_ARGS_LEN & (AGENTCG_ARGS_LEN - 1)) == 0, "args length is used as a mask");
_Static_assert(AGENTCG_RUNQ_SLOTS <= 64, "log2 of a u64 has at most 64 slots");
_Static_assert(sizeof(struct agentcg_stopped) == 16, "stopped entry is two u64");
_Static_assert(NR_AGENTCG_EV <= 255, "event type fits a byte");

#endif /* AGENTCG_H */
