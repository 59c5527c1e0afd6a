"""The Python side of `benches/mooncake-master.mjs`: Mooncake's own client
(``MooncakeDistributedStore``) under load, against whichever master it is pointed at.

  node   --master HOST:PORT --segment-size BYTES
      Mounts a segment of that size and holds it until stdin closes. Prints one JSON line,
      ``{"ready": true, "pid": ...}``, once mounted.

  client --master HOST:PORT --segment-size BYTES [--local-buffer BYTES] [--threads T]
         [--prefix NAME]
      Mounts no segment of its own (every object lands in a node's segment, so every byte
      crosses processes over the Transfer Engine), fills the node's segment (of that size; 0
      fills nothing) and empties it again, prints ``{"ready": true, ...}``, then answers one
      JSON line per command line on stdin:

        {"op": "cell", "kind": "put"|"get", "size": N, "threads": T, "seconds": S,
         "capacity": BYTES, "verify_every": K}
            -> {"ops", "seconds", "ops_per_s", "p50_us", "p99_us", "errors", "verified"}
        {"op": "exit"}

      A put counts as an error unless it returns 0; a get unless it returns ``size`` bytes.
      One get in K (drawn at random), and every K-th put (read back once its pass is over,
      untimed), is compared byte for byte with what was put: a mismatch ends the process with status 3 and
      a message on stderr, so that no wrong answer is ever reported.

      The store is emptied between passes with ``remove_all(force)``. With ``--prefix NAME``
      (letters, digits, ``_``) every key starts ``NAME/`` and only those are removed
      (``remove_by_regex("^NAME/", force)``), so that several client processes can share one
      store; each cell's ``capacity`` is then its share of the segments.

Threads of one process share one store: the binding releases the GIL in put and get, and the
client underneath is meant to be called from many threads at once.
"""

import argparse
import itertools
import json
import os
import random
import re
import sys
import threading
import time
import traceback

MIB = 1 << 20
# The library logs on both descriptors; replies go to a private copy of stdout.
_out = None


def reply(obj):
    _out.write(json.dumps(obj) + "\n")
    _out.flush()


def connect(master, segment_size, local_buffer):
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    rc = store.setup("127.0.0.1", "P2PHANDSHAKE", segment_size, local_buffer, "tcp", "", master)
    if rc != 0:
        fail(f"setup against {master} returned {rc}")
    return store


class Values:
    """Per size, random bytes twice over: the value under key number ``i`` is the ``size``
    bytes at offset ``i % size``, a rotation of its own as long as a cell's keys number fewer
    than ``size``. Handed to put as a memoryview, so making a value costs nothing."""

    def __init__(self):
        self.doubled = {}
        self.lock = threading.Lock()

    def get(self, size, i):
        doubled = self.doubled.get(size)
        if doubled is None:
            # Threads meet a new size together: one of them draws its bytes, once.
            with self.lock:
                doubled = self.doubled.get(size)
                if doubled is None:
                    once = os.urandom(size)
                    doubled = self.doubled[size] = once + once
        off = i % size
        return memoryview(doubled)[off : off + size]

    def expected(self, size, i):
        # A bytes copy compares with memcmp; comparing with a memoryview goes byte by byte.
        off = i % size
        return self.doubled[size][off : off + size]


class Client:
    def __init__(self, store, prefix=""):
        self.store = store
        # Every key starts with this: "" or "NAME/".
        self.ns = f"{prefix}/" if prefix else ""
        self.values = Values()
        # Keys never repeat within the process: a put of a key that exists does nothing.
        self.serial = itertools.count()
        self.lock = threading.Lock()

    def next_serial(self):
        with self.lock:
            return next(self.serial)

    def clear(self):
        if self.ns:
            rc = self.store.remove_by_regex(f"^{self.ns}", True)
            if rc < 0:
                fail(f"remove_by_regex(^{self.ns}, force) returned {rc}")
            return
        rc = self.store.remove_all(True)
        if rc < 0:
            fail(f"remove_all(force) returned {rc}")

    def run_threads(self, threads, body):
        results = [None] * threads
        failures = []

        def run(t):
            try:
                results[t] = body(t)
            except BaseException as e:  # surfaces in the main thread, never swallowed
                failures.append(e)

        workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if failures:
            raise failures[0]
        return results

    def put_cell(self, size, threads, seconds, capacity, verify_every):
        # Half the segment per pass; between passes, untimed, a sample of what was put is read
        # back and the store is emptied.
        per_pass = max(threads, int(capacity * 0.5) // size)
        latencies, errors, verified, elapsed = [], 0, 0, 0.0
        tag = self.next_serial()
        index = itertools.count()
        while elapsed < seconds:
            self.clear()
            deadline = time.perf_counter() + (seconds - elapsed)
            limit = next(index) + per_pass
            counter_lock = threading.Lock()

            def body(t):
                store, values, local, errs, sample = self.store, self.values, [], 0, []
                while True:
                    with counter_lock:
                        i = next(index)
                    if i >= limit or time.perf_counter() >= deadline:
                        return local, errs, sample
                    value = values.get(size, i)
                    key = f"{self.ns}p{tag}-{size}-{i}"
                    began = time.perf_counter_ns()
                    rc = store.put(key, value)
                    local.append(time.perf_counter_ns() - began)
                    if rc != 0:
                        errs += 1
                    elif len(local) % verify_every == 1:
                        sample.append((key, i))

            began = time.perf_counter()
            results = self.run_threads(threads, body)
            elapsed += time.perf_counter() - began
            for local, errs, sample in results:
                latencies.extend(local)
                errors += errs
                for key, i in sample:
                    data = self.store.get(key)
                    if len(data) == 0:
                        # Not found (evicted, or the get failed): lost, not wrong.
                        errors += 1
                        continue
                    if len(data) != size:
                        mismatch(key, f"{len(data)} bytes read back, {size} put")
                    if data != self.values.expected(size, i):
                        first = next(n for n, (a, b) in enumerate(zip(data, self.values.expected(size, i))) if a != b)
                        mismatch(key, f"bytes read back differ from those put, from byte {first}")
                    verified += 1
        self.clear()
        return summary(latencies, elapsed, errors, verified)

    def get_cell(self, size, threads, seconds, capacity, verify_every):
        self.clear()
        count = max(threads, min(256, int(capacity * 0.5) // size))
        tag = self.next_serial()
        keys = [f"{self.ns}g{tag}-{size}-{i}" for i in range(count)]

        def fill(t):
            for i in range(t, count, threads):
                rc = self.store.put(keys[i], self.values.get(size, i))
                if rc != 0:
                    fail(f"put {keys[i]} (to be read) returned {rc}")

        self.run_threads(threads, fill)
        deadline = time.perf_counter() + seconds

        def body(t):
            store, values, local, errs, checked = self.store, self.values, [], 0, 0
            # Drawn at random: a fixed period would line up with the stride and check a few
            # keys only.
            draw = random.Random(t).randrange
            # Threads walk disjoint strides of the keys.
            for n in itertools.count():
                if time.perf_counter() >= deadline:
                    return local, errs, checked
                i = (t + n * threads) % count
                began = time.perf_counter_ns()
                data = store.get(keys[i])
                local.append(time.perf_counter_ns() - began)
                if len(data) != size:
                    if len(data) != 0:
                        mismatch(keys[i], f"{len(data)} bytes, {size} put")
                    errs += 1
                elif draw(verify_every) == 0:
                    if data != values.expected(size, i):
                        mismatch(keys[i], "bytes differ from those put")
                    checked += 1

        began = time.perf_counter()
        latencies, errors, verified = [], 0, 0
        for local, errs, checked in self.run_threads(threads, body):
            latencies.extend(local)
            errors += errs
            verified += checked
        elapsed = time.perf_counter() - began
        self.clear()
        return summary(latencies, elapsed, errors, verified)

    def warm_up(self, capacity, threads):
        # Connections to the node and first touches of buffers, before anything is timed.
        for size in (64 << 10, MIB):
            key = f"{self.ns}w{self.next_serial()}"
            if self.store.put(key, self.values.get(size, 0)) != 0:
                fail(f"warm-up put of {size} bytes failed")
            if self.store.get(key) != self.values.expected(size, 0):
                mismatch(key, "warm-up read differs")
        self.clear()
        # The node's segment is not touched when mounted: its pages fault in on first write,
        # wherever the master places objects. Filling it (twice, as placement may differ each
        # time) keeps those faults out of the timed cells, whatever the master's allocator.
        count = int(capacity * 0.85) // MIB
        for _ in range(2):
            tag = self.next_serial()

            def fill(t):
                for i in range(t, count, threads):
                    if self.store.put(f"{self.ns}f{tag}-{i}", self.values.get(MIB, i)) != 0:
                        fail(f"filling the segment: put {i} of {count} failed")

            self.run_threads(threads, fill)
            self.clear()


def fail(what, status=1):
    # Not SystemExit: interpreter teardown can hang on the store's background threads.
    sys.stderr.write(f"\n{what}\n")
    sys.stderr.flush()
    os._exit(status)


def mismatch(key, what):
    fail(f"VERIFY FAILED: get {key}: {what}", 3)


def summary(latencies, elapsed, errors, verified):
    latencies.sort()
    n = len(latencies)

    def pct(p):
        return latencies[min(n - 1, int(n * p))] / 1000 if n else None

    return {
        "ops": n,
        "seconds": elapsed,
        "ops_per_s": n / elapsed if elapsed > 0 else 0,
        "p50_us": pct(0.5),
        "p99_us": pct(0.99),
        "errors": errors,
        "verified": verified,
    }


def main():
    global _out
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["node", "client"])
    parser.add_argument("--master", required=True)
    parser.add_argument("--segment-size", type=int, default=1 << 30)
    parser.add_argument("--local-buffer", type=int, default=64 * MIB)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--prefix", default="")
    args = parser.parse_args()
    if args.prefix and not re.fullmatch(r"[A-Za-z0-9_]+", args.prefix):
        parser.error("--prefix takes letters, digits and _")

    _out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    if args.mode == "node":
        # Held until the end: a collected store unmounts its segment.
        store = connect(args.master, args.segment_size, 16 * MIB)
        reply({"ready": True, "pid": os.getpid()})
        for _ in sys.stdin:
            pass
        os._exit(0)

    client = Client(connect(args.master, 0, args.local_buffer), args.prefix)
    client.warm_up(args.segment_size, args.threads)
    reply({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        c = json.loads(line)
        if c["op"] == "exit":
            break
        if c["op"] != "cell":
            fail(f"unknown op {c['op']!r}")
        size, threads, seconds = int(c["size"]), int(c["threads"]), float(c["seconds"])
        capacity = int(c["capacity"])
        if c["kind"] == "put":
            result = client.put_cell(size, threads, seconds, capacity, int(c["verify_every"]))
        else:
            result = client.get_cell(size, threads, seconds, capacity, int(c["verify_every"]))
        reply(result)
    os._exit(0)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        fail("failed")
