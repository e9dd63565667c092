package agent

// categorized keeps an error's message and chain and adds an errdefs category that errors.Is finds.
type categorized struct {
	error
	cat error
}

func (c categorized) Is(target error) bool { return target == c.cat }
func (c categorized) Unwrap() error        { return c.error }

// withCategory returns err, unchanged in message and chain, that also matches cat under errors.Is.
func withCategory(err, cat error) error {
	if err == nil {
		return nil
	}
	return categorized{err, cat}
}
