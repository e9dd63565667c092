package kvm

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"

	ikvm "github.com/boxd-dev/boxd/internal/kvm"
)

// A VCPUState travels and is stored as JSON (in a snapshot's state map,
// and in the restore request to the VMM), but as one base64 string of its
// kernel structs back to back, little-endian, after a version byte:
//
//	version u8 | mp_state | regs | sregs | xsave | debugregs | vcpu_events | count u32 | msrs
//
// Decoding that costs a restore a fraction of what decoding the same
// state as JSON objects and numbers did; states saved that way still read.

// vcpuStateVersion is the first byte of the encoding.
const vcpuStateVersion = 1

// vcpuStateFields is VCPUState without its JSON methods: the object form
// that states were saved in before.
type vcpuStateFields VCPUState

// MarshalJSON writes the state as a base64 string (see above).
func (v VCPUState) MarshalJSON() ([]byte, error) {
	b := []byte{vcpuStateVersion}
	var err error
	// Arrays go as slices: encoding/binary's fast path.
	for _, part := range []any{&v.MPState, &v.Regs, &v.Sregs, v.XSave.Region[:], v.Debug.Raw[:], v.Events.Raw[:], uint32(len(v.MSRs)), v.MSRs} {
		if b, err = binary.Append(b, binary.LittleEndian, part); err != nil {
			return nil, fmt.Errorf("vcpu state: %w", err)
		}
	}
	out := make([]byte, 0, base64.StdEncoding.EncodedLen(len(b))+2)
	out = append(out, '"')
	out = base64.StdEncoding.AppendEncode(out, b)
	return append(out, '"'), nil
}

// UnmarshalJSON reads what MarshalJSON writes, or the JSON object states
// were saved as before.
func (v *VCPUState) UnmarshalJSON(data []byte) error {
	data = bytes.TrimSpace(data)
	if len(data) > 0 && data[0] == '{' {
		return json.Unmarshal(data, (*vcpuStateFields)(v))
	}
	var s []byte
	if len(data) >= 2 && data[0] == '"' && data[len(data)-1] == '"' && bytes.IndexByte(data, '\\') < 0 {
		s = data[1 : len(data)-1]
	} else {
		var str string
		if err := json.Unmarshal(data, &str); err != nil {
			return fmt.Errorf("vcpu state: want a base64 string or an object: %w", err)
		}
		s = []byte(str)
	}
	b := make([]byte, base64.StdEncoding.DecodedLen(len(s)))
	n, err := base64.StdEncoding.Decode(b, s)
	if err != nil {
		return fmt.Errorf("vcpu state: %w", err)
	}
	return v.decode(b[:n])
}

// decode reads the binary form.
func (v *VCPUState) decode(b []byte) error {
	if len(b) == 0 || b[0] != vcpuStateVersion {
		return errors.New("vcpu state: unknown encoding")
	}
	b = b[1:]
	var st VCPUState
	var count uint32
	for _, part := range []any{&st.MPState, &st.Regs, &st.Sregs, st.XSave.Region[:], st.Debug.Raw[:], st.Events.Raw[:], &count} {
		n, err := binary.Decode(b, binary.LittleEndian, part)
		if err != nil {
			return fmt.Errorf("vcpu state: truncated: %w", err)
		}
		b = b[n:]
	}
	if size := binary.Size(ikvm.MSR{}); uint64(count)*uint64(size) != uint64(len(b)) {
		return fmt.Errorf("vcpu state: %d MSRs in %d bytes", count, len(b))
	}
	if count > 0 {
		st.MSRs = make([]ikvm.MSR, count)
		if _, err := binary.Decode(b, binary.LittleEndian, st.MSRs); err != nil {
			return fmt.Errorf("vcpu state: %w", err)
		}
	}
	*v = st
	return nil
}
