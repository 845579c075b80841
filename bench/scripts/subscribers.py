"""Server CPU per event for live delivery at scale, outside the bench:
one subscriber holding K subscriptions (each to a name of its own, events
published to one of them, every delivery acknowledged), or M idle
subscribers connected while one connection publishes (what the bench's
`crowd` workload measures against Redis and NATS).

    python3 bench/scripts/subscribers.py BINARY subscriptions K EVENTS
    python3 bench/scripts/subscribers.py BINARY trickle K EVENTS
    python3 bench/scripts/subscribers.py BINARY idle M EVENTS
    python3 bench/scripts/subscribers.py BINARY subscribing K EVENTS

`subscriptions` publishes with up to 200 events unanswered, so that a
pull finds many; `trickle` publishes the next event only once the last
was delivered and acknowledged, so that each pull finds one.
`subscribing` times the K `SUB`s themselves, pipelined on one
connection, then EVENTS published to the first name and delivered.

The server runs pinned to CPU 1 on a fresh data directory; the script
prints events/s and the server's CPU time (user + system) per event.
Compare two builds by running them in turns.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

PAYLOAD = '{"user":"u1","pad":"' + "x" * 200 + '"}'


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, binary):
        self.port = free_port()
        self.http_port = free_port()
        self.dir = tempfile.mkdtemp(prefix="ensync-subscribers-")
        self.proc = subprocess.Popen(
            ["taskset", "-c", "1", binary, "--listen", f"127.0.0.1:{self.port}",
             "--http-listen", f"127.0.0.1:{self.http_port}", "--data-dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port)).close()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("the server did not start")

    def cpu_seconds(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def connect(self, client):
        s = socket.create_connection(("127.0.0.1", self.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")
        s.sendall(f"CONN;CLIENT_ID={client}\n".encode())
        expect(f, b"+PASS:CONNECTED")
        return s, f

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def expect(f, prefix):
    line = f.readline()
    if not line.startswith(prefix):
        raise SystemExit(f"expected {prefix!r}, got {line!r}")


def subscribe(s, f, client, names):
    s.sendall(b"".join(f"SUB;CLIENT_ID={client};EVENT_NAME={n}\n".encode() for n in names))
    for _ in names:
        expect(f, b"+PASS:SUBSCRIBED")


def publish(s, f, name, n, window):
    """Publishes n events of `name`, up to `window` unanswered."""
    line = f"PUB;CLIENT_ID=pub;EVENT_NAME={name};PAYLOAD={PAYLOAD};DELIVERY_TO=*\n".encode()
    sent = acked = 0
    while acked < n:
        if sent < n and (sent - acked <= window // 2 or sent == acked):
            count = min(window - (sent - acked), n - sent)
            s.sendall(line * count)
            sent += count
        expect(f, b"+PASS:PUBLISHED")
        acked += 1


def subscriptions(server, k, n):
    """Connects; returns what is timed."""
    sub, sf = server.connect("sub")
    subscribe(sub, sf, "sub", [f"s/{i}" for i in range(k)])
    pub, pf = server.connect("pub")

    def timed():
        publisher = threading.Thread(target=publish, args=(pub, pf, "s/0", n, 200))
        publisher.start()
        got = 0
        while got < n:
            line = sf.readline()
            if line.startswith(b"+RECORD:"):
                idem = json.loads(line[len(b"+RECORD:"):])["idem"]
                sub.sendall(f"ACK;CLIENT_ID=sub;EVENT_IDEM={idem}\n".encode())
                got += 1
        publisher.join()

    return timed


def trickle(server, k, n):
    """Connects; returns what is timed."""
    sub, sf = server.connect("sub")
    subscribe(sub, sf, "sub", [f"s/{i}" for i in range(k)])
    pub, pf = server.connect("pub")

    def timed():
        for _ in range(n):
            publish(pub, pf, "s/0", 1, 1)
            line = sf.readline()
            if not line.startswith(b"+RECORD:"):
                raise SystemExit(f"expected a record, got {line!r}")
            idem = json.loads(line[len(b"+RECORD:"):])["idem"]
            sub.sendall(f"ACK;CLIENT_ID=sub;EVENT_IDEM={idem}\n".encode())
            expect(sf, b"+PASS:ACKNOWLEDGED")

    return timed


def subscribing(server, k, n):
    """Connects; returns what is timed."""
    sub, sf = server.connect("sub")
    pub, pf = server.connect("pub")

    def timed():
        subscribe(sub, sf, "sub", [f"s/{i}" for i in range(k)])
        publish(pub, pf, "s/0", n, 200)
        for _ in range(n):
            expect(sf, b"+RECORD:")

    return timed


def idle(server, m, n):
    """Connects; returns what is timed."""
    held = []
    for i in range(m):
        s, f = server.connect(f"idle{i}")
        subscribe(s, f, f"idle{i}", [f"idle/{i}"])
        held.append((s, f))
    pub, pf = server.connect("pub")

    def timed():
        publish(pub, pf, "busy", n, 1000)
        assert len(held) == m  # connected until the end

    return timed


def main():
    binary, kind, count, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    run = {
        "subscriptions": subscriptions,
        "trickle": trickle,
        "idle": idle,
        "subscribing": subscribing,
    }[kind]
    server = Server(binary)
    try:
        timed = run(server, count, n)
        cpu, start = server.cpu_seconds(), time.time()
        timed()
        cpu, took = server.cpu_seconds() - cpu, time.time() - start
    finally:
        server.stop()
    if kind == "subscribing":
        print(f"{kind}={count}: {took:.2f} s, server CPU {cpu:.2f} s"
              f" ({1e6 * cpu / count:.1f} us a SUB, with the {n} events)")
    else:
        print(f"{kind}={count}: {n / took:,.0f} events/s, server CPU {1e6 * cpu / n:.1f} us/event")


if __name__ == "__main__":
    main()
