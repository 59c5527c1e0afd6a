import test from 'ava'

import { TransferEngine } from '../src'
import { etcdInstalled, startEtcd } from './fixtures/etcd'
import { pattern, startPeer, stopPeer } from './helpers'

const etcdTest = etcdInstalled ? test : test.skip

etcdTest('engines find each other through etcd, and survive a member dying', async (t) => {
  const etcd = await startEtcd(3)
  t.teardown(() => etcd.close())
  const metadata = `etcd://${etcd.endpoints.join(',')}`
  const peer = await startPeer({ size: 1 << 20, seed: 5, metadata: etcd.connectionString, localServerName: 'etcd-peer' })
  const engine = await TransferEngine.create({ localServerName: 'etcd-local', metadata, ipOrHostName: '127.0.0.1', protocol: 'tcp' })
  try {
    const segment = await engine.openSegment('etcd-peer')
    const local = engine.allocate(1 << 20)
    await engine.read(segment, local, segment.buffers[0].address)
    t.true(local.equals(pattern(5, 0, 1 << 20)), '1 MiB read through a segment found in etcd')

    await etcd.kill(0)
    const again = await TransferEngine.create({ localServerName: 'etcd-late', metadata, ipOrHostName: '127.0.0.1', protocol: 'tcp' })
    try {
      const seen = await again.openSegment('etcd-peer')
      const back = again.allocate(1 << 20)
      await again.read(seen, back, seen.buffers[0].address)
      t.true(back.equals(pattern(5, 0, 1 << 20)), 'still found with one member of three dead')
    } finally {
      await again.close()
    }
  } finally {
    await engine.close()
    await stopPeer(peer)
  }
})

etcdTest('a dead etcd is ERR_METADATA, not a hang', async (t) => {
  const etcd = await startEtcd(1)
  const endpoints = etcd.connectionString
  await etcd.close()
  const started = Date.now()
  await t.throwsAsync(TransferEngine.create({ localServerName: 'x', metadata: endpoints, ipOrHostName: '127.0.0.1' }), {
    code: 'ERR_METADATA',
  } as never)
  t.true(Date.now() - started < 15_000, `took ${Date.now() - started} ms`)
})
