// Package kvm is boxd's own micro-VMM on /dev/kvm: one VM with one vCPU in
// 64-bit long mode, port-I/O devices (a serial console and a control port),
// guest memory with KVM's dirty log, and snapshots of vCPU state and memory
// into the store, restored lazily over userfaultfd.
//
// Each VM runs in its own VMM process (`boxd vmm`), so a crashed guest or VMM
// takes nothing else down; the runner in the boxd process talks to it over a
// unix socket, owns the store, captures memory and serves the faults of
// restored VMs. A fork's snapshot (SnapshotForFork) reaches its children
// from host memory at once and the store in the background (pending.go).
//
// Without hardware virtualisation (vmx/svm) KVM here runs only guests the
// project builds itself, such as the conformance guest in guest/, and runs
// them far slower than native; Linux guests need vmx or svm.
package kvm
