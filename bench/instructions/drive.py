"""Drives an ensync-server running under callgrind: loads a log, then
times nothing but asks callgrind to count the server's instructions over
a run of seeks, a run of LIMIT-50 replays and a run of pipelined
publishes (see count.sh).

usage: drive.py PORT EVENTS SEEKS REPLAYS PUBLISHES VALGRIND_PID TAG

With AFTER=N in the environment, N events of another name are loaded
after the log, uncounted: with a small `store.index_cache` (see
count.sh's CONFIG) the log's chunks are then older than the store's
in-memory directory reaches, as in a long-running server.

With POSITIONS=FILE, a run that finds no FILE loads the log, writes the
places it picked to FILE and ends; a run that finds it counts at once,
on the log a server restarted since holds (count.sh's RESTART).
"""

import json
import os
import random
import socket
import subprocess
import sys
import time

PAYLOAD = 256
WINDOW = 1000  # publishes in flight, as the bench's loader keeps


def connect(port, client, sub=None):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")
    s.sendall(f"CONN;CLIENT_ID={client}\n".encode())
    assert f.readline().startswith(b"+PASS"), "CONN refused"
    if sub:
        s.sendall(f"SUB;CLIENT_ID={client};EVENT_NAME={sub}\n".encode())
        assert f.readline().startswith(b"+PASS"), "SUB refused"
    return s, f


def payload(i):
    head = '{"user":"u%d","seq":%d,"pad":"' % (i % 1000, i)
    return head + "x" * (PAYLOAD - len(head) - 2) + '"}'


def load(port, n, first=0, name="bench/s0"):
    """Publishes n events of `name`, pipelined; returns (id, timestamp)
    of about one event in fifty."""
    s, f = connect(port, f"bench{first}")
    picked, sent, acked = [], 0, 0
    pick = random.Random(1)
    while acked < n:
        if sent < n and (sent - acked <= WINDOW * 3 // 4 or sent == acked):
            lines = []
            while sent < n and sent - acked < WINDOW:
                lines.append(
                    f"PUB;CLIENT_ID=bench{first};EVENT_NAME={name};PAYLOAD={payload(first + sent)};DELIVERY_TO=*\n"
                )
                sent += 1
            s.sendall("".join(lines).encode())
        line = f.readline()
        assert line.startswith(b"+PASS:PUBLISHED;IDEM="), line
        if pick.random() < 0.02:
            idem, ts = line[len(b"+PASS:PUBLISHED;IDEM="):].decode().strip().split(";TIMESTAMP=")
            picked.append((idem, ts))
        acked += 1
    return picked


def main():
    port, n, seeks, replays, publishes = (int(a) for a in sys.argv[1:6])
    pid, tag = sys.argv[6], sys.argv[7]
    after = int(os.environ.get("AFTER", "0"))
    saved = os.environ.get("POSITIONS")
    if saved and os.path.exists(saved):
        # A restarted server: the log was loaded before it started.
        with open(saved) as f:
            positions = [tuple(p) for p in json.load(f)]
        time.sleep(2)  # for the directory's fill, in the background
    else:
        positions = load(port, n)
        if after:
            load(port, after, first=n, name="bench/after")
        if saved:
            with open(saved, "w") as f:
                json.dump(positions, f)
            return
    r, rf = connect(port, "seeker", "bench/s0")
    rng = random.Random(7)

    def replay(frm, limit):
        r.sendall(
            f"REPLAY;CLIENT_ID=seeker;EVENT_NAME=bench/s0;FROM_POSITION={frm};LIMIT={limit}\n".encode()
        )
        header = rf.readline()
        assert header.startswith(b"+PASS:REPLAY_STARTED"), header
        for _ in range(int(header.rsplit(b"COUNT=", 1)[1])):
            rf.readline()

    def callgrind(*args):
        subprocess.run(["callgrind_control", *args, pid], check=True, stdout=subprocess.DEVNULL)

    for q in range(200):  # warm up, uncounted
        idem, ts = rng.choice(positions)
        replay(idem if q % 2 else ts, 1)
    callgrind("-i", "on")
    callgrind("-z")
    for q in range(seeks):  # from an id and from a timestamp in turn
        idem, ts = rng.choice(positions)
        replay(idem if q % 2 else ts, 1)
    callgrind("-d", f"seek-{tag}")
    for _ in range(replays):
        idem, _ = rng.choice(positions)
        replay(idem, 50)
    callgrind("-d", f"limit50-{tag}")
    load(port, publishes, first=n + after)
    callgrind("-d", f"publish-{tag}")
    callgrind("-i", "off")


main()
