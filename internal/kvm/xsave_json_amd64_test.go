package kvm

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

func sampleXSave() XSave {
	var x XSave
	for i := range x.Region {
		x.Region[i] = uint32(i) * 2654435761
	}
	return x
}

// TestXSaveJSON checks that an XSave survives JSON as base64, that the
// object of numbers saved states hold still reads, and that bad input is
// refused.
func TestXSaveJSON(t *testing.T) {
	x := sampleXSave()
	b, err := json.Marshal(struct{ X XSave }{x})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(b), `{"X":"`) || len(b) > 6000 {
		t.Fatalf("encoded as %.40s... (%d bytes), want a base64 string", b, len(b))
	}
	if !strings.Contains(string(b), "/") {
		t.Fatal("the sample's base64 has no slash to escape: pick another")
	}
	old, err := json.Marshal(struct{ Region [1024]uint32 }{x.Region})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		json    string
		want    XSave
		wantErr bool
	}{
		{"base64", string(b[len(`{"X":`) : len(b)-1]), x, false},
		{"object of numbers, as saved before", string(old), x, false},
		{"object with spaces around", " " + string(old) + "\n", x, false},
		{"base64 with an escaped slash", strings.Replace(string(b[len(`{"X":`):len(b)-1]), "/", `\/`, 1), x, false},
		{"too short", `"AAAA"`, XSave{}, true},
		{"not base64", `"` + strings.Repeat("!", 5464) + `"`, XSave{}, true},
		{"a number", `12`, XSave{}, true},
		{"object with a short region", `{"Region":"x"}`, XSave{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got XSave
			err := json.Unmarshal([]byte(tt.json), &got)
			if (err != nil) != tt.wantErr {
				t.Fatalf("error %v, want error: %v", err, tt.wantErr)
			}
			if !tt.wantErr && got != tt.want {
				t.Fatal("decoded region differs")
			}
		})
	}
}

// BenchmarkXSaveJSON decodes a state's xsave region as base64, against the
// object of 1024 numbers it was stored as before.
func BenchmarkXSaveJSON(b *testing.B) {
	x := sampleXSave()
	now, _ := json.Marshal(x)
	before, _ := json.Marshal(struct{ Region [1024]uint32 }{x.Region})
	for _, c := range []struct {
		name string
		data []byte
	}{{"base64", now}, {"numbers", before}} {
		b.Run(fmt.Sprintf("%s/%dB", c.name, len(c.data)), func(b *testing.B) {
			for b.Loop() {
				var got XSave
				if err := json.Unmarshal(c.data, &got); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
