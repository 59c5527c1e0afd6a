// Several processes hammer a small shared key set with random puts, upserts, gets, batches and
// removals, over TCP and shared memory, with self-describing values; every read is verified.
// MOONCAKE_TORTURE_SECONDS sets the length (default 40; the long run: 600).
import { once } from 'node:events'
import { createInterface } from 'node:readline'

import test from 'ava'

import { MasterServer } from '../src'
import { CONTENDED_STORE_CODES, runFixture, type TortureReport as Report } from './helpers'

const SECONDS = Number(process.env.MOONCAKE_TORTURE_SECONDS ?? 40)

test('four processes of random operations never read a wrong byte', async (t) => {
  t.timeout((SECONDS + 90) * 1000)
  // Short leases: more reads outlive theirs and take the re-validation path.
  const master = await MasterServer.start({ rpcPort: 0, metricsPort: -1, httpMetadataServer: true, httpMetadataPort: 0, defaultKvLeaseTtlMs: 1000 })
  try {
    const workers = Array.from({ length: 4 }, (_, worker) =>
      runFixture('torture-worker.ts', [
        JSON.stringify({
          masterAddress: master.address,
          metadata: master.metadataUrl,
          name: `torture-${worker}-${process.pid}`,
          worker,
          protocol: worker < 2 ? 'tcp' : 'auto',
          seconds: SECONDS,
          keys: 16,
          inFlight: 4,
        }),
      ]),
    )
    const lines = workers.map((child) => createInterface({ input: child.stdout! }))
    await Promise.all(lines.map((l) => once(l, 'line')))
    for (const child of workers) child.stdin!.write('go\n')
    const reports = await Promise.all(
      workers.map(async (child, i) => {
        const [[line], [code]] = (await Promise.all([once(lines[i], 'line'), once(child, 'exit')])) as [[string], [number]]
        t.is(code, 0)
        return JSON.parse(line) as Report
      }),
    )
    const total = (f: (r: Report) => number): number => reports.reduce((n, r) => n + f(r), 0)
    const codes: Record<string, number> = {}
    for (const r of reports) for (const [code, n] of Object.entries(r.codes)) codes[code] = (codes[code] ?? 0) + n
    t.log(`${total((r) => r.ops)} ops, ${total((r) => r.reads)} reads verified byte for byte, ${total((r) => r.wrong.length)} wrong; codes ${JSON.stringify(codes)}`)
    t.deepEqual(reports.flatMap((r) => r.wrong), [], 'no read returned a wrong byte')
    t.true(total((r) => r.verified) > 100, 'the run read enough to mean something')
    t.deepEqual(Object.keys(codes).filter((c) => !CONTENDED_STORE_CODES.has(c)), [], 'only the codes a busy store answers')
  } finally {
    await master.close()
  }
})
