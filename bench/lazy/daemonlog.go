package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"
	"time"
)

// Messages of the daemon's --debug log this bench reads.
const (
	msgRestore  = `msg="qemu: restore"`
	msgLazyDone = `msg="qemu: lazy restore done"`
	msgLazyFail = `msg="qemu: lazy restore failed"`
)

// attrRE finds one key=value of a slog text line: a bare value or a
// quoted one.
var attrRE = regexp.MustCompile(`(?:^|\s)([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|\S*)`)

// attrs is the key=value pairs of a slog text line, quotes taken off.
func attrs(line string) map[string]string {
	m := map[string]string{}
	for _, sub := range attrRE.FindAllStringSubmatch(line, -1) {
		m[sub[1]] = strings.Trim(sub[2], `"`)
	}
	return m
}

// logSize is the daemon log's size now: where the lines of what follows
// start.
func (b *bench) logSize() (int64, error) {
	st, err := os.Stat(b.daemonLog())
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

// logSince is the lines the daemon logged from offset on.
func (b *bench) logSince(offset int64) ([]string, error) {
	f, err := os.Open(b.daemonLog())
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if _, err := f.Seek(offset, io.SeekStart); err != nil {
		return nil, err
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return nil, err
	}
	return strings.Split(strings.TrimRight(string(data), "\n"), "\n"), nil
}

// restored is what the daemon's log says of one restore of a box.
type restored struct {
	ID       string
	Snapshot string
	Total    time.Duration // from the runner's start of the restore to the vCPUs running
	// Phases is how long each phase of the restore took, by the line's
	// name for it (restorePhases).
	Phases map[string]time.Duration
	Line   string
}

// restorePhases names the phases a `qemu: restore` line times, in order.
var restorePhases = []string{"memory", "disk", "launch", "filled", "devices", "cont"}

// restoreOf finds the one `qemu: restore` line for a snapshot of box name
// that the daemon logged from offset on.
func (b *bench) restoreOf(offset int64, name string) (restored, error) {
	lines, err := b.logSince(offset)
	if err != nil {
		return restored{}, err
	}
	var found []restored
	for _, l := range lines {
		if !strings.Contains(l, msgRestore) {
			continue
		}
		a := attrs(l)
		if !strings.HasPrefix(a["snapshot"], "box."+name+".") {
			continue
		}
		total, err := time.ParseDuration(a["total"])
		if err != nil {
			return restored{}, fmt.Errorf("the daemon's log: total of %q: %w", l, err)
		}
		r := restored{ID: a["id"], Snapshot: a["snapshot"], Total: total, Phases: map[string]time.Duration{}, Line: l}
		for _, p := range restorePhases {
			if d, err := time.ParseDuration(a[p]); err == nil {
				r.Phases[p] = d
			}
		}
		found = append(found, r)
	}
	if len(found) != 1 {
		return restored{}, fmt.Errorf("the daemon's log has %d qemu: restore lines for box %s since the resume began, want 1 (is the daemon --debug?)", len(found), name)
	}
	return found[0], nil
}

// lazyDone is the `qemu: lazy restore done` line of a restore.
type lazyDone struct {
	Took                                 time.Duration // from the restore's start until all memory was in place
	Demanded, Prefetched, Pushed, Zeroed string
}

// awaitLazyDone waits, at most two minutes, for the daemon to log that the
// lazy restore r has all its memory in place, and returns that line's
// figures; a `lazy restore failed` line is an error.
func (b *bench) awaitLazyDone(ctx context.Context, offset int64, r restored) (lazyDone, error) {
	deadline := time.Now().Add(2 * time.Minute)
	for {
		lines, err := b.logSince(offset)
		if err != nil {
			return lazyDone{}, err
		}
		for _, l := range lines {
			done, failed := strings.Contains(l, msgLazyDone), strings.Contains(l, msgLazyFail)
			if !done && !failed {
				continue
			}
			a := attrs(l)
			if a["id"] != r.ID || a["snapshot"] != r.Snapshot {
				continue
			}
			if failed {
				return lazyDone{}, fmt.Errorf("the daemon's log: %s", l)
			}
			took, err := time.ParseDuration(a["took"])
			if err != nil {
				return lazyDone{}, fmt.Errorf("the daemon's log: took of %q: %w", l, err)
			}
			return lazyDone{Took: took, Demanded: a["demanded"], Prefetched: a["prefetched"], Pushed: a["pushed"], Zeroed: a["zeroed"]}, nil
		}
		if time.Now().After(deadline) {
			return lazyDone{}, fmt.Errorf("the daemon logged no lazy restore done for %s (%s) within two minutes", r.ID, r.Snapshot)
		}
		select {
		case <-ctx.Done():
			return lazyDone{}, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}
