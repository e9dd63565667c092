package snapshotter

// Image is the former name of Draft, kept until every caller is renamed.
//
// Deprecated: use Draft.
type Image = Draft

// NewImage is the former name of NewDraft, kept until every caller is
// renamed.
//
// Deprecated: use NewDraft.
func (g *Graph) NewImage(parent string) (*Draft, error) { return g.NewDraft(parent) }
