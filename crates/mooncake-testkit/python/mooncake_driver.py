"""Drives Mooncake's Python client (``MooncakeDistributedStore``) one JSON command at a time.

Protocol: one JSON object per line on stdin, each answered by exactly one JSON object per line
on stdout, in order. Every reply carries ``op`` (the command's) and ``ms`` (how long the client
call took); a Python exception becomes ``{"op": ..., "error": "..."}`` and the driver carries
on. Everything else (the C++ library's logging, anything it prints) goes to stderr: file
descriptor 1 is pointed at stderr before the library loads, and replies are written to a
private copy of the original stdout.

Commands (``op``) and their replies; ``rc`` is always exactly what the Python call returned
(an int, or a list of ints for the per-key batch calls):

  hello                                            -> {pid, python}
  setup {master, local_hostname="127.0.0.1", metadata="P2PHANDSHAKE",
         global_segment_size=16 MiB, local_buffer_size=16 MiB, protocol="tcp",
         rdma_devices=""}                          -> {rc, hostname (when rc == 0)}
  put {key, size, seed=0}                          -> {rc}
  put_bytes {key, hex}                             -> {rc}
  get {key, seed=0}                                -> {len, ok, sha256, hex (len <= 64)}
  get_size {key}                                   -> {rc}
  is_exist {key}                                   -> {rc}
  remove {key, force=false}                        -> {rc}
  put_batch {keys, sizes, seed=0}                  -> {rc}
  get_batch {keys, seed=0}                         -> {values: [{len, ok, sha256, hex?}], one
                                                      per value returned}
  batch_is_exist {keys}                            -> {rc: [..]}
  batch_remove {keys, force=false}                 -> {rc: [..]}
  upsert {key, size, seed=0}                       -> {rc}
  upsert_batch {keys, sizes, seed=0}               -> {rc}
  register_buffer {size}                           -> {rc}
  batch_put_from {keys, sizes, seed=0}             -> {rc: [..]}
  batch_get_into {keys, sizes, seed=0}             -> {rc: [..], values: [{len, ok, sha256, hex?}]}
  remove_all {force=false}                         -> {rc}
  remove_by_regex {regex, force=false}             -> {rc}
  health_check                                     -> {rc}
  sleep {seconds}                                  -> {}
  close                                            -> {rc}
  exit                                             -> {}, then the process ends at once

``ok`` says whether the bytes read equal ``pattern(key, len, seed)``; a missing key reads as
zero bytes, which is trivially ``ok``. The zero-copy calls lay their keys out back to back in
one registered, page-aligned buffer: the last ``register_buffer``'s, or one made and
registered when there is none or it is too small.
"""

import ctypes
import hashlib
import json
import mmap
import os
import sys
import time
import traceback

MIB = 1 << 20

# One 32-bit lane per 4 bytes of a 32-byte block: j * _LANES writes j into all eight lanes.
_LANES = sum(1 << (32 * t) for t in range(8))


def pattern(key: str, length: int, seed: int = 0) -> bytes:
    """The deterministic value of ``length`` bytes stored under ``key``.

    ``d = SHA-256(UTF-8(key) || 0x00 || seed as 8-byte little-endian)`` (32 bytes). The value is
    the blocks ``B_0 B_1 B_2 ...`` cut to ``length`` bytes, where block ``B_j`` (32 bytes) is
    ``d`` XOR the 4-byte little-endian ``j mod 2**32`` repeated eight times. Byte by byte:

        value[i] = d[i % 32] ^ (((i // 32) >> (8 * (i % 4))) & 0xff)

    So each key (and seed) has its own bytes, and each 32-byte block of a value differs from
    every other one in the first 128 GiB.
    """
    d = int.from_bytes(
        hashlib.sha256(key.encode() + b"\x00" + seed.to_bytes(8, "little")).digest(), "little"
    )
    blocks = (length + 31) // 32
    out = b"".join(
        (d ^ ((j & 0xFFFFFFFF) * _LANES)).to_bytes(32, "little") for j in range(blocks)
    )
    return out[:length]


def describe(key: str, data: bytes, seed: int) -> dict:
    reply = {
        "len": len(data),
        "ok": data == pattern(key, len(data), seed),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    if len(data) <= 64:
        reply["hex"] = data.hex()
    return reply


class Driver:
    def __init__(self):
        self.store = None
        self.buffer = None  # (mmap, address, size)

    def need_store(self):
        if self.store is None:
            raise RuntimeError("no store: send setup first")
        return self.store

    def register(self, size: int) -> int:
        """Maps and registers a fresh buffer of ``size`` bytes (at least 1 MiB) in place of the
        current one; returns what ``register_buffer`` returned."""
        store = self.need_store()
        size = max(size, MIB)
        mem = mmap.mmap(-1, size)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        rc = store.register_buffer(addr, size)
        if rc == 0:
            if self.buffer is not None:
                store.unregister_buffer(self.buffer[1])
            self.buffer = (mem, addr, size)
        return rc

    def ensure_buffer(self, size: int) -> int:
        if self.buffer is None or self.buffer[2] < size:
            rc = self.register(size)
            if rc != 0:
                raise RuntimeError(f"register_buffer({size}) returned {rc}")
        return self.buffer[1]

    def op_hello(self, c):
        return {"pid": os.getpid(), "python": sys.version.split()[0]}

    def op_setup(self, c):
        from mooncake.store import MooncakeDistributedStore

        store = MooncakeDistributedStore()
        hostname = c.get("local_hostname", "127.0.0.1")
        rc = store.setup(
            hostname,
            c.get("metadata", "P2PHANDSHAKE"),
            int(c.get("global_segment_size", 16 * MIB)),
            int(c.get("local_buffer_size", 16 * MIB)),
            c.get("protocol", "tcp"),
            c.get("rdma_devices", ""),
            c["master"],
        )
        self.store = store
        reply = {"rc": rc}
        if rc == 0:
            reply["hostname"] = store.get_hostname()
        return reply

    def op_put(self, c):
        value = pattern(c["key"], int(c["size"]), int(c.get("seed", 0)))
        return {"rc": self.need_store().put(c["key"], value)}

    def op_put_bytes(self, c):
        return {"rc": self.need_store().put(c["key"], bytes.fromhex(c["hex"]))}

    def op_get(self, c):
        data = self.need_store().get(c["key"])
        return describe(c["key"], data, int(c.get("seed", 0)))

    def op_get_size(self, c):
        return {"rc": self.need_store().get_size(c["key"])}

    def op_is_exist(self, c):
        return {"rc": self.need_store().is_exist(c["key"])}

    def op_remove(self, c):
        return {"rc": self.need_store().remove(c["key"], bool(c.get("force", False)))}

    def values(self, c):
        seed = int(c.get("seed", 0))
        return [pattern(k, int(n), seed) for k, n in zip(c["keys"], c["sizes"], strict=True)]

    def op_put_batch(self, c):
        return {"rc": self.need_store().put_batch(list(c["keys"]), self.values(c))}

    def op_get_batch(self, c):
        keys = list(c["keys"])
        seed = int(c.get("seed", 0))
        data = self.need_store().get_batch(keys)
        # Reported as returned: get_batch([]) gives [b''].
        named = keys + [""] * (len(data) - len(keys))
        return {"values": [describe(k, d, seed) for k, d in zip(named, data)]}

    def op_batch_is_exist(self, c):
        return {"rc": list(self.need_store().batch_is_exist(list(c["keys"])))}

    def op_batch_remove(self, c):
        rc = self.need_store().batch_remove(list(c["keys"]), bool(c.get("force", False)))
        return {"rc": list(rc)}

    def op_upsert(self, c):
        value = pattern(c["key"], int(c["size"]), int(c.get("seed", 0)))
        return {"rc": self.need_store().upsert(c["key"], value)}

    def op_upsert_batch(self, c):
        return {"rc": self.need_store().upsert_batch(list(c["keys"]), self.values(c))}

    def op_register_buffer(self, c):
        return {"rc": self.register(int(c["size"]))}

    def layout(self, c):
        sizes = [int(n) for n in c["sizes"]]
        if len(sizes) != len(c["keys"]):
            raise ValueError("keys and sizes differ in length")
        base = self.ensure_buffer(sum(sizes))
        ptrs, off = [], 0
        for n in sizes:
            ptrs.append(base + off)
            off += n
        return ptrs, sizes

    def op_batch_put_from(self, c):
        ptrs, sizes = self.layout(c)
        for ptr, value in zip(ptrs, self.values(c)):
            ctypes.memmove(ptr, value, len(value))
        rc = self.need_store().batch_put_from(list(c["keys"]), ptrs, sizes)
        return {"rc": list(rc)}

    def op_batch_get_into(self, c):
        ptrs, sizes = self.layout(c)
        if sizes:
            ctypes.memset(ptrs[0], 0, sum(sizes))
        rc = list(self.need_store().batch_get_into(list(c["keys"]), ptrs, sizes))
        seed = int(c.get("seed", 0))
        values = []
        for key, ptr, n in zip(c["keys"], ptrs, rc):
            values.append(describe(key, ctypes.string_at(ptr, max(n, 0)), seed))
        return {"rc": rc, "values": values}

    def op_remove_all(self, c):
        return {"rc": self.need_store().remove_all(bool(c.get("force", False)))}

    def op_remove_by_regex(self, c):
        rc = self.need_store().remove_by_regex(c["regex"], bool(c.get("force", False)))
        return {"rc": rc}

    def op_health_check(self, c):
        return {"rc": self.need_store().health_check()}

    def op_sleep(self, c):
        time.sleep(float(c["seconds"]))
        return {}

    def op_close(self, c):
        return {"rc": self.need_store().close()}


def main():
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    driver = Driver()
    for line in sys.stdin:
        if not line.strip():
            continue
        op = None
        start = time.monotonic()
        try:
            command = json.loads(line)
            op = command.get("op")
            handler = getattr(driver, f"op_{op}", None) if op != "exit" else None
            if op == "exit":
                reply = {}
            elif handler is None:
                raise ValueError(f"unknown op {op!r}")
            else:
                reply = handler(command)
        except Exception as e:  # every failure becomes a reply, never a dead driver
            traceback.print_exc(file=sys.stderr)
            reply = {"error": f"{type(e).__name__}: {e}"}
        reply["op"] = op
        reply["ms"] = round((time.monotonic() - start) * 1000, 3)
        out.write(json.dumps(reply) + "\n")
        out.flush()
        if op == "exit":
            # Skips interpreter teardown, which can hang on the store's background threads.
            os._exit(0)
    os._exit(0)


if __name__ == "__main__":
    main()
