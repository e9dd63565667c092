//go:build linux

package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/agent"
)

// TestMain runs the test binary as the command itself when BOXD_AGENT_TEST_MAIN is set, so that tests can start it.
func TestMain(m *testing.M) {
	if os.Getenv("BOXD_AGENT_TEST_MAIN") != "" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestServeSignalsOfCommands starts `boxd-agent serve --socket` with SIGHUP and SIGINT ignored, as nohup and a
// shell's & leave them, and checks the commands it runs have neither ignored.
func TestServeSignalsOfCommands(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(t.TempDir(), "agent.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.Command("sh", "-c", `trap "" HUP INT; exec "$0" "$@"`, self, "serve", "--socket", socket)
	cmd.Env = append(os.Environ(), "BOXD_AGENT_TEST_MAIN=1")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
	}()
	for _, err := os.Stat(socket); err != nil; _, err = os.Stat(socket) {
		if ctx.Err() != nil {
			t.Fatal("the agent made no socket")
		}
		time.Sleep(20 * time.Millisecond)
	}
	c, err := agent.Dial(ctx, socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	out, err := c.Output(ctx, "cat", "/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	ign, err := ignoredSignals(string(out))
	if err != nil {
		t.Fatal(err)
	}
	for _, sig := range []struct {
		name string
		num  uint
	}{{"SIGHUP", 1}, {"SIGINT", 2}} {
		if ign&(1<<(sig.num-1)) != 0 {
			t.Errorf("a command of an agent started with %s ignored has it ignored too (SigIgn %#x)", sig.name, ign)
		}
	}
}

// ignoredSignals is the SigIgn mask of a /proc/PID/status.
func ignoredSignals(status string) (uint64, error) {
	for l := range strings.Lines(status) {
		if v, ok := strings.CutPrefix(l, "SigIgn:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	return 0, os.ErrNotExist
}
