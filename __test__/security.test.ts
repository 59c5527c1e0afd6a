import { execFileSync, spawn } from 'node:child_process'
import { once } from 'node:events'
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { createInterface } from 'node:readline'

import test from 'ava'

import { MasterServer, MooncakeError, MooncakeStore, startMetadataServer, TransferEngine, type MooncakeErrorCode } from '../src'
import { pattern } from './helpers'

const CLUSTER = 'cluster-token-of-the-security-test'
const ADMIN = 'admin-token-of-the-security-test'

async function rejectsWith(t: import('ava').ExecutionContext, promise: Promise<unknown>, code: MooncakeErrorCode): Promise<void> {
  const error = await t.throwsAsync(promise)
  t.true(error instanceof MooncakeError, String(error))
  t.is((error as MooncakeError).code, code, error?.message)
}

test('a master with a cluster token serves only clients that prove it; removing everything needs the admin token', async (t) => {
  const master = await MasterServer.start({
    rpcPort: 0,
    metricsPort: -1,
    httpMetadataServer: true,
    httpMetadataPort: 0,
    clusterToken: CLUSTER,
    adminToken: ADMIN,
  })
  const base = { masterAddress: master.address, metadata: master.metadataUrl!, ipOrHostName: '127.0.0.1' }
  const stores: MooncakeStore[] = []
  try {
    const member = await MooncakeStore.connect({ ...base, localServerName: 'member', globalSegmentSize: 4 << 20, clusterToken: CLUSTER })
    stores.push(member)
    const value = pattern(1, 0, 100_000)
    await member.put('k', value)
    t.true((await member.get('k')).equals(value))

    await rejectsWith(t, MooncakeStore.connect({ ...base, localServerName: 'stranger', globalSegmentSize: 0, clusterToken: '' }), 'ERR_UNAUTHENTICATED')
    await rejectsWith(
      t,
      MooncakeStore.connect({ ...base, localServerName: 'forger', globalSegmentSize: 0, clusterToken: 'not-the-token-of-this-cluster' }),
      'ERR_UNAUTHENTICATED',
    )
    await rejectsWith(t, member.removeAll({ force: true }), 'ERR_PERMISSION_DENIED')
    t.true((await member.get('k')).equals(value), 'a refused removeAll removed nothing')

    const admin = await MooncakeStore.connect({ ...base, localServerName: 'admin', globalSegmentSize: 0, clusterToken: CLUSTER, adminToken: ADMIN })
    stores.push(admin)
    t.is(await admin.removeAll({ force: true }), 1, 'the object is leased by the get above')
  } finally {
    await Promise.all(stores.map((s) => s.close()))
    await master.close()
  }
})

test('engines with a token move bytes between each other and refuse peers without it', async (t) => {
  const engines: TransferEngine[] = []
  const engine = async (clusterToken: string) => {
    const e = await TransferEngine.create({ localServerName: '127.0.0.1', metadata: 'P2PHANDSHAKE', clusterToken, protocol: 'tcp' })
    engines.push(e)
    return e
  }
  try {
    const target = await engine(CLUSTER)
    const remote = target.allocate(1 << 20)
    const friend = await engine(CLUSTER)
    const local = friend.allocate(1 << 20)
    local.set(pattern(2, 0, 1 << 20))
    const segment = await friend.openSegment(target.segmentName)
    await friend.write(segment, local, segment.buffers[0].address)
    t.true(remote.equals(local))

    // A peer with a token hangs up on one without (nothing to say in Mooncake's framing).
    const stranger = await engine('')
    await rejectsWith(t, stranger.openSegment(target.segmentName), 'ERR_SOCKET')
    const forger = await engine('the-token-of-another-cluster')
    await rejectsWith(t, forger.openSegment(target.segmentName), 'ERR_UNAUTHENTICATED')
    t.true(remote.equals(local), 'nothing was overwritten')
  } finally {
    await Promise.all(engines.map((e) => e.close()))
  }
})

test('a metadata server with a token takes entries only from engines that hold it', async (t) => {
  const metadata = await startMetadataServer({ clusterToken: CLUSTER })
  const engines: TransferEngine[] = []
  try {
    engines.push(await TransferEngine.create({ localServerName: 'member', metadata: metadata.url, clusterToken: CLUSTER }))
    for (const [name, clusterToken] of [['stranger', ''], ['forger', 'the-token-of-another-cluster']]) {
      await rejectsWith(t, TransferEngine.create({ localServerName: name, metadata: metadata.url, clusterToken }), 'ERR_UNAUTHENTICATED')
    }
  } finally {
    await Promise.all(engines.map((e) => e.close()))
    await metadata.close()
  }
})

test('the metadata server refuses unauthenticated writes and keeps answering reads', async (t) => {
  const metadata = await startMetadataServer({ clusterToken: CLUSTER })
  try {
    const url = `${metadata.url}?key=${encodeURIComponent('mooncake/ram/x')}`
    const put = await fetch(url, { method: 'PUT', body: '{"name":"x"}' })
    t.is(put.status, 401)
    const del = await fetch(url, { method: 'DELETE' })
    t.is(del.status, 401)
    const get = await fetch(url)
    t.is(get.status, 404, 'nothing was written')
  } finally {
    await metadata.close()
  }
})

const CLI = resolve(__dirname, '../dist/cli.js')

test('serve makes a cluster token on first start, mode 0600, and uses it again on the next', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'mooncake-serve-'))
  const tokenFile = join(dir, 'cluster-token')
  const serveOnce = async (): Promise<string> => {
    const child = spawn(
      process.execPath,
      [CLI, 'serve', '--no-data-dir', '--token-file', tokenFile, '--rpc-port', '0', '--metrics-port', '0', '--metadata-port', '0', '--global-segment-size', '16MiB'],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    )
    const lines: string[] = []
    for await (const line of createInterface({ input: child.stdout! })) {
      lines.push(line)
      if (line.startsWith('serving')) break
    }
    child.kill('SIGTERM')
    await once(child, 'exit')
    return lines.join('\n')
  }
  try {
    const first = await serveOnce()
    const token = readFileSync(tokenFile, 'utf8').trim()
    t.regex(token, /^[0-9a-f]{64}$/)
    t.is(statSync(tokenFile).mode & 0o777, 0o600)
    t.true(first.includes(token), first)
    t.true(first.includes('made and written to'), first)
    const second = await serveOnce()
    t.true(second.includes('read from'), second)
    t.is(readFileSync(tokenFile, 'utf8').trim(), token)
    t.regex(execFileSync(process.execPath, [CLI, 'token'], { encoding: 'utf8' }).trim(), /^[0-9a-f]{64}$/)
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})
