package shim

import (
	"context"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	eventsapi "github.com/containerd/containerd/api/events"
	ttrpcevents "github.com/containerd/containerd/api/services/ttrpc/events/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Publisher sends the task's events to containerd, in the order given.
type Publisher interface {
	Publish(event proto.Message)
}

// The topics of the task's events (containerd's runtime package names).
const (
	TopicTaskCreate       = "/tasks/create"
	TopicTaskStart        = "/tasks/start"
	TopicTaskExit         = "/tasks/exit"
	TopicTaskDelete       = "/tasks/delete"
	TopicTaskExecAdded    = "/tasks/exec-added"
	TopicTaskExecStarted  = "/tasks/exec-started"
	TopicTaskPaused       = "/tasks/paused"
	TopicTaskResumed      = "/tasks/resumed"
	TopicTaskCheckpointed = "/tasks/checkpointed"
)

// topics are the topics of the events the task sends, by their names.
var topics = topicsByName()

func topicsByName() map[string]string {
	topics := map[string]string{}
	for topic, ev := range map[string]proto.Message{
		TopicTaskCreate: &eventsapi.TaskCreate{}, TopicTaskStart: &eventsapi.TaskStart{},
		TopicTaskExit: &eventsapi.TaskExit{}, TopicTaskDelete: &eventsapi.TaskDelete{},
		TopicTaskExecAdded: &eventsapi.TaskExecAdded{}, TopicTaskExecStarted: &eventsapi.TaskExecStarted{},
		TopicTaskPaused: &eventsapi.TaskPaused{}, TopicTaskResumed: &eventsapi.TaskResumed{},
		TopicTaskCheckpointed: &eventsapi.TaskCheckpointed{},
	} {
		topics[string(proto.MessageName(ev))] = topic
	}
	return topics
}

// topic is the topic of an event the task sends.
func topic(event proto.Message) string { return topics[string(proto.MessageName(event))] }

// Forwarder publishes events to containerd's ttrpc events service at an
// address (the shim's TTRPC_ADDRESS), one at a time in a goroutine of its
// own: a slow containerd never holds up a task method.
type Forwarder struct {
	addr, namespace string
	log             *slog.Logger
	queue           chan *types.Envelope
	done            chan struct{}
	closeOnce       sync.Once
}

// NewForwarder starts forwarding events of namespace to addr.
func NewForwarder(addr, namespace string, log *slog.Logger) *Forwarder {
	f := &Forwarder{addr: strings.TrimPrefix(addr, "unix://"), namespace: namespace, log: log,
		queue: make(chan *types.Envelope, 128), done: make(chan struct{})}
	go f.loop()
	return f
}

// Publish queues event for containerd.
func (f *Forwarder) Publish(event proto.Message) {
	topic := topic(event)
	data, err := proto.Marshal(event)
	if err != nil {
		f.log.Error("encoding an event", "topic", topic, "err", err)
		return
	}
	// containerd finds the event's type by its full name, without the
	// type.googleapis.com/ prefix anypb.New would add.
	env := &types.Envelope{
		Timestamp: timestamppb.Now(),
		Namespace: f.namespace,
		Topic:     topic,
		Event:     &anypb.Any{TypeUrl: string(proto.MessageName(event)), Value: data},
	}
	select {
	case f.queue <- env:
	default:
		f.log.Error("dropping an event: containerd is not taking them", "topic", topic)
	}
}

// Close sends the queued events (for at most a few seconds) and stops.
func (f *Forwarder) Close() {
	f.closeOnce.Do(func() { close(f.queue) })
	select {
	case <-f.done:
	case <-time.After(5 * time.Second):
	}
}

func (f *Forwarder) loop() {
	defer close(f.done)
	var client *ttrpc.Client
	defer func() {
		if client != nil {
			_ = client.Close()
		}
	}()
	for env := range f.queue {
		for try := 0; try < 5; try++ {
			if client == nil {
				conn, err := net.Dial("unix", f.addr)
				if err != nil {
					f.log.Warn("connecting to containerd's events", "addr", f.addr, "err", err)
					time.Sleep(time.Duration(try+1) * 100 * time.Millisecond)
					continue
				}
				client = ttrpc.NewClient(conn)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := ttrpcevents.NewTTRPCEventsClient(client).Forward(ctx, &ttrpcevents.ForwardRequest{Envelope: env})
			cancel()
			if err == nil {
				break
			}
			f.log.Warn("forwarding an event", "topic", env.Topic, "err", err)
			_ = client.Close()
			client = nil
		}
	}
}
