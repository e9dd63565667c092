package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/errcat"
	"golang.org/x/crypto/ssh"
)

// ChannelHost is the channel type the agent opens to the host to ask boxd for
// something on behalf of the guest: the box command run inside a box (box
// fork, box ls, ...). The guest writes one HostRequest as a JSON line; the
// host answers with HostFrames, one JSON line each, the last with Done.
const ChannelHost = "boxd-host@boxd.dev"

// BoxSocket is where the agent serves the box command inside the guest.
const BoxSocket = "/run/box/box.sock"

// ForkFile is where the agent writes a fork child's ForkInfo (as shell
// assignments), for programs that start after the fork.
const ForkFile = "/run/box/fork"

// Operations of a HostRequest.
const (
	OpFork      = "fork"      // fork the box Count ways
	OpList      = "ls"        // the box's family
	OpExec      = "exec"      // run Args in Box, streaming its output
	OpCopy      = "cp"        // stream file Path of Box
	OpRemove    = "rm"        // remove Box, a descendant
	OpHibernate = "hibernate" // hibernate the box itself, after answering
)

// HostRequest is what the guest asks of the host.
type HostRequest struct {
	Op    string   `json:"op"`
	Count int      `json:"count,omitempty"`
	Box   string   `json:"box,omitempty"`
	Args  []string `json:"args,omitempty"`
	Path  string   `json:"path,omitempty"`
}

// maxHostRequest bounds a HostRequest's line.
const maxHostRequest = 1 << 20

// HostFrame is one line of the host's answer.
type HostFrame struct {
	Stdout []byte          `json:"stdout,omitempty"`
	Stderr []byte          `json:"stderr,omitempty"`
	Result json.RawMessage `json:"result,omitempty"` // the operation's answer, in the last frame
	Exit   int             `json:"exit,omitempty"`   // exec's exit status, in the last frame
	Error  string          `json:"error,omitempty"`
	// Category is the errcat category of Error.
	Category string `json:"category,omitempty"`
	// Child is the agent's own answer to a fork in each child: the host's
	// answer went to the parent.
	Child *ForkInfo `json:"child,omitempty"`
	Done  bool      `json:"done,omitempty"`
}

// ForkInfo tells a fork's child which it is. It travels in Unique.
type ForkInfo struct {
	Index  int    `json:"index"`  // 1 to Count
	Count  int    `json:"count"`  // children the fork made
	Parent string `json:"parent"` // the box forked
	Name   string `json:"name"`   // this child's name
}

// HostHandler answers one HostRequest from a box's guest: it writes the
// output of what it runs to stdout and stderr and returns the answer, or an
// error. Its ctx ends when the guest's end of the channel closes (the box
// command was interrupted, or the guest's connection ended).
type HostHandler func(ctx context.Context, req HostRequest, stdout, stderr io.Writer) (HostAnswer, error)

// HostAnswer is a HostHandler's answer.
type HostAnswer struct {
	Result any // sent as JSON
	Exit   int // exec's exit status
	// After, when set, runs once the guest has read the answer (its end
	// closed the channel) or the channel broke: what would stop the guest
	// (a hibernation) must not come before.
	After func()
}

// afterWait bounds how long ServeHost waits for the guest to read an
// answer before it runs HostAnswer.After anyway.
const afterWait = 10 * time.Second

// ServeHost answers the guest's ChannelHost channels with h until the
// connection ends. Without it the host refuses them (an older boxd).
func (c *Client) ServeHost(h HostHandler) {
	chans := c.ssh.HandleChannelOpen(ChannelHost)
	if chans == nil {
		return // already served
	}
	go func() {
		for nch := range chans {
			go serveHostChannel(nch, h)
		}
	}()
}

func serveHostChannel(nch ssh.NewChannel, h HostHandler) {
	ch, reqs, err := nch.Accept()
	if err != nil {
		return
	}
	defer ch.Close()
	go ssh.DiscardRequests(reqs)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	enc := json.NewEncoder(ch)
	send := func(f HostFrame) error {
		mu.Lock()
		defer mu.Unlock()
		return enc.Encode(f)
	}
	line, err := bufio.NewReaderSize(io.LimitReader(ch, maxHostRequest), 4096).ReadBytes('\n')
	var req HostRequest
	if err == nil {
		err = json.Unmarshal(line, &req)
	}
	if err != nil {
		_ = send(HostFrame{Error: fmt.Sprintf("boxd: a bad request from the box: %v", err), Category: "invalid_argument", Done: true})
		return
	}
	// The guest sends nothing after its request: its end closing (the box
	// command gone, or the guest's connection with it) ends the request.
	closed := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, ch)
		cancel()
		close(closed)
	}()
	stdout := frameWriter(func(p []byte) error { return send(HostFrame{Stdout: p}) })
	stderr := frameWriter(func(p []byte) error { return send(HostFrame{Stderr: p}) })
	ans, err := h(ctx, req, stdout, stderr)
	last := HostFrame{Exit: ans.Exit, Done: true}
	if err != nil {
		last.Error, last.Category = err.Error(), wireOf(err)
	} else if ans.Result != nil {
		if last.Result, err = json.Marshal(ans.Result); err != nil {
			last.Error = err.Error()
		}
	}
	_ = send(last)
	_ = ch.CloseWrite()
	if ans.After != nil && last.Error == "" {
		select {
		case <-closed:
		case <-time.After(afterWait):
		}
		go ans.After()
	}
}

// frameWriter is an io.Writer sending each write as a frame.
type frameWriter func(p []byte) error

func (w frameWriter) Write(p []byte) (int, error) {
	if err := w(append([]byte(nil), p...)); err != nil {
		return 0, err
	}
	return len(p), nil
}

// wireOf is err's category as errcat names it on the wire ("" for none).
func wireOf(err error) string {
	if r, ok := errcat.Of(err); ok {
		return r.Wire
	}
	return ""
}
