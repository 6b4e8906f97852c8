/*
 * The test guest's CPL 3 main: reads the PVH start info, fills the IDT, and runs what the
 * command line asks for (see README.md for the words and the output lines).
 */
#include "guest.h"

#define GUEST_VERSION 1

struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr;
	u32 memmap_entries;
	u32 reserved;
};

struct hvm_memmap_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
};

#define HVM_START_MAGIC 0x336ec578
#define E820_RAM 1
/* The boot page tables map the low 4 GiB; the guest uses nothing above. */
#define MAPPED_LIMIT 0x100000000UL

extern u8 idt[];
extern const u64 exc_stubs[22];
extern u8 _end[];
void cmdline_set(const char *c);

u64 heap_start, heap_end;

/* IDT gates: present, DPL 0, 64-bit interrupt gate, kernel code selector. Filled here at
 * CPL 3 because the table lives in user-accessible memory; start.S only loaded IDTR. */
static void idt_fill(void)
{
	for (unsigned v = 0; v < 22; v++) {
		u64 off = exc_stubs[v];
		u8 *g = idt + v * 16;
		g[0] = (u8)off;
		g[1] = (u8)(off >> 8);
		g[2] = 0x08;
		g[3] = 0;
		g[4] = 0;
		g[5] = 0x8e;
		g[6] = (u8)(off >> 16);
		g[7] = (u8)(off >> 24);
		*(u32 *)(g + 8) = (u32)(off >> 32);
		*(u32 *)(g + 12) = 0;
	}
}

/* Entered at CPL 3 from the exception stub in start.S. */
__attribute__((noreturn)) void user_fault(u64 vector, u64 error, u64 rip, u64 cs)
{
	printf("GUEST fault vector=%lu error=0x%lx rip=0x%lx cs=0x%lx\n", vector, error, rip, cs);
	poweroff(EXIT_FAULT);
}

void *alloc_pages(usize bytes)
{
	u64 p = (heap_start + 4095) & ~4095UL;
	bytes = (bytes + 4095) & ~4095UL;
	if (p + bytes > heap_end) {
		printf("GUEST error out-of-memory want=%lu have=%lu\n", bytes, heap_end - p);
		poweroff(EXIT_MEMORY_FAILED);
	}
	heap_start = p + bytes;
	return (void *)p;
}

static void memory_init(const struct hvm_start_info *si)
{
	u64 image_end = ((u64)_end + 4095) & ~4095UL;
	const struct hvm_memmap_entry *m = (const void *)si->memmap_paddr;
	u64 total = 0;
	heap_start = heap_end = image_end;
	for (u32 i = 0; si->version >= 1 && i < si->memmap_entries; i++) {
		if (m[i].type != E820_RAM)
			continue;
		total += m[i].size;
		u64 end = m[i].addr + m[i].size;
		if (m[i].addr <= image_end && end > image_end)
			heap_end = end < MAPPED_LIMIT ? end : MAPPED_LIMIT;
	}
	printf("GUEST memory total=%lu heap=0x%lx-0x%lx\n", total, heap_start, heap_end);
}

static __attribute__((noreturn)) void triple_fault(void)
{
	/* With every gate not present, #UD escalates to #NP, then #DF, then shutdown. */
	memset(idt, 0, 4096);
	__asm__ __volatile__("ud2");
	for (;;)
		;
}

static __attribute__((noreturn)) void finish(int status)
{
	usize n;
	const char *then = arg_str("then", "poweroff", &n);
	printf("GUEST done status=%d then=", status);
	for (usize i = 0; i < n; i++)
		putc(then[i]);
	putc('\n');
	if (arg_is("then", "reset", "poweroff"))
		reset();
	if (arg_is("then", "spin", "poweroff")) {
		for (u64 next = now_ms();;) {
			if (now_ms() >= next) {
				if (shutdown_requested()) {
					puts("GUEST shutdown requested\n");
					poweroff(status);
				}
				next = now_ms() + 10;
			}
			__asm__ __volatile__("pause");
		}
	}
	if (arg_is("then", "echo", "poweroff")) {
		/* Console input, a line at a time, echoed back as "ECHO <line>". */
		char line[128];
		usize n = 0;
		for (u64 next = now_ms();;) {
			while (inb(PORT_SERIAL + 5) & 1) {
				char c = (char)inb(PORT_SERIAL);
				if (c == '\r' || c == '\n') {
					line[n] = 0;
					if (n)
						printf("ECHO %s\n", line);
					n = 0;
				} else if (n < sizeof line - 1) {
					line[n++] = c;
				}
			}
			if (now_ms() >= next) {
				if (shutdown_requested())
					poweroff(status);
				next = now_ms() + 10;
			}
			for (int i = 0; i < 1000; i++)
				__asm__ __volatile__("pause");
		}
	}
	if (arg_is("then", "triple-fault", "poweroff"))
		triple_fault();
	if (arg_is("then", "fault", "poweroff"))
		__asm__ __volatile__("ud2");
	if (arg_is("then", "bad-mmio", "poweroff")) {
		/* A write far from any device and any RAM: the VMM must survive it. */
		mmio_write32(0xfe000000UL, 0xdeadbeef);
		(void)mmio_read32(0xfe000000UL);
		puts("GUEST bad-mmio survived\n");
	}
	poweroff(status);
}

__attribute__((noreturn)) void guest_main(const struct hvm_start_info *si)
{
	idt_fill();
	const char *cl = "";
	if (si && si->magic == HVM_START_MAGIC && si->cmdline_paddr)
		cl = (const char *)si->cmdline_paddr;
	cmdline_set(cl);
	printf("GUEST start version=%d cmdline=\"%s\"\n", GUEST_VERSION, cl);
	if (!si || si->magic != HVM_START_MAGIC) {
		puts("GUEST error no-pvh-start-info\n");
		poweroff(EXIT_BAD_CMDLINE);
	}
	memory_init(si);
	time_init();

	int status = EXIT_OK;
	if (blk_run_all(cl))
		status = EXIT_BLK_FAILED;
	int net = net_run(cl);
	if (net < 0 && !status)
		status = EXIT_NET_FAILED;
	if (net == 1) {
		printf("GUEST done status=%d then=poweroff\n", status);
		poweroff(status);
	}
	if (arg_is("mode", "heartbeat", "once")) {
		int hb = heartbeat_run();
		if (hb < 0 && !status)
			status = EXIT_MEMORY_FAILED;
		if (hb == 1) {
			printf("GUEST done status=%d then=poweroff\n", status);
			poweroff(status);
		}
	}
	finish(status);
}
