package remote_test

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/snapshotter"
)

func TestEvictFill(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	_, url := startS3(ctx, t)
	a := newHost(ctx, t, url)
	disks := map[string][]byte{"p": data(11, 2<<20), "q": data(12, 2<<20), "local": data(13, 2<<20)}
	for _, name := range []string{"p", "q", "local"} {
		if _, err := a.g.Ingest(ctx, bytes.NewReader(disks[name]), snapshotter.IngestOptions{Name: name}); err != nil {
			t.Fatal(err)
		}
		if name != "local" {
			if _, err := a.r.Push(ctx, name); err != nil {
				t.Fatal(err)
			}
		}
	}
	time.Sleep(10 * time.Millisecond)
	export(t, a.g, "q") // q's pack is now the most recently read
	uses, err := a.g.Store().PackUses()
	if err != nil || len(uses) != 3 {
		t.Fatalf("packs: %d %v, want 3 (one an ingest)", len(uses), err)
	}
	have := func(name string) bool {
		m, err := a.g.Manifest(name)
		if err != nil {
			t.Fatal(err)
		}
		ids, _ := m.Chunks()
		return a.g.Store().Has(ids[0])
	}

	// A limit one pack under what they take: p goes (least recently read), q stays, and the
	// pack never pushed stays whatever the limit.
	var total int64
	for _, u := range uses {
		total += u.Size
	}
	st, err := a.r.Evict(ctx, total-uses[0].Size)
	if err != nil {
		t.Fatal(err)
	}
	if st.Packs != 1 || have("p") || !have("q") || !have("local") {
		t.Fatalf("evict to one pack: %+v; have p %v q %v local %v, want p gone", st, have("p"), have("q"), have("local"))
	}
	if st, err = a.r.Evict(ctx, 0); err != nil || have("q") || !have("local") || st.Kept == 0 {
		t.Fatalf("evict to nothing: %+v %v; have q %v local %v, want the unpushed pack kept", st, err, have("q"), have("local"))
	}
	for _, name := range []string{"p", "q"} {
		fst, err := a.r.Fill(ctx, name)
		if err != nil || fst.Chunks == 0 {
			t.Fatalf("fill %s: %+v %v", name, fst, err)
		}
		if got := export(t, a.g, name); !bytes.Equal(got, disks[name]) {
			t.Fatalf("%s after evict and fill differs", name)
		}
	}
	if got := export(t, a.g, "local"); !bytes.Equal(got, disks["local"]) {
		t.Fatal("the unpushed snapshot differs after evictions")
	}
	if fst, err := a.r.Fill(ctx, "p"); err != nil || fst.Chunks != 0 {
		t.Fatalf("a second fill: %+v %v, want nothing fetched", fst, err)
	}
}
