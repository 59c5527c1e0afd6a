import { execFileSync } from 'node:child_process'
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
