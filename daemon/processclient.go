package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/errcat"
	"github.com/containerd/errdefs"
)

// ProcessStream starts, or with spec.Attach attaches to, kept process
// spec.ID in box name and passes stdio on until its exit status, which it
// returns (see agent.Client.Process). The end of stdio.Stdin is not the
// process's input's: CloseProcessStdin ends it, after the input sent
// before. An error wrapping agent.ErrDetached (and errdefs.ErrUnavailable)
// says the stream ended first (the box was hibernated, the daemon or the
// connection went away, ctx ended): the process runs on, and a later
// attach gets what it writes next and its exit status.
func (c *Client) ProcessStream(ctx context.Context, name string, spec agent.ProcessSpec, stdio agent.ProcessIO) (int, error) {
	body, err := json.Marshal(spec)
	if err != nil {
		return -1, err
	}
	code, err := c.stream(ctx, boxPath(name, "processes"), body, ExecOptions{Stdin: stdio.Stdin, Stdout: stdio.Stdout, Stderr: stdio.Stderr})
	if err != nil && !errors.Is(err, agent.ErrDetached) && (errors.Is(err, errStreamLost) || ctx.Err() != nil) {
		err = errcat.With(fmt.Errorf("process %q in box %q: %w (%w)", spec.ID, name, agent.ErrDetached, err), errdefs.ErrUnavailable)
	}
	return code, err
}

// processPath is the path of kept process id of box name, with rest.
func processPath(name, id string, rest ...string) string {
	return boxPath(name, append([]string{"processes", url.PathEscape(id)}, rest...)...)
}

// Processes lists the kept processes of box name.
func (c *Client) Processes(ctx context.Context, name string) ([]agent.ProcessInfo, error) {
	var out []agent.ProcessInfo
	return out, c.do(ctx, http.MethodGet, boxPath(name, "processes"), nil, &out)
}

// SignalProcess sends Linux signal sig to kept process id of box name
// (with a terminal, to its process group).
func (c *Client) SignalProcess(ctx context.Context, name, id string, sig int) error {
	return c.do(ctx, http.MethodPost, processPath(name, id, "signal"), ProcessSignalRequest{Signal: sig}, nil)
}

// ResizeProcess changes the terminal of kept process id of box name.
func (c *Client) ResizeProcess(ctx context.Context, name, id string, rows, cols int) error {
	return c.do(ctx, http.MethodPost, processPath(name, id, "resize"), ProcessResizeRequest{Rows: rows, Cols: cols}, nil)
}

// CloseProcessStdin ends the input of kept process id of box name.
func (c *Client) CloseProcessStdin(ctx context.Context, name, id string) error {
	return c.do(ctx, http.MethodPost, processPath(name, id, "close-stdin"), nil, nil)
}

// ForgetProcess kills kept process id of box name if it runs and forgets
// it and its exit status.
func (c *Client) ForgetProcess(ctx context.Context, name, id string) error {
	return c.do(ctx, http.MethodDelete, processPath(name, id), nil, nil)
}
