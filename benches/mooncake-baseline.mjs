// Mooncake's own store, from its pinned PyPI wheel, as the baseline of `mooncake bench-store
// --baseline mooncake`: a long-lived process that bench-store starts and talks to in JSON lines
// (bench-store is CommonJS and cannot import this module).
//
//   node benches/mooncake-baseline.mjs [--nodes 2] [--node-size 1024 (MiB)] [--verify-every 16]
//
// Starts the wheel's `mooncake_master` and --nodes Python node processes, each mounting a
// --node-size MiB segment, then prints `{"ready": true, "wheel", "master", "nodes", "nodeSize",
// "verifyEvery"}`; if it cannot (the wheel's virtual environment cannot be made, say) it prints
// `{"error": "..."}` and exits 1. Then, per request line `{"size", "clients", "inflight",
// "seconds"}`, `clients` Python client processes, each with `inflight` threads sharing one
// MooncakeDistributedStore (TCP, P2PHANDSHAKE), run a put cell and then a get cell of
// mooncake_master_load.py at the same time, and it answers `{"rows": [put, get], "verified"}`,
// rows in bench-store's Row shape (system 'mooncake-wheel'). A failed operation, a wrong byte
// (the driver compares one value in --verify-every byte for byte) or a process that died is
// answered `{"error": "..."}`, after which it exits 1 and keeps the logs.
//
// Client processes stay up from one request to the next: a request for N clients uses the first
// N, starting those missing. Each has keys of its own (`c<k>/`), removed by regex between passes,
// and each cell's capacity is the pool split between its clients, so that they never overfill it.
// Client 0 fills the whole pool twice when it starts (the others fill nothing), so that the nodes'
// pages fault in before anything is timed. End of input stops everything.
import path from 'node:path'
import { createInterface } from 'node:readline'
import { parseArgs } from 'node:util'

import { WHEEL, session, theirMaster, wheel } from './mooncake-wheel.mjs'

const { values: opts } = parseArgs({
  options: {
    nodes: { type: 'string', default: '2' },
    'node-size': { type: 'string', default: '1024' },
    'verify-every': { type: 'string', default: '16' },
  },
})
const nodeCount = Number(opts.nodes)
const nodeSize = Number(opts['node-size']) * (1 << 20)
const pool = nodeCount * nodeSize
const verifyEvery = Number(opts['verify-every'])
const log = (text) => process.stderr.write(text)
const answer = (message) => process.stdout.write(`${JSON.stringify(message)}\n`)

const { startMaster, startPython, finish, cleanup } = session({ prefix: 'mooncake-baseline-', log })

let venv, master
const nodes = []
try {
  if (!(nodeCount >= 1) || !(nodeSize > 0) || !(verifyEvery >= 1)) throw new Error('--nodes, --node-size and --verify-every take positive numbers')
  // pip's output, when it installs the wheel, goes to stderr: stdout carries the answers.
  venv = wheel({ log, stdout: 2 })
  master = await startMaster('theirs', theirMaster(venv.master), 2)
  for (let i = 0; i < nodeCount; i++) {
    nodes.push(await startPython(venv.python, 'node', master.addr, master.dir, ['--segment-size', String(nodeSize)], `node-${i}`))
  }
} catch (error) {
  answer({ error: error.message })
  process.exit(1)
}
answer({ ready: true, wheel: `${WHEEL.name}==${WHEEL.version}`, master: master.addr, nodes: nodeCount, nodeSize, verifyEvery })

const clients = []
async function client(k, inflight) {
  clients[k] ??= await startPython(
    venv.python,
    'client',
    master.addr,
    master.dir,
    ['--segment-size', String(k === 0 ? pool : 0), '--threads', String(inflight), '--prefix', `c${k}`],
    `client-${k}`,
  )
  return clients[k]
}

/** One cell of every client at once, summed as bench-store sums its own clients. */
async function cell(kind, procs, { size, clients: count, inflight, seconds }) {
  const capacity = Math.floor(pool / count)
  const results = await Promise.all(
    procs.map((p) => p.call({ op: 'cell', kind, size, threads: inflight, seconds, capacity, verify_every: verifyEvery })),
  )
  const errors = results.reduce((sum, r) => sum + r.errors, 0)
  const ops = results.reduce((sum, r) => sum + r.ops, 0)
  if (errors) throw new Error(`${errors} of ${ops} ${kind}s of ${size} bytes failed (${count} clients)`)
  if (!ops) throw new Error(`no ${kind} of ${size} bytes completed (${count} clients)`)
  const elapsed = Math.max(...results.map((r) => r.seconds))
  const p50 = results.map((r) => r.p50_us).sort((a, b) => a - b)
  const opsPerSec = ops / elapsed
  return {
    row: {
      system: 'mooncake-wheel',
      clients: count,
      op: kind,
      size,
      gbps: (opsPerSec * size) / 1e9,
      opsPerSec,
      p50Us: p50[Math.floor(p50.length / 2)],
      p99Us: Math.max(...results.map((r) => r.p99_us)),
    },
    verified: results.reduce((sum, r) => sum + r.verified, 0),
  }
}

for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue
  try {
    const request = JSON.parse(line)
    const { size, clients: count, inflight, seconds } = request
    if (![size, count, inflight, seconds].every((n) => Number.isFinite(n) && n > 0)) throw new Error(`not a request: ${line}`)
    const procs = []
    for (let k = 0; k < count; k++) procs.push(await client(k, inflight))
    const put = await cell('put', procs, request)
    const get = await cell('get', procs, request)
    if (master.child.exitCode !== null || master.child.signalCode !== null) throw new Error(`mooncake_master exited (log in ${path.join(master.dir, 'master.log')})`)
    answer({ rows: [put.row, get.row], verified: put.verified + get.verified })
  } catch (error) {
    answer({ error: error.message })
    process.exit(1)
  }
}

// Nodes and clients leave on end of input; the master and whatever still runs after a moment are killed.
await finish([...clients, ...nodes].map((p) => p.child))
cleanup()
