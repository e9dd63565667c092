package daemon

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

func TestCompactIdle(t *testing.T) {
	for _, tc := range []struct {
		name      string
		sinceLast time.Duration // since the API's last request
		left      int           // packs to compact
		wantCalls int
		wantPacks int
	}{
		{"busy", time.Second, 3, 0, 0},
		{"quiet, nothing to do", time.Hour, 0, 1, 0},
		{"quiet, three packs", time.Hour, 3, 3, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			now := time.Unix(1_000_000, 0)
			g := &fakeGraph{left: tc.left}
			srv := NewServer(context.Background(), Options{Manager: newFakeManager(), Graph: g, Now: func() time.Time { return now }})
			// A request through the API marks the start of the spell.
			now = now.Add(-tc.sinceLast)
			srv.Handler().ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/v1/info", nil))
			now = now.Add(tc.sinceLast)
			st, err := srv.CompactIdle(context.Background(), time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			if g.compacts != tc.wantCalls || st.PacksCompacted != tc.wantPacks {
				t.Fatalf("%d Compact calls, %d packs; want %d, %d", g.compacts, st.PacksCompacted, tc.wantCalls, tc.wantPacks)
			}
		})
	}
}
