package kvm

import (
	"slices"
	"testing"
)

func TestMergePages(t *testing.T) {
	tests := []struct {
		a, b, want []uint64
	}{
		{nil, nil, []uint64{}},
		{[]uint64{3, 1}, nil, []uint64{3, 1}},
		{nil, []uint64{2, 2}, []uint64{2}},
		{[]uint64{3, 1, 3}, []uint64{1, 7, 3, 8}, []uint64{3, 1, 7, 8}},
	}
	for _, tc := range tests {
		if got := mergePages(tc.a, tc.b); !slices.Equal(got, tc.want) {
			t.Errorf("mergePages(%v, %v) = %v, want %v", tc.a, tc.b, got, tc.want)
		}
	}
}
