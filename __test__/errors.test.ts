import test from 'ava'

import { ERROR_CODES, MooncakeError, TransferEngine, type MooncakeErrorCode } from '../src'

/** A switch the compiler checks: a code that does not exist does not compile. */
function retryable(code: MooncakeErrorCode): boolean {
  switch (code) {
    case 'ERR_TIMEOUT':
    case 'ERR_SOCKET':
    case 'ERR_RPC_TIMEOUT':
      return true
    default:
      return false
  }
}

test('every code is documented once, with distinct numbers', (t) => {
  const entries = Object.entries(ERROR_CODES)
  t.true(entries.length > 30)
  t.true(entries.every(([code, e]) => code.startsWith('ERR_') && e.description.length > 10))
  const numbers = entries.map(([, e]) => e.errno).filter((n) => n !== undefined)
  t.is(new Set(numbers).size, numbers.length, 'no number names two codes')
  t.is(ERROR_CODES.ERR_OBJECT_NOT_FOUND.errno, -704)
  t.true(retryable('ERR_SOCKET'))
})

test('a native error carries its code, its number and its causes as an Error chain', async (t) => {
  const engine = await TransferEngine.create({ localServerName: '127.0.0.1', metadata: 'P2PHANDSHAKE', connectTimeoutMs: 2000 })
  try {
    const error = await t.throwsAsync(engine.openSegment('127.0.0.1:1'), { instanceOf: MooncakeError })
    t.is(error!.code, 'ERR_SOCKET')
    t.is(error!.errno, -102)
    t.false(error!.message.includes('Caused by'), 'the causes are not in the message')
    t.true(error!.cause instanceof Error, 'the cause is an Error')
    t.regex((error!.cause as Error).message, /refused/i)
  } finally {
    await engine.close()
  }
})

test('an argument napi cannot convert is ERR_INVALID_ARGUMENT; a code the core has is kept', async (t) => {
  const engine = await TransferEngine.create({ localServerName: '127.0.0.1', metadata: 'P2PHANDSHAKE' })
  try {
    const wrongType = t.throws(() => engine.allocate('lots' as never), { instanceOf: MooncakeError })
    t.is(wrongType!.code, 'ERR_INVALID_ARGUMENT')
    const zero = t.throws(() => engine.allocate(0), { instanceOf: MooncakeError })
    t.is(zero!.code, 'ERR_INVALID_ARGUMENT')
    t.is(zero!.errno, -600)
  } finally {
    await engine.close()
  }
})
