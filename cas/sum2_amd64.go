//go:build amd64

package cas

import (
	"crypto/sha256"
	"encoding/binary"

	"golang.org/x/sys/cpu"
)

// haveSum2 says whether sum2 runs both hashes side by side with the SHA
// extensions; without them it hashes one chunk after the other.
var haveSum2 = cpuidSHA() && cpu.X86.HasSSSE3 && cpu.X86.HasSSE41

// sum2K are SHA-256's round constants (FIPS 180-4, 4.2.2).
var sum2K = [64]uint32{
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5,
	0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
	0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3,
	0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
	0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc,
	0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
	0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
	0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
	0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
	0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
	0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3,
	0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
	0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5,
	0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
	0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}

// sum2Mask turns each 4-byte word of a block big-endian.
var sum2Mask = [16]byte{3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12}

// sum2Pad is the last block of a message of ChunkSize bytes.
var sum2Pad = func() (b [64]byte) {
	b[0] = 0x80
	binary.BigEndian.PutUint64(b[56:], ChunkSize*8)
	return b
}()

// block2 runs n 64-byte blocks of a and of b through two SHA-256 states:
// st[0:8] a's and st[8:16] b's, each as the SHA extensions hold it (F E B A,
// then H G D C).
//
//go:noescape
func block2(st *[16]uint32, a, b *byte, n int, k *[64]uint32, mask *[16]byte)

func cpuidSHA() bool

// sum2 returns the SHA-256 sums of two chunks, computed side by side.
func sum2(a, b *[ChunkSize]byte) (ID, ID) {
	if !haveSum2 {
		return sha256.Sum256(a[:]), sha256.Sum256(b[:])
	}
	// FIPS 180-4, 5.3.3: H0..H7 as A..H.
	h := [8]uint32{0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19}
	var st [16]uint32
	for s := range 2 {
		st[8*s+0], st[8*s+1], st[8*s+2], st[8*s+3] = h[5], h[4], h[1], h[0]
		st[8*s+4], st[8*s+5], st[8*s+6], st[8*s+7] = h[7], h[6], h[3], h[2]
	}
	block2(&st, &a[0], &b[0], ChunkSize/64, &sum2K, &sum2Mask)
	block2(&st, &sum2Pad[0], &sum2Pad[0], 1, &sum2K, &sum2Mask)
	var ids [2]ID
	for s := range 2 {
		x := st[8*s : 8*s+8]
		for i, w := range []uint32{x[3], x[2], x[7], x[6], x[1], x[0], x[5], x[4]} {
			binary.BigEndian.PutUint32(ids[s][4*i:], w)
		}
	}
	return ids[0], ids[1]
}
