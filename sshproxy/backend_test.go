package sshproxy

import (
	"context"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/containerd/errdefs"
	"golang.org/x/crypto/ssh"
)

// testBackend is a Backend whose boxes are boxd's real agent served in the
// test process over a socket pair, standing in for the virtio-serial port
// of a VM. So sessions run as processes of the test host (as root, in
// /root); tests give each box a temporary directory and use absolute paths
// in it. Like boxd's box manager, it holds one *ssh.Client per box and
// hands it to every connection.
type testBackend struct {
	t *testing.T

	mu         sync.Mutex
	keys       map[string][]ssh.PublicKey
	clients    map[string]*agent.Client
	hosts      map[string]net.Conn // the host end of each box's agent channel
	connectErr map[string]error
	connects   map[string]int
	delay      map[string]time.Duration // how long Connect takes, as for a box that resumes
}

func newTestBackend(t *testing.T) *testBackend {
	return &testBackend{
		t:          t,
		keys:       map[string][]ssh.PublicKey{},
		clients:    map[string]*agent.Client{},
		hosts:      map[string]net.Conn{},
		connectErr: map[string]error{},
		connects:   map[string]int{},
		delay:      map[string]time.Duration{},
	}
}

// addBox creates box name, reachable with keys, and returns a directory
// for the test's files in it.
func (b *testBackend) addBox(name string, keys ...ssh.PublicKey) string {
	dir := b.t.TempDir()
	b.mu.Lock()
	defer b.mu.Unlock()
	b.keys[name] = keys
	return dir
}

func (b *testBackend) AuthorizedKeys(_ context.Context, box string) ([]ssh.PublicKey, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	keys, ok := b.keys[box]
	if !ok {
		return nil, fmt.Errorf("box %q: %w", box, errdefs.ErrNotFound)
	}
	return keys, nil
}

func (b *testBackend) Connect(ctx context.Context, box string) (*ssh.Client, error) {
	b.mu.Lock()
	d := b.delay[box]
	b.mu.Unlock()
	select {
	case <-time.After(d):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.connects[box]++
	if err := b.connectErr[box]; err != nil {
		return nil, err
	}
	if c := b.clients[box]; c != nil {
		return c.SSH(), nil
	}
	if _, ok := b.keys[box]; !ok {
		return nil, fmt.Errorf("box %q: %w", box, errdefs.ErrNotFound)
	}
	host, guest, err := testutil.SocketPair()
	if err != nil {
		return nil, err
	}
	serveCtx, stop := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() {
		defer close(served)
		agent.Serve(serveCtx, guest, &agent.ServerConfig{Logf: b.t.Logf})
	}()
	c, err := agent.NewClient(ctx, host)
	if err != nil {
		stop()
		<-served
		return nil, err
	}
	b.clients[box] = c
	b.hosts[box] = host
	b.t.Cleanup(func() {
		c.Close()
		stop()
		<-served
	})
	return c.SSH(), nil
}

// cut ends box's agent channel, as a crashed box would. The next Connect
// starts a fresh one.
func (b *testBackend) cut(box string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if h := b.hosts[box]; h != nil {
		h.Close()
	}
	delete(b.clients, box)
	delete(b.hosts, box)
}

func (b *testBackend) connectCount(box string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.connects[box]
}

func (b *testBackend) failConnect(box string, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.connectErr[box] = err
}

// slowConnect has Connect to box take d, as for a box that resumes.
func (b *testBackend) slowConnect(box string, d time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.delay[box] = d
}
