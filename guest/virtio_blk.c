/*
 * A polling virtio-blk driver over virtio-mmio (version 2, split virtqueues), and the
 * disk checks the command line asks for.
 *
 * Devices are found the way Linux finds them: "virtio_mmio.device=<size>@<base>:<irq>"
 * words on the command line, in order; the N-th such word is disk N. Interrupts are not
 * used (the guest runs with IF=0 and polls the used ring).
 *
 * The pattern: the 8-byte word at byte offset 8*i of disk N is
 * mix64((seed + N) ^ (i * 0xd1b54a32d192ed03)). The host's tests compute the same words
 * to check what the guest wrote through the backing file or volume.
 */
#include "guest.h"

#define F_BLK_SIZE_MAX 1
#define F_BLK_SEG_MAX 2
#define F_BLK_RO 5
#define F_BLK_BLK_SIZE 6
#define F_BLK_FLUSH 9
#define F_BLK_DISCARD 13
#define F_BLK_WRITE_ZEROES 14

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_DISCARD 11
#define T_WRITE_ZEROES 13

#define S_OK 0
#define S_IOERR 1
#define S_UNSUPP 2
#define S_PENDING 0xff

#define QSIZE_MAX 64
#define SLOTS 16
#define SECTOR 512

struct req_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};

struct seg {
	u64 sector;
	u32 num_sectors;
	u32 flags;
};

struct slot {
	struct req_hdr hdr;
	struct seg seg;
	volatile u8 status;
	u8 pad[7];
};

struct blk {
	u64 base;
	unsigned index;
	u64 features;
	u64 capacity; /* sectors */
	u16 qsize;
	u16 avail_idx;
	u16 used_seen;
	volatile struct desc *desc;
	volatile u16 *avail; /* flags, idx, ring[qsize], used_event */
	volatile u32 *used;  /* flags|idx, {id, len}[qsize], avail_event */
	struct slot *slots;
};

/* 1: wait for completions on the idle port; 0: spin (blk_idle=0, or no such port). */
static int use_idle = -1;
/* Before parking, poll this long: a completion that is that close costs less to catch
 * spinning than an exit and a wake-up. Linux guests do the same (cpuidle-haltpoll, whose
 * default window, guest_halt_poll_ns, is 200 us). blk_poll_us sets it. */
static u64 idle_poll_us = 200;
/* The window while several requests are in flight (blk_poll_many_us, by default the
 * same): hostd sends the requests of one notification to the target together, so their
 * completions come back close together too, and parking between them costs an exit and a
 * wake-up each. (It was 0 while each request left in a write of its own: the host threads
 * then needed the CPU a polling vCPU took, and parking at once served them faster.) */
static u64 idle_poll_many_us = 200;

static u32 rd(struct blk *b, u32 off) { return mmio_read32(b->base + off); }
static void wr(struct blk *b, u32 off, u32 v) { mmio_write32(b->base + off, v); }

static u64 parse_num(const char **p)
{
	u64 v = 0;
	const char *s = *p;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		s += 2;
		for (;; s++) {
			if (*s >= '0' && *s <= '9')
				v = v * 16 + (u64)(*s - '0');
			else if (*s >= 'a' && *s <= 'f')
				v = v * 16 + (u64)(*s - 'a' + 10);
			else if (*s >= 'A' && *s <= 'F')
				v = v * 16 + (u64)(*s - 'A' + 10);
			else
				break;
		}
	} else {
		while (*s >= '0' && *s <= '9')
			v = v * 10 + (u64)(*s++ - '0');
	}
	if (*s == 'K' || *s == 'k') {
		v <<= 10;
		s++;
	} else if (*s == 'M' || *s == 'm') {
		v <<= 20;
		s++;
	}
	*p = s;
	return v;
}

/* Finds the n-th "virtio_mmio.device=" word; returns its base address or 0. */
u64 virtio_mmio_base(const char *cl, unsigned n)
{
	const char *key = "virtio_mmio.device=";
	usize klen = strlen(key);
	for (const char *p = cl; *p;) {
		while (*p == ' ')
			p++;
		if (!strncmp(p, key, klen)) {
			const char *s = p + klen;
			(void)parse_num(&s); /* size */
			if (*s == '@') {
				s++;
				u64 base = parse_num(&s);
				if (n-- == 0)
					return base;
			}
		}
		while (*p && *p != ' ')
			p++;
	}
	return 0;
}

static u64 pattern_word(u64 seed, u64 i) { return mix64(seed ^ (i * 0xd1b54a32d192ed03UL)); }

static void pattern_fill(u64 seed, u64 sector, u64 *buf, u64 sectors)
{
	u64 first = sector * (SECTOR / 8);
	for (u64 i = 0; i < sectors * (SECTOR / 8); i++)
		buf[i] = pattern_word(seed, first + i);
}

/* Returns the first mismatching sector, or -1. */
static i64 pattern_check(u64 seed, u64 sector, const u64 *buf, u64 sectors)
{
	u64 first = sector * (SECTOR / 8);
	for (u64 i = 0; i < sectors * (SECTOR / 8); i++)
		if (buf[i] != pattern_word(seed, first + i))
			return (i64)(sector + i / (SECTOR / 8));
	return -1;
}

static int blk_init(struct blk *b)
{
	if (rd(b, VM_MAGIC) != 0x74726976) {
		printf("BLK dev=%u error=no-virtio-magic base=0x%lx\n", b->index, b->base);
		return -1;
	}
	u32 version = rd(b, VM_VERSION), id = rd(b, VM_DEVICE_ID);
	if (version != 2 || id != 2) {
		printf("BLK dev=%u error=unsupported version=%u device_id=%u\n", b->index, version, id);
		return -1;
	}
	wr(b, VM_STATUS, 0);
	wr(b, VM_STATUS, STATUS_ACK);
	wr(b, VM_STATUS, STATUS_ACK | STATUS_DRIVER);
	wr(b, VM_DEVICE_FEATURES_SEL, 0);
	u64 offered = rd(b, VM_DEVICE_FEATURES);
	wr(b, VM_DEVICE_FEATURES_SEL, 1);
	offered |= (u64)rd(b, VM_DEVICE_FEATURES) << 32;
	u64 wanted = (1UL << F_VERSION_1) | (1UL << F_BLK_RO) | (1UL << F_BLK_BLK_SIZE) | (1UL << F_BLK_FLUSH) |
		     (1UL << F_BLK_DISCARD) | (1UL << F_BLK_WRITE_ZEROES) | (1UL << F_BLK_SIZE_MAX) |
		     (1UL << F_BLK_SEG_MAX);
	if (!(offered & (1UL << F_VERSION_1))) {
		printf("BLK dev=%u error=no-version-1 offered=0x%lx\n", b->index, offered);
		return -1;
	}
	b->features = offered & wanted;
	wr(b, VM_DRIVER_FEATURES_SEL, 0);
	wr(b, VM_DRIVER_FEATURES, (u32)b->features);
	wr(b, VM_DRIVER_FEATURES_SEL, 1);
	wr(b, VM_DRIVER_FEATURES, (u32)(b->features >> 32));
	wr(b, VM_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
	if (!(rd(b, VM_STATUS) & STATUS_FEATURES_OK)) {
		printf("BLK dev=%u error=features-rejected\n", b->index);
		return -1;
	}
	wr(b, VM_QUEUE_SEL, 0);
	u32 max = rd(b, VM_QUEUE_NUM_MAX);
	if (max == 0) {
		printf("BLK dev=%u error=queue-unavailable\n", b->index);
		return -1;
	}
	b->qsize = max < QSIZE_MAX ? (u16)max : QSIZE_MAX;
	u8 *q = alloc_pages(3 * 4096);
	memset(q, 0, 3 * 4096);
	b->desc = (volatile struct desc *)q;
	b->avail = (volatile u16 *)(q + 4096);
	b->used = (volatile u32 *)(q + 8192);
	b->slots = alloc_pages(4096);
	memset(b->slots, 0, 4096);
	wr(b, VM_QUEUE_NUM, b->qsize);
	wr(b, VM_QUEUE_DESC_LOW, (u32)(u64)b->desc);
	wr(b, VM_QUEUE_DESC_HIGH, (u32)((u64)b->desc >> 32));
	wr(b, VM_QUEUE_DRIVER_LOW, (u32)(u64)b->avail);
	wr(b, VM_QUEUE_DRIVER_HIGH, (u32)((u64)b->avail >> 32));
	wr(b, VM_QUEUE_DEVICE_LOW, (u32)(u64)b->used);
	wr(b, VM_QUEUE_DEVICE_HIGH, (u32)((u64)b->used >> 32));
	wr(b, VM_QUEUE_READY, 1);
	wr(b, VM_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
	b->capacity = (u64)rd(b, VM_CONFIG) | ((u64)rd(b, VM_CONFIG + 4) << 32);
	b->avail_idx = 0;
	b->used_seen = 0;
	/* No interrupts (VRING_AVAIL_F_NO_INTERRUPT) but while reap() waits on the idle port:
	 * they only end that wait, and are never delivered (IF stays 0). */
	if (use_idle < 0)
		use_idle = arg_u64("blk_idle", 1) != 0;
	idle_poll_us = arg_u64("blk_poll_us", 200);
	idle_poll_many_us = arg_u64("blk_poll_many_us", idle_poll_us);
	b->avail[0] = 1;
	return 0;
}

/* Tells the device about new requests, unless it asked not to be told
 * (VRING_USED_F_NO_NOTIFY: it is taking requests off the ring right now and will see
 * them). Skipping the notification saves an exit. */
static void kick(struct blk *b)
{
	__asm__ __volatile__("mfence" ::: "memory"); /* the avail index out before the flags in */
	if (!(b->used[0] & 1))
		wr(b, VM_QUEUE_NOTIFY, 0);
}

/* Puts a request in slot k (descriptors 3k..3k+2) on the available ring; notifies the
 * device if asked (several requests can share one notification). */
static void queue_req(struct blk *b, unsigned k, u32 type, u64 sector, void *data, u32 len, int notify)
{
	struct slot *s = &b->slots[k];
	u16 d = (u16)(3 * k);
	s->hdr.type = type;
	s->hdr.reserved = 0;
	s->hdr.sector = sector;
	s->status = S_PENDING;
	b->desc[d].addr = (u64)&s->hdr;
	b->desc[d].len = sizeof s->hdr;
	b->desc[d].flags = DESC_NEXT;
	b->desc[d].next = (u16)(d + 1);
	u16 st = (u16)(d + 1);
	if (type == T_DISCARD || type == T_WRITE_ZEROES) {
		s->seg.sector = sector;
		s->seg.num_sectors = len / SECTOR;
		s->seg.flags = 0;
		data = &s->seg;
		len = sizeof s->seg;
	}
	if (len) {
		b->desc[d + 1].addr = (u64)data;
		b->desc[d + 1].len = len;
		b->desc[d + 1].flags = DESC_NEXT | (type == T_IN ? DESC_WRITE : 0);
		b->desc[d + 1].next = (u16)(d + 2);
		st = (u16)(d + 2);
	}
	b->desc[st].addr = (u64)&s->status;
	b->desc[st].len = 1;
	b->desc[st].flags = DESC_WRITE;
	b->desc[st].next = 0;
	b->avail[2 + b->avail_idx % b->qsize] = d;
	barrier();
	b->avail_idx++;
	b->avail[1] = b->avail_idx;
	barrier();
	if (notify)
		kick(b);
}

static void submit(struct blk *b, unsigned k, u32 type, u64 sector, void *data, u32 len)
{
	queue_req(b, k, type, sector, data, len, 1);
}

/* The next used entry if there is one already (no waiting); -1 if none. */
static int reap_ready(struct blk *b)
{
	u16 idx = (u16)(b->used[0] >> 16);
	if (idx == b->used_seen)
		return -1;
	barrier();
	u32 id = b->used[1 + 2 * (b->used_seen % b->qsize)];
	b->used_seen++;
	return (int)(id / 3);
}

/* Waits for the next used entry; returns its slot, or -1 after 10 s. While it polls,
 * the device is asked for no interrupts (each would kick this vCPU out of the guest for
 * nothing); they are asked for only right before parking, and the ring is read once more
 * after asking, so a completion in between is not slept through (virtio drivers do the
 * same with their callbacks). */
static int reap(struct blk *b, u64 inflight)
{
	u64 polled_from = rdtsc(), deadline = polled_from + 10000 * tsc_per_ms;
	u64 window = (inflight > 1 ? idle_poll_many_us : idle_poll_us) * tsc_per_ms / 1000;
	int parked = 0;
	for (;;) {
		u16 idx = (u16)(b->used[0] >> 16);
		if (idx != b->used_seen) {
			barrier();
			u32 id = b->used[1 + 2 * (b->used_seen % b->qsize)];
			b->used_seen++;
			if (parked)
				b->avail[0] = 1;
			return (int)(id / 3);
		}
		if (rdtsc() > deadline) {
			if (parked)
				b->avail[0] = 1;
			return -1;
		}
		if (use_idle && rdtsc() - polled_from >= window) {
			if (!parked) {
				parked = 1;
				b->avail[0] = 0;
				__asm__ __volatile__("mfence" ::: "memory");
				continue; /* the ring once more, now that interrupts are on */
			}
			/* Parks until the device interrupts; the used ring is read again after. */
			if (inb(PORT_IDLE) == 0xff) {
				use_idle = 0;
				b->avail[0] = 1;
				parked = 0;
			}
		} else {
			__asm__ __volatile__("pause");
		}
	}
}

/* One request, synchronously; returns its virtio status, or -1 on a timeout. */
static int request(struct blk *b, u32 type, u64 sector, void *data, u32 len)
{
	submit(b, 0, type, sector, data, len);
	int k = reap(b, 1);
	if (k < 0) {
		printf("BLK dev=%u error=timeout type=%u sector=%lu\n", b->index, type, sector);
		return -1;
	}
	return b->slots[k].status;
}

static const char *status_name(int s)
{
	switch (s) {
	case S_OK:
		return "ok";
	case S_IOERR:
		return "ioerr";
	case S_UNSUPP:
		return "unsupp";
	case -1:
		return "timeout";
	default:
		return "bad-status";
	}
}

/* Writes the pattern over sectors [from, from+count) in io-sized requests, or reads them
 * (checking the pattern when `check`). */
static int pattern_io(struct blk *b, u64 seed, int write, u64 from, u64 count, u64 *buf, u64 io_sectors,
		      int check)
{
	for (u64 s = from; s < from + count; s += io_sectors) {
		u64 n = from + count - s < io_sectors ? from + count - s : io_sectors;
		if (write)
			pattern_fill(seed, s, buf, n);
		int st = request(b, write ? T_OUT : T_IN, s, buf, (u32)(n * SECTOR));
		if (st != S_OK) {
			printf("BLK dev=%u %s=%s sector=%lu\n", b->index, write ? "write" : "read", status_name(st),
			       s);
			return -1;
		}
		if (!write && check) {
			i64 bad = pattern_check(seed, s, buf, n);
			if (bad >= 0) {
				printf("BLK dev=%u verify=mismatch sector=%ld\n", b->index, bad);
				return -1;
			}
		}
	}
	return 0;
}

static int all_zero(const u64 *buf, u64 words)
{
	for (u64 i = 0; i < words; i++)
		if (buf[i])
			return 0;
	return 1;
}

/* 4 KiB random reads over the whole disk, blk_qd in flight, for blk_s seconds. */
static int randread(struct blk *b, u64 seed)
{
	u64 qd = arg_u64("blk_qd", 1), secs = arg_u64("blk_s", 5);
	if (qd < 1)
		qd = 1;
	if (qd > SLOTS || qd * 3 > b->qsize)
		qd = b->qsize / 3 < SLOTS ? b->qsize / 3 : SLOTS;
	u64 blocks = b->capacity / 8;
	if (!blocks) {
		printf("BLK dev=%u randread error=disk-smaller-than-4k\n", b->index);
		return -1;
	}
	u8 *bufs = alloc_pages(qd * 4096);
	u64 rng = seed, ops = 0, errors = 0;
	u64 t0 = rdtsc(), end = t0 + secs * 1000 * tsc_per_ms;
	for (unsigned k = 0; k < qd; k++)
		submit(b, k, T_IN, (splitmix64(&rng) % blocks) * 8, bufs + k * 4096, 4096);
	u64 inflight = qd;
	for (;;) {
		int k = reap(b, inflight);
		if (k < 0) {
			printf("BLK dev=%u randread error=timeout\n", b->index);
			return -1;
		}
		/* Every completion already there is resubmitted under one notification. */
		int done = 0;
		for (; k >= 0; k = reap_ready(b)) {
			inflight--;
			ops++;
			if (b->slots[k].status != S_OK)
				errors++;
			if (rdtsc() >= end)
				continue;
			queue_req(b, (unsigned)k, T_IN, (splitmix64(&rng) % blocks) * 8, bufs + (u64)k * 4096, 4096, 0);
			inflight++;
			done++;
		}
		if (done)
			kick(b);
		if (rdtsc() >= end)
			break;
	}
	for (; inflight; inflight--)
		if (reap(b, inflight) < 0)
			break;
	u64 ms = (rdtsc() - t0) / tsc_per_ms;
	printf("BLK dev=%u randread qd=%lu ops=%lu ms=%lu iops=%lu errors=%lu\n", b->index, qd, ops, ms,
	       ms ? ops * 1000 / ms : 0, errors);
	return errors ? -1 : 0;
}

/* The checks for one disk; prints one result line. Returns 0 when it passed. */
static int blk_check(struct blk *b, u64 seed)
{
	u64 kib = arg_u64("blk_kib", 256), io_kib = arg_u64("blk_io_kib", 64);
	u64 count = kib * 1024 / SECTOR, io = io_kib * 1024 / SECTOR;
	if (!io)
		io = 1;
	int ro = (b->features >> F_BLK_RO) & 1;
	int has_flush = (b->features >> F_BLK_FLUSH) & 1;
	int has_wz = (b->features >> F_BLK_WRITE_ZEROES) & 1;
	int has_discard = (b->features >> F_BLK_DISCARD) & 1;
	printf("BLK dev=%u capacity=%lu features=0x%lx ro=%d\n", b->index, b->capacity, b->features, ro);
	u64 *buf = alloc_pages(io * SECTOR);
	if (arg_is("blk", "randread", "none"))
		return randread(b, seed);
	if (count + 32 > b->capacity) {
		printf("BLK dev=%u result=fail reason=disk-too-small need=%lu\n", b->index, count + 32);
		return -1;
	}
	int write = arg_is("blk", "rw", "none") || arg_is("blk", "write", "none");
	int verify = arg_is("blk", "rw", "none") || arg_is("blk", "verify", "none");
	int read_only_read = 0;
	const char *wz = "skipped", *disc = "skipped", *fl = "skipped", *oob = "skipped";

	/* Past the end of the disk: the device must refuse, not wrap or crash. */
	int st = request(b, T_IN, b->capacity, buf, SECTOR);
	oob = st == S_IOERR ? "rejected" : "accepted";
	if (st != S_IOERR) {
		printf("BLK dev=%u result=fail reason=read-past-end status=%s\n", b->index, status_name(st));
		return -1;
	}
	if (ro && write) {
		pattern_fill(seed, 0, buf, 1);
		st = request(b, T_OUT, 0, buf, SECTOR);
		printf("BLK dev=%u ro-write=%s\n", b->index, st == S_IOERR ? "rejected" : status_name(st));
		if (st != S_IOERR)
			return -1;
		/* A read-only disk holds someone else's data: read it, check it only on request. */
		write = 0;
		verify = arg_is("blk", "verify", "none");
		read_only_read = !verify;
	}
	if (write) {
		if (pattern_io(b, seed, 1, 0, count, buf, io, 0))
			return -1;
		if (has_flush) {
			st = request(b, T_FLUSH, 0, NULL, 0);
			fl = status_name(st);
			if (st != S_OK)
				goto fail;
		}
	}
	if ((verify || read_only_read) && pattern_io(b, seed, 0, 0, count, buf, io, verify))
		return -1;
	if (write && has_wz) {
		/* Sectors [count, count+16): pattern, then write-zeroes, then read back zeros. */
		if (pattern_io(b, seed, 1, count, 16, buf, io, 0))
			return -1;
		st = request(b, T_WRITE_ZEROES, count, NULL, 16 * SECTOR);
		wz = status_name(st);
		if (st != S_OK)
			goto fail;
		memset(buf, 0xa5, 16 * SECTOR > io * SECTOR ? io * SECTOR : 16 * SECTOR);
		u64 n = 16 < io ? 16 : io;
		st = request(b, T_IN, count, buf, (u32)(n * SECTOR));
		if (st != S_OK || !all_zero(buf, n * SECTOR / 8)) {
			wz = "not-zero";
			goto fail;
		}
	}
	if (write && has_discard) {
		/* Sectors [count+16, count+32): pattern, then discard (contents then undefined). */
		if (pattern_io(b, seed, 1, count + 16, 16, buf, io, 0))
			return -1;
		st = request(b, T_DISCARD, count + 16, NULL, 16 * SECTOR);
		disc = status_name(st);
		if (st != S_OK)
			goto fail;
	}
	if (write && has_flush) {
		st = request(b, T_FLUSH, 0, NULL, 0);
		if (st != S_OK) {
			fl = status_name(st);
			goto fail;
		}
	}
	printf("BLK dev=%u result=ok sectors=%lu write=%s verify=%s flush=%s write_zeroes=%s discard=%s "
	       "read_past_end=%s\n",
	       b->index, count, write ? "ok" : "skipped", verify ? "ok" : read_only_read ? "read" : "skipped", fl,
	       wz, disc, oob);
	return 0;
fail:
	printf("BLK dev=%u result=fail flush=%s write_zeroes=%s discard=%s\n", b->index, fl, wz, disc);
	return -1;
}

int blk_run_all(const char *cl)
{
	if (arg_is("blk", "none", "none"))
		return 0;
	u64 seed = arg_u64("seed", 1);
	int failed = 0;
	unsigned n = 0;
	for (; n < 16; n++) {
		u64 base = virtio_mmio_base(cl, n);
		/* hostd lists the disks first and the network interfaces after them. */
		if (!base || mmio_read32(base + VM_DEVICE_ID) == VIRTIO_ID_NET)
			break;
		struct blk b = {.base = base, .index = n};
		if (blk_init(&b) || blk_check(&b, seed + n))
			failed = 1;
	}
	printf("BLK done devices=%u result=%s\n", n, failed || !n ? "fail" : "ok");
	return failed || !n;
}
