package benchkit

import (
	"bytes"
	"fmt"
	"testing"
	"time"
)

func TestPercentile(t *testing.T) {
	d := []time.Duration{4, 1, 3, 2}
	for _, c := range []struct {
		p    int
		want time.Duration
	}{{50, 2}, {95, 4}, {25, 1}, {75, 3}} {
		if got := Percentile(d, c.p); got != c.want {
			t.Errorf("p%d: got %d, want %d", c.p, got, c.want)
		}
	}
	if got := Percentile([]time.Duration{3, 1, 2}, 50); got != 2 {
		t.Errorf("p50 of an odd count: got %d, want 2", got)
	}
}

func TestPrintRows(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		var d []time.Duration
		for _, x := range v {
			d = append(d, time.Duration(x)*time.Millisecond)
		}
		return d
	}
	rows := []Row{
		PctRow("a", 50, "ms", ms(2, 4), ms(1), "one"),
		PctRow("b", 50, "ms", ms(3), nil, ""),
		PctRow("c", 50, "ms", ms(6), ms(2, 2), "two"),
		PctRow("d", 50, "ms", ms(1), ms(1), "one"),
	}
	cell := func(f Figure, unit string) string { return fmt.Sprintf("%.0f %s", f.Value, unit) }
	var b bytes.Buffer
	PrintRows(&b, rows, cell)
	want := `what  boxd  baseline  ratio  
a     3 ms  1 ms [1]  3.00x  
b     3 ms  -         -      
c     6 ms  2 ms [2]  3.00x  
d     1 ms  1 ms [1]  1.00x  

baselines:
  [1] one
  [2] two
`
	if b.String() != want {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
}
