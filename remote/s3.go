package remote

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/smithy-go"
	"github.com/boxd-dev/boxd/errcat"
	"github.com/containerd/errdefs"
)

// S3 is a Bucket on the S3 API: one bucket, keys under a prefix.
type S3 struct {
	client *s3.Client
	bucket string
	prefix string // "" or ending in "/"
}

// ParseURL splits s3://BUCKET/PREFIX into the bucket and the prefix
// (without its slashes at either end).
func ParseURL(s string) (bucket, prefix string, err error) {
	u, err := url.Parse(s)
	if err != nil || u.Scheme != "s3" || u.Host == "" || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return "", "", fmt.Errorf("remote %q: want s3://BUCKET or s3://BUCKET/PREFIX: %w", s, errdefs.ErrInvalidArgument)
	}
	return u.Host, strings.Trim(u.Path, "/"), nil
}

// OpenS3 returns the S3 bucket that url (s3://BUCKET/PREFIX) names, with
// the endpoint, region and credentials of the standard AWS configuration:
// the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
// AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_PROFILE) and the shared config
// and credentials files. With an endpoint of its own the bucket is
// addressed by path, as S3-compatible servers expect.
func OpenS3(ctx context.Context, rawURL string) (*S3, error) {
	bucket, prefix, err := ParseURL(rawURL)
	if err != nil {
		return nil, err
	}
	cfg, err := config.LoadDefaultConfig(ctx)
	if err != nil {
		return nil, fmt.Errorf("remote %s: AWS configuration: %w", rawURL, errcat.With(err, errdefs.ErrInvalidArgument))
	}
	if cfg.Region == "" {
		cfg.Region = "us-east-1"
	}
	// Checksums only where the API demands them: S3-compatible servers
	// differ in the ones they take.
	cfg.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
	cfg.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
	client := s3.NewFromConfig(cfg, func(o *s3.Options) {
		if o.BaseEndpoint != nil {
			o.UsePathStyle = true
		}
	})
	if prefix != "" {
		prefix += "/"
	}
	return &S3{client: client, bucket: bucket, prefix: prefix}, nil
}

// String returns the bucket's URL.
func (b *S3) String() string { return "s3://" + b.bucket + "/" + strings.TrimSuffix(b.prefix, "/") }

// Put implements Bucket.
func (b *S3) Put(ctx context.Context, key string, r io.ReadSeeker, size int64, create bool) error {
	in := &s3.PutObjectInput{Bucket: &b.bucket, Key: aws.String(b.prefix + key), Body: r, ContentLength: aws.Int64(size)}
	if create {
		in.IfNoneMatch = aws.String("*")
	}
	_, err := b.client.PutObject(ctx, in)
	return b.err("writing", key, err)
}

// Get implements Bucket.
func (b *S3) Get(ctx context.Context, key string) ([]byte, error) {
	out, err := b.client.GetObject(ctx, &s3.GetObjectInput{Bucket: &b.bucket, Key: aws.String(b.prefix + key)})
	if err != nil {
		return nil, b.err("reading", key, err)
	}
	defer out.Body.Close()
	data, err := io.ReadAll(out.Body)
	return data, b.err("reading", key, err)
}

// GetRange implements Bucket.
func (b *S3) GetRange(ctx context.Context, key string, off, n int64) ([]byte, error) {
	if n <= 0 {
		return nil, nil
	}
	rng := fmt.Sprintf("bytes=%d-%d", off, off+n-1)
	out, err := b.client.GetObject(ctx, &s3.GetObjectInput{Bucket: &b.bucket, Key: aws.String(b.prefix + key), Range: &rng})
	if err != nil {
		return nil, b.err("reading", key, err)
	}
	defer out.Body.Close()
	buf := bytes.NewBuffer(make([]byte, 0, n))
	if _, err := io.Copy(buf, io.LimitReader(out.Body, n+1)); err != nil {
		return nil, b.err("reading", key, err)
	}
	if int64(buf.Len()) != n {
		return nil, fmt.Errorf("remote: %s bytes %d+%d: got %d bytes: %w", key, off, n, buf.Len(), errdefs.ErrDataLoss)
	}
	return buf.Bytes(), nil
}

// Stat implements Bucket.
func (b *S3) Stat(ctx context.Context, key string) (int64, error) {
	out, err := b.client.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &b.bucket, Key: aws.String(b.prefix + key)})
	if err != nil {
		return 0, b.err("looking up", key, err)
	}
	return aws.ToInt64(out.ContentLength), nil
}

// List implements Bucket.
func (b *S3) List(ctx context.Context, prefix string) ([]Object, error) {
	var out []Object
	p := s3.NewListObjectsV2Paginator(b.client, &s3.ListObjectsV2Input{Bucket: &b.bucket, Prefix: aws.String(b.prefix + prefix)})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return nil, b.err("listing", prefix, err)
		}
		for _, o := range page.Contents {
			out = append(out, Object{Key: strings.TrimPrefix(aws.ToString(o.Key), b.prefix), Size: aws.ToInt64(o.Size)})
		}
	}
	return out, nil
}

// Delete implements Bucket.
func (b *S3) Delete(ctx context.Context, key string) error {
	_, err := b.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: &b.bucket, Key: aws.String(b.prefix + key)})
	if err != nil && errors.Is(b.err("removing", key, err), errdefs.ErrNotFound) {
		return nil
	}
	return b.err("removing", key, err)
}

// err categorises an error of the S3 API: 404 not found, 412 (a create
// refused) and 409 (a concurrent conditional write) already exists, 403
// permission denied, anything without an HTTP answer unavailable.
func (b *S3) err(what, key string, err error) error {
	if err == nil {
		return nil
	}
	var cat error
	var re *awshttp.ResponseError
	var ae smithy.APIError
	switch {
	case errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
		cat = errdefs.ErrUnavailable
	case errors.As(err, &re):
		_ = errors.As(err, &ae)
		switch re.HTTPStatusCode() {
		case 404:
			cat = errdefs.ErrNotFound
		case 409, 412:
			cat = errdefs.ErrAlreadyExists
		case 401, 403:
			cat = errdefs.ErrPermissionDenied
		case 400:
			cat = errdefs.ErrInvalidArgument
		default:
			cat = errdefs.ErrUnavailable
		}
	case errors.As(err, &ae):
		switch ae.ErrorCode() {
		case "NoSuchKey", "NotFound", "NoSuchBucket":
			cat = errdefs.ErrNotFound
		case "PreconditionFailed", "ConditionalRequestConflict":
			cat = errdefs.ErrAlreadyExists
		default:
			cat = errdefs.ErrUnavailable
		}
	default:
		cat = errdefs.ErrUnavailable
	}
	if re != nil && re.HTTPStatusCode() != 0 {
		// The server answered: its status and code say it all, without
		// the request ids.
		code := ""
		if ae != nil {
			code = " " + ae.ErrorCode()
		}
		return fmt.Errorf("remote %s %s: HTTP %d%s: %w", what, b.String()+"/"+key, re.HTTPStatusCode(), code, cat)
	}
	return fmt.Errorf("remote %s %s: %w", what, b.String()+"/"+key, errcat.With(err, cat))
}
