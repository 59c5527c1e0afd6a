// One node of the P2P fan-out benchmark, driven by JSON lines on stdin, one answer line each.
import { createInterface } from 'node:readline'

import { P2PStore } from '../dist/index.mjs'

const { metadata, name, address } = JSON.parse(process.argv[2])
const node = await P2PStore.create({ metadata, localServerName: name, ipOrHostName: address, protocol: 'tcp', sharedMemory: false })
const answer = (value) => console.log(JSON.stringify(value))
answer({ segment: node.segmentName })

let into = []
for await (const line of createInterface({ input: process.stdin })) {
  const command = JSON.parse(line)
  try {
    if (command.op === 'register') {
      const buffer = Buffer.alloc(command.size)
      for (let at = 0; at < buffer.length; at += 4096) buffer.writeUInt32LE((at * 2654435761) >>> 0, at)
      await node.register(command.name, [buffer], { maxShardSize: command.shard })
      answer({ ok: true })
    } else if (command.op === 'prepare') {
      into = command.sizes.map((size) => Buffer.alloc(size))
      answer({ ok: true })
    } else if (command.op === 'pull') {
      const report = await node.getReplica(command.name, into)
      answer({ ok: true, report })
    } else if (command.op === 'drop') {
      await node.deleteReplica(command.name)
      answer({ ok: true })
    } else if (command.op === 'close') {
      await node.close()
      answer({ ok: true })
      process.exit(0)
    }
  } catch (error) {
    answer({ ok: false, message: String(error) })
  }
}
