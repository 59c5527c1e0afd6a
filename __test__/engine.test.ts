import { randomBytes, randomInt } from 'node:crypto'

import test from 'ava'

import { MooncakeError, TransferEngine, type TransferRequest } from '../src'
import { fillPattern, pattern, startPeer, stopPeer, type PeerInfo } from './helpers'

async function localEngine(): Promise<TransferEngine> {
  return TransferEngine.create({ localServerName: '127.0.0.1', metadata: 'P2PHANDSHAKE', protocol: 'tcp' })
}

async function withPeer(size: number, seed: number, body: (peer: PeerInfo, engine: TransferEngine) => Promise<void>) {
  const peer = await startPeer({ size, seed })
  const engine = await localEngine()
  try {
    await body(peer, engine)
  } finally {
    await engine.close()
    await stopPeer(peer)
  }
}

test('writes 64 MiB to another process and reads it back byte for byte', async (t) => {
  const size = 64 << 20
  await withPeer(size, 1, async (peer, engine) => {
    const segment = await engine.openSegment(peer.segment)
    t.is(segment.name, peer.segment)
    t.is(segment.buffers.length, 1)
    t.is(segment.buffers[0].address, peer.address)
    t.is(segment.buffers[0].length, size)

    const out = engine.allocate(size)
    const random = randomBytes(size)
    random.copy(out)
    await engine.write(segment, out, peer.address)
    const back = engine.allocate(size)
    await engine.read(segment, back, peer.address)
    t.true(back.equals(random), 'read-back differs from what was written')
  })
})

test('a batch of 1,000 mixed reads and writes of random sizes and offsets lands exactly', async (t) => {
  const slot = 16 << 10
  const count = 1000
  const seed = 9
  await withPeer(count * slot, seed, async (peer, engine) => {
    const segment = await engine.openSegment(peer.segment)
    const local = engine.allocate(count * slot)
    randomBytes(local.length).copy(local)
    const before = Buffer.from(local)
    const requests: TransferRequest[] = []
    for (let i = 0; i < count; i++) {
      const length = randomInt(1, slot + 1)
      const offset = randomInt(0, slot - length + 1)
      requests.push({
        op: randomInt(2) === 0 ? 'read' : 'write',
        segment,
        local,
        localOffset: i * slot + offset,
        remoteAddress: peer.address + BigInt(i * slot + offset),
        length,
      })
    }
    const batch = engine.submit(requests)
    await batch.done()
    const status = batch.status()
    t.is(status.length, count)
    t.true(status.every((s) => s.status === 'COMPLETED' && s.code === 4))
    t.deepEqual(
      status.map((s) => s.transferredBytes),
      requests.map((r) => r.length),
    )

    // Reads brought the peer's pattern; writes left local bytes alone and changed the peer.
    const remoteNow = engine.allocate(count * slot)
    await engine.read(segment, remoteNow, peer.address)
    for (const [i, r] of requests.entries()) {
      const at = r.localOffset!
      const local_ = local.subarray(at, at + r.length!)
      if (r.op === 'read') {
        t.true(local_.equals(pattern(seed, at, r.length!)), `read ${i} brought wrong bytes`)
      } else {
        t.true(local_.equals(before.subarray(at, at + r.length!)), `write ${i} changed local bytes`)
        t.true(remoteNow.subarray(at, at + r.length!).equals(local_), `write ${i} did not land`)
      }
    }
  })
})

test('notifications make a round trip', async (t) => {
  await withPeer(4096, 0, async (peer, engine) => {
    const echoed = new Promise<{ from: string; message: string }>((resolve) => engine.once('notify', resolve))
    await engine.sendNotify(peer.segment, 'hello')
    const event = await echoed
    t.is(event.from, peer.segment)
    t.is(event.message, 'echo:hello')

    const segment = await engine.openSegment(peer.segment)
    const local = engine.allocate(4096)
    const afterBatch = new Promise<{ message: string }>((resolve) => engine.once('notify', resolve))
    await engine.transfer([{ op: 'read', segment, local, remoteAddress: peer.address }], { notify: 'kv-ready' })
    t.is((await afterBatch).message, 'echo:kv-ready')
  })
})

test('an unregistered remote address fails with ERR_ADDRESS_NOT_REGISTERED and leaves the target untouched', async (t) => {
  const size = 1 << 20
  const seed = 3
  await withPeer(size, seed, async (peer, engine) => {
    const segment = await engine.openSegment(peer.segment)
    const local = engine.allocate(size)
    local.fill(0xee)
    for (const remoteAddress of [peer.address + BigInt(size - 100), peer.address - 4096n, 1n << 40n]) {
      const error = await t.throwsAsync(engine.write(segment, local, remoteAddress, 4096), { instanceOf: MooncakeError })
      t.is(error?.code, 'ERR_ADDRESS_NOT_REGISTERED')
      t.is(error?.errno, -3)
    }
    const batch = engine.submit([
      { op: 'write', segment, local, remoteAddress: peer.address + BigInt(size), length: 1 },
      { op: 'read', segment, local, remoteAddress: peer.address, length: 16 },
    ])
    await t.throwsAsync(batch.done(), { instanceOf: MooncakeError, message: /not inside one buffer/ })
    const [failed, completed] = batch.status()
    t.is(failed.status, 'FAILED')
    t.is(failed.code, 6)
    t.is(failed.error?.code, 'ERR_ADDRESS_NOT_REGISTERED')
    t.is(completed.status, 'COMPLETED')

    const now = engine.allocate(size)
    await engine.read(segment, now, peer.address)
    t.true(now.equals(pattern(seed, 0, size)), 'the target memory changed')
  })
})

test('caller-registered memory works and is guarded against misuse', async (t) => {
  await withPeer(1 << 16, 5, async (peer, engine) => {
    const segment = await engine.openSegment(peer.segment)
    const mine = new Uint8Array(1 << 16)
    const error = await t.throwsAsync(engine.read(segment, mine, peer.address), { instanceOf: MooncakeError })
    t.is(error?.code, 'ERR_ADDRESS_NOT_REGISTERED')
    engine.register(mine)
    t.throws(() => engine.register(mine.subarray(100, 200)), { code: 'ERR_ADDRESS_OVERLAPPED' } as never)
    await engine.read(segment, mine, peer.address)
    t.true(Buffer.from(mine).equals(pattern(5, 0, 1 << 16)))
    t.is(engine.addressOf(mine.subarray(10)), engine.addressOf(mine) + 10n)
    engine.unregister(mine)
    t.throws(() => engine.unregister(mine), { code: 'ERR_ADDRESS_NOT_REGISTERED' } as never)
  })
})

test('bad arguments are MooncakeErrors with stable codes', async (t) => {
  const engine = await localEngine()
  try {
    t.throws(() => engine.allocate(0), { instanceOf: MooncakeError, code: 'ERR_INVALID_ARGUMENT' } as never)
    t.throws(() => engine.allocate(-1), { code: 'ERR_INVALID_ARGUMENT' } as never)
    await t.throwsAsync(engine.openSegment(''), { code: 'ERR_INVALID_ARGUMENT' } as never)
    await t.throwsAsync(engine.openSegment('no-port'), { code: 'ERR_INVALID_ARGUMENT' } as never)
    await t.throwsAsync(engine.openSegment('127.0.0.1:1'), { code: 'ERR_SOCKET' } as never)
    const local = engine.allocate(4096)
    const segment = await engine.openSegment(engine.segmentName)
    const ok = { op: 'read' as const, segment, local, remoteAddress: engine.addressOf(local) }
    t.throws(() => engine.submit([{ ...ok, length: 8192 }]), { code: 'ERR_INVALID_ARGUMENT' } as never)
    t.throws(() => engine.submit([{ ...ok, op: 'copy' as never }]), { code: 'ERR_INVALID_ARGUMENT' } as never)
    t.throws(() => engine.submit([{ ...ok, segment: { ...segment } }]), { code: 'ERR_INVALID_ARGUMENT' } as never, 'a copy of a segment is not a segment')
    t.false('id' in segment, 'no engine handle leaks')
    t.true(Object.isFrozen(segment))
    t.throws(() => engine.submit([{ ...ok, remoteAddress: 5 as never }]), { code: 'ERR_INVALID_ARGUMENT' } as never)
    await t.throwsAsync(engine.transfer([ok], { timeoutMs: -5 }), { code: 'ERR_INVALID_ARGUMENT' } as never)
    // Nothing listens on port 1: publishing fails with a metadata error, not a hang.
    await t.throwsAsync(TransferEngine.create({ localServerName: 'x', metadata: 'etcd://127.0.0.1:1' }), {
      code: 'ERR_METADATA',
    } as never)
    await t.throwsAsync(TransferEngine.create({ localServerName: 'x', metadata: 'redis://127.0.0.1:1' }), {
      code: 'ERR_METADATA',
    } as never)
    await t.throwsAsync(TransferEngine.create({ localServerName: '127.0.0.1', metadata: 'P2PHANDSHAKE', protocol: 'udp' as never }), {
      code: 'ERR_INVALID_ARGUMENT',
    } as never)
    // A transfer to its own segment loops back through the TCP transport.
    local.fill(1, 0, 2048)
    await engine.transfer([{ ...ok, op: 'write', length: 2048, remoteAddress: engine.addressOf(local) + 2048n }])
    t.true(local.subarray(2048).every((b) => b === 1))
  } finally {
    await engine.close()
  }
  const error = await t.throwsAsync(Promise.resolve().then(() => engine.allocate(16)))
  t.is((error as MooncakeError).code, 'ERR_CLOSED')
})

test('write and read take an options object; transports() is typed', async (t) => {
  const target = await TransferEngine.create({ localServerName: '127.0.0.1', metadata: 'P2PHANDSHAKE' })
  const engine = await TransferEngine.create({ localServerName: '127.0.0.1', metadata: 'P2PHANDSHAKE', protocol: 'tcp' })
  try {
    const remote = target.allocate(1 << 16)
    const segment = await engine.openSegment(target.segmentName)
    const local = engine.allocate(1 << 16)
    fillPattern(local, 3)
    const base = segment.buffers[0].address
    await engine.write(segment, local, base + 100n, { length: 4096, localOffset: 512, timeoutMs: 5000 })
    t.true(remote.subarray(100, 4196).equals(local.subarray(512, 4608)))
    const back = engine.allocate(8192)
    await engine.read(segment, back, base + 100n, { length: 4096, localOffset: 1000 })
    t.true(back.subarray(1000, 5096).equals(local.subarray(512, 4608)))
    await engine.read(segment, back, base + 100n, 16, 7) // the positional form still works
    t.true(back.subarray(7, 23).equals(local.subarray(512, 528)))
    const transports: ('tcp' | 'shm' | 'rdma')[] = engine.transports()
    t.true(transports.includes('tcp'))
  } finally {
    await engine.close()
    await target.close()
  }
})
