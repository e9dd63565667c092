//go:build amd64

#include "textflag.h"

// Two SHA-256 computations side by side with the SHA extensions: the
// instructions of one fill the latency of the other's. State registers
// hold the SHA extensions' layout: ABEF and CDGH (A in the top lane).
//
// Stream A: state X1 (ABEF), X2 (CDGH); message words X3-X6.
// Stream B: state X7 (ABEF), X8 (CDGH); message words X9-X12.
// X0 is the round input (message words plus constants) SHA256RNDS2 reads;
// X13 the byte-order mask; X14 and X15 scratch. R8 points to the round
// constants.

// LOAD reads words 4g..4g+3 (at byte off) of both blocks, big-endian.
#define LOAD(off, MA, MB) \
	MOVOU off(SI), MA; \
	PSHUFB X13, MA; \
	MOVOU off(DX), MB; \
	PSHUFB X13, MB

// SCHED1 computes words 4g..4g+3 into M0 from the sixteen before them:
// M0 holds words 4g-16.., M1 4g-12.., M2 4g-8.., M3 4g-4...
#define SCHED1(M0, M1, M2, M3, T) \
	SHA256MSG1 M1, M0; \
	MOVOU M3, T; \
	PALIGNR $4, M2, T; \
	PADDD T, M0; \
	SHA256MSG2 M3, M0

#define SCHED(A0, A1, A2, A3, B0, B1, B2, B3) \
	SCHED1(A0, A1, A2, A3, X14); \
	SCHED1(B0, B1, B2, B3, X15)

// ROUNDS4 runs rounds 4g..4g+3 (constants at byte off) on both states.
#define ROUNDS4(MA, MB, off) \
	MOVOU off(R8), X14; \
	MOVOU MA, X0; \
	PADDD X14, X0; \
	SHA256RNDS2 X0, X1, X2; \
	PSHUFD $0x0e, X0, X0; \
	SHA256RNDS2 X0, X2, X1; \
	MOVOU MB, X0; \
	PADDD X14, X0; \
	SHA256RNDS2 X0, X7, X8; \
	PSHUFD $0x0e, X0, X0; \
	SHA256RNDS2 X0, X8, X7

// func block2(st *[16]uint32, a, b *byte, n int, k *[64]uint32, mask *[16]byte)
TEXT ·block2(SB), NOSPLIT, $64-48
	MOVQ st+0(FP), DI
	MOVQ a+8(FP), SI
	MOVQ b+16(FP), DX
	MOVQ n+24(FP), CX
	MOVQ k+32(FP), R8
	MOVQ mask+40(FP), R9
	MOVOU (R9), X13
	MOVOU 0(DI), X1
	MOVOU 16(DI), X2
	MOVOU 32(DI), X7
	MOVOU 48(DI), X8
	TESTQ CX, CX
	JZ done

loop:
	MOVOU X1, 0(SP)
	MOVOU X2, 16(SP)
	MOVOU X7, 32(SP)
	MOVOU X8, 48(SP)
	LOAD(0, X3, X9)
	ROUNDS4(X3, X9, 0)
	LOAD(16, X4, X10)
	ROUNDS4(X4, X10, 16)
	LOAD(32, X5, X11)
	ROUNDS4(X5, X11, 32)
	LOAD(48, X6, X12)
	ROUNDS4(X6, X12, 48)
	SCHED(X3, X4, X5, X6, X9, X10, X11, X12)
	ROUNDS4(X3, X9, 64)
	SCHED(X4, X5, X6, X3, X10, X11, X12, X9)
	ROUNDS4(X4, X10, 80)
	SCHED(X5, X6, X3, X4, X11, X12, X9, X10)
	ROUNDS4(X5, X11, 96)
	SCHED(X6, X3, X4, X5, X12, X9, X10, X11)
	ROUNDS4(X6, X12, 112)
	SCHED(X3, X4, X5, X6, X9, X10, X11, X12)
	ROUNDS4(X3, X9, 128)
	SCHED(X4, X5, X6, X3, X10, X11, X12, X9)
	ROUNDS4(X4, X10, 144)
	SCHED(X5, X6, X3, X4, X11, X12, X9, X10)
	ROUNDS4(X5, X11, 160)
	SCHED(X6, X3, X4, X5, X12, X9, X10, X11)
	ROUNDS4(X6, X12, 176)
	SCHED(X3, X4, X5, X6, X9, X10, X11, X12)
	ROUNDS4(X3, X9, 192)
	SCHED(X4, X5, X6, X3, X10, X11, X12, X9)
	ROUNDS4(X4, X10, 208)
	SCHED(X5, X6, X3, X4, X11, X12, X9, X10)
	ROUNDS4(X5, X11, 224)
	SCHED(X6, X3, X4, X5, X12, X9, X10, X11)
	ROUNDS4(X6, X12, 240)
	MOVOU 0(SP), X14
	PADDD X14, X1
	MOVOU 16(SP), X14
	PADDD X14, X2
	MOVOU 32(SP), X14
	PADDD X14, X7
	MOVOU 48(SP), X14
	PADDD X14, X8
	ADDQ $64, SI
	ADDQ $64, DX
	DECQ CX
	JNZ loop

done:
	MOVOU X1, 0(DI)
	MOVOU X2, 16(DI)
	MOVOU X7, 32(DI)
	MOVOU X8, 48(DI)
	RET

// func cpuidSHA() bool: whether CPUID reports the SHA extensions (leaf 7,
// EBX bit 29).
TEXT ·cpuidSHA(SB), NOSPLIT, $0-1
	MOVL $0, AX
	CPUID
	CMPL AX, $7
	JLT no
	MOVL $7, AX
	MOVL $0, CX
	CPUID
	SHRL $29, BX
	ANDL $1, BX
	MOVB BX, ret+0(FP)
	RET
no:
	MOVB $0, ret+0(FP)
	RET
