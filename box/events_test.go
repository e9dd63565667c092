package box_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/events"
)

// Every change of a box's state is one event, in order, with why.
func TestFakeEvents(t *testing.T) {
	x := events.New(0)
	e := newFakeEnvWith(t, true, func(c *box.Config) { c.Events = x })
	sub := x.Subscribe(time.Time{})
	defer sub.Close()
	ctx := context.Background()
	step := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}

	e.create(t, "dev")
	_, err := e.mgr.Pause(ctx, "dev")
	step("pause", err)
	_, err = e.mgr.Pause(ctx, "dev") // already paused: no event
	step("pause again", err)
	run(ctx, t, e.mgr, "dev", "true") // a use unpauses it
	_, err = e.mgr.Snapshot(ctx, "dev", "s1")
	step("snapshot", err)
	_, err = e.mgr.Fork(ctx, "dev", []string{"a", "b"})
	step("fork", err)
	_, err = e.mgr.Hibernate(ctx, "a")
	step("hibernate", err)
	run(ctx, t, e.mgr, "a", "true") // a use resumes it
	_, err = e.mgr.Hibernate(ctx, "a")
	step("hibernate", err)
	_, err = e.mgr.Resume(ctx, "a")
	step("resume", err)
	_, hib, err := e.mgr.HibernateIfIdle(ctx, "b", func() bool { return true })
	step("idle hibernate", err)
	if !hib {
		t.Fatal("HibernateIfIdle did not hibernate an idle box")
	}
	e.machine(t, "dev").die(errors.New("killed by signal 9"))
	waitFor(t, func() bool { return e.state(t, "dev").State == box.StateStopped })
	_, err = e.mgr.Start(ctx, "dev")
	step("start", err)
	_, err = e.mgr.Stop(ctx, "dev")
	step("stop", err)
	_, err = e.mgr.Stop(ctx, "dev") // already stopped: no event
	step("stop again", err)
	step("remove", e.mgr.Remove(ctx, "b"))

	want := []string{
		"created dev",
		"paused dev requested",
		"unpaused dev used",
		"snapshot dev box.dev.s1",
		"forked a from dev",
		"forked b from dev",
		"hibernated a requested",
		"resumed a used",
		"hibernated a requested",
		"resumed a requested",
		"hibernated b idle",
		"stopped dev its machine exited: killed by signal 9",
		"started dev requested",
		"stopped dev requested",
		"removed b",
	}
	var got []string
	var last uint64
	for len(got) < len(want) {
		select {
		case ev := <-sub.C:
			if ev.Seq != last+1 || ev.Time.IsZero() {
				t.Fatalf("event %+v after seq %d: want the next seq and a time", ev, last)
			}
			last = ev.Seq
			got = append(got, describe(ev))
		case <-time.After(10 * time.Second):
			t.Fatalf("events so far:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("events:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	}
	select {
	case ev := <-sub.C:
		t.Fatalf("an event more: %+v", ev)
	default:
	}
}

// describe is an event as the test's list spells it.
func describe(ev events.Event) string {
	s := ev.Type + " " + ev.Box
	switch ev.Type {
	case events.Forked:
		s += " from " + ev.From
	case events.Snapshot:
		s += " " + ev.Snapshot
	}
	if ev.Reason != "" {
		s += " " + ev.Reason
	}
	return s
}

func waitFor(t *testing.T, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !ok(); {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
