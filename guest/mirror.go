package guest

import (
	"bufio"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// MirrorEnv names the environment variable that chooses the Debian mirror.
const MirrorEnv = "BOXD_DEBIAN_MIRROR"

// FallbackMirror is the mirror used when neither the caller, MirrorEnv nor
// this host's apt names one.
const FallbackMirror = "http://deb.debian.org/debian"

// aptConfigDir is where apt keeps its sources; a variable for tests.
var aptConfigDir = "/etc/apt"

// Mirror returns the Debian mirror to fetch suite from: MirrorEnv if set,
// else the mirror this host's apt uses for a Debian suite, else
// FallbackMirror.
func Mirror(suite string) string {
	if m := os.Getenv(MirrorEnv); m != "" {
		return m
	}
	if m := hostMirror(aptConfigDir, suite); m != "" {
		return m
	}
	return FallbackMirror
}

// aptSource is one source apt fetches from: a line of sources.list or a
// stanza of a .sources file.
type aptSource struct {
	types, uris, suites []string
	enabled             bool
}

// debianSuites are the suite names and aliases of Debian's own archive; a
// source for one of them is a Debian mirror, unlike a third party's
// repository that only carries a component of its own.
var debianSuites = []string{
	"buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid",
	"oldoldstable", "oldstable", "stable", "testing", "unstable",
}

// hostMirror reads apt's sources under dir (sources.list, then
// sources.list.d/*.list and *.sources in name order) and returns the first
// binary source that carries suite, else the first that carries any Debian
// suite, else "". Security and update suites ("bookworm-security") are not
// the release and do not count.
func hostMirror(dir, suite string) string {
	var all []aptSource
	if b, err := os.ReadFile(filepath.Join(dir, "sources.list")); err == nil {
		all = append(all, parseSourcesList(string(b))...)
	}
	parts, _ := filepath.Glob(filepath.Join(dir, "sources.list.d", "*"))
	slices.Sort(parts)
	for _, p := range parts {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		switch filepath.Ext(p) {
		case ".list":
			all = append(all, parseSourcesList(string(b))...)
		case ".sources":
			all = append(all, parseDeb822Sources(string(b))...)
		}
	}
	return pickMirror(all, suite)
}

// pickMirror chooses among sources as hostMirror describes.
func pickMirror(all []aptSource, suite string) string {
	usable := func(s aptSource) string {
		if !s.enabled || !slices.Contains(s.types, "deb") {
			return ""
		}
		for _, u := range s.uris {
			if fetchable(u) {
				return strings.TrimRight(u, "/")
			}
		}
		return ""
	}
	for _, s := range all {
		if u := usable(s); u != "" && slices.Contains(s.suites, suite) {
			return u
		}
	}
	for _, s := range all {
		if u := usable(s); u != "" && slices.ContainsFunc(s.suites, func(x string) bool { return slices.Contains(debianSuites, x) }) {
			return u
		}
	}
	return ""
}

// fetchable reports whether debootstrap can fetch from uri.
func fetchable(uri string) bool {
	for _, p := range []string{"http://", "https://", "ftp://", "file:/"} {
		if strings.HasPrefix(uri, p) {
			return true
		}
	}
	return false
}

// parseSourcesList parses apt's one-line format:
//
//	deb [option=value ...] URI SUITE [COMPONENT ...]
func parseSourcesList(text string) []aptSource {
	var out []aptSource
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line, _, _ := strings.Cut(sc.Text(), "#")
		fields := strings.Fields(line)
		if len(fields) < 3 {
			continue
		}
		typ, rest := fields[0], fields[1:]
		if strings.HasPrefix(rest[0], "[") {
			// Options run to the field that ends with "]".
			i := slices.IndexFunc(rest, func(f string) bool { return strings.HasSuffix(f, "]") })
			if i < 0 {
				continue
			}
			rest = rest[i+1:]
		}
		if len(rest) < 2 {
			continue
		}
		out = append(out, aptSource{types: []string{typ}, uris: rest[:1], suites: rest[1:2], enabled: true})
	}
	return out
}

// parseDeb822Sources parses apt's .sources format: stanzas of "Field: value"
// lines separated by blank lines, where a line that starts with white space
// continues the field before it.
func parseDeb822Sources(text string) []aptSource {
	var out []aptSource
	fields := map[string]string{}
	var last string
	flush := func() {
		if len(fields) > 0 {
			out = append(out, aptSource{
				types:   strings.Fields(fields["types"]),
				uris:    strings.Fields(fields["uris"]),
				suites:  strings.Fields(fields["suites"]),
				enabled: !strings.EqualFold(strings.TrimSpace(fields["enabled"]), "no"),
			})
		}
		fields, last = map[string]string{}, ""
	}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "#"):
			continue
		case strings.TrimSpace(line) == "":
			flush()
		case line[0] == ' ' || line[0] == '\t':
			if last != "" {
				fields[last] += " " + strings.TrimSpace(line)
			}
		default:
			k, v, ok := strings.Cut(line, ":")
			if !ok {
				continue
			}
			last = strings.ToLower(strings.TrimSpace(k))
			fields[last] = strings.TrimSpace(v)
		}
	}
	flush()
	return out
}
