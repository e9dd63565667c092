package integration

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/mountinfo"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"
)

// layer is a layer blob written to a file.
type layer struct {
	mediaType string
	digest    digest.Digest // of the blob as stored (compressed or not)
	diffID    digest.Digest // of the uncompressed tar
	size      int64
	path      string
}

// countWriter counts the bytes written through it.
type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// writeLayer writes a layer tar, gzip-compressed or not, filled by fill, to
// path.
func writeLayer(path string, compress bool, fill func(tw *tar.Writer) error) (layer, error) {
	f, err := os.Create(path)
	if err != nil {
		return layer{}, err
	}
	defer f.Close()
	blobHash := digest.SHA256.Digester()
	var n countWriter
	blobW := io.MultiWriter(f, blobHash.Hash(), &n)
	diffHash := digest.SHA256.Digester()
	l := layer{mediaType: ocispec.MediaTypeImageLayer, path: path}
	var zw *gzip.Writer
	tarW := io.MultiWriter(blobW, diffHash.Hash())
	if compress {
		l.mediaType = ocispec.MediaTypeImageLayerGzip
		zw, _ = gzip.NewWriterLevel(blobW, gzip.BestSpeed)
		tarW = io.MultiWriter(zw, diffHash.Hash())
	}
	tw := tar.NewWriter(tarW)
	if err := fill(tw); err != nil {
		return layer{}, err
	}
	if err := tw.Close(); err != nil {
		return layer{}, err
	}
	if zw != nil {
		if err := zw.Close(); err != nil {
			return layer{}, err
		}
	}
	if err := f.Close(); err != nil {
		return layer{}, err
	}
	l.digest, l.diffID, l.size = blobHash.Digest(), diffHash.Digest(), n.n
	return l, nil
}

// tarFile adds a regular file, directory or symlink entry made from scratch
// (root-owned).
func tarFile(tw *tar.Writer, name string, mode int64, typ byte, body []byte, link string) error {
	hdr := &tar.Header{
		Typeflag: typ,
		Name:     name,
		Mode:     mode,
		Linkname: link,
		ModTime:  time.Unix(1700000000, 0),
		Format:   tar.FormatPAX,
	}
	if typ == tar.TypeReg {
		hdr.Size = int64(len(body))
	}
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	if typ == tar.TypeReg {
		_, err := tw.Write(body)
		return err
	}
	return nil
}

// tarTree adds the tree under root to tw, relative to it, as it is on disk:
// modes (setuid, sticky included), owners, symlinks, hard links, device
// nodes. Sockets are left out.
func tarTree(tw *tar.Writer, root string) error {
	type inode struct{ dev, ino uint64 }
	links := map[inode]string{}
	return filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, path)
		if err != nil || rel == "." {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if fi.Mode()&fs.ModeSocket != 0 {
			return nil
		}
		var target string
		if fi.Mode()&fs.ModeSymlink != 0 {
			if target, err = os.Readlink(path); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(fi, target)
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		hdr.Name = filepath.ToSlash(rel)
		if fi.IsDir() {
			hdr.Name += "/"
		}
		// Numeric owners only: names would be the host's, not the tree's.
		hdr.Uname, hdr.Gname = "", ""
		hdr.AccessTime, hdr.ChangeTime = time.Time{}, time.Time{}
		hdr.Format = tar.FormatPAX
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && fi.Mode().IsRegular() && st.Nlink > 1 {
			key := inode{st.Dev, st.Ino}
			if first, ok := links[key]; ok {
				hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
				return tw.WriteHeader(hdr)
			}
			links[key] = hdr.Name
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if !fi.Mode().IsRegular() {
			return nil
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := io.Copy(tw, f); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		return nil
	})
}

// busyboxLayer writes a root filesystem with the host's static busybox as
// /bin/busybox and the applets the test uses as symlinks to it.
func busyboxLayer(path, busybox string) (layer, error) {
	body, err := os.ReadFile(busybox)
	if err != nil {
		return layer{}, err
	}
	return writeLayer(path, true, func(tw *tar.Writer) error {
		for _, d := range []struct {
			name string
			mode int64
		}{{"bin/", 0o755}, {"dev/", 0o755}, {"etc/", 0o755}, {"proc/", 0o555}, {"root/", 0o700}, {"sys/", 0o555}, {"tmp/", 0o1777}} {
			if err := tarFile(tw, d.name, d.mode, tar.TypeDir, nil, ""); err != nil {
				return err
			}
		}
		if err := tarFile(tw, "bin/busybox", 0o755, tar.TypeReg, body, ""); err != nil {
			return err
		}
		for _, applet := range []string{"cat", "echo", "ls", "mkdir", "rm", "hostname", "seq", "sh", "sleep", "stty", "test", "true", "tty", "uname"} {
			if err := tarFile(tw, "bin/"+applet, 0o777, tar.TypeSymlink, nil, "busybox"); err != nil {
				return err
			}
		}
		return tarFile(tw, "etc/passwd", 0o644, tar.TypeReg, []byte("root:x:0:0:root:/root:/bin/sh\n"), "")
	})
}

// writeImage writes an OCI image layout holding one image (linux, this
// machine's architecture) made of layers, as a tar at path. ref is the
// image's name, in the org.opencontainers.image.ref.name annotation.
func writeImage(path, ref string, layers []layer) (ocispec.Descriptor, error) {
	return writeImageCmd(path, ref, []string{"/bin/sh"}, layers)
}

// writeImageCmd is writeImage of an image whose command is cmd.
func writeImageCmd(path, ref string, cmd []string, layers []layer) (ocispec.Descriptor, error) {
	created := time.Unix(1700000000, 0).UTC()
	platform := ocispec.Platform{Architecture: runtime.GOARCH, OS: "linux"}
	img := ocispec.Image{
		Created:  &created,
		Platform: platform,
		Config: ocispec.ImageConfig{
			Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			Cmd: cmd,
		},
		RootFS: ocispec.RootFS{Type: "layers"},
	}
	manifest := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
	}
	for _, l := range layers {
		img.RootFS.DiffIDs = append(img.RootFS.DiffIDs, l.diffID)
		manifest.Layers = append(manifest.Layers, ocispec.Descriptor{MediaType: l.mediaType, Digest: l.digest, Size: l.size})
	}
	configJSON, err := json.Marshal(img)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	manifest.Config = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(configJSON), Size: int64(len(configJSON))}
	manifestJSON, err := json.Marshal(manifest)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	mdesc := ocispec.Descriptor{
		MediaType:   ocispec.MediaTypeImageManifest,
		Digest:      digest.FromBytes(manifestJSON),
		Size:        int64(len(manifestJSON)),
		Platform:    &platform,
		Annotations: map[string]string{ocispec.AnnotationRefName: ref},
	}
	indexJSON, err := json.Marshal(ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{mdesc},
	})
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	layoutJSON, err := json.Marshal(ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion})
	if err != nil {
		return ocispec.Descriptor{}, err
	}

	f, err := os.Create(path)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	for _, e := range []struct {
		name string
		body []byte
	}{
		{ocispec.ImageLayoutFile, layoutJSON},
		{"index.json", indexJSON},
		{"blobs/", nil},
		{"blobs/sha256/", nil},
		{blobName(manifest.Config.Digest), configJSON},
		{blobName(mdesc.Digest), manifestJSON},
	} {
		typ, mode := byte(tar.TypeReg), int64(0o644)
		if strings.HasSuffix(e.name, "/") {
			typ, mode = tar.TypeDir, 0o755
		}
		if err := tarFile(tw, e.name, mode, typ, e.body, ""); err != nil {
			return ocispec.Descriptor{}, err
		}
	}
	seen := map[digest.Digest]bool{}
	for _, l := range layers {
		if seen[l.digest] {
			continue
		}
		seen[l.digest] = true
		if err := tarBlob(tw, l); err != nil {
			return ocispec.Descriptor{}, err
		}
	}
	if err := tw.Close(); err != nil {
		return ocispec.Descriptor{}, err
	}
	return mdesc, f.Close()
}

func blobName(d digest.Digest) string { return "blobs/" + d.Algorithm().String() + "/" + d.Encoded() }

func tarBlob(tw *tar.Writer, l layer) error {
	f, err := os.Open(l.path)
	if err != nil {
		return err
	}
	defer f.Close()
	hdr := &tar.Header{Typeflag: tar.TypeReg, Name: blobName(l.digest), Mode: 0o644, Size: l.size, ModTime: time.Unix(1700000000, 0)}
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	_, err = io.Copy(tw, f)
	return err
}

// debootstrapRootfs returns a Debian bookworm minbase root filesystem made
// by debootstrap, kept under cache (BOXD_TEST_CACHE, default
// /var/cache/boxd-test) so that only the first run downloads it. The
// mirror is BOXD_DEBIAN_MIRROR, default http://deb.debian.org/debian; if it
// cannot be reached the test fails.
func debootstrapRootfs(t *testing.T) string {
	t.Helper()
	cache := os.Getenv("BOXD_TEST_CACHE")
	if cache == "" {
		cache = "/var/cache/boxd-test"
	}
	mirror := os.Getenv("BOXD_DEBIAN_MIRROR")
	if mirror == "" {
		mirror = "http://deb.debian.org/debian"
	}
	dir := filepath.Join(cache, "debootstrap-bookworm")
	// The marker is written after the tree is in place: a tree without
	// it is from a run that did not finish.
	done := dir + ".complete"
	if err := os.MkdirAll(cache, 0o755); err != nil {
		t.Fatal(err)
	}
	// One test at a time builds the cache.
	lock, err := os.OpenFile(dir+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN) //nolint:errcheck // closing the file unlocks too
	if _, err := os.Stat(done); err == nil {
		t.Logf("Debian rootfs: cached in %s", dir)
		return dir
	}

	// Fail early, and clearly, when the mirror is out of reach.
	release := strings.TrimRight(mirror, "/") + "/dists/bookworm/Release"
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodHead, release, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("the Debian mirror %s is unreachable (%v): debootstrap needs it once to build the Debian image's root filesystem "+
			"(cached in %s afterwards); set BOXD_DEBIAN_MIRROR to a reachable mirror", mirror, err, dir)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("the Debian mirror %s answers %s for %s: set BOXD_DEBIAN_MIRROR to a working mirror", mirror, resp.Status, release)
	}

	partial := dir + ".partial"
	clearTree(t, partial)
	clearTree(t, dir)
	t.Logf("Debian rootfs: debootstrap --variant=minbase bookworm from %s (first run only)", mirror)
	start := time.Now()
	timeout := 15 * time.Minute
	if d, ok := t.Deadline(); ok && time.Until(d)-time.Minute < timeout {
		timeout = time.Until(d) - time.Minute
	}
	ctx, cancel = context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "debootstrap", "--variant=minbase", "bookworm", partial, mirror)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	out, err := cmd.CombinedOutput()
	// debootstrap mounts /proc and /sys inside the target while it works;
	// a failed or killed run can leave them.
	if mounts, _, uerr := unmountAll(partial); uerr != nil || len(mounts) > 0 {
		t.Logf("unmounted what debootstrap left mounted: %v %v", mounts, uerr)
	}
	if err != nil {
		t.Fatalf("debootstrap --variant=minbase bookworm from %s failed after %v (is the mirror reachable? "+
			"set BOXD_DEBIAN_MIRROR to another): %v\n%s", mirror, time.Since(start).Round(time.Second), err, tail(string(out), 25))
	}
	if err := os.Rename(partial, dir); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(done, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("Debian rootfs: debootstrap took %v", time.Since(start).Round(time.Second))
	return dir
}

// clearTree removes dir, a cache folder, unmounting first anything mounted
// under it so that nothing outside it is deleted.
func clearTree(t *testing.T, dir string) {
	t.Helper()
	if _, err := os.Lstat(dir); err != nil {
		return
	}
	if _, _, err := unmountAll(dir); err != nil {
		t.Fatalf("clearing %s: %v", dir, err)
	}
	if mps, err := mountinfo.Under(dir); err != nil || len(mps) > 0 {
		t.Fatalf("clearing %s: still mounted under it: %v %v", dir, mps, err)
	}
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
}

// readRootfsFile reads a file of the rootfs, for comparison with what a
// container prints.
func readRootfsFile(t *testing.T, rootfs, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(rootfs, name))
	if err != nil {
		t.Fatal(err)
	}
	return string(bytes.TrimSpace(b))
}
