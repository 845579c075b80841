"""What one client's replays of history the page cache no longer holds
cost the other clients of a server given one CPU, outside the bench:

    python3 bench/scripts/cold_replays.py BINARY [EVENTS] [SECONDS] [catch-up|operator]

The server runs pinned to CPU 1 on a fresh data directory. The script
loads EVENTS events of one name (default 300,000). Then, for SECONDS
(default 10), one client replays 50 events at a time from random
timestamps of the load, while the data directory's files are dropped
from the page cache every second (posix_fadvise), so its replays keep
reading from the disk; another client sends PING, one at a time, and
times each answer. It prints the PINGs' p50, p99 and worst, and how many
replays were made. With `catch-up`, the client is a subscriber instead,
away while the events are published, that then takes them as deliveries
and acknowledges each, as after an outage (it prints how many it took).
With `operator`, the subscriber subscribes after the events are published
and goes away; an operator replay (`POST /replays`) queues them all for
it, and it then connects and takes and acknowledges them as replayed
deliveries. PACE=N in the environment keeps such a subscriber to N
deliveries a second, so that the server's CPU is not what the PINGs
wait for.
Run it under a read limit (cgroup v1
`blkio.throttle.read_iops_device`) to stand for a slower disk, and run
two builds in turns.
"""

import http.client
import json
import multiprocessing
import os
import random
import sys
import time

from subscribers import Server, expect, publish, subscribe


def drop_cache(top):
    for root, _, names in os.walk(top):
        for name in names:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def replays(server, first_ms, last_ms, until, done):
    s, f = server.connect("reader")
    subscribe(s, f, "reader", ["cold"])
    rng = random.Random(7)
    dropped = 0.0
    while time.monotonic() < until:
        if time.monotonic() - dropped >= 1.0:
            drop_cache(server.dir)
            dropped = time.monotonic()
        at = rng.randint(first_ms, last_ms)
        s.sendall(f"REPLAY;CLIENT_ID=reader;EVENT_NAME=cold;FROM_POSITION={at};LIMIT=50\n".encode())
        header = f.readline()
        if not header.startswith(b"+PASS:REPLAY_STARTED"):
            raise SystemExit(f"replay refused: {header!r}")
        count = int(header.rsplit(b"COUNT=", 1)[1])
        for _ in range(count):
            expect(f, b"+RECORD:")
        with done.get_lock():
            done.value += 1


def catch_up(server, until, done):
    """Takes the backlog as deliveries, acknowledging each; no faster than
    $PACE a second when that is set."""
    pace = float(os.environ.get("PACE", "0"))
    s, f = server.connect("reader")
    dropped, started, taken = 0.0, time.monotonic(), 0
    while time.monotonic() < until:
        if pace:
            time.sleep(max(0.0, taken / pace - (time.monotonic() - started)))
        if time.monotonic() - dropped >= 1.0:
            drop_cache(server.dir)
            dropped = time.monotonic()
        line = f.readline()
        if not line.startswith(b"+RECORD:"):
            continue
        idem = line.split(b'"idem":"', 1)[1].split(b'"', 1)[0].decode()
        s.sendall(f"ACK;CLIENT_ID=reader;EVENT_IDEM={idem}\n".encode())
        taken += 1
        with done.get_lock():
            done.value += 1


def operator_replay(server, name):
    """Replays every event of `name` to its subscribers; waits until the
    operation has queued them all."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port)
    conn.request("POST", "/replays", json.dumps({"eventName": name}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    body = json.loads(response.read())
    if response.status != 202:
        raise SystemExit(f"replay refused: {response.status} {body}")
    while True:
        conn.request("GET", f"/asyncOperations/{body['asyncOperationId']}")
        op = json.loads(conn.getresponse().read())
        if op["status"] == "SUCCEEDED":
            return op
        if op["status"] not in ("PENDING", "RUNNING"):
            raise SystemExit(f"replay ended {op['status']}: {op}")
        time.sleep(0.1)


def main():
    binary = sys.argv[1]
    events = int(sys.argv[2]) if len(sys.argv) > 2 else 300_000
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
    mode = sys.argv[4] if len(sys.argv) > 4 else "replays"
    catching_up = mode in ("catch-up", "operator")
    server = Server(binary)
    try:
        def subscribe_and_leave():
            s, f = server.connect("reader")
            subscribe(s, f, "reader", ["cold"])
            f.close()
            s.close()
        if mode == "catch-up":
            subscribe_and_leave()
        pub, pf = server.connect("pub")
        first_ms = int(time.time() * 1000)
        publish(pub, pf, "cold", events, 200)
        last_ms = int(time.time() * 1000)
        if mode == "operator":
            subscribe_and_leave()
            op = operator_replay(server, "cold")
            if op["deliveries"] != events:
                raise SystemExit(f"the replay queued {op['deliveries']} of {events}")
        pinger, pingf = server.connect("pinger")
        until = time.monotonic() + seconds
        # A process of its own: a thread would hold the pinger up on the
        # interpreter's lock while it reads records.
        done = multiprocessing.Value("l", 0)
        if catching_up:
            drop_cache(server.dir)
            reader = multiprocessing.Process(target=catch_up, args=(server, until, done))
        else:
            reader = multiprocessing.Process(
                target=replays, args=(server, first_ms, last_ms, until, done))
        reader.start()
        waits = []
        while time.monotonic() < until:
            start = time.perf_counter()
            pinger.sendall(b"PING\n")
            expect(pingf, b"+PASS:PONG")
            waits.append(time.perf_counter() - start)
            time.sleep(0.002)
        reader.join()
    finally:
        server.stop()
    waits.sort()
    pick = lambda q: 1e6 * waits[min(len(waits) - 1, int(q * len(waits)))]
    what = "deliveries" if catching_up else "replays"
    print(f"{done.value:,} {what}; {len(waits):,} PINGs answered in "
          f"p50 {pick(0.5):.0f} us, p99 {pick(0.99):.0f} us, worst {1e6 * waits[-1]:.0f} us")


if __name__ == "__main__":
    main()
