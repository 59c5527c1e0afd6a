// `npm run bench:p2p`: P2P store fan-out. Time for N pullers (separate processes) to all hold
// one payload when they pull at once and serve each other, against the same N pulls made one
// after another from the seed alone, in the same run. Loopback, TCP, shared memory off, so the
// network path moves every byte. Medians of BENCH_REPEAT runs.
//
// BENCH_P2P_LINK=2gbit puts every node in its own network namespace behind a veth pair capped
// at that rate each way (tc tbf), as hosts with one NIC each: then the seed's link is the
// bottleneck, as in a cluster. Needs root and iproute2.
//
//   BENCH_P2P_SIZE=1GiB BENCH_P2P_SHARD=16MiB BENCH_REPEAT=3 [BENCH_P2P_LINK=2gbit] npm run bench:p2p
import { execFileSync, spawn } from 'node:child_process'
import { once } from 'node:events'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'

import { startMetadataServer } from '../dist/index.mjs'

const MiB = 1 << 20
const parseSize = (text) => {
  const match = /^(\d+)\s*(k|m|g)?i?b?$/i.exec(text.trim())
  if (!match) throw new Error(`not a size: ${text}`)
  return Number(match[1]) * { k: 1 << 10, m: MiB, g: 1 << 30 }[(match[2] ?? '').toLowerCase()] || Number(match[1])
}
const size = parseSize(process.env.BENCH_P2P_SIZE ?? '1GiB')
const shard = parseSize(process.env.BENCH_P2P_SHARD ?? '16MiB')
const repeat = Number(process.env.BENCH_REPEAT ?? 3)
const counts = (process.env.BENCH_P2P_PULLERS ?? '1,2,4').split(',').map(Number)
const link = process.env.BENCH_P2P_LINK
const worker = fileURLToPath(new URL('./p2p-node.mjs', import.meta.url))

/** Hosts of the namespace network: the metadata server on the bridge, node i at .(10 + i). */
const NET = { prefix: 'mcp2p', bridge: 'mcp2p-br', hub: '10.77.0.1' }
const ip = (...args) => execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] })
const tc = (...args) => execFileSync('tc', args, { stdio: ['ignore', 'ignore', 'pipe'] })
const cap = (...where) => ['qdisc', 'replace', ...where, 'root', 'tbf', 'rate', link, 'burst', '4mbit', 'latency', '20ms']

function teardown(nodes) {
  for (let i = 0; i < nodes; i++) {
    for (const args of [['link', 'del', `${NET.prefix}-h${i}`], ['netns', 'del', `${NET.prefix}-${i}`]]) {
      try {
        ip(...args)
      } catch {}
    }
  }
  try {
    ip('link', 'del', NET.bridge)
  } catch {}
}

/** Node i's namespace, address and capped link. */
function host(i) {
  const ns = `${NET.prefix}-${i}`
  const outside = `${NET.prefix}-h${i}`
  ip('netns', 'add', ns)
  ip('link', 'add', outside, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', ns)
  ip('link', 'set', outside, 'master', NET.bridge, 'up')
  ip('-n', ns, 'addr', 'add', `10.77.0.${10 + i}/24`, 'dev', 'eth0')
  ip('-n', ns, 'link', 'set', 'eth0', 'up')
  ip('-n', ns, 'link', 'set', 'lo', 'up')
  tc(...cap('dev', outside))
  tc('-n', ns, ...cap('dev', 'eth0'))
  return { ns, address: `10.77.0.${10 + i}` }
}
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

async function start(metadata, name, i) {
  const at = link === undefined ? { address: '127.0.0.1' } : host(i)
  const argv = [worker, JSON.stringify({ metadata, name, address: at.address })]
  const child = at.ns === undefined
    ? spawn(process.execPath, argv, { stdio: ['pipe', 'pipe', 'inherit'] })
    : spawn('ip', ['netns', 'exec', at.ns, process.execPath, ...argv], { stdio: ['pipe', 'pipe', 'inherit'] })
  const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]()
  const { segment } = JSON.parse((await lines.next()).value)
  const call = async (command) => {
    child.stdin.write(`${JSON.stringify(command)}\n`)
    const reply = JSON.parse((await lines.next()).value)
    if (!reply.ok) throw new Error(`${name}: ${reply.message}`)
    return reply
  }
  return { segment, call, child }
}

const nodes = Math.max(...counts) + 1
if (link !== undefined) {
  teardown(nodes)
  ip('link', 'add', NET.bridge, 'type', 'bridge')
  ip('addr', 'add', `${NET.hub}/24`, 'dev', NET.bridge)
  ip('link', 'set', NET.bridge, 'up')
}
const server = await startMetadataServer({ host: link === undefined ? '127.0.0.1' : NET.hub })
const name = `bench-${process.pid}`
const seed = await start(server.url, 'seed', 0)
const pullers = await Promise.all(Array.from({ length: nodes - 1 }, (_, i) => start(server.url, `puller-${i}`, i + 1)))
try {
  await seed.call({ op: 'register', name, size, shard })
  await Promise.all(pullers.map((p) => p.call({ op: 'prepare', sizes: [size] })))
  // Connections and first touches of memory before anything is timed.
  for (const p of pullers) {
    await p.call({ op: 'pull', name })
    await p.call({ op: 'drop', name })
  }
  const rows = []
  for (const n of counts) {
    const group = pullers.slice(0, n)
    const row = { n, sequential: [], fanout: [], fromSeed: [], fromPeers: [] }
    for (let r = 0; r < repeat; r++) {
      // Baseline: one after another, each dropping its copy, so the seed serves every byte.
      let sequential = 0
      for (const p of group) {
        const began = process.hrtime.bigint()
        await p.call({ op: 'pull', name })
        sequential += Number(process.hrtime.bigint() - began) / 1e9
        await p.call({ op: 'drop', name })
      }
      row.sequential.push(sequential)
      // Fan-out: all at once, each serving the shards it holds as soon as it checked them.
      const began = process.hrtime.bigint()
      const reports = await Promise.all(group.map((p) => p.call({ op: 'pull', name })))
      row.fanout.push(Number(process.hrtime.bigint() - began) / 1e9)
      let fromSeed = 0
      let fromPeers = 0
      for (const { report } of reports) {
        for (const s of report.sources) {
          if (s.segment === seed.segment) fromSeed += s.bytes
          else fromPeers += s.bytes
        }
      }
      row.fromSeed.push(fromSeed)
      row.fromPeers.push(fromPeers)
      await Promise.all(group.map((p) => p.call({ op: 'drop', name })))
      process.stderr.write('.')
    }
    rows.push(row)
  }
  process.stderr.write('\n')
  const gib = (bytes) => (bytes / 2 ** 30).toFixed(2)
  const network = link === undefined ? 'loopback TCP, shared memory off' : `one namespace per node, links capped at ${link} each way`
  console.log(`P2P fan-out: ${gib(size)} GiB payload in ${shard / MiB} MiB shards; ${network}; median of ${repeat}`)
  console.log('')
  console.log('pullers  one-by-one from seed (s)  all at once (s)  speed-up  GiB from seed  GiB from peers')
  for (const row of rows) {
    const [sequential, fanout] = [median(row.sequential), median(row.fanout)]
    console.log(
      `${String(row.n).padStart(7)}  ${sequential.toFixed(2).padStart(24)}  ${fanout.toFixed(2).padStart(15)}  ${(sequential / fanout).toFixed(2).padStart(8)}  ${gib(median(row.fromSeed)).padStart(13)}  ${gib(median(row.fromPeers)).padStart(14)}`,
    )
  }
} finally {
  await Promise.allSettled([seed, ...pullers].map(async (p) => {
    const exited = once(p.child, 'exit')
    await p.call({ op: 'close' })
    await exited
  }))
  await server.close()
  if (link !== undefined) teardown(nodes)
}
