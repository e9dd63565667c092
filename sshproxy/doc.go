// Package sshproxy is boxd's SSH front door: `ssh NAME@host` reaches box NAME.
//
// The proxy speaks SSH to people and relays to the SSH server that boxd's
// agent runs inside each box. Vocabulary:
//
//   - Box name: the SSH user name. There are no host accounts; the proxy never
//     gives a shell on the host, it only relays to the box.
//   - Authorized keys: the public keys the box's owner registered
//     ([Backend.AuthorizedKeys]). Only public-key authentication is offered.
//     An unknown box and a wrong key are refused in exactly the same way.
//   - Command user: CommandUser ("boxd"), which reaches no box: with
//     [Server.Commands] set, ssh boxd@host COMMAND runs one of boxd's
//     commands for a key [Commands.CommandKeys] names, each session one
//     command, its output and exit status the session's.
//   - Backend client: the *ssh.Client that boxd holds on the box's agent
//     ([Backend.Connect]). It belongs to the backend and may be shared by
//     every connection to the box; the proxy opens channels on it and closes
//     only those.
//
// For each channel a person opens ("session" or "direct-tcpip") the proxy
// opens the same channel on the backend client and relays requests, data and
// stderr both ways; the box's exit-status reaches the person before the
// channel closes. Remote forwarding (ssh -R), agent forwarding (ssh -A) and
// X11 forwarding are refused: they need the box to open channels back towards
// the person, which the proxy does not relay.
package sshproxy
