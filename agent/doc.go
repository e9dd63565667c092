// Package agent is boxd's in-guest agent and the host's client for it.
//
// The agent is PID 1 of every box: the initramfs's /init is the static boxd-agent binary. It mounts the early
// filesystems, loads the kernel modules the initramfs carries, switches to the box's root disk, brings up the
// network, and then serves the host over one virtio-serial port.
//
// Vocabulary:
//
//   - Channel: the one byte stream between host and guest, a virtio-serial port in the guest (/dev/vportNpM,
//     named org.boxd.agent) and a unix socket of QEMU's chardev on the host. Nothing else can reach it: the socket
//     is root's alone.
//   - Link: a byte stream that outlives the channel under it (link.go): both ends number, acknowledge, keep
//     and replay what they send, so a channel that breaks (a restore into another QEMU, a hibernation) costs
//     no byte. The guest's end lives in the agent's memory, the host's in Client.
//   - Connection: one SSH connection over the link (or, with a client that starts no link, over the channel). The agent is the SSH server; the host is the client.
//     SSH gives multiplexed sessions, exec, ptys, environment, signals, exit statuses, sftp and port forwarding,
//     and lets the host's SSH front door relay an OpenSSH client's channels straight to the agent.
//   - Session: one SSH "session" channel, running one command (exec), a login shell (shell) or the sftp
//     subsystem.
//   - Unique: what makes a box its own after a fork or a restore from a shared snapshot: fresh RNG entropy, the
//     host's clock, a hostname and a machine-id.
//
// A channel ends when the host goes away (the port reads end of file), when the VM is restored into a new
// QEMU, or when bytes left over from an old channel break it. The agent then reopens the port and waits for
// the host to connect again (but a link whose channel ends at a new channel's sync line answers it on the port
// it has: Serve); the client's Dial retries until a handshake succeeds, and a client's link redials
// and resumes, so its SSH connection goes on. Before SSH starts, a short
// preamble (see preamble.go) lets the host skip bytes left on the line by earlier connections and know that a
// fresh agent session reads it, so a reconnect costs one round of it rather than a timeout. Because the channel
// is private to the host, the agent accepts SSH's "none" authentication and makes a fresh host key at boot, and
// the client does not check host keys (see Dial).
package agent
