import test from 'ava'

import { startMetadataServer, TransferEngine } from '../src'
import { pattern, startPeer, stopPeer } from './helpers'

test('engines find each other through the HTTP metadata server', async (t) => {
  const server = await startMetadataServer()
  t.regex(server.url, /^http:\/\/127\.0\.0\.1:\d+\/metadata$/)
  const peer = await startPeer({ size: 1 << 20, seed: 2, metadata: server.url, localServerName: 'peer-node' })
  const engine = await TransferEngine.create({ localServerName: 'local-node', metadata: server.url, ipOrHostName: '127.0.0.1', protocol: 'tcp' })
  try {
    t.is(engine.segmentName, 'local-node')
    t.is(peer.segment, 'peer-node')
    const descriptor = await fetch(`${server.url}?key=${encodeURIComponent('mooncake/ram/peer-node')}`)
    t.is(descriptor.status, 200)
    const json = (await descriptor.json()) as { name: string; protocol: string; tcp_data_port: number; buffers: { addr: number }[] }
    t.is(json.name, 'peer-node')
    t.is(json.protocol, 'tcp')
    t.is(json.tcp_data_port, peer.dataPort)
    const rpc = (await (await fetch(`${server.url}?key=mooncake/rpc_meta/peer-node`)).json()) as { rpc_port: number }
    t.is(rpc.rpc_port, peer.rpcPort)

    const segment = await engine.openSegment('peer-node')
    const local = engine.allocate(1 << 20)
    await engine.read(segment, local, segment.buffers[0].address)
    t.true(local.equals(pattern(2, 0, 1 << 20)))
    const echoed = new Promise<{ message: string }>((resolve) => engine.once('notify', resolve))
    await engine.sendNotify('peer-node', 'over http metadata')
    t.is((await echoed).message, 'echo:over http metadata')
    await t.throwsAsync(engine.openSegment('nobody'), { code: 'ERR_METADATA' } as never)
  } finally {
    await engine.close()
    await stopPeer(peer)
  }
  const gone = await fetch(`${server.url}?key=mooncake/ram/peer-node`)
  t.is(gone.status, 404, 'a closed engine removes its descriptor')
  await server.close()
  await server.close()
})
