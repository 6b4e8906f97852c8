/*
 * Freestanding helpers: memory and string functions, the serial console, printf, a
 * PRNG, the command line, time and power control.
 */
#include "guest.h"

void *memset(void *d, int c, usize n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, usize n)
{
	u8 *dp = d;
	const u8 *sp = s;
	while (n--)
		*dp++ = *sp++;
	return d;
}

int memcmp(const void *a, const void *b, usize n)
{
	const u8 *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x < *y ? -1 : 1;
	return 0;
}

usize strlen(const char *s)
{
	usize n = 0;
	while (s[n])
		n++;
	return n;
}

int strncmp(const char *a, const char *b, usize n)
{
	for (; n; n--, a++, b++) {
		if (*a != *b)
			return (u8)*a < (u8)*b ? -1 : 1;
		if (!*a)
			return 0;
	}
	return 0;
}

/* ---------------------------------------------------------------------------------- */
/* Serial. The transmitter of an emulated 16550 is always ready, so the guest does not  */
/* poll the line status register: each byte costs one exit instead of two.              */

void putc(char c) { outb(PORT_SERIAL, (u8)c); }

void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

static char *fmt_u64(char *end, u64 v, unsigned base)
{
	const char *digits = "0123456789abcdef";
	*--end = 0;
	do {
		*--end = digits[v % base];
		v /= base;
	} while (v);
	return end;
}

void printf(const char *fmt, ...)
{
	__builtin_va_list ap;
	__builtin_va_start(ap, fmt);
	char num[24];
	for (const char *f = fmt; *f; f++) {
		if (*f != '%') {
			putc(*f);
			continue;
		}
		f++;
		char pad = ' ';
		unsigned width = 0, longs = 0;
		if (*f == '0') {
			pad = '0';
			f++;
		}
		while (*f >= '0' && *f <= '9')
			width = width * 10 + (unsigned)(*f++ - '0');
		while (*f == 'l') {
			longs++;
			f++;
		}
		const char *s = "";
		int neg = 0;
		switch (*f) {
		case 'c':
			putc((char)__builtin_va_arg(ap, int));
			continue;
		case 's':
			s = __builtin_va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			break;
		case 'd': {
			i64 v = longs ? __builtin_va_arg(ap, i64) : __builtin_va_arg(ap, int);
			if (v < 0) {
				neg = 1;
				v = -v;
			}
			s = fmt_u64(num + sizeof num, (u64)v, 10);
			break;
		}
		case 'u':
			s = fmt_u64(num + sizeof num,
				    longs ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, unsigned), 10);
			break;
		case 'x':
			s = fmt_u64(num + sizeof num,
				    longs ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, unsigned), 16);
			break;
		case 'p':
			puts("0x");
			s = fmt_u64(num + sizeof num, (u64)__builtin_va_arg(ap, void *), 16);
			break;
		case '%':
			putc('%');
			continue;
		default:
			putc('%');
			putc(*f);
			continue;
		}
		usize len = strlen(s) + (usize)neg;
		if (neg && pad == '0')
			putc('-');
		for (; width > len; width--)
			putc(pad);
		if (neg && pad != '0')
			putc('-');
		puts(s);
	}
	__builtin_va_end(ap);
}

/* ---------------------------------------------------------------------------------- */
/* splitmix64: the PRNG behind every pattern. The host's checkers implement the same    */
/* function, so both sides derive the same bytes from the same seed.                    */

u64 mix64(u64 z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
	return z ^ (z >> 31);
}

u64 splitmix64(u64 *state)
{
	*state += 0x9e3779b97f4a7c15UL;
	return mix64(*state);
}

/* ---------------------------------------------------------------------------------- */
/* Power. */

void poweroff(int status)
{
	outb(PORT_EXIT, (u8)status);
	/* A machine without the exit port: say so and spin (HLT would fault at CPL 3). */
	puts("GUEST poweroff port ignored; spinning\n");
	for (;;)
		__asm__ __volatile__("pause");
}

void reset(void)
{
	outb(PORT_I8042_CMD, 0xfe);
	puts("GUEST reset ignored; spinning\n");
	for (;;)
		__asm__ __volatile__("pause");
}

/* Ctrl-Alt-Del on the i8042 is the VMM's polite request to shut down: true once the   */
/* Del make code (0x53) has arrived. Each call costs a port read, so callers poll it     */
/* every few milliseconds, not in tight loops.                                           */
int shutdown_requested(void)
{
	int seen = 0;
	for (int i = 0; i < 16 && (inb(PORT_I8042_CMD) & 1); i++)
		if (inb(PORT_I8042_DATA) == 0x53)
			seen = 1;
	return seen;
}

/* ---------------------------------------------------------------------------------- */
/* Command line: space-separated words; "key=value" pairs are looked up by key. */

static const char *cmdline = "";

void cmdline_set(const char *c) { cmdline = c ? c : ""; }

const char *arg_str(const char *key, const char *dflt, usize *len)
{
	usize klen = strlen(key);
	const char *p = cmdline;
	while (*p) {
		while (*p == ' ')
			p++;
		const char *w = p;
		while (*p && *p != ' ')
			p++;
		if ((usize)(p - w) > klen && !strncmp(w, key, klen) && w[klen] == '=') {
			if (len)
				*len = (usize)(p - w) - klen - 1;
			return w + klen + 1;
		}
	}
	if (len)
		*len = dflt ? strlen(dflt) : 0;
	return dflt;
}

static int parse_u64(const char *s, usize n, u64 *out)
{
	u64 v = 0;
	unsigned base = 10;
	if (n > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
		n -= 2;
	}
	if (!n)
		return -1;
	for (; n; n--, s++) {
		unsigned d;
		if (*s >= '0' && *s <= '9')
			d = (unsigned)(*s - '0');
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = (unsigned)(*s - 'a' + 10);
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = (unsigned)(*s - 'A' + 10);
		else
			return -1;
		v = v * base + d;
	}
	*out = v;
	return 0;
}

u64 arg_u64(const char *key, u64 dflt)
{
	usize n;
	const char *s = arg_str(key, NULL, &n);
	u64 v;
	if (!s)
		return dflt;
	if (parse_u64(s, n, &v)) {
		printf("GUEST error bad-cmdline key=%s (not a number)\n", key);
		poweroff(EXIT_BAD_CMDLINE);
	}
	return v;
}

int arg_is(const char *key, const char *value, const char *dflt)
{
	usize n;
	const char *s = arg_str(key, dflt, &n);
	return s && n == strlen(value) && !strncmp(s, value, n);
}

/* ---------------------------------------------------------------------------------- */
/* Time. The TSC frequency comes from the hypervisor's timing leaf (0x40000010) when it  */
/* offers one, or is measured against PIT channel 2 (ports 0x42/0x43/0x61) over 10 ms.   */

u64 tsc_per_ms = 1000000;

static u16 pit_channel0_count(void)
{
	outb(0x43, 0x00); /* latch channel 0 */
	u8 lo = inb(0x40);
	return (u16)(lo | inb(0x40) << 8);
}

/* Counts `latch` ticks of PIT channel 0 (mode 2 from 0xffff, its gate always on). */
static void pit_channel0(u32 pit_hz, u32 latch)
{
	outb(0x43, 0x34); /* channel 0, lo/hi, mode 2 */
	outb(0x40, 0xff);
	outb(0x40, 0xff);
	u16 c0 = pit_channel0_count();
	u64 t0 = rdtsc(), ticks = 0;
	for (u64 spins = 0; ticks < latch; spins++) {
		if (spins > 10000000UL) {
			puts("GUEST tsc calibration: PIT channel 0 does not count; assuming 1 GHz\n");
			return;
		}
		ticks = (u16)(c0 - pit_channel0_count());
	}
	u64 t1 = rdtsc();
	tsc_per_ms = (t1 - t0) * pit_hz / (ticks * 1000);
	if (!tsc_per_ms)
		tsc_per_ms = 1;
	printf("GUEST tsc_khz=%lu source=pit0\n", tsc_per_ms);
}

void time_init(void)
{
	u32 a, b, c, d;
	cpuid(0x40000000, 0, &a, &b, &c, &d);
	if (a >= 0x40000010 && a < 0x40000100) {
		cpuid(0x40000010, 0, &a, &b, &c, &d);
		if (a) {
			tsc_per_ms = a;
			printf("GUEST tsc_khz=%u source=cpuid\n", a);
			return;
		}
	}
	const u32 pit_hz = 1193182, ms = 10, latch = pit_hz * ms / 1000;
	/* Port 0x61 (gate and output of channel 2) is the PC speaker's; a machine without one
	 * (QEMU's microvm) reads 0xff there, and channel 0 is read back instead. */
	if (inb(0x61) == 0xff) {
		pit_channel0(pit_hz, latch);
		return;
	}
	outb(0x61, (u8)((inb(0x61) & ~0x02) | 0x01)); /* gate on, speaker off */
	outb(0x43, 0xb0);                              /* channel 2, lo/hi, mode 0 */
	outb(0x42, (u8)(latch & 0xff));
	outb(0x42, (u8)(latch >> 8));
	u64 t0 = rdtsc();
	u64 spins = 0;
	while (!(inb(0x61) & 0x20)) {
		if (++spins > 100000000UL) {
			puts("GUEST tsc calibration: PIT channel 2 never fired; assuming 1 GHz\n");
			return;
		}
	}
	u64 t1 = rdtsc();
	tsc_per_ms = (t1 - t0) / ms;
	if (!tsc_per_ms)
		tsc_per_ms = 1;
	printf("GUEST tsc_khz=%lu source=pit\n", tsc_per_ms);
}
