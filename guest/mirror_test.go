package guest

import (
	"os"
	"path/filepath"
	"testing"
)

func TestHostMirror(t *testing.T) {
	const debianSources = `Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
`
	const thirdParty = `Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
`
	tests := []struct {
		name  string
		files map[string]string // relative to the apt folder
		suite string
		want  string
	}{
		{"deb822", map[string]string{"sources.list.d/debian.sources": debianSources}, "bookworm", "http://deb.debian.org/debian"},
		{"third party first by name", map[string]string{
			"sources.list.d/a-node.sources": thirdParty,
			"sources.list.d/debian.sources": debianSources,
		}, "bookworm", "http://deb.debian.org/debian"},
		{"one-line with options", map[string]string{"sources.list": `
# deb http://commented.example/debian bookworm main
deb-src http://src.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://mirror.example/debian/ bookworm main contrib
`}, "bookworm", "http://mirror.example/debian"},
		{"sources.list before sources.list.d", map[string]string{
			"sources.list":                  "deb http://first.example/debian bookworm main\n",
			"sources.list.d/debian.sources": debianSources,
		}, "bookworm", "http://first.example/debian"},
		{"exact suite preferred", map[string]string{"sources.list": "deb http://trixie.example/debian trixie main\ndeb http://bookworm.example/debian bookworm main\n"},
			"bookworm", "http://bookworm.example/debian"},
		{"another Debian suite", map[string]string{"sources.list": "deb http://trixie.example/debian trixie main\n"},
			"bookworm", "http://trixie.example/debian"},
		{"security only", map[string]string{"sources.list": "deb http://security.debian.org/debian-security bookworm-security main\n"}, "bookworm", ""},
		{"disabled stanza", map[string]string{"sources.list.d/d.sources": "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\n\n" +
			"Types: deb deb-src\nURIs:\n http://on.example/debian\nSuites: bookworm\n"}, "bookworm", "http://on.example/debian"},
		{"cdrom skipped", map[string]string{"sources.list": "deb cdrom:[Debian 12]/ bookworm main\ndeb http://net.example/debian bookworm main\n"},
			"bookworm", "http://net.example/debian"},
		{"ignored file names", map[string]string{"sources.list.d/x.sources.disabled-by-farm": debianSources, "sources.list.d/x.list.save": "deb http://save.example/debian bookworm main\n"},
			"bookworm", ""},
		{"third party only", map[string]string{"sources.list.d/node.sources": thirdParty, "sources.list.d/g.list": "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n"},
			"bookworm", ""},
		{"nothing", nil, "bookworm", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			must(t, os.MkdirAll(filepath.Join(dir, "sources.list.d"), 0o755))
			for name, text := range tt.files {
				must(t, os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644))
			}
			if got := hostMirror(dir, tt.suite); got != tt.want {
				t.Fatalf("hostMirror = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestMirrorPrecedence(t *testing.T) {
	dir := t.TempDir()
	must(t, os.WriteFile(filepath.Join(dir, "sources.list"), []byte("deb http://host.example/debian bookworm main\n"), 0o644))
	old := aptConfigDir
	t.Cleanup(func() { aptConfigDir = old })

	aptConfigDir = dir
	t.Setenv(MirrorEnv, "http://env.example/debian")
	if got := Mirror("bookworm"); got != "http://env.example/debian" {
		t.Errorf("with %s set: %q", MirrorEnv, got)
	}
	t.Setenv(MirrorEnv, "")
	if got := Mirror("bookworm"); got != "http://host.example/debian" {
		t.Errorf("from the host's apt: %q", got)
	}
	aptConfigDir = filepath.Join(dir, "none")
	if got := Mirror("bookworm"); got != FallbackMirror {
		t.Errorf("with no sources: %q, want %q", got, FallbackMirror)
	}
}
