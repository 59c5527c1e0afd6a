//! Core errors to JavaScript. The stable code travels at the front of the message as
//! `[ERR_...] `, and each cause on a `Caused by: ` line after it, because promise rejections
//! only carry napi's own status; the TypeScript facade turns that into a `MooncakeError` with
//! `code`, `errno` and a `cause` chain.

use mooncake_common::Error;

/// Converts a core error.
pub(crate) fn to_napi(error: Error) -> napi::Error {
    napi::Error::new(
        napi::Status::GenericFailure,
        format!("[{}] {}", error.kind().code(), error.report()),
    )
}

/// Shorthand for `.map_err(to_napi)`.
pub(crate) trait IntoNapi<T> {
    fn napi(self) -> napi::Result<T>;
}

impl<T> IntoNapi<T> for mooncake_common::Result<T> {
    fn napi(self) -> napi::Result<T> {
        self.map_err(to_napi)
    }
}

/// An argument error with the stable code.
pub(crate) fn invalid(message: impl Into<String>) -> napi::Error {
    to_napi(Error::invalid(message))
}

/// The `[ERR_...] message` form of a core error, for per-item failures.
pub(crate) fn to_napi_reason(error: mooncake_common::Error) -> String {
    to_napi(error).reason
}
