package agent

import (
	"io"
	"os"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"
)

// stdinWait bounds how long a close-stdin waits for the input the attached
// channel already carries to reach the process.
const stdinWait = 2 * time.Second

// eot is a terminal's end of file character (VEOF, ^D), which close-stdin
// writes on a kept process's terminal.
const eot = 0x04

// attachment is one channel attached to a kept process.
type attachment struct {
	ch ssh.Channel
	// inputDone is closed once the channel's input was all passed on: at
	// its end of file or its close.
	inputDone chan struct{}
	closeOnce sync.Once
}

func (a *attachment) close() { a.closeOnce.Do(func() { _ = a.ch.Close() }) }

// keptOutput is one output stream of a kept process.
type keptOutput struct {
	f    *os.File
	ext  bool          // standard error: the channel's extended data of type 1
	done chan struct{} // closed when all of it was sent, or the process forgotten
	// pending is what the pump read and could not send, for the next
	// attachment; the pump alone uses it.
	pending []byte
}

// write sends p on a's stream for o.
func (o *keptOutput) write(a *attachment, p []byte) (int, error) {
	if o.ext {
		return a.ch.Stderr().Write(p)
	}
	return a.ch.Write(p)
}

// attached waits for an attachment and returns it; nil once the process is
// forgotten.
func (k *kept) attached() *attachment {
	k.mu.Lock()
	defer k.mu.Unlock()
	for k.att == nil && !k.forgot {
		k.cond.Wait()
	}
	return k.att
}

// lost drops attachment a, whose channel ended or failed.
func (k *kept) lost(a *attachment) {
	k.mu.Lock()
	if k.att == a {
		k.att = nil
	}
	k.mu.Unlock()
	a.close()
}

// pump copies o to the attachments, one after another, until its end: it
// reads only while one is attached (else the output waits in the pipe),
// and a chunk it read and could not send waits in o.pending for the next.
func (k *kept) pump(o *keptOutput) {
	defer close(o.done)
	buf := make([]byte, 32<<10)
	eof := false
	for !eof || len(o.pending) > 0 {
		a := k.attached()
		if a == nil {
			return
		}
		if len(o.pending) > 0 {
			n, err := o.write(a, o.pending)
			o.pending = o.pending[n:]
			if err != nil {
				k.lost(a)
				continue
			}
			o.pending = nil
			continue
		}
		n, err := o.f.Read(buf)
		if n > 0 {
			if m, werr := o.write(a, buf[:n]); werr != nil {
				o.pending = append([]byte(nil), buf[m:n]...)
				k.lost(a)
			}
		}
		if err != nil {
			eof = true // end of file, EIO (a pty's end), or closed by drain
		}
	}
}

// await waits for the process's exit status (through the Reaper: nothing
// else may reap it), then for its output to be all sent, and sends the
// status to the attachment of the time.
func (k *kept) await(wait func() unix.WaitStatus) {
	ws := wait()
	k.mu.Lock()
	k.exited, k.status = true, exitCode(ws)
	k.mu.Unlock()
	// As a session's: output still open once outputGrace has passed with
	// no bytes in it is closed (a background process holds it); bytes
	// that wait for an attachment keep it open.
	outs := make([]output, len(k.outs))
	for i, o := range k.outs {
		outs[i] = output{o.f, o.done}
	}
	drain(outs)
	for _, o := range k.outs {
		o.f.Close()
	}
	k.stdin.Close()
	k.mu.Lock()
	k.complete = true
	a := k.att
	k.att = nil
	k.mu.Unlock()
	if a != nil {
		k.sendExit(a)
	}
}

// sendExit sends the exit status on a and closes it.
func (k *kept) sendExit(a *attachment) {
	k.mu.Lock()
	status := k.status
	k.mu.Unlock()
	_, _ = a.ch.SendRequest("exit-status", false, ssh.Marshal(exitStatusMsg{Status: uint32(status)}))
	_ = a.ch.CloseWrite()
	a.close()
}

// attach makes ch the process's attachment (an earlier one is closed) until
// ch ends: its data goes to the process's input, the output that waits
// comes out on it, and once the process is complete, its exit status.
func (k *kept) attach(ch ssh.Channel, reqs <-chan *ssh.Request) {
	a := &attachment{ch: ch, inputDone: make(chan struct{})}
	k.mu.Lock()
	old, complete, forgot := k.att, k.complete, k.forgot
	if !complete && !forgot {
		k.att = a
		k.cond.Broadcast()
	}
	k.mu.Unlock()
	if old != nil {
		old.close()
	}
	go func() {
		defer close(a.inputDone)
		if _, err := io.Copy(keptInput{k}, ch); err != nil {
			// The input was closed: what comes later is dropped.
			_, _ = io.Copy(io.Discard, ch)
		}
	}()
	switch {
	case complete:
		k.sendExit(a)
	case forgot:
		a.close()
	}
	for req := range reqs {
		if req.WantReply {
			_ = req.Reply(false, nil)
		}
	}
	k.lost(a)
}

// keptInput writes to a kept process's input until it is closed.
type keptInput struct{ k *kept }

func (in keptInput) Write(p []byte) (int, error) {
	if in.k.inputClosed.Load() {
		return 0, os.ErrClosed
	}
	return in.k.stdin.Write(p)
}

// closeStdin ends the process's input, once the input the attached channel
// carries has reached it (for at most stdinWait). With a terminal, it
// writes the terminal's end of file character and drops later input.
func (k *kept) closeStdin() {
	k.mu.Lock()
	a := k.att
	k.mu.Unlock()
	if a != nil {
		t := time.NewTimer(stdinWait)
		select {
		case <-a.inputDone:
		case <-t.C:
		}
		t.Stop()
	}
	k.stdinOnce.Do(func() {
		k.inputClosed.Store(true)
		if k.terminal {
			_, _ = k.stdin.Write([]byte{eot})
			return
		}
		k.stdin.Close()
	})
}

// forget kills the process if it runs and lets go of it: its attachment is
// closed and its output no longer waits.
func (k *kept) forget() {
	k.mu.Lock()
	k.forgot = true
	if !k.exited {
		pid := k.pid
		if k.terminal {
			pid = -pid
		}
		_ = unix.Kill(pid, unix.SIGKILL)
	}
	a := k.att
	k.att = nil
	k.cond.Broadcast()
	k.mu.Unlock()
	if a != nil {
		a.close()
	}
}
