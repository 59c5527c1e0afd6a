import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { createServer, type AddressInfo } from 'node:net'
import { createInterface } from 'node:readline'

import test from 'ava'

import { MasterServer, MooncakeError, MooncakeStore, type MasterServerOptions } from '../src'
import { pattern, runFixture } from './helpers'

const MiB = 1 << 20

interface Cluster {
  master: MasterServer
  metadata: string
  nodes: { name: string; child: ReturnType<typeof runFixture> }[]
  client(options?: { size?: number; name?: string }): Promise<MooncakeStore>
  close(): Promise<void>
}

/** A master in this process and `count` store nodes in their own processes. */
async function cluster(count: number, nodeSize: number, options: MasterServerOptions = {}): Promise<Cluster> {
  const master = await MasterServer.start({ rpcPort: 0, metricsPort: 0, httpMetadataServer: true, httpMetadataPort: 0, ...options })
  const metadata = master.metadataUrl!
  const clients: MooncakeStore[] = []
  const nodes = await Promise.all(
    Array.from({ length: count }, async (_, i) => {
      const name = `node-${i}-${process.pid}`
      const child = runFixture('store-node.ts', [JSON.stringify({ masterAddress: master.address, metadata, name, size: nodeSize })])
      const [line] = (await once(createInterface({ input: child.stdout! }), 'line')) as [string]
      return { name: (JSON.parse(line) as { segment: string }).segment, child }
    }),
  )
  let n = 0
  return {
    master,
    metadata,
    nodes,
    async client({ size = 0, name } = {}) {
      const store = await MooncakeStore.connect({
        masterAddress: master.address,
        metadata,
        localServerName: name ?? `client-${n++}-${process.pid}`,
        ipOrHostName: '127.0.0.1',
        globalSegmentSize: size,
      })
      clients.push(store)
      return store
    },
    async close() {
      await Promise.all(clients.map((c) => c.close()))
      for (const node of nodes) {
        if (node.child.exitCode === null && node.child.signalCode === null) {
          node.child.kill('SIGCONT')
          node.child.kill('SIGTERM')
          await once(node.child, 'exit')
        }
      }
      await master.close()
    },
  }
}

async function segments(master: MasterServer): Promise<string[]> {
  const url = master.metricsUrl!.replace('/metrics', '/get_all_segments')
  return (await (await fetch(url)).text()).split('\n').filter(Boolean)
}

test('objects with replicaNum 2 stay readable after a node is SIGKILLed', async (t) => {
  const c = await cluster(3, 64 * MiB)
  try {
    const client = await c.client()
    const values = Array.from({ length: 12 }, () => randomBytes(MiB + randomBytes(1)[0] * 997))
    const keys = values.map((_, i) => `obj/${i}`)
    t.deepEqual(await client.batchPut(keys, values, { replicaNum: 2 }), keys.map(() => undefined))
    c.nodes[1].child.kill('SIGKILL')
    await once(c.nodes[1].child, 'exit')
    for (const [i, key] of keys.entries()) {
      t.true((await client.get(key)).equals(values[i]), `${key} read back wrong after the kill`)
    }
    const batch = await client.batchGet(keys)
    t.true(batch.every((v, i) => Buffer.isBuffer(v) && v.equals(values[i])))
  } finally {
    await c.close()
  }
})

test('eviction frees space under pressure but keeps leased and hard-pinned objects', async (t) => {
  const c = await cluster(1, 16 * MiB)
  try {
    const client = await c.client()
    const pinned = randomBytes(MiB)
    const leased = randomBytes(MiB)
    await client.put('hard', pinned, { hardPin: true })
    await client.put('leased', leased)
    for (let i = 0; i < 40; i++) {
      await client.get('leased') // keeps its lease fresh
      await client.put(`fill/${i}`, randomBytes(MiB))
    }
    t.true((await client.get('hard')).equals(pinned))
    t.true((await client.get('leased')).equals(leased))
    const present = await client.batchExists(Array.from({ length: 40 }, (_, i) => `fill/${i}`))
    t.true(present.filter(Boolean).length < 40, 'some objects were evicted')
    t.true(present[39], 'the newest object is present')
    const metrics = await (await fetch(c.master.metricsUrl!)).text()
    t.regex(metrics, /master_evicted_keys_total [1-9]/)
  } finally {
    await c.close()
  }
})

test('concurrent puts of one key leave exactly one complete version', async (t) => {
  const c = await cluster(2, 32 * MiB)
  try {
    const writers = await Promise.all([c.client(), c.client(), c.client(), c.client()])
    const values = writers.map((_, i) => Buffer.alloc(2 * MiB, i + 1))
    await Promise.all(writers.map((w, i) => w.put('contended', values[i])))
    const got = await writers[0].get('contended')
    t.is(got.length, 2 * MiB)
    t.true(values.some((v) => v.equals(got)), 'the value is one writer\'s, whole')
  } finally {
    await c.close()
  }
})

test('upsert replaces values of equal and different sizes', async (t) => {
  const c = await cluster(2, 32 * MiB)
  try {
    const client = await c.client()
    await client.put('u', Buffer.alloc(MiB, 1))
    await client.upsert('u', Buffer.alloc(MiB, 2))
    t.true((await client.get('u')).equals(Buffer.alloc(MiB, 2)))
    await client.upsert('u', Buffer.alloc(3 * MiB, 3))
    t.true((await client.get('u')).equals(Buffer.alloc(3 * MiB, 3)))
    await client.upsert('u', 'tiny')
    t.is((await client.get('u')).toString(), 'tiny')
    await client.upsert('fresh', 'new key')
    t.is((await client.get('fresh')).toString(), 'new key')
    t.is(await client.getSize('u'), 4)
  } finally {
    await c.close()
  }
})

test('a node that misses its pings is dropped, then remounts', async (t) => {
  const c = await cluster(2, 16 * MiB, { clientTtlMs: 1500 })
  try {
    const client = await c.client()
    t.is((await segments(c.master)).length, 2)
    await client.put('only-on-1', randomBytes(1024), { preferredSegments: [c.nodes[1].name] })
    c.nodes[1].child.kill('SIGSTOP')
    let left: string[] = []
    for (let i = 0; i < 40 && left.length !== 1; i++) {
      await new Promise((r) => setTimeout(r, 200))
      left = await segments(c.master)
    }
    t.deepEqual(left, [c.nodes[0].name], 'the silent node was dropped')
    t.false(await client.exists('only-on-1'), 'its only replica went with it')
    c.nodes[1].child.kill('SIGCONT')
    for (let i = 0; i < 40 && left.length !== 2; i++) {
      await new Promise((r) => setTimeout(r, 200))
      left = await segments(c.master)
    }
    t.is(left.length, 2, 'it came back by remounting')
    await client.put('after', randomBytes(1024), { preferredSegments: [c.nodes[1].name] })
    t.is((await client.get('after')).length, 1024)
  } finally {
    await c.close()
  }
})

test('bad input gets its code and leaves nothing behind', async (t) => {
  const c = await cluster(2, 16 * MiB)
  try {
    const client = await c.client({ size: 8 * MiB })
    const code = async (p: Promise<unknown>) => ((await t.throwsAsync(p, { instanceOf: MooncakeError })) as MooncakeError).code
    t.is(await code(client.put('', 'x')), 'ERR_INVALID_ARGUMENT')
    t.is(await code(client.put('empty', Buffer.alloc(0))), 'ERR_INVALID_ARGUMENT')
    t.is(await code(client.put('k', 'x', { replicaNum: 4 })), 'ERR_INVALID_ARGUMENT')
    t.is(await code(client.put('k', 'x', { replicaNum: 0 })), 'ERR_INVALID_ARGUMENT')
    t.is(await code(client.get('missing')), 'ERR_OBJECT_NOT_FOUND')
    t.is((await t.throwsAsync(client.get('missing')) as MooncakeError).errno, -704)
    t.is(await code(client.putFrom('k', Buffer.alloc(64))), 'ERR_INVALID_ARGUMENT')
    await client.put('big', Buffer.alloc(4096, 7))
    const small = client.allocate(100)
    t.is(await code(client.getInto('big', small)), 'ERR_BUFFER_OVERFLOW')
    t.is(await code(client.getInto('big', Buffer.alloc(8192))), 'ERR_INVALID_ARGUMENT')
    t.is(await code(client.remove('nothing')), 'ERR_OBJECT_NOT_FOUND')
    t.is(await code(client.remove('big')), 'ERR_OBJECT_HAS_LEASE')
    t.is(await code(client.removeByRegex('(')), 'ERR_INVALID_ARGUMENT')
    t.is(await code(client.put('far', 'x', { softPin: { ttlMs: 48 * 3600 * 1000 } })), 'ERR_INVALID_ARGUMENT')
    t.is(await code(client.put('huge', Buffer.alloc(40 * MiB))), 'ERR_NO_AVAILABLE_HANDLE')
    t.false(await client.exists('k'))
    t.deepEqual(await client.batchExists(['k', 'empty', 'huge', 'big']), [false, false, false, true])
    t.is(await client.longestPrefix(['big', 'k', 'big']), 1)
    const mixed = await client.batchPut(['ok', '', 'ok2'], ['a', 'b', 'c'])
    t.is(mixed[0], undefined)
    t.is(mixed[1]?.code, 'ERR_INVALID_ARGUMENT')
    t.is(mixed[2], undefined)
    const reads = await client.batchGet(['ok', 'nope'])
    t.is((reads[0] as Buffer).toString(), 'a')
    t.is((reads[1] as MooncakeError).code, 'ERR_OBJECT_NOT_FOUND')
    await t.throwsAsync(MooncakeStore.connect({ masterAddress: '127.0.0.1:1', metadata: c.metadata, rpcTimeoutMs: 2000 }), {
      instanceOf: MooncakeError,
      message: /master/,
    })
  } finally {
    await c.close()
  }
})

test('zero-copy batch APIs land bytes in registered buffers', async (t) => {
  const c = await cluster(2, 32 * MiB)
  try {
    const client = await c.client()
    const source = client.allocate(8 * MiB)
    randomBytes(source.length).copy(source)
    const keys = Array.from({ length: 8 }, (_, i) => `zc/${i}`)
    const parts = keys.map((_, i) => source.subarray(i * MiB, (i + 1) * MiB))
    t.deepEqual(await client.batchPutFrom(keys, parts, { replicaNum: 2 }), keys.map(() => undefined))
    const target = client.allocate(8 * MiB)
    const sizes = await client.batchGetInto(keys, keys.map((_, i) => target.subarray(i * MiB, (i + 1) * MiB)))
    t.deepEqual(sizes, keys.map(() => MiB))
    t.true(target.equals(source))
    t.is(await client.removeByRegex(/^zc\//, { force: true }), 8)
  } finally {
    await c.close()
  }
})

test('put copies the value before it returns: changing the Buffer afterwards changes nothing', async (t) => {
  const c = await cluster(2, 32 * MiB)
  try {
    const client = await c.client()
    const value = Buffer.alloc(4 * MiB, 0x5a)
    const original = Buffer.from(value)
    const put = client.put('copied', value)
    value.fill(0)
    await put
    const upsert = client.upsert('copied', value.fill(0x33))
    value.fill(0)
    await upsert
    t.true((await client.get('copied')).equals(Buffer.alloc(4 * MiB, 0x33)))
    const batch = client.batchPut(['b1', 'b2'], [original, original])
    original.fill(1)
    t.deepEqual(await batch, [undefined, undefined])
    t.true((await client.get('b1')).equals(Buffer.alloc(4 * MiB, 0x5a)))
  } finally {
    await c.close()
  }
})

test('a frozen replica holder costs a read well under a second, not the I/O timeout', async (t) => {
  const c = await cluster(2, 64 * MiB)
  try {
    // Over TCP: shared memory reads a frozen process's pages without it.
    const client = await MooncakeStore.connect({
      masterAddress: c.master.address,
      metadata: c.metadata,
      localServerName: `frozen-reader-${process.pid}`,
      ipOrHostName: '127.0.0.1',
      protocol: 'tcp',
      globalSegmentSize: 0,
    })
    try {
      const values = Array.from({ length: 8 }, (_, i) => pattern(i + 1, 0, MiB))
      const keys = values.map((_, i) => `frozen/${i}`)
      t.deepEqual(await client.batchPut(keys, values, { replicaNum: 2 }), keys.map(() => undefined))
      for (const key of keys) await client.get(key) // warm connections and the read pace
      c.nodes[0].child.kill('SIGSTOP')
      let worst = 0
      for (const [i, key] of keys.entries()) {
        const started = performance.now()
        const got = await client.get(key)
        worst = Math.max(worst, performance.now() - started)
        t.true(got.equals(values[i]), `${key} read back wrong`)
      }
      const batchStarted = performance.now()
      const batch = await client.batchGet(keys)
      const batchTook = performance.now() - batchStarted
      t.true(batch.every((v, i) => Buffer.isBuffer(v) && v.equals(values[i])))
      t.log(`worst get with a frozen holder: ${worst.toFixed(0)} ms; batch of 8: ${batchTook.toFixed(0)} ms`)
      // Loose bounds for a shared machine; the I/O timeout this replaces is 14-30 s.
      t.true(worst < 5000, `worst get took ${worst} ms`)
      t.true(batchTook < 5000, `the batch took ${batchTook} ms`)
    } finally {
      await client.close()
    }
  } finally {
    await c.close()
  }
})

test('a store node takes every engine option', async (t) => {
  const master = await MasterServer.start({ rpcPort: 0, metricsPort: -1 })
  try {
    const probe = createServer().listen(0, '127.0.0.1')
    await once(probe, 'listening')
    const port = (probe.address() as AddressInfo).port
    probe.close()
    const store = await MooncakeStore.connect({
      masterAddress: master.address,
      metadata: 'P2PHANDSHAKE',
      rpcPort: port,
      tcpLanesPerPeer: 2,
      sliceSize: 256 << 10,
      retryCount: 3,
      globalSegmentSize: 4 * MiB,
    })
    try {
      t.is(store.segmentName, `127.0.0.1:${port}`)
      await store.put('k', pattern(9, 0, MiB))
      t.true((await store.get('k')).equals(pattern(9, 0, MiB)))
    } finally {
      await store.close()
    }
    const refused = await t.throwsAsync(MooncakeStore.connect({ masterAddress: master.address, metadata: 'P2PHANDSHAKE', retryCount: 500 }), {
      instanceOf: MooncakeError,
    })
    t.is(refused?.code, 'ERR_INVALID_ARGUMENT')
  } finally {
    await master.close()
  }
})
