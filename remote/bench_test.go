package remote_test

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/remote"
	"github.com/boxd-dev/boxd/snapshotter"
)

// BenchmarkTransfer pushes and pulls a 256 MiB snapshot (a quarter of its
// chunks zero, the rest random) through a real S3 server on this host, and
// reads the same packs whole with the same client, checking every chunk
// as a pull does: range reads of spans against whole-object transfer.
// Run it with -benchtime 1x: each figure is one transfer.
func BenchmarkTransfer(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	_, base := startS3(ctx, b)
	const size = 256 << 20
	disk := data(9, size)
	for i := range b.N {
		url := fmt.Sprintf("%s-%d", base, i)
		a, h := newHost(ctx, b, url), newHost(ctx, b, url)
		const name = "s"
		if _, err := a.g.Ingest(ctx, bytes.NewReader(disk), snapshotter.IngestOptions{Name: name}); err != nil {
			b.Fatal(err)
		}
		began := time.Now()
		pst, err := a.r.Push(ctx, name)
		if err != nil {
			b.Fatal(err)
		}
		push := time.Since(began)
		began = time.Now()
		st, err := h.r.Pull(ctx, name)
		if err != nil {
			b.Fatal(err)
		}
		pull := time.Since(began)

		// The same packs, each read whole by the same client, every chunk
		// checked.
		bk := mustS3(ctx, b, url)
		objs, err := bk.List(ctx, "index/")
		if err != nil {
			b.Fatal(err)
		}
		began = time.Now()
		whole := readWhole(ctx, b, bk, objs, func(cas.Entry, []byte) error { return nil })
		wholeTook := time.Since(began)

		// And whole, each chunk checked and stored, as a pull of whole
		// packs would.
		h2 := newHost(ctx, b, url)
		began = time.Now()
		w := h2.g.Store().NewWriter()
		readWhole(ctx, b, bk, objs, w.PutStored)
		if err := w.Commit(); err != nil {
			b.Fatal(err)
		}
		wholeStored := time.Since(began)
		mb := func(n int64, d time.Duration) float64 { return float64(n) / 1e6 / d.Seconds() }
		b.ReportMetric(mb(pst.PackBytes, push), "push-MB/s")
		b.ReportMetric(mb(st.FetchedBytes, pull), "pull-MB/s")
		b.ReportMetric(mb(whole, wholeTook), "whole-get-MB/s")
		b.ReportMetric(mb(whole, wholeStored), "whole-get-stored-MB/s")
		b.ReportMetric(float64(st.Requests), "pull-requests")
		b.Logf("push %d bytes in %v; pull %d chunks, %d bytes in %d range reads in %v (stored locally); whole GETs %d bytes in %v (checked, not stored), %v (checked and stored)",
			pst.PackBytes, push.Round(time.Millisecond), st.Chunks, st.FetchedBytes, st.Requests, pull.Round(time.Millisecond), whole, wholeTook.Round(time.Millisecond), wholeStored.Round(time.Millisecond))
	}
}

// readWhole reads the packs of the index segments objs whole, checks
// every chunk and hands it to keep; it returns the bytes read.
func readWhole(ctx context.Context, b *testing.B, bk *remote.S3, objs []remote.Object, keep func(cas.Entry, []byte) error) int64 {
	var whole int64
	buf := make([]byte, cas.ChunkSize)
	for _, o := range objs {
		seg, err := bk.Get(ctx, o.Key)
		if err != nil {
			b.Fatal(err)
		}
		entries, err := remote.DecodeSegment(seg)
		if err != nil {
			b.Fatal(err)
		}
		pack, err := bk.Get(ctx, "packs/"+strings.TrimSuffix(strings.TrimPrefix(o.Key, "index/"), ".idx")+".pack")
		if err != nil {
			b.Fatal(err)
		}
		whole += int64(len(pack))
		for _, e := range entries {
			stored := pack[e.Offset : e.Offset+e.Stored]
			if _, err := cas.Unpack(e, stored, buf); err != nil {
				b.Fatal(err)
			}
			if err := keep(e, stored); err != nil {
				b.Fatal(err)
			}
		}
	}
	return whole
}
