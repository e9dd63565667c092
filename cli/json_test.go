package cli_test

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// keys checks that obj has each of the named fields.
func keys(t *testing.T, what string, obj any, names ...string) map[string]any {
	t.Helper()
	m, isObj := obj.(map[string]any)
	if !isObj {
		t.Fatalf("%s: %T is not a JSON object", what, obj)
	}
	for _, n := range names {
		if _, ok := m[n]; !ok {
			t.Errorf("%s: no field %q in %v", what, n, m)
		}
	}
	return m
}

func TestJSON(t *testing.T) {
	root, base := newStore(t)
	dir := t.TempDir()
	snapFields := []string{"name", "created", "maps"}
	mapFields := []string{"name", "kind", "size", "changed_blocks", "zero_chunks", "new_chunks", "reused_chunks", "new_stored_bytes"}
	tests := []struct {
		name  string
		args  func(i int) []string // the command, without --json
		check func(t *testing.T, i int, v any)
	}{
		{"ls", func(int) []string { return []string{"store", "ls"} }, func(t *testing.T, _ int, v any) {
			arr, isArr := v.([]any)
			if !isArr || len(arr) < 3 {
				t.Fatalf("ls: %v is not a list of the snapshots", v)
			}
			var got []string
			for _, s := range arr {
				m := keys(t, "ls snapshot", s, snapFields...)
				got = append(got, m["name"].(string))
				for _, mp := range m["maps"].([]any) {
					keys(t, "ls map", mp, mapFields...)
				}
			}
			if got[0] != "base" || !slices.Contains(got, "child") || !slices.Contains(got, "vm") {
				t.Errorf("ls names %v", got)
			}
		}},
		{"ingest", func(i int) []string {
			return []string{"store", "ingest", "--name", "json-" + string(rune('a'+i)), "--parent", "base", base}
		}, func(t *testing.T, i int, v any) {
			m := keys(t, "ingest", v, "name", "parent", "kind", "logical_bytes", "zero_bytes", "new_bytes", "reused_bytes", "stored_bytes", "seconds", "mb_per_s")
			if m["name"] != "json-"+string(rune('a'+i)) || m["parent"] != "base" || m["kind"] != "disk" || m["logical_bytes"] != float64(300<<10+123) || m["new_bytes"] != float64(0) {
				t.Errorf("ingest: %v", m)
			}
		}},
		{"export", func(i int) []string {
			return []string{"store", "export", "base", filepath.Join(dir, "out-"+string(rune('a'+i)))}
		}, func(t *testing.T, i int, v any) {
			m := keys(t, "export", v, "name", "map", "out", "bytes", "seconds", "mb_per_s")
			if m["name"] != "base" || m["map"] != "disk" || m["bytes"] != float64(300<<10+123) {
				t.Errorf("export: %v", m)
			}
		}},
		{"report", func(int) []string { return []string{"store", "report"} }, func(t *testing.T, _ int, v any) {
			m := keys(t, "report", v, "snapshots", "logical_bytes", "zero_bytes", "referenced_bytes", "unique_chunks", "unique_bytes",
				"stored_bytes", "dedup_ratio", "compression_ratio", "combined_ratio", "store", "refcount_histogram", "per_snapshot")
			keys(t, "report store", m["store"], "packs", "pack_bytes", "index_entries", "index_bytes", "garbage_bytes", "garbage_chunks", "reclaimable_bytes")
			for _, h := range m["refcount_histogram"].([]any) {
				keys(t, "report histogram", h, "min_refs", "max_refs", "chunks", "stored_bytes", "referenced_bytes")
			}
			for _, s := range m["per_snapshot"].([]any) {
				keys(t, "report snapshot", s, "name", "logical_bytes", "zero_bytes", "new_bytes", "reused_bytes", "written_stored_bytes", "exclusive_bytes", "exclusive_chunks")
			}
			if m["dedup_ratio"].(float64) <= 1 {
				t.Errorf("dedup ratio %v over snapshots that share blocks", m["dedup_ratio"])
			}
		}},
		{"verify", func(int) []string { return []string{"store", "verify"} }, func(t *testing.T, _ int, v any) {
			m := keys(t, "verify", v, "packs", "chunks", "bytes", "damaged", "snapshots", "problems")
			if len(m["damaged"].([]any)) != 0 || len(m["problems"].([]any)) != 0 {
				t.Errorf("verify: %v", m)
			}
		}},
		{"gc", func(int) []string { return []string{"store", "gc"} }, func(t *testing.T, _ int, v any) {
			keys(t, "gc", v, "packs_before", "packs_after", "packs_deleted", "packs_rewritten", "chunks_deleted", "chunks_moved",
				"bytes_before", "bytes_after", "bytes_freed", "garbage_remaining_bytes")
		}},
		{"rm", func(i int) []string { return []string{"store", "rm", "json-" + string(rune('a'+i))} }, func(t *testing.T, i int, v any) {
			m := keys(t, "rm", v, "removed")
			if m["removed"] != "json-"+string(rune('a'+i)) {
				t.Errorf("rm: %v", m)
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// 0: the global flag, before the command; 1: the command's own.
			for i, placement := range []string{"global", "command"} {
				args := tc.args(i)
				if placement == "global" {
					args = append([]string{"--json"}, args...)
				} else {
					args = append(args[:2:2], append([]string{"--json"}, args[2:]...)...)
				}
				r := ok(t, root, args...)
				if r.stderr != "" {
					t.Errorf("%s: stderr %q", strings.Join(args, " "), r.stderr)
				}
				var v any
				decodeJSON(t, r.stdout, &v)
				tc.check(t, i, v)
			}
		})
	}
	// Empty lists are lists, not null.
	empty := filepath.Join(t.TempDir(), "root")
	for _, args := range [][]string{{"--json", "store", "ls"}, {"store", "ls", "--json"}} {
		if out := strings.TrimSpace(ok(t, empty, args...).stdout); out != "[]" {
			t.Errorf("%v on an empty store: %q", args, out)
		}
	}
	// Without --json, the output is text.
	if out := ok(t, root, "store", "ls").stdout; !strings.HasPrefix(out, "NAME") {
		t.Errorf("store ls without --json: %q", out)
	}
}
