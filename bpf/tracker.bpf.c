// SPDX-License-Identifier: Apache-2.0
/*
 * tracker.bpf.c - follows processes inside agentcg's cgroup subtree.
 *
 * Observes, for tasks in the daemon's subtree only (filter_cgid/filter_level):
 *   - sched_process_fork (new processes, not threads), sched_process_exec
 *     (path + argv), sched_process_exit (process leader) -> ring-buffer events;
 *   - per-cgroup counters of forks, execs, exits and OOM victims;
 *   - run-queue latency (wakeup -> switch-in, and preempted -> switch-in)
 *     per cgroup as a log2 histogram;
 *   - oom/mark_victim -> an event naming the victim and its cgroup;
 *   - stop until placed (automatic mode): a direct child of a registered
 *     agent, exec'ing in the agent's cgroup, gets SIGSTOP from the exec hook
 *     (bpf_send_signal: pending before the exec returns to user space, so the
 *     new program runs no instruction before the daemon has moved it into its
 *     tool call and sent SIGCONT). Only while stop_ctl[0] is 1.
 * It decides nothing: the daemon attributes processes to tool calls, moves
 * them and reacts. Every hook exists twice, as tp_btf (preferred: typed
 * arguments, direct loads: tracker.bpf.o) and raw_tp (fallback, probe reads:
 * tracker_raw.bpf.o); the loader uses the first that loads.
 */
#include "common.bpf.h"
#include "counters.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* Knobs, set by the loader before load. Non-zero defaults keep verification realistic. */
const volatile __u64 filter_cgid = 0;      /* 0: trace every task */
const volatile __u32 filter_level = 1;     /* depth of filter_cgid below the cgroup2 root */
const volatile __u64 runq_min_ns = 1;      /* ignore shorter run-queue waits */
const volatile __u32 stop_allowed = 1;     /* 0: no bpf_send_signal in the object (kernels that refuse it) */

#define AGENTCG_SIGSTOP 19                 /* same number on every architecture the loader supports */

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, AGENTCG_RINGBUF_BYTES);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AGENTCG_MAX_CGROUPS);
	__type(key, __u64);
	__type(value, struct agentcg_cg_stats);
} cg_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AGENTCG_MAX_CGROUPS);
	__type(key, __u64);
	__type(value, struct agentcg_runq_hist);
} runq_hist SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AGENTCG_MAX_TASKS);
	__type(key, __u32);
	__type(value, __u64);
} runq_start SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AGENTCG_MAX_AGENTS);
	__type(key, __u64);
	__type(value, struct agentcg_agent);
} agent_cgs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} stop_ctl SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AGENTCG_MAX_STOPPED);
	__type(key, __u32);
	__type(value, struct agentcg_stopped);
} stopped SEC(".maps");

static __always_inline struct agentcg_cg_stats *stats_of(__u64 cgid)
{
	struct agentcg_cg_stats zero = {};

	return lookup_or_zero(&cg_stats, &cgid, &zero);
}

static __always_inline struct agentcg_event *reserve(void)
{
	struct agentcg_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e) {
		count(AGENTCG_CTR_RINGBUF_DROPS);
		return NULL;
	}
	/* The ring buffer is not zeroed: clear what a partial fill could leave. */
	e->flags = 0;
	e->exit_code = 0;
	e->args_len = 0;
	e->_pad = 0;
	e->filename[0] = 0;
	e->args[0] = 0;
	return e;
}

static __always_inline void fill_task(struct agentcg_event *e, __u32 type, struct task_struct *t, __u64 cgid)
{
	e->type = type;
	e->pid = READ(t->pid);
	e->tgid = READ(t->tgid);
	struct task_struct *parent = READ(t->real_parent);

	e->ppid = READ(parent->tgid);
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = cgid;
	e->start_ns = READ(t->start_time);
	bpf_probe_read_kernel_str(e->comm, sizeof(e->comm), &t->comm);
}

static __always_inline void submit(struct agentcg_event *e)
{
	bpf_ringbuf_submit(e, 0);
	count(AGENTCG_CTR_EVENTS);
}

/*
 * The common start of a process event: nothing unless the task is inside the
 * watched subtree; else count it in its cgroup's stats (the __u64 at
 * stat_off in struct agentcg_cg_stats) and reserve and fill the event. NULL
 * when filtered out or the ring buffer is full (the stats still count it).
 */
static __always_inline struct agentcg_event *begin(struct task_struct *t, __u32 type, __u32 stat_off)
{
	struct agentcg_cg_stats *s;
	struct agentcg_event *e;
	__u64 cgid;

	if (!task_under(t, filter_cgid, filter_level))
		return NULL;
	cgid = task_cgroup_id(t);
	s = stats_of(cgid);
	if (s)
		__sync_fetch_and_add((__u64 *)((char *)s + stat_off), 1);
	e = reserve();
	if (e)
		fill_task(e, type, t, cgid);
	return e;
}

#define STAT(field) __builtin_offsetof(struct agentcg_cg_stats, field)

static __always_inline int on_fork(struct task_struct *parent, struct task_struct *child)
{
	struct agentcg_event *e;

	if (READ(child->pid) != READ(child->tgid))
		return 0; /* a thread */
	e = begin(child, AGENTCG_EV_FORK, STAT(forks));
	if (!e)
		return 0;
	submit(e);
	return 0;
}

/*
 * Automatic mode: stop a registered agent's direct child at its exec, so that
 * it first runs in its tool call. The "stopped" entry is written first: the
 * daemon and its watchdog continue only what is listed there.
 */
static __always_inline void stop_if_agent_child(struct task_struct *p, struct agentcg_event *e)
{
	struct agentcg_stopped st = {};
	struct agentcg_agent *a;
	__u32 zero = 0, *on, tgid = e->tgid;
	__u64 cgid = e->cgroup_id;

	if (!stop_allowed)
		return;
	on = bpf_map_lookup_elem(&stop_ctl, &zero);
	if (!on || !*on)
		return;
	a = bpf_map_lookup_elem(&agent_cgs, &cgid);
	if (!a || a->tgid != e->ppid || a->tgid == tgid)
		return;
	st.stop_ns = e->ts_ns;
	st.start_boottime_ns = READ(p->start_boottime);
	if (bpf_map_update_elem(&stopped, &tgid, &st, BPF_ANY)) {
		count(AGENTCG_CTR_STOP_FAILS);
		return;
	}
	if (bpf_send_signal(AGENTCG_SIGSTOP)) {
		bpf_map_delete_elem(&stopped, &tgid);
		count(AGENTCG_CTR_STOP_FAILS);
		return;
	}
	e->flags |= AGENTCG_EVF_STOPPED;
	count(AGENTCG_CTR_EXEC_STOPS);
}

static __always_inline int on_exec(struct task_struct *p, struct linux_binprm *bprm)
{
	struct agentcg_event *e;
	unsigned long arg_start, arg_end, len;
	struct mm_struct *mm;
	const char *fname;

	e = begin(p, AGENTCG_EV_EXEC, STAT(execs));
	if (!e)
		return 0;
	fname = READ(bprm->filename);
	bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), fname);
	mm = READ(p->mm);
	arg_start = READ(mm->arg_start);
	arg_end = READ(mm->arg_end);
	len = arg_end > arg_start ? arg_end - arg_start : 0;
	if (len > AGENTCG_ARGS_LEN) {
		len = AGENTCG_ARGS_LEN;
		e->flags |= AGENTCG_EVF_ARGS_TRUNCATED;
	}
	if (len > 0 && len <= AGENTCG_ARGS_LEN &&
	    bpf_probe_read_user(e->args, len, (const void *)arg_start) == 0)
		e->args_len = len;
	stop_if_agent_child(p, e);
	submit(e);
	return 0;
}

static __always_inline int on_exit(struct task_struct *p)
{
	struct agentcg_event *e;
	__u32 pid = READ(p->pid);

	bpf_map_delete_elem(&runq_start, &pid);
	if (pid != READ(p->tgid))
		return 0; /* a thread */
	bpf_map_delete_elem(&stopped, &pid); /* died stopped (SIGKILL): nothing to continue */
	e = begin(p, AGENTCG_EV_EXIT, STAT(exits));
	if (!e)
		return 0;
	e->exit_code = READ(p->exit_code);
	submit(e);
	return 0;
}

static __always_inline int on_oom_victim(struct task_struct *p)
{
	struct agentcg_event *e;

	e = begin(p, AGENTCG_EV_OOM, STAT(oom_kills));
	if (!e)
		return 0;
	submit(e);
	return 0;
}

/* Run-queue latency: remember when a watched task became runnable. */
static __always_inline int runq_enqueued(struct task_struct *p)
{
	__u32 pid = READ(p->pid);
	__u64 ts;

	if (!pid || !task_under(p, filter_cgid, filter_level))
		return 0;
	ts = bpf_ktime_get_ns();
	if (bpf_map_update_elem(&runq_start, &pid, &ts, BPF_ANY))
		count(AGENTCG_CTR_RUNQ_MISSES);
	return 0;
}

static __always_inline int on_switch(struct task_struct *prev, struct task_struct *next, unsigned int prev_state)
{
	struct agentcg_runq_hist *h;
	__u64 *start, delta, cgid;
	__u32 pid, slot;

	if (prev_state == 0) /* TASK_RUNNING: preempted, back on the run queue */
		runq_enqueued(prev);
	pid = READ(next->pid);
	start = bpf_map_lookup_elem(&runq_start, &pid);
	if (!start)
		return 0;
	delta = bpf_ktime_get_ns() - *start;
	bpf_map_delete_elem(&runq_start, &pid);
	if (delta < runq_min_ns)
		return 0;
	cgid = task_cgroup_id(next);
	h = bpf_map_lookup_elem(&runq_hist, &cgid);
	if (!h) {
		struct agentcg_runq_hist zero = {};
		bpf_map_update_elem(&runq_hist, &cgid, &zero, BPF_NOEXIST);
		h = bpf_map_lookup_elem(&runq_hist, &cgid);
		if (!h)
			return 0;
	}
	slot = log2_u64(delta);
	if (slot >= AGENTCG_RUNQ_SLOTS)
		slot = AGENTCG_RUNQ_SLOTS - 1;
	__sync_fetch_and_add(&h->slots[slot], 1);
	__sync_fetch_and_add(&h->count, 1);
	__sync_fetch_and_add(&h->sum_ns, delta);
	return 0;
}

/*
 * One set of hooks, built twice from this file: as tp_btf programs with typed
 * arguments (tracker.bpf.o, AGENTCG_DIRECT_READ) and as raw_tp programs where
 * tp_btf is unavailable (tracker_raw.bpf.o). HOOK(name, tracepoint) gives the
 * section "<kind>/<tracepoint>" and the program name "<kind>_<name>", which
 * the loader and bench/bpf_tracker.py know.
 */
#ifdef AGENTCG_DIRECT_READ
#define HOOK(name, tp) SEC("tp_btf/" #tp) int BPF_PROG(tp_btf_##name
#else
#define HOOK(name, tp) SEC("raw_tp/" #tp) int BPF_PROG(raw_tp_##name
#endif

HOOK(fork, sched_process_fork), struct task_struct *parent, struct task_struct *child)
{ return on_fork(parent, child); }

HOOK(exec, sched_process_exec), struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{ return on_exec(p, bprm); }

HOOK(exit, sched_process_exit), struct task_struct *p)
{ return on_exit(p); }

HOOK(oom, mark_victim), struct task_struct *p)
{ return on_oom_victim(p); }

HOOK(wakeup, sched_wakeup), struct task_struct *p)
{ return runq_enqueued(p); }

HOOK(wakeup_new, sched_wakeup_new), struct task_struct *p)
{ return runq_enqueued(p); }

HOOK(switch, sched_switch), bool preempt, struct task_struct *prev, struct task_struct *next,
     unsigned int prev_state)
{ return on_switch(prev, next, prev_state); }
