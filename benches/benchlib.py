"""Helpers shared by the benchmark scripts (copied next to each script's
bench.py, which imports them): the test image, free loopback ports, an
HTTP health probe."""
import os, random, socket, sys, urllib.request
from array import array

MiB = 1 << 20


def gen(path, size, seed):
    """Stripes of 1 MiB, per 4 MiB one zero (left a hole), one text, two
    random, in shuffled order. The text is random pairs of common words:
    unique everywhere (no dedup), about 2:1 with lz4."""
    rng = random.Random(seed)
    base = ("the of and to in is was for that on as with by it from at his an were are "
            "which this be or has had not but first one their its new after who they have "
            "two her she been other when there all during into school time may years more "
            "most only over city some world would where later up such used many can state "
            "about national out known university united then made").split()
    vocab = sorted({w + s for w in base for s in ("", ",", ".", "s", "ly", "ed")})[:256]
    pairs = [(vocab[i >> 8] + " " + vocab[i & 255] + " ").encode() for i in range(65536)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    count = {"zero": 0, "text": 0, "random": 0}
    for g in range(0, size // MiB, 4):
        order = ["zero", "text", "random", "random"]
        rng.shuffle(order)
        for j, kind in enumerate(order):
            count[kind] += 1
            if kind == "zero":
                continue
            if kind == "random":
                buf = rng.randbytes(MiB)
            else:
                parts, n = [], 0
                while n < MiB:
                    s = b"".join([pairs[x] for x in array("H", rng.randbytes(2 * 65536))])
                    parts.append(s)
                    n += len(s)
                buf = b"".join(parts)[:MiB]
            os.pwrite(fd, buf, (g + j) * MiB)
    os.ftruncate(fd, size)
    os.close(fd)
    print("%d MiB zero, %d MiB text, %d MiB random" % (count["zero"], count["text"], count["random"]))

def freeports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))

def http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            sys.exit(0 if r.status == 200 else 1)
    except Exception:
        sys.exit(1)
