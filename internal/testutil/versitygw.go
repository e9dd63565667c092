package testutil

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// VersityGWVersion is the S3 server the remote store's tests run against.
const VersityGWVersion = "v1.8.0"

// versityGW builds versitygw (minutes on two cores) into the tools cache.
var versityGW = GoTool{Name: "versitygw", Version: VersityGWVersion, Pkgs: []string{"github.com/versity/versitygw/cmd/versitygw"}}

// VersityGW returns the versitygw binary, building it into the tools cache
// once (see GoTool).
func VersityGW(ctx context.Context, t testing.TB) string {
	t.Helper()
	return filepath.Join(versityGW.Build(ctx, t), "versitygw")
}

// S3Server is a versitygw serving a posix folder on 127.0.0.1.
type S3Server struct {
	Endpoint          string // http://127.0.0.1:PORT
	AccessKey, Secret string
	Data              string // the folder it serves: each subfolder a bucket
	cmd               *exec.Cmd
}

// Env returns the AWS environment variables that reach the server.
func (s *S3Server) Env() []string {
	return []string{
		"AWS_ACCESS_KEY_ID=" + s.AccessKey, "AWS_SECRET_ACCESS_KEY=" + s.Secret,
		"AWS_REGION=us-east-1", "AWS_ENDPOINT_URL_S3=" + s.Endpoint,
	}
}

// SetEnv sets Env for the rest of the test.
func (s *S3Server) SetEnv(t testing.TB) {
	for _, kv := range s.Env() {
		for i := range kv {
			if kv[i] == '=' {
				t.Setenv(kv[:i], kv[i+1:])
				break
			}
		}
	}
}

// Stop kills the server; Start runs it again on the same port and folders.
func (s *S3Server) Stop() {
	if s.cmd != nil {
		_ = s.cmd.Process.Kill()
		_ = s.cmd.Wait()
		s.cmd = nil
	}
}

// StartS3 starts versitygw on a free port of 127.0.0.1 with folders of its
// own under dir, and bucket made; the test's end stops it.
func StartS3(ctx context.Context, t testing.TB, dir, bucket string) *S3Server {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	s := &S3Server{
		Endpoint: "http://127.0.0.1:" + strconv.Itoa(port), AccessKey: "boxdtest", Secret: "boxdtestsecret",
		Data: filepath.Join(dir, "data"),
	}
	if err := os.MkdirAll(filepath.Join(s.Data, bucket), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "meta"), 0o700); err != nil {
		t.Fatal(err)
	}
	bin := VersityGW(ctx, t)
	s.start(t, bin, filepath.Join(dir, "meta"), filepath.Join(dir, "versitygw.log"))
	t.Cleanup(s.Stop)
	return s
}

// Restart starts a stopped server again.
func (s *S3Server) Restart(t testing.TB) {
	t.Helper()
	dir := filepath.Dir(s.Data)
	s.start(t, VersityGW(context.Background(), t), filepath.Join(dir, "meta"), filepath.Join(dir, "versitygw.log"))
}

func (s *S3Server) start(t testing.TB, bin, meta, logPath string) {
	t.Helper()
	log, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	cmd := exec.Command(bin, "--port", s.Endpoint[len("http://"):], "posix", "--sidecar", meta, s.Data)
	cmd.Env = append(os.Environ(), "ROOT_ACCESS_KEY="+s.AccessKey, "ROOT_SECRET_KEY="+s.Secret)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s.cmd = cmd
	for i := 0; ; i++ {
		c, err := net.Dial("tcp", s.Endpoint[len("http://"):])
		if err == nil {
			c.Close()
			return
		}
		if i > 100 {
			b, _ := os.ReadFile(logPath)
			t.Fatalf("versitygw did not come up: %v\n%s", err, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
