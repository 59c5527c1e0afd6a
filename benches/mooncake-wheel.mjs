// Mooncake's own store from its pinned PyPI wheel, for the benches that measure against it
// (benches/mooncake-master.mjs, benches/mooncake-baseline.mjs): the wheel's virtual environment,
// its `mooncake_master`, and the Python processes of mooncake_master_load.py, with every process
// they start tracked so that any way out kills it.
//
// MOONCAKE_PY_VENV picks the virtual environment holding the wheel (default
// target/mooncake-py-venv, made when missing).
import { execFileSync, spawn, spawnSync } from 'node:child_process'
import { once } from 'node:events'
import fs from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'

export const root = fileURLToPath(new URL('..', import.meta.url))
export const load = fileURLToPath(new URL('./mooncake_master_load.py', import.meta.url))
export const WHEEL = { name: 'mooncake-transfer-engine-non-cuda', version: '0.3.13.post1' }
/** Written into a virtual environment once the wheel imports in it (as the Rust testkit does). */
const MARKER = '.mooncake-testkit'

// ---- the wheel's virtual environment, as crates/mooncake-testkit/src/mooncake_py.rs makes it

const CHECK = [
  'import importlib.metadata, os, sys',
  'from mooncake.store import MooncakeDistributedStore',
  'import mooncake',
  `sys.stdout.write('\\n' + importlib.metadata.version('${WHEEL.name}'))`,
  "sys.stdout.write('\\n' + os.path.dirname(os.path.abspath(mooncake.__file__)) + '\\n')",
].join('\n')

/** `{ python, master }` of the wheel in `venv`, or `{ problem }` saying why it cannot be used. */
export function checkVenv(venv) {
  const python = path.join(venv, 'bin/python3')
  if (!fs.existsSync(python)) return { problem: `${python} is missing` }
  const out = spawnSync(python, ['-c', CHECK], { encoding: 'utf8', env: { ...process.env, PYTHONDONTWRITEBYTECODE: '1' } })
  if (out.status !== 0) return { problem: `the client does not import: ${out.stderr.trim().split('\n').slice(-3).join(' | ')}` }
  const [packageDir, version] = out.stdout.split('\n').filter(Boolean).reverse()
  if (version !== WHEEL.version) return { problem: `${WHEEL.name} is ${version}, not ${WHEEL.version}` }
  const master = path.join(packageDir, 'mooncake_master')
  if (!fs.existsSync(master)) return { problem: `${master} is missing` }
  return { python, master }
}

/** The virtual environment: MOONCAKE_PY_VENV, else target/mooncake-py-venv of this clone. */
export const venvPath = () => path.resolve(process.env.MOONCAKE_PY_VENV || path.join(root, 'target/mooncake-py-venv'))

/**
 * `{ python, master }` of the wheel, making its virtual environment first when it is missing
 * (python3 -m venv, pip install): throws when that fails, or when the directory holds something
 * else. pip's output goes to `stdout` (a descriptor or 'inherit'; stderr is inherited).
 */
export function wheel({ log = (text) => process.stderr.write(text), stdout = 'inherit' } = {}) {
  const venv = venvPath()
  const found = checkVenv(venv)
  if (!found.problem) return found
  const empty = !fs.existsSync(venv) || fs.readdirSync(venv).length === 0
  if (!empty && !fs.existsSync(path.join(venv, MARKER))) {
    throw new Error(`${venv} cannot be used (${found.problem}); remove it or point MOONCAKE_PY_VENV elsewhere`)
  }
  log(`making ${venv} (python3 -m venv, pip install ${WHEEL.name}==${WHEEL.version})\n`)
  // Built aside and renamed into place, so that an interrupted install never leaves a half-made one.
  fs.mkdirSync(path.dirname(venv), { recursive: true })
  const staging = fs.mkdtempSync(path.join(path.dirname(venv), `.${path.basename(venv)}.`))
  try {
    execFileSync('python3', ['-m', 'venv', staging], { stdio: ['ignore', 'ignore', 'inherit'] })
    const spec = `${WHEEL.name}==${WHEEL.version}`
    execFileSync(path.join(staging, 'bin/python3'), ['-m', 'pip', 'install', '--quiet', '--disable-pip-version-check', spec], {
      stdio: ['ignore', stdout, 'inherit'],
    })
    fs.writeFileSync(path.join(staging, MARKER), `${spec}\n`)
    fs.rmSync(venv, { recursive: true, force: true })
    fs.renameSync(staging, venv)
  } finally {
    fs.rmSync(staging, { recursive: true, force: true })
  }
  const made = checkVenv(venv)
  if (made.problem) throw new Error(`${venv}: ${made.problem}`)
  return made
}

// ---- ports

/** Free loopback ports, by binding and releasing: another process may take one first, so
 * startMaster retries on fresh ones. */
export async function freePorts(n) {
  const servers = []
  try {
    for (let i = 0; i < n; i++) {
      const server = net.createServer()
      server.listen(0, '127.0.0.1')
      await once(server, 'listening')
      servers.push(server)
    }
    return servers.map((s) => s.address().port)
  } finally {
    await Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve))))
  }
}

const connects = (port) =>
  new Promise((resolve) => {
    const socket = net.connect({ port, host: '127.0.0.1' })
    socket.once('connect', () => {
      socket.destroy()
      resolve(true)
    })
    socket.once('error', () => resolve(false))
  })

/** The last `bytes` of a log file ('' when there is none). */
export const tail = (file, bytes = 3000) => {
  try {
    const text = fs.readFileSync(file, 'utf8')
    return text.slice(-bytes)
  } catch {
    return ''
  }
}

/** The argv of Mooncake's `mooncake_master` on loopback ports `[rpc, metrics]`. */
export const theirMaster = (binary) => ([rpc, metrics]) => ({
  port: rpc,
  argv: [
    binary,
    '--rpc_address=127.0.0.1',
    `--rpc_port=${rpc}`,
    '--enable_http_metadata_server=false',
    '--metrics_host=127.0.0.1',
    `--metrics_port=${metrics}`,
  ],
})

// ---- processes

/**
 * A scratch directory (in the system's temporary directory, named `prefix` and a random suffix)
 * and every process started through it, under `nice -n niceness`. Any way out (error, SIGINT,
 * SIGTERM, SIGHUP) kills those processes by PID and removes the directory, unless logs are kept:
 * a failed run keeps them and says where.
 */
export function session({ prefix, niceness = '0', log = (text) => process.stderr.write(text) }) {
  const children = new Set()
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), prefix))
  let keepScratch = false
  function cleanup() {
    for (const child of children) {
      try {
        child.kill('SIGKILL')
      } catch {}
    }
    children.clear()
    if (!keepScratch) fs.rmSync(scratch, { recursive: true, force: true })
  }
  process.on('exit', (code) => {
    // A failed run keeps the masters' and clients' logs, if it got as far as writing any.
    if (code !== 0 && code !== 130 && !keepScratch && fs.existsSync(scratch) && fs.readdirSync(scratch).length > 0) {
      keepScratch = true
      fs.writeSync(2, `\nlogs kept in ${scratch}\n`)
    }
    cleanup()
  })
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
    process.on(signal, () => {
      log(`\n${signal}: stopping\n`)
      cleanup()
      process.exit(130)
    })
  }

  /** Spawns `argv` under `nice`, its stderr (and stdout unless piped) into `logFile`. */
  function start(argv, { logFile, cwd = scratch, pipe = false, env = process.env }) {
    const fd = fs.openSync(logFile, 'a')
    const child = spawn('nice', ['-n', niceness, ...argv], {
      cwd,
      env,
      stdio: [pipe ? 'pipe' : 'ignore', pipe ? 'pipe' : fd, fd],
    })
    fs.closeSync(fd)
    children.add(child)
    child.on('exit', () => children.delete(child))
    child.logFile = logFile
    return child
  }

  async function stop(child) {
    if (child.exitCode !== null || child.signalCode !== null) return
    const exited = once(child, 'exit')
    child.kill('SIGKILL')
    await exited
  }

  /**
   * A master listening on one of `portCount` fresh loopback ports: `argvFor(ports, attempt)`
   * gives its argv and the port to wait for. Retries on fresh ports, three times in all.
   */
  async function startMaster(name, argvFor, portCount) {
    let last
    for (let attempt = 0; attempt < 3; attempt++) {
      const ports = await freePorts(portCount)
      const { argv, port } = argvFor(ports, attempt)
      const dir = path.join(scratch, `${name}-${attempt}`)
      fs.mkdirSync(dir, { recursive: true })
      const child = start(argv, { logFile: path.join(dir, 'master.log'), cwd: dir })
      const deadline = Date.now() + 30_000
      while (Date.now() < deadline && child.exitCode === null && child.signalCode === null) {
        if (await connects(port)) return { child, addr: `127.0.0.1:${port}`, dir }
        await new Promise((resolve) => setTimeout(resolve, 50))
      }
      await stop(child)
      last = new Error(`${name} master did not listen on ${port}:\n${tail(child.logFile)}`)
    }
    throw last
  }

  /**
   * One Python process of mooncake_master_load.py, logging to `${name}.log` in `dir`; resolves
   * once it printed its ready line. `call(command)` sends a command line and resolves to its
   * reply; it rejects, with the end of the log, if the process exits instead (a wrong byte
   * among them).
   */
  async function startPython(python, mode, addr, dir, extra, name = mode) {
    const child = start([python, '-u', load, mode, '--master', addr, ...extra], {
      logFile: path.join(dir, `${name}.log`),
      pipe: true,
      env: { ...process.env, PYTHONDONTWRITEBYTECODE: '1' },
    })
    const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]()
    const failed = () => new Error(`${name} against ${addr} failed (exit ${child.exitCode ?? child.signalCode}):\n${tail(child.logFile)}`)
    const next = async () => {
      const { value, done } = await lines.next()
      if (done) {
        if (child.exitCode === null && child.signalCode === null) await once(child, 'exit')
        throw failed()
      }
      return JSON.parse(value)
    }
    const ready = await next()
    if (!ready.ready) throw failed()
    return {
      child,
      async call(command) {
        child.stdin.write(`${JSON.stringify(command)}\n`)
        return next()
      },
    }
  }

  /** Python processes leave on end of input; whatever still runs after `graceMs` is killed. */
  async function finish(pythons, graceMs = 3000) {
    for (const child of pythons) child.stdin.end()
    await Promise.race([Promise.all(pythons.map((c) => (c.exitCode === null ? once(c, 'exit') : null))), new Promise((r) => setTimeout(r, graceMs))])
    await Promise.all([...children].map(stop))
  }

  return {
    scratch,
    start,
    stop,
    startMaster,
    startPython,
    finish,
    cleanup,
    /** Keeps the scratch directory (the logs) when the session ends. */
    keepLogs() {
      keepScratch = true
    },
  }
}
