import { spawnSync } from 'node:child_process'
import { join } from 'node:path'

import test from 'ava'

import { MooncakeError, TransferEngine } from '../src'

const CLI = join(__dirname, '..', 'dist', 'cli.js')

function engine(options: Partial<Parameters<typeof TransferEngine.create>[0]> = {}): Promise<TransferEngine> {
  return TransferEngine.create({ localServerName: '127.0.0.1', metadata: 'P2PHANDSHAKE', protocol: 'tcp', ...options })
}

test('topology() is the discovered priority matrix, transports() what is active', async (t) => {
  const plain = await engine()
  const noShm = await engine({ sharedMemory: false })
  try {
    const matrix = plain.topology()
    t.true('cpu:0' in matrix, JSON.stringify(matrix))
    for (const [preferred, available] of Object.values(matrix)) {
      t.true(Array.isArray(preferred) && Array.isArray(available))
    }
    t.deepEqual(plain.transports(), ['tcp', 'shm'])
    t.deepEqual(noShm.transports(), ['tcp'])
  } finally {
    await plain.close()
    await noShm.close()
  }
})

test('a custom matrix replaces the discovered one; a malformed one is refused', async (t) => {
  const custom = { 'cpu:0': [['mlx5_0'], ['mlx5_1']], 'cuda:0': [['mlx5_1'], ['mlx5_0']] } as const
  const given = await engine({ topology: { 'cpu:0': [['mlx5_0'], ['mlx5_1']], 'cuda:0': [['mlx5_1'], ['mlx5_0']] } })
  try {
    t.deepEqual(given.topology(), custom)
  } finally {
    await given.close()
  }
  const restricted = await engine({ topology: JSON.stringify(custom), devices: ['mlx5_1'] })
  try {
    t.deepEqual(restricted.topology(), { 'cpu:0': [[], ['mlx5_1']], 'cuda:0': [['mlx5_1'], []] })
  } finally {
    await restricted.close()
  }
  const error = await t.throwsAsync(engine({ topology: '{"cpu:0": [["mlx5_0"]]}' }))
  t.true(error instanceof MooncakeError)
  t.is((error as MooncakeError).code, 'ERR_MALFORMED_JSON')
  const empty = await t.throwsAsync(engine({ devices: [] }))
  t.is((empty as MooncakeError).code, 'ERR_INVALID_ARGUMENT')
})

test('with interfaces listed, transfers take rails and railStats() reports them', async (t) => {
  const target = await engine({ devices: ['lo'], sharedMemory: false })
  const initiator = await engine({ devices: ['lo'], sharedMemory: false })
  try {
    const size = 8 << 20
    const remote = target.allocate(size)
    const segment = await initiator.openSegment(target.segmentName)
    const local = initiator.allocate(size)
    local.fill(7)
    await initiator.write(segment, local, target.addressOf(remote))
    t.true(remote.equals(local))
    const stats = Object.values(initiator.railStats()).flat()
    t.is(stats.length, 1, JSON.stringify(stats))
    t.is(stats[0].local, 'lo')
    t.is(stats[0].remote, 'lo')
    t.true(stats[0].usable)
    t.is(stats[0].bytes, size)
    t.is(stats[0].inflightBytes, 0)
  } finally {
    await initiator.close()
    await target.close()
  }
})

test('mooncake topology prints the host, and as JSON with the matrix', (t) => {
  const text = spawnSync(process.execPath, [CLI, 'topology'], { encoding: 'utf8' })
  t.is(text.status, 0, text.stderr)
  t.regex(text.stdout, /NUMA nodes/)
  t.regex(text.stdout, /Priority matrix/)
  const json = spawnSync(process.execPath, [CLI, 'topology', '--json'], { encoding: 'utf8' })
  t.is(json.status, 0, json.stderr)
  const report = JSON.parse(json.stdout) as { priority_matrix: Record<string, unknown>; topology: { numa_nodes: unknown[] } }
  t.true('cpu:0' in report.priority_matrix)
  t.true(report.topology.numa_nodes.length >= 1)
  const missing = spawnSync(process.execPath, [CLI, 'topology', '--root', '/no/such/root'], { encoding: 'utf8' })
  t.is(missing.status, 1)
  t.regex(missing.stderr, /ERR_INVALID_ARGUMENT/)
})
