/* SPDX-License-Identifier: Apache-2.0 */
/*
 * layout.c - prints the sizes, field offsets and constants of agentcg.h as
 * JSON (bpf/.output/layout.json), compiled with the host C compiler at build
 * time. tests/unit/test_bpf_layout.py compares the ctypes mirror with it.
 */
#include <stddef.h>
#include <stdio.h>
#include "agentcg.h"

static int first;

#define BEGIN(name) do { printf("%s\n    \"%s\": {\"size\": %zu, \"fields\": {", first ? "" : ",", #name, sizeof(struct name)); first = 0; int f_ = 1;
#define FIELD(name, field) printf("%s\"%s\": [%zu, %zu]", f_ ? "" : ", ", #field, offsetof(struct name, field), sizeof(((struct name *)0)->field)); f_ = 0;
#define END() printf("}}"); } while (0)
#define CONST(name) printf("%s\n    \"%s\": %lld", first ? "" : ",", #name, (long long)(name)); first = 0;

int main(void)
{
	printf("{\n  \"structs\": {");
	first = 1;
	BEGIN(agentcg_event)
		FIELD(agentcg_event, type) FIELD(agentcg_event, flags) FIELD(agentcg_event, pid)
		FIELD(agentcg_event, tgid) FIELD(agentcg_event, ppid) FIELD(agentcg_event, exit_code)
		FIELD(agentcg_event, ts_ns) FIELD(agentcg_event, cgroup_id) FIELD(agentcg_event, start_ns)
		FIELD(agentcg_event, comm) FIELD(agentcg_event, filename) FIELD(agentcg_event, args_len)
		FIELD(agentcg_event, _pad) FIELD(agentcg_event, args)
	END();
	BEGIN(agentcg_cg_stats)
		FIELD(agentcg_cg_stats, forks) FIELD(agentcg_cg_stats, execs) FIELD(agentcg_cg_stats, exits)
		FIELD(agentcg_cg_stats, oom_kills)
	END();
	BEGIN(agentcg_net_stats)
		FIELD(agentcg_net_stats, tx_bytes) FIELD(agentcg_net_stats, rx_bytes)
		FIELD(agentcg_net_stats, tx_packets) FIELD(agentcg_net_stats, rx_packets)
		FIELD(agentcg_net_stats, denied)
	END();
	BEGIN(agentcg_runq_hist)
		FIELD(agentcg_runq_hist, slots) FIELD(agentcg_runq_hist, count) FIELD(agentcg_runq_hist, sum_ns)
	END();
	BEGIN(agentcg_sched_cg)
		FIELD(agentcg_sched_cg, weight) FIELD(agentcg_sched_cg, boost)
	END();
	BEGIN(agentcg_agent)
		FIELD(agentcg_agent, tgid) FIELD(agentcg_agent, _pad)
	END();
	BEGIN(agentcg_stopped)
		FIELD(agentcg_stopped, stop_ns) FIELD(agentcg_stopped, start_boottime_ns)
	END();
	printf("\n  },\n  \"consts\": {");
	first = 1;
	CONST(AGENTCG_COMM_LEN) CONST(AGENTCG_FILENAME_LEN) CONST(AGENTCG_ARGS_LEN)
	CONST(AGENTCG_RUNQ_SLOTS) CONST(AGENTCG_RINGBUF_BYTES) CONST(AGENTCG_MAX_CGROUPS)
	CONST(AGENTCG_MAX_TASKS) CONST(AGENTCG_MAX_AGENTS) CONST(AGENTCG_MAX_STOPPED)
	CONST(AGENTCG_EVF_STOPPED) CONST(AGENTCG_CTR_EXEC_STOPS) CONST(AGENTCG_CTR_STOP_FAILS)
	CONST(AGENTCG_EV_FORK) CONST(AGENTCG_EV_EXEC) CONST(AGENTCG_EV_EXIT) CONST(AGENTCG_EV_OOM)
	CONST(NR_AGENTCG_EV) CONST(AGENTCG_EVF_ARGS_TRUNCATED)
	CONST(AGENTCG_NET_FULL) CONST(AGENTCG_NET_LOCAL) CONST(AGENTCG_NET_NONE) CONST(NR_AGENTCG_NET)
	CONST(AGENTCG_CTR_RINGBUF_DROPS) CONST(AGENTCG_CTR_EVENTS) CONST(AGENTCG_CTR_RUNQ_MISSES)
	CONST(AGENTCG_CTR_NET_DENIED) CONST(NR_AGENTCG_CTR)
	CONST(AGENTCG_SCHED_WEIGHT_MIN) CONST(AGENTCG_SCHED_WEIGHT_DFL) CONST(AGENTCG_SCHED_WEIGHT_MAX)
	printf("\n  }\n}\n");
	return 0;
}
