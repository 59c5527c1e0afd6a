// The P2P store across real processes on loopback (TCP, shared memory off, so that the network
// path is what moves the bytes): one registrant, pullers that become sources, nodes that die.
import { execFile, spawn, type ChildProcess } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { createInterface } from 'node:readline'

import test from 'ava'

import { MooncakeError, P2PStore, startMetadataServer, type MooncakeErrorCode, type PullReport } from '../src'
import { etcdInstalled, startEtcd } from './fixtures/etcd'
import { runFixture } from './helpers'

const MiB = 1 << 20

interface Answer {
  ok?: boolean
  code?: string
  message?: string
  report?: PullReport
  mismatch?: number
  progress?: number
  of?: number
}

/** A node process and the lines it printed, in order. */
class Node {
  readonly segment: string
  private readonly queue: Answer[] = []
  private waiting?: () => void

  private constructor(
    readonly child: ChildProcess,
    lines: AsyncIterable<string>,
    first: string,
  ) {
    this.segment = (JSON.parse(first) as { segment: string }).segment
    void (async () => {
      for await (const line of lines) {
        this.queue.push(JSON.parse(line) as Answer)
        this.waiting?.()
      }
    })()
  }

  static async start(metadata: string, name: string, options: { livenessTtlMs?: number; readTimeoutMs?: number } = {}): Promise<Node> {
    const child = runFixture('p2p-node.ts', [JSON.stringify({ metadata, name, livenessTtlMs: 1000, ...options })])
    const lines = createInterface({ input: child.stdout! })
    const iterator = lines[Symbol.asyncIterator]()
    const exited = once(child, 'exit').then(([code]) => {
      throw new Error(`node ${name} exited early with ${code}`)
    })
    const first = await Promise.race([iterator.next(), exited])
    return new Node(child, { [Symbol.asyncIterator]: () => iterator }, first.value as string)
  }

  send(command: object): void {
    this.child.stdin!.write(`${JSON.stringify(command)}\n`)
  }

  /** The next line that satisfies `wanted`; lines before it are dropped. */
  async next(wanted: (a: Answer) => boolean = (a) => a.ok !== undefined): Promise<Answer> {
    for (;;) {
      const found = this.queue.findIndex(wanted)
      if (found >= 0) return this.queue.splice(0, found + 1)[found]
      await new Promise<void>((resolve) => (this.waiting = resolve))
    }
  }

  async call(command: object): Promise<Answer> {
    this.send(command)
    return this.next()
  }

  async kill(signal: NodeJS.Signals): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return
    const exited = once(this.child, 'exit')
    this.child.kill(signal)
    await exited
  }
}

/** Bytes each source gave a pull. */
function bySource(report: PullReport | undefined): Record<string, number> {
  return Object.fromEntries((report?.sources ?? []).map((s) => [s.segment, s.bytes]))
}

async function httpEntry(url: string, key: string): Promise<string | undefined> {
  const response = await fetch(`${url}?key=${encodeURIComponent(key)}`)
  return response.ok ? response.text() : undefined
}

async function etcdEntry(endpoint: string, key: string): Promise<string | undefined> {
  const response = await fetch(`http://${endpoint}/v3/kv/range`, { method: 'POST', body: JSON.stringify({ key: Buffer.from(key).toString('base64') }) })
  const body = (await response.json()) as { kvs?: { value: string }[] }
  const value = body.kvs?.[0]?.value
  return value === undefined ? undefined : Buffer.from(value, 'base64').toString()
}

/** Segment names serving each shard. */
function holders(entry: string | undefined): string[][] {
  const payload = JSON.parse(entry ?? 'null') as { shards: { gold: { segment_name: string }[] | null; replica_list: { segment_name: string }[] | null }[] } | null
  return (payload?.shards ?? []).map((s) => [...(s.gold ?? []), ...(s.replica_list ?? [])].map((l) => l.segment_name))
}

const etcdTest = etcdInstalled ? test.serial : test.serial.skip

etcdTest('1 GiB from one registrant to four pullers over etcd: pullers serve each other, the seed dies and is dropped', async (t) => {
  t.timeout(300_000)
  const etcd = await startEtcd(1)
  const nodes: Node[] = []
  t.teardown(async () => {
    await Promise.all(nodes.map((n) => n.kill('SIGKILL')))
    await etcd.close()
  })
  const metadata = `etcd://${etcd.endpoints[0]}`
  const name = `ckpt/${process.pid}/step-1`
  const sizes = [400 * MiB, 400 * MiB, 224 * MiB + 12]
  const [seed, ...pullers] = await Promise.all(['seed', 'p1', 'p2', 'p3', 'p4'].map((n) => Node.start(metadata, `${n}-${process.pid}`)))
  nodes.push(seed, ...pullers)
  t.deepEqual(await seed.call({ op: 'register', name, sizes, seed: 7, maxShardSize: 64 * MiB }), { ok: true })

  const first = await pullers[0].call({ op: 'pull', name, seed: 7 })
  t.is(first.mismatch, -1, 'byte-exact')
  t.deepEqual(Object.keys(bySource(first.report)), [seed.segment])

  const second = await pullers[1].call({ op: 'pull', name, seed: 7 })
  t.is(second.mismatch, -1)
  const fromFirst = bySource(second.report)[pullers[0].segment] ?? 0
  t.log('second puller:', bySource(second.report))
  t.true(fromFirst > 0, 'the second puller reads part of the payload from the first')

  await seed.kill('SIGKILL')
  const third = await pullers[2].call({ op: 'pull', name, seed: 7 })
  t.is(third.mismatch, -1, 'complete without the registrant')
  const seedFailures = third.report?.sources.find((s) => s.segment === seed.segment)?.failures ?? 0
  t.true(seedFailures <= 4, `a dead source costs a puller one round of attempts at most (${seedFailures})`)
  t.log('third puller:', bySource(third.report), 'retries', third.report?.retries)

  // Once its liveness entry expired, the next puller probes the seed's copies, finds them dead
  // and drops them from the catalogue.
  const liveKey = `mooncake/p2p/live/${seed.segment}`
  for (let i = 0; i < 50 && (await etcdEntry(etcd.endpoints[0], liveKey)) !== undefined; i++) await new Promise((r) => setTimeout(r, 100))
  t.is(await etcdEntry(etcd.endpoints[0], liveKey), undefined, "the dead seed's lease expired")
  const fourth = await pullers[3].call({ op: 'pull', name, seed: 7 })
  t.is(fourth.mismatch, -1)
  t.log('fourth puller:', bySource(fourth.report))
  const shards = holders(await etcdEntry(etcd.endpoints[0], `mooncake/checkpoint/${name}`))
  t.is(shards.length, 7 + 7 + 4)
  for (const shard of shards) t.deepEqual([...shard].sort(), pullers.map((p) => p.segment).sort())

  for (const puller of pullers) t.deepEqual(await puller.call({ op: 'close' }), { ok: true })
  t.is(await etcdEntry(etcd.endpoints[0], `mooncake/checkpoint/${name}`), undefined, 'the entry goes with the last node serving it')
})

test.serial('pullers read from a puller still pulling; one killed mid-pull never serves and its lease expires; corrupt copies are caught', async (t) => {
  t.timeout(120_000)
  const server = await startMetadataServer()
  const nodes: Node[] = []
  t.teardown(async () => {
    await Promise.all(nodes.map((n) => n.kill('SIGKILL')))
    await server.close()
  })
  const name = `faults-${process.pid}`
  const sizes = [128 * MiB + 5]
  const started = await Promise.all([
    Node.start(server.url, `seed-${process.pid}`),
    Node.start(server.url, `holder-${process.pid}`),
    // Waits on a frozen source for as long as the test needs it mid-pull.
    Node.start(server.url, `victim-${process.pid}`, { readTimeoutMs: 60_000 }),
    // Gives up on a frozen source after 1 s.
    Node.start(server.url, `sharer-${process.pid}`, { readTimeoutMs: 1000 }),
    Node.start(server.url, `fresh-${process.pid}`),
    Node.start(server.url, `last-${process.pid}`),
  ])
  nodes.push(...started)
  const [seed, holder, victim, sharer, fresh, last] = started
  const partialKey = `mooncake/p2p/partial/${name}/${victim.segment}`
  t.deepEqual(await seed.call({ op: 'register', name, sizes, seed: 3, maxShardSize: 8 * MiB }), { ok: true })
  t.is((await holder.call({ op: 'pull', name, seed: 3 })).mismatch, -1)

  // With the seed frozen, the victim gets shards from the holder and waits on the seed for the
  // others: it is mid-pull for certain, and offers what it holds.
  seed.child.kill('SIGSTOP')
  victim.send({ op: 'pull', name, seed: 3 })
  const progress = await victim.next((a) => a.progress !== undefined && a.progress >= 1)
  t.true((progress.progress ?? 0) < (progress.of ?? 0))
  for (let i = 0; i < 50 && (await httpEntry(server.url, partialKey)) === undefined; i++) await new Promise((r) => setTimeout(r, 100))
  const offered = JSON.parse((await httpEntry(server.url, partialKey)) ?? '{"shards":[]}') as { shards: unknown[] }
  t.true(offered.shards.length >= 1, 'a puller offers the checked shards it holds')

  const shared = await sharer.call({ op: 'pull', name, seed: 3 })
  t.is(shared.mismatch, -1)
  t.log('sharer:', bySource(shared.report), shared.report?.elapsedMs, 'ms')
  t.true((bySource(shared.report)[victim.segment] ?? 0) > 0, 'part came from a puller that had not finished')

  await victim.kill('SIGKILL')
  seed.child.kill('SIGCONT')
  t.false(holders(await httpEntry(server.url, `mooncake/checkpoint/${name}`)).flat().includes(victim.segment), 'it never completed, so the catalogue never lists it')
  for (const key of [`mooncake/p2p/live/${victim.segment}`, partialKey]) {
    for (let i = 0; i < 50 && (await httpEntry(server.url, key)) !== undefined; i++) await new Promise((r) => setTimeout(r, 100))
    t.is(await httpEntry(server.url, key), undefined, `${key} expired with the victim`)
  }
  const pulled = await fresh.call({ op: 'pull', name, seed: 3 })
  t.is(pulled.mismatch, -1)
  t.log('fresh:', pulled.report?.elapsedMs, 'ms')
  t.is(bySource(pulled.report)[victim.segment] ?? 0, 0, 'the dead puller serves nothing')

  // A source whose bytes were altered after it checked them: the puller reads those shards
  // elsewhere, and drops the bad copies from the catalogue.
  t.deepEqual(await fresh.call({ op: 'corrupt', name, every: 8 * MiB }), { ok: true })
  const checked = await last.call({ op: 'pull', name, seed: 3 })
  t.is(checked.mismatch, -1, 'no altered byte is kept')
  const bad = checked.report?.sources.find((s) => s.segment === fresh.segment)
  t.log('last puller:', checked.report?.elapsedMs, 'ms', checked.report?.sources)
  t.true((bad?.corrupt ?? 0) > 0, 'some shards were first read from the altered copy')
  const after = holders(await httpEntry(server.url, `mooncake/checkpoint/${name}`))
  t.true(after.some((shard) => !shard.includes(fresh.segment)), 'altered copies are dropped')
  t.true(after.every((shard) => shard.includes(last.segment)))
})

test('bad input gets MooncakeErrors with stable codes', async (t) => {
  const server = await startMetadataServer()
  const node = await P2PStore.create({ metadata: server.url, localServerName: `bad-${process.pid}`, ipOrHostName: '127.0.0.1' })
  t.teardown(async () => {
    await node.close()
    await server.close()
  })
  const code = async (promise: Promise<unknown>, expected: MooncakeErrorCode): Promise<void> => {
    const error = await t.throwsAsync(promise, { instanceOf: MooncakeError })
    t.is(error?.code, expected, error?.message)
  }
  await code(P2PStore.create({ metadata: 'P2PHANDSHAKE', localServerName: '127.0.0.1' }), 'ERR_INVALID_ARGUMENT')
  const buffer = Buffer.alloc(3 * MiB + 1)
  await node.register('bad/a', [buffer], { maxShardSize: MiB })
  await code(node.register('bad/a', [Buffer.alloc(10)]), 'ERR_PAYLOAD_OPENED')
  await code(node.register('bad/b', [buffer.subarray(MiB, 2 * MiB)]), 'ERR_ADDRESS_OVERLAPPED')
  await code(node.register('bad/c', []), 'ERR_INVALID_ARGUMENT')
  await code(node.register('bad/d', [Buffer.alloc(10)], { maxShardSize: 0 }), 'ERR_INVALID_ARGUMENT')
  await code(node.getReplica('bad/none', [Buffer.alloc(10)]), 'ERR_PAYLOAD_NOT_FOUND')
  await code(node.getReplica('bad/a', [Buffer.alloc(3 * MiB + 1)]), 'ERR_PAYLOAD_OPENED')
  await code(node.unregister('bad/none'), 'ERR_PAYLOAD_NOT_OPENED')
  await code(node.deleteReplica('bad/a'), 'ERR_PAYLOAD_NOT_OPENED')
  const other = await P2PStore.create({ metadata: server.url, localServerName: `other-${process.pid}`, ipOrHostName: '127.0.0.1' })
  try {
    await code(other.getReplica('bad/a', [Buffer.alloc(MiB)]), 'ERR_INVALID_ARGUMENT')
    await code(other.getReplica('bad/a', [Buffer.alloc(MiB), Buffer.alloc(2 * MiB + 1)]), 'ERR_INVALID_ARGUMENT')
    t.deepEqual(await other.list('bad/'), [{ name: 'bad/a', totalSize: 3 * MiB + 1, sizeList: [3 * MiB + 1], maxShardSize: MiB }])
    const into = Buffer.alloc(3 * MiB + 1)
    const seen: number[] = []
    const report = await other.getReplica('bad/a', [into], { onProgress: (p) => seen.push(p.shardsDone) })
    t.true(into.equals(buffer))
    t.is(report.bytes, 3 * MiB + 1)
    t.true(seen.length > 0)
  } finally {
    await other.close()
  }
  await node.unregister('bad/a')
  t.deepEqual(await node.list('bad/'), [], 'the entry goes with the last node serving it')
})

const CLI = join(__dirname, '..', 'dist', 'cli.js')

function cli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((done) => {
    execFile(process.execPath, [CLI, 'p2p', ...args], { encoding: 'utf8' }, (error, stdout, stderr) => {
      done({ code: error === null ? 0 : typeof error.code === 'number' ? error.code : 1, stdout, stderr })
    })
  })
}

test.serial('the CLI moves a checkpoint directory, refuses names that leave the output directory, and unregisters for a dead registrant', async (t) => {
  t.timeout(120_000)
  const server = await startMetadataServer()
  const dir = mkdtempSync(join(tmpdir(), 'mooncake-p2p-cli-'))
  const children: ChildProcess[] = []
  t.teardown(async () => {
    for (const child of children) child.kill('SIGKILL')
    await server.close()
    rmSync(dir, { recursive: true, force: true })
  })
  const files: Record<string, Buffer> = {
    'a.bin': randomBytes(3 * MiB + 17),
    'nested/b.bin': randomBytes(MiB),
    'nested/deeper/c.txt': Buffer.from('config\n'),
  }
  for (const [name, bytes] of Object.entries(files)) {
    mkdirSync(dirname(join(dir, 'src', name)), { recursive: true })
    writeFileSync(join(dir, 'src', name), bytes)
  }
  writeFileSync(join(dir, 'src', 'empty'), '')
  const common = ['--metadata', server.url, '--ip', '127.0.0.1']
  const name = `ckpt-${process.pid}`
  const registrant = spawn(process.execPath, [CLI, 'p2p', 'register', name, join(dir, 'src'), '--max-shard-size', '1MiB', ...common], { stdio: ['ignore', 'pipe', 'pipe'] })
  children.push(registrant)
  let stderr = ''
  registrant.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()))
  const [serving] = (await once(createInterface({ input: registrant.stdout! }), 'line')) as [string]
  t.regex(serving, /^serving 'ckpt-\d+' from .*: 3 files, 4\.0 MiB/)
  t.regex(stderr, /skipping empty file/)

  const listed = await cli(['list', ...common])
  t.is(listed.code, 0, listed.stderr)
  t.regex(listed.stdout, new RegExp(`^${name}\\t4\\.0 MiB\\t3 buffers\\t1\\.0 MiB shards$`, 'm'))

  const got = await cli(['get', name, join(dir, 'out'), ...common])
  t.is(got.code, 0, got.stderr)
  t.regex(got.stdout, /pulled 4\.0 MiB/)
  for (const [file, bytes] of Object.entries(files)) t.true(readFileSync(join(dir, 'out', file)).equals(bytes), file)
  t.is((await cli(['get', name, join(dir, 'out'), ...common])).code, 1, 'existing files are not overwritten without --overwrite')

  // A catalogue entry is untrusted: a buffer name that climbs out of the output directory is refused.
  const hostile = await P2PStore.create({ metadata: server.url, localServerName: `hostile-${process.pid}`, ipOrHostName: '127.0.0.1' })
  try {
    await hostile.register(`evil-${process.pid}`, [Buffer.from('x')], { bufferNames: ['../../escaped'] })
    const evil = await cli(['get', `evil-${process.pid}`, join(dir, 'evil', 'out'), ...common])
    t.is(evil.code, 1)
    t.regex(evil.stderr, /ERR_INVALID_ARGUMENT: .*not a safe relative path/)
    t.false(existsSync(join(dir, 'escaped')))
    await hostile.register(`twice-${process.pid}`, [Buffer.from('x'), Buffer.from('y')], { bufferNames: ['a', './a'] })
    const twice = await cli(['get', `twice-${process.pid}`, join(dir, 'twice'), ...common])
    t.regex(twice.stderr, /ERR_INVALID_ARGUMENT: the catalogue names two buffers 'a'/)
    // A symbolic link in the output directory does not carry a write outside it.
    mkdirSync(join(dir, 'linked'))
    symlinkSync(join(dir, 'elsewhere'), join(dir, 'linked', 'link'))
    mkdirSync(join(dir, 'elsewhere'))
    await hostile.register(`link-${process.pid}`, [Buffer.from('z')], { bufferNames: ['link/file'] })
    const linked = await cli(['get', `link-${process.pid}`, join(dir, 'linked'), ...common])
    t.regex(linked.stderr, /would be written outside/)
    t.false(existsSync(join(dir, 'elsewhere', 'file')))
  } finally {
    await hostile.close()
  }

  registrant.kill('SIGKILL')
  await once(registrant, 'exit')
  const forgotten = await cli(['unregister', name, ...common])
  t.is(forgotten.code, 0, forgotten.stderr)
  t.regex((await cli(['list', ...common])).stdout, /^no payloads$/m, 'the dead registrant was the only copy')
})
