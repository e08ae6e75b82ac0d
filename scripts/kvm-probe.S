/*
 * The accelerator probe's guest (imagekit.qemu.probe_accel): a Multiboot payload (a.out kludge, loaded at
 * 1 MiB by QEMU's -kernel) that enters long mode as a kernel does, prints IMAGEKIT-LONG-MODE-OK on COM1 and
 * exits QEMU through isa-debug-exit (exit status 3). imagekit embeds the assembled bytes; rebuild with
 *   as --64 -o p.o kvm-probe.S && ld -m elf_x86_64 -Ttext=0x100000 --oformat=binary -o p.bin p.o
 * (tests/test_qemu.py checks that the embedded bytes match this source).
 */
        .set BASE, 0x100000
        .section .text
        .code32
        .globl _start
_start:
mb_header:
        .long 0x1BADB002
        .long 0x00010000
        .long -(0x1BADB002 + 0x00010000)
        .long BASE              /* header_addr */
        .long BASE              /* load_addr */
        .long 0                 /* load_end_addr: whole file */
        .long 0                 /* bss_end_addr */
        .long BASE + (entry32 - _start)
entry32:
        cli
        /* page tables at 0x200000..: PML4, PDPT, PD with 2 MiB pages for the first 1 GiB */
        mov $0x200000, %edi
        xor %eax, %eax
        mov $(3*4096/4), %ecx
        rep stosl
        movl $0x201003, 0x200000      /* PML4[0] -> PDPT */
        movl $0x202003, 0x201000      /* PDPT[0] -> PD */
        mov $0x202000, %edi
        mov $0x83, %eax               /* present, writable, 2 MiB */
        mov $512, %ecx
1:      mov %eax, (%edi)
        movl $0, 4(%edi)
        add $0x200000, %eax
        add $8, %edi
        loop 1b
        mov %cr4, %eax
        or $0x20, %eax                /* PAE */
        mov %eax, %cr4
        mov $0x200000, %eax
        mov %eax, %cr3
        mov $0xC0000080, %ecx         /* EFER.LME */
        rdmsr
        or $0x100, %eax
        wrmsr
        mov %cr0, %eax
        or $0x80000001, %eax          /* PG | PE */
        mov %eax, %cr0
        lgdt BASE + (gdtr - _start)
        ljmp $0x08, $(BASE + (entry64 - _start))
        .code64
entry64:
        mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %ss
        lea msg(%rip), %rsi
        mov $0x3f8, %dx
2:      lodsb
        test %al, %al
        jz 3f
        out %al, %dx
        jmp 2b
3:      mov $0xf4, %dx                /* isa-debug-exit: QEMU exits with status (1<<1)|1 = 3 */
        mov $1, %eax
        out %eax, %dx
4:      hlt
        jmp 4b
        .align 8
gdt:    .quad 0
        .quad 0x00AF9A000000FFFF      /* 64-bit code */
        .quad 0x00CF92000000FFFF      /* data */
gdtr:   .word gdtr - gdt - 1
        .long BASE + (gdt - _start)
msg:    .asciz "IMAGEKIT-LONG-MODE-OK\n"
