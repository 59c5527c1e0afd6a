// `npm run bench`: the transfer engine against a raw TCP socket pump, same block sizes, same
// machine, same run. Every figure is the median of BENCH_REPEAT runs of BENCH_SECONDS each.
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

function initiator(command, args) {
  const out = execFileSync(process.execPath, [cli, command, '--mode', 'initiator', '--json', '--buffer-size', bufferSize, '--duration', String(seconds), ...args], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  return JSON.parse(out.trim().split('\n').pop())
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.floor(s.length / 2)]
}

const runs = []
for (const op of ['write', 'read']) {
  for (const { block, batch, threads } of loads) {
    const load = ['--op', op, '--block-size', String(block), '--batch-size', String(batch), '--threads', String(threads)]
    const row = { op, block, raw: [], engine: [], viaJs: [], p50: [], p99: [] }
    for (let i = 0; i < repeat; i++) {
      row.raw.push((await withTarget('bench-raw', (addr) => initiator('bench-raw', ['--segment', addr, ...load]))).gbps)
      const report = await withTarget('bench', (segment) => initiator('bench', ['--segment', segment, ...load]))
      row.engine.push(report.gbps)
      row.p50.push(report.p50Us)
      row.p99.push(report.p99Us)
      if (block === MiB) {
        row.viaJs.push((await withTarget('bench', (segment) => initiator('bench', ['--segment', segment, '--via-js', ...load]))).gbps)
      }
      process.stderr.write('.')
    }
    runs.push(row)
  }
}
process.stderr.write('\n')

const fmt = (x) => (x === undefined ? '   -  ' : x.toFixed(2).padStart(6))
const size = (b) => (b >= MiB ? `${b / MiB} MiB` : `${b / KiB} KiB`)
console.log(`transfer engine (tcp, loopback, two processes) vs raw TCP socket pump; median of ${repeat} x ${seconds}s, GB/s`)
console.log('op     block    raw pump  engine  ratio   p50 µs   p99 µs   via-js  js/rust')
for (const r of runs) {
  const raw = median(r.raw)
  const engine = median(r.engine)
  const viaJs = r.viaJs.length ? median(r.viaJs) : undefined
  console.log(
    `${r.op.padEnd(6)} ${size(r.block).padEnd(8)} ${fmt(raw)}   ${fmt(engine)}  ${(engine / raw).toFixed(2).padStart(5)}  ` +
      `${median(r.p50).toFixed(0).padStart(7)}  ${median(r.p99).toFixed(0).padStart(7)}   ${fmt(viaJs)}  ` +
      `${viaJs === undefined ? '   -' : (viaJs / engine).toFixed(2).padStart(5)}`,
  )
}
console.log('targets: engine/raw >= 0.80 at 1 MiB and >= 0.60 at 64 KiB; via-js/rust >= 0.90 at 1 MiB')
