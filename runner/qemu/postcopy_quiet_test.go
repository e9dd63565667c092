package qemu

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/memstore"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
)

// writeLog keeps the first page each write of the stream carries (-1 for
// a write that carries none): one write is one batch of pages, since the
// writer's buffer holds a whole batch and each batch ends with a flush.
type writeLog struct {
	mu    sync.Mutex
	first []int
}

func (w *writeLog) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	p := -1
	if len(b) >= 13 && b[0] == vmSectionPart {
		p = int(binary.BigEndian.Uint64(b[5:13]) / migrationPage)
	}
	w.first = append(w.first, p)
	return len(b), nil
}

// testPage is page p of the snapshots these tests restore.
func testPage(p int) []byte {
	return bytes.Repeat(fmt.Appendf(nil, "page %d of boxd ", p), memstore.PageSize)[:memstore.PageSize]
}

// lazySnapshot stores mem as the memory of snapshot "snap" in a new graph
// and returns it with a plan of a saved stream.
func lazySnapshot(t *testing.T, mem []byte) (*snapshotter.Graph, *postcopyPlan) {
	t.Helper()
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	if _, err := g.Ingest(context.Background(), bytes.NewReader(mem), snapshotter.IngestOptions{
		Name: "snap", Kind: snapshotter.KindMemory, MapName: memstore.DefaultMap,
	}); err != nil {
		t.Fatal(err)
	}
	plan, err := planPostcopy(savedStream(t, nil))
	if err != nil {
		t.Fatal(err)
	}
	return g, plan
}

// testLazyMemory serves snapshot "snap" of r's graph to a machine of pages
// pages, writing the stream to w; QEMU's end of the return path is never
// read.
func testLazyMemory(t *testing.T, r *Runner, plan *postcopyPlan, pages int, w io.Writer) *lazyMemory {
	t.Helper()
	m := &Machine{id: "test", spec: runner.Spec{MemSize: int64(pages) * memstore.PageSize}, done: make(chan struct{})}
	pt, err := r.lazyPages("snap", m.spec.MemSize)
	if err != nil {
		t.Fatal(err)
	}
	l := r.lazyMemoryOf(m, "snap", plan, pt)
	conn, peer := net.Pipe()
	t.Cleanup(func() { peer.Close() })
	l.conn = conn
	l.pw = &postcopyWriter{w: bufio.NewWriterSize(w, 1<<20)}
	return l
}

// While the guest asks for pages, the push of the rest waits: no batch of
// it goes out between requests that come closer together than the quiet
// time, so a page asked for never queues behind one in the stream; once
// the requests stop, the rest goes. The waits have a budget: past it, the
// rest goes between the requests too.
func TestLazyPushWaitsForQuiet(t *testing.T) {
	const pages, top = 256, 128
	var mem bytes.Buffer
	for p := range pages {
		mem.Write(testPage(p))
	}
	g, plan := lazySnapshot(t, mem.Bytes())
	for _, tc := range []struct {
		name   string
		budget time.Duration
		apart  time.Duration // between requests
	}{
		{"within the budget", time.Minute, 5 * time.Millisecond},
		{"past the budget", 10 * time.Millisecond, 20 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &writeLog{}
			l := testLazyMemory(t, &Runner{Graph: g, LazyGrace: time.Nanosecond}, plan, pages, rec)
			l.quiet, l.quietBudget = 300*time.Millisecond, tc.budget
			finished := make(chan struct{})
			var finishedAt time.Time
			go func() { l.write(); finishedAt = time.Now(); close(finished) }()

			// Requests for pages of the top half, each one the window of
			// the one before did not bring; the guest runs after the first.
			const asks = 8
			for i := range asks {
				l.reqs <- rpMessage{typ: rpReqPagesID, block: guestRAMBlockStr, start: uint64(top+i*lazyWindow) * memstore.PageSize, length: memstore.PageSize}
				if i == 0 {
					l.guestRuns()
				}
				time.Sleep(tc.apart)
			}
			askedAll := time.Now()
			select {
			case <-finished:
			case <-l.done:
				t.Fatalf("the restore failed: %v", l.err)
			case <-time.After(30 * time.Second):
				t.Fatal("the push did not end")
			}
			for p := range pages {
				if !l.sent.Has(p) {
					t.Fatalf("page %d never sent", p)
				}
			}
			if tc.budget < time.Minute {
				// The waits used up, the rest went while the guest
				// still asked: the memory was all in place before.
				if !finishedAt.Before(askedAll) {
					t.Fatalf("the memory was all in place %v after the last request, want before it", finishedAt.Sub(askedAll))
				}
				return
			}
			rec.mu.Lock()
			defer rec.mu.Unlock()
			firstAsk, lastAsk := -1, -1
			for i, p := range rec.first {
				if p >= top {
					if firstAsk < 0 {
						firstAsk = i
					}
					lastAsk = i
				}
			}
			if firstAsk < 0 {
				t.Fatalf("no answer to a request in the stream: %v", rec.first)
			}
			for i := firstAsk; i <= lastAsk; i++ {
				if p := rec.first[i]; p >= 0 && p < top {
					t.Fatalf("a pushed batch (from page %d) went out between the answers to requests: batches' first pages %v", p, rec.first)
				}
			}
			st := &l.stats
			if got := st.demanded.Load(); got != asks {
				t.Errorf("%d requests served, want %d", got, asks)
			}
			if got := st.pushed.Load(); got != top {
				t.Errorf("%d pages pushed, want the %d of the lower half", got, top)
			}
		})
	}
}

// Guest RAM's first MiB goes out before the devices, its pages of zeros as
// such (QEMU would ask for each one as it loads the devices), and nothing
// above it does.
func TestLazyEarlyPages(t *testing.T) {
	const pages = 2 * earlyPages
	zero := func(p int) bool { return p%3 == 0 || p >= earlyPages+earlyPages/2 }
	var mem bytes.Buffer
	want := 0
	for p := range pages {
		if zero(p) {
			mem.Write(make([]byte, memstore.PageSize))
			if p < earlyPages {
				want++
			}
		} else {
			mem.Write(testPage(p))
		}
	}
	g, plan := lazySnapshot(t, mem.Bytes())
	var out bytes.Buffer
	l := testLazyMemory(t, &Runner{Graph: g}, plan, pages, &out)
	if err := l.early(); err != nil {
		t.Fatal(err)
	}
	if err := l.pw.w.Flush(); err != nil {
		t.Fatal(err)
	}
	for p := range pages {
		if sent := l.sent.Has(p); sent != (p < earlyPages) {
			t.Errorf("page %d (zeros: %v): sent %v", p, zero(p), sent)
		}
	}
	if got := l.stats.zeroed.Load(); got != int64(want) {
		t.Errorf("%d pages of zeros went out, want %d", got, want)
	}
	if out.Len() < (earlyPages-want)*memstore.PageSize {
		t.Errorf("the stream holds %d bytes, fewer than the first MiB's %d pages of data", out.Len(), earlyPages-want)
	}
}
