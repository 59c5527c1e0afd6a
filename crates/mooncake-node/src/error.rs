//! Core errors to JavaScript. The stable code travels at the front of the message as
//! `[ERR_...] `, because promise rejections only carry napi's own status; the TypeScript facade
//! turns it into a `MooncakeError` with `code`, `errno` and the "Caused by" chain.

use mooncake_common::{Error, ErrorKind};
use napi_derive::napi;

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

/// One entry of the error catalogue.
#[napi(object)]
pub struct ErrorCode {
    /// Stable string code.
    pub code: String,
    /// Mooncake's numeric code, where it has one.
    pub errno: Option<i32>,
}

/// Every error code the core can produce.
#[napi]
pub fn error_catalog() -> Vec<ErrorCode> {
    ErrorKind::ALL
        .iter()
        .map(|kind| ErrorCode {
            code: kind.code().to_owned(),
            errno: kind.errno(),
        })
        .collect()
}

/// The `[ERR_...] message` form of a core error, for per-item failures.
pub(crate) fn to_napi_reason(error: mooncake_common::Error) -> String {
    to_napi(error).reason
}
