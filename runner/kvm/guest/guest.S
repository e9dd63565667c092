/*
 * boxd's conformance guest: a flat 64-bit program with no OS, entered in long
 * mode by boxd's VMM with all of RAM identity-mapped. It ticks forever: each
 * tick it dirties a number of pages with a pseudo-random writer, prints a
 * line on the serial port now and then, and asks the VMM over a control port
 * what to do next: carry on, report a checksum of its memory and its tick
 * counter, halt, take a new seed, or fill a range of pages. The layout and
 * ports are in guest.go.
 */
	.code64
	.text
	.globl	_start

	.set	PARAMS,		0x9000	/* written by the VMM */
	.set	P_MEMSIZE,	PARAMS+0
	.set	P_DATA,		PARAMS+8
	.set	P_PAGES,	PARAMS+16
	.set	P_SEED,		PARAMS+24
	.set	P_PRINT,	PARAMS+32
	.set	STATE,		0x9100	/* the guest's own */
	.set	S_TICK,		STATE+0
	.set	S_RNG,		STATE+8
	.set	POOL,		0x8000	/* a page for CmdFill's pattern */

	.set	PORT_SERIAL,	0x3f8
	.set	PORT_CTRL,	0x510
	.set	PORT_REPORT,	0x511
	.set	PORT_DONE,	0x512
	.set	PORT_SEED,	0x513

_start:
	movq	S_RNG, %rax
	testq	%rax, %rax
	jnz	tick
	movq	P_SEED, %rax
	orq	$1, %rax
	movq	%rax, S_RNG

tick:
	incq	S_TICK
	movq	P_PAGES, %rcx
	movq	P_MEMSIZE, %r11
	subq	P_DATA, %r11
	shrq	$12, %r11		/* data pages */
	testq	%r11, %r11
	jz	print
dirty:
	testq	%rcx, %rcx
	jz	print
	movq	S_RNG, %rax		/* xorshift64 */
	movq	%rax, %rdx
	shlq	$13, %rdx
	xorq	%rdx, %rax
	movq	%rax, %rdx
	shrq	$7, %rdx
	xorq	%rdx, %rax
	movq	%rax, %rdx
	shlq	$17, %rdx
	xorq	%rdx, %rax
	movq	%rax, S_RNG
	movq	%rax, %r8
	xorl	%edx, %edx
	divq	%r11			/* rdx = page */
	shlq	$12, %rdx
	addq	P_DATA, %rdx
	xorq	S_TICK, %r8
	movq	%r8, (%rdx)		/* the page's first word */
	decq	%rcx
	jmp	dirty

print:
	movq	P_PRINT, %rcx
	testq	%rcx, %rcx
	jz	ctrl
	movq	S_TICK, %rax
	xorl	%edx, %edx
	divq	%rcx
	testq	%rdx, %rdx
	jnz	ctrl
	movw	$PORT_SERIAL, %dx
	leaq	msg(%rip), %rsi
	movl	$5, %ecx
1:	lodsb
	outb	%al, %dx
	loop	1b
	movq	S_TICK, %rbx
	movl	$16, %ecx
	leaq	hex(%rip), %rsi
2:	rolq	$4, %rbx
	movl	%ebx, %eax
	andl	$15, %eax
	movb	(%rsi,%rax), %al
	outb	%al, %dx
	loop	2b
	movb	$10, %al
	outb	%al, %dx

ctrl:
	movw	$PORT_CTRL, %dx
	inl	%dx, %eax
	cmpl	$1, %eax
	je	report
	cmpl	$2, %eax
	je	halt
	cmpl	$3, %eax
	je	reseed
	cmpl	$4, %eax
	je	fill
	jmp	tick

reseed:					/* mix fresh entropy into the writer */
	movw	$PORT_SEED, %dx
	inl	%dx, %eax
	movl	%eax, %ebx
	inl	%dx, %eax
	shlq	$32, %rax
	orq	%rbx, %rax
	xorq	%rax, S_RNG
	orq	$1, S_RNG
	jmp	tick

fill:		/* fill data pages [first, first+count) with fresh data */
	movw	$PORT_SEED, %dx
	inl	%dx, %eax		/* first data page */
	movl	%eax, %r10d
	inl	%dx, %eax		/* count */
	movl	%eax, %r11d
	shlq	$12, %r10
	addq	P_DATA, %r10
	shlq	$12, %r11
	addq	%r10, %r11
	cmpq	P_MEMSIZE, %r11
	jbe	5f
	movq	P_MEMSIZE, %r11
	/*
	 * One page of pseudo-random words (a stream of its own: the writer's
	 * is left alone), then a copy of it into every page with the page's
	 * address mixed into its first word: each page new and incompressible.
	 * Under KVM without hardware virtualisation a store in a loop costs
	 * microseconds; a string copy costs far less a word.
	 */
5:	movq	S_RNG, %rax
	xorq	S_TICK, %rax
	orq	$1, %rax
	leaq	POOL, %rdi
	movl	$512, %ecx
7:	movq	%rax, %rdx		/* xorshift64 */
	shlq	$13, %rdx
	xorq	%rdx, %rax
	movq	%rax, %rdx
	shrq	$7, %rdx
	xorq	%rdx, %rax
	movq	%rax, %rdx
	shlq	$17, %rdx
	xorq	%rdx, %rax
	movq	%rax, (%rdi)
	addq	$8, %rdi
	decl	%ecx
	jnz	7b
	movq	%r10, %rdi
6:	cmpq	%r11, %rdi
	jae	tick
	movq	%rdi, %r9
	leaq	POOL, %rsi
	movl	$512, %ecx
	rep movsq
	xorq	%rax, (%r9)		/* the page's address mixed into its first word */
	xorq	%r9, (%r9)
	jmp	6b

report:		/* FNV-1a over the first word of every data page: what the writer writes */
	movq	P_DATA, %rsi
	movq	P_MEMSIZE, %rdi
	movabsq	$0xcbf29ce484222325, %rax
	movabsq	$0x100000001b3, %r8
3:	cmpq	%rdi, %rsi
	jae	4f
	xorq	(%rsi), %rax
	imulq	%r8, %rax
	addq	$4096, %rsi
	jmp	3b
4:	movw	$PORT_REPORT, %dx
	outl	%eax, %dx
	shrq	$32, %rax
	outl	%eax, %dx
	movq	S_TICK, %rax
	outl	%eax, %dx
	shrq	$32, %rax
	outl	%eax, %dx
	jmp	tick

halt:
	movw	$PORT_DONE, %dx
	xorl	%eax, %eax
	outb	%al, %dx
	hlt
	jmp	halt

msg:	.ascii	"tick "
hex:	.ascii	"0123456789abcdef"
