package kvm

import (
	"encoding/base64"
	"encoding/json"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"

	ikvm "github.com/boxd-dev/boxd/internal/kvm"
)

// sampleVCPUState fills every field of a state with pseudo-random values.
func sampleVCPUState(msrs int) VCPUState {
	r := rand.New(rand.NewPCG(7, 11))
	var v VCPUState
	v.MPState.State = r.Uint32()
	v.Regs.RIP, v.Regs.RSP, v.Regs.R15 = r.Uint64(), r.Uint64(), r.Uint64()
	v.Sregs.CS = ikvm.Segment{Base: r.Uint64(), Limit: r.Uint32(), Selector: 8, Type: 11, Present: 1, L: 1}
	v.Sregs.GDT = ikvm.DTable{Base: r.Uint64(), Limit: 0x27}
	v.Sregs.CR3, v.Sregs.EFER, v.Sregs.InterruptBitmap[3] = r.Uint64(), 0x500, r.Uint64()
	for i := range v.XSave.Region {
		v.XSave.Region[i] = r.Uint32()
	}
	for i := range v.Debug.Raw {
		v.Debug.Raw[i] = byte(r.Uint32())
	}
	for i := range v.Events.Raw {
		v.Events.Raw[i] = byte(r.Uint32())
	}
	for range msrs {
		v.MSRs = append(v.MSRs, ikvm.MSR{Index: r.Uint32(), Data: r.Uint64()})
	}
	return v
}

// oldVCPUJSON is a state as it was saved before: JSON objects, its xsave
// region 1024 numbers.
func oldVCPUJSON(t testing.TB, v VCPUState) []byte {
	t.Helper()
	b, err := json.Marshal(map[string]any{
		"mp_state": v.MPState, "regs": v.Regs, "sregs": v.Sregs,
		"xsave":     struct{ Region [1024]uint32 }{v.XSave.Region},
		"debugregs": v.Debug, "msrs": v.MSRs, "events": v.Events,
	})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// encoded returns the binary form of v, for tests to damage.
func encoded(t *testing.T, v VCPUState) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := base64.StdEncoding.DecodeString(strings.Trim(string(b), `"`))
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

func quoted(b []byte) string { return `"` + base64.StdEncoding.EncodeToString(b) + `"` }

func TestVCPUStateJSON(t *testing.T) {
	full, none := sampleVCPUState(40), sampleVCPUState(0)
	raw := encoded(t, full)
	tests := []struct {
		name    string
		json    string
		want    VCPUState
		wantErr string
	}{
		{"binary, 40 MSRs", string(mustJSON(t, full)), full, ""},
		{"binary, no MSRs", string(mustJSON(t, none)), none, ""},
		{"object, as saved before", string(oldVCPUJSON(t, full)), full, ""},
		{"escaped string", strings.ReplaceAll(quoted(raw), "/", `\/`), full, ""},
		{"unknown version", quoted(append([]byte{9}, raw[1:]...)), VCPUState{}, "unknown encoding"},
		{"empty", `""`, VCPUState{}, "unknown encoding"},
		{"cut in the registers", quoted(raw[:100]), VCPUState{}, "truncated"},
		{"cut in the MSRs", quoted(raw[:len(raw)-8]), VCPUState{}, "40 MSRs in"},
		{"an MSR too many", quoted(append(raw, make([]byte, 16)...)), VCPUState{}, "40 MSRs in"},
		{"not base64", `"%%%%"`, VCPUState{}, "illegal base64"},
		{"a number", `12`, VCPUState{}, "want a base64 string or an object"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got VCPUState
			err := json.Unmarshal([]byte(tt.json), &got)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one saying %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("decoded state differs: %+v", got.Regs)
			}
		})
	}
	if !strings.HasPrefix(string(mustJSON(t, full)), `"`) {
		t.Error("a state is not written as a string")
	}
}

// TestStateJSON checks a whole State, parameters and vCPU, through JSON.
func TestStateJSON(t *testing.T) {
	st := State{Params: Params{MemSize: 256 << 20, PagesPerTick: 4, Seed: 42, PrintEvery: 1000}, VCPU: sampleVCPUState(40)}
	var got State
	if err := json.Unmarshal(mustJSON(t, st), &got); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, st) {
		t.Fatal("state differs after JSON")
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// BenchmarkStateDecode decodes a state with 40 MSRs as a restore does, in
// its binary form and in the JSON objects it was saved as before.
func BenchmarkStateDecode(b *testing.B) {
	v := sampleVCPUState(40)
	now, _ := json.Marshal(State{VCPU: v})
	before, _ := json.Marshal(map[string]json.RawMessage{"params": []byte(`{}`), "vcpu": oldVCPUJSON(b, v)})
	for _, c := range []struct {
		name string
		data []byte
	}{{"binary", now}, {"objects", before}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportMetric(float64(len(c.data)), "bytes")
			for b.Loop() {
				var st State
				if err := json.Unmarshal(c.data, &st); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
