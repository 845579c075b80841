"""Drops random pages of running ensync-servers' segment files from the
page cache at a steady rate, as the reclaim of some hosts does to file
pages that nobody maps and nobody touched for a while (bench/RUNS.md,
"Seeks and the page cache"). Run it beside the bench to see what reads
from the disk cost replays, the same way for every build:

    python3 bench/scripts/page_out.py MIB_PER_SECOND [SECONDS]

Every second it looks for ensync-server processes started with
`--config FILE` (as the bench starts them) or `--data-dir DIR`, and drops
aligned 2 MiB ranges, picked at random over the segment files of their
data directories, MIB_PER_SECOND MiB of them a second (what the cache did
not hold counts too). The kernel drops whole folios only, and keeps a
file's pages in folios of up to 2 MiB: asked to drop 4 KiB, or 256 KiB,
it dropped nothing of a file read whole. It stops after SECONDS
(default: never), on Ctrl-C or on SIGTERM, and prints how much it
dropped.
"""

import os
import random
import re
import signal
import sys
import time

# What is dropped at a time.
RANGE = 2 * 1024 * 1024
SEGMENTS = "segments"


def data_dirs():
    """The data directories of the running ensync-servers."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        for flag, value in zip(args, args[1:]):
            if flag == "--data-dir":
                found.add(value)
            elif flag == "--config" and value.endswith(".toml"):
                dir = configured_data_dir(value)
                if dir:
                    found.add(dir)
    return found


def configured_data_dir(config):
    try:
        with open(config) as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(r'^data_dir\s*=\s*"([^"]+)"', text, re.M)
    return m.group(1) if m else None


def segment_files(dirs):
    """(path, size) of every segment file under `dirs`."""
    files = []
    for top in dirs:
        for root, _, names in os.walk(top):
            if os.path.basename(root) != SEGMENTS:
                continue
            for name in names:
                path = os.path.join(root, name)
                try:
                    files.append((path, os.path.getsize(path)))
                except OSError:
                    pass
    return files


def stop(*_):
    raise KeyboardInterrupt


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    signal.signal(signal.SIGTERM, stop)
    pages_per_second = float(sys.argv[1]) * 1024 * 1024 / RANGE
    until = time.monotonic() + float(sys.argv[2]) if len(sys.argv) == 3 else None
    rng = random.Random(1)
    dropped, owed, files, looked = 0, 0.0, [], 0.0
    last = time.monotonic()
    try:
        while until is None or time.monotonic() < until:
            now = time.monotonic()
            if now - looked >= 1.0:
                files, looked = segment_files(data_dirs()), now
            owed += (now - last) * pages_per_second
            last = now
            total = sum(size for _, size in files)
            if total < RANGE:
                owed = 0.0
            while owed >= 1 and total >= RANGE:
                at = rng.randrange(total // RANGE) * RANGE
                for path, size in files:
                    if at < size:
                        try:
                            fd = os.open(path, os.O_RDONLY)
                            os.posix_fadvise(fd, at, RANGE, os.POSIX_FADV_DONTNEED)
                            os.close(fd)
                            dropped += 1
                        except OSError:
                            pass
                        break
                    at -= size
                owed -= 1
            time.sleep(0.01)
    except KeyboardInterrupt:
        pass
    print(f"dropped {dropped * RANGE / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
