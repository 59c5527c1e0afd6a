// `npm run bench:mooncake-master`: our master against Mooncake's own `mooncake_master` (from the
// pinned PyPI wheel), both driven by Mooncake's Python client in the same run. Ours runs durable:
// --data-dir in a fresh temporary directory, so every acknowledged write is fsync'd first.
//
// Identical topology for each master: one Python node process mounting a segment (1 GiB) that
// holds every object, and one Python client process mounting none, whose threads share one
// MooncakeDistributedStore and put or get objects of one size for --seconds per cell. So every
// byte crosses processes over the Transfer Engine (TCP, P2PHANDSHAKE metadata). Keys are unique
// per put; the store is emptied between passes (remove_all with force). A sample of gets, and of
// puts read back, is compared byte for byte; a wrong byte aborts the bench. Cells alternate
// between the masters, in swapped order each round; the table shows medians over the rounds.
// Every process starts under the same `nice` level.
//
//   npm run bench:mooncake-master -- [--rounds 3] [--seconds 2] [--threads 4] [--sizes 64KiB,1MiB]
//       [--segment-size 1GiB] [--verify-every 16] [--nice 10] [--json] [--keep-logs]
//       [--ours-in-memory]   (ours without --data-dir: what durability costs)
//       [--no-build]         (the mooncake-master already built, as it is)
//
// BENCH_REPEAT and BENCH_SECONDS set the defaults of --rounds and --seconds. MOONCAKE_PY_VENV
// picks the virtual environment holding the wheel (default target/mooncake-py-venv, made when
// missing); CARGO_TARGET_DIR is honoured for our build.
import { execFileSync, spawnSync } from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'
import { parseArgs } from 'node:util'

import { WHEEL, root, session, tail, theirMaster, wheel } from './mooncake-wheel.mjs'

const KiB = 1 << 10
const MiB = 1 << 20
const GiB = 1 << 30
const parseSize = (text) => {
  const match = /^(\d+)\s*(k|m|g)?i?b?$/i.exec(text.trim())
  if (!match) throw new Error(`not a size: ${text}`)
  return Number(match[1]) * ({ k: KiB, m: MiB, g: GiB }[(match[2] ?? '').toLowerCase()] ?? 1)
}
const showSize = (n) =>
  n % GiB === 0 ? `${n / GiB} GiB` : n % MiB === 0 ? `${n / MiB} MiB` : n % KiB === 0 ? `${n / KiB} KiB` : `${n} B`

const { values: opts } = parseArgs({
  options: {
    rounds: { type: 'string', default: process.env.BENCH_REPEAT ?? '3' },
    seconds: { type: 'string', default: process.env.BENCH_SECONDS ?? '2' },
    threads: { type: 'string', default: '4' },
    sizes: { type: 'string', default: '64KiB,1MiB' },
    'segment-size': { type: 'string', default: '1GiB' },
    'verify-every': { type: 'string', default: '16' },
    nice: { type: 'string', default: '10' },
    json: { type: 'boolean', default: false },
    'keep-logs': { type: 'boolean', default: false },
    'ours-in-memory': { type: 'boolean', default: false },
    'no-build': { type: 'boolean', default: false },
  },
})
const rounds = Number(opts.rounds)
const seconds = Number(opts.seconds)
const threads = Number(opts.threads)
const sizes = opts.sizes.split(',').map(parseSize)
const segmentSize = parseSize(opts['segment-size'])
const verifyEvery = Number(opts['verify-every'])
const niceness = String(Number(opts.nice))
const inMemory = opts['ours-in-memory']
const ops = ['put', 'get']
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const log = (text) => process.stderr.write(text)

const { scratch, startMaster, startPython, finish, cleanup, keepLogs } = session({ prefix: 'mooncake-master-bench-', niceness, log })

// ---- our master

function buildOurs() {
  if (!opts['no-build']) {
    log('cargo build --release -p mooncake-store --bin mooncake-master\n')
    execFileSync('cargo', ['build', '--release', '-p', 'mooncake-store', '--bin', 'mooncake-master'], {
      cwd: root,
      stdio: ['ignore', 'inherit', 'inherit'],
    })
  }
  const target = process.env.CARGO_TARGET_DIR ? path.resolve(root, process.env.CARGO_TARGET_DIR) : path.join(root, 'target')
  return path.join(target, 'release/mooncake-master')
}

// ---- the run

const began = Date.now()
const venv = wheel()
const oursBinary = buildOurs()
if (!fs.existsSync(oursBinary)) throw new Error(`${oursBinary} is missing after the build`)

const masters = {
  theirs: await startMaster('theirs', theirMaster(venv.master), 2),
  ours: await startMaster(
    'ours',
    ([grpc, metrics, mooncake], attempt) => ({
      port: mooncake,
      argv: [
        oursBinary,
        '--rpc-address',
        '127.0.0.1',
        '--rpc-port',
        String(grpc),
        '--metrics-port',
        String(metrics),
        '--mooncake-rpc-port',
        String(mooncake),
        ...(inMemory ? [] : ['--data-dir', path.join(scratch, `ours-${attempt}`, 'data')]),
      ],
    }),
    3,
  ),
}

const sides = {}
for (const [name, master] of Object.entries(masters)) {
  const node = await startPython(venv.python, 'node', master.addr, master.dir, ['--segment-size', String(segmentSize)])
  const client = await startPython(venv.python, 'client', master.addr, master.dir, ['--segment-size', String(segmentSize), '--threads', String(threads)])
  sides[name] = { node, client }
}
// fsync costs what the file system under the temporary directory makes it cost (next to nothing on tmpfs).
const dataFs = inMemory ? null : spawnSync('stat', ['-f', '-c', '%T', scratch], { encoding: 'utf8' }).stdout?.trim() || 'unknown'
const oursLabel = inMemory ? 'ours in memory (no --data-dir)' : `ours with --data-dir (fsync'd log, on ${dataFs})`
log(`masters: theirs ${masters.theirs.addr}, ours ${masters.ours.addr}${inMemory ? '' : ` (data in ${masters.ours.dir}/data)`}\n`)

// A master's CPU time so far (user + system), in ms, from /proc: what serving a cell cost it.
const ticksPerSecond = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout) || 100
const cpuMs = (pid) => {
  const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ')
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / ticksPerSecond
}

const cells = []
for (const size of sizes) for (const op of ops) cells.push({ op, size, theirs: [], ours: [] })
const order = ['theirs', 'ours']
for (let round = 0; round < rounds; round++) {
  for (const cell of cells) {
    for (const name of round % 2 === 0 ? order : [...order].reverse()) {
      const pid = masters[name].child.pid
      const cpuBefore = cpuMs(pid)
      const result = await sides[name].client.call({
        op: 'cell',
        kind: cell.op,
        size: cell.size,
        threads,
        seconds,
        capacity: segmentSize,
        verify_every: verifyEvery,
      })
      result.master_cpu_ms = cpuMs(pid) - cpuBefore
      cell[name].push(result)
      log('.')
    }
  }
  log(rounds > 1 ? ` round ${round + 1}/${rounds}\n` : '\n')
}

for (const master of Object.values(masters)) {
  if (master.child.exitCode !== null || master.child.signalCode !== null) {
    keepLogs()
    throw new Error(`a master exited during the run; logs kept in ${scratch}\n${tail(master.child.logFile)}`)
  }
}
// Clients and nodes leave on end of input; whatever is still running after a moment is killed.
await finish(Object.values(sides).flatMap(({ node, client }) => [client.child, node.child]))
if (opts['keep-logs']) {
  keepLogs()
  log(`logs kept in ${scratch}\n`)
}
cleanup()

const summarize = (results) => ({
  opsPerSec: median(results.map((r) => r.ops_per_s)),
  p50Us: median(results.map((r) => r.p50_us)),
  p99Us: median(results.map((r) => r.p99_us)),
  // Includes the untimed work of a cell (filling, reading back, emptying), for both alike.
  masterCpuUsPerOp: median(results.map((r) => (r.master_cpu_ms * 1000) / r.ops)),
  errors: results.reduce((sum, r) => sum + r.errors, 0),
  verified: results.reduce((sum, r) => sum + r.verified, 0),
  rounds: results.map((r) => ({ opsPerSec: r.ops_per_s, p50Us: r.p50_us, p99Us: r.p99_us, ops: r.ops, errors: r.errors, masterCpuMs: r.master_cpu_ms })),
})
const rows = cells.map((cell) => {
  const theirs = summarize(cell.theirs)
  const ours = summarize(cell.ours)
  return {
    op: cell.op,
    size: cell.size,
    theirs,
    ours,
    opsRatio: ours.opsPerSec / theirs.opsPerSec,
    p50Ratio: ours.p50Us / theirs.p50Us,
  }
})
const wallSeconds = (Date.now() - began) / 1000

if (opts.json) {
  console.log(
    JSON.stringify(
      {
        config: { rounds, seconds, threads, sizes, segmentSize, verifyEvery, nice: Number(niceness), wheel: WHEEL.version, ours: oursLabel },
        rows,
        wallSeconds,
      },
      null,
      2,
    ),
  )
} else {
  console.log(
    `Mooncake's Python client, ${threads} threads in one process, against mooncake_master ${WHEEL.version} (theirs) and ${oursLabel}; ` +
      `TCP to a ${showSize(segmentSize)} segment in another process; ${seconds} s per cell; median of ${rounds}; nice ${niceness}`,
  )
  console.log('')
  const head = ['op', 'size', 'theirs ops/s', 'ours ops/s', 'ours/theirs', 'theirs p50 µs', 'ours p50 µs', 'ours/theirs', 'theirs CPU µs/op', 'ours CPU µs/op']
  const widths = [3, 7, 12, 10, 11, 13, 11, 11, 16, 14]
  const line = (cols) => cols.map((c, i) => (i < 2 ? String(c).padEnd(widths[i]) : String(c).padStart(widths[i]))).join('  ')
  console.log(line(head))
  for (const row of rows) {
    console.log(
      line([
        row.op,
        showSize(row.size),
        row.theirs.opsPerSec.toFixed(0),
        row.ours.opsPerSec.toFixed(0),
        row.opsRatio.toFixed(2),
        row.theirs.p50Us.toFixed(0),
        row.ours.p50Us.toFixed(0),
        row.p50Ratio.toFixed(2),
        row.theirs.masterCpuUsPerOp.toFixed(0),
        row.ours.masterCpuUsPerOp.toFixed(0),
      ]),
    )
  }
  const errors = rows.filter((r) => r.theirs.errors || r.ours.errors)
  console.log('')
  for (const r of errors) {
    console.log(`errors: ${r.op} ${showSize(r.size)}: theirs ${r.theirs.errors}, ours ${r.ours.errors} (failed puts, or gets of nothing)`)
  }
  console.log("CPU µs/op: the master's own CPU time over a cell (its untimed filling, reading back and emptying too), per timed op")
  const verified = rows.reduce((sum, r) => sum + r.theirs.verified + r.ours.verified, 0)
  console.log(`${verified} values compared byte for byte, all equal; ${wallSeconds.toFixed(0)} s in all`)
}
