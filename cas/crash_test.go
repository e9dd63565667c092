package cas

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// crashRoundData is what round r of the crash child writes: a few chunks of
// its own and one that every round shares.
func crashRoundData(r int) []byte {
	g := rand.NewChaCha8([32]byte{byte(r), byte(r >> 8), 'k', 'i', 'l', 'l'})
	b := make([]byte, 6*ChunkSize)
	_, _ = g.Read(b[:5*ChunkSize])
	copy(b[5*ChunkSize:], "shared by every round")
	return b
}

// crashRoundLive says whether round r's chunks stay live: the child's GC
// collects every third round.
func crashRoundLive(r int) bool { return r%3 != 2 }

// crashChild runs in a child process: it writes rounds into the store at
// dir from round start on, printing each committed round, and collects
// garbage every few rounds, until it is killed.
func crashChild(dir string, start int) error {
	s, err := Open(dir, Options{LockTimeout: 5 * time.Second})
	if err != nil {
		return err
	}
	live := map[ID]bool{}
	for r := range start {
		if crashRoundLive(r) {
			for _, c := range chunksOf(crashRoundData(r)) {
				live[Sum(c)] = true
			}
		}
	}
	out := bufio.NewWriter(os.Stdout)
	for r := start; ; r++ {
		data := crashRoundData(r)
		w := s.NewWriter()
		ids, err := writeStream(w, data)
		if err == nil {
			err = w.Commit()
		}
		if err != nil {
			w.Abort()
			return err
		}
		if crashRoundLive(r) {
			for _, id := range ids {
				live[id] = true
			}
		}
		fmt.Fprintf(out, "committed %d\n", r)
		if err := out.Flush(); err != nil {
			return err
		}
		if r%4 == 3 {
			if _, err := s.GC(context.Background(), func(id ID) bool { return live[id] }, GCOptions{}); err != nil {
				return err
			}
		}
	}
}

// TestKillDuringWrites kills, with SIGKILL at a random moment, a process
// that seals packs, writes and merges index segments and collects garbage,
// and checks each time that the store opens consistent with every live
// round it had committed.
func TestKillDuringWrites(t *testing.T) {
	if dir := os.Getenv("BOXD_CAS_CRASH_DIR"); dir != "" {
		start, _ := strconv.Atoi(os.Getenv("BOXD_CAS_CRASH_START"))
		if err := crashChild(dir, start); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		return
	}
	dir := t.TempDir()
	r := rand.New(rand.NewPCG(7, 7))
	next := 0
	for kill := range 10 {
		cmd := exec.Command(os.Args[0], "-test.run=^TestKillDuringWrites$")
		cmd.Env = append(os.Environ(), "BOXD_CAS_CRASH_DIR="+dir, "BOXD_CAS_CRASH_START="+strconv.Itoa(next))
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lines := make(chan int)
		go func() {
			defer close(lines)
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				if n, ok := strings.CutPrefix(sc.Text(), "committed "); ok {
					v, _ := strconv.Atoi(n)
					lines <- v
				}
			}
		}()
		// Let it commit a few rounds, then kill it a moment later.
		want := 3 + r.IntN(8)
		deadline := time.After(20 * time.Second)
	wait:
		for seen := 0; seen < want; {
			select {
			case v, ok := <-lines:
				if !ok {
					t.Fatalf("child ended early: %v", stderr.String())
				}
				next = v + 1
				seen++
			case <-deadline:
				break wait
			}
		}
		time.Sleep(time.Duration(r.IntN(20000)) * time.Microsecond)
		_ = cmd.Process.Signal(syscall.SIGKILL)
		for v := range lines {
			next = v + 1
		}
		_ = cmd.Wait()
		t.Logf("killed after round %d", next-1)

		s, err := Open(dir, Options{})
		if err != nil {
			t.Fatalf("kill %d: Open: %v", kill, err)
		}
		if len(s.Damaged) != 0 {
			t.Errorf("kill %d: Damaged %q", kill, s.Damaged)
		}
		for round := range next {
			if crashRoundLive(round) {
				data := crashRoundData(round)
				var ids []ID
				for _, c := range chunksOf(data) {
					ids = append(ids, Sum(c))
				}
				checkReadable(t, s, ids, chunksOf(data))
			}
		}
		checkVerify(t, s)
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestMigrateLegacyIndex opens a store whose index.db is of version 1
// (chunk locations in bbolt, no segments), with a pack GC had marked for
// deletion and a migration a crash cut short.
func TestMigrateLegacyIndex(t *testing.T) {
	g := newGen(79)
	dir := t.TempDir()
	s := openStore(t, dir)
	datas, idss := ingestPacks(t, s, g, 4, 5)
	var entries []indexEntry
	if err := s.idx.forEach(context.Background(), func(e *indexEntry) error {
		entries = append(entries, *e)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	recs := map[uint32]packRecord{}
	if err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketPacks).ForEach(func(k, v []byte) error {
			rec, err := decodePackRecord(v)
			recs[beUint32(k)] = rec
			return err
		})
	}); err != nil {
		t.Fatal(err)
	}
	dead, _ := s.Lookup(idss[2][0])
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// Write the store as version 1 had it.
	for _, p := range []string{"index", "index.db", "lock"} {
		if err := os.RemoveAll(filepath.Join(dir, p)); err != nil {
			t.Fatal(err)
		}
	}
	db, err := bolt.Open(filepath.Join(dir, "index.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		chunks, _ := tx.CreateBucket([]byte("chunks"))
		packs, _ := tx.CreateBucket(bucketPacks)
		meta, _ := tx.CreateBucket(bucketMeta)
		for _, e := range entries {
			if err := chunks.Put(e.ID[:], e.Loc.marshal()); err != nil {
				return err
			}
		}
		for n, rec := range recs {
			if n == dead.Pack {
				rec = packRecord{State: packDeleting}
			}
			if err := packs.Put(packKey(n), rec.marshal()); err != nil {
				return err
			}
		}
		if err := meta.Put(keyNextPack, packKey(9)); err != nil {
			return err
		}
		return meta.Put(keyVersion, binary.BigEndian.AppendUint32(nil, legacyIndexVersion))
	})
	if err != nil {
		t.Fatal(err)
	}
	db.Close()
	// A migration cut short left its new database behind.
	if err := os.WriteFile(filepath.Join(dir, "index.db.tmp"), []byte("half"), 0o600); err != nil {
		t.Fatal(err)
	}

	s = openStore(t, dir)
	if !s.Rebuilt || len(s.Damaged) != 0 {
		t.Errorf("Rebuilt %v, Damaged %q", s.Rebuilt, s.Damaged)
	}
	for i := range datas {
		if i == 2 {
			if _, err := os.Stat(s.packPath(dead.Pack)); !os.IsNotExist(err) {
				t.Errorf("pack marked for deletion still there: %v", err)
			}
			if s.Has(idss[i][0]) {
				t.Error("chunk of a deleted pack indexed")
			}
			continue
		}
		checkReadable(t, s, idss[i], chunksOf(datas[i]))
	}
	checkVerify(t, s)
	if err := s.db.View(func(tx *bolt.Tx) error {
		if tx.Bucket([]byte("chunks")) != nil {
			return fmt.Errorf("chunks bucket still in index.db")
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "index.db.tmp")); !os.IsNotExist(err) {
		t.Errorf("index.db.tmp left: %v", err)
	}
	ids, _ := ingest(t, s, g.random(ChunkSize))
	if loc, _ := s.Lookup(ids[0]); loc.Pack < 9 {
		t.Errorf("new pack %d reuses a number below the recorded next pack 9", loc.Pack)
	}
}
