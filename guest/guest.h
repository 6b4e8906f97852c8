/*
 * The test guest's shared declarations: fixed-width types, port I/O, the serial console,
 * a small printf, the command line and the host-facing exit codes.
 *
 * Everything here runs at CPL 3 with IOPL 3, so IN/OUT are allowed and HLT is not.
 */
#ifndef GUEST_H
#define GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;
typedef unsigned long usize;

#define NULL ((void *)0)
#define barrier() __asm__ __volatile__("" ::: "memory")

/* Ports. */
#define PORT_SERIAL 0x3f8
/* Debug-exit port: a write of v powers the machine off with status v. QEMU's
 * isa-debug-exit (iobase=0xf4) understands it too, exiting with (v << 1) | 1. */
#define PORT_EXIT 0xf4
#define PORT_I8042_CMD 0x64
#define PORT_I8042_DATA 0x60
/* hostd's idle port: a read parks this vCPU until an interrupt (HLT at CPL 3 faults) and
 * reads 1 (woken) or 0 (timed out); a VMM without it (QEMU) reads 0xff. */
#define PORT_IDLE 0x4f0

/* Exit statuses the guest reports through PORT_EXIT. */
#define EXIT_OK 0
#define EXIT_BLK_FAILED 1
#define EXIT_MEMORY_FAILED 2
#define EXIT_BAD_CMDLINE 3
#define EXIT_FAULT 4
#define EXIT_NET_FAILED 5

static inline void outb(u16 port, u8 v) { __asm__ __volatile__("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ __volatile__("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)addr; }

/* virtio-mmio (version 2) registers, status bits and split-ring descriptors, shared by
 * the block and network drivers. */
#define VM_MAGIC 0x000
#define VM_VERSION 0x004
#define VM_DEVICE_ID 0x008
#define VM_DEVICE_FEATURES 0x010
#define VM_DEVICE_FEATURES_SEL 0x014
#define VM_DRIVER_FEATURES 0x020
#define VM_DRIVER_FEATURES_SEL 0x024
#define VM_QUEUE_SEL 0x030
#define VM_QUEUE_NUM_MAX 0x034
#define VM_QUEUE_NUM 0x038
#define VM_QUEUE_READY 0x044
#define VM_QUEUE_NOTIFY 0x050
#define VM_INTERRUPT_STATUS 0x060
#define VM_INTERRUPT_ACK 0x064
#define VM_STATUS 0x070
#define VM_QUEUE_DESC_LOW 0x080
#define VM_QUEUE_DESC_HIGH 0x084
#define VM_QUEUE_DRIVER_LOW 0x090
#define VM_QUEUE_DRIVER_HIGH 0x094
#define VM_QUEUE_DEVICE_LOW 0x0a0
#define VM_QUEUE_DEVICE_HIGH 0x0a4
#define VM_CONFIG 0x100

#define STATUS_ACK 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8

#define F_VERSION_1 32
#define DESC_NEXT 1
#define DESC_WRITE 2
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2

struct desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

/* The base of the n-th "virtio_mmio.device=<size>@<base>:<irq>" word, or 0. */
u64 virtio_mmio_base(const char *cl, unsigned n);

/* lib.c */
void *memset(void *d, int c, usize n);
void *memcpy(void *d, const void *s, usize n);
int memcmp(const void *a, const void *b, usize n);
usize strlen(const char *s);
int strncmp(const char *a, const char *b, usize n);
void putc(char c);
void puts(const char *s);
void printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
u64 splitmix64(u64 *state);
u64 mix64(u64 x);
__attribute__((noreturn)) void poweroff(int status);
__attribute__((noreturn)) void reset(void);
int shutdown_requested(void);

/* Time: TSC ticks per millisecond, set by time_init(). */
extern u64 tsc_per_ms;
void time_init(void);
static inline u64 now_ms(void) { return rdtsc() / tsc_per_ms; }

/* The command line: "key=value" words. */
const char *arg_str(const char *key, const char *dflt, usize *len);
u64 arg_u64(const char *key, u64 dflt);
int arg_is(const char *key, const char *value, const char *dflt);

/* Memory the guest may use for its buffers (above its image), bump-allocated. */
void *alloc_pages(usize bytes);
extern u64 heap_start, heap_end;

/* virtio_blk.c: returns 0 when every device passed. */
int blk_run_all(const char *cmdline);

/* virtio_net.c: 0 when there was nothing to do or it went well, 1 when it stopped for a
 * shutdown request, -1 when it failed. */
int net_run(const char *cmdline);

/* dirty.c: 0 when every heartbeat was clean, 1 when it stopped for a shutdown request. */
int heartbeat_run(void);

#endif
