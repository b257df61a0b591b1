// SPDX-License-Identifier: MIT OR GPL-2.0
/*
 * ktproxy's kernel side: every redirect decision lives in this file.
 *
 * Life of one intercepted connection (client C dials D, ktproxy listens on P):
 *
 *   1. connect4/connect6 (cgroup of C): decide whether to intercept; if so
 *      remember D in C's socket storage (client_dst) and rewrite the
 *      destination to P.
 *   2. sockops_client, ACTIVE_ESTABLISHED (cgroup of C): C got the SYN-ACK.
 *      Publish D in `flows` under the exact 4-tuple C<->P. This runs before C
 *      sends the final ACK, so before ktproxy can accept the connection.
 *   3. getsockopt (ktproxy's own cgroup): SO_ORIGINAL_DST on the accepted
 *      socket A. The first call claims D from `flows` by A's 4-tuple into A's
 *      socket storage (accepted_dst) and deletes the `flows` entry; every call
 *      answers from that storage.
 *   4. getpeername4/6 (cgroup of C): C asks who its peer is; answer D, not P.
 *
 * Socket storage is freed by the kernel with its socket, so nothing can leak
 * or answer for another connection. `flows` holds an entry only between
 * steps 2 and 3, while the connection waits in the accept queue; it is an LRU
 * map so that connections ktproxy never accepts cannot fill it.
 *
 * Byte order: addresses are kept in network byte order everywhere (they are
 * copied, never compared numerically); ports are host byte order in keys and
 * config, network byte order in `struct orig_dst` (it is copied into a
 * sockaddr as is).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* glibc's <sys/socket.h> does not build for -target bpf. */
#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80      /* <linux/netfilter_ipv4.h> */
#define IP6T_SO_ORIGINAL_DST 80 /* <linux/netfilter_ipv6/ip6_tables.h> */

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* A load clang may neither merge nor move (see its uses). */
#define READ(field) (*(volatile typeof(field) *)&(field))
#define READ_IP6(to, from)                 \
	do {                               \
		(to)[0] = READ((from)[0]); \
		(to)[1] = READ((from)[1]); \
		(to)[2] = READ((from)[2]); \
		(to)[3] = READ((from)[3]); \
	} while (0)

/* ---- configuration, written by src/bpf.rs before load() ---------------- */

/* cgroup v2 id of ktproxy's own cgroup: its dials are never intercepted.
 * A PID check would fail inside PID namespaces; the cgroup id cannot. */
const volatile __u64 proxy_cgroup_id = 0;
/* Sockets of other network namespaces are never intercepted: their
 * 127.0.0.1 is not ours, a redirect would black-hole them. */
const volatile __u64 proxy_netns_cookie = 0;
/* Listener per family; port 0 = no listener, that family is not intercepted. */
const volatile __u32 listen_ip4 = 0;
const volatile __u16 listen_port4 = 0;
const volatile __u32 listen_ip6[4] = {};
const volatile __u16 listen_port6 = 0;
/* -p: one bit per destination port. */
const volatile __u8 port_filter = 0;
const volatile __u64 port_bits[1024] = {};
/* -d: when set, only destinations found in dest4/dest6 are intercepted.
 * -x: destinations found in excl4/excl6 are never intercepted. */
const volatile __u8 dest_filter = 0;
const volatile __u8 have_excl4 = 0;
const volatile __u8 have_excl6 = 0;

/* ---- maps ---------------------------------------------------------------- */

struct orig_dst {
	__u32 ip[4]; /* network order; IPv4 in ip[0] */
	__u16 port;  /* network order */
	__u16 family;
};

/* One redirected connection C<->P as the kernel sees it. */
struct flow_key {
	__u32 client_ip[4];
	__u32 proxy_ip[4];
	__u16 client_port; /* host order */
	__u16 proxy_port;  /* host order */
	__u32 family;
};

struct lpm4_key {
	__u32 prefixlen;
	__u32 addr;
};

struct lpm6_key {
	__u32 prefixlen;
	__u32 addr[4];
};

/* Original destination of each intercepted client socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct orig_dst);
} client_dst SEC(".maps");

/* Original destination of each socket ktproxy accepted. A separate map from
 * client_dst so that getpeername on ktproxy's own sockets is never rewritten,
 * even when ktproxy runs inside the intercepted cgroup. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct orig_dst);
} accepted_dst SEC(".maps");

/* Entries wait at most in the listeners' accept queues (4096 each); LRU maps
 * are preallocated, so do not make this much larger. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct flow_key);
	__type(value, struct orig_dst);
} flows SEC(".maps");

/* max_entries of the tries are set from the rule count before load. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, struct lpm4_key);
	__type(value, __u8);
} dest4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, struct lpm6_key);
	__type(value, __u8);
} dest6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, struct lpm4_key);
	__type(value, __u8);
} excl4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, struct lpm6_key);
	__type(value, __u8);
} excl6 SEC(".maps");

/* Counters for `bpftool map dump name stats` and for ktproxy's exit line
 * `kernel counters: redirected=N ...`: the index is the enum below, and the
 * name src/bpf.rs logs is the enumerator's, lower case, without STAT_. */
enum stat {
	STAT_REDIRECTED,            /* connect rewritten to the proxy */
	STAT_SKIPPED_PROXY_OWN,     /* ktproxy's own dial */
	STAT_SKIPPED_OTHER_NETNS,   /* socket in another network namespace */
	STAT_SKIPPED_BY_RULE,       /* -p / -d / -x said no */
	STAT_SKIPPED_TO_PROXY,      /* destination is the proxy itself */
	STAT_NO_SOCKET_STORAGE,     /* socket storage allocation failed: went direct */
	STAT_FLOWS_PUBLISHED,       /* step 2 */
	STAT_FLOWS_CLAIMED,         /* step 3, first call */
	STAT_ORIGINAL_DST_ANSWERED, /* step 3 */
	STAT_RELAY_DROPPED,         /* sockmap relay: data for a pair already gone */
	STAT_MAX,
};

/* Never read: it brings `enum stat` into BTF, hence into the skeleton, where
 * src/bpf.rs sizes its table of counter names by STAT_MAX. clang emits a type
 * only when something declared uses it, and the enum cannot be the key type of
 * `stats`: the kernel wants an array map's BTF key to be a 32-bit integer. */
const enum stat stat_max = STAT_MAX;

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);

	if (v)
		*v += 1;
}

/* ---- the redirect decision ---------------------------------------------- */

static __always_inline int port_wanted(__u16 port)
{
	if (!port_filter)
		return 1;
	/* The mask keeps the index provably inside the array for the verifier. */
	return (port_bits[(port >> 6) & 1023] >> (port & 63)) & 1;
}

static __always_inline int dest4_wanted(__u32 ip)
{
	struct lpm4_key key = { .prefixlen = 32, .addr = ip };

	if (have_excl4 && bpf_map_lookup_elem(&excl4, &key))
		return 0;
	if (dest_filter && !bpf_map_lookup_elem(&dest4, &key))
		return 0;
	return 1;
}

static __always_inline int dest6_wanted(const __u32 ip[4])
{
	struct lpm6_key key = { .prefixlen = 128 };

	key.addr[0] = ip[0];
	key.addr[1] = ip[1];
	key.addr[2] = ip[2];
	key.addr[3] = ip[3];
	if (have_excl6 && bpf_map_lookup_elem(&excl6, &key))
		return 0;
	if (dest_filter && !bpf_map_lookup_elem(&dest6, &key))
		return 0;
	return 1;
}

/* Checks shared by both families, cheapest first. */
static __always_inline int socket_wanted(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 0;
	if (bpf_get_current_cgroup_id() == proxy_cgroup_id) {
		count(STAT_SKIPPED_PROXY_OWN);
		return 0;
	}
	if (bpf_get_netns_cookie(ctx) != proxy_netns_cookie) {
		count(STAT_SKIPPED_OTHER_NETNS);
		return 0;
	}
	return 1;
}

/* Remember the destination; 0 if the socket could not get storage, in which
 * case the connect goes direct rather than to a proxy that cannot serve it. */
static __always_inline int remember(struct bpf_sock_addr *ctx, const struct orig_dst *dst)
{
	struct orig_dst *st;

	st = bpf_sk_storage_get(&client_dst, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		count(STAT_NO_SOCKET_STORAGE);
		return 0;
	}
	*st = *dst;
	count(STAT_REDIRECTED);
	return 1;
}

/* Connecting to 0.0.0.0 reaches this host's loopback, and the kernel then
 * reports the peer as 127.0.0.1: rules, the recorded destination and
 * getpeername must see that address too, as they would without ktproxy. */
static __always_inline __u32 unspecified_to_loopback4(__u32 ip)
{
	return ip ? ip : bpf_htonl(0x7f000001);
}

static __always_inline int is_v4_mapped(const __u32 ip[4])
{
	return ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0xffff);
}

SEC("cgroup/connect4")
int ktproxy_connect4(struct bpf_sock_addr *ctx)
{
	struct orig_dst dst = {};
	__u16 port;

	if (!listen_port4 || !socket_wanted(ctx))
		return 1;
	/* user_port holds the network-order port in its low 16 bits. */
	port = bpf_ntohs((__u16)ctx->user_port);
	dst.ip[0] = unspecified_to_loopback4(ctx->user_ip4);
	if (dst.ip[0] == listen_ip4 && port == listen_port4) {
		count(STAT_SKIPPED_TO_PROXY);
		return 1;
	}
	if (!port_wanted(port) || !dest4_wanted(dst.ip[0])) {
		count(STAT_SKIPPED_BY_RULE);
		return 1;
	}
	dst.port = bpf_htons(port);
	dst.family = AF_INET;
	if (!remember(ctx, &dst))
		return 1;
	ctx->user_ip4 = listen_ip4;
	/* The verifier accepts only 32-bit stores to user_port. */
	ctx->user_port = (__u32)bpf_htons(listen_port4);
	return 1;
}

SEC("cgroup/connect6")
int ktproxy_connect6(struct bpf_sock_addr *ctx)
{
	struct orig_dst dst = {};
	__u16 port;

	if (!socket_wanted(ctx))
		return 1;
	port = bpf_ntohs((__u16)ctx->user_port);
	dst.ip[0] = ctx->user_ip6[0];
	dst.ip[1] = ctx->user_ip6[1];
	dst.ip[2] = ctx->user_ip6[2];
	dst.ip[3] = ctx->user_ip6[3];

	if (is_v4_mapped(dst.ip)) {
		/* ::ffff:a.b.c.d on an AF_INET6 socket is an IPv4 connection that
		 * connect4 never sees; send it to the IPv4 listener, mapped. */
		__u32 ip4 = unspecified_to_loopback4(dst.ip[3]);

		if (!listen_port4)
			return 1;
		if (ip4 == listen_ip4 && port == listen_port4) {
			count(STAT_SKIPPED_TO_PROXY);
			return 1;
		}
		if (!port_wanted(port) || !dest4_wanted(ip4)) {
			count(STAT_SKIPPED_BY_RULE);
			return 1;
		}
		dst.ip[0] = ip4;
		dst.ip[1] = dst.ip[2] = dst.ip[3] = 0;
		dst.port = bpf_htons(port);
		dst.family = AF_INET;
		if (!remember(ctx, &dst))
			return 1;
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = listen_ip4;
		ctx->user_port = (__u32)bpf_htons(listen_port4);
		return 1;
	}

	if (!listen_port6)
		return 1;
	/* :: means this host, as 0.0.0.0 does for IPv4. */
	if (!(dst.ip[0] | dst.ip[1] | dst.ip[2] | dst.ip[3]))
		dst.ip[3] = bpf_htonl(1);
	/* Link-local destinations need the scope id (interface), which
	 * bpf_sock_addr does not carry: the proxy could not dial them. */
	if ((dst.ip[0] & bpf_htonl(0xffc00000)) == bpf_htonl(0xfe800000)) {
		count(STAT_SKIPPED_BY_RULE);
		return 1;
	}
	if (port == listen_port6 && dst.ip[0] == listen_ip6[0] && dst.ip[1] == listen_ip6[1] &&
	    dst.ip[2] == listen_ip6[2] && dst.ip[3] == listen_ip6[3]) {
		count(STAT_SKIPPED_TO_PROXY);
		return 1;
	}
	if (!port_wanted(port) || !dest6_wanted(dst.ip)) {
		count(STAT_SKIPPED_BY_RULE);
		return 1;
	}
	dst.port = bpf_htons(port);
	dst.family = AF_INET6;
	if (!remember(ctx, &dst))
		return 1;
	ctx->user_ip6[0] = listen_ip6[0];
	ctx->user_ip6[1] = listen_ip6[1];
	ctx->user_ip6[2] = listen_ip6[2];
	ctx->user_ip6[3] = listen_ip6[3];
	ctx->user_port = (__u32)bpf_htons(listen_port6);
	return 1;
}

/* ---- handing the destination from the client socket to the accepted one --- */

/* An AF_INET6 socket that connected to a v4-mapped address talks IPv4: key it
 * as IPv4 so that it matches the AF_INET socket the v4 listener accepted. */
static __always_inline void fill_key(struct flow_key *key, __u32 family, const __u32 cip[4],
				     __u16 cport, const __u32 pip[4], __u16 pport)
{
	key->family = family;
	key->client_port = cport;
	key->proxy_port = pport;
	if (family == AF_INET6 && is_v4_mapped(cip)) {
		key->family = AF_INET;
		key->client_ip[0] = cip[3];
		key->proxy_ip[0] = pip[3];
		return;
	}
	key->client_ip[0] = cip[0];
	key->proxy_ip[0] = pip[0];
	if (family == AF_INET6) {
		key->client_ip[1] = cip[1];
		key->client_ip[2] = cip[2];
		key->client_ip[3] = cip[3];
		key->proxy_ip[1] = pip[1];
		key->proxy_ip[2] = pip[2];
		key->proxy_ip[3] = pip[3];
	}
}

/* Attached to the intercepted cgroup: the client's side of the handshake. */
SEC("sockops")
int ktproxy_sockops_client(struct bpf_sock_ops *skops)
{
	__u32 local[4] = {}, remote[4] = {};
	struct flow_key key = {};
	struct orig_dst *dst;
	struct bpf_sock *sk;

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	sk = skops->sk;
	if (!sk)
		return 1;
	dst = bpf_sk_storage_get(&client_dst, sk, 0, 0);
	if (!dst)
		return 1;
	/* Context fields are read with constant offsets only (READ): clang would
	 * otherwise pick the field per family with pointer arithmetic on ctx,
	 * which the verifier rejects ("dereference of modified ctx ptr"). */
	if (skops->family == AF_INET6) {
		READ_IP6(local, skops->local_ip6);
		READ_IP6(remote, skops->remote_ip6);
	} else {
		local[0] = READ(skops->local_ip4);
		remote[0] = READ(skops->remote_ip4);
	}
	/* local_port is host order; remote_port holds the network-order port
	 * in its upper 16 bits. */
	fill_key(&key, skops->family, local, (__u16)skops->local_port, remote,
		 (__u16)bpf_ntohl(skops->remote_port));
	if (bpf_map_update_elem(&flows, &key, dst, BPF_ANY) == 0)
		count(STAT_FLOWS_PUBLISHED);
	return 1;
}

/* The original destination of a socket ktproxy accepted: from its storage,
 * or claimed from `flows` by its 4-tuple on first use. */
static __always_inline struct orig_dst *accepted_orig_dst(struct bpf_sock *sk)
{
	__u32 local[4] = {}, remote[4] = {};
	struct flow_key key = {};
	struct orig_dst *dst, *pending;

	dst = bpf_sk_storage_get(&accepted_dst, sk, 0, 0);
	if (dst)
		return dst;
	if (sk->family == AF_INET6) {
		READ_IP6(local, sk->src_ip6);
		READ_IP6(remote, sk->dst_ip6);
	} else {
		local[0] = READ(sk->src_ip4);
		remote[0] = READ(sk->dst_ip4);
	}
	/* src_port is host order, dst_port network order. */
	fill_key(&key, sk->family, remote, bpf_ntohs(sk->dst_port), local, (__u16)sk->src_port);
	pending = bpf_map_lookup_elem(&flows, &key);
	if (!pending)
		return 0;
	dst = bpf_sk_storage_get(&accepted_dst, sk, pending, BPF_SK_STORAGE_GET_F_CREATE);
	bpf_map_delete_elem(&flows, &key);
	if (dst)
		count(STAT_FLOWS_CLAIMED);
	return dst;
}

/* ---- answering the proxy and the client ----------------------------------- */

/* Attached to ktproxy's own cgroup. Every other getsockopt passes through
 * untouched: return 1 without writing optlen (a write would turn an
 * optlen > PAGE_SIZE call into EFAULT). Return values other than 0/1 are
 * rejected by the verifier. */
SEC("cgroup/getsockopt")
int ktproxy_getsockopt(struct bpf_sockopt *ctx)
{
	struct orig_dst *dst;
	struct bpf_sock *sk;
	void *optval, *optval_end;
	__u16 family;

	if (ctx->level == SOL_IP && ctx->optname == SO_ORIGINAL_DST)
		family = AF_INET;
	else if (ctx->level == SOL_IPV6 && ctx->optname == IP6T_SO_ORIGINAL_DST)
		family = AF_INET6;
	else
		return 1;
	sk = ctx->sk;
	if (!sk)
		return 1;
	dst = accepted_orig_dst(sk);
	if (!dst || dst->family != family)
		return 1;

	optval = ctx->optval;
	optval_end = ctx->optval_end;
	if (family == AF_INET) {
		struct {
			__u16 family;
			__u16 port;
			__u32 addr;
			__u8 zero[8];
		} *sin = optval;

		if ((void *)(sin + 1) > optval_end)
			return 1;
		sin->family = AF_INET;
		sin->port = dst->port;
		sin->addr = dst->ip[0];
		__builtin_memset(sin->zero, 0, sizeof(sin->zero));
		ctx->optlen = sizeof(*sin);
	} else {
		struct {
			__u16 family;
			__u16 port;
			__u32 flowinfo;
			__u32 addr[4];
			__u32 scope_id;
		} *sin6 = optval;

		if ((void *)(sin6 + 1) > optval_end)
			return 1;
		sin6->family = AF_INET6;
		sin6->port = dst->port;
		sin6->flowinfo = 0;
		sin6->addr[0] = dst->ip[0];
		sin6->addr[1] = dst->ip[1];
		sin6->addr[2] = dst->ip[2];
		sin6->addr[3] = dst->ip[3];
		sin6->scope_id = 0;
		ctx->optlen = sizeof(*sin6);
	}
	/* optlen and retval are adjacent: without this barrier clang merges the
	 * two stores into one 8-byte store, which the verifier rejects. */
	asm volatile("" ::: "memory");
	ctx->retval = 0;
	count(STAT_ORIGINAL_DST_ANSWERED);
	return 1;
}

/* Attached to the intercepted cgroup: the client sees the peer it dialed. */
SEC("cgroup/getpeername4")
int ktproxy_getpeername4(struct bpf_sock_addr *ctx)
{
	struct orig_dst *dst;

	dst = bpf_sk_storage_get(&client_dst, ctx->sk, 0, 0);
	if (!dst || dst->family != AF_INET)
		return 1;
	ctx->user_ip4 = dst->ip[0];
	ctx->user_port = (__u32)dst->port;
	return 1;
}

SEC("cgroup/getpeername6")
int ktproxy_getpeername6(struct bpf_sock_addr *ctx)
{
	struct orig_dst *dst;

	dst = bpf_sk_storage_get(&client_dst, ctx->sk, 0, 0);
	if (!dst)
		return 1;
	if (dst->family == AF_INET) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = dst->ip[0];
	} else {
		ctx->user_ip6[0] = dst->ip[0];
		ctx->user_ip6[1] = dst->ip[1];
		ctx->user_ip6[2] = dst->ip[2];
		ctx->user_ip6[3] = dst->ip[3];
	}
	ctx->user_port = (__u32)dst->port;
	return 1;
}

/* ---- the sockmap relay (--relay sockmap) ----------------------------------- */

/*
 * Once ktproxy has dialed (and finished any upstream handshake), it can hand
 * the pair client socket C <-> dialed socket D to the kernel: the stream
 * verdict program below then runs on every skb either socket receives and
 * sends it on to the other socket's egress, without waking ktproxy.
 *
 * Each socket is known by its cookie (SO_COOKIE in user space,
 * bpf_get_socket_cookie here). src/sockmap.rs, per pair:
 *   1. relay_ends[C] = { peer D }, relay_ends[D] = { peer C };
 *   2. C and D into relay_peers, the sockhash that redirects look up, with no
 *      program attached;
 *   3. C and D into relay_verdict, the sockhash this program is attached to.
 * Two sockhashes, so that when C's data first meets the verdict, D can
 * already be found: with one map, C's data arriving between the two inserts
 * would find no peer, and a verdict can only redirect, keep (for a recv() that
 * would then race with the redirected bytes) or drop it.
 *
 * Redirected skbs wait in the peer's psock backlog (a workqueue) until its
 * send buffer takes them. They stay charged to the receiving socket's
 * receive memory until sent, which is how ktproxy knows, after an EOF, that
 * everything before it has reached the other socket's send queue and the
 * half-close may follow (SO_MEMINFO, see src/sockmap.rs).
 */
struct relay_end {
	__u64 peer;  /* cookie of the other socket: its key in relay_peers */
	__u64 bytes; /* bytes this socket received and the verdict sent on */
};

/* max_entries of the three maps are set before load (src/bpf.rs). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, __u64);
	__type(value, struct relay_end);
} relay_ends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 1);
	__type(key, __u64);
	__type(value, __u64);
} relay_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 1);
	__type(key, __u64);
	__type(value, __u64);
} relay_verdict SEC(".maps");

SEC("sk_skb/stream_verdict")
int ktproxy_relay(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct relay_end *end;
	__u64 peer;
	long verdict;

	/* A FIN comes as an skb without data. TCP has already taken note of it
	 * and ktproxy forwards the half-close itself; the psock backlog would
	 * take an empty skb sent its way for a broken pipe. */
	if (skb->len == 0)
		return SK_DROP;
	end = bpf_map_lookup_elem(&relay_ends, &cookie);
	if (!end) {
		/* The pair is being torn down after a reset: nobody to send to. */
		count(STAT_RELAY_DROPPED);
		return SK_DROP;
	}
	peer = end->peer;
	verdict = bpf_sk_redirect_hash(skb, &relay_peers, &peer, 0);
	if (verdict == SK_PASS)
		__sync_fetch_and_add(&end->bytes, skb->len);
	else
		count(STAT_RELAY_DROPPED); /* the peer is closed or was reset */
	return verdict;
}
