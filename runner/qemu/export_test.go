package qemu

// DropQMP closes m's QMP connection, as a process that dies does.
func DropQMP(m *Machine) {
	m.qmpMu.Lock()
	defer m.qmpMu.Unlock()
	_ = m.qmp.close()
}
