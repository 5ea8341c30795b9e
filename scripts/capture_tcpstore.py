#!/usr/bin/env python3
"""Capture a real torch TCPStore client/server exchange as fixtures for dtrain's store client.

Run by hand (needs `pip install torch`; CI does not have it):

    python3 scripts/capture_tcpstore.py            # writes transport/tests/fixtures/tcpstore_*

A real torch TCPStore server (the libuv backend, as torchrun's agent store) listens on a free
port; a recording TCP proxy sits in front of it; a real torch TCPStore client connects to the
proxy and runs the operations of OPERATIONS below, one at a time. The proxy logs every chunk in
causal order (a request is logged before it is forwarded, so its answer is always logged after
it); consecutive chunks in one direction are merged. Output:

- tcpstore_client.bin: every byte the torch client sent, in order;
- tcpstore_server.bin: every byte the server answered, in order;
- tcpstore_transcript.txt: one line per segment, `<operation> <C|S> <bytes>`, which splits the
  two streams into alternating client (C) and server (S) segments per operation.

transport/tests/tcpstore_replay.rs replays the server's segments to dtrain's client doing the
same operations and checks that the client's bytes equal torch's. Keep OPERATIONS and that
test's list in the same order.

`--backend classic` captures against the non-libuv server instead (same client bytes expected;
written to a temp dir and only compared, never committed).
"""

import argparse
import datetime
import os
import socket
import sys
import tempfile
import threading
import time

FIXTURES = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "transport", "tests", "fixtures"
)

# (label, callable on the client store). Values are bytes so nothing depends on str encoding.
OPERATIONS = [
    ("set", lambda s: s.set("dtrain/run-1/0/alpha", b"value-one")),
    ("get", lambda s: s.get("dtrain/run-1/0/alpha")),
    ("add_new", lambda s: s.add("dtrain/run-1/0/counter", 5)),
    ("add_existing", lambda s: s.add("dtrain/run-1/0/counter", -2)),
    ("check_present", lambda s: s.check(["dtrain/run-1/0/alpha"])),
    ("check_missing", lambda s: s.check(["dtrain/run-1/0/alpha", "dtrain/run-1/0/missing"])),
    ("wait_present", lambda s: s.wait(["dtrain/run-1/0/alpha", "dtrain/run-1/0/counter"])),
    (
        "wait_timeout",
        lambda s: s.wait(["dtrain/run-1/0/missing"], datetime.timedelta(milliseconds=300)),
    ),
    ("compare_set_create", lambda s: s.compare_set("dtrain/run-1/0/rank0", b"", b"10.0.0.1:4242")),
    ("compare_set_conflict", lambda s: s.compare_set("dtrain/run-1/0/rank0", b"", b"10.0.0.2:1")),
    (
        "compare_set_swap",
        lambda s: s.compare_set("dtrain/run-1/0/rank0", b"10.0.0.1:4242", b"10.0.0.3:7"),
    ),
    ("get_binary", lambda s: (s.set("dtrain/run-1/0/bin", bytes(range(256))), s.get("dtrain/run-1/0/bin"))),
]


class Recorder:
    """Ordered log of (label, direction, bytes) chunks, appended under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.label = "connect"
        self.chunks = []

    def log(self, direction, data):
        with self.lock:
            self.chunks.append((self.label, direction, data))

    def segments(self):
        merged = []
        for label, direction, data in self.chunks:
            if merged and merged[-1][0] == label and merged[-1][1] == direction:
                merged[-1] = (label, direction, merged[-1][2] + data)
            else:
                merged.append((label, direction, data))
        return merged


def pump(src, dst, direction, recorder):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            recorder.log(direction, data)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def start_proxy(server_port, recorder):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def accept_one():
        client, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", server_port))
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pump, args=(client, upstream, "C", recorder), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client, "S", recorder), daemon=True).start()

    threading.Thread(target=accept_one, daemon=True).start()
    return listener.getsockname()[1]


def settle(recorder):
    """Wait until the proxy has logged everything in flight (set has no answer to wait for)."""
    last = -1
    while True:
        time.sleep(0.15)
        with recorder.lock:
            n = sum(len(c[2]) for c in recorder.chunks)
        if n == last:
            return
        last = n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["libuv", "classic"], default="libuv")
    parser.add_argument("--out", help="output directory (default: the committed fixtures for libuv)")
    args = parser.parse_args()
    import torch
    import torch.distributed as dist

    out = args.out or (FIXTURES if args.backend == "libuv" else tempfile.mkdtemp())
    os.makedirs(out, exist_ok=True)
    server = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False,
        use_libuv=(args.backend == "libuv"), timeout=datetime.timedelta(seconds=10),
    )
    recorder = Recorder()
    proxy_port = start_proxy(server.port, recorder)
    client = dist.TCPStore(
        "127.0.0.1", proxy_port, is_master=False, wait_for_workers=False,
        timeout=datetime.timedelta(seconds=10),
    )
    settle(recorder)
    results = []
    for label, op in OPERATIONS:
        with recorder.lock:
            recorder.label = label
        try:
            results.append((label, repr(op(client))))
        except Exception as e:  # the timeout case raises; record what torch said
            results.append((label, f"raised {type(e).__name__}: {str(e).splitlines()[0]}"))
        settle(recorder)
    segments = recorder.segments()
    with open(os.path.join(out, "tcpstore_client.bin"), "wb") as f:
        f.write(b"".join(d for _, direction, d in segments if direction == "C"))
    with open(os.path.join(out, "tcpstore_server.bin"), "wb") as f:
        f.write(b"".join(d for _, direction, d in segments if direction == "S"))
    with open(os.path.join(out, "tcpstore_transcript.txt"), "w") as f:
        f.write(
            f"# torch {torch.__version__}, {args.backend} TCPStore server, written by "
            "scripts/capture_tcpstore.py\n"
        )
        for label, direction, data in segments:
            f.write(f"{label} {direction} {len(data)}\n")
    for label, result in results:
        print(f"{label:22} {result}")
    for label, direction, data in segments:
        print(f"{label:22} {direction} {data.hex()}")
    print(f"wrote {out}/tcpstore_{{client.bin,server.bin,transcript.txt}}", file=sys.stderr)


if __name__ == "__main__":
    main()
