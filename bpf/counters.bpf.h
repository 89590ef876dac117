/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The per-CPU counter array "counters" (indices AGENTCG_CTR_* in agentcg.h),
 * defined once for every program that counts (tracker, netpolicy); the
 * loader sums it over CPUs. A program that includes this header gets its
 * own instance of the map in its object.
 */
#ifndef AGENTCG_COUNTERS_BPF_H
#define AGENTCG_COUNTERS_BPF_H

#include "common.bpf.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NR_AGENTCG_CTR);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* Add one to counter idx on this CPU (per-CPU: no atomic needed). */
static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);

	if (v)
		*v += 1;
}

#endif /* AGENTCG_COUNTERS_BPF_H */
