package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/boxd-dev/boxd/box"
	"github.com/containerd/errdefs"
)

// fakeRootfs is a containerd snapshotter with one root file system,
// /ctd/images/7, which stands on snapshot ctd-3 and holds bin and etc.
type fakeRootfs struct{}

func (fakeRootfs) Base(_ context.Context, source string) (string, error) {
	if source != "/ctd/images/7" {
		return "", fmt.Errorf("%s is not an image of this snapshotter: %w", source, errdefs.ErrInvalidArgument)
	}
	return "ctd-3", nil
}

func (f fakeRootfs) Extract(ctx context.Context, source, dir string) error {
	if _, err := f.Base(ctx, source); err != nil {
		return err
	}
	for _, d := range []string{"bin", "etc"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	return nil
}

func TestRootfsRoutes(t *testing.T) {
	keys, err := OpenKeyRegistry(filepath.Join(t.TempDir(), KeysName))
	if err != nil {
		t.Fatal(err)
	}
	alice, aliceFP := newKeyLine(t, "alice")
	if _, err := keys.Add([]string{alice}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		method, path, body string
		rootfs             Rootfs
		owner              string
		status             int
		call               string // the manager's last call, "" for none
	}{
		{"POST", "/v1/boxes", `{"name":"c1","rootfs":"/ctd/images/7","labels":{"containerd.id":"c1"}}`, fakeRootfs{}, "", 200, "create c1 image= memory=0 cpus=0 keys=0 base=ctd-3"},
		{"POST", "/v1/boxes", `{"name":"c1","rootfs":"/elsewhere/7"}`, fakeRootfs{}, "", 400, ""},
		{"POST", "/v1/boxes", `{"name":"c1","rootfs":"/ctd/images/7","image":"debian-bookworm"}`, fakeRootfs{}, "", 400, ""},
		{"POST", "/v1/boxes", `{"name":"c1","rootfs":"/ctd/images/7","from":"box.dev.s1"}`, fakeRootfs{}, "", 400, ""},
		{"POST", "/v1/boxes", `{"name":"c1","rootfs":"/ctd/images/7"}`, nil, "", 409, ""},
		{"POST", "/v1/boxes", `{"name":"c1","rootfs":"/ctd/images/7"}`, fakeRootfs{}, "alice", 403, ""},
		{"POST", "/v1/boxes", `{"name":"c1","labels":{"":"x"}}`, fakeRootfs{}, "", 400, ""},
		{"POST", "/v1/boxes/dev/rootfs", `{"id":"web.1","rootfs":"/ctd/images/7"}`, fakeRootfs{}, "", 200, "put dev bin,etc /.boxd/containers/web.1/rootfs"},
		{"POST", "/v1/boxes/dev/rootfs", `{"id":"../x","rootfs":"/ctd/images/7"}`, fakeRootfs{}, "", 400, ""},
		{"POST", "/v1/boxes/dev/rootfs", `{"id":"web","rootfs":"/elsewhere"}`, fakeRootfs{}, "", 400, "get dev"},
		{"POST", "/v1/boxes/nope/rootfs", `{"id":"web","rootfs":"/ctd/images/7"}`, fakeRootfs{}, "", 404, "get nope"},
		{"POST", "/v1/boxes/dev/rootfs", `{"id":"web","rootfs":"/ctd/images/7"}`, nil, "", 409, ""},
		{"POST", "/v1/boxes/dev/rootfs", `{"id":"web.1","rootfs":"/ctd/images/7","label":{"kubernetes.container.web":"web.1"}}`, fakeRootfs{}, "", 200, "label dev kubernetes.container.web=web.1"},
		{"POST", "/v1/boxes/dev/rootfs", `{"id":"web.1","rootfs":"/ctd/images/7","label":{"a":"1","b":"2"}}`, fakeRootfs{}, "", 400, ""},
		{"DELETE", "/v1/boxes/dev/rootfs/web.1", "", fakeRootfs{}, "", 200, "remove-tree dev /.boxd/containers/web.1"},
		{"DELETE", "/v1/boxes/dev/rootfs/web.1?label=kubernetes.container.web", "", fakeRootfs{}, "", 200, "label dev kubernetes.container.web="},
		{"DELETE", "/v1/boxes/dev/rootfs/-x", "", fakeRootfs{}, "", 400, ""},
	} {
		t.Run(tc.method+" "+tc.path+" "+tc.body, func(t *testing.T) {
			m := newFakeManager(box.Box{Name: "dev", State: box.StateRunning})
			s := NewServer(context.Background(), Options{Manager: m, Graph: &fakeGraph{}, Info: Info{Root: t.TempDir()}, Rootfs: tc.rootfs, Keys: keys})
			c := serve(t, s)
			req, err := http.NewRequest(tc.method, "http://boxd"+tc.path, strings.NewReader(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			if tc.owner != "" {
				req.Header.Set(OwnerHeader, aliceFP)
			}
			resp, err := c.hc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			data, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, data)
			}
			if tc.status != 200 {
				var eb errorBody
				if err := json.Unmarshal(data, &eb); err != nil || eb.Error == "" {
					t.Errorf("error body %s (%v)", data, err)
				}
			}
			if got := m.lastCall(); got != tc.call {
				t.Errorf("manager's last call %q, want %q", got, tc.call)
			}
		})
	}
}
