package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
	"github.com/boxd-dev/boxd/guest"
)

// bench is one run: the kept root, its daemon of the moment, and what the
// clean-up found.
type bench struct {
	boxd benchkit.Boxd // the boxd binary on DIR/root
	dir  string        // the kept folder

	daemon *benchkit.Daemon // nil between phases

	tornDown bool
	cleanup  benchkit.Cleanup
}

// box is the measured box; kid its forks, each removed before the next.
const (
	box = "dev"
	kid = "kid"
)

// setUp makes or finds the image, clears what an earlier run left, and
// makes the box, leaving it hibernated and no daemon running: every phase
// starts from there. The bench it returns (also on failure, once there is
// one) must be torn down.
func setUp(ctx context.Context) (*bench, error) {
	bx, d, err := benchkit.OpenRoot(*dir, *boxdBin, "bench/metrics.sh", "pgrep", "qemu-system-x86_64")
	if err != nil {
		return nil, err
	}
	b := &bench{boxd: bx, dir: d}
	benchkit.Progress("root %s (kept: store, image, kernel), daemon log %s", b.boxd.Root, b.daemonLog())

	took, err := b.boxd.EnsureImage(ctx, guest.DefaultImage, *treeCache)
	if err != nil {
		return b, err
	}
	if took > 0 {
		benchkit.Progress("image built in %s", secs(took))
	}

	// A run cut short leaves boxes, and the snapshots boxd keeps of them,
	// which only a stopped daemon's store can drop.
	left, err := b.boxd.BoxSnapshots(ctx)
	if err != nil {
		return b, err
	}
	if _, err := b.startDaemon(ctx, false); err != nil {
		return b, err
	}
	n, err := b.boxd.RemoveBoxes(ctx)
	if err != nil {
		return b, fmt.Errorf("removing an earlier run's boxes: %w", err)
	}
	if n > 0 || len(left) > 0 {
		benchkit.Progress("an earlier run left %d boxes and %d box snapshots: removed", n, len(left))
		if err := b.stopDaemon(); err != nil {
			return b, err
		}
		if _, err := b.boxd.ClearStore(ctx); err != nil {
			return b, err
		}
		if _, err := b.startDaemon(ctx, false); err != nil {
			return b, err
		}
	}
	if took, _, err = b.boxd.CLI(ctx, "create", box, "--memory", *memory, "--runner", "qemu"); err != nil {
		return b, err
	}
	benchkit.Progress("created box %s (%s, qemu runner) in %s", box, *memory, secs(took))
	return b, b.stopDaemon() // which hibernates the box
}

func (b *bench) daemonLog() string { return benchkit.DaemonLog(b.dir) }

// startDaemon starts the root's daemon, with metrics served on a free port
// of 127.0.0.1 when withMetrics, and returns their URL ("" without).
func (b *bench) startDaemon(ctx context.Context, withMetrics bool) (string, error) {
	args := []string{"--ssh-listen", "127.0.0.1:0", "--idle-hibernate", "0"}
	if withMetrics {
		args = append(args, "--metrics-listen", "127.0.0.1:0")
	}
	d, err := b.boxd.StartDaemon(ctx, b.daemonLog(), args...)
	if err != nil {
		return "", err
	}
	b.daemon = d
	url := ""
	if withMetrics {
		_, after, ok := strings.Cut(d.Ready, ", metrics on ")
		if !ok {
			return "", fmt.Errorf("boxd daemon --metrics-listen named no metrics URL: %q", d.Ready)
		}
		url = strings.TrimSpace(after)
	}
	return url, nil
}

// stopDaemon stops the daemon with SIGTERM (it hibernates running boxes
// first).
func (b *bench) stopDaemon() error {
	err := b.daemon.Stop()
	b.daemon = nil
	return err
}

// running makes the box run, untimed: a fresh daemon finds it hibernated.
func (b *bench) running(ctx context.Context) error {
	st, err := b.boxd.State(ctx, box)
	if err != nil {
		return err
	}
	switch st {
	case "running":
		return nil
	case "hibernated":
		_, _, err = b.boxd.CLI(ctx, "resume", box)
	default:
		_, _, err = b.boxd.CLI(ctx, "start", box)
	}
	if err != nil {
		return err
	}
	if st, err = b.boxd.State(ctx, box); err == nil && st != "running" {
		err = fmt.Errorf("box %s is %s, want running", box, st)
	}
	return err
}

// settle waits until the root's QEMU processes have stayed the same for a
// second (at most 30 s): after a fork or a resume the daemon starts spare
// machines for the box's next fork, and a timed operation should not share
// the CPUs with them.
func (b *bench) settle(ctx context.Context) error {
	deadline := time.Now().Add(30 * time.Second)
	_, last := b.boxd.QEMUs(ctx)
	since := time.Now()
	for time.Since(since) < time.Second && time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
		if _, now := b.boxd.QEMUs(ctx); !slices.Equal(now, last) {
			last, since = now, time.Now()
		}
	}
	return nil
}

// tearDown removes the box, stops the daemon, checks that no QEMU of the
// root is left (killing any), and drops what boxd kept of the box
// (benchkit.Boxd.Clean). Between phases no daemon runs: one is started to
// remove the box. A second call does nothing.
func (b *bench) tearDown() error {
	if b == nil || b.tornDown {
		return nil
	}
	b.tornDown = true
	var errs []error
	if b.daemon == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		_, err := b.startDaemon(ctx, false)
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("starting the daemon to remove the box: %w", err))
		}
	}
	c, err := b.boxd.Clean(b.daemon)
	b.daemon, b.cleanup = nil, c
	return errors.Join(append(errs, err)...)
}

// showDaemonLog prints the end of the daemon's log on stderr.
func (b *bench) showDaemonLog() {
	if b != nil {
		benchkit.ShowTail(b.daemonLog(), 20)
	}
}

// scraper GETs a metrics URL every so often, as Prometheus would, until
// stopped, and checks each answer.
type scraper struct {
	stop chan struct{}
	done chan struct{}

	mu    sync.Mutex // protects the fields below
	took  []time.Duration
	fails []string
}

// scrape starts scraping url every interval, the first time at once.
func scrape(url string, interval time.Duration) *scraper {
	s := &scraper{stop: make(chan struct{}), done: make(chan struct{})}
	c := &http.Client{Timeout: 10 * time.Second}
	go func() {
		defer close(s.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			start := time.Now()
			err := scrapeOnce(c, url)
			took := time.Since(start)
			s.mu.Lock()
			s.took = append(s.took, took)
			if err != nil {
				s.fails = append(s.fails, err.Error())
			}
			s.mu.Unlock()
			select {
			case <-s.stop:
				return
			case <-t.C:
			}
		}
	}()
	return s
}

// scrapeOnce GETs url and checks that it answers 200 with boxd's figures.
func scrapeOnce(c *http.Client, url string) error {
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("GET %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	if !strings.Contains(string(body), "boxd_boxes") {
		return fmt.Errorf("GET %s: no boxd_boxes in %d bytes", url, len(body))
	}
	return nil
}

// end stops the scraper and returns each scrape's time and the failures.
func (s *scraper) end() ([]time.Duration, []string) {
	close(s.stop)
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.took, s.fails
}
