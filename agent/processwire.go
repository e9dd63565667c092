package agent

import (
	"errors"
	"fmt"
	"strings"

	"github.com/boxd-dev/boxd/errcat"
)

// ErrDetached is the error of a client's attachment to a kept process that
// ended before the process's exit status came: the channel or the
// connection broke, or the caller's context ended. The process runs on in
// the guest; a later attach (ProcessSpec.Attach) gets what it writes next
// and its exit status.
var ErrDetached = errors.New("detached from the kept process before its exit status")

// processFailure is the payload of a refused kept-process request or
// channel: the error's category as errcat names it on the wire, ": ", and
// the error's sentence (the sentence alone for an error of no category).
func processFailure(err error) string {
	if w := wireOf(err); w != "" {
		return w + ": " + err.Error()
	}
	return err.Error()
}

// processRefusal rebuilds the error of a refusal's payload msg (see
// processFailure), in its category, for the client's operation what.
func processRefusal(what, msg string) error {
	if wire, rest, ok := strings.Cut(msg, ": "); ok {
		if r, ok := errcat.Named(wire); ok {
			return errcat.With(fmt.Errorf("%s: %s", what, rest), r.Category)
		}
	}
	if msg == "" {
		msg = "refused"
	}
	return fmt.Errorf("%s: %s", what, msg)
}
