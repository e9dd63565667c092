package qemu

import (
	"context"
	"os"

	"github.com/boxd-dev/boxd/runner"
)

// Resume spares are QEMUs started ahead of a lazy restore (postcopy.go):
// paused, waiting for device state as a postcopy destination, on an empty
// memory file of their own, without a disk. A lazy restore of a machine
// like one takes it (plugging in the disk and console, as a fork's spare
// does) instead of starting QEMU, which takes process start off a resume's
// path. Runner.ResumeSpares of them are kept per kind of machine restored
// lately, started again once the restore that took one has all its memory.

// resumeSpec is spec as a resume spare runs it: no disk, no console.
func resumeSpec(spec runner.Spec) runner.Spec {
	spec.Disk, spec.Console = nil, ""
	return spec
}

// takeResumeSpare returns a resume spare that became a machine of spec, or
// nil if none waits.
func (r *Runner) takeResumeSpare(ctx context.Context, spec runner.Spec) *Machine {
	for {
		r.resumeMu.Lock()
		var sp *Machine
		for i, m := range r.resumeSpares {
			if sameMachine(m.spec, spec) {
				sp = m
				r.resumeSpares = append(r.resumeSpares[:i:i], r.resumeSpares[i+1:]...)
				break
			}
		}
		r.resumeMu.Unlock()
		if sp == nil {
			return nil
		}
		if sp.stopped() {
			continue
		}
		if err := sp.takeOver(ctx, spec); err != nil {
			r.logger().Warn("qemu: a resume spare could not take over; starting QEMU instead", "id", sp.id, "err", err)
			_ = sp.Stop(context.WithoutCancel(ctx))
			continue
		}
		r.logger().Debug("qemu: restore took a resume spare", "id", sp.id)
		return sp
	}
}

// refillResumeSpares starts resume spares for machines of spec until
// ResumeSpares wait, in the background; one refill at a time.
func (r *Runner) refillResumeSpares(spec runner.Spec) {
	if r.ResumeSpares <= 0 {
		return
	}
	spec = resumeSpec(spec)
	r.resumeMu.Lock()
	wanted := r.resumeWanted
	r.resumeMu.Unlock()
	if wanted != nil && !wanted() {
		r.DropResumeSpares()
		return
	}
	r.resumeMu.Lock()
	if r.resumeClosed || r.refilling {
		r.resumeMu.Unlock()
		return
	}
	r.refilling = true
	r.refills.Add(1)
	gen := r.resumeGen
	r.resumeMu.Unlock()
	go func() {
		defer func() {
			r.resumeMu.Lock()
			r.refilling = false
			r.resumeMu.Unlock()
			r.refills.Done()
		}()
		for {
			r.resumeMu.Lock()
			have := 0
			for _, m := range r.resumeSpares {
				if sameMachine(m.spec, spec) && !m.stopped() {
					have++
				}
			}
			closed := r.resumeClosed
			r.resumeMu.Unlock()
			if closed || have >= r.ResumeSpares {
				return
			}
			path, f, err := r.emptyMemory("spare", spec.MemSize)
			if err != nil {
				r.logger().Debug("qemu: a resume spare", "err", err)
				return
			}
			_ = f.Close()
			sp, err := r.launch(context.Background(), spec, launchOptions{ownFile: path, incoming: true, postcopy: true})
			if err != nil {
				_ = os.Remove(path)
				r.logger().Debug("qemu: a resume spare", "err", err)
				return
			}
			if err := sp.listenIncoming(context.Background()); err != nil {
				_ = sp.Stop(context.Background())
				r.logger().Debug("qemu: a resume spare", "err", err)
				return
			}
			r.resumeMu.Lock()
			if r.resumeClosed || r.resumeGen != gen {
				// Dropped meanwhile: no resume is coming.
				r.resumeMu.Unlock()
				_ = sp.Stop(context.Background())
				return
			}
			r.resumeSpares = append(r.resumeSpares, sp)
			r.resumeMu.Unlock()
		}
	}()
}

// WarmResume starts a resume spare for a lazy restore of snapshot snap
// with hostPorts, in the background, unless one waits for such a machine
// (runner.ResumeSparer).
func (r *Runner) WarmResume(snap string, hostPorts []uint16) {
	if r.ResumeSpares <= 0 || r.Graph == nil || r.EagerRestore {
		return
	}
	s, err := r.Graph.Get(snap)
	if err != nil {
		return
	}
	spec, err := r.machineSpec(s)
	if err != nil {
		return
	}
	if spec.Network == netSlirp {
		hostPorts = nil
	}
	spec.HostPorts = hostPorts
	r.refillResumeSpares(spec)
}

// WaitingResumeSpares is how many resume spares wait.
func (r *Runner) WaitingResumeSpares() int {
	r.resumeMu.Lock()
	defer r.resumeMu.Unlock()
	n := 0
	for _, m := range r.resumeSpares {
		if !m.stopped() {
			n++
		}
	}
	return n
}

// StopResumeSpares stops the resume spares and starts no more. It waits
// for a refill under way, which stops the spare it was starting: a process
// that ends after it (boxd's daemon) leaves no spare behind.
func (r *Runner) StopResumeSpares() {
	r.resumeMu.Lock()
	r.resumeClosed = true
	r.resumeMu.Unlock()
	r.refills.Wait()
	r.DropResumeSpares()
}

// SetResumeSparesWanted sets the function a refill asks first: when it
// says no, the spares waiting are dropped and none start
// (runner.ResumeSparer).
func (r *Runner) SetResumeSparesWanted(wanted func() bool) {
	r.resumeMu.Lock()
	r.resumeWanted = wanted
	r.resumeMu.Unlock()
}

// DropResumeSpares stops the resume spares waiting and returns once they
// have ended (runner.ResumeSparer).
func (r *Runner) DropResumeSpares() {
	r.resumeMu.Lock()
	spares := r.resumeSpares
	r.resumeSpares = nil
	r.resumeGen++ // a spare starting now is not kept
	r.resumeMu.Unlock()
	for _, sp := range spares {
		_ = sp.Stop(context.Background())
	}
}
