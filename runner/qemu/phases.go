package qemu

import "time"

// phases times the steps of one operation for the debug log.
type phases struct {
	start, last time.Time
	attrs       []any
}

func startPhases() *phases {
	now := time.Now()
	return &phases{start: now, last: now}
}

// mark ends the step called name.
func (p *phases) mark(name string) {
	now := time.Now()
	p.attrs = append(p.attrs, name, now.Sub(p.last).Round(time.Microsecond))
	p.last = now
}

// log returns the steps and the total, as slog attributes after args.
func (p *phases) log(args ...any) []any {
	return append(append(args, p.attrs...), "total", time.Since(p.start).Round(time.Microsecond))
}
