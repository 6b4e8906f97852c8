/*
 * Entry of the test guest: the PVH note, the 32-bit entry, the switch to long mode, and
 * the drop to CPL 3.
 *
 * Port I/O at CPL 3 is allowed by the TSS I/O permission bitmap (all ports open), not by
 * IOPL: PVM hosts do not let a guest return to CPL 3 with IOPL 3, but they honour the
 * bitmap. RFLAGS still asks for IOPL 3, which real KVM and QEMU grant.
 *
 * Everything here runs at CPL 0, which a PVM host emulates one instruction at a time
 * (about 2 us each), so the work is kept to a few dozen instructions: the page tables,
 * GDT and TSS are static data; the IDT's contents are filled later, at CPL 3, by
 * idt_fill() in main.c (the table is in user-accessible memory; only LIDT needs CPL 0).
 *
 * Exceptions from CPL 3 enter a stub below at CPL 0 that does nothing but build an IRET
 * frame back to CPL 3, into user_fault(vector, error, rip, cs), which reports the fault
 * on the serial port at native speed.
 */

#define XEN_ELFNOTE_PHYS32_ENTRY 18

#define SEL_KCODE  0x08
#define SEL_KDATA  0x10
#define SEL_UDATA  0x18
#define SEL_UCODE  0x20
#define SEL_TSS    0x28

/* RFLAGS at CPL 3: IOPL 3 (port I/O allowed), IF 0 (the guest polls), bit 1 reserved. */
#define USER_RFLAGS 0x3002

/* ------------------------------------------------------------------------------------ */
/* The PVH note: the VMM (or QEMU) enters at pvh_start in 32-bit protected mode, paging  */
/* off, with %ebx holding the physical address of struct hvm_start_info.                 */

        .section .note.pvh, "a"
        .p2align 2
        .long 4                 /* namesz: "Xen\0" */
        .long 8                 /* descsz */
        .long XEN_ELFNOTE_PHYS32_ENTRY
        .asciz "Xen"
        .p2align 2
        .quad pvh_start

/* ------------------------------------------------------------------------------------ */
        .section .text.boot, "ax"
        .code32
        .globl pvh_start
pvh_start:
        mov     %ebx, %esi                      /* keep start_info for main */
        lgdt    gdt_ptr
        mov     %cr4, %eax
        or      $0x20, %eax                     /* PAE */
        mov     %eax, %cr4
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     $0xc0000080, %ecx               /* EFER */
        rdmsr
        or      $0x100, %eax                    /* LME */
        wrmsr
        mov     %cr0, %eax
        or      $0x80000001, %eax               /* PG | PE */
        mov     %eax, %cr0
        ljmp    $SEL_KCODE, $long_entry

        .code64
long_entry:
        mov     $SEL_KDATA, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %eax, %fs
        mov     %eax, %gs
        mov     $kstack_top, %rsp

        /* The TSS descriptor's base, split across the descriptor as the CPU wants it. */
        mov     $tss, %eax
        mov     %ax, gdt_tss + 2
        shr     $16, %eax
        mov     %al, gdt_tss + 4
        mov     %ah, gdt_tss + 7
        mov     $SEL_TSS, %eax
        ltr     %ax
        lidt    idt_ptr

        /* IRET to CPL 3: main(start_info) with IOPL 3. */
        mov     %rsi, %rdi
        pushq   $(SEL_UDATA | 3)
        pushq   $ustack_top
        pushq   $USER_RFLAGS
        pushq   $(SEL_UCODE | 3)
        pushq   $user_start
        iretq

/* ------------------------------------------------------------------------------------ */
/* Exception stubs. Each pushes a dummy error code where the CPU pushes none, then its   */
/* vector; idt_fill() points the IDT at them through the exc_stubs table.               */

        .macro EXC_NOERR vec
exc_\vec:
        pushq   $0
        pushq   $\vec
        jmp     exc_common
        .endm
        .macro EXC_ERR vec
exc_\vec:
        pushq   $\vec
        jmp     exc_common
        .endm

        EXC_NOERR 0
        EXC_NOERR 1
        EXC_NOERR 2
        EXC_NOERR 3
        EXC_NOERR 4
        EXC_NOERR 5
        EXC_NOERR 6
        EXC_NOERR 7
        EXC_ERR   8
        EXC_NOERR 9
        EXC_ERR   10
        EXC_ERR   11
        EXC_ERR   12
        EXC_ERR   13
        EXC_ERR   14
        EXC_NOERR 15
        EXC_NOERR 16
        EXC_ERR   17
        EXC_NOERR 18
        EXC_NOERR 19
        EXC_NOERR 20
        EXC_ERR   21

exc_common:
        pop     %rdi                            /* vector */
        pop     %rsi                            /* error code */
        mov     0(%rsp), %rdx                   /* faulting rip */
        mov     8(%rsp), %rcx                   /* faulting cs */
        mov     $kstack_top, %rsp               /* the fault path never returns */
        pushq   $(SEL_UDATA | 3)
        pushq   $fstack_top
        pushq   $USER_RFLAGS
        pushq   $(SEL_UCODE | 3)
        pushq   $user_fault
        iretq

/* ------------------------------------------------------------------------------------ */
/* CPL 3 entry: a C call frame, then main; main never returns. */

        .text
user_start:
        xor     %ebp, %ebp
        and     $-16, %rsp
        call    guest_main
1:      jmp     1b

        .section .rodata
        .globl exc_stubs
        .p2align 3
exc_stubs:
        .quad exc_0, exc_1, exc_2, exc_3, exc_4, exc_5, exc_6, exc_7
        .quad exc_8, exc_9, exc_10, exc_11, exc_12, exc_13, exc_14, exc_15
        .quad exc_16, exc_17, exc_18, exc_19, exc_20, exc_21

/* ------------------------------------------------------------------------------------ */
        .data
        .p2align 4
gdt:
        .quad 0
        .quad 0x00af9a000000ffff                /* 0x08 kernel code, 64-bit */
        .quad 0x00cf92000000ffff                /* 0x10 kernel data */
        .quad 0x00cff2000000ffff                /* 0x18 user data, DPL 3 */
        .quad 0x00affa000000ffff                /* 0x20 user code, 64-bit, DPL 3 */
gdt_tss:
        .quad 0x0000890000002068                /* 0x28 TSS, 104 bytes + I/O bitmap; base set at boot */
        .quad 0
gdt_end:
gdt_ptr:
        .word gdt_end - gdt - 1
        .quad gdt

        .p2align 4
idt_ptr:
        .word 32 * 16 - 1
        .quad idt

        .p2align 4
tss:
        .long 0
        .quad kstack_top                        /* rsp0 */
        .fill 104 - 12 - 2, 1, 0
        .word 104                               /* I/O bitmap right after the TSS */
        .fill 8192, 1, 0                        /* every port allowed */
        .byte 0xff

/* Identity map of the low 4 GiB with 2 MiB pages, user-accessible (this is a test      */
/* guest: its CPL 3 code owns the machine). Covers RAM below the MMIO hole and the       */
/* virtio-mmio windows.                                                                   */
        .p2align 12
pml4:
        .quad pdpt + 0x7
        .fill 511, 8, 0
pdpt:
        .quad pd + 0x0000 + 0x7
        .quad pd + 0x1000 + 0x7
        .quad pd + 0x2000 + 0x7
        .quad pd + 0x3000 + 0x7
        .fill 508, 8, 0
pd:
        .set addr, 0
        .rept 2048
        .quad addr + 0x87                       /* P | RW | US | PS */
        .set addr, addr + 0x200000
        .endr

        .bss
        .p2align 12
        .globl idt
idt:
        .skip 4096
kstack:
        .skip 4096
kstack_top:
fstack:
        .skip 16384
fstack_top:
ustack:
        .skip 65536
ustack_top:
