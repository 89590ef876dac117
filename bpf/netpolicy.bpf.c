// SPDX-License-Identifier: Apache-2.0
/*
 * netpolicy.bpf.c - network intent per tool call, enforced by cgroup BPF.
 *
 * Attached once to the daemon's cgroup (effective for every session and tool
 * call below it); the mode of each cgroup comes from the "net_mode" map that
 * the daemon fills per tool call (absent = full):
 *   none  - cgroup/sock_create refuses AF_INET and AF_INET6 sockets (EPERM);
 *           AF_UNIX and everything else keep working.
 *   local - connect/sendmsg/bind only to loopback addresses (127/8, ::1,
 *           ::ffff:127/104; bind to the wildcard is allowed), and
 *           cgroup_skb drops packets that do not cross the loopback device.
 *   full  - no restriction.
 * cgroup_skb egress/ingress also count bytes and packets per cgroup for the
 * call's stats. Refusals are counted too; the daemon reports them.
 */
#include "common.bpf.h"
#include "counters.bpf.h"
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define LOOPBACK_IFINDEX 1   /* the loopback device is ifindex 1 in every netns */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AGENTCG_MAX_CGROUPS);
	__type(key, __u64);
	__type(value, __u32);
} net_mode SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AGENTCG_MAX_CGROUPS);
	__type(key, __u64);
	__type(value, struct agentcg_net_stats);
} net_stats SEC(".maps");

static __always_inline __u32 mode_of(__u64 cgid)
{
	__u32 *m = bpf_map_lookup_elem(&net_mode, &cgid);

	return m ? *m : AGENTCG_NET_FULL;
}

static __always_inline struct agentcg_net_stats *stats_of(__u64 cgid)
{
	struct agentcg_net_stats zero = {};

	return lookup_or_zero(&net_stats, &cgid, &zero);
}

static __always_inline int deny(__u64 cgid)
{
	struct agentcg_net_stats *s;

	count(AGENTCG_CTR_NET_DENIED);
	s = stats_of(cgid);
	if (s)
		__sync_fetch_and_add(&s->denied, 1);
	return 0;
}

static __always_inline bool loopback4(__u32 ip_be)
{
	return (bpf_ntohl(ip_be) >> 24) == 127;
}

static __always_inline bool loopback6(struct bpf_sock_addr *ctx)
{
	__u32 a = ctx->user_ip6[0], b = ctx->user_ip6[1], c = ctx->user_ip6[2], d = ctx->user_ip6[3];

	if (a || b)
		return false;
	if (!c && d == bpf_htonl(1))
		return true;                               /* ::1 */
	return c == bpf_htonl(0xffff) && loopback4(d);  /* ::ffff:127.x.y.z */
}

static __always_inline bool any6(struct bpf_sock_addr *ctx)
{
	return !ctx->user_ip6[0] && !ctx->user_ip6[1] && !ctx->user_ip6[2] && !ctx->user_ip6[3];
}

SEC("cgroup/sock_create")
int net_sock_create(struct bpf_sock *sk)
{
	__u64 cgid;

	if (sk->family != AF_INET && sk->family != AF_INET6)
		return 1;
	cgid = bpf_get_current_cgroup_id();
	if (mode_of(cgid) == AGENTCG_NET_NONE)
		return deny(cgid);
	return 1;
}

static __always_inline int addr4(struct bpf_sock_addr *ctx, bool is_bind)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	__u32 mode = mode_of(cgid);

	if (mode == AGENTCG_NET_FULL)
		return 1;
	if (mode == AGENTCG_NET_LOCAL &&
	    (loopback4(ctx->user_ip4) || (is_bind && ctx->user_ip4 == 0)))
		return 1;
	return deny(cgid);
}

static __always_inline int addr6(struct bpf_sock_addr *ctx, bool is_bind)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	__u32 mode = mode_of(cgid);

	if (mode == AGENTCG_NET_FULL)
		return 1;
	if (mode == AGENTCG_NET_LOCAL && (loopback6(ctx) || (is_bind && any6(ctx))))
		return 1;
	return deny(cgid);
}

SEC("cgroup/connect4")
int net_connect4(struct bpf_sock_addr *ctx) { return addr4(ctx, false); }

SEC("cgroup/connect6")
int net_connect6(struct bpf_sock_addr *ctx) { return addr6(ctx, false); }

SEC("cgroup/sendmsg4")
int net_sendmsg4(struct bpf_sock_addr *ctx) { return addr4(ctx, false); }

SEC("cgroup/sendmsg6")
int net_sendmsg6(struct bpf_sock_addr *ctx) { return addr6(ctx, false); }

SEC("cgroup/bind4")
int net_bind4(struct bpf_sock_addr *ctx) { return addr4(ctx, true); }

SEC("cgroup/bind6")
int net_bind6(struct bpf_sock_addr *ctx) { return addr6(ctx, true); }

static __always_inline int account(struct __sk_buff *skb, bool egress)
{
	__u64 cgid = bpf_skb_cgroup_id(skb);
	struct agentcg_net_stats *s;
	__u32 mode;

	if (!cgid)
		return 1;
	mode = mode_of(cgid);
	if (mode != AGENTCG_NET_FULL && skb->ifindex != LOOPBACK_IFINDEX && skb->ifindex != 0)
		return deny(cgid);
	s = stats_of(cgid);
	if (!s)
		return 1;
	if (egress) {
		__sync_fetch_and_add(&s->tx_bytes, skb->len);
		__sync_fetch_and_add(&s->tx_packets, 1);
	} else {
		__sync_fetch_and_add(&s->rx_bytes, skb->len);
		__sync_fetch_and_add(&s->rx_packets, 1);
	}
	return 1;
}

SEC("cgroup_skb/egress")
int net_egress(struct __sk_buff *skb) { return account(skb, true); }

SEC("cgroup_skb/ingress")
int net_ingress(struct __sk_buff *skb) { return account(skb, false); }
