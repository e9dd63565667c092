package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
)

func TestAttrs(t *testing.T) {
	l := `time=2026-12-06T08:40:01.123Z level=DEBUG msg="qemu: restore" id=m-3 snapshot=box.dev.4-hibernate memory=1.2ms total=122.601ms`
	a := attrs(l)
	for k, want := range map[string]string{"msg": "qemu: restore", "id": "m-3", "snapshot": "box.dev.4-hibernate", "total": "122.601ms"} {
		if a[k] != want {
			t.Errorf("%s: got %q, want %q", k, a[k], want)
		}
	}
	if d, err := time.ParseDuration(a["total"]); err != nil || d != 122601*time.Microsecond {
		t.Errorf("total: %v, %v", d, err)
	}
}

func TestRowGoal(t *testing.T) {
	f := func(v float64) benchkit.Figure { return benchkit.Figure{Value: v, Min: v, Max: v, N: 1} }
	if r := row("a", "ms", f(30), f(60), goal{"lazy <= 40 ms", 40, false}); r.Met != "yes" || r.Ratio != 0.5 {
		t.Errorf("got %+v", r)
	}
	if r := row("b", "bytes", f(40), f(60), goal{"lazy <= 0.5x eager", 0.5, true}); r.Met != "no" {
		t.Errorf("got %+v", r)
	}
	if r := row("c", "ms", f(40), benchkit.Figure{}, goal{}); r.Met != "" || r.Ratio != 0 {
		t.Errorf("got %+v", r)
	}
}

func TestPairRatios(t *testing.T) {
	got := pairRatios([]time.Duration{30, 60, 10}, []time.Duration{10, 20})
	if got.N != 2 || got.Value != 3 {
		t.Errorf("got %+v", got)
	}
}

func TestReportJSON(t *testing.T) {
	rep := Report{Memory: []MemSample{{Phase: "lazy 1", Box: dev, hostMem: hostMem{PID: 7, Pss: 3 << 20, PssShmem: 2 << 20, FileAlloc: 4 << 20}}}}
	var b bytes.Buffer
	if err := benchkit.Print(&b, true, rep, printTable); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"pss_bytes": 3145728`, `"file_allocated_bytes": 4194304`, `"phase": "lazy 1"`} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("no %s in\n%s", want, b.String())
		}
	}
	if got := rep.Memory[0].Total(); got != 5<<20 {
		t.Errorf("Total: got %d, want %d", got, 5<<20)
	}
}
