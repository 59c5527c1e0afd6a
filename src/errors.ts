import { ERROR_CODES, type MooncakeErrorCode } from './error-codes'

export type { MooncakeErrorCode } from './error-codes'
export { ERROR_CODES } from './error-codes'

/**
 * Every error the package throws or rejects with.
 *
 * `code` is stable and meant for branching (`'ERR_ADDRESS_NOT_REGISTERED'`, `'ERR_TIMEOUT'`, ...;
 * {@link MooncakeErrorCode} lists them all, {@link ERROR_CODES} says what each means); `errno` is
 * Mooncake's numeric code where one exists (`-704` for `ERR_OBJECT_NOT_FOUND`). What caused the
 * error, when the core knows it, is `cause`: an `Error` whose own `cause` continues the chain.
 */
export class MooncakeError extends Error {
  /** Stable string code, `ERR_*`. */
  readonly code: MooncakeErrorCode
  /** Mooncake's numeric error code, where it defines one. */
  readonly errno?: number

  constructor(code: MooncakeErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'MooncakeError'
    this.code = code
    this.errno = ERROR_CODES[code]?.errno
  }
}

/** A native error's message: `[ERR_X] message`, then one `Caused by: ...` line per cause. */
const CODED = /^\[(ERR_[A-Z0-9_]+)\] ([\s\S]*)$/
const CAUSED_BY = '\nCaused by: '

/** napi's own codes for arguments it could not convert (a string where a number belongs, ...). */
const ARGUMENT_STATUSES = new Set([
  'InvalidArg',
  'ObjectExpected',
  'StringExpected',
  'NameExpected',
  'FunctionExpected',
  'NumberExpected',
  'BooleanExpected',
  'ArrayExpected',
  'BigintExpected',
  'DateExpected',
  'ArrayBufferExpected',
  'DetachableArraybufferExpected',
])

function isCode(code: string): code is MooncakeErrorCode {
  return Object.prototype.hasOwnProperty.call(ERROR_CODES, code)
}

/** The chain of causes, innermost last, as nested `Error`s. */
function causes(lines: string[]): Error | undefined {
  return lines.reduceRight<Error | undefined>((inner, line) => new Error(line, inner ? { cause: inner } : undefined), undefined)
}

/** Turns whatever the native layer threw into a `MooncakeError`. */
export function toMooncakeError(error: unknown): MooncakeError {
  if (error instanceof MooncakeError) return error
  const message = error instanceof Error ? error.message : String(error)
  const coded = CODED.exec(message)
  if (coded && isCode(coded[1])) {
    const [text, ...chain] = coded[2].split(CAUSED_BY)
    const cause = causes(chain)
    return new MooncakeError(coded[1], text, cause ? { cause } : undefined)
  }
  const status = (error as { code?: unknown } | null)?.code
  if (typeof status === 'string' && ARGUMENT_STATUSES.has(status)) {
    return new MooncakeError('ERR_INVALID_ARGUMENT', message, { cause: error })
  }
  return new MooncakeError('ERR_INTERNAL_ERROR', message, { cause: error })
}

/** Runs a synchronous native call, converting its error. */
export function native<T>(call: () => T): T {
  try {
    return call()
  } catch (error) {
    throw toMooncakeError(error)
  }
}

/** Awaits a native promise (or a native call that may throw first), converting its error. */
export async function nativeAsync<T>(call: () => Promise<T>): Promise<T> {
  try {
    return await call()
  } catch (error) {
    throw toMooncakeError(error)
  }
}

/** The error for a caller mistake caught in TypeScript before reaching native code. */
export function invalidArgument(message: string): MooncakeError {
  return new MooncakeError('ERR_INVALID_ARGUMENT', message)
}
