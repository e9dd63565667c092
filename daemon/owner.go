package daemon

import (
	"fmt"
	"net/http"

	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/sshproxy"
	"github.com/containerd/errdefs"
)

// OwnerHeader names, on an API request, the registered key (its SHA256
// fingerprint) a command runs for: the front door's commands for user
// boxd (ssh boxd@host COMMAND) send it. Such a request sees and acts on
// that key's boxes alone (box.Box.Owner); another's box is "no such box",
// exactly as a box that does not exist, and what is not about boxes the
// key made (the store's gc, events, the registered keys, exec, logs) is
// refused.
const OwnerHeader = "Boxd-Owner"

// OwnerEnv is the environment variable that makes boxd's commands send
// OwnerHeader with its value.
const OwnerEnv = "BOXD_OWNER"

// FrontDoorEnv is the environment variable that tells boxd's commands the
// address (host:port) the person reached the front door on, for the login
// hint of create.
const FrontDoorEnv = "BOXD_FRONT_DOOR"

// ownerRoutes are the routes a request with OwnerHeader may use; their
// handlers keep it to the owner's boxes.
var ownerRoutes = map[string]bool{
	"GET /v1/info":                    true,
	"GET /v1/boxes":                   true,
	"POST /v1/boxes":                  true,
	"GET /v1/boxes/{name}":            true,
	"DELETE /v1/boxes/{name}":         true,
	"POST /v1/boxes/{name}/fork":      true,
	"POST /v1/boxes/{name}/start":     true,
	"POST /v1/boxes/{name}/stop":      true,
	"POST /v1/boxes/{name}/pause":     true,
	"POST /v1/boxes/{name}/unpause":   true,
	"POST /v1/boxes/{name}/hibernate": true,
	"POST /v1/boxes/{name}/resume":    true,
	"GET /v1/boxes/{name}/snapshots":  true,
	"GET /v1/snapshots":               true,
	"GET /v1/report":                  true,
}

// scoped checks a request with OwnerHeader before mux serves it: the key
// must be registered and the route one of ownerRoutes.
func (s *Server) scoped(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		owner := ownerOf(r)
		if owner == "" {
			mux.ServeHTTP(w, r)
			return
		}
		if s.keys == nil {
			s.fail(w, r, fmt.Errorf("this daemon has no registered keys: %w", errdefs.ErrPermissionDenied))
			return
		}
		if _, ok := s.keys.Lookup(owner); !ok {
			s.fail(w, r, fmt.Errorf("key %s is not registered: %w", owner, errdefs.ErrPermissionDenied))
			return
		}
		if _, pattern := mux.Handler(r); !ownerRoutes[pattern] {
			s.fail(w, r, fmt.Errorf("%s %s is not open to a registered key's commands: %w", r.Method, r.URL.Path, errdefs.ErrPermissionDenied))
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// ownerOf is the registered key request r acts for; "" for the host's
// requests, which see every box.
func ownerOf(r *http.Request) string { return r.Header.Get(OwnerHeader) }

// visible reports whether request r may see bx.
func visible(r *http.Request, bx box.Box) bool {
	o := ownerOf(r)
	return o == "" || bx.Owner == o
}

// visibleBoxes keeps the boxes of boxes that request r may see.
func visibleBoxes(r *http.Request, boxes []box.Box) []box.Box {
	out := []box.Box{}
	for _, bx := range boxes {
		if visible(r, bx) {
			out = append(out, bx)
		}
	}
	return out
}

// lookup returns box name if request r may see it; another owner's box is
// not found, in the box manager's own words.
func (s *Server) lookup(r *http.Request, name string) (box.Box, error) {
	bx, err := s.mgr.Get(name)
	if err == nil && !visible(r, bx) {
		return box.Box{}, fmt.Errorf("%q: %w", name, box.ErrNotFound)
	}
	return bx, err
}

// checkOwned refuses, as lookup does, a box that request r may not act on;
// the host's requests are not looked at.
func (s *Server) checkOwned(r *http.Request, name string) error {
	if ownerOf(r) == "" {
		return nil
	}
	_, err := s.lookup(r, name)
	return err
}

// checkNewName checks the name of a box to be made: a valid name, and not
// the front door's user for boxd's commands (sshproxy.CommandUser).
func checkNewName(name string) error {
	if err := box.ValidateName(name); err != nil {
		return err
	}
	if name == sshproxy.CommandUser {
		return fmt.Errorf("box name %q is the SSH front door's user for boxd's commands; choose another: %w", name, errdefs.ErrInvalidArgument)
	}
	return nil
}
