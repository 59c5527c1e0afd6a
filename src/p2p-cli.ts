/**
 * `mooncake p2p`: checkpoints as files through the P2P store. `register` reads files into
 * registered memory and serves them until stopped; `get` pulls them from every node that holds
 * them and writes them out; `list` shows the catalogue; `unregister` removes a registrant's
 * copies on its behalf.
 */
import { constants as fs, closeSync, lstatSync, mkdirSync, openSync, readdirSync, readSync, realpathSync, writeSync } from 'node:fs'
import { constants as bufferLimits } from 'node:buffer'
import { hostname, totalmem } from 'node:os'
import { basename, dirname, join, posix, relative, resolve, sep } from 'node:path'
import { parseArgs } from 'node:util'

import { Presets, SingleBar } from 'cli-progress'

import { MooncakeError } from './errors'
import { P2PStore, type P2PStoreOptions, type PayloadInfo, type PullReport } from './p2p'

export const P2P_USAGE = `usage: mooncake p2p <register|get|list|unregister> ... --metadata <etcd://h:2379 | redis://h:6379 | http://h:p/metadata>

  register <name> <file|dir>...   read the files into memory and serve them as payload <name> until Ctrl-C
                                    --max-shard-size 64MiB   --force (replace an entry of that name)
  get <name> <out dir>            pull <name> from every node that holds it and write its files there
                                    --serve (keep serving it until Ctrl-C)   --overwrite
  list [prefix]                   payloads in the catalogue
  unregister <name>               remove the registrants' copies of <name> (those of --segment S, or all)

  every command: --local-server-name NAME (default <host>-<pid>)   --ip ADDRESS   --protocol auto|tcp|shm|rdma
                 --cluster-token-file FILE (default MC_CLUSTER_TOKEN)   --concurrency 4   --liveness-ttl-ms 10000
`

const OPTIONS = {
  metadata: { type: 'string' },
  'local-server-name': { type: 'string' },
  ip: { type: 'string' },
  protocol: { type: 'string' },
  'cluster-token-file': { type: 'string' },
  concurrency: { type: 'string' },
  'liveness-ttl-ms': { type: 'string' },
  'max-shard-size': { type: 'string', default: '64MiB' },
  force: { type: 'boolean', default: false },
  serve: { type: 'boolean', default: false },
  overwrite: { type: 'boolean', default: false },
  segment: { type: 'string' },
} as const

type Values = ReturnType<typeof parseArgs<{ options: typeof OPTIONS; allowPositionals: true }>>['values']

/** What the commands share with the rest of the CLI. */
export interface CliKit {
  parseSize(text: string): number
  readToken(path: string | undefined): string | undefined
  untilSignal(): Promise<void>
}

function invalid(message: string): MooncakeError {
  return new MooncakeError('ERR_INVALID_ARGUMENT', message)
}

function count(text: string | undefined, what: string): number | undefined {
  if (text === undefined) return undefined
  const value = Number(text)
  if (!Number.isSafeInteger(value) || value < 1) throw invalid(`--${what} must be a positive integer, not '${text}'`)
  return value
}

async function open(o: Values, kit: CliKit): Promise<P2PStore> {
  if (o.metadata === undefined) throw invalid('--metadata is required (etcd://host:2379, redis://host:6379 or http://host:port/metadata)')
  const options: P2PStoreOptions = {
    metadata: o.metadata,
    localServerName: o['local-server-name'] ?? `${hostname()}-${process.pid}`,
    ipOrHostName: o.ip,
    protocol: o.protocol as P2PStoreOptions['protocol'],
    concurrency: count(o.concurrency, 'concurrency'),
    livenessTtlMs: count(o['liveness-ttl-ms'], 'liveness-ttl-ms'),
  }
  const token = kit.readToken(o['cluster-token-file'])
  return P2PStore.create(token === undefined ? options : { ...options, clusterToken: token })
}

/** Regular files under `paths` (directories walked, sorted), each with the name it is published under. */
function collect(paths: string[]): { path: string; name: string }[] {
  const files: { path: string; name: string }[] = []
  const walk = (path: string, root: string): void => {
    const stat = lstatSync(path)
    if (stat.isDirectory()) {
      for (const entry of readdirSync(path).sort()) walk(join(path, entry), root)
    } else if (stat.isFile()) {
      const name = relative(root, path).split(sep).join('/')
      if (stat.size === 0) process.stderr.write(`skipping empty file ${path} (a payload buffer holds at least one byte)\n`)
      else files.push({ path, name })
    } else {
      process.stderr.write(`skipping ${path}: not a regular file\n`)
    }
  }
  for (const path of paths) {
    const stat = lstatSync(path)
    walk(path, stat.isDirectory() ? path : dirname(path))
  }
  const seen = new Set<string>()
  for (const { name } of files) {
    if (seen.has(name)) throw invalid(`two files would be published as '${name}'`)
    seen.add(name)
  }
  return files
}

function readWhole(path: string): Buffer {
  const size = lstatSync(path).size
  const buffer = Buffer.allocUnsafe(size)
  const fd = openSync(path, 'r')
  try {
    for (let at = 0; at < size; ) {
      const read = readSync(fd, buffer, at, Math.min(size - at, 1 << 30), at)
      if (read === 0) throw new MooncakeError('ERR_INVALID_ARGUMENT', `${path} shrank while read`)
      at += read
    }
  } finally {
    closeSync(fd)
  }
  return buffer
}

/**
 * Where each buffer of a payload goes under `out`: its published name, which must be a safe relative path (the
 * catalogue is not trusted), distinct from every other one.
 */
function destinations(out: string, info: PayloadInfo): string[] {
  const root = realpathSync(out)
  const taken = new Set<string>()
  return info.sizeList.map((_, i) => {
    const given = info.bufferNames?.[i] ?? `buffer-${i}`
    const clean = posix.normalize(given)
    if (given.includes('\\') || given.includes('\0') || posix.isAbsolute(clean) || clean === '.' || clean === '..' || clean.startsWith('../')) {
      throw new MooncakeError('ERR_INVALID_ARGUMENT', `the catalogue names buffer ${i} '${given}', which is not a safe relative path`)
    }
    if (taken.has(clean) || [...taken].some((t) => t.startsWith(`${clean}/`) || clean.startsWith(`${t}/`))) {
      throw new MooncakeError('ERR_INVALID_ARGUMENT', `the catalogue names two buffers '${clean}' (or a file and a directory)`)
    }
    taken.add(clean)
    const path = resolve(root, clean)
    mkdirSync(dirname(path), { recursive: true })
    const parent = realpathSync(dirname(path))
    if (parent !== root && !parent.startsWith(root + sep)) {
      throw new MooncakeError('ERR_INVALID_ARGUMENT', `'${given}' would be written outside ${out}`)
    }
    return join(parent, basename(path))
  })
}

/** Writes `bytes` to `path`, never through a symbolic link, and over an existing file only with `overwrite`. */
function writeFile(path: string, bytes: Buffer, overwrite: boolean): void {
  let fd: number
  try {
    fd = openSync(path, fs.O_WRONLY | fs.O_CREAT | fs.O_NOFOLLOW | (overwrite ? fs.O_TRUNC : fs.O_EXCL), 0o644)
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code
    if (code === 'EEXIST') throw new MooncakeError('ERR_INVALID_ARGUMENT', `${path} exists (--overwrite replaces it)`)
    if (code === 'ELOOP') throw new MooncakeError('ERR_INVALID_ARGUMENT', `${path} is a symbolic link: not followed`)
    throw error
  }
  try {
    for (let at = 0; at < bytes.length; ) at += writeSync(fd, bytes, at, bytes.length - at)
  } finally {
    closeSync(fd)
  }
}

function mib(bytes: number): string {
  return (bytes / 2 ** 20).toFixed(1)
}

function printReport(report: PullReport): void {
  const seconds = report.elapsedMs / 1000
  console.log(`pulled ${mib(report.bytes)} MiB in ${seconds.toFixed(2)} s (${(report.bytes / seconds / 1e9).toFixed(2)} GB/s)` + (report.resumedBytes > 0 ? `, ${mib(report.resumedBytes)} MiB resumed` : '') + (report.retries > 0 ? `, ${report.retries} reads retried elsewhere` : ''))
  for (const source of report.sources) {
    const trouble = [source.failures > 0 ? `${source.failures} failed` : '', source.corrupt > 0 ? `${source.corrupt} corrupt` : ''].filter(Boolean).join(', ')
    console.log(`  from ${source.segment}: ${mib(source.bytes)} MiB in ${source.shards} shards${trouble ? ` (${trouble})` : ''}`)
  }
}

async function register(node: P2PStore, args: string[], o: Values, kit: CliKit): Promise<void> {
  const [name, ...paths] = args
  if (name === undefined || paths.length === 0) throw invalid('usage: mooncake p2p register <name> <file|dir>...')
  const files = collect(paths)
  if (files.length === 0) throw invalid('no non-empty regular files to register')
  const buffers = files.map((f) => readWhole(f.path))
  const maxShardSize = kit.parseSize(o['max-shard-size'])
  await node.register(name, buffers, { maxShardSize, force: o.force, bufferNames: files.map((f) => f.name) })
  const total = buffers.reduce((sum, b) => sum + b.length, 0)
  console.log(`serving '${name}' from ${node.segmentName}: ${files.length} files, ${mib(total)} MiB; Ctrl-C to stop`)
  await kit.untilSignal()
}

async function get(node: P2PStore, args: string[], o: Values, kit: CliKit): Promise<void> {
  const [name, out] = args
  if (name === undefined || out === undefined) throw invalid('usage: mooncake p2p get <name> <out dir>')
  const info = (await node.list(name)).find((p) => p.name === name)
  if (info === undefined) throw new MooncakeError('ERR_PAYLOAD_NOT_FOUND', `no payload named '${name}' in the catalogue`)
  const largest = Math.max(...info.sizeList)
  if (largest > bufferLimits.MAX_LENGTH || info.totalSize > totalmem()) {
    throw new MooncakeError('ERR_INVALID_ARGUMENT', `'${name}' (${mib(info.totalSize)} MiB, buffers up to ${mib(largest)} MiB) does not fit in this process's memory`)
  }
  mkdirSync(out, { recursive: true })
  const targets = destinations(out, info)
  const into = info.sizeList.map((size) => Buffer.alloc(size))
  const bar = process.stderr.isTTY
    ? new SingleBar({ format: '{bar} {percentage}% | {value}/{total} MiB | {shards} shards', stream: process.stderr, hideCursor: true }, Presets.shades_classic)
    : undefined
  bar?.start(Number(mib(info.totalSize)), 0, { shards: `0/?` })
  let report: PullReport
  try {
    report = await node.getReplica(name, into, {
      onProgress: (p) => bar?.update(Number(mib(p.bytesDone)), { shards: `${p.shardsDone}/${p.shardsTotal}` }),
    })
  } finally {
    bar?.stop()
  }
  targets.forEach((path, i) => writeFile(path, into[i], o.overwrite))
  printReport(report)
  console.log(`wrote ${targets.length} files under ${out}`)
  if (o.serve) {
    console.log(`serving '${name}' from ${node.segmentName}; Ctrl-C to stop`)
    await kit.untilSignal()
  }
}

async function list(node: P2PStore, args: string[]): Promise<void> {
  const payloads = await node.list(args[0] ?? '')
  if (payloads.length === 0) {
    console.log('no payloads')
    return
  }
  for (const p of payloads) {
    console.log(`${p.name}\t${mib(p.totalSize)} MiB\t${p.sizeList.length} buffers\t${mib(p.maxShardSize)} MiB shards`)
  }
}

/** Runs `mooncake p2p ...`. */
export async function p2p(argv: string[], kit: CliKit): Promise<void> {
  const [command, ...rest] = argv
  if (command === undefined || command === 'help' || command === '--help' || command === '-h') {
    process.stdout.write(P2P_USAGE)
    return
  }
  const { values: o, positionals } = parseArgs({ args: rest, options: OPTIONS, allowPositionals: true, strict: true })
  if (!['register', 'get', 'list', 'unregister'].includes(command)) throw invalid(`unknown p2p command '${command}'\n\n${P2P_USAGE}`)
  const node = await open(o, kit)
  try {
    switch (command) {
      case 'register':
        return await register(node, positionals, o, kit)
      case 'get':
        return await get(node, positionals, o, kit)
      case 'list':
        return await list(node, positionals)
      case 'unregister': {
        const [name] = positionals
        if (name === undefined) throw invalid('usage: mooncake p2p unregister <name> [--segment S]')
        await node.forget(name, o.segment)
        console.log(`removed ${o.segment === undefined ? 'every registrant' : o.segment}'s copies of '${name}'`)
        return
      }
    }
  } finally {
    await node.close()
  }
}
