package errcat_test

import (
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/containerd/errdefs"
)

func TestTable(t *testing.T) {
	exits := map[int]string{}
	wires := map[string]bool{}
	fromStatus := map[int]string{}
	for _, r := range errcat.Rows() {
		if r.Category == nil || r.Name == "" || r.Wire == "" || r.Meaning == "" {
			t.Errorf("incomplete row %+v", r)
		}
		if r.Exit == errcat.ExitSuccess || r.Exit == errcat.ExitFailure {
			t.Errorf("%s: exit %d is reserved", r.Name, r.Exit)
		}
		if prev, ok := exits[r.Exit]; ok {
			t.Errorf("%s and %s share exit %d", prev, r.Name, r.Exit)
		}
		exits[r.Exit] = r.Name
		if wires[r.Wire] {
			t.Errorf("wire name %q twice", r.Wire)
		}
		wires[r.Wire] = true
		if r.HTTP < 400 || r.HTTP > 599 {
			t.Errorf("%s: HTTP %d is no error status", r.Name, r.HTTP)
		}
		if r.FromStatus {
			if prev, ok := fromStatus[r.HTTP]; ok {
				t.Errorf("%s and %s both claim HTTP %d", prev, r.Name, r.HTTP)
			}
			fromStatus[r.HTTP] = r.Name
		}
	}
	// Rows is a copy.
	errcat.Rows()[0].Exit = 99
	if errcat.Rows()[0].Exit == 99 {
		t.Error("Rows shares its table")
	}
}

// The codes scripts and clients rely on; changing one is a breaking change.
var codes = []struct {
	name string
	err  error
	exit int
	http int
	wire string
}{
	{"nil", nil, 0, 200, ""},
	{"plain", errors.New("qemu died"), 1, 500, ""},
	{"invalid argument", fmt.Errorf("bad name: %w", errdefs.ErrInvalidArgument), 2, 400, "invalid_argument"},
	{"not found", fmt.Errorf("no box: %w", errdefs.ErrNotFound), 3, 404, "not_found"},
	{"missing file", fmt.Errorf("open x: %w", fs.ErrNotExist), 3, 404, "not_found"},
	{"ENOENT", &fs.PathError{Op: "open", Path: "x", Err: syscall.ENOENT}, 3, 404, "not_found"},
	{"already exists", fmt.Errorf("taken: %w", errdefs.ErrAlreadyExists), 4, 409, "already_exists"},
	{"failed precondition", fmt.Errorf("has children: %w", errdefs.ErrFailedPrecondition), 5, 409, "failed_precondition"},
	{"data loss", fmt.Errorf("hash: %w", errdefs.ErrDataLoss), 6, 500, "data_loss"},
	{"resource exhausted", errcat.With(errors.New("write: no space"), errdefs.ErrResourceExhausted), 7, 500, "resource_exhausted"},
	{"unavailable", fmt.Errorf("in use: %w", errdefs.ErrUnavailable), 8, 503, "unavailable"},
	{"not supported", errcat.NotSupported("%s is missing", "/dev/kvm"), 9, 501, "not_supported"},
	{"not implemented", fmt.Errorf("no vmx: %w", errdefs.ErrNotImplemented), 9, 501, "not_supported"},
	{"permission denied", fmt.Errorf("no: %w", errdefs.ErrPermissionDenied), 10, 403, "permission_denied"},
	{"EACCES", &fs.PathError{Op: "open", Path: "/dev/kvm", Err: syscall.EACCES}, 10, 403, "permission_denied"},
	{"EROFS", &fs.PathError{Op: "open", Path: "x", Err: syscall.EROFS}, 1, 500, ""},
	// The first category in the table wins; a category wins over an fs
	// error.
	{"category and ENOENT", fmt.Errorf("%w: %w", &fs.PathError{Op: "open", Path: "x", Err: syscall.ENOENT}, errdefs.ErrUnavailable), 8, 503, "unavailable"},
	{"two categories", fmt.Errorf("%w and %w", errdefs.ErrUnavailable, errdefs.ErrInvalidArgument), 2, 400, "invalid_argument"},
}

func TestCodes(t *testing.T) {
	for _, tc := range codes {
		t.Run(tc.name, func(t *testing.T) {
			if got := errcat.ExitCode(tc.err); got != tc.exit {
				t.Errorf("ExitCode(%v) = %d, want %d", tc.err, got, tc.exit)
			}
			if got := errcat.HTTPStatus(tc.err); got != tc.http {
				t.Errorf("HTTPStatus(%v) = %d, want %d", tc.err, got, tc.http)
			}
			r, ok := errcat.Of(tc.err)
			if ok != (tc.wire != "") || r.Wire != tc.wire {
				t.Errorf("Of(%v) = %q, %v; want %q", tc.err, r.Wire, ok, tc.wire)
			}
			if tc.wire == "" {
				return
			}
			if n, ok := errcat.Named(tc.wire); !ok || !errors.Is(n.Category, r.Category) {
				t.Errorf("Named(%q) = %v, %v", tc.wire, n.Category, ok)
			}
		})
	}
	if _, ok := errcat.Named("unknown"); ok {
		t.Error(`Named("unknown") found a row`)
	}
}

func TestFromHTTP(t *testing.T) {
	for _, tc := range []struct {
		status int
		msg    string
		want   error // nil: no category
		text   string
	}{
		{400, "bad", errdefs.ErrInvalidArgument, "bad"},
		{404, "no box", errdefs.ErrNotFound, "no box"},
		{409, "taken or busy", errdefs.ErrFailedPrecondition, "taken or busy"},
		{503, "later", errdefs.ErrUnavailable, "later"},
		{501, "no kvm", errdefs.ErrNotImplemented, "no kvm"},
		{403, "no", errdefs.ErrPermissionDenied, "no"},
		{500, "boom", nil, "boom"},
		{502, "", nil, "HTTP 502 Bad Gateway"},
		{418, "teapot", nil, "teapot"},
	} {
		err := errcat.FromHTTP(tc.status, tc.msg)
		if err == nil || err.Error() != tc.text {
			t.Errorf("FromHTTP(%d, %q) = %v, want %q", tc.status, tc.msg, err, tc.text)
			continue
		}
		r, ok := errcat.Of(err)
		switch {
		case tc.want == nil && ok:
			t.Errorf("FromHTTP(%d) is %s, want no category", tc.status, r.Name)
		case tc.want != nil && !errors.Is(err, tc.want):
			t.Errorf("FromHTTP(%d) = %v, does not match %v", tc.status, err, tc.want)
		case tc.want != nil && r.HTTP != tc.status:
			t.Errorf("FromHTTP(%d) came back as HTTP %d", tc.status, r.HTTP)
		}
	}
	// Every row's status reads back to a category of that status.
	for _, r := range errcat.Rows() {
		back, ok := errcat.Of(errcat.FromHTTP(r.HTTP, "x"))
		if r.FromStatus && (!ok || !errors.Is(back.Category, r.Category)) {
			t.Errorf("%s: HTTP %d reads back as %v", r.Name, r.HTTP, back.Category)
		}
		if ok && back.HTTP != r.HTTP {
			t.Errorf("%s: HTTP %d reads back as %s (HTTP %d)", r.Name, r.HTTP, back.Name, back.HTTP)
		}
		if r.HTTP == http.StatusInternalServerError && ok {
			t.Errorf("HTTP 500 reads back as %s", back.Name)
		}
	}
}

var errBase = errors.New("base")

type pathErr struct{ path string }

func (e *pathErr) Error() string { return "bad path " + e.path }

func TestWith(t *testing.T) {
	if errcat.With(nil, errdefs.ErrNotFound) != nil {
		t.Error("With(nil) is not nil")
	}
	inner := fmt.Errorf("open: %w: %w", &pathErr{"/x"}, errBase)
	err := errcat.With(inner, errdefs.ErrNotFound)
	if err.Error() != inner.Error() {
		t.Errorf("message %q, want %q", err, inner)
	}
	if !errors.Is(err, errdefs.ErrNotFound) || !errors.Is(err, errBase) {
		t.Errorf("%v lost its category or chain", err)
	}
	if errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("%v matches another category", err)
	}
	var pe *pathErr
	if !errors.As(err, &pe) || pe.path != "/x" {
		t.Errorf("errors.As through With: %v", pe)
	}
	if !errors.Is(fmt.Errorf("wrapped: %w", err), errdefs.ErrNotFound) {
		t.Error("category lost under a further wrap")
	}
}

func TestNotSupported(t *testing.T) {
	err := errcat.NotSupported("qemu: %s is missing: %w", "qemu-img", os.ErrNotExist)
	if err.Error() != "qemu: qemu-img is missing: file does not exist" {
		t.Errorf("message %q", err)
	}
	if !errors.Is(err, errdefs.ErrNotImplemented) || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%v lost its category or chain", err)
	}
	// The category set on purpose wins over the wrapped not-found.
	if got := errcat.ExitCode(err); got != 9 {
		t.Errorf("ExitCode(%v) = %d, want 9", err, got)
	}
	if got := errcat.HTTPStatus(err); got != http.StatusNotImplemented {
		t.Errorf("HTTPStatus(%v) = %d, want 501", err, got)
	}
}

// TestReadme checks the README's exit-code table against errcat's, row by
// row, both ways.
func TestReadme(t *testing.T) {
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := map[int]string{}
	in, header := false, 0
	for _, line := range strings.Split(string(b), "\n") {
		if line == "### Exit codes" {
			in = true
			continue
		}
		if !in {
			continue
		}
		if !strings.HasPrefix(line, "|") {
			if len(readme) > 0 || strings.HasPrefix(line, "#") {
				break
			}
			continue
		}
		if header < 2 { // "| code | meaning |" and "|---|---|"
			header++
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		if len(cells) != 2 {
			t.Fatalf("README exit-code row %q: want 2 cells", line)
		}
		code, err := strconv.Atoi(strings.TrimSpace(cells[0]))
		if err != nil {
			t.Fatalf("README exit-code row %q: %v", line, err)
		}
		if _, dup := readme[code]; dup {
			t.Errorf("README lists exit %d twice", code)
		}
		readme[code] = strings.TrimSpace(cells[1])
	}
	if len(readme) == 0 {
		t.Fatal(`README.md has no table under "### Exit codes"`)
	}

	want := map[int]string{errcat.ExitSuccess: "success", errcat.ExitFailure: "any other failure"}
	for _, r := range errcat.Rows() {
		want[r.Exit] = r.Meaning
	}
	for code, meaning := range want {
		got, ok := readme[code]
		switch {
		case !ok:
			t.Errorf("README lacks exit %d: | %d | %s |", code, code, meaning)
		case got != meaning:
			t.Errorf("README exit %d:\n  README: %s\n  errcat: %s", code, got, meaning)
		}
	}
	for code, meaning := range readme {
		if _, ok := want[code]; !ok {
			t.Errorf("README lists exit %d (%s), which errcat's table lacks", code, meaning)
		}
	}
}
