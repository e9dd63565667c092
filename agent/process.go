package agent

// A kept process is one the agent runs by name for a client that may come
// and go: a container's process. Unlike a session's command, it is not tied
// to the connection that started it. Its client attaches to it by ID over
// a ProcessChannel channel; when that channel or its connection ends (the
// box was snapshotted and restored into another QEMU, hibernated, or its
// client went away) the process runs on, and what it writes waits, in its
// pipes and the agent's memory, for the next attach. The agent keeps its
// exit status until the process is forgotten (ForgetProcessRequest).

// ProcessChannel is the SSH channel type that starts or attaches to a kept
// process; the channel's extra data is a ProcessSpec in JSON.
//
// On the channel: data from the client is the process's standard input
// (the channel's end is not the input's: CloseStdinRequest ends it); data
// from the agent is its standard output, extended data of type 1 its
// standard error. Once the process has exited and every byte of its output
// was sent, the agent sends an "exit-status" request (uint32, as a session
// does; 128+n for a death by signal n) and closes the channel.
//
// A process that cannot be started (a bad spec, an ID in use, a program
// not found or not executable, a working folder missing) rejects the
// channel, as a session's exec that cannot start fails its request; so
// does an attach to an unknown ID. The rejection's message is a failure
// payload (see below). A new attach to a process that has one closes the
// earlier channel.
const ProcessChannel = "process@boxd.dev"

// Global requests on a kept process, each with a JSON payload; the reply's
// payload is empty or, on failure, a one-sentence error. A failure payload
// starts with the error's category as errcat names it on the wire and ": "
// ("not_found: agent: no kept process \"x\"") when it has one, so the
// client's error has the same category (an unknown ID is not found).
const (
	// ProcessesRequest lists the kept processes; its reply's payload is a
	// JSON []ProcessInfo. Its request payload is empty.
	ProcessesRequest = "processes@boxd.dev"
	// SignalProcessRequest sends a signal to a kept process (a
	// ProcessSignal); with a terminal, to its process group.
	SignalProcessRequest = "process-signal@boxd.dev"
	// ResizeProcessRequest changes a kept process's terminal size (a
	// ProcessResize).
	ResizeProcessRequest = "process-resize@boxd.dev"
	// CloseStdinRequest ends a kept process's standard input (a
	// ProcessRef), once the input its attached channel carries reached it:
	// the agent waits (at most 2 seconds) for that channel's end of file,
	// which the client sends when its input ends. With a terminal, it
	// writes the terminal's end of file character (^D) and drops later
	// input.
	CloseStdinRequest = "process-close-stdin@boxd.dev"
	// ForgetProcessRequest kills a kept process if it runs (SIGKILL) and
	// forgets it and its exit status (a ProcessRef).
	ForgetProcessRequest = "process-forget@boxd.dev"
)

// ProcessSpec is what to run as a kept process, or which to attach to.
type ProcessSpec struct {
	// ID names the process in the box; an ID is used once while it is kept.
	ID string `json:"id"`
	// Attach attaches to kept process ID, started earlier, rather than
	// starting it; the other fields are then ignored.
	Attach bool `json:"attach,omitempty"`
	// Args is the program and its arguments, run as they are (no shell);
	// a program without a slash is looked up in Env's PATH.
	Args []string `json:"args,omitempty"`
	// Env is the whole environment, KEY=VALUE.
	Env []string `json:"env,omitempty"`
	// Cwd is the working directory ("" means /).
	Cwd string `json:"cwd,omitempty"`
	// UID, GID and AdditionalGids are the process's credentials.
	UID            uint32   `json:"uid,omitempty"`
	GID            uint32   `json:"gid,omitempty"`
	AdditionalGids []uint32 `json:"additional_gids,omitempty"`
	// Terminal runs the process on a pseudo-terminal of Rows x Cols (24 x
	// 80 when zero), its session leader; its output all arrives as
	// standard output.
	Terminal bool `json:"terminal,omitempty"`
	Rows     int  `json:"rows,omitempty"`
	Cols     int  `json:"cols,omitempty"`
	// Root, when set and not "/", is the folder of the box the process
	// sees as /, a container's root file system: the box's /proc, /sys and
	// /dev are bound into it for the process alone (see EnterName), and
	// Args[0] and Cwd are looked up in it.
	Root string `json:"root,omitempty"`
	// Hostname, when set, becomes the box's hostname before the process
	// starts.
	Hostname string `json:"hostname,omitempty"`
}

// ProcessInfo describes a kept process (ProcessesRequest).
type ProcessInfo struct {
	ID  string `json:"id"`
	Pid int    `json:"pid"` // in the guest
	// Running is false once it has exited; ExitCode is then its status,
	// as a session's exit-status reports it.
	Running  bool `json:"running"`
	ExitCode int  `json:"exit_code"`
}

// ProcessRef names a kept process in a global request.
type ProcessRef struct {
	ID string `json:"id"`
}

// ProcessSignal is the payload of SignalProcessRequest.
type ProcessSignal struct {
	ID     string `json:"id"`
	Signal int    `json:"signal"` // a Linux signal number
}

// ProcessResize is the payload of ResizeProcessRequest.
type ProcessResize struct {
	ID   string `json:"id"`
	Rows int    `json:"rows"`
	Cols int    `json:"cols"`
}
