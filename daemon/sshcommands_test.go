package daemon

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/boxd-dev/boxd/sshproxy"
	"github.com/containerd/errdefs"
)

func TestParseSSHCommand(t *testing.T) {
	for _, tc := range []struct {
		line string
		want []string // boxd's arguments; nil for a refusal
		err  string   // in the refusal
	}{
		{"ls", []string{"ls"}, ""},
		{"  ls  --json ", []string{"ls", "--json"}, ""},
		{"ls -json", []string{"ls", "--json"}, ""},
		{"create dev", []string{"create", "dev"}, ""},
		{"create dev --memory 1G --cpus=2 --image debian-bookworm", []string{"create", "--memory=1G", "--cpus=2", "--image=debian-bookworm", "dev"}, ""},
		{"create --json 'dev'", []string{"create", "--json", "dev"}, ""},
		{`create "dev"`, []string{"create", "dev"}, ""},
		{`create d\ev`, []string{"create", "dev"}, ""},
		{"fork dev f --count 3", []string{"fork", "--count=3", "dev", "f"}, ""},
		{"hibernate dev", []string{"hibernate", "dev"}, ""},
		{"resume dev --json", []string{"resume", "--json", "dev"}, ""},
		{"rm dev", []string{"rm", "dev"}, ""},
		{"snapshots", []string{"snapshots"}, ""},
		{"snapshots dev", []string{"snapshots", "dev"}, ""},
		{"report", []string{"report"}, ""},
		{"report a b c", []string{"report", "a", "b", "c"}, ""},
		// A value is passed whole, never as a flag of its own.
		{"create dev --image --root", []string{"create", "--image=--root", "dev"}, ""},
		{"create dev --image='a b'", []string{"create", "--image=a b", "dev"}, ""},

		{"", nil, "give a command"},
		{"   ", nil, "give a command"},
		{"exec dev -- ls", nil, `"exec" is not one of the commands`},
		{"start dev", nil, `"start" is not one of the commands`},
		{"keys ls", nil, `"keys" is not one of the commands`},
		{"daemon", nil, `"daemon" is not one of the commands`},
		{"--root /tmp ls", nil, `"--root" is not one of the commands`},
		{"LS", nil, `"LS" is not one of the commands`},
		{"ls extra", nil, "usage: ls [--json]"},
		{"create", nil, "usage: create NAME"},
		{"create a b", nil, "usage: create NAME"},
		{"fork dev", nil, "usage: fork SRC NEW"},
		{"rm", nil, "usage: rm NAME"},
		{"snapshots a b", nil, "usage: snapshots [NAME]"},
		{"create dev --ssh-key /etc/passwd", nil, "--ssh-key is not a flag"},
		{"create dev --from box.other.s1", nil, "--from is not a flag"},
		{"create dev --runner=kvm", nil, "--runner=kvm is not a flag"},
		{"ls --root /tmp", nil, "--root is not a flag"},
		{"rm --help", nil, "--help is not a flag"},
		{"rm -h dev", nil, "-h is not a flag"},
		{"rm -- dev", nil, "-- is not a flag"},
		{"fork a b --count", nil, "--count needs a value"},
		{"ls --json=false", nil, "--json takes no value"},
		{"ls; rm dev", nil, `";" in the command is shell syntax`},
		{"ls && rm dev", nil, `"&" in the command is shell syntax`},
		{"ls | cat", nil, `"|" in the command is shell syntax`},
		{"ls > /tmp/x", nil, `">" in the command is shell syntax`},
		{"rm $(echo dev)", nil, `"$" in the command is shell syntax`},
		{"rm `echo dev`", nil, "\"`\" in the command is shell syntax"},
		{`rm "$NAME"`, nil, `"$" in the command is shell syntax`},
		{"ls\nrm dev", nil, `"\n" in the command is shell syntax`},
		{"ls # comment", nil, `"#" in the command is shell syntax`},
		{"rm 'dev", nil, "' without its closing '"},
		{`rm "dev`, nil, `" without its closing "`},
		{`rm dev\`, nil, `ends in a \`},
	} {
		t.Run(tc.line, func(t *testing.T) {
			got, err := ParseSSHCommand(tc.line)
			if tc.want != nil {
				if err != nil || !slices.Equal(got, tc.want) {
					t.Fatalf("got %q, %v; want %q", got, err, tc.want)
				}
				return
			}
			if err == nil {
				t.Fatalf("got %q, want a refusal saying %q", got, tc.err)
			}
			if !errors.Is(err, errdefs.ErrInvalidArgument) || errcat.ExitCode(err) != 2 || !strings.Contains(err.Error(), tc.err) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("refusal %q (exit %d), want one line of exit 2 saying %q", err, errcat.ExitCode(err), tc.err)
			}
		})
	}
	if _, err := ParseSSHCommand("help"); !errors.Is(err, errSSHHelp) {
		t.Fatalf("help: %v", err)
	}
}

// TestRunCommand runs commands on a stand-in for boxd that prints its
// arguments and environment and exits with the status it is asked for.
func TestRunCommand(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "boxd")
	script := "#!/bin/sh\necho \"args: $*\"\nenv | sort\necho oops >&2\nfor a; do case $a in exit*) exit ${a#exit};; esac; done\n"
	if err := os.WriteFile(exe, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SECRET", "from-the-daemon")
	r := &commandRunner{root: "/srv/boxd", exe: exe}
	run := func(line string) (string, string, int) {
		var stdout, stderr bytes.Buffer
		code := r.RunCommand(context.Background(), sshproxy.Command{Key: "SHA256:k", Line: line, Addr: "10.0.0.1:2222", Stdout: &stdout, Stderr: &stderr})
		return stdout.String(), stderr.String(), code
	}

	out, errOut, code := run("rm exit4")
	if code != 4 || errOut != "oops\n" {
		t.Fatalf("exit %d, stderr %q; want 4 and the command's stderr", code, errOut)
	}
	want := []string{
		"args: --root /srv/boxd rm exit4",
		OwnerEnv + "=SHA256:k",
		FrontDoorEnv + "=10.0.0.1:2222",
	}
	for _, w := range want {
		if !strings.Contains(out, w+"\n") {
			t.Errorf("stdout %q lacks %q", out, w)
		}
	}
	if strings.Contains(out, "SECRET") {
		t.Errorf("the daemon's environment reached the command: %q", out)
	}
	if _, _, code := run("ls"); code != 0 {
		t.Errorf("ls: exit %d", code)
	}

	out, errOut, code = run("exec dev -- sh")
	if code != 2 || out != "" || !strings.HasPrefix(errOut, `boxd: "exec" is not one of the commands`) || strings.Count(errOut, "\n") != 1 {
		t.Fatalf("a command outside the list: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	out, _, code = run("help")
	if code != 0 || !strings.Contains(out, "fork SRC NEW [--count N]") {
		t.Fatalf("help: exit %d, %q", code, out)
	}
}
