// `npm run bench`: the transfer engine against baselines measured in the same run, on the same
// machine: TCP against a raw TCP socket pump between two processes, shared memory against a
// single-threaded memcpy of the same blocks over DRAM-resident buffers. Every figure is the
// median of BENCH_REPEAT runs of BENCH_SECONDS each. `--chart out.svg` (or BENCH_CHART) also
// draws GB/s by block size, engine and baselines, as an SVG.
//
//   BENCH_SECONDS=3 BENCH_REPEAT=3 npm run bench -- --chart transfer.svg
import { spawn, execFileSync } from 'node:child_process'
import { once } from 'node:events'
import { writeFileSync } from 'node:fs'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'

import { renderChart } from '../dist/chart.js'
import { startProgress } from '../dist/progress.js'

const cli = fileURLToPath(new URL('../dist/cli.js', import.meta.url))
const seconds = Number(process.env.BENCH_SECONDS ?? 3)
const repeat = Number(process.env.BENCH_REPEAT ?? 3)
const bufferSize = process.env.BENCH_BUFFER ?? '256MiB'
const { values: args } = parseArgs({ options: { chart: { type: 'string', default: process.env.BENCH_CHART ?? '' } }, strict: true })

const MiB = 1 << 20
const KiB = 1 << 10
const loads = [
  { block: MiB, batch: 8, threads: 4 },
  { block: 64 * KiB, batch: 32, threads: 4 },
]

async function withTarget(command, body) {
  const target = spawn(process.execPath, [cli, command, '--mode', 'target', '--buffer-size', bufferSize, '--json'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  try {
    const [line] = await once(createInterface({ input: target.stdout }), 'line')
    return await body(JSON.parse(line).segment)
  } finally {
    target.kill('SIGTERM')
    await once(target, 'exit')
  }
}

function run(command, args) {
  const out = execFileSync(process.execPath, [cli, command, '--json', '--buffer-size', bufferSize, '--duration', String(seconds), ...args], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  return JSON.parse(out.trim().split('\n').pop())
}

const initiator = (command, args) => run(command, ['--mode', 'initiator', ...args])
const size = (b) => (b >= MiB ? `${b / MiB} MiB` : `${b / KiB} KiB`)
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

const rows = []
let done = 0
let phase = ''
const progress = startProgress({ total: 2 * loads.length * repeat, unit: 'rounds', enabled: true }, () => ({ done, phase }))
for (const op of ['write', 'read']) {
  for (const { block, batch, threads } of loads) {
    phase = `${op}, ${size(block)} blocks`
    const load = ['--op', op, '--block-size', String(block), '--batch-size', String(batch), '--threads', String(threads)]
    const row = { op, block, raw: [], tcp: [], p50: [], p99: [], viaJs: [], memcpy: [], shm: [], shmP50: [] }
    for (let i = 0; i < repeat; i++) {
      row.raw.push((await withTarget('bench-raw', (addr) => initiator('bench-raw', ['--segment', addr, ...load]))).gbps)
      const tcp = await withTarget('bench', (segment) => initiator('bench', ['--segment', segment, '--protocol', 'tcp', ...load]))
      row.tcp.push(tcp.gbps)
      row.p50.push(tcp.p50Us)
      row.p99.push(tcp.p99Us)
      if (block === MiB) {
        const viaJs = await withTarget('bench', (segment) => initiator('bench', ['--segment', segment, '--protocol', 'tcp', '--via-js', ...load]))
        row.viaJs.push(viaJs.gbps)
      }
      row.memcpy.push(run('bench-memcpy', ['--block-size', String(block)]).gbps)
      const shm = await withTarget('bench', (segment) => initiator('bench', ['--segment', segment, '--protocol', 'shm', ...load]))
      row.shm.push(shm.gbps)
      row.shmP50.push(shm.p50Us)
      done++
    }
    rows.push(row)
  }
}
progress.stop()

const gb = (x) => (x === undefined ? '    -' : x.toFixed(2).padStart(5))
const ratio = (a, b) => (a === undefined || b === undefined ? '   -' : (a / b).toFixed(2).padStart(4))
console.log(`loopback, two processes; median of ${repeat} x ${seconds}s; GB/s (10^9 B/s); buffers ${bufferSize}`)
console.log('')
console.log('TCP transport vs raw TCP socket pump')
console.log('op     block    raw    tcp   tcp/raw  p50 µs  p99 µs  via-js  js/rust')
for (const r of rows) {
  const [raw, tcp, viaJs] = [median(r.raw), median(r.tcp), r.viaJs.length ? median(r.viaJs) : undefined]
  console.log(
    `${r.op.padEnd(6)} ${size(r.block).padEnd(8)} ${gb(raw)}  ${gb(tcp)}   ${ratio(tcp, raw)}  ${median(r.p50).toFixed(0).padStart(6)}  ${median(r.p99).toFixed(0).padStart(6)}   ${gb(viaJs)}   ${ratio(viaJs, tcp)}`,
  )
}
console.log('')
console.log('shared-memory transport vs single-threaded memcpy (and vs the TCP transport)')
console.log('op     block    memcpy  shm   shm/memcpy  shm/tcp  p50 µs')
for (const r of rows) {
  const [memcpy, shm, tcp] = [median(r.memcpy), median(r.shm), median(r.tcp)]
  console.log(
    `${r.op.padEnd(6)} ${size(r.block).padEnd(8)} ${gb(memcpy)}  ${gb(shm)}     ${ratio(shm, memcpy)}      ${ratio(shm, tcp)}  ${median(r.shmP50).toFixed(0).padStart(6)}`,
  )
}
console.log('')
console.log('targets: tcp/raw >= 0.80 at 1 MiB, >= 0.60 at 64 KiB; js/rust >= 0.90 at 1 MiB; shm/memcpy >= 0.85 and shm/tcp >= 2 at 1 MiB')

if (args.chart) {
  const series = [
    ['raw TCP socket pump', 'raw'],
    ['engine over TCP', 'tcp'],
    ['engine over TCP, driven from JS', 'viaJs'],
    ['memcpy, one thread', 'memcpy'],
    ['engine over shared memory', 'shm'],
  ]
  const panels = ['write', 'read'].map((op) => ({
    title: op,
    series: series.map(([name, key]) => ({
      name,
      points: rows.filter((r) => r.op === op && r[key].length).map((r) => ({ x: r.block, y: median(r[key]) })),
    })),
  }))
  writeFileSync(
    args.chart,
    renderChart({
      title: 'Transfer engine vs baselines: throughput by block size',
      subtitle: `loopback, two processes; median of ${repeat} x ${seconds}s; buffers ${bufferSize}`,
      xLabel: 'block size',
      yLabel: 'GB/s (10^9 B/s)',
      panels,
    }),
  )
  console.log(`chart: ${args.chart}`)
}
