// SPDX-License-Identifier: MIT OR GPL-2.0
/*
 * ktproxy's kernel side: every redirect decision lives in this file.
 *
 * Life of one intercepted connection (client C dials D, ktproxy listens on P):
 *
 *   1. connect4/connect6 (cgroup of C): decide whether to intercept; if so
 *      remember D, and the uid and gid of the process calling connect(), in
 *      C's socket storage (client_dst) and rewrite the destination to P.
 *   2. sockops_client, ACTIVE_ESTABLISHED (cgroup of C): C got the SYN-ACK.
 *      Publish D in `flows` under the exact 4-tuple C<->P. This runs before C
 *      sends the final ACK, so before ktproxy can accept the connection.
 *   3. getsockopt (ktproxy's own cgroup): KTPROXY_ORIGIN (or SO_ORIGINAL_DST,
 *      answered as netfilter would) on the accepted socket A. The first call
 *      claims D from `flows` by A's 4-tuple into A's socket storage
 *      (accepted_dst) and deletes the `flows` entry; every call answers from
 *      that storage.
 *   4. getpeername4/6 (cgroup of C): C asks who its peer is; answer D, not P.
 *
 * Socket storage is freed by the kernel with its socket, so nothing can leak
 * or answer for another connection. Nor can a `flows` entry go to the wrong
 * accepted socket: two sockets in the accept queue with the same 4-tuple
 * means the first was reset there (a live one would still own the tuple),
 * and a reset socket reads src_port 0 (tcp_set_state(TCP_CLOSE) ->
 * inet_put_port() zeroes inet_num), so its key matches nothing
 * (tests/failsafe_sockets.rs proves it). `flows` holds an entry only between
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
#include <bpf/bpf_core_read.h>

/* glibc's <sys/socket.h> does not build for -target bpf. */
#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80      /* <linux/netfilter_ipv4.h> */
#define IP6T_SO_ORIGINAL_DST 80 /* <linux/netfilter_ipv6/ip6_tables.h> */
/* ktproxy's own getsockopt: a level no protocol handles (the kernel answers
 * ENOPROTOOPT and the program below overrides it), so it cannot collide with
 * a real option. Mirrored in src/sys.rs. */
#define SOL_KTPROXY 0x6b74 /* "kt" */
#define KTPROXY_ORIGIN 1   /* struct ktproxy_origin */
#define ELOOP 40

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

/* ---- configuration, written by src/bpf/ before load() ------------------ */

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

/* Names (see "names" below). dns_on: UDP and TCP port 53 go to ktproxy's
 * DNS sockets at these addresses (network order; loopback) and UDP ports
 * (0 = that family has none). fake_mask4 != 0: destinations in fake_net4/fake_mask4 (network
 * order) are always redirected. unproxied: what happens to a connect or
 * datagram ktproxy cannot carry (UDP other than DNS, a family without a
 * listener, link-local IPv6) to a non-loopback destination: UNPROXIED_*. */
enum { UNPROXIED_PASS, UNPROXIED_REFUSE, UNPROXIED_PASS_COUNTED };
const volatile __u8 dns_on = 0;
const volatile __u32 dns_ip4 = 0;
const volatile __u16 dns_port4 = 0;
const volatile __u32 dns_ip6[4] = {};
const volatile __u16 dns_port6 = 0;
const volatile __u32 fake_net4 = 0;
const volatile __u32 fake_mask4 = 0;
const volatile __u8 unproxied = UNPROXIED_PASS;

/* ---- maps ---------------------------------------------------------------- */

struct orig_dst {
	__u32 ip[4]; /* network order; IPv4 in ip[0] */
	__u16 port;  /* network order */
	__u16 family;
	/* Who called connect(), so that ktproxy's outgoing socket can carry the
	 * same owner (firewall rules on skuid, per-uid routing). */
	__u32 uid;
	__u32 gid;
	/* Process (thread group, as the kernel numbers it) that connected. */
	__u32 client_tgid;
};

/* The answer to getsockopt(SOL_KTPROXY, KTPROXY_ORIGIN): the destination and
 * the client's identity in one call. Layout mirrored by src/sys.rs. */
struct ktproxy_origin {
	__u16 family;
	__u16 port;  /* network order */
	__u32 ip[4]; /* network order; IPv4 in ip[0] */
	__u32 uid;
	__u32 gid;
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
 * name src/bpf/stats.rs logs is the enumerator's, lower case, without STAT_. */
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
	STAT_BOUND_TO_DEVICE,       /* SO_BINDTODEVICE / VRF socket: cannot reach the listener */
	STAT_KERNEL_SOCKET,         /* the kernel's own socket (NFS, SMB, NVMe/TCP, ...) */
	STAT_MPTCP_SUBFLOW,         /* kernel socket of a user's MPTCP socket: redirected */
	STAT_STALE,                 /* ktproxy has not proven it can accept for 1 s */
	STAT_REFUSED,               /* fail closed: one of the above refused (EPERM), not direct */
	STAT_GUARD_REFUSED,         /* guard: a connect to proxy was not redirected (EPERM) */
	STAT_SKIPPED_UPSTREAM,      /* the local upstream proxy's own connect */
	STAT_LOOP,                  /* a connection came back from ktproxy itself (ELOOP) */
	STAT_DNS_CONNECT,           /* UDP connect to port 53 rewritten to the DNS socket */
	STAT_DNS_SENDMSG,           /* UDP datagram to port 53 rewritten to the DNS socket */
	STAT_DNS_REPLY_SOURCE,      /* DNS reply's source shown as the server asked */
	STAT_DNS_TCP,               /* TCP to port 53 redirected whatever the rules say */
	STAT_FAKE_REDIRECTED,       /* TCP to a fake address redirected whatever the rules say */
	STAT_REFUSED_UDP,           /* UDP refused (EPERM): command mode with -u */
	STAT_REFUSED_UNPROXYABLE,   /* connect ktproxy cannot carry refused (EPERM) */
	STAT_DIRECT_UDP,            /* UDP went direct under --allow-direct */
	STAT_DIRECT_UNPROXYABLE,    /* unproxyable connect went direct under --allow-direct */
	STAT_MAX,
};

/* Never read: it brings `enum stat` into BTF, hence into the skeleton, where
 * src/bpf/stats.rs sizes its table of counter names by STAT_MAX. clang emits a type
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

/* ---- fail safe: liveness, sockets the redirect cannot serve, loops -------- */

/* Command mode with an upstream: a connect that should be proxied but cannot
 * be is refused (EPERM) instead of going direct ("fail closed": nothing
 * leaks). Otherwise it goes direct ("fail open": the machine keeps working). */
const volatile __u8 fail_closed = 0;

/* ktproxy counts as alive while its heartbeat is at most this old. */
#define HEARTBEAT_MAX_AGE_NS 1000000000LL

/* CLOCK_MONOTONIC time, as bpf_ktime_get_ns() reads it, at which ktproxy
 * last proved that it can accept. src/bpf/heartbeat.rs maps this array into
 * ktproxy's memory (BPF_F_MMAPABLE) and the acceptors write it at least
 * every 250 ms: a stopped (SIGSTOP), hung or thread-starved ktproxy stops
 * writing, and within a second its connects stop being redirected. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} heartbeat SEC(".maps");

/* Processes whose connects are never redirected, by kernel tgid: ktproxy
 * itself (so that it cannot proxy itself when moved out of its cgroup) and
 * the processes that own a local upstream proxy's listening socket (so that
 * the upstream's own connections cannot loop back into ktproxy). */
#define EXEMPT_PROXY 1
#define EXEMPT_UPSTREAM 2

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u8);
} exempt_tgids SEC(".maps");

/* Only the fields read, located in the running kernel's BTF (CO-RE). */
struct sock___ktproxy {
	__u8 sk_kern_sock : 1;
} __attribute__((preserve_access_index));

struct tcp_sock___ktproxy {
	_Bool is_mptcp;
} __attribute__((preserve_access_index));

static __always_inline __u32 current_tgid(void)
{
	return bpf_get_current_pid_tgid() >> 32;
}

static __always_inline int proxy_alive(void)
{
	__u32 zero = 0;
	__u64 *beat = bpf_map_lookup_elem(&heartbeat, &zero);

	/* Signed: a beat written after bpf_ktime_get_ns() read the clock is
	 * "in the future", not 584 years old. */
	return beat && (__s64)(bpf_ktime_get_ns() - *beat) <= HEARTBEAT_MAX_AGE_NS;
}

/* What becomes of a connect that is not redirected after all. */
static __always_inline int direct_or_refused(void)
{
	if (fail_closed) {
		count(STAT_REFUSED);
		return 0;
	}
	return 1;
}

/* sock_create_kern() sockets (sk_kern_sock, set by sk_alloc() from its
 * `kern` argument): NFS and SMB mounts, NVMe/TCP, iSCSI offload... A kernel
 * client must never depend on a user-space proxy (it may be what that
 * proxy's memory is written back to). MPTCP's subflows are kernel sockets
 * too, but each carries a user's MPTCP socket (tcp_sock.is_mptcp): those are
 * the user's connection and stay intercepted (it falls back to plain TCP). */
static __always_inline int kernel_socket(struct bpf_sock *sk)
{
	struct tcp_sock___ktproxy *tp = (void *)bpf_skc_to_tcp_sock(sk);
	struct sock___ktproxy *s = (void *)tp;

	if (!tp || !BPF_CORE_READ_BITFIELD(s, sk_kern_sock))
		return 0;
	if (bpf_core_field_exists(tp->is_mptcp) && tp->is_mptcp) {
		count(STAT_MPTCP_SUBFLOW);
		return 0;
	}
	return 1;
}

/* Called once every rule wants the connect redirected: -1 to redirect it,
 * otherwise the program's return value (1 direct, 0 refused with EPERM). */
static __always_inline int cannot_redirect(struct bpf_sock_addr *ctx)
{
	__u32 tgid = current_tgid();
	__u8 *exempt = bpf_map_lookup_elem(&exempt_tgids, &tgid);

	if (exempt) {
		if (*exempt == EXEMPT_PROXY) {
			count(STAT_SKIPPED_PROXY_OWN);
			return 1;
		}
		count(STAT_SKIPPED_UPSTREAM);
		return direct_or_refused();
	}
	/* A device-bound socket (SO_BINDTODEVICE, a VRF) cannot reach the
	 * loopback listener: redirected, its SYN would go nowhere. */
	if (ctx->sk->bound_dev_if) {
		count(STAT_BOUND_TO_DEVICE);
		return direct_or_refused();
	}
	if (kernel_socket(ctx->sk)) {
		count(STAT_KERNEL_SOCKET);
		return direct_or_refused();
	}
	if (!proxy_alive()) {
		count(STAT_STALE);
		return direct_or_refused();
	}
	return -1;
}

/* A socket may connect again after a failed connect (or a connect to
 * AF_UNSPEC): what an earlier connect remembered must not answer for it. */
static __always_inline void forget_destination(struct bpf_sock_addr *ctx)
{
	if (bpf_sk_storage_get(&client_dst, ctx->sk, 0, 0))
		bpf_sk_storage_delete(&client_dst, ctx->sk);
}

/* A connection that ktproxy itself made and that came back to it: ktproxy
 * was moved out of its cgroup, where exempt_tgids could not name it (another
 * PID namespace). Answering would make it dial itself forever. */
static __always_inline int came_from_proxy(const struct orig_dst *dst)
{
	if (dst->client_tgid != current_tgid())
		return 0;
	count(STAT_LOOP);
	return 1;
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

/* Not ktproxy's own cgroup, and ktproxy's network namespace: checks shared
 * by every socket type and both families. */
static __always_inline int caller_wanted(struct bpf_sock_addr *ctx)
{
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

/* A TCP socket of an intercepted caller, cheapest check first. */
static __always_inline int socket_wanted(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 0;
	return caller_wanted(ctx);
}

/* Remember the destination; 0 if the socket could not get storage, in which
 * case the connect goes direct rather than to a proxy that cannot serve it. */
static __always_inline int remember(struct bpf_sock_addr *ctx, const struct orig_dst *dst)
{
	/* The caller's real uid and gid: connect() runs in its process context. */
	__u64 ugid = bpf_get_current_uid_gid();
	struct orig_dst *st;

	st = bpf_sk_storage_get(&client_dst, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		count(STAT_NO_SOCKET_STORAGE);
		return 0;
	}
	*st = *dst;
	st->uid = (__u32)ugid;
	st->gid = ugid >> 32;
	st->client_tgid = current_tgid();
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

/* ---- names: DNS to ktproxy, fake addresses, what cannot be proxied ------ */

/* With names on (dns_on), every DNS query of the cgroup reaches ktproxy's
 * DNS sockets, whatever server it was sent to, and the client never notices:
 *
 *   connect4/6, UDP to :53     rewrite to the DNS socket; the server asked
 *                              goes to client_dst, so getpeername shows it
 *   sendmsg4/6, UDP to :53     same for unconnected sockets (sendto); the
 *                              last server asked wins
 *   recvmsg4/6, from the       the reply's source is shown as client_dst:
 *     DNS socket               resolvers drop replies from other sources
 *   connect4/6, TCP to :53     redirected like any TCP connect, whatever
 *                              the rules; ktproxy answers it (DNS over TCP)
 *   connect4/6, TCP to a       redirected whatever the rules: the address
 *     fake address             routes nowhere, ktproxy knows its name
 *
 * ktproxy's own sockets and other network namespaces are never touched. */

static __always_inline int is_loopback4(__u32 ip)
{
	return (ip & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000);
}

/* :: counts as loopback: connecting to it reaches this host's ::1. */
/* The destination address of an IPv6 sock_addr context, word by word: the
 * verifier allows only 4-byte loads at constant offsets of user_ip6. */
static __always_inline void load_user_ip6(__u32 ip[4], const struct bpf_sock_addr *ctx)
{
	ip[0] = ctx->user_ip6[0];
	ip[1] = ctx->user_ip6[1];
	ip[2] = ctx->user_ip6[2];
	ip[3] = ctx->user_ip6[3];
}

static __always_inline int is_loopback6(const __u32 ip[4])
{
	if (is_v4_mapped(ip))
		return is_loopback4(unspecified_to_loopback4(ip[3]));
	return !ip[0] && !ip[1] && !ip[2] && (!ip[3] || ip[3] == bpf_htonl(1));
}

static __always_inline int is_fake4(__u32 ip)
{
	return fake_mask4 && (ip & fake_mask4) == fake_net4;
}

/* TCP destinations redirected whatever -p/-d/-x say. */
static __always_inline int always_redirected4(__u32 ip, __u16 port)
{
	if (is_fake4(ip)) {
		count(STAT_FAKE_REDIRECTED);
		return 1;
	}
	if (dns_on && port == 53) {
		count(STAT_DNS_TCP);
		return 1;
	}
	return 0;
}

static __always_inline int always_redirected6(__u16 port)
{
	if (dns_on && port == 53) {
		count(STAT_DNS_TCP);
		return 1;
	}
	return 0;
}

/* The verdict (1 = go on, 0 = EPERM) for a connect or datagram ktproxy cannot
 * carry: command mode with -u refuses it rather than let it leave unproxied,
 * unless it stays on this host's loopback. */
static __always_inline int unproxied_verdict(int loopback, __u32 refused, __u32 direct)
{
	if (loopback || unproxied == UNPROXIED_PASS)
		return 1;
	if (unproxied == UNPROXIED_REFUSE) {
		count(refused);
		return 0;
	}
	count(direct);
	return 1;
}

/* A datagram ktproxy does not carry. With names off (--no-proxy-dns), DNS
 * was asked to go direct: it does, counted. */
static __always_inline int datagram_verdict(struct bpf_sock_addr *ctx, __u16 port, int loopback)
{
	if (!dns_on && port == 53 && ctx->protocol == IPPROTO_UDP &&
	    unproxied != UNPROXIED_PASS) {
		if (!loopback)
			count(STAT_DIRECT_UDP);
		return 1;
	}
	return unproxied_verdict(loopback, STAT_REFUSED_UDP, STAT_DIRECT_UDP);
}

/* A TCP connect to an IPv4 destination with no IPv4 listener. A fake address
 * is refused in any mode: it routes nowhere, failing fast is kinder. */
static __always_inline int unproxyable4(__u32 ip)
{
	if (is_fake4(ip)) {
		count(STAT_REFUSED_UNPROXYABLE);
		return 0;
	}
	return unproxied_verdict(is_loopback4(ip), STAT_REFUSED_UNPROXYABLE,
				 STAT_DIRECT_UNPROXYABLE);
}

static __always_inline int is_dns_query(struct bpf_sock_addr *ctx, __u16 port)
{
	return dns_on && port == 53 && ctx->protocol == IPPROTO_UDP;
}

/* The server a DNS socket asked, for getpeername and recvmsg. Without
 * storage the query still goes to ktproxy (never direct: that would leak);
 * only the reply's source shows ktproxy's address. */
static __always_inline void remember_server(struct bpf_sock_addr *ctx, const struct orig_dst *dst)
{
	struct orig_dst *st;

	st = bpf_sk_storage_get(&client_dst, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		count(STAT_NO_SOCKET_STORAGE);
		return;
	}
	*st = *dst;
}

/* A UDP socket that connects elsewhere after a DNS server must no longer
 * show that server (family 0: nothing recorded). */
static __always_inline void forget_server(struct bpf_sock_addr *ctx)
{
	struct orig_dst *st = bpf_sk_storage_get(&client_dst, ctx->sk, 0, 0);

	if (st)
		st->family = 0;
}

/* A DNS query to ip:53 (connect or sendmsg, IPv4 socket) goes to the DNS
 * socket of the IPv4 listener. */
static __always_inline int dns_to_ktproxy4(struct bpf_sock_addr *ctx, __u32 ip, __u32 stat)
{
	struct orig_dst dst = {};
	int verdict;

	if (!dns_port4)
		return unproxied_verdict(is_loopback4(ip), STAT_REFUSED_UDP, STAT_DIRECT_UDP);
	/* A stopped ktproxy, a device-bound socket: as for TCP (issue 10). */
	verdict = cannot_redirect(ctx);
	if (verdict >= 0)
		return verdict;
	dst.ip[0] = ip;
	dst.port = bpf_htons(53);
	dst.family = AF_INET;
	remember_server(ctx, &dst);
	ctx->user_ip4 = dns_ip4;
	ctx->user_port = (__u32)bpf_htons(dns_port4);
	count(stat);
	return 1;
}

/* The same for an IPv6 socket: ::ffff:a.b.c.d goes to the IPv4 DNS socket,
 * mapped, anything else to the IPv6 one. */
static __always_inline int dns_to_ktproxy6(struct bpf_sock_addr *ctx, const __u32 ip[4],
					   __u32 stat)
{
	struct orig_dst dst = {};
	int verdict;

	dst.port = bpf_htons(53);
	if (is_v4_mapped(ip) ? !dns_port4 : !dns_port6)
		return unproxied_verdict(is_loopback6(ip), STAT_REFUSED_UDP, STAT_DIRECT_UDP);
	verdict = cannot_redirect(ctx);
	if (verdict >= 0)
		return verdict;
	if (is_v4_mapped(ip)) {
		if (!dns_port4)
			return unproxied_verdict(is_loopback6(ip), STAT_REFUSED_UDP,
						 STAT_DIRECT_UDP);
		dst.ip[0] = unspecified_to_loopback4(ip[3]);
		dst.family = AF_INET;
		remember_server(ctx, &dst);
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = dns_ip4;
		ctx->user_port = (__u32)bpf_htons(dns_port4);
		count(stat);
		return 1;
	}
	if (!dns_port6)
		return unproxied_verdict(is_loopback6(ip), STAT_REFUSED_UDP, STAT_DIRECT_UDP);
	dst.ip[0] = ip[0];
	dst.ip[1] = ip[1];
	dst.ip[2] = ip[2];
	dst.ip[3] = ip[3];
	if (!(ip[0] | ip[1] | ip[2] | ip[3]))
		dst.ip[3] = bpf_htonl(1);
	dst.family = AF_INET6;
	remember_server(ctx, &dst);
	ctx->user_ip6[0] = dns_ip6[0];
	ctx->user_ip6[1] = dns_ip6[1];
	ctx->user_ip6[2] = dns_ip6[2];
	ctx->user_ip6[3] = dns_ip6[3];
	ctx->user_port = (__u32)bpf_htons(dns_port6);
	count(stat);
	return 1;
}

/* connect4 of a socket that is not TCP: UDP DNS goes to ktproxy; other
 * datagrams, and other stream protocols (MPTCP, SCTP), cannot be proxied. */
static __always_inline int not_tcp_connect4(struct bpf_sock_addr *ctx)
{
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	__u32 ip = unspecified_to_loopback4(ctx->user_ip4);

	if (!caller_wanted(ctx))
		return 1;
	if (ctx->type != SOCK_STREAM)
		forget_server(ctx);
	if (is_dns_query(ctx, port))
		return dns_to_ktproxy4(ctx, ip, STAT_DNS_CONNECT);
	if (ctx->type == SOCK_STREAM)
		return unproxied_verdict(is_loopback4(ip), STAT_REFUSED_UNPROXYABLE,
					 STAT_DIRECT_UNPROXYABLE);
	return datagram_verdict(ctx, port, is_loopback4(ip));
}

static __always_inline int not_tcp_connect6(struct bpf_sock_addr *ctx)
{
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	__u32 ip[4];

	if (!caller_wanted(ctx))
		return 1;
	load_user_ip6(ip, ctx);
	if (ctx->type != SOCK_STREAM)
		forget_server(ctx);
	if (is_dns_query(ctx, port))
		return dns_to_ktproxy6(ctx, ip, STAT_DNS_CONNECT);
	if (ctx->type == SOCK_STREAM)
		return unproxied_verdict(is_loopback6(ip), STAT_REFUSED_UNPROXYABLE,
					 STAT_DIRECT_UNPROXYABLE);
	return datagram_verdict(ctx, port, is_loopback6(ip));
}

/* Unconnected UDP (sendto, sendmsg with an address). Runs for UDP and
 * UDP-Lite only. */
SEC("cgroup/sendmsg4")
int ktproxy_sendmsg4(struct bpf_sock_addr *ctx)
{
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	__u32 ip = unspecified_to_loopback4(ctx->user_ip4);

	if (!caller_wanted(ctx))
		return 1;
	if (is_dns_query(ctx, port))
		return dns_to_ktproxy4(ctx, ip, STAT_DNS_SENDMSG);
	return datagram_verdict(ctx, port, is_loopback4(ip));
}

SEC("cgroup/sendmsg6")
int ktproxy_sendmsg6(struct bpf_sock_addr *ctx)
{
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	__u32 ip[4];

	if (!caller_wanted(ctx))
		return 1;
	load_user_ip6(ip, ctx);
	if (is_dns_query(ctx, port))
		return dns_to_ktproxy6(ctx, ip, STAT_DNS_SENDMSG);
	return datagram_verdict(ctx, port, is_loopback6(ip));
}

/* recvfrom/recvmsg asking for the source address. The verifier allows these
 * programs to return 1 only. */
SEC("cgroup/recvmsg4")
int ktproxy_recvmsg4(struct bpf_sock_addr *ctx)
{
	struct orig_dst *dst;

	if (!dns_port4 || ctx->user_ip4 != dns_ip4 ||
	    bpf_ntohs((__u16)ctx->user_port) != dns_port4)
		return 1;
	dst = bpf_sk_storage_get(&client_dst, ctx->sk, 0, 0);
	if (!dst || dst->family != AF_INET)
		return 1;
	ctx->user_ip4 = dst->ip[0];
	ctx->user_port = (__u32)dst->port;
	count(STAT_DNS_REPLY_SOURCE);
	return 1;
}

SEC("cgroup/recvmsg6")
int ktproxy_recvmsg6(struct bpf_sock_addr *ctx)
{
	struct orig_dst *dst;
	__u32 ip[4];
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	__u16 family;

	load_user_ip6(ip, ctx);
	if (dns_port4 && port == dns_port4 && is_v4_mapped(ip) && ip[3] == dns_ip4)
		family = AF_INET;
	else if (dns_port6 && port == dns_port6 && ip[0] == dns_ip6[0] && ip[1] == dns_ip6[1] &&
		 ip[2] == dns_ip6[2] && ip[3] == dns_ip6[3])
		family = AF_INET6;
	else
		return 1;
	dst = bpf_sk_storage_get(&client_dst, ctx->sk, 0, 0);
	if (!dst || dst->family != family)
		return 1;
	if (family == AF_INET) {
		ctx->user_ip6[3] = dst->ip[0];
	} else {
		ctx->user_ip6[0] = dst->ip[0];
		ctx->user_ip6[1] = dst->ip[1];
		ctx->user_ip6[2] = dst->ip[2];
		ctx->user_ip6[3] = dst->ip[3];
	}
	ctx->user_port = (__u32)dst->port;
	count(STAT_DNS_REPLY_SOURCE);
	return 1;
}

SEC("cgroup/connect4")
int ktproxy_connect4(struct bpf_sock_addr *ctx)
{
	struct orig_dst dst = {};
	__u16 port;
	int verdict;

	forget_destination(ctx);
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return not_tcp_connect4(ctx);
	if (!socket_wanted(ctx))
		return 1;
	/* user_port holds the network-order port in its low 16 bits. */
	port = bpf_ntohs((__u16)ctx->user_port);
	dst.ip[0] = unspecified_to_loopback4(ctx->user_ip4);
	if (!listen_port4)
		return unproxyable4(dst.ip[0]);
	if (dst.ip[0] == listen_ip4 && port == listen_port4) {
		count(STAT_SKIPPED_TO_PROXY);
		return 1;
	}
	if (!always_redirected4(dst.ip[0], port) &&
	    (!port_wanted(port) || !dest4_wanted(dst.ip[0]))) {
		count(STAT_SKIPPED_BY_RULE);
		return 1;
	}
	dst.port = bpf_htons(port);
	dst.family = AF_INET;
	verdict = cannot_redirect(ctx);
	if (verdict >= 0)
		return verdict;
	if (!remember(ctx, &dst))
		return direct_or_refused();
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
	int verdict;

	forget_destination(ctx);
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return not_tcp_connect6(ctx);
	if (!socket_wanted(ctx))
		return 1;
	port = bpf_ntohs((__u16)ctx->user_port);
	load_user_ip6(dst.ip, ctx);

	if (is_v4_mapped(dst.ip)) {
		/* ::ffff:a.b.c.d on an AF_INET6 socket is an IPv4 connection that
		 * connect4 never sees; send it to the IPv4 listener, mapped. */
		__u32 ip4 = unspecified_to_loopback4(dst.ip[3]);

		if (!listen_port4)
			return unproxyable4(ip4);
		if (ip4 == listen_ip4 && port == listen_port4) {
			count(STAT_SKIPPED_TO_PROXY);
			return 1;
		}
		if (!always_redirected4(ip4, port) && (!port_wanted(port) || !dest4_wanted(ip4))) {
			count(STAT_SKIPPED_BY_RULE);
			return 1;
		}
		dst.ip[0] = ip4;
		dst.ip[1] = dst.ip[2] = dst.ip[3] = 0;
		dst.port = bpf_htons(port);
		dst.family = AF_INET;
		verdict = cannot_redirect(ctx);
		if (verdict >= 0)
			return verdict;
		if (!remember(ctx, &dst))
			return direct_or_refused();
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = listen_ip4;
		ctx->user_port = (__u32)bpf_htons(listen_port4);
		return 1;
	}

	if (!listen_port6)
		return unproxied_verdict(is_loopback6(dst.ip), STAT_REFUSED_UNPROXYABLE,
					 STAT_DIRECT_UNPROXYABLE);
	/* :: means this host, as 0.0.0.0 does for IPv4. */
	if (!(dst.ip[0] | dst.ip[1] | dst.ip[2] | dst.ip[3]))
		dst.ip[3] = bpf_htonl(1);
	/* Link-local destinations need the scope id (interface), which
	 * bpf_sock_addr does not carry: the proxy could not dial them. */
	if ((dst.ip[0] & bpf_htonl(0xffc00000)) == bpf_htonl(0xfe800000)) {
		if (unproxied == UNPROXIED_PASS)
			count(STAT_SKIPPED_BY_RULE);
		return unproxied_verdict(0, STAT_REFUSED_UNPROXYABLE, STAT_DIRECT_UNPROXYABLE);
	}
	if (port == listen_port6 && dst.ip[0] == listen_ip6[0] && dst.ip[1] == listen_ip6[1] &&
	    dst.ip[2] == listen_ip6[2] && dst.ip[3] == listen_ip6[3]) {
		count(STAT_SKIPPED_TO_PROXY);
		return 1;
	}
	if (!always_redirected6(port) && (!port_wanted(port) || !dest6_wanted(dst.ip))) {
		count(STAT_SKIPPED_BY_RULE);
		return 1;
	}
	dst.port = bpf_htons(port);
	dst.family = AF_INET6;
	verdict = cannot_redirect(ctx);
	if (verdict >= 0)
		return verdict;
	if (!remember(ctx, &dst))
		return direct_or_refused();
	ctx->user_ip6[0] = listen_ip6[0];
	ctx->user_ip6[1] = listen_ip6[1];
	ctx->user_ip6[2] = listen_ip6[2];
	ctx->user_ip6[3] = listen_ip6[3];
	ctx->user_port = (__u32)bpf_htons(listen_port6);
	return 1;
}

/* ---- the guard: command mode with an upstream, after ktproxy is gone ----- */

/* Everything above is attached with bpf_links, which die with ktproxy. In
 * command mode with an upstream that would let COMMAND's leftovers (children
 * ignoring SIGTERM, daemonised grandchildren) connect directly once ktproxy
 * is killed with SIGKILL. The guard programs are therefore the one deliberate
 * exception to "bpf_link only": src/bpf/guard.rs attaches them with the legacy
 * BPF_PROG_ATTACH (BPF_F_ALLOW_MULTI) to COMMAND's own cgroup, and only
 * there, never to a cgroup ktproxy did not create. A legacy attachment
 * belongs to the cgroup, not to a file descriptor: it outlives ktproxy, and
 * the kernel drops it when the cgroup goes (cgroup_bpf_release, once the
 * cgroup is removed and its last socket closed). ktproxy detaches it itself
 * on a normal exit.
 *
 * They run after connect4/6 and sendmsg4/6 in the same cgroup (attached
 * later: the kernel runs a cgroup's programs in attach order) and see the
 * address those wrote. A connect the rules want proxied whose destination is not the proxy
 * was not redirected: ktproxy is gone (its links with it), or refused it
 * already. Either way it must not go out directly. */
static __always_inline int guard_passes4(struct bpf_sock_addr *ctx, __u32 ip, __u16 port)
{
	if (ip == listen_ip4 && port == listen_port4)
		return 1;
	ip = unspecified_to_loopback4(ip);
	if (ip == listen_ip4 && port == listen_port4)
		return 1;
	return !port_wanted(port) || !dest4_wanted(ip);
}

static __always_inline int guard_verdict(int passes)
{
	if (passes)
		return 1;
	count(STAT_GUARD_REFUSED);
	return 0;
}

/* Datagrams (and stream protocols other than TCP): while ktproxy lives,
 * connect4/6 and sendmsg4/6 send DNS to its DNS socket (loopback) and refuse
 * the rest of what leaves loopback, so nothing the guard sees later would
 * leave this host. Once ktproxy is gone, the same traffic reaches the guard
 * unchanged: refused, unless --allow-direct (unproxied is not REFUSE) or
 * --no-proxy-dns (DNS was asked to go direct) said otherwise. */
static __always_inline int guard_datagram(struct bpf_sock_addr *ctx, int loopback, __u16 port)
{
	if (loopback || unproxied != UNPROXIED_REFUSE)
		return 1;
	if (!dns_on && port == 53 && ctx->protocol == IPPROTO_UDP)
		return 1;
	return guard_verdict(0);
}

SEC("cgroup/connect4")
int ktproxy_guard4(struct bpf_sock_addr *ctx)
{
	__u16 port = bpf_ntohs((__u16)ctx->user_port);

	if (bpf_get_netns_cookie(ctx) != proxy_netns_cookie)
		return 1;
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return guard_datagram(ctx, is_loopback4(unspecified_to_loopback4(ctx->user_ip4)),
				      port);
	if (!listen_port4)
		return 1;
	return guard_verdict(guard_passes4(ctx, ctx->user_ip4, port));
}

SEC("cgroup/sendmsg4")
int ktproxy_guard_sendmsg4(struct bpf_sock_addr *ctx)
{
	if (bpf_get_netns_cookie(ctx) != proxy_netns_cookie)
		return 1;
	return guard_datagram(ctx, is_loopback4(unspecified_to_loopback4(ctx->user_ip4)),
			      bpf_ntohs((__u16)ctx->user_port));
}

SEC("cgroup/sendmsg6")
int ktproxy_guard_sendmsg6(struct bpf_sock_addr *ctx)
{
	__u32 ip[4];

	if (bpf_get_netns_cookie(ctx) != proxy_netns_cookie)
		return 1;
	load_user_ip6(ip, ctx);
	return guard_datagram(ctx, is_loopback6(ip), bpf_ntohs((__u16)ctx->user_port));
}

SEC("cgroup/connect6")
int ktproxy_guard6(struct bpf_sock_addr *ctx)
{
	__u32 ip[4];
	__u16 port;

	if (bpf_get_netns_cookie(ctx) != proxy_netns_cookie)
		return 1;
	port = bpf_ntohs((__u16)ctx->user_port);
	load_user_ip6(ip, ctx);
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return guard_datagram(ctx, is_loopback6(ip), port);
	if (is_v4_mapped(ip))
		return guard_verdict(!listen_port4 || guard_passes4(ctx, ip[3], port));
	if (!listen_port6)
		return 1;
	if (port == listen_port6 && ip[0] == listen_ip6[0] && ip[1] == listen_ip6[1] &&
	    ip[2] == listen_ip6[2] && ip[3] == listen_ip6[3])
		return 1;
	if (!(ip[0] | ip[1] | ip[2] | ip[3]))
		ip[3] = bpf_htonl(1);
	if ((ip[0] & bpf_htonl(0xffc00000)) == bpf_htonl(0xfe800000))
		return 1;
	return guard_verdict(!port_wanted(port) || !dest6_wanted(ip));
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
 * rejected by the verifier. SO_ORIGINAL_DST answers as netfilter would;
 * KTPROXY_ORIGIN (family 0 here: either) adds who dialed. */
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
	else if (ctx->level == SOL_KTPROXY && ctx->optname == KTPROXY_ORIGIN)
		family = 0;
	else
		return 1;
	sk = ctx->sk;
	if (!sk)
		return 1;
	dst = accepted_orig_dst(sk);
	if (!dst || (family && dst->family != family))
		return 1;
	if (came_from_proxy(dst)) {
		ctx->retval = -ELOOP;
		return 1;
	}

	optval = ctx->optval;
	optval_end = ctx->optval_end;
	if (!family) {
		struct ktproxy_origin *o = optval;

		if ((void *)(o + 1) > optval_end)
			return 1;
		o->family = dst->family;
		o->port = dst->port;
		o->ip[0] = dst->ip[0];
		o->ip[1] = dst->ip[1];
		o->ip[2] = dst->ip[2];
		o->ip[3] = dst->ip[3];
		o->uid = dst->uid;
		o->gid = dst->gid;
		ctx->optlen = sizeof(*o);
	} else if (family == AF_INET) {
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
	if (!dst || !dst->family)
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
