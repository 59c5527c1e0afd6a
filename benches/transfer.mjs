// `npm run bench`: the transfer engine against baselines measured in the same run, on the same
// machine: TCP against a raw TCP socket pump between two processes, shared memory against a
// single-threaded memcpy of the same blocks over DRAM-resident buffers. Every figure is the
// median of BENCH_REPEAT runs of BENCH_SECONDS each.
//
//   BENCH_SECONDS=3 BENCH_REPEAT=3 npm run bench
import { spawn, execFileSync } from 'node:child_process'
import { once } from 'node:events'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'

const cli = fileURLToPath(new URL('../dist/cli.js', import.meta.url))
const seconds = Number(process.env.BENCH_SECONDS ?? 3)
const repeat = Number(process.env.BENCH_REPEAT ?? 3)
const bufferSize = process.env.BENCH_BUFFER ?? '256MiB'

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
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

const rows = []
for (const op of ['write', 'read']) {
  for (const { block, batch, threads } of loads) {
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
      process.stderr.write('.')
    }
    rows.push(row)
  }
}
process.stderr.write('\n')

const gb = (x) => (x === undefined ? '    -' : x.toFixed(2).padStart(5))
const ratio = (a, b) => (a === undefined || b === undefined ? '   -' : (a / b).toFixed(2).padStart(4))
const size = (b) => (b >= MiB ? `${b / MiB} MiB` : `${b / KiB} KiB`)
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
