package remote

import (
	"context"
	"io"
)

// Bucket is what a remote needs of an object store. Keys are relative to
// the store's prefix. Errors carry a category: a missing object
// errdefs.ErrNotFound, a create refused because the object exists
// errdefs.ErrAlreadyExists, a store that cannot be reached
// errdefs.ErrUnavailable.
type Bucket interface {
	// Put writes the size bytes of r as object key. With create it is
	// refused when key exists (If-None-Match: *), so no object is ever
	// replaced by it.
	Put(ctx context.Context, key string, r io.ReadSeeker, size int64, create bool) error
	// Get reads object key whole.
	Get(ctx context.Context, key string) ([]byte, error)
	// GetRange reads n bytes of object key from off.
	GetRange(ctx context.Context, key string, off, n int64) ([]byte, error)
	// Stat returns the size of object key.
	Stat(ctx context.Context, key string) (int64, error)
	// List returns the objects whose keys start with prefix.
	List(ctx context.Context, prefix string) ([]Object, error)
	// Delete removes object key; a missing one is no error.
	Delete(ctx context.Context, key string) error
}

// Object is one object of a listing.
type Object struct {
	Key  string
	Size int64
}
