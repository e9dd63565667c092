package benchkit

import (
	"fmt"
	"io"
	"math"
	"slices"
	"text/tabwriter"
	"time"
)

// Row is one line of the table: a statistic (the row says which) of boxd's
// samples and of the baseline's, in Unit ("s", "ms" or "bytes").
type Row struct {
	What       string  `json:"what"`
	Unit       string  `json:"unit"`
	Boxd       Figure  `json:"boxd"`
	Baseline   *Figure `json:"baseline,omitempty"`
	BaselineIs string  `json:"baseline_is,omitempty"`
	// Ratio is boxd's value over the baseline's (0: no baseline).
	Ratio float64 `json:"ratio,omitempty"`
}

// Figure is one side of a row: the statistic, the samples' range and the
// samples.
type Figure struct {
	Value   float64   `json:"value"`
	Min     float64   `json:"min"`
	Max     float64   `json:"max"`
	N       int       `json:"n"`
	Samples []float64 `json:"samples,omitempty"`
}

// Beside is r with base as its baseline, which baseIs describes, and the
// ratio of the two.
func (r Row) Beside(base Figure, baseIs string) Row {
	r.Baseline, r.BaselineIs = &base, baseIs
	r.Ratio = Ratio(r.Boxd.Value, base.Value)
	return r
}

// PctRow compares the p-th percentiles of two sets of samples, in unit
// ("s" or "ms"); base may be nil.
func PctRow(what string, p int, unit string, boxd, base []time.Duration, baseIs string) Row {
	row := Row{What: what, Unit: unit, Boxd: DurFigure(boxd, p, unit)}
	if len(base) > 0 {
		row = row.Beside(DurFigure(base, p, unit), baseIs)
	}
	return row
}

// DurFigure is the p-th percentile of d in unit, with d's range and d.
func DurFigure(d []time.Duration, p int, unit string) Figure {
	if len(d) == 0 {
		return Figure{}
	}
	f := Figure{Value: InUnit(Percentile(d, p), unit), Min: InUnit(slices.Min(d), unit), Max: InUnit(slices.Max(d), unit), N: len(d)}
	for _, x := range d {
		f.Samples = append(f.Samples, InUnit(x, unit))
	}
	return f
}

// InUnit is d in milliseconds for unit "ms", else in seconds.
func InUnit(d time.Duration, unit string) float64 {
	if unit == "ms" {
		return float64(d) / float64(time.Millisecond)
	}
	return d.Seconds()
}

// Ratio is a over b, or 0 when b is not above 0.
func Ratio(a, b float64) float64 {
	if b <= 0 {
		return 0
	}
	return a / b
}

// Percentile is the nearest-rank p-th percentile (p 50 of an even count is
// the mean of the middle two).
func Percentile(d []time.Duration, p int) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	if p == 50 && len(s)%2 == 0 {
		return (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	rank := int(math.Ceil(float64(p) / 100 * float64(len(s))))
	return s[max(rank, 1)-1]
}

// PrintRows prints rows as a table of what, boxd, baseline and ratio, each
// baseline numbered, then the legend of those numbers. cell formats a
// figure in its row's unit.
func PrintRows(w io.Writer, rows []Row, cell func(f Figure, unit string) string) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "what\tboxd\tbaseline\tratio\t")
	var legend []string
	for _, r := range rows {
		base, rat := "-", "-"
		if r.Baseline != nil {
			base = cell(*r.Baseline, r.Unit)
			if r.Ratio > 0 {
				rat = fmt.Sprintf("%.2fx", r.Ratio)
			}
			if !slices.Contains(legend, r.BaselineIs) {
				legend = append(legend, r.BaselineIs)
			}
			base += fmt.Sprintf(" [%d]", slices.Index(legend, r.BaselineIs)+1)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t\n", r.What, cell(r.Boxd, r.Unit), base, rat)
	}
	tw.Flush()
	fmt.Fprintln(w, "\nbaselines:")
	for i, l := range legend {
		fmt.Fprintf(w, "  [%d] %s\n", i+1, l)
	}
}
