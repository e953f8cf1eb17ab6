/*
 * The whole ring-0 part of the probe (AT&T syntax, assembled by rustc's
 * global_asm!).  On the nested KVM we test on, ring-0 code is emulated at
 * roughly 2 us per instruction, so every instruction here is paid for:
 *
 *   entries:  print "PROBE hello", enter long mode on the static page tables,
 *             load GDT/IDT/TSS, mask the 8259s, iretq to ring 3 (~55 insns).
 *   handlers: exception stubs that print "PROBE fault ..." and power off,
 *             a shared iretq handler for vectors 32..255, and the ud2-based
 *             service gate that ring 3 uses for the few privileged things.
 *   APs:      a real-mode trampoline (copied below 1 MiB by ring 3) and the
 *             32/64-bit code that records the AP's APIC id and halts; an NMI
 *             handler through which ring 3 reaches another CPU's APIC.
 *
 * Everything else is Rust in ring 3.  The GDT, IDT, TSS and page tables are
 * assembled as data (zero instructions to build them): the `.boot` section is
 * linked at exactly IMAGE_BASE (link.ld asserts it), so the split address
 * fields of IDT gates and the TSS descriptor are assembly-time constants.
 */

.set IMAGE_BASE,    0x100000
.set SEL_KCODE64,   0x08
.set SEL_KDATA,     0x10
.set SEL_KCODE32,   0x18
.set SEL_UDATA,     0x23            /* GDT index 4, RPL 3 */
.set SEL_UCODE64,   0x2b            /* GDT index 5, RPL 3 */
.set SEL_TSS,       0x30
.set COM1,          0x3f8
.set CR0_VALUE,     0x80000023      /* PG | NE | MP | PE; EM and TS clear (SSE) */
.set CR4_VALUE,     0x620           /* PAE | OSFXSR | OSXMMEXCPT */
.set MSR_EFER,      0xc0000080
.set EFER_LME,      0x100
.set RFLAGS_USER,   0x202           /* IF; the IOPB (not IOPL) grants port I/O */
.set IOPB_SIZE,     8192
.set TSS_LIMIT,     104 + IOPB_SIZE /* includes the 0xff terminator byte */
.set SVC_MAGIC,     0x6b696c6e      /* "kiln": %rax value that marks a service ud2 */
.set AP_IDS_MAX,    4096            /* must match smp::AP_IDS_MAX */
.set AP_NMI_STACKS, 256             /* must match ring0::AP_NMI_STACKS */
.set AP_NMI_STACK,  128             /* bytes: the NMI frame and three registers */
.set MSR_APIC_BASE, 0x1b

/*
 * (IMAGE_BASE + (label - boot_start)) is the absolute address of a label in
 * .boot as an assembly-time constant, usable in split bit fields.
 */

/* "PROBE hello\n" with nothing but immediates: the benchmark's first line. */
.macro HELLO
    mov $COM1, %dx
    .irp c, 'P', 'R', 'O', 'B', 'E', ' ', 'h', 'e', 'l', 'l', 'o', 10
    mov $\c, %al
    out %al, %dx
    .endr
.endm

.section .boot, "awx"
.global boot_start
boot_start:

/*
 * PVH entry (XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected mode, paging off,
 * flat segments, %ebx = physical address of struct hvm_start_info.
 */
.code32
.global pvh_entry
pvh_entry:
    HELLO
    lgdt gdtr
    mov $CR4_VALUE, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov $CR0_VALUE, %eax
    mov %eax, %cr0
    mov %ebx, %esi                  /* boot info pointer */
    xor %edi, %edi                  /* entry kind 0: PVH */
    ljmp $SEL_KCODE64, $common64

/*
 * Linux 64-bit boot protocol entry (ELF e_entry): long mode on the VMM's
 * identity page tables, interrupts off, %rsi = struct boot_params.
 */
.code64
.global linux64_entry
linux64_entry:
    HELLO
    lgdt gdtr(%rip)
    mov $pml4, %eax
    mov %rax, %cr3
    mov $CR4_VALUE, %eax
    mov %rax, %cr4
    mov $CR0_VALUE, %eax
    mov %rax, %cr0
    mov $1, %edi                    /* entry kind 1: Linux 64-bit */
    ljmpl *common64_ptr(%rip)       /* reload %cs from our GDT */

common64:
    mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $stack0_top, %esp
    lidt idtr(%rip)
    mov $SEL_TSS, %eax
    ltr %ax
    mov $0xff, %al                  /* mask both 8259s: ring 3 runs with IF=1 */
    out %al, $0x21
    out %al, $0xa1
    pushq $SEL_UDATA
    pushq $stack3_top
    pushq $RFLAGS_USER
    pushq $SEL_UCODE64
    pushq $ring3_entry
    iretq                           /* %edi = entry kind, %rsi = boot info */

.p2align 3
common64_ptr:
    .long (IMAGE_BASE + (common64 - boot_start))
    .word SEL_KCODE64

/*
 * Exception stubs for vectors 0..31, 16 bytes apart (the IDT below relies on
 * it).  Each leaves [vector, error code, rip, cs, rflags, rsp, ss] on the
 * stack; #UD goes to the service gate first.
 */
.p2align 4
exc_stubs:
.set vec, 0
.rept 32
    .p2align 4
    .if vec == 6
    jmp ud_handler
    .elseif vec == 2
    jmp nmi_handler
    .elseif vec == 8 || (vec >= 10 && vec <= 14) || vec == 17 || vec == 21 || vec == 29 || vec == 30
    pushq $vec
    jmp fault_common
    .else
    pushq $0
    pushq $vec
    jmp fault_common
    .endif
    .set vec, vec + 1
.endr

/* Vectors 32..255: nothing should arrive (PICs masked, no timers armed). */
irq_handler:
    push %rax
    movabs $0xfee000b0, %rax        /* xAPIC EOI; harmless if nothing is in service */
    movl $0, (%rax)
    pop %rax
    iretq

/*
 * NMI: another CPU's ring 3 posted an access to this CPU's local APIC in
 * PROBE_APIC_CALL (op 1 read, 2 write; reg = xAPIC offset, also in x2APIC
 * mode) and sent this CPU an NMI.  The result (the value read, or written)
 * goes to .value, then op back to 0.  With no call posted an NMI is a fault.
 */
nmi_handler:
    cmpl $0, PROBE_APIC_CALL(%rip)
    jne 1f
    pushq $0
    pushq $2
    jmp fault_common
1:  push %rax
    push %rcx
    push %rdx
    mov $MSR_APIC_BASE, %ecx
    rdmsr
    mov PROBE_APIC_CALL+4(%rip), %ecx
    test $0x400, %eax               /* x2APIC mode? */
    jnz 3f
    and $0xfffff000, %eax           /* xAPIC page (below 4 GiB, identity mapped) */
    add %rcx, %rax
    mov PROBE_APIC_CALL+8(%rip), %edx
    cmpl $2, PROBE_APIC_CALL(%rip)
    jne 2f
    mov %edx, (%rax)
    mov %edx, %eax
    jmp 5f
2:  mov (%rax), %eax
    jmp 5f
3:  shr $4, %ecx
    add $0x800, %ecx
    cmpl $2, PROBE_APIC_CALL(%rip)
    je 4f
    rdmsr
    jmp 5f
4:  mov PROBE_APIC_CALL+8(%rip), %eax
    xor %edx, %edx
    wrmsr
5:  mov %eax, PROBE_APIC_CALL+8(%rip)
    movl $0, PROBE_APIC_CALL(%rip)
    pop %rdx
    pop %rcx
    pop %rax
    iretq

/*
 * ud2 service gate.  Ring 3 cannot use `int $n` here, so it executes ud2 with
 * %rax = SVC_MAGIC, %rdi = service, %rsi/%rdx = arguments; the result is in
 * %rax.  Services: 0 power off (then halt), 1 rdmsr(%esi), 2 wrmsr(%esi, %rdx),
 * 3 cpuid(%esi, %edx) -> eax, ebx in %esi, ecx, edx, 4 triple fault.  CPUID must run here:
 * executed in ring 3 on the nested KVM it is not intercepted and returns the
 * host's values (its APIC id, its leaves), not the VM's.
 */
ud_handler:
    cmp $SVC_MAGIC, %rax
    jne 9f
    test %edi, %edi
    jz r0_poweroff
    cmp $4, %edi
    je r0_triple_fault
    cmp $3, %edi
    jne 1f
    mov %esi, %eax
    mov %edx, %ecx
    mov %rbx, %rsi
    cpuid
    xchg %rbx, %rsi                 /* restore %rbx; ebx result in %esi */
    jmp 3f
1:  mov %esi, %ecx
    cmp $1, %edi
    jne 2f
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    jmp 3f
2:  cmp $2, %edi
    jne 9f
    mov %edx, %eax
    shr $32, %rdx
    wrmsr
3:  addq $2, (%rsp)                 /* skip the ud2 */
    iretq
9:  pushq $0
    pushq $6
    /* fall through */

/* Print "PROBE fault vector=<n> rip=0x.. err=0x.. cr2=0x..", then power off. */
fault_common:
    cmpb $0, fault_active(%rip)
    jne halt_forever                /* a fault while reporting a fault */
    movb $1, fault_active(%rip)
    lea msg_fault(%rip), %rsi
    call r0_puts
    mov (%rsp), %eax
    mov $10, %cl
    div %cl                         /* vector < 32: al = tens, ah = ones */
    mov $COM1, %dx
    test %al, %al
    jz 1f
    add $'0', %al
    out %al, %dx
1:  mov %ah, %al
    add $'0', %al
    out %al, %dx
    lea msg_rip(%rip), %rsi
    call r0_puts
    mov 16(%rsp), %rax
    call r0_puthex
    lea msg_err(%rip), %rsi
    call r0_puts
    mov 8(%rsp), %rax
    call r0_puthex
    lea msg_cr2(%rip), %rsi
    call r0_puts
    mov %cr2, %rax
    call r0_puthex
    mov $10, %al
    out %al, %dx
    /* fall through */

/*
 * Power off with the method ring 3 found in ACPI (PROBE_POWEROFF, see
 * acpi.rs): kind 1 = 16-bit port, 2 = 8-bit port, 3 = 16-bit MMIO,
 * 4 = 8-bit MMIO; 0 = unknown.  Then halt.
 */
r0_poweroff:
    mov PROBE_POWEROFF(%rip), %eax
    mov PROBE_POWEROFF+8(%rip), %rdx
    mov PROBE_POWEROFF+16(%rip), %ecx
    cmp $1, %eax
    jne 1f
    mov %ecx, %eax
    out %ax, %dx
    jmp halt_forever
1:  cmp $2, %eax
    jne 2f
    mov %ecx, %eax
    out %al, %dx
    jmp halt_forever
2:  cmp $3, %eax
    jne 3f
    mov %cx, (%rdx)
    jmp halt_forever
3:  cmp $4, %eax
    jne halt_forever
    mov %cl, (%rdx)
halt_forever:
    cli
    hlt
    jmp halt_forever

/* Print the NUL-terminated string at %rsi.  Clobbers %rax, %rdx, %rsi. */
r0_puts:
    mov $COM1, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  ret

/* Print %rax in hex without leading zeros.  Clobbers %rax, %rcx, %rdx, %r8. */
r0_puthex:
    mov %rax, %r8
    mov $COM1, %dx
    mov $60, %ecx
1:  mov %r8, %rax                   /* skip leading zero digits */
    shr %cl, %rax
    and $0xf, %eax
    jnz 2f
    sub $4, %ecx
    jnz 1b
2:  mov %r8, %rax
    shr %cl, %rax
    and $0xf, %eax
    cmp $10, %al
    jb 3f
    add $('a' - '0' - 10), %al
3:  add $'0', %al
    out %al, %dx
    sub $4, %ecx
    jns 2b
    ret

msg_fault: .asciz "PROBE fault vector="
msg_rip:   .asciz " rip=0x"
msg_err:   .asciz " err=0x"
msg_cr2:   .asciz " cr2=0x"
fault_active: .byte 0

/* Service 4: load an empty IDT and fault; with no handler the CPU shuts down. */
r0_triple_fault:
    lidt empty_idtr(%rip)
    ud2
    .p2align 3
empty_idtr: .word 0
    .quad 0

/*
 * AP start-up.  Ring 3 copies [ap_tramp_start, ap_tramp_end) to a free page
 * below 1 MiB and sends INIT/SIPI/SIPI with that page as the vector.  The code
 * only uses %cs-relative addressing; the far jump goes to absolute code here.
 */
.code16
.global ap_tramp_start
.global ap_tramp_end
ap_tramp_start:
    cli
    lgdtl %cs:(ap_gdtr - ap_tramp_start)
    mov %cr0, %eax
    or $1, %al
    mov %eax, %cr0
    ljmpl $SEL_KCODE32, $ap_entry32
.p2align 2
ap_gdtr:
    .word gdt_end - gdt - 1
    .long (IMAGE_BASE + (gdt - boot_start))
ap_tramp_end:

.code32
ap_entry32:
    mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %ss
    mov $CR4_VALUE, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov $CR0_VALUE, %eax
    mov %eax, %cr0
    ljmp $SEL_KCODE64, $ap_entry64

.code64
ap_entry64:
    lidt idtr(%rip)
    xor %eax, %eax
    cpuid
    cmp $0xb, %eax
    jb 1f
    mov $0xb, %eax
    xor %ecx, %ecx
    cpuid
    test %ebx, %ebx                 /* leaf 0xB is valid iff ebx != 0 */
    jz 1f
    mov %edx, %esi                  /* x2APIC id */
    jmp 2f
1:  mov $1, %eax
    cpuid
    shr $24, %ebx                   /* initial xAPIC id */
    mov %ebx, %esi
2:  mov $1, %eax
    lock xadd %eax, PROBE_AP_SLOT(%rip)
    cmp $AP_IDS_MAX, %eax
    jae 3f
    lea PROBE_AP_IDS(%rip), %rdx
    mov %esi, (%rdx,%rax,4)
    cmp $AP_NMI_STACKS, %eax        /* a stack for NMIs (the first slots only) */
    jae 3f
    inc %eax
    shl $7, %eax                    /* * AP_NMI_STACK */
    lea ap_nmi_stacks(%rip), %rsp
    add %rax, %rsp
3:  lock incl PROBE_AP_STARTED(%rip)
4:  cli                             /* never spin: park the vCPU for good */
    hlt
    jmp 4b

/* Descriptor tables. */
.p2align 4
gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff        /* 0x10 kernel data */
    .quad 0x00cf9a000000ffff        /* 0x18 kernel code, 32-bit (AP start-up) */
    .quad 0x00cff2000000ffff        /* 0x20 user data */
    .quad 0x00affa000000ffff        /* 0x28 user code, 64-bit */
    .word TSS_LIMIT & 0xffff        /* 0x30 64-bit TSS, available */
    .word (IMAGE_BASE + (tss - boot_start)) & 0xffff
    .byte ((IMAGE_BASE + (tss - boot_start)) >> 16) & 0xff
    .byte 0x89
    .byte (TSS_LIMIT >> 16) & 0xf
    .byte ((IMAGE_BASE + (tss - boot_start)) >> 24) & 0xff
    .long 0
    .long 0
gdt_end:

.p2align 3
    .word 0, 0, 0
gdtr:
    .word gdt_end - gdt - 1
    .quad (IMAGE_BASE + (gdt - boot_start))
    .word 0, 0, 0
idtr:
    .word 256 * 16 - 1
    .quad (IMAGE_BASE + (idt - boot_start))

.p2align 4
idt:
.set vec, 0
.rept 32
    .word ((IMAGE_BASE + (exc_stubs - boot_start)) + vec * 16) & 0xffff
    .word SEL_KCODE64
    .word 0x8e00                    /* present, DPL 0, 64-bit interrupt gate */
    .word (((IMAGE_BASE + (exc_stubs - boot_start)) + vec * 16) >> 16) & 0xffff
    .long 0
    .long 0
    .set vec, vec + 1
.endr
.rept 224
    .word (IMAGE_BASE + (irq_handler - boot_start)) & 0xffff
    .word SEL_KCODE64
    .word 0x8e00
    .word ((IMAGE_BASE + (irq_handler - boot_start)) >> 16) & 0xffff
    .long 0
    .long 0
.endr

/*
 * 64-bit TSS: RSP0 for ring 3 -> ring 0 transitions and an all-zero I/O
 * permission bitmap (every port allowed).  The nested KVM ignores IOPL set by
 * iretq, so ring-3 port I/O depends on this bitmap.
 */
.p2align 4
tss:
    .long 0
    .quad stack0_top                /* RSP0 */
    .quad 0, 0                      /* RSP1, RSP2 */
    .quad 0
    .quad 0, 0, 0, 0, 0, 0, 0       /* IST1..7 */
    .quad 0
    .word 0
    .word 104                       /* I/O map base: right after the TSS */
    .fill IOPB_SIZE, 1, 0
    .byte 0xff

/*
 * Static identity map of the first 4 GiB with 2 MiB user-accessible pages:
 * RAM below 4 GiB plus the MMIO window (LAPIC, IOAPIC, ...).  Ring 3 maps RAM
 * above 4 GiB itself (paging.rs).  Each table fills whole pages: under shadow
 * paging a write to a page that holds a live table traps.
 */
.section .pagetables, "aw"
.p2align 12
.global pml4
.global pdpt0
pml4:
    .quad pdpt0 + 7
    .fill 511, 8, 0
pdpt0:
    .quad pd0 + 7
    .quad pd0 + 0x1000 + 7
    .quad pd0 + 0x2000 + 7
    .quad pd0 + 0x3000 + 7
    .fill 508, 8, 0
pd0:
.set i, 0
.rept 2048
    .quad (i << 21) | 0x87          /* present | writable | user | 2 MiB */
    .set i, i + 1
.endr

.section .note.pvh, "a"
.p2align 2
    .long 4                         /* namesz */
    .long 4                         /* descsz */
    .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long (IMAGE_BASE + (pvh_entry - boot_start))

/* Stacks: not zeroed, not in the file. */
.section .stacks, "aw", @nobits
.p2align 12
    .skip 4096
stack0_top:
    .skip 128 * 1024
.global stack3_top
stack3_top:
.p2align 4
ap_nmi_stacks:
    .skip AP_NMI_STACKS * AP_NMI_STACK

/* Ring 3 starts here: zero .bss, then call Rust. */
.text
ring3_entry:
    mov %rdi, %r12
    mov %rsi, %r13
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb
    mov %r12, %rdi
    mov %r13, %rsi
    call probe_main
    ud2
