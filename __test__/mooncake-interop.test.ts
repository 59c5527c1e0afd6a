import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process'
import { createHash } from 'node:crypto'
import { existsSync, readdirSync } from 'node:fs'
import { connect, createServer, type AddressInfo } from 'node:net'
import { join, resolve } from 'node:path'
import { createInterface, type Interface } from 'node:readline'

import test from 'ava'

import { MasterServer, MooncakeError, MooncakeStore } from '../src'

// Mooncake's own Python client and master, from the venv the cargo tests make (npm test runs them
// first). Without it these tests are skipped, saying so.
const root = resolve(__dirname, '..')
const venv = process.env.MOONCAKE_PY_VENV ?? join(root, 'target', 'mooncake-py-venv')
const python = join(venv, 'bin', 'python')
const driver = join(root, 'crates', 'mooncake-testkit', 'python', 'mooncake_driver.py')
const wheel = existsSync(python) ? test.serial : test.serial.skip
const MiB = 1 << 20

/** The bytes Mooncake's driver writes for `key` (seed 0): SHA-256 blocks XOR'd with their index. */
function pattern(key: string, length: number): Buffer {
  const digest = createHash('sha256')
    .update(Buffer.concat([Buffer.from(key, 'utf8'), Buffer.from([0]), Buffer.alloc(8)]))
    .digest()
  const out = Buffer.alloc(length)
  for (let i = 0; i < length; i++) {
    const block = Math.floor(i / 32) >>> 0
    out[i] = digest[i % 32]! ^ ((block >>> (8 * (i % 4))) & 0xff)
  }
  return out
}

/** Mooncake's `MooncakeDistributedStore` in a Python process, one JSON command per line. */
class PyClient {
  private constructor(
    private readonly child: ChildProcessWithoutNullStreams,
    private readonly lines: Interface,
  ) {}

  static async start(master: string, segment: number): Promise<PyClient> {
    const child = spawn(python, [driver], { stdio: 'pipe' })
    child.stderr.resume()
    const client = new PyClient(child, createInterface({ input: child.stdout }))
    await client.call({ op: 'hello' })
    const setup = await client.call({ op: 'setup', master, global_segment_size: segment })
    if (setup.rc !== 0) throw new Error(`setup: ${JSON.stringify(setup)}`)
    return client
  }

  async call(command: Record<string, unknown>): Promise<Record<string, any>> {
    const reply = new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no reply to ${command.op}`)), 60_000)
      this.lines.once('line', (line) => {
        clearTimeout(timer)
        resolve(line)
      })
    })
    this.child.stdin.write(`${JSON.stringify(command)}\n`)
    const answer = JSON.parse(await reply) as Record<string, any>
    if (answer.error) throw new Error(`${command.op}: ${answer.error}`)
    return answer
  }

  async close(): Promise<void> {
    await this.call({ op: 'close' })
    this.child.stdin.write(`${JSON.stringify({ op: 'exit' })}\n`)
    this.child.kill('SIGKILL')
  }
}

async function freePort(): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  await new Promise((resolve) => server.close(resolve))
  return port
}

/** Mooncake's own `mooncake_master`, from the wheel. */
async function realMaster(): Promise<{ address: string; stop(): void }> {
  const site = join(venv, 'lib', readdirSync(join(venv, 'lib')).find((d) => d.startsWith('python'))!, 'site-packages')
  const [port, metrics] = [await freePort(), await freePort()]
  const child = spawn(
    join(site, 'mooncake', 'mooncake_master'),
    [
      '--rpc_address=127.0.0.1',
      `--rpc_port=${port}`,
      '--enable_http_metadata_server=false',
      '--metrics_host=127.0.0.1',
      `--metrics_port=${metrics}`,
    ],
    { stdio: 'ignore' },
  )
  const address = `127.0.0.1:${port}`
  for (let i = 0; i < 200; i++) {
    const up = await new Promise<boolean>((resolve) => {
      const probe = connect(port, '127.0.0.1')
      probe.once('connect', () => (probe.destroy(), resolve(true)))
      probe.once('error', () => resolve(false))
    })
    if (up) return { address, stop: () => child.kill('SIGKILL') }
    await new Promise((r) => setTimeout(r, 50))
  }
  child.kill('SIGKILL')
  throw new Error('mooncake_master did not start')
}

function client(masterAddress: string, globalSegmentSize: number): Promise<MooncakeStore> {
  return MooncakeStore.connect({
    masterAddress,
    metadata: 'P2PHANDSHAKE',
    localServerName: '127.0.0.1',
    globalSegmentSize,
    localBufferSize: 4 * MiB,
  })
}

wheel('a Python client and a TypeScript client share this master, each reading what the other wrote', async (t) => {
  const master = await MasterServer.start({ rpcPort: 0, metricsPort: -1, mooncakeRpcPort: 0 })
  t.truthy(master.mooncakeRpcAddress)
  const node = await PyClient.start(master.mooncakeRpcAddress!, 16 * MiB)
  const ts = await client(master.address, 0)
  try {
    t.is((await node.call({ op: 'put', key: 'py-1', size: MiB })).rc, 0)
    t.true((await ts.get('py-1')).equals(pattern('py-1', MiB)))

    // The TypeScript client has no segment: its replicas land in the Python node's.
    await ts.put('ts-1', pattern('ts-1', 300_000))
    t.deepEqual(await ts.batchPut(['ts-2', 'ts-3'], [pattern('ts-2', 10), pattern('ts-3', 70_000)]), [undefined, undefined])
    const got = await node.call({ op: 'get_batch', keys: ['ts-1', 'ts-2', 'ts-3'] })
    t.deepEqual(
      got.values.map((v: { len: number; ok: boolean }) => [v.len, v.ok]),
      [
        [300_000, true],
        [10, true],
        [70_000, true],
      ],
    )
    await ts.remove('ts-1', { force: true })
    t.is((await node.call({ op: 'is_exist', key: 'ts-1' })).rc, 0)
  } finally {
    await ts.close()
    await node.close()
    await master.close()
  }
})

wheel("a TypeScript client joins a pool run by Mooncake's own master (mooncake://)", async (t) => {
  const real = await realMaster()
  const address = `mooncake://${real.address}`
  const holder = await client(address, 16 * MiB)
  const ts = await client(address, 0)
  const node = await PyClient.start(real.address, 0)
  try {
    const keys = Array.from({ length: 20 }, (_, i) => `k-${i}`)
    const values = keys.map((k, i) => pattern(k, 100 + i * 5000))
    t.deepEqual(await ts.batchPut(keys, values), keys.map(() => undefined))
    const back = await holder.batchGet(keys)
    keys.forEach((k, i) => t.true(Buffer.isBuffer(back[i]) && (back[i] as Buffer).equals(values[i]!), k))
    t.deepEqual(await ts.batchExists(['k-1', 'nope']), [true, false])
    // Python reads what TypeScript wrote, from a TypeScript node's segment.
    const got = await node.call({ op: 'get', key: 'k-3' })
    t.deepEqual([got.len, got.ok], [15_100, true])
    await ts.remove('k-4', { force: true })
    const missing = await t.throwsAsync(ts.get('k-4'), { instanceOf: MooncakeError })
    t.is(missing?.code, 'ERR_OBJECT_NOT_FOUND')
  } finally {
    await node.close()
    await ts.close()
    await holder.close()
    real.stop()
  }
})

test("Mooncake's protocol next to a cluster token needs allowMooncakeClients", async (t) => {
  const clusterToken = 'a-cluster-token-of-enough-length-0123456789'
  const refused = await t.throwsAsync(MasterServer.start({ rpcPort: 0, metricsPort: -1, mooncakeRpcPort: 0, clusterToken }), {
    instanceOf: MooncakeError,
  })
  t.is(refused?.code, 'ERR_INVALID_ARGUMENT')
  t.regex(refused!.message, /allowMooncakeClients/)
  const master = await MasterServer.start({ rpcPort: 0, metricsPort: -1, mooncakeRpcPort: 0, clusterToken, allowMooncakeClients: true })
  t.truthy(master.mooncakeRpcAddress)
  await master.close()
})
