# boxd: build, test, lint, bench, demo.
GO            ?= go
LINT_VERSION  := v2.15.0
TOOLS         := $(CURDIR)/.tools
LINT          := $(TOOLS)/golangci-lint-$(LINT_VERSION)
TEST_TIMEOUT  ?= 60m

.PHONY: all build test lint bench demo demo-store deps clean

all: build

# bin/containerd-shim-boxd-v2 is containerd's runtime io.containerd.boxd.v2.
# bin/boxd-agent is the in-guest agent, the /init of a box's initramfs: static, no cgo.
build:
	$(GO) build -o bin/boxd ./cmd/boxd
	$(GO) build -o bin/containerd-shim-boxd-v2 ./cmd/containerd-shim-boxd-v2
	CGO_ENABLED=0 $(GO) build -ldflags='-s -w' -o bin/boxd-agent ./cmd/boxd-agent

# Debian packages the tests and demo use (e2fsprogs for mkfs.ext4).
deps:
	@./scripts/deps.sh

# Every test this kind of machine can run (root: loop mounts, tmpfs mounts).
test: deps build
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) ./...

$(LINT):
	mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(LINT_VERSION)
	mv $(TOOLS)/golangci-lint $(LINT)

lint: $(LINT)
	$(LINT) run ./...

# The side-by-side benchmarks: the store (boxd vs restic, sha256sum, cp),
# memstore (the userfaultfd handler vs the C baseline), the kvm runner (fork,
# hibernate, resume vs QEMU's device-state figures), the containerd
# snapshotter (vs native, overlayfs, blockfile), Linux boxes under QEMU (vs a
# bare boot), the front door (ssh, fork, ls vs sshd, boxd exec, cold create), CI
# jobs on forks (boxd run vs cold boxes), fork and resume under a daemon whose
# metrics are scraped (vs one serving none);
# then the Go benchmarks of the other packages.
bench: deps build
	./bench/store.sh
	./bench/memstore.sh
	./bench/kvm.sh
	./bench/snapshotter.sh
	./bench/guest.sh
	./bench/frontdoor.sh
	./bench/inside.sh
	./bench/run.sh
	./bench/metrics.sh
	./bench/containerd.sh
	$(GO) test -run '^$$' -bench . -benchtime 3x ./cas/ ./snapshotter/ ./memstore/

# Sets up and runs the box demo on embedded defaults: image, daemon, a box, ssh.
demo: deps build
	./scripts/demo.sh

# The store demo: ingest, dedup report, export, verify.
demo-store: deps build
	./scripts/store-demo.sh

clean:
	rm -rf bin
