package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// qmp is a minimal QMP client: one command at a time, JSON lines, async
// events skipped.
type qmp struct {
	mu      sync.Mutex // one command in flight
	conn    net.Conn
	r       *bufio.Reader
	version qemuVersion // from the greeting
}

// qemuVersion is the version of QEMU its QMP greeting gives.
type qemuVersion struct {
	Major int `json:"major"`
	Minor int `json:"minor"`
	Micro int `json:"micro"`
}

// atLeast says whether v is major.minor or later.
func (v qemuVersion) atLeast(major, minor int) bool {
	return v.Major > major || v.Major == major && v.Minor >= minor
}

func (v qemuVersion) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro) }

// qmpError is an error QEMU returned for a command.
type qmpError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *qmpError) Error() string { return fmt.Sprintf("QMP %s: %s", e.Class, e.Desc) }

type qmpReply struct {
	Return json.RawMessage `json:"return"`
	Error  *qmpError       `json:"error"`
	Event  string          `json:"event"`
	QMP    json.RawMessage `json:"QMP"`
}

// dialQMP connects to the socket at path, reads QEMU's greeting and
// enters command mode (qmp_capabilities).
func dialQMP(ctx context.Context, path string) (*qmp, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	q := &qmp{conn: conn, r: bufio.NewReader(conn)}
	if err := q.deadline(ctx); err != nil {
		_ = conn.Close()
		return nil, err
	}
	var greeting qmpReply
	if err := q.read(&greeting); err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("QMP greeting: %w", err)
	}
	if greeting.QMP == nil {
		_ = conn.Close()
		return nil, errors.New("QMP greeting: no QMP banner")
	}
	var banner struct {
		Version struct {
			QEMU qemuVersion `json:"qemu"`
		} `json:"version"`
	}
	if err := json.Unmarshal(greeting.QMP, &banner); err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("QMP greeting: %w", err)
	}
	q.version = banner.Version.QEMU
	if _, err := q.execute(ctx, "qmp_capabilities", nil); err != nil {
		_ = conn.Close()
		return nil, err
	}
	return q, nil
}

func (q *qmp) deadline(ctx context.Context) error {
	d, ok := ctx.Deadline()
	if !ok {
		d = time.Now().Add(30 * time.Second)
	}
	return q.conn.SetDeadline(d)
}

func (q *qmp) read(v *qmpReply) error {
	line, err := q.r.ReadBytes('\n')
	if err != nil {
		return err
	}
	*v = qmpReply{}
	return json.Unmarshal(line, v)
}

// execute runs one command and returns its "return" value.
func (q *qmp) execute(ctx context.Context, command string, args any) (json.RawMessage, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if err := q.deadline(ctx); err != nil {
		return nil, err
	}
	req := map[string]any{"execute": command}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if _, err := q.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("QMP %s: %w", command, err)
	}
	for {
		var reply qmpReply
		if err := q.read(&reply); err != nil {
			return nil, fmt.Errorf("QMP %s: %w", command, err)
		}
		switch {
		case reply.Event != "":
			continue
		case reply.Error != nil:
			return nil, fmt.Errorf("%s: %w", command, reply.Error)
		case reply.Return != nil:
			return reply.Return, nil
		}
	}
}

func (q *qmp) close() error { return q.conn.Close() }
