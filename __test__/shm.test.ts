import { randomBytes } from 'node:crypto'

import test from 'ava'

import { MooncakeError, TransferEngine, type TransferEngineOptions } from '../src'
import { pattern, startPeer, stopPeer, type PeerInfo, type PeerOptions } from './helpers'

async function withPeer(
  peerOptions: PeerOptions,
  engineOptions: Partial<TransferEngineOptions>,
  body: (peer: PeerInfo, engine: TransferEngine) => Promise<void>,
) {
  const peer = await startPeer(peerOptions)
  const engine = await TransferEngine.create({ localServerName: '127.0.0.1', metadata: 'P2PHANDSHAKE', ...engineOptions })
  try {
    await body(peer, engine)
  } finally {
    await engine.close()
    await stopPeer(peer)
  }
}

test('256 MiB go to another process and back through shared memory, byte for byte', async (t) => {
  const size = 256 << 20
  await withPeer({ size, seed: 1 }, { protocol: 'shm' }, async (peer, engine) => {
    const segment = await engine.openSegment(peer.segment)
    const out = engine.allocate(size)
    randomBytes(size).copy(out)
    await engine.write(segment, out, peer.address)
    const back = engine.allocate(size)
    await engine.read(segment, back, peer.address)
    t.true(back.equals(out), 'read-back differs from what was written')
    const stats = engine.stats()
    t.is(stats.shm.requests, 2)
    t.is(stats.shm.bytes, 2 * size)
    t.is(stats.tcp.requests, 0)
  })
})

test('auto picks shared memory for a same-host peer; tcp and sharedMemory: false do not', async (t) => {
  const size = 1 << 20
  await withPeer({ size, seed: 2 }, {}, async (peer, engine) => {
    const segment = await engine.openSegment(peer.segment)
    const local = engine.allocate(size)
    await engine.read(segment, local, peer.address)
    t.true(local.equals(pattern(2, 0, size)))
    t.deepEqual(engine.stats().shm, { requests: 1, bytes: size })
    t.is(engine.stats().tcp.requests, 0)

    const overTcp = await TransferEngine.create({ localServerName: '127.0.0.1', metadata: 'P2PHANDSHAKE', protocol: 'tcp' })
    const noShm = await TransferEngine.create({ localServerName: '127.0.0.1', metadata: 'P2PHANDSHAKE', sharedMemory: false })
    try {
      for (const other of [overTcp, noShm]) {
        const seg = await other.openSegment(peer.segment)
        const buf = other.allocate(size)
        await other.read(seg, buf, peer.address)
        t.true(buf.equals(pattern(2, 0, size)))
        t.deepEqual(other.stats(), { tcp: { requests: 1, bytes: size }, shm: { requests: 0, bytes: 0 }, rdma: { requests: 0, bytes: 0 } })
      }
    } finally {
      await overTcp.close()
      await noShm.close()
    }
  })
})

test('a peer without shared memory falls back to TCP under auto and fails clearly under shm', async (t) => {
  const size = 64 << 10
  await withPeer({ size, seed: 3, sharedMemory: false }, {}, async (peer, engine) => {
    const segment = await engine.openSegment(peer.segment)
    const local = engine.allocate(size)
    await engine.read(segment, local, peer.address)
    t.true(local.equals(pattern(3, 0, size)))
    t.is(engine.stats().tcp.requests, 1)

    const forced = await TransferEngine.create({ localServerName: '127.0.0.1', metadata: 'P2PHANDSHAKE', protocol: 'shm' })
    try {
      const seg = await forced.openSegment(peer.segment)
      const buf = forced.allocate(size)
      const error = await t.throwsAsync(forced.read(seg, buf, peer.address), { instanceOf: MooncakeError })
      t.is(error?.code, 'ERR_NOT_SUPPORTED_TRANSPORT')
      t.is(error?.errno, -8)
    } finally {
      await forced.close()
    }
  })
})

test('caller-registered memory of a peer is reached with process_vm', async (t) => {
  const size = 4 << 20
  await withPeer({ size, seed: 4, external: true }, { protocol: 'shm' }, async (peer, engine) => {
    const segment = await engine.openSegment(peer.segment)
    const local = engine.allocate(size)
    await engine.read(segment, local, peer.address)
    t.true(local.equals(pattern(4, 0, size)))
    randomBytes(size).copy(local)
    await engine.write(segment, local, peer.address)
    const back = engine.allocate(size)
    await engine.read(segment, back, peer.address)
    t.true(back.equals(local))
    t.is(engine.stats().shm.requests, 3)
  })
})

test('a peer that unregisters or dies while mapped gives clean errors', async (t) => {
  const size = 8 << 20
  await withPeer({ size, seed: 5 }, { protocol: 'shm' }, async (peer, engine) => {
    const segment = await engine.openSegment(peer.segment)
    const local = engine.allocate(size)
    await engine.read(segment, local, peer.address)
    t.is(await peer.command('unregister'), 'ok')
    const error = await t.throwsAsync(engine.write(segment, local, peer.address), { instanceOf: MooncakeError })
    t.is(error?.code, 'ERR_ADDRESS_NOT_REGISTERED')
  })

  await withPeer({ size, seed: 6 }, { protocol: 'shm' }, async (peer, engine) => {
    const segment = await engine.openSegment(peer.segment)
    const local = engine.allocate(size)
    await engine.read(segment, local, peer.address)
    peer.child.kill('SIGKILL')
    await new Promise((resolve) => peer.child.once('exit', resolve))
    // Give the owner's socket a moment to report the hang-up, then copies must fail cleanly.
    let failure: unknown
    for (let i = 0; i < 50 && failure === undefined; i++) {
      await engine.write(segment, local, peer.address).catch((e: unknown) => (failure = e))
      await new Promise((resolve) => setTimeout(resolve, 20))
    }
    t.true(failure instanceof MooncakeError, 'writes into a dead peer kept succeeding')
    t.regex((failure as MooncakeError).code, /^ERR_(SOCKET|ADDRESS_NOT_REGISTERED)$/)
    t.true(local.equals(pattern(6, 0, size)), 'local memory must be untouched')
  })
})
