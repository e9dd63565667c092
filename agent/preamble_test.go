package agent

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
	"time"
)

func TestSkipUntil(t *testing.T) {
	tests := []struct {
		in, want, rest string
		ok             bool
	}{
		{"BOXD-ACK 12\nSSH", "BOXD-ACK 12\n", "SSH", true},
		{"junkBOXD-ACK 1BOXD-ACK 12\nrest", "BOXD-ACK 12\n", "rest", true},
		{"BBOXD-ACK 12\n", "BOXD-ACK 12\n", "", true},
		{"BOXD-ACK 13\nBOXD-ACK 12\n", "BOXD-ACK 12\n", "", true},
		{"BOXD-ACK 1", "BOXD-ACK 12\n", "", false},
	}
	for _, tt := range tests {
		r := bufio.NewReader(strings.NewReader(tt.in))
		err := skipUntil(r, []byte(tt.want))
		if (err == nil) != tt.ok {
			t.Errorf("skipUntil(%q, %q) = %v, want ok %v", tt.in, tt.want, err, tt.ok)
			continue
		}
		if rest, _ := io.ReadAll(r); tt.ok && string(rest) != tt.rest {
			t.Errorf("skipUntil(%q, %q) left %q, want %q", tt.in, tt.want, rest, tt.rest)
		}
	}
}

// TestAcceptPreamble feeds the guest's side what a serial line may hold before a client's SSH version line.
func TestAcceptPreamble(t *testing.T) {
	long := strings.Repeat("\xff", 5000)
	tests := []struct {
		name    string
		in      string
		wantAck string // what the guest writes back
	}{
		{name: "plain SSH", in: "SSH-2.0-OpenSSH_9.2\r\nbinary"},
		{name: "sync", in: "BOXD-SYNC 0a1b\nSSH-2.0-Go\r\nbinary", wantAck: "BOXD-ACK 0a1b\n"},
		{
			name:    "stale bytes and repeated syncs",
			in:      "\x00\x00\x01\x0cstale packet\n" + long + "\nBOXD-SYNC 77\nBOXD-SYNC 77\nBOXD-SYNC 77\nSSH-2.0-Go\r\nbinary",
			wantAck: "BOXD-ACK 77\n",
		},
		{
			name:    "a second host",
			in:      "BOXD-SYNC 01\nBOXD-SYNC 02\nSSH-2.0-Go\r\nbinary",
			wantAck: "BOXD-ACK 01\nBOXD-ACK 02\n",
		},
		{name: "bad nonce", in: "BOXD-SYNC XYZ\nSSH-2.0-Go\r\nbinary"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			client, server := socketPair(t)
			defer client.Close()
			defer server.Close()
			go func() { _, _ = client.Write([]byte(tt.in)) }()
			_ = server.SetDeadline(time.Now().Add(10 * time.Second))
			conn, _, err := acceptPreamble(server)
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len("SSH-2.0-")) // the version line, then the rest
			if _, err := io.ReadFull(conn, got); err != nil || string(got) != "SSH-2.0-" {
				t.Fatalf("SSH reads %q, %v; want the version line", got, err)
			}
			server.Close()
			acks, _ := io.ReadAll(client)
			if string(acks) != tt.wantAck {
				t.Errorf("guest wrote %q, want %q", acks, tt.wantAck)
			}
		})
	}
}

// TestSyncClient answers the host's side of the preamble like a guest behind stale bytes, and an old
// acknowledgement with another nonce.
// TestSyncClient: the host skips what comes before the guest's acknowledgement, and repeats its sync line for a
// guest that missed the first (a session on an old channel that ends at it).
func TestSyncClient(t *testing.T) {
	for _, tc := range []struct {
		name string
		lost int // sync lines the guest drops before it answers
	}{{"first line answered", 0}, {"first line lost", 1}} {
		t.Run(tc.name, func(t *testing.T) {
			client, guest := socketPair(t)
			defer client.Close()
			defer guest.Close()
			go func() {
				r := bufio.NewReader(guest)
				var line string
				for range tc.lost + 1 {
					var err error
					if line, err = r.ReadString('\n'); err != nil {
						return
					}
				}
				nonce := strings.TrimSpace(strings.TrimPrefix(line, syncPrefix))
				_, _ = guest.Write([]byte("stale output\x00BOXD-ACK 0123\nBOXD-ACK " + nonce + "\nSSH-2.0-boxd-agent\r\n"))
			}()
			_ = client.SetDeadline(time.Now().Add(10 * time.Second))
			conn, err := syncClient(client)
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len("SSH-2.0-boxd-agent\r\n"))
			if _, err := io.ReadFull(conn, got); err != nil || !bytes.Equal(got, []byte("SSH-2.0-boxd-agent\r\n")) {
				t.Fatalf("after the preamble SSH reads %q, %v", got, err)
			}
		})
	}
}

// TestSyncClientNoAnswer: a peer that never acknowledges holds the host until the deadline, and no longer.
func TestSyncClientNoAnswer(t *testing.T) {
	client, guest := socketPair(t)
	defer client.Close()
	defer guest.Close()
	go func() { _, _ = io.Copy(io.Discard, guest) }()
	_ = client.SetDeadline(time.Now().Add(300 * time.Millisecond))
	start := time.Now()
	if _, err := syncClient(client); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("sync without an answer: %v; want a timeout", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Errorf("sync gave up after %v", time.Since(start))
	}
}

func TestSyncPause(t *testing.T) {
	for _, tc := range []struct {
		elapsed, want time.Duration
	}{
		{0, syncFast},
		{syncFastFor - time.Millisecond, syncFast},
		{syncFastFor, syncInterval},
		{time.Minute, syncInterval},
	} {
		if got := syncPause(tc.elapsed); got != tc.want {
			t.Errorf("syncPause(%v) = %v, want %v", tc.elapsed, got, tc.want)
		}
	}
}
