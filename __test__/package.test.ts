import { execFileSync } from 'node:child_process'
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
