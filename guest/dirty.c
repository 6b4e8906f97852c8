/*
 * Heartbeat and memory dirtier.
 *
 * Every hb_ms the guest prints "HB seq=N ms=T sum=S writes=W bad=B". S is a running
 * checksum: sum(0) = seed, sum(n) = mix64(sum(n-1) ^ (n * 0x9e3779b97f4a7c15)), so a host
 * that sees seq N can recompute the only correct S; a guest whose memory or registers
 * went back in time (a lost page, a stale vCPU state after a migration) prints a sum
 * that does not match its seq.
 *
 * Between heartbeats it rewrites whole pages of a region of dirty_mib MiB, cycling
 * through it at dirty_mib_s MiB/s. Page p at generation g holds the words
 * mix64(seed ^ (p << 32) ^ g) + i; the generations live in an array beside the region.
 * Each heartbeat re-reads the whole region against the generations; B counts the pages
 * that did not match since boot, and must stay 0.
 */
#include "guest.h"

#define PAGE 4096
#define WORDS (PAGE / 8)

static u64 seed;

static inline u64 page_base_word(u64 p, u64 gen) { return mix64(seed ^ (p << 32) ^ gen); }

static void page_fill(u64 *page, u64 p, u64 gen)
{
	u64 b = page_base_word(p, gen);
	for (u64 i = 0; i < WORDS; i++)
		page[i] = b + i;
}

static int page_check(const u64 *page, u64 p, u64 gen)
{
	u64 b = page_base_word(p, gen);
	for (u64 i = 0; i < WORDS; i++)
		if (page[i] != b + i)
			return 0;
	return 1;
}

int heartbeat_run(void)
{
	seed = arg_u64("seed", 1);
	u64 hb_ms = arg_u64("hb_ms", 100);
	u64 hb_count = arg_u64("hb_count", 0);
	u64 rate_mib_s = arg_u64("dirty_mib_s", 0);
	u64 region_mib = arg_u64("dirty_mib", rate_mib_s ? 16 : 0);
	u64 catchup = arg_u64("dirty_catchup", 1);
	if (!hb_ms)
		hb_ms = 1;
	u64 pages = region_mib * (1024 * 1024 / PAGE);
	u64 *region = pages ? alloc_pages(pages * PAGE) : NULL;
	u64 *gens = pages ? alloc_pages(pages * sizeof(u64)) : NULL;
	for (u64 p = 0; p < pages; p++) {
		gens[p] = 0;
		page_fill(region + p * WORDS, p, 0);
	}
	printf("GUEST heartbeat hb_ms=%lu dirty_mib=%lu dirty_mib_s=%lu seed=%lu\n", hb_ms, region_mib,
	       rate_mib_s, seed);

	u64 start = now_ms(), next_hb = start + hb_ms;
	u64 seq = 0, sum = seed, writes = 0, due = 0, cursor = 0, bad = 0;
	u64 pages_per_s = rate_mib_s * (1024 * 1024 / PAGE);
	for (;;) {
		u64 now = now_ms();
		if (pages) {
			due = (now - start) * pages_per_s / 1000;
			/* After a long pause do not rewrite the region many times over at once;
			 * with dirty_catchup=0 not even once: time the vCPU did not get is work
			 * not done, as for a guest whose work is bound by its CPU. */
			u64 slack = catchup ? pages : pages_per_s / 1000 + 1;
			if (due > writes + slack)
				writes = due - slack;
			while (writes < due) {
				gens[cursor]++;
				page_fill(region + cursor * WORDS, cursor, gens[cursor]);
				cursor = cursor + 1 == pages ? 0 : cursor + 1;
				writes++;
			}
		}
		if (now >= next_hb) {
			for (u64 p = 0; p < pages; p++) {
				if (!page_check(region + p * WORDS, p, gens[p])) {
					if (!bad)
						printf("GUEST memory-mismatch page=%lu gen=%lu\n", p, gens[p]);
					bad++;
				}
			}
			seq++;
			sum = mix64(sum ^ (seq * 0x9e3779b97f4a7c15UL));
			printf("HB seq=%lu ms=%lu sum=%016lx writes=%lu bad=%lu\n", seq, now - start, sum, writes,
			       bad);
			next_hb = now + hb_ms;
			if (hb_count && seq >= hb_count)
				break;
			if (shutdown_requested()) {
				puts("GUEST shutdown requested\n");
				return bad ? -1 : 1;
			}
		}
		__asm__ __volatile__("pause");
	}
	return bad ? -1 : 0;
}
