import { execFileSync, spawnSync } from 'node:child_process'
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
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

test('every command has --help, the CLI has --version, and usage mistakes exit with 2', (t) => {
  const cli = (...args: string[]) => spawnSync(process.execPath, [join(root, 'dist', 'cli.js'), ...args], { encoding: 'utf8', timeout: 20_000 })
  const { version } = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string }
  t.is(cli('--version').stdout.trim(), version)
  for (const command of ['serve', 'master', 'demo', 'metadata-server', 'bench', 'bench-raw', 'bench-store', 'bench-memcpy', 'token', 'topology']) {
    // Help, never the command itself (demo would move 3 GB, serve and master would serve).
    const help = cli(command, '--help')
    t.is(help.status, 0, command)
    t.regex(help.stdout, new RegExp(`usage: mooncake ${command}`), command)
    t.is(cli('help', command).stdout, help.stdout, command)
  }
  t.regex(cli('p2p', '--help').stdout, /usage: mooncake p2p/)
  const mistakes: [string[], RegExp][] = [
    [['master', '--rpc-port', 'abc'], /--rpc-port needs a whole number from 0 to 65535, not 'abc'/],
    [['serve', '--metadata-port', '70000'], /--metadata-port needs a whole number/],
    [['master', '--eviction-ratio', 'lots'], /--eviction-ratio needs a number/],
    [['master', '--no-such-option'], /Unknown option '--no-such-option'/],
    [['no-such-command'], /unknown command 'no-such-command'/],
    [['token', 'extra'], /token takes no options/],
  ]
  for (const [args, message] of mistakes) {
    const run = cli(...args)
    t.is(run.status, 2, args.join(' '))
    t.regex(run.stderr, message, args.join(' '))
    t.regex(run.stderr, /see: mooncake/, args.join(' '))
  }
})

test('the API reference builds from the JSDoc without a warning', (t) => {
  const typedoc = join(root, 'node_modules', 'typedoc', 'bin', 'typedoc')
  const run = spawnSync(process.execPath, [typedoc, '--emit', 'none'], { cwd: root, encoding: 'utf8', timeout: 120_000 })
  t.is(run.status, 0, `${run.stdout}${run.stderr}`)
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
