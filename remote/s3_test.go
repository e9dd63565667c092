package remote_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/remote"
	"github.com/containerd/errdefs"
)

func TestParseURL(t *testing.T) {
	for _, tc := range []struct {
		url, bucket, prefix string
		ok                  bool
	}{
		{"s3://boxes", "boxes", "", true},
		{"s3://boxes/", "boxes", "", true},
		{"s3://boxes/prod/eu", "boxes", "prod/eu", true},
		{"s3://boxes/prod/", "boxes", "prod", true},
		{"http://boxes/prod", "", "", false},
		{"s3:///prod", "", "", false},
		{"s3://key:secret@boxes/prod", "", "", false},
		{"s3://boxes/prod?versionId=1", "", "", false},
		{"boxes/prod", "", "", false},
	} {
		bucket, prefix, err := remote.ParseURL(tc.url)
		if tc.ok != (err == nil) || bucket != tc.bucket || prefix != tc.prefix {
			t.Errorf("ParseURL(%q) = %q, %q, %v", tc.url, bucket, prefix, err)
		}
		if err != nil && !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("ParseURL(%q): %v, want invalid argument", tc.url, err)
		}
	}
}

// TestSharedConfig reaches the server with the endpoint and keys of the
// shared AWS config and credentials files, a profile of them named by
// AWS_PROFILE, and no AWS_* keys in the environment.
func TestSharedConfig(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s, url := startS3(ctx, t)
	for _, k := range []string{"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL_S3"} {
		t.Setenv(k, "")
		os.Unsetenv(k)
	}
	dir := t.TempDir()
	config := "[profile boxd]\nregion = us-east-1\nendpoint_url = " + s.Endpoint + "\n"
	creds := "[boxd]\naws_access_key_id = " + s.AccessKey + "\naws_secret_access_key = " + s.Secret + "\n"
	for name, text := range map[string]string{"config": config, "credentials": creds} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(dir, "config"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(dir, "credentials"))
	t.Setenv("AWS_PROFILE", "boxd")
	b, err := remote.OpenS3(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Put(ctx, "probe", bytes.NewReader([]byte("x")), 1, true); err != nil {
		t.Fatalf("a write with the shared files' keys: %v", err)
	}
	if err := b.Put(ctx, "probe", bytes.NewReader([]byte("y")), 1, true); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("a second create of the same key: %v, want already exists", err)
	}
	if got, err := b.Get(ctx, "probe"); err != nil || string(got) != "x" {
		t.Fatalf("read back: %q %v", got, err)
	}
}
