package kvm

import (
	"os"
	"testing"
	"time"

	ikvm "github.com/boxd-dev/boxd/internal/kvm"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/runner/kvm/guest"
)

func guestCode(t testing.TB) []byte {
	t.Helper()
	path, err := guest.Build(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	code, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return code
}

func TestLocalVMRunsAndRestores(t *testing.T) {
	requireKVM(t)
	code := guestCode(t)
	p := Params{MemSize: 16 << 20, PagesPerTick: 4, Seed: 42, PrintEvery: 1000}
	console := &testutil.LockedBuffer{}
	m, err := newLocalVM(p, console)
	if err != nil {
		t.Fatal(err)
	}
	defer m.close()
	if err := m.boot(code); err != nil {
		t.Fatal(err)
	}
	m.start()
	defer m.shutdown()
	r1, err := m.report(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	r2, err := m.report(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if r2.Tick <= r1.Tick || r1.Checksum == r2.Checksum {
		t.Fatalf("guest does not tick: %+v then %+v", r1, r2)
	}
	console.WaitFor(t, "tick 00000000000003e8\n", 10*time.Second) // tick 1000

	// Pause, save, copy memory into a second machine, restore, and ask
	// both for a report at their next tick: the same state gives the same
	// answer.
	if err := m.pause(); err != nil {
		t.Fatal(err)
	}
	st, err := m.saveState()
	if err != nil {
		t.Fatal(err)
	}
	c, err := newLocalVM(p, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	copy(c.mem, m.mem)
	if err := c.mapMemory(); err != nil {
		t.Fatal(err)
	}
	if err := c.restoreState(st); err != nil {
		t.Fatal(err)
	}
	m.requestReport()
	c.requestReport()
	c.start()
	defer c.shutdown()
	if err := m.resume(); err != nil {
		t.Fatal(err)
	}
	pr, err := m.waitReport(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	cr, err := c.waitReport(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if pr != cr {
		t.Fatalf("restored machine reports %+v, parent %+v", cr, pr)
	}
}

func requireKVM(t testing.TB) {
	t.Helper()
	if _, err := os.Stat("/dev/kvm"); err != nil {
		t.Skipf("needs /dev/kvm: %v", err)
	}
}

// TestStateKeepsMSRs checks that a saved state holds the vCPU's MSRs and a
// restore sets them: values written into one machine's MSRs read back the
// same from a second machine restored from its state.
func TestStateKeepsMSRs(t *testing.T) {
	requireKVM(t)
	p := Params{MemSize: 16 << 20, PagesPerTick: 4, Seed: 42, PrintEvery: 1000}
	m, err := newLocalVM(p, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.close()
	if err := m.boot(guestCode(t)); err != nil {
		t.Fatal(err)
	}
	want := []ikvm.MSR{
		{Index: 0x174, Data: 0x10},                        // IA32_SYSENTER_CS
		{Index: 0x175, Data: 0xffff_8000_0000_1000},       // IA32_SYSENTER_ESP
		{Index: 0xc000_0102, Data: 0xffff_8880_1234_5000}, // IA32_KERNEL_GS_BASE
	}
	for _, msr := range want {
		if err := m.cpu.SetMSR(msr); err != nil {
			t.Fatal(err)
		}
	}
	st, err := m.saveState()
	if err != nil {
		t.Fatal(err)
	}
	saved := map[uint32]uint64{}
	for _, msr := range st.VCPU.MSRs {
		saved[msr.Index] = msr.Data
	}
	c, err := newLocalVM(p, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	if err := c.mapMemory(); err != nil {
		t.Fatal(err)
	}
	if err := c.restoreState(st); err != nil {
		t.Fatal(err)
	}
	idx := make([]uint32, len(want))
	for i, msr := range want {
		idx[i] = msr.Index
	}
	got, err := c.cpu.MSRs(idx)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("read %d MSRs back, want %d", len(got), len(want))
	}
	for i, msr := range want {
		if v, ok := saved[msr.Index]; !ok || v != msr.Data {
			t.Errorf("MSR %#x saved as %#x (listed: %v), want %#x", msr.Index, v, ok, msr.Data)
		}
		if got[i] != msr {
			t.Errorf("MSR %#x restored as %#x (index %#x), want %#x", msr.Index, got[i].Data, got[i].Index, msr.Data)
		}
	}
}
