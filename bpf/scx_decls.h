/* SPDX-License-Identifier: Apache-2.0 */
/*
 * scx_decls.h - the part of sched_ext that sched.bpf.c uses, declared here so
 * that the object builds on hosts whose kernel BTF has no sched_ext (libbpf
 * matches struct_ops members by name against the running kernel at load, and
 * CO-RE relocates scx_exit_info's fields).
 */
#ifndef AGENTCG_SCX_DECLS_H
#define AGENTCG_SCX_DECLS_H

#include "scx_have.h"

#define SCX_DSQ_FLAG_BUILTIN (1ULL << 63)
#define SCX_DSQ_GLOBAL (SCX_DSQ_FLAG_BUILTIN | 1)
#define SCX_DSQ_LOCAL (SCX_DSQ_FLAG_BUILTIN | 2)

#ifndef AGENTCG_VMLINUX_HAS_SCX
enum scx_exit_kind {
	SCX_EXIT_NONE = 0,
	SCX_EXIT_DONE = 1,
	SCX_EXIT_UNREG = 64,
};

struct scx_exit_info {
	enum scx_exit_kind kind;  /* CO-RE: must be an enum like the kernel's to relocate */
	__s64 exit_code;
	const char *reason;
} __attribute__((preserve_access_index));

struct sched_ext_ops {
	__s32 (*select_cpu)(struct task_struct *p, __s32 prev_cpu, __u64 wake_flags);
	void (*enqueue)(struct task_struct *p, __u64 enq_flags);
	void (*dispatch)(__s32 cpu, struct task_struct *prev);
	void (*running)(struct task_struct *p);
	void (*stopping)(struct task_struct *p, bool runnable);
	__s32 (*init)(void);
	void (*exit)(struct scx_exit_info *info);
	__u32 timeout_ms;
	char name[128];
};
#endif

__s32 scx_bpf_create_dsq(__u64 dsq_id, __s32 node) __ksym;
__s32 scx_bpf_select_cpu_dfl(struct task_struct *p, __s32 prev_cpu, __u64 wake_flags, bool *is_idle) __ksym;
void scx_bpf_dsq_insert(struct task_struct *p, __u64 dsq_id, __u64 slice, __u64 enq_flags) __ksym;
void scx_bpf_dsq_insert_vtime(struct task_struct *p, __u64 dsq_id, __u64 slice, __u64 vtime, __u64 enq_flags) __ksym;
bool scx_bpf_dsq_move_to_local(__u64 dsq_id) __ksym;

#define BPF_STRUCT_OPS(name, args...) SEC("struct_ops/" #name) BPF_PROG(name, ##args)

#endif /* AGENTCG_SCX_DECLS_H */
