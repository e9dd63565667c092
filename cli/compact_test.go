package cli_test

import (
	"path/filepath"
	"strconv"
	"testing"

	"github.com/boxd-dev/boxd/cas"
)

// TestCompactFrameChunks compacts a freshly ingested store with and
// without a daemon on the root: --frame-chunks reaches the compaction
// either way, as the frames it wrote show, and its absence means the
// default.
func TestCompactFrameChunks(t *testing.T) {
	for _, tc := range []struct {
		name   string
		daemon bool
		frame  int // --frame-chunks; 0 leaves it out
	}{
		{"daemon, default", true, 0},
		{"daemon, frame-chunks 1", true, 1},
		{"daemon, frame-chunks 16", true, 16},
		{"local, frame-chunks 1", false, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := shortRoot(t)
			file := textFile(t, filepath.Join(t.TempDir(), "data"), 2<<20, 7)
			ok(t, root, "store", "ingest", "--name", "data", file)
			if tc.daemon {
				startDaemon(t, root)
			}
			args := []string{"store", "compact", "--json"}
			if tc.frame != 0 {
				args = append(args, "--frame-chunks", strconv.Itoa(tc.frame))
			}
			var st cas.CompactStats
			decodeJSON(t, ok(t, root, args...).stdout, &st)
			if st.PacksCompacted == 0 || st.PacksWritten == 0 || st.ChunksMoved < 2*cas.MaxFrameChunks {
				t.Fatalf("compact: %+v; want the ingested packs compacted", st)
			}
			per := int64(tc.frame)
			if per == 0 {
				per = cas.DefaultFrameChunks
			}
			// Each pack written ends its last frame early.
			least := (st.ChunksMoved + per - 1) / per
			if st.Frames < least || st.Frames > least+int64(st.PacksWritten) {
				t.Errorf("compact wrote %d frames for %d chunks in %d packs; want %d frames of at most %d chunks",
					st.Frames, st.ChunksMoved, st.PacksWritten, least, per)
			}
			if tc.daemon {
				// The daemon holds the store: the compaction was its.
				fails(t, 8, root, []string{"in use"}, "store", "ls")
			}
		})
	}
}
