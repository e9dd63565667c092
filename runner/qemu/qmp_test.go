package qemu

import (
	"bufio"
	"context"
	"net"
	"path/filepath"
	"testing"
)

// dialQMP reads QEMU's version from its greeting.
func TestQMPGreetingVersion(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		// As QEMU 7.2.22 greets, then the answer to qmp_capabilities.
		_, _ = c.Write([]byte(`{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b2"}, "capabilities": ["oob"]}}` + "\r\n"))
		r := bufio.NewReader(c)
		if _, err := r.ReadBytes('\n'); err != nil {
			return
		}
		_, _ = c.Write([]byte(`{"return": {}}` + "\r\n"))
	}()
	q, err := dialQMP(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer q.close()
	if want := (qemuVersion{7, 2, 22}); q.version != want {
		t.Fatalf("version %v, want %v", q.version, want)
	}
}

// Live copies need dirty tracking that loses no write: KVM's, or QEMU's
// own under TCG from 9.0 on.
func TestSoundDirtyTracking(t *testing.T) {
	for _, c := range []struct {
		accel string
		v     qemuVersion
		want  bool
	}{
		{AccelTCG, qemuVersion{7, 2, 22}, false},
		{AccelTCG, qemuVersion{8, 2, 9}, false},
		{AccelTCG, qemuVersion{9, 0, 0}, true},
		{AccelTCG, qemuVersion{10, 1, 0}, true},
		{AccelKVM, qemuVersion{7, 2, 22}, true},
		{AccelTCG, qemuVersion{}, false}, // a greeting without a version
	} {
		if got := soundDirtyTracking(c.accel, c.v); got != c.want {
			t.Errorf("soundDirtyTracking(%s, %v) = %v, want %v", c.accel, c.v, got, c.want)
		}
	}
}
