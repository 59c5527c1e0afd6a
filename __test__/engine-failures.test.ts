import { once } from 'node:events'
import { connect, type Socket } from 'node:net'

import test from 'ava'

import { MooncakeError, TransferEngine } from '../src'
import { pattern, runFixture, startPeer, stopPeer } from './helpers'

async function localEngine(): Promise<TransferEngine> {
  return TransferEngine.create({ localServerName: '127.0.0.1', metadata: 'P2PHANDSHAKE', protocol: 'tcp' })
}

/** Sends `bytes` on a fresh connection, then collects what comes back until the peer closes (or 3 s pass). */
async function poke(port: number, bytes: Buffer, { end = true } = {}): Promise<Buffer> {
  const socket: Socket = connect(port, '127.0.0.1')
  await once(socket, 'connect')
  const chunks: Buffer[] = []
  socket.on('data', (c: Buffer) => chunks.push(c))
  socket.on('error', () => undefined)
  socket.write(bytes)
  if (end) socket.end()
  await Promise.race([once(socket, 'close'), new Promise((r) => setTimeout(r, 3000))])
  socket.destroy()
  return Buffer.concat(chunks)
}

function u64(value: bigint): Buffer {
  const b = Buffer.alloc(8)
  b.writeBigUInt64LE(value)
  return b
}

function dataHeader(size: bigint, addr: bigint, opcode: number): Buffer {
  const b = Buffer.alloc(24)
  b.writeBigUInt64LE(size, 0)
  b.writeBigUInt64LE(addr, 8)
  b[16] = opcode
  return b
}

test('a peer killed mid-batch fails the batch instead of hanging it', async (t) => {
  const size = 256 << 20
  const peer = await startPeer({ size, seed: 1 })
  const engine = await localEngine()
  try {
    const segment = await engine.openSegment(peer.segment)
    const local = engine.allocate(size)
    const requests = Array.from({ length: 64 }, (_, i) => ({
      op: 'read' as const,
      segment,
      local,
      localOffset: i * (4 << 20),
      remoteAddress: peer.address + BigInt(i * (4 << 20)),
      length: 4 << 20,
    }))
    const batch = engine.submit(requests)
    peer.child.kill('SIGKILL')
    const error = await t.throwsAsync(batch.done(), { instanceOf: MooncakeError })
    t.regex(error!.code, /^ERR_(SOCKET|TRANSFER_FAILED)$/)
    const status = batch.status()
    t.true(status.some((s) => s.status === 'FAILED'))
    t.true(status.every((s) => s.status === 'COMPLETED' || s.status === 'FAILED'))
    // The dead peer fails new work quickly too.
    await t.throwsAsync(engine.read(segment, local, peer.address, 4096), { instanceOf: MooncakeError })
  } finally {
    await engine.close()
    await stopPeer(peer)
  }
})

test('a request past its deadline ends as TIMEOUT', async (t) => {
  const peer = await startPeer({ size: 64 << 20 })
  const engine = await localEngine()
  try {
    const segment = await engine.openSegment(peer.segment)
    const local = engine.allocate(64 << 20)
    peer.child.kill('SIGSTOP')
    const batch = engine.submit([{ op: 'read', segment, local, remoteAddress: peer.address }], { timeoutMs: 300 })
    const error = await t.throwsAsync(batch.done(), { instanceOf: MooncakeError })
    t.is(error?.code, 'ERR_TIMEOUT')
    t.is(batch.status()[0].status, 'TIMEOUT')
    t.is(batch.status()[0].code, 5)
  } finally {
    peer.child.kill('SIGCONT')
    await engine.close()
    await stopPeer(peer)
  }
})

test('garbage, oversized and truncated frames leave both listeners serving', async (t) => {
  const size = 1 << 20
  const seed = 4
  const peer = await startPeer({ size, seed })
  const engine = await localEngine()
  try {
    const rpc = peer.rpcPort
    // Handshake port: random bytes, a 2^60-byte length, an empty frame, a truncated frame,
    // a frame that stops mid-way and stays open, bad JSON in a Notify.
    await poke(rpc, Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'))
    await poke(rpc, Buffer.concat([u64(1n << 60n), Buffer.from([2])]))
    await poke(rpc, u64(0n))
    await poke(rpc, Buffer.concat([u64(100n), Buffer.from([2]), Buffer.from('{"name"')]))
    const stalled = connect(rpc, '127.0.0.1')
    stalled.on('error', () => undefined)
    stalled.write(Buffer.concat([u64(50n), Buffer.from([1])]))
    await poke(rpc, Buffer.concat([u64(6n), Buffer.from([2]), Buffer.from('{nope')]))
    const probe = JSON.parse((await poke(rpc, Buffer.concat([u64(3n), Buffer.from([3]), Buffer.from('{}')]))).subarray(9).toString())
    t.deepEqual(probe, { status: 'success' })

    // Data port: a garbage opcode, a truncated header, a v1 and a v2 request outside any
    // registered buffer, an oversized request that starts inside one.
    const data = peer.dataPort
    t.is((await poke(data, dataHeader(16n, peer.address, 0x42))).length, 0)
    await poke(data, Buffer.alloc(11, 0xff))
    t.is((await poke(data, dataHeader(16n, 0x10n, 0x00))).length, 0)
    const rejected = await poke(data, dataHeader(16n, 0x10n, 0x80))
    t.deepEqual(rejected, Buffer.from([1, 0, 0, 0, 0x56, 0x54, 0x43, 0x4d]))
    const tooLong = await poke(data, Buffer.concat([dataHeader(BigInt(size + 1), peer.address, 0x81), Buffer.alloc(64)]))
    t.deepEqual(tooLong.subarray(0, 8), Buffer.from([1, 0, 0, 0, 0x56, 0x54, 0x43, 0x4d]))
    // A well-formed v2 READ from a raw socket gets OK and the bytes.
    const raw = await poke(data, dataHeader(32n, peer.address, 0x80), { end: false })
    t.deepEqual(raw.subarray(0, 8), Buffer.from([0, 0, 0, 0, 0x56, 0x54, 0x43, 0x4d]))
    t.true(raw.subarray(8, 40).equals(pattern(seed, 0, 32)))

    // Both listeners still serve an engine, and the peer's memory is intact.
    const segment = await engine.openSegment(peer.segment)
    const local = engine.allocate(size)
    await engine.read(segment, local, peer.address)
    t.true(local.equals(pattern(seed, 0, size)))
    await engine.sendNotify(peer.segment, 'still here')
    stalled.destroy()
  } finally {
    await engine.close()
    await stopPeer(peer)
  }
})

test('close() settles pending batches and lets the process exit', async (t) => {
  const child = runFixture('exit-after-close.ts')
  let output = ''
  child.stdout!.on('data', (c: Buffer) => (output += c.toString()))
  const timer = setTimeout(() => child.kill('SIGKILL'), 30_000)
  const [code, signal] = await once(child, 'exit')
  clearTimeout(timer)
  t.is(signal, null, 'the process had to be killed: something kept it alive after close()')
  t.is(code, 0)
  t.regex(output, /closed/)
})

test('a closed engine rejects work with ERR_CLOSED', async (t) => {
  const engine = await localEngine()
  const local = engine.allocate(4096)
  const segment = await engine.openSegment(engine.segmentName)
  await engine.close()
  await engine.close()
  const error = await t.throwsAsync(engine.read(segment, local, engine.addressOf(local)), { instanceOf: MooncakeError })
  t.is(error?.code, 'ERR_CLOSED')
  t.is(local.length, 4096, 'allocated memory outlives the engine')
  local.fill(1)
})
