"""What a seek costs when its part of the log is on the disk only, against
the same seeks warm and a bare read of the disk, outside the bench:

    python3 bench/scripts/cold_seek.py BINARY [EVENTS] [SEEKS]

The server runs pinned to CPU 1 on a fresh data directory. The script
loads EVENTS events of one name (default 200,000), then times SEEKS
(default 300) seeks, LIMIT=1 replays from random timestamps of the load,
each until its first record arrives:

- cold: the data directory's files dropped from the page cache
  (posix_fadvise) before each seek;
- warm: each seek made twice, the second one timed;
- a bare read: one 4 KiB `pread` of a random page of a segment file,
  dropped from the page cache first, from this script.

It prints the p50 and p90 of each, and what the server read from the disk
per cold seek (/proc/PID/io). Cold minus warm, against the bare read,
says what the way to the disk adds to a seek besides the disk's own wait.
"""

import glob
import os
import random
import sys
import time

from cold_replays import drop_cache
from subscribers import Server, publish, subscribe


def read_bytes(pid):
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise SystemExit("no read_bytes in /proc/PID/io")


def main():
    binary = sys.argv[1]
    events = int(sys.argv[2]) if len(sys.argv) > 2 else 200_000
    seeks = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    server = Server(binary)
    try:
        pub, pf = server.connect("pub")
        first_ms = int(time.time() * 1000)
        publish(pub, pf, "cold", events, 200)
        last_ms = int(time.time() * 1000)
        s, f = server.connect("seeker")
        subscribe(s, f, "seeker", ["cold"])
        rng = random.Random(1)

        def reply(prefix):
            """The next line, which must start with `prefix`; the server's
            heartbeat PINGs are answered on the way."""
            line = f.readline()
            while line == b"PING\n":
                s.sendall(b"PONG\n")
                line = f.readline()
            if not line.startswith(prefix):
                raise SystemExit(f"expected {prefix!r}, got {line!r}")
            return line

        def seek():
            """Seconds to the first record of a seek from a random time of
            the load; a time after the last event (no record) is skipped."""
            while True:
                at = rng.randint(first_ms, last_ms)
                start = time.perf_counter()
                s.sendall(f"REPLAY;CLIENT_ID=seeker;EVENT_NAME=cold;FROM_POSITION={at};LIMIT=1\n".encode())
                if reply(b"+PASS:REPLAY_STARTED").rstrip().endswith(b"COUNT=1"):
                    reply(b"+RECORD:")
                    return time.perf_counter() - start

        before = read_bytes(server.proc.pid)
        cold = []
        for _ in range(seeks):
            drop_cache(server.dir)
            cold.append(seek())
        read_per_seek = (read_bytes(server.proc.pid) - before) / seeks

        warm = []
        for _ in range(seeks):
            state = rng.getstate()
            seek()
            rng.setstate(state)
            warm.append(seek())

        segment = max(glob.glob(os.path.join(server.dir, "segments", "*")), key=os.path.getsize)
        pages = os.path.getsize(segment) // 4096
        bare = []
        for _ in range(seeks):
            drop_cache(server.dir)
            fd = os.open(segment, os.O_RDONLY)
            offset = rng.randrange(pages) * 4096
            start = time.perf_counter()
            os.pread(fd, 4096, offset)
            bare.append(time.perf_counter() - start)
            os.close(fd)
    finally:
        server.stop()

    def pick(times, q):
        times = sorted(times)
        return 1e6 * times[min(len(times) - 1, int(q * len(times)))]

    for what, times in (("cold seek", cold), ("warm seek", warm), ("bare 4 KiB read", bare)):
        print(f"{what}: p50 {pick(times, 0.5):.0f} us, p90 {pick(times, 0.9):.0f} us")
    print(f"read from the disk per cold seek: {read_per_seek / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
