import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import test from 'ava'

import { MasterServer, MooncakeStore } from '../src'
import { etcdInstalled, startEtcd } from './fixtures/etcd'
import { pattern } from './helpers'

const etcdTest = etcdInstalled ? test : test.skip

async function role(master: MasterServer): Promise<string> {
  const health = await fetch(master.metricsUrl!.replace(/\/metrics$/, '/health'))
  return ((await health.json()) as { role: string }).role
}

etcdTest('HA masters: a client that only knows etcd keeps every object when the leader stops', async (t) => {
  const etcd = await startEtcd(1)
  t.teardown(() => etcd.close())
  const ha = { host: '127.0.0.1', rpcPort: 0, metricsPort: 0, enableHa: true, etcdEndpoints: etcd.connectionString }
  const masters = [await MasterServer.start(ha), await MasterServer.start(ha)]
  const masterAddress = `etcd://${etcd.connectionString}`
  const store = { masterAddress, metadata: 'P2PHANDSHAKE', localServerName: '127.0.0.1', protocol: 'tcp' as const }
  const node = await MooncakeStore.connect({ ...store, globalSegmentSize: 16 << 20 })
  const client = await MooncakeStore.connect({ ...store, globalSegmentSize: 0 })
  try {
    const values = Array.from({ length: 20 }, (_, i) => pattern(100 + i, 0, 4096 + i))
    for (const [i, value] of values.entries()) await client.put(`ha/${i}`, value)
    const roles = await Promise.all(masters.map(role))
    t.deepEqual([...roles].sort(), ['leader', 'standby'])
    const leader = masters[roles.indexOf('leader')]
    const standby = masters[roles.indexOf('standby')]
    // A leader that stops hands over at once (it ends its lease); the standby has the log.
    await leader.close()
    for (const [i, value] of values.entries()) {
      t.true((await client.get(`ha/${i}`)).equals(value), `ha/${i} after the failover`)
    }
    t.is(await role(standby), 'leader')
    await client.put('ha/after', pattern(7, 0, 1000))
    t.true((await client.get('ha/after')).equals(pattern(7, 0, 1000)))
  } finally {
    await client.close()
    await node.close()
    for (const m of masters) await m.close()
  }
})

test('a master with a data directory serves its objects again after a restart', async (t) => {
  const dataDir = mkdtempSync(join(tmpdir(), 'mooncake-master-'))
  t.teardown(() => rmSync(dataDir, { recursive: true, force: true }))
  const options = { host: '127.0.0.1', rpcPort: 0, metricsPort: -1, dataDir }
  let master = await MasterServer.start(options)
  const port = Number(master.address.split(':')[1])
  const store = { masterAddress: master.address, metadata: 'P2PHANDSHAKE', localServerName: '127.0.0.1', protocol: 'tcp' as const }
  const node = await MooncakeStore.connect({ ...store, globalSegmentSize: 16 << 20 })
  try {
    const values = Array.from({ length: 10 }, (_, i) => pattern(200 + i, 0, 2048 + i))
    for (const [i, value] of values.entries()) await node.put(`disk/${i}`, value)
    await t.throwsAsync(MasterServer.start({ ...options, rpcPort: 0 }), { code: 'ERR_INVALID_ARGUMENT' } as never, 'one master per data directory')
    await master.close()
    master = await MasterServer.start({ ...options, rpcPort: port })
    // The node mounts again on its next ping; its objects are served once it has.
    const deadline = Date.now() + 10_000
    for (const [i, value] of values.entries()) {
      for (;;) {
        try {
          t.true((await node.get(`disk/${i}`)).equals(value), `disk/${i} after the restart`)
          break
        } catch (e) {
          if (Date.now() > deadline) throw e
          await new Promise((r) => setTimeout(r, 100))
        }
      }
    }
  } finally {
    await node.close()
    await master.close()
  }
})
