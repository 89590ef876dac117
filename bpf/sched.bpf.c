// SPDX-License-Identifier: Apache-2.0
/*
 * sched.bpf.c - a cgroup-aware sched_ext scheduler for agentcg.
 *
 * Weighted virtual time over one shared dispatch queue. Each task's weight is
 * the weight of its cgroup from the "sched_cg" map (filled by the daemon from
 * session priority and call intents; absent = 100): a task charges its run
 * time / weight to its virtual time, so higher weights run sooner and wait
 * less. A cgroup with boost set (the tool call an agent is waiting on) is
 * queued at the front. Idle CPUs found at wakeup take the task directly.
 * On exit the kernel's reason (e.g. the watchdog) is kept in exit_kind /
 * exit_reason for the daemon to report.
 */
#define AGENTCG_DIRECT_READ 1
#include "common.bpf.h"
#include "scx_decls.h"

char LICENSE[] SEC("license") = "GPL";

#define SHARED_DSQ 0x4147   /* any id without SCX_DSQ_FLAG_BUILTIN */

const volatile __u64 slice_ns = 5000000;     /* 5 ms */

/* Written on exit; read by the loader from .bss. */
__s32 exit_kind;
__s64 exit_code;
char exit_reason[128];
__u64 vtime_now;

struct task_ctx {
	__u64 vtime;
	__u64 started_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct task_ctx);
} task_ctxs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AGENTCG_MAX_CGROUPS);
	__type(key, __u64);
	__type(value, struct agentcg_sched_cg);
} sched_cg SEC(".maps");

static __always_inline __u32 weight_of(struct task_struct *p, __u32 *boost)
{
	__u64 cgid = task_cgroup_id(p);
	struct agentcg_sched_cg *w = bpf_map_lookup_elem(&sched_cg, &cgid);
	__u32 v;

	*boost = 0;
	if (!w)
		return AGENTCG_SCHED_WEIGHT_DFL;
	*boost = w->boost;
	v = w->weight;
	if (v < AGENTCG_SCHED_WEIGHT_MIN)
		v = AGENTCG_SCHED_WEIGHT_MIN;
	if (v > AGENTCG_SCHED_WEIGHT_MAX)
		v = AGENTCG_SCHED_WEIGHT_MAX;
	return v;
}

static __always_inline struct task_ctx *ctx_of(struct task_struct *p)
{
	return bpf_task_storage_get(&task_ctxs, p, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
}

__s32 BPF_STRUCT_OPS(agentcg_select_cpu, struct task_struct *p, __s32 prev_cpu, __u64 wake_flags)
{
	bool is_idle = false;
	__s32 cpu = scx_bpf_select_cpu_dfl(p, prev_cpu, wake_flags, &is_idle);

	if (is_idle)
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL, slice_ns, 0);
	return cpu;
}

void BPF_STRUCT_OPS(agentcg_enqueue, struct task_struct *p, __u64 enq_flags)
{
	struct task_ctx *t = ctx_of(p);
	__u64 vtime = vtime_now, floor;
	__u32 boost = 0;

	weight_of(p, &boost);
	if (t)
		vtime = t->vtime;
	/* at most one slice of credit for sleepers; boosted cgroups go first */
	floor = vtime_now > slice_ns ? vtime_now - slice_ns : 0;
	if (vtime < floor || boost)
		vtime = floor;
	scx_bpf_dsq_insert_vtime(p, SHARED_DSQ, slice_ns, vtime, enq_flags);
}

void BPF_STRUCT_OPS(agentcg_dispatch, __s32 cpu, struct task_struct *prev)
{
	scx_bpf_dsq_move_to_local(SHARED_DSQ);
}

void BPF_STRUCT_OPS(agentcg_running, struct task_struct *p)
{
	struct task_ctx *t = ctx_of(p);

	if (!t)
		return;
	t->started_ns = bpf_ktime_get_ns();
	if (t->vtime > vtime_now)
		vtime_now = t->vtime;
}

void BPF_STRUCT_OPS(agentcg_stopping, struct task_struct *p, bool runnable)
{
	struct task_ctx *t = ctx_of(p);
	__u32 boost, w;
	__u64 used;

	if (!t || !t->started_ns)
		return;
	used = bpf_ktime_get_ns() - t->started_ns;
	w = weight_of(p, &boost);
	t->vtime += used * AGENTCG_SCHED_WEIGHT_DFL / w;
}

/* sleepable (scx_bpf_create_dsq): the loader sets BPF_F_SLEEPABLE, as libbpf 1.1 has no struct_ops.s/ */
__s32 BPF_STRUCT_OPS(agentcg_init)
{
	return scx_bpf_create_dsq(SHARED_DSQ, -1);
}

void BPF_STRUCT_OPS(agentcg_exit, struct scx_exit_info *ei)
{
	exit_kind = BPF_CORE_READ(ei, kind);
	exit_code = BPF_CORE_READ(ei, exit_code);
	bpf_probe_read_kernel_str(exit_reason, sizeof(exit_reason), BPF_CORE_READ(ei, reason));
}

SEC(".struct_ops")
struct sched_ext_ops agentcg_ops = {
	.select_cpu = (void *)agentcg_select_cpu,
	.enqueue = (void *)agentcg_enqueue,
	.dispatch = (void *)agentcg_dispatch,
	.running = (void *)agentcg_running,
	.stopping = (void *)agentcg_stopping,
	.init = (void *)agentcg_init,
	.exit = (void *)agentcg_exit,
	.timeout_ms = 5000,
	.name = "agentcg",
};
