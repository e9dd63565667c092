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
// channel closes.
//
// Remote forwarding (ssh -R) and agent forwarding (ssh -A) need the box to
// open channels back towards the person, on a backend client every
// connection to the box shares. Each connection has a random tag: the proxy
// adds it to the tcpip-forward, cancel-tcpip-forward and
// auth-agent-req@openssh.com requests it relays, the box's agent puts it on
// the forwarded-tcpip and auth-agent@openssh.com channels it opens because
// of them, and the proxy hands each such channel to the connection its tag
// names, if that connection holds the forward or asked for the agent, with
// the tag taken off. A person's forward requests and channels reach the box
// in the order they were sent, so a forward asked for before a session is
// in place when the session's command starts; the forwards a person still
// holds are cancelled when they leave. Where the box listens is the agent's
// rule (see agent.ForwardRequest): the loopback addresses for OpenSSH's
// default bind address, an address the person names as given. X11
// forwarding is refused.
//
// Refused logins are logged at Warn with the user name (the box) and the
// fingerprints of the keys refused; the person sees only OpenSSH's
// "Permission denied". A source address that keeps failing waits longer
// before each refusal ([Throttle]).
package sshproxy
