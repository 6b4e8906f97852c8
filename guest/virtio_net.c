/*
 * A polling virtio-net driver over virtio-mmio (version 2, split virtqueues) and the small
 * IPv4 stack the tests and the benchmark talk to: ARP and ICMP echo for the address on the
 * command line, a UDP echo service, a UDP sink and a UDP sender. The only offload: the
 * sender leaves its UDP checksums to the device when it offers that (VIRTIO_NET_F_CSUM),
 * as Linux's driver does.
 *
 * One interface: the first virtio-mmio device with device id 1. Every frame from the
 * network is parsed with its lengths and checksums checked before use; a malformed one is
 * dropped and counted (`bad`), one not for us is counted as `ignored`. Used-ring entries
 * from the device are checked too (`dev_bad`). Every loop is bounded by a ring size or a
 * deadline.
 */
#include "guest.h"

#define F_CSUM 0
#define F_NET_MAC 5
#define NET_HDR 12 /* struct virtio_net_hdr_v1 (with num_buffers) */
#define BUF 2048   /* one frame of up to 1514 bytes behind its header */
#define QMAX 64
#define ETH 14
#define ETH_ARP 0x0806
#define ETH_IP 0x0800
#define IP_ICMP 1
#define IP_UDP 17
#define STATS_REQUEST "GUEST-STATS"

struct vq {
	u16 size, avail_idx, used_seen, index;
	volatile struct desc *desc;
	volatile u16 *avail; /* flags, idx, ring[size] */
	volatile u32 *used;  /* flags|idx, {id, len}[size] */
};

static struct {
	u64 base;
	u8 mac[6];
	u32 ip, mask; /* host byte order */
	struct vq rx, tx;
	u8 *rxbuf, *txbuf;
	u16 tx_free[QMAX];
	u8 tx_busy[QMAX];
	unsigned n_free;
	int use_idle;
	int csum; /* the device completes checksums (F_CSUM) */
	int stop; /* a shutdown request was seen */
	u64 poll_us;
	u64 echo_port, sink_port;
	/* the one peer the sender sends to */
	u32 peer_ip;
	u8 peer_mac[6];
	int peer_known;
	u64 rx_frames, rx_bytes, tx_frames, tx_bytes, arp, icmp, udp_echo, sink, sink_bytes, bad, ignored,
		tx_drop, dev_bad;
} net;

static u32 rd(u32 off) { return mmio_read32(net.base + off); }
static void wr(u32 off, u32 v) { mmio_write32(net.base + off, v); }
static void mfence(void) { __asm__ __volatile__("mfence" ::: "memory"); }

static u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 get32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static void put16(u8 *p, u16 v)
{
	p[0] = (u8)(v >> 8);
	p[1] = (u8)v;
}
static void put32(u8 *p, u32 v)
{
	put16(p, (u16)(v >> 16));
	put16(p + 2, (u16)v);
}

/* The ones'-complement sum of big-endian 16-bit words, added to `s`. */
static u64 sum16(const u8 *p, u32 n, u64 s)
{
	for (; n > 1; n -= 2, p += 2)
		s += get16(p);
	if (n)
		s += (u64)p[0] << 8;
	return s;
}
static u16 fold(u64 s)
{
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (u16)~s;
}
/* The UDP pseudo-header's sum. */
static u64 pseudo(u32 src, u32 dst, u32 len)
{
	return (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + IP_UDP + len;
}

/* ---------------------------------------------------------------------------------- */
/* Queues. */

static int vq_setup(struct vq *q, u16 index)
{
	wr(VM_QUEUE_SEL, index);
	u32 max = rd(VM_QUEUE_NUM_MAX);
	if (max == 0) {
		printf("NET error=queue-unavailable queue=%u\n", index);
		return -1;
	}
	q->index = index;
	q->size = max < QMAX ? (u16)max : QMAX;
	u8 *m = alloc_pages(3 * 4096);
	memset(m, 0, 3 * 4096);
	q->desc = (volatile struct desc *)m;
	q->avail = (volatile u16 *)(m + 4096);
	q->used = (volatile u32 *)(m + 8192);
	/* Interrupts only while parked on the idle port (they end that wait; IF stays 0). */
	q->avail[0] = 1;
	wr(VM_QUEUE_NUM, q->size);
	wr(VM_QUEUE_DESC_LOW, (u32)(u64)q->desc);
	wr(VM_QUEUE_DESC_HIGH, (u32)((u64)q->desc >> 32));
	wr(VM_QUEUE_DRIVER_LOW, (u32)(u64)q->avail);
	wr(VM_QUEUE_DRIVER_HIGH, (u32)((u64)q->avail >> 32));
	wr(VM_QUEUE_DEVICE_LOW, (u32)(u64)q->used);
	wr(VM_QUEUE_DEVICE_HIGH, (u32)((u64)q->used >> 32));
	wr(VM_QUEUE_READY, 1);
	return 0;
}

static u16 used_idx(struct vq *q) { return (u16)(q->used[0] >> 16); }

static void avail_push(struct vq *q, u16 id)
{
	q->avail[2 + q->avail_idx % q->size] = id;
	q->avail_idx++;
}

static void avail_publish(struct vq *q)
{
	barrier();
	q->avail[1] = q->avail_idx;
	mfence(); /* the index out before the device's flags and used index are read */
}

/* ---------------------------------------------------------------------------------- */
/* Transmit: one descriptor per frame, slot k is descriptor k. */

static void tx_reclaim(void)
{
	for (unsigned i = 0; i < net.tx.size && used_idx(&net.tx) != net.tx.used_seen; i++) {
		barrier();
		u32 id = net.tx.used[1 + 2 * (net.tx.used_seen % net.tx.size)];
		net.tx.used_seen++;
		if (id >= net.tx.size || !net.tx_busy[id]) {
			net.dev_bad++;
			continue;
		}
		net.tx_busy[id] = 0;
		net.tx_free[net.n_free++] = (u16)id;
	}
}

/* A free frame buffer (after its header), or NULL when every slot is in flight. */
static u8 *tx_get(void)
{
	if (!net.n_free)
		tx_reclaim();
	if (!net.n_free)
		return NULL;
	u16 id = net.tx_free[--net.n_free];
	u8 *b = net.txbuf + (u64)id * BUF;
	memset(b, 0, NET_HDR);
	return b + NET_HDR;
}

static void tx_kick(void)
{
	if (!(net.tx.used[0] & 1))
		wr(VM_QUEUE_NOTIFY, net.tx.index);
}

/* Queues the frame built in a buffer from tx_get(); notifies the device if asked. */
static void tx_put(u8 *frame, u32 len, int notify)
{
	u16 id = (u16)((u64)(frame - NET_HDR - net.txbuf) / BUF);
	if (len < 60) {
		memset(frame + len, 0, 60 - len);
		len = 60;
	}
	net.tx.desc[id].addr = (u64)(frame - NET_HDR);
	net.tx.desc[id].len = NET_HDR + len;
	net.tx.desc[id].flags = 0;
	net.tx.desc[id].next = 0;
	net.tx_busy[id] = 1;
	avail_push(&net.tx, id);
	net.tx_frames++;
	net.tx_bytes += len;
	if (notify) {
		avail_publish(&net.tx);
		tx_kick();
	}
}

/* A reply frame to `dst` of `type`; NULL (counted) when no TX slot is free. */
static u8 *eth_reply(const u8 *dst, u16 type)
{
	u8 *f = tx_get();
	if (!f) {
		net.tx_drop++;
		return NULL;
	}
	memcpy(f, dst, 6);
	memcpy(f + 6, net.mac, 6);
	put16(f + 12, type);
	return f;
}

/* ---------------------------------------------------------------------------------- */
/* Receive. */

static void arp_send(u16 op, const u8 *tha, u32 tpa, const u8 *eth_dst)
{
	u8 *f = eth_reply(eth_dst, ETH_ARP);
	if (!f)
		return;
	u8 *a = f + ETH;
	put16(a, 1);
	put16(a + 2, ETH_IP);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, op);
	memcpy(a + 8, net.mac, 6);
	put32(a + 14, net.ip);
	memcpy(a + 18, tha, 6);
	put32(a + 24, tpa);
	tx_put(f, ETH + 28, 1);
}

static void arp_in(const u8 *f, u32 n)
{
	const u8 *a = f + ETH;
	if (n < ETH + 28 || get16(a) != 1 || get16(a + 2) != ETH_IP || a[4] != 6 || a[5] != 4) {
		net.bad++;
		return;
	}
	u16 op = get16(a + 6);
	u32 spa = get32(a + 14), tpa = get32(a + 24);
	if (spa == net.peer_ip && (op == 1 || op == 2)) {
		memcpy(net.peer_mac, a + 8, 6);
		net.peer_known = 1;
	}
	if (op == 1 && tpa == net.ip) {
		net.arp++;
		arp_send(2, a + 8, spa, f + 6);
	} else {
		net.ignored++;
	}
}

/* Writes an IPv4 header (no options) for `len` bytes of payload to `dst`. */
static void ip_header(u8 *ip, u8 proto, u32 dst, u32 len)
{
	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, (u16)(20 + len));
	put16(ip + 4, 0);
	put16(ip + 6, 0x4000); /* don't fragment */
	ip[8] = 64;
	ip[9] = proto;
	put16(ip + 10, 0);
	put32(ip + 12, net.ip);
	put32(ip + 16, dst);
	put16(ip + 10, fold(sum16(ip, 20, 0)));
}

static void icmp_in(const u8 *f, u32 src, const u8 *p, u32 len)
{
	if (len < 8 || fold(sum16(p, len, 0)) != 0) {
		net.bad++;
		return;
	}
	if (p[0] != 8 || p[1] != 0) {
		net.ignored++;
		return;
	}
	u8 *r = eth_reply(f + 6, ETH_IP);
	if (!r)
		return;
	u8 *ip = r + ETH, *icmp = ip + 20;
	ip_header(ip, IP_ICMP, src, len);
	memcpy(icmp, p, len);
	icmp[0] = 0;
	put16(icmp + 2, 0);
	put16(icmp + 2, fold(sum16(icmp, len, 0)));
	net.icmp++;
	tx_put(r, ETH + 20 + len, 1);
}

static void print_counters(void);

static void udp_in(const u8 *f, u32 src, const u8 *u, u32 len)
{
	u32 ulen = len >= 8 ? get16(u + 4) : 0;
	if (ulen < 8 || ulen > len || (get16(u + 6) && fold(sum16(u, ulen, pseudo(src, net.ip, ulen))) != 0)) {
		net.bad++;
		return;
	}
	u16 sport = get16(u), dport = get16(u + 2);
	if (net.sink_port && dport == net.sink_port) {
		net.sink++;
		net.sink_bytes += ulen - 8;
		return;
	}
	if (!net.echo_port || dport != net.echo_port) {
		net.ignored++;
		return;
	}
	if (ulen - 8 >= sizeof STATS_REQUEST - 1 && !memcmp(u + 8, STATS_REQUEST, sizeof STATS_REQUEST - 1))
		print_counters();
	u8 *r = eth_reply(f + 6, ETH_IP);
	if (!r)
		return;
	u8 *ip = r + ETH, *ru = ip + 20;
	ip_header(ip, IP_UDP, src, ulen);
	memcpy(ru, u, ulen);
	put16(ru, dport);
	put16(ru + 2, sport);
	put16(ru + 6, 0);
	u16 c = fold(sum16(ru, ulen, pseudo(net.ip, src, ulen)));
	put16(ru + 6, c ? c : 0xffff);
	net.udp_echo++;
	tx_put(r, ETH + 20 + ulen, 1);
}

static void ip_in(const u8 *f, u32 n)
{
	const u8 *ip = f + ETH;
	u32 room = n - ETH;
	if (room < 20) {
		net.bad++;
		return;
	}
	u32 ihl = (u32)(ip[0] & 15) * 4;
	if (ip[0] >> 4 != 4 || ihl < 20 || ihl > room) {
		net.bad++;
		return;
	}
	u32 total = get16(ip + 2);
	if (total < ihl || total > room || fold(sum16(ip, ihl, 0)) != 0) {
		net.bad++;
		return;
	}
	u32 src = get32(ip + 12), dst = get32(ip + 16);
	if (dst != net.ip || (get16(ip + 6) & 0x3fff)) { /* not ours, or a fragment */
		net.ignored++;
		return;
	}
	if (ip[9] == IP_ICMP)
		icmp_in(f, src, ip + ihl, total - ihl);
	else if (ip[9] == IP_UDP)
		udp_in(f, src, ip + ihl, total - ihl);
	else
		net.ignored++;
}

static void frame_in(const u8 *f, u32 n)
{
	net.rx_frames++;
	net.rx_bytes += n;
	if (n < ETH) {
		net.bad++;
		return;
	}
	int bcast = 1;
	for (int i = 0; i < 6; i++)
		bcast &= f[i] == 0xff;
	if (!bcast && memcmp(f, net.mac, 6)) {
		net.ignored++;
		return;
	}
	u16 type = get16(f + 12);
	if (type == ETH_ARP)
		arp_in(f, n);
	else if (type == ETH_IP)
		ip_in(f, n);
	else
		net.ignored++;
}

/* Handles every received frame (at most a ring's worth) and gives the buffers back.
 * Returns how many there were. */
static unsigned rx_poll(void)
{
	struct vq *q = &net.rx;
	u16 before = q->avail_idx;
	unsigned n = 0;
	for (; n < q->size && used_idx(q) != q->used_seen; n++) {
		barrier();
		u32 slot = q->used_seen % q->size;
		u32 id = q->used[1 + 2 * slot], len = q->used[2 + 2 * slot];
		q->used_seen++;
		if (id >= q->size) {
			net.dev_bad++; /* not a buffer of ours: nothing to give back */
			continue;
		}
		if (len < NET_HDR || len > BUF) {
			net.dev_bad++;
		} else {
			frame_in(net.rxbuf + (u64)id * BUF + NET_HDR, len - NET_HDR);
		}
		avail_push(q, (u16)id);
	}
	if (q->avail_idx != before) {
		avail_publish(q);
		/* A device that ran out of buffers waits for a kick; one that has used fewer than
		 * it had will find the new ones by itself (it reads the available index after
		 * publishing each used entry). A device that asked for no kicks gets none. */
		if (!(q->used[0] & 1) && used_idx(q) == before)
			wr(VM_QUEUE_NOTIFY, q->index);
	}
	return n;
}

/* ---------------------------------------------------------------------------------- */
/* Set-up and the command line. */

static void print_counters(void)
{
	printf("GUEST net rx=%lu tx=%lu rx_bytes=%lu tx_bytes=%lu arp=%lu icmp=%lu udp_echo=%lu sink=%lu "
	       "sink_bytes=%lu bad=%lu ignored=%lu tx_drop=%lu dev_bad=%lu\n",
	       net.rx_frames, net.tx_frames, net.rx_bytes, net.tx_bytes, net.arp, net.icmp, net.udp_echo,
	       net.sink, net.sink_bytes, net.bad, net.ignored, net.tx_drop, net.dev_bad);
}

/* Parses "a.b.c.d" at *s (at most `n` bytes); advances *s. 0 when well-formed. */
static int parse_ip(const char **s, const char *end, u32 *ip)
{
	u32 v = 0;
	for (int part = 0; part < 4; part++) {
		u32 x = 0, digits = 0;
		while (*s < end && **s >= '0' && **s <= '9' && digits < 4) {
			x = x * 10 + (u32)(**s - '0');
			(*s)++;
			digits++;
		}
		if (!digits || x > 255)
			return -1;
		v = v << 8 | x;
		if (part < 3) {
			if (*s >= end || **s != '.')
				return -1;
			(*s)++;
		}
	}
	*ip = v;
	return 0;
}

/* A decimal number running to `end` or to the next ',' / ':'; -1 if malformed. */
static i64 parse_dec(const char **s, const char *end)
{
	i64 v = 0;
	int digits = 0;
	while (*s < end && **s >= '0' && **s <= '9' && digits < 12) {
		v = v * 10 + (**s - '0');
		(*s)++;
		digits++;
	}
	if (!digits || (*s < end && **s != ',' && **s != ':'))
		return -1;
	return v;
}

static void print_ip(const char *key, u32 ip)
{
	printf("%s=%u.%u.%u.%u", key, ip >> 24, (ip >> 16) & 255, (ip >> 8) & 255, ip & 255);
}

static __attribute__((noreturn)) void bad_cmdline(const char *key)
{
	printf("GUEST error bad-cmdline key=%s\n", key);
	poweroff(EXIT_BAD_CMDLINE);
}

static int net_init(const char *cl)
{
	for (unsigned n = 0; n < 32 && !net.base; n++) {
		u64 base = virtio_mmio_base(cl, n);
		if (!base)
			break;
		if (mmio_read32(base + VM_MAGIC) != 0x74726976 || mmio_read32(base + VM_DEVICE_ID) != VIRTIO_ID_NET)
			continue;
		u32 version = mmio_read32(base + VM_VERSION);
		if (version != 2) {
			/* QEMU: -global virtio-mmio.force-legacy=false */
			printf("NET error=unsupported-virtio-mmio version=%u base=0x%lx\n", version, base);
			return -1;
		}
		net.base = base;
	}
	if (!net.base) {
		puts("NET error=no-device\n");
		return -1;
	}
	wr(VM_STATUS, 0);
	wr(VM_STATUS, STATUS_ACK);
	wr(VM_STATUS, STATUS_ACK | STATUS_DRIVER);
	wr(VM_DEVICE_FEATURES_SEL, 0);
	u64 offered = rd(VM_DEVICE_FEATURES);
	wr(VM_DEVICE_FEATURES_SEL, 1);
	offered |= (u64)rd(VM_DEVICE_FEATURES) << 32;
	u64 want = (1UL << F_VERSION_1) | (1UL << F_NET_MAC);
	if ((offered & want) != want) {
		printf("NET error=features offered=0x%lx\n", offered);
		return -1;
	}
	want |= offered & (1UL << F_CSUM);
	net.csum = (want >> F_CSUM) & 1;
	wr(VM_DRIVER_FEATURES_SEL, 0);
	wr(VM_DRIVER_FEATURES, (u32)want);
	wr(VM_DRIVER_FEATURES_SEL, 1);
	wr(VM_DRIVER_FEATURES, (u32)(want >> 32));
	wr(VM_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
	if (!(rd(VM_STATUS) & STATUS_FEATURES_OK)) {
		puts("NET error=features-rejected\n");
		return -1;
	}
	if (vq_setup(&net.rx, 0) || vq_setup(&net.tx, 1))
		return -1;
	for (int i = 0; i < 6; i++)
		net.mac[i] = mmio_read8(net.base + VM_CONFIG + (u32)i);
	net.rxbuf = alloc_pages((u64)net.rx.size * BUF);
	net.txbuf = alloc_pages((u64)net.tx.size * BUF);
	for (u16 i = 0; i < net.rx.size; i++) {
		net.rx.desc[i].addr = (u64)(net.rxbuf + (u64)i * BUF);
		net.rx.desc[i].len = BUF;
		net.rx.desc[i].flags = DESC_WRITE;
		net.rx.desc[i].next = 0;
		avail_push(&net.rx, i);
	}
	for (u16 i = 0; i < net.tx.size; i++)
		net.tx_free[net.n_free++] = i;
	avail_publish(&net.rx);
	wr(VM_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
	wr(VM_QUEUE_NOTIFY, 0);
	return 0;
}

/* Waits for frames up to `max_us`: polls for net_poll_us, then parks on the idle port
 * with RX interrupts on (the ring is read once more after asking for them). */
static void rx_wait(u64 polled_from, u64 max_us)
{
	if (rx_poll())
		return;
	u64 t = rdtsc();
	if (!net.use_idle || t - polled_from < net.poll_us * tsc_per_ms / 1000 || !max_us) {
		__asm__ __volatile__("pause");
		return;
	}
	net.rx.avail[0] = 0;
	mfence();
	if (used_idx(&net.rx) == net.rx.used_seen && inb(PORT_IDLE) == 0xff)
		net.use_idle = 0;
	net.rx.avail[0] = 1;
}

/* ---------------------------------------------------------------------------------- */
/* Parses "xx:xx:xx:xx:xx:xx" (hex digits either case) at *s; advances *s. 0 when
 * well-formed. */
static int parse_mac(const char **s, const char *end, u8 mac[6])
{
	for (int i = 0; i < 6; i++) {
		u8 v = 0;
		for (int d = 0; d < 2; d++, (*s)++) {
			char c = *s < end ? **s : 0;
			u8 x = c >= '0' && c <= '9'   ? (u8)(c - '0')
			       : c >= 'a' && c <= 'f' ? (u8)(c - 'a' + 10)
			       : c >= 'A' && c <= 'F' ? (u8)(c - 'A' + 10)
						      : 0xff;
			if (x == 0xff)
				return -1;
			v = (u8)(v << 4 | x);
		}
		mac[i] = v;
		if (i < 5 && (*s >= end || *(*s)++ != ':'))
			return -1;
	}
	return 0;
}

/* The UDP sender: udp_send=IP:PORT[,size=N][,count=N][,pps=N][,src_mac=MAC][,src_ip=IP][,forged=N].
 * `forged` of the `count` frames (all of them when only src_mac or src_ip is given) carry
 * src_mac as their Ethernet source instead of the interface's MAC and src_ip as their IPv4
 * source instead of its address, to test a host's anti-spoofing: forged and genuine
 * frames take turns, forged first, while both remain. */

static int udp_send(const char *s, usize len)
{
	const char *end = s + len;
	u32 dst;
	if (parse_ip(&s, end, &dst) || s >= end || *s++ != ':')
		bad_cmdline("udp_send");
	i64 port = parse_dec(&s, end), size = 64, count = 1000, pps = 0, forged = -1;
	u8 src_mac[6] = {0};
	int have_src_mac = 0, have_src_ip = 0;
	u32 src_ip = 0;
	if (port <= 0 || port > 65535)
		bad_cmdline("udp_send");
	while (s < end && *s == ',') {
		s++;
		if (!strncmp(s, "src_mac=", 8)) {
			s += 8;
			if (parse_mac(&s, end, src_mac) || (s < end && *s != ','))
				bad_cmdline("udp_send");
			have_src_mac = 1;
			continue;
		}
		if (!strncmp(s, "src_ip=", 7)) {
			s += 7;
			if (parse_ip(&s, end, &src_ip) || (s < end && *s != ','))
				bad_cmdline("udp_send");
			have_src_ip = 1;
			continue;
		}
		i64 *v = !strncmp(s, "size=", 5)     ? &size
			 : !strncmp(s, "count=", 6)  ? &count
			 : !strncmp(s, "pps=", 4)    ? &pps
			 : !strncmp(s, "forged=", 7) ? &forged
						     : NULL;
		if (!v)
			bad_cmdline("udp_send");
		while (s < end && *s != '=')
			s++;
		s++;
		if ((*v = parse_dec(&s, end)) < 0)
			bad_cmdline("udp_send");
	}
	int have_forgery = have_src_mac || have_src_ip;
	if (forged < 0)
		forged = have_forgery ? count : 0;
	if (s != end || size < 8 || size > BUF - NET_HDR - ETH - 28 || forged > count || (forged && !have_forgery))
		bad_cmdline("udp_send");
	if ((dst & net.mask) != (net.ip & net.mask)) {
		puts("NET send error=destination-not-on-link\n");
		return -1;
	}
	/* Resolve the destination: an ARP request every 200 ms for up to 10 s. */
	net.peer_ip = dst;
	static const u8 bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, zero[6] = {0};
	u64 deadline = now_ms() + 10000, next = 0;
	while (!net.peer_known) {
		if (now_ms() >= deadline) {
			puts("NET send error=arp-timeout\n");
			return -1;
		}
		if (now_ms() >= next) {
			arp_send(1, zero, dst, bcast);
			next = now_ms() + 200;
		}
		rx_wait(rdtsc(), 0);
	}
	u64 interval = pps ? tsc_per_ms * 1000 / (u64)pps : 0;
	u64 t0 = rdtsc(), due = t0, stalled = 0, next_check = now_ms() + 10;
	u64 sent = 0, sent_forged = 0;
	while (sent < (u64)count) {
		rx_poll();
		if (now_ms() >= next_check) {
			if (shutdown_requested()) {
				net.stop = 1;
				break;
			}
			next_check = now_ms() + 10;
		}
		if (interval && rdtsc() < due) {
			__asm__ __volatile__("pause");
			continue;
		}
		u8 *f = tx_get();
		if (!f) {
			if (!stalled)
				stalled = now_ms() + 2000;
			else if (now_ms() > stalled) {
				puts("NET send error=tx-stalled\n");
				return -1;
			}
			__asm__ __volatile__("pause");
			continue;
		}
		stalled = 0;
		/* As many frames as are due and fit, under one notification. */
		int queued = 0;
		while (f) {
			/* Forged while some are left and none is owed to the genuine turn. */
			u64 genuine_left = (u64)(count - forged) - (sent - sent_forged);
			int forge = sent_forged < (u64)forged && (!genuine_left || sent_forged <= sent - sent_forged);
			sent_forged += (u64)forge;
			memcpy(f, net.peer_mac, 6);
			memcpy(f + 6, forge && have_src_mac ? src_mac : net.mac, 6);
			put16(f + 12, ETH_IP);
			u8 *ip = f + ETH, *u = ip + 20;
			u32 ulen = (u32)size + 8;
			ip_header(ip, IP_UDP, dst, ulen);
			if (forge && have_src_ip) {
				put32(ip + 12, src_ip);
				put16(ip + 10, 0);
				put16(ip + 10, fold(sum16(ip, 20, 0)));
			}
			put16(u, 1024);
			put16(u + 2, (u16)port);
			put16(u + 4, (u16)ulen);
			if (net.csum) {
				/* The pseudo-header's sum, for the device to complete from UDP's start
				 * (virtio_net_hdr: NEEDS_CSUM, csum_start, csum_offset). */
				u8 *h = f - NET_HDR;
				h[0] = 1;
				h[6] = ETH + 20;
				h[8] = 6;
				put16(u + 6, (u16)~fold(pseudo(get32(ip + 12), dst, ulen)));
			} else {
				put16(u + 6, 0); /* no checksum: allowed over IPv4 */
			}
			for (u64 i = 0; i < (u64)size; i++)
				u[8 + i] = (u8)(sent >> (8 * (i & 7)));
			tx_put(f, ETH + 20 + ulen, 0);
			sent++;
			queued++;
			due += interval;
			if (sent >= (u64)count || (interval && rdtsc() < due) || queued >= 32)
				break;
			f = tx_get();
		}
		avail_publish(&net.tx);
		tx_kick();
	}
	u64 ms = (rdtsc() - t0) / tsc_per_ms;
	/* Every frame handed back before reporting, for up to 2 s. */
	for (u64 until = now_ms() + 2000; net.n_free < net.tx.size && now_ms() < until;)
		tx_reclaim();
	printf("NET send packets=%lu payload=%ld ms=%lu pps=%lu payload_bytes_per_s=%lu forged=%lu\n", sent, size,
	       ms, ms ? sent * 1000 / ms : 0, ms ? sent * (u64)size * 1000 / ms : 0, sent_forged);
	return 0;
}

/* ---------------------------------------------------------------------------------- */

int net_run(const char *cl)
{
	usize len;
	const char *s = arg_str("ip", NULL, &len);
	if (!s)
		return 0;
	const char *end = s + len;
	u32 ip;
	i64 prefix = 24;
	if (parse_ip(&s, end, &ip))
		bad_cmdline("ip");
	if (s < end) {
		if (*s++ != '/' || (prefix = parse_dec(&s, end)) < 1 || prefix > 30 || s != end)
			bad_cmdline("ip");
	}
	net.ip = ip;
	net.mask = ~0U << (32 - prefix);
	net.echo_port = arg_u64("udp_echo", 7);
	net.sink_port = arg_u64("udp_sink", 0);
	if (net.echo_port > 65535 || net.sink_port > 65535)
		bad_cmdline("udp_echo");
	net.use_idle = arg_u64("net_idle", 1) != 0;
	net.poll_us = arg_u64("net_poll_us", 200);
	if (net_init(cl))
		return -1;
	printf("GUEST net up mac=%02x:%02x:%02x:%02x:%02x:%02x ", net.mac[0], net.mac[1], net.mac[2], net.mac[3],
	       net.mac[4], net.mac[5]);
	print_ip("ip", ip);
	printf("/%ld udp_echo=%lu udp_sink=%lu\n", prefix, net.echo_port, net.sink_port);

	int failed = 0;
	s = arg_str("udp_send", NULL, &len);
	if (s && udp_send(s, len))
		failed = 1;
	/* Serve for net_s seconds (0: until a shutdown request), counters every net_stats_ms. */
	u64 secs = arg_u64("net_s", 0), stats_ms = arg_u64("net_stats_ms", 0);
	u64 start = now_ms(), next_check = start, next_stats = start + stats_ms;
	u64 polled_from = rdtsc();
	for (;;) {
		if (rx_poll()) {
			polled_from = rdtsc();
			continue;
		}
		u64 t = now_ms();
		if (t >= next_check) {
			if (net.stop || shutdown_requested()) {
				puts("GUEST shutdown requested\n");
				net.stop = 1;
				break;
			}
			if (secs && t - start >= secs * 1000)
				break;
			if (stats_ms && t >= next_stats) {
				print_counters();
				next_stats = t + stats_ms;
			}
			next_check = t + 10;
		}
		rx_wait(polled_from, 1);
	}
	print_counters();
	if (failed)
		return -1;
	return net.stop;
}
