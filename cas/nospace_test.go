package cas

import (
	"strings"
	"testing"

	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/containerd/errdefs"
)

func TestFullDisk(t *testing.T) {
	g := newGen(50)
	data := g.random(16 << 20)
	tests := []struct {
		name   string
		stream bool // WriteStream, or Put chunk by chunk
	}{
		{"WriteStream", true},
		{"Put", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			testutil.MountTmpfs(t, dir, "size=4m")
			s, err := Open(dir, Options{})
			if err != nil {
				t.Fatal(err)
			}
			// Something stored before the disk filled must survive.
			keep := g.random(4 * ChunkSize)
			keepIDs, _ := ingest(t, s, keep)

			w := s.NewWriter()
			if tt.stream {
				_, err = writeStream(w, data)
			} else {
				for _, c := range chunksOf(data) {
					if _, err = w.Put(c); err != nil {
						break
					}
				}
			}
			if err == nil {
				err = w.Commit()
			} else {
				// A broken Writer keeps its error.
				if _, err2 := w.Put(g.random(ChunkSize)); !errorsSame(err2, err) {
					t.Errorf("Put after the failure: %v, want %v", err2, err)
				}
				w.Abort()
			}
			wantErrIs(t, err, errdefs.ErrResourceExhausted)
			if !strings.Contains(err.Error(), "no space") {
				t.Errorf("error %q does not say the disk is full", err)
			}
			for _, name := range packFiles(t, s) {
				if strings.HasSuffix(name, ".tmp") {
					t.Errorf("%s left after Abort", name)
				}
			}
			checkReadable(t, s, keepIDs, chunksOf(keep))
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}

			s = openStore(t, dir)
			if s.Rebuilt || len(s.Damaged) != 0 {
				t.Errorf("reopen: Rebuilt %v, Damaged %q", s.Rebuilt, s.Damaged)
			}
			checkReadable(t, s, keepIDs, chunksOf(keep))
			checkVerify(t, s)
			// With the space back, a small write works.
			small := g.random(8 * ChunkSize)
			ids, _ := ingest(t, s, small)
			checkReadable(t, s, ids, chunksOf(small))
			checkVerify(t, s)
		})
	}
}

func errorsSame(a, b error) bool { return a != nil && b != nil && a.Error() == b.Error() }
