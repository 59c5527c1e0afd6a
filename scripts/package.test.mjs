// What a user of the published package gets: the two tarballs `scripts/package.mjs` packed,
// installed offline (from npm's cache) into an empty folder with no Rust on the PATH, then used
// from CommonJS, from an ES module, from `tsc --strict`, and through the README's first store
// snippet against `mooncake serve`; `attw` and `publint` check the main package's manifest.
//   npm run test:package
import { execFileSync, spawn, spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { delimiter, join } from 'node:path'
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'

const root = new URL('..', import.meta.url).pathname
const out = join(root, 'target', 'package')
const manifest = JSON.parse(readFileSync(join(out, 'manifest.json'), 'utf8'))
const consumer = mkdtempSync(join(tmpdir(), 'mooncake-consumer-'))

/** This PATH without any folder that holds cargo or rustc. */
const pathWithoutRust = process.env.PATH.split(delimiter)
  .filter((dir) => !['cargo', 'rustc'].some((tool) => readdirSafe(dir).includes(tool)))
  .join(delimiter)
const env = { ...process.env, PATH: pathWithoutRust, CARGO_HOME: '/nonexistent', RUSTUP_HOME: '/nonexistent' }

function readdirSafe(dir) {
  try {
    return readdirSync(dir)
  } catch {
    return []
  }
}

const sh = (cmd, args, opts = {}) =>
  spawnSync(cmd, args, { cwd: consumer, env, encoding: 'utf8', timeout: 120_000, ...opts })
const node = (...args) => sh(process.execPath, args)
const ok = (run) => assert.equal(run.status, 0, `${run.stdout}\n${run.stderr}`)
const devVersion = (name) => JSON.parse(readFileSync(join(root, 'node_modules', name, 'package.json'), 'utf8')).version

before(() => {
  writeFileSync(join(consumer, 'package.json'), '{ "name": "consumer", "private": true }\n')
  const install = sh('npm', [
    'install', '--offline', '--no-audit', '--no-fund', '--ignore-scripts',
    join(out, manifest.main.file), join(out, manifest.native.file),
    `typescript@${devVersion('typescript')}`, `@types/node@${devVersion('@types/node')}`,
  ])
  ok(install)
})

after(() => rmSync(consumer, { recursive: true, force: true }))

test('the consumer has no Rust toolchain', () => {
  assert.equal(sh('cargo', ['--version']).error?.code, 'ENOENT')
  assert.equal(sh('rustc', ['--version']).error?.code, 'ENOENT')
})

test('the main package ships no binary; the platform package does, stripped', () => {
  const installed = join(consumer, 'node_modules', 'mooncake-kv', 'dist')
  assert.deepEqual(readdirSync(installed).filter((f) => f.endsWith('.node')), [])
  const binary = join(consumer, 'node_modules', `mooncake-kv-${manifest.platform}`, manifest.binary.file)
  const symbols = execFileSync('nm', [binary], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim()
  assert.equal(symbols, '', 'no symbol table')
})

test('a CommonJS consumer moves bytes between two engines and sees coded errors', () => {
  writeFileSync(
    join(consumer, 'consumer.cjs'),
    `const { TransferEngine, MooncakeError } = require('mooncake-kv')
const assert = require('node:assert/strict')
;(async () => {
  const opts = { localServerName: '127.0.0.1', metadata: 'P2PHANDSHAKE', protocol: 'tcp' }
  const [a, b] = await Promise.all([TransferEngine.create(opts), TransferEngine.create(opts)])
  const src = a.allocate(1 << 20), dst = b.allocate(1 << 20)
  for (let i = 0; i < src.length; i++) src[i] = (i * 31 + 7) & 0xff
  const segment = await a.openSegment(b.segmentName)
  await a.write(segment, src, b.addressOf(dst))
  assert.ok(src.equals(dst))
  await assert.rejects(a.write(segment, src, b.addressOf(dst) + 1n), (e) => e instanceof MooncakeError && e.code === 'ERR_ADDRESS_NOT_REGISTERED')
  await Promise.all([a.close(), b.close()])
  console.log('cjs ok')
})().catch((e) => { console.error(e); process.exit(1) })
`,
  )
  const run = node('consumer.cjs')
  ok(run)
  assert.match(run.stdout, /cjs ok/)
})

test('an ES module consumer gets the same API and the CLI runs from the package', () => {
  writeFileSync(
    join(consumer, 'consumer.mjs'),
    `import { TransferEngine, MooncakeStore, MasterServer, MooncakeError } from 'mooncake-kv'
for (const f of [TransferEngine.create, MooncakeStore.connect, MasterServer.start]) if (typeof f !== 'function') throw new Error('missing export')
if (new MooncakeError('ERR_TIMEOUT', 'x').code !== 'ERR_TIMEOUT') throw new Error('bad error')
console.log('esm ok')
`,
  )
  const run = node('consumer.mjs')
  ok(run)
  assert.match(run.stdout, /esm ok/)
  const version = node(join('node_modules', '.bin', 'mooncake'), '--version')
  ok(version)
  assert.equal(version.stdout.trim(), JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).version)
})

test('the RDMA binary loads where the package carries it and libibverbs is here; MOONCAKE_RDMA=1 insists', () => {
  const rdma = join(consumer, 'node_modules', `mooncake-kv-${manifest.platform}`, `mooncake-rdma.${manifest.platform}.node`)
  const verbs = spawnSync('ldconfig', ['-p'], { encoding: 'utf8' }).stdout?.includes('libibverbs.so.1') ?? false
  const expectRdma = existsSync(rdma) && verbs
  const loaded = node('-e', "require('mooncake-kv'); console.log(Object.keys(require.cache).filter((k) => k.endsWith('.node')).join(' '))")
  ok(loaded)
  assert.match(loaded.stdout, expectRdma ? /mooncake-rdma\./ : /\/mooncake\.linux-/)
  const insisting = sh(process.execPath, ['-e', "require('mooncake-kv')"], { env: { ...env, MOONCAKE_RDMA: '1' } })
  if (expectRdma) ok(insisting)
  else assert.match(insisting.stderr, /ERR_NOT_SUPPORTED_TRANSPORT|MOONCAKE_RDMA=1, but/)
  if (!expectRdma) assert.notEqual(insisting.status, 0)
})

/** The README's first TypeScript block: what a new user copies. */
function readmeSnippet() {
  const readme = readFileSync(join(root, 'README.md'), 'utf8')
  const block = /```ts\n([\s\S]*?)```/.exec(readme)
  assert.ok(block, 'the README has a ts block')
  return block[1]
}

test('tsc --strict accepts the README snippet and a CommonJS consumer, and rejects a wrong call', () => {
  writeFileSync(join(consumer, 'snippet.mts'), readmeSnippet())
  writeFileSync(
    join(consumer, 'typed.cts'),
    `import { MooncakeStore, type MooncakeErrorCode } from 'mooncake-kv'
export const code: MooncakeErrorCode = 'ERR_OBJECT_NOT_FOUND'
export async function get(store: MooncakeStore, key: string): Promise<Buffer> { return store.get(key) }
`,
  )
  writeFileSync(
    join(consumer, 'wrong.mts'),
    "import { MooncakeStore } from 'mooncake-kv'\nexport const s = await MooncakeStore.connect({ masterAddress: 42 })\n",
  )
  const tsc = (...files) =>
    node(join('node_modules', 'typescript', 'bin', 'tsc'), '--strict', '--module', 'nodenext', '--target', 'es2022', '--types', 'node', '--skipLibCheck', 'false', ...files)
  ok(tsc('snippet.mts', 'typed.cts'))
  const wrong = tsc('--noEmit', 'wrong.mts')
  assert.notEqual(wrong.status, 0)
  assert.match(wrong.stdout, /wrong\.mts\(2,\d+\): error TS2322/)
})

test('the README snippet runs as written against `mooncake serve`', async () => {
  const server = spawn(process.execPath, [join('node_modules', '.bin', 'mooncake'), 'serve'], { cwd: consumer, env, stdio: ['ignore', 'pipe', 'pipe'] })
  let log = ''
  try {
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`mooncake serve did not start:\n${log}`)), 60_000)
      const read = (chunk) => {
        log += chunk
        if (log.includes('serving;')) {
          clearTimeout(timer)
          resolve()
        }
      }
      server.stdout.on('data', read)
      server.stderr.on('data', read)
      server.on('exit', (code) => reject(new Error(`mooncake serve exited with ${code}:\n${log}`)))
    })
    // Twice: a user runs it again against the same server.
    for (let i = 0; i < 2; i++) {
      const run = node('snippet.mjs')
      ok(run)
      assert.equal(run.stdout.trim(), 'true 1 2 1048576')
    }
  } finally {
    server.kill('SIGTERM')
    await new Promise((resolve) => (server.exitCode === null ? server.on('exit', resolve) : resolve()))
  }
})

test('attw and publint find nothing wrong with the main package', () => {
  const bin = (name) => join(root, 'node_modules', '.bin', name)
  const attw = spawnSync(bin('attw'), [join(out, manifest.main.file)], { encoding: 'utf8', timeout: 120_000 })
  ok(attw)
  const publint = spawnSync(bin('publint'), ['--strict', join(consumer, 'node_modules', 'mooncake-kv')], { encoding: 'utf8', timeout: 120_000 })
  ok(publint)
  assert.doesNotMatch(publint.stdout, /Warnings|Errors|Suggestions/, publint.stdout)
})
