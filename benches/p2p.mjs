// `npm run bench:p2p`: P2P store fan-out. Time for N pullers (separate processes) to all hold
// one payload when they pull at once and serve each other, against the same N pulls made one
// after another from the seed alone, in the same run. Loopback, TCP, shared memory off, so the
// network path moves every byte. Medians of BENCH_REPEAT runs.
//
//   BENCH_P2P_SIZE=1GiB BENCH_P2P_SHARD=64MiB BENCH_REPEAT=3 npm run bench:p2p
import { spawn } from 'node:child_process'
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
const shard = parseSize(process.env.BENCH_P2P_SHARD ?? '64MiB')
const repeat = Number(process.env.BENCH_REPEAT ?? 3)
const counts = (process.env.BENCH_P2P_PULLERS ?? '1,2,4').split(',').map(Number)
const worker = fileURLToPath(new URL('./p2p-node.mjs', import.meta.url))
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

async function start(metadata, name) {
  const child = spawn(process.execPath, [worker, JSON.stringify({ metadata, name })], { stdio: ['pipe', 'pipe', 'inherit'] })
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

const server = await startMetadataServer()
const name = `bench-${process.pid}`
const seed = await start(server.url, 'seed')
const pullers = await Promise.all(Array.from({ length: Math.max(...counts) }, (_, i) => start(server.url, `puller-${i}`)))
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
  console.log(`P2P fan-out: ${gib(size)} GiB payload in ${shard / MiB} MiB shards; loopback TCP, shared memory off; median of ${repeat}`)
  console.log('')
  console.log('pullers  one-by-one from seed (s)  all at once (s)  speed-up  GiB from seed  GiB from peers')
  for (const row of rows) {
    const [sequential, fanout] = [median(row.sequential), median(row.fanout)]
    console.log(
      `${String(row.n).padStart(7)}  ${sequential.toFixed(2).padStart(24)}  ${fanout.toFixed(2).padStart(15)}  ${(sequential / fanout).toFixed(2).padStart(8)}  ${gib(median(row.fromSeed)).padStart(13)}  ${gib(median(row.fromPeers)).padStart(14)}`,
    )
  }
} finally {
  await Promise.allSettled([seed, ...pullers].map((p) => p.call({ op: 'close' })))
  await server.close()
}
