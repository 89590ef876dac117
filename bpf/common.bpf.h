/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Helpers shared by the agentcg BPF programs: cgroup ids of a task, the
 * subtree filter, per-CPU counters and the log2 slot of a latency.
 */
#ifndef AGENTCG_COMMON_BPF_H
#define AGENTCG_COMMON_BPF_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "agentcg.h"

/*
 * READ(): direct (BTF-typed, fault-safe) loads in tp_btf builds, which cost a
 * plain load each; bpf_probe_read_kernel chains (BPF_CORE_READ) for raw_tp,
 * where arguments are untyped. Both relocate field offsets (CO-RE).
 */
#ifdef AGENTCG_DIRECT_READ
#define READ(expr) (expr)
#else
#define READ(expr) ({ typeof(expr) __v; bpf_core_read(&__v, sizeof(__v), &(expr)); __v; })
#endif

/*
 * The value under key in a hash map, inserted as *zero first if it is not
 * there yet (BPF_NOEXIST: a racing insert on another CPU wins and is used).
 * NULL only when the map is full.
 */
static __always_inline void *lookup_or_zero(void *map, const void *key, const void *zero)
{
	void *v = bpf_map_lookup_elem(map, key);

	if (v)
		return v;
	bpf_map_update_elem(map, key, zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(map, key);
}

/* The cgroup v2 id (kernfs inode number) of a task's default-hierarchy cgroup. */
static __always_inline __u64 task_cgroup_id(struct task_struct *t)
{
	struct css_set *cs = READ(t->cgroups);
	struct cgroup *cg = READ(cs->dfl_cgrp);
	struct kernfs_node *kn = READ(cg->kn);

	return READ(kn->id);
}

/*
 * True when `t` lives in cgroup `root_id` (at depth `root_level` below the
 * cgroup2 root) or below it. root_id == 0 means "everything".
 */
static __always_inline bool task_under(struct task_struct *t, __u64 root_id, __u32 root_level)
{
	struct cgroup *cg, *anc = NULL;
	int level;

	if (!root_id)
		return true;
	struct css_set *cs = READ(t->cgroups);

	cg = READ(cs->dfl_cgrp);
	if (!cg)
		return false;
	level = READ(cg->level);
	if (level < (int)root_level || root_level > 64)
		return false;
	bpf_probe_read_kernel(&anc, sizeof(anc), __builtin_preserve_access_index(&cg->ancestors[root_level]));
	if (!anc)
		return false;
	/* anc came from a probe read: an untyped scalar, so probe reads from here on */
	return BPF_CORE_READ(anc, kn, id) == root_id;
}

static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 r = 0, s;

	s = (v > 0xFFFFFFFFULL) << 5; v >>= s; r |= s;
	s = (v > 0xFFFF) << 4; v >>= s; r |= s;
	s = (v > 0xFF) << 3; v >>= s; r |= s;
	s = (v > 0xF) << 2; v >>= s; r |= s;
	s = (v > 0x3) << 1; v >>= s; r |= s;
	r |= (v >> 1);
	return r;
}

#endif /* AGENTCG_COMMON_BPF_H */
