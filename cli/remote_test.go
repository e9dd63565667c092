package cli_test

import "testing"

// TestRemoteUsage: bad input to the remote store's flags and commands gets
// one line and the usage exit code; the commands that need the daemon say
// so when none runs.
func TestRemoteUsage(t *testing.T) {
	root := t.TempDir()
	for _, tc := range []struct {
		code int
		want []string
		args []string
	}{
		{2, []string{"--remote", "s3://BUCKET"}, []string{"daemon", "--remote", "http://host/bucket"}},
		{2, []string{"--remote", "s3://BUCKET"}, []string{"daemon", "--remote", "s3:///prefix"}},
		{2, []string{"--remote-cache-size needs --remote"}, []string{"daemon", "--remote-cache-size", "1G"}},
		{2, []string{"size \"lots\""}, []string{"daemon", "--remote", "s3://b/p", "--remote-cache-size", "lots"}},
		{2, []string{"usage: boxd store push NAME"}, []string{"store", "push"}},
		{2, []string{"usage: boxd store pull NAME"}, []string{"store", "pull", "a", "b"}},
		{8, []string{"boxd store push works through the daemon"}, []string{"store", "push", "dev"}},
		{2, []string{"usage: boxd store break-lease NAME HOST"}, []string{"store", "break-lease", "dev"}},
	} {
		fails(t, tc.code, root, tc.want, tc.args...)
	}
}
