import { execFileSync, spawnSync } from 'node:child_process'
import { cpSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import test from 'ava'

const root = join(__dirname, '..')
const probe = (code: string, type: 'commonjs' | 'module') =>
  execFileSync(process.execPath, [`--input-type=${type}`, '-e', code], { cwd: root, encoding: 'utf8' }).trim()

test('CommonJS consumers get the public API', (t) => {
  const out = probe(
    "const m = require('mooncake-kv'); console.log([typeof m.TransferEngine.create, typeof m.startMetadataServer, new m.MooncakeError('ERR_TIMEOUT', 'x').code].join(' '))",
    'commonjs',
  )
  t.is(out, 'function function ERR_TIMEOUT')
})

test('ES module consumers get the same API', (t) => {
  const out = probe(
    "import { TransferEngine, MooncakeError, startMetadataServer } from 'mooncake-kv'; console.log([typeof TransferEngine.create, typeof startMetadataServer, new MooncakeError('ERR_ADDRESS_NOT_REGISTERED', 'x').errno].join(' '))",
    'module',
  )
  t.is(out, 'function function -3')
})

test('the CLI prints its usage', (t) => {
  const out = execFileSync(process.execPath, [join(root, 'dist', 'cli.js'), 'help'], { encoding: 'utf8' })
  t.regex(out, /usage: mooncake <command>/)
  t.regex(out, /bench-raw/)
})

test('an RDMA binary that cannot load (no libibverbs) falls back to the plain one silently', async (t) => {
  const copy = mkdtempSync(join(tmpdir(), 'mooncake-loader-'))
  try {
    cpSync(join(root, 'dist'), copy, { recursive: true })
    writeFileSync(join(copy, `mooncake-rdma.${process.platform}-${process.arch}-gnu.node`), 'not a shared object')
    const code = `const m = require(${JSON.stringify(join(copy, 'index.js'))});
      m.TransferEngine.create({ localServerName: '127.0.0.1', metadata: 'P2PHANDSHAKE' })
        .then(async (e) => { console.log(e.transports().join(',')); await e.close() })`
    const out = execFileSync(process.execPath, ['-e', code], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] })
    t.is(out.trim(), 'tcp,shm')
  } finally {
    rmSync(copy, { recursive: true, force: true })
  }
})

test('an ES module TypeScript consumer sees the named exports, and no default export that fails at run time', (t) => {
  const dir = mkdtempSync(join(root, '.esm-consumer-'))
  try {
    writeFileSync(
      join(dir, 'named.mts'),
      "import { MooncakeStore, type MooncakeErrorCode } from 'mooncake-kv'\nexport const code: MooncakeErrorCode = 'ERR_TIMEOUT'\nexport { MooncakeStore }\n",
    )
    writeFileSync(join(dir, 'default.mts'), "import m from 'mooncake-kv'\nexport default m\n")
    const tsc = (file: string) =>
      spawnSync(
        process.execPath,
        [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '--noEmit', '--strict', '--module', 'node16', '--types', 'node', join(dir, file)],
        { cwd: root, encoding: 'utf8' },
      )
    const named = tsc('named.mts')
    t.is(named.status, 0, named.stdout)
    const fallback = tsc('default.mts')
    t.not(fallback.status, 0, 'a default import does not compile')
    t.regex(fallback.stdout, /no default export/)
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})
