//! The part of struct_pack (yalantinglibs' binary format) that Mooncake's master RPC uses:
//! fixed-width little-endian integers, bool, strings, vectors, optionals, `tl::expected`,
//! variants, structs and tuples of those.
//!
//! A body is `[type hash u32][metainfo u8]?[type literal, NUL]?[payload]`. The hash is the
//! first four bytes of the MD5 of the type's literal, big-endian, with bit 0 cleared; bit 0
//! set says a metainfo byte follows. Container lengths are fixed-width for the whole message:
//! 1 byte while every container has fewer than 256 elements, else 2, 4 or 8.

use md5::{Digest, Md5};

/// Why a body could not be read as the expected type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The type hash names another type: a peer of another wire version.
    #[error("type hash {got:#010x} is not the expected {expected:#010x}")]
    TypeMismatch {
        /// The hash of the type this side expects.
        expected: u32,
        /// The hash the body carries.
        got: u32,
    },
    /// The body carries a type literal other than the expected one.
    #[error("the body's type literal is not the expected one")]
    LiteralMismatch,
    /// A `struct_pack::compatible` field size, which no Mooncake master type uses.
    #[error("metainfo {0:#04x} asks for compatible fields, which this wire never uses")]
    Compatible(u8),
    /// The body ends before the value does.
    #[error("the body ends early")]
    Truncated,
    /// Bytes are left after the value.
    #[error("{0} bytes are left after the value")]
    Trailing(usize),
    /// A tag byte (bool, optional, expected, variant) out of range.
    #[error("{what} tag {tag} is out of range")]
    BadTag {
        /// What was being read.
        what: &'static str,
        /// The byte found.
        tag: u8,
    },
    /// A string that is not UTF-8.
    #[error("a string is not UTF-8")]
    NotUtf8,
}

/// A type that struct_pack can write and read.
pub trait Pack: Sized {
    /// Appends the type's literal (its shape, as struct_pack spells it).
    fn literal(out: &mut Vec<u8>);
    /// The most elements any container in this value has: it picks the length width.
    fn max_len(&self) -> usize {
        0
    }
    /// Appends the payload.
    fn write(&self, w: &mut Writer);
    /// Reads the payload.
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError>;
}

/// The first four bytes of `text`'s MD5, read big-endian: coro_rpc's function ids and
/// struct_pack's type hashes.
pub fn md5_32(text: &[u8]) -> u32 {
    let digest = Md5::digest(text);
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// `T`'s literal.
pub fn literal_of<T: Pack>() -> Vec<u8> {
    let mut out = Vec::new();
    T::literal(&mut out);
    out
}

/// `T`'s type hash (bit 0 clear).
pub fn hash_of<T: Pack>() -> u32 {
    md5_32(&literal_of::<T>()) & !1
}

const ADD_TYPE_INFO: u8 = 0b100;
const COMPATIBLE_SIZE: u8 = 0b11;

/// Encodes `value` as a message body. With `with_literal` the type literal goes along, as
/// Mooncake's own builds always send it.
pub fn encode<T: Pack>(value: &T, with_literal: bool) -> Vec<u8> {
    let literal = literal_of::<T>();
    let width = width_for(value.max_len());
    let width_code = width.trailing_zeros() as u8;
    let metainfo = with_literal || width != 1;
    let mut w = Writer {
        buf: Vec::with_capacity(64 + literal.len()),
        width,
    };
    let hash = (md5_32(&literal) & !1) | u32::from(metainfo);
    w.buf.extend_from_slice(&hash.to_le_bytes());
    if metainfo {
        let add = if with_literal { ADD_TYPE_INFO } else { 0 };
        w.buf.push(add | width_code << 3);
    }
    if with_literal {
        w.buf.extend_from_slice(&literal);
        w.buf.push(0);
    }
    value.write(&mut w);
    w.buf
}

/// Decodes a message body as `T`: its hash must be `T`'s, a literal that comes along must be
/// `T`'s, and every byte must be used.
pub fn decode<T: Pack>(body: &[u8]) -> Result<T, DecodeError> {
    let literal = literal_of::<T>();
    let expected = md5_32(&literal) & !1;
    let mut r = Reader {
        buf: body,
        width: 1,
    };
    let hash = u32::from_le_bytes(r.array::<4>()?);
    if hash & !1 != expected {
        return Err(DecodeError::TypeMismatch {
            expected,
            got: hash & !1,
        });
    }
    if hash & 1 == 1 {
        let [metainfo] = r.array::<1>()?;
        if metainfo & COMPATIBLE_SIZE != 0 {
            return Err(DecodeError::Compatible(metainfo));
        }
        r.width = 1 << ((metainfo >> 3) & 0b11);
        if metainfo & ADD_TYPE_INFO != 0 {
            let sent = r.take(literal.len() + 1)?;
            if sent[..literal.len()] != literal[..] || sent[literal.len()] != 0 {
                return Err(DecodeError::LiteralMismatch);
            }
        }
    }
    let value = T::read(&mut r)?;
    match r.buf.len() {
        0 => Ok(value),
        left => Err(DecodeError::Trailing(left)),
    }
}

/// Whether a body carries its type literal.
pub fn has_literal(body: &[u8]) -> bool {
    body.len() > 4 && body[0] & 1 == 1 && body[4] & ADD_TYPE_INFO != 0
}

/// The narrowest length width for containers of up to `max` elements.
fn width_for(max: usize) -> usize {
    match max as u64 {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        0x1_0000..=0xffff_ffff => 4,
        _ => 8,
    }
}

/// Where a payload is written.
pub struct Writer {
    buf: Vec<u8>,
    width: usize,
}

impl Writer {
    /// Appends raw bytes.
    pub fn bytes(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Appends a container length in the message's width.
    pub fn length(&mut self, n: usize) {
        self.bytes(&(n as u64).to_le_bytes()[..self.width]);
    }
}

/// Where a payload is read from.
pub struct Reader<'a> {
    buf: &'a [u8],
    width: usize,
}

impl<'a> Reader<'a> {
    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// The next `N` bytes.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A container length. It is checked against the bytes left (every element takes at
    /// least one byte, except in containers of empty structs, which this wire has none of),
    /// so a hostile length never sizes an allocation.
    pub fn length(&mut self) -> Result<usize, DecodeError> {
        let mut raw = [0u8; 8];
        raw[..self.width].copy_from_slice(self.take(self.width)?);
        let n = u64::from_le_bytes(raw);
        match usize::try_from(n) {
            Ok(n) if n <= self.buf.len() => Ok(n),
            _ => Err(DecodeError::Truncated),
        }
    }

    /// A one-byte tag below `limit`.
    pub fn tag(&mut self, what: &'static str, limit: u8) -> Result<u8, DecodeError> {
        let [tag] = self.array::<1>()?;
        if tag < limit {
            Ok(tag)
        } else {
            Err(DecodeError::BadTag { what, tag })
        }
    }
}

macro_rules! pack_int {
    ($($ty:ty => $id:expr),* $(,)?) => {$(
        impl Pack for $ty {
            fn literal(out: &mut Vec<u8>) {
                out.push($id);
            }
            fn write(&self, w: &mut Writer) {
                w.bytes(&self.to_le_bytes());
            }
            fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
                Ok(<$ty>::from_le_bytes(r.array()?))
            }
        }
    )*};
}

pack_int!(i32 => 0x01, u32 => 0x02, i64 => 0x03, u64 => 0x04, u8 => 0x06);

impl Pack for bool {
    fn literal(out: &mut Vec<u8>) {
        out.push(0x0b);
    }
    fn write(&self, w: &mut Writer) {
        w.bytes(&[u8::from(*self)]);
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(r.tag("bool", 2)? == 1)
    }
}

impl Pack for String {
    fn literal(out: &mut Vec<u8>) {
        out.extend_from_slice(&[0x80, 0x0c]);
    }
    fn max_len(&self) -> usize {
        self.len()
    }
    fn write(&self, w: &mut Writer) {
        w.length(self.len());
        w.bytes(self.as_bytes());
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let n = r.length()?;
        let bytes = r.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::NotUtf8)
    }
}

impl<T: Pack> Pack for Vec<T> {
    fn literal(out: &mut Vec<u8>) {
        out.push(0x84);
        T::literal(out);
    }
    fn max_len(&self) -> usize {
        self.iter().map(Pack::max_len).fold(self.len(), usize::max)
    }
    fn write(&self, w: &mut Writer) {
        w.length(self.len());
        for item in self {
            item.write(w);
        }
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let n = r.length()?;
        // Each element takes at least a byte, but may be far larger in memory than on the wire.
        let mut items = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            items.push(T::read(r)?);
        }
        Ok(items)
    }
}

impl<T: Pack> Pack for Option<T> {
    fn literal(out: &mut Vec<u8>) {
        out.push(0x85);
        T::literal(out);
    }
    fn max_len(&self) -> usize {
        self.as_ref().map_or(0, Pack::max_len)
    }
    fn write(&self, w: &mut Writer) {
        match self {
            None => w.bytes(&[0]),
            Some(value) => {
                w.bytes(&[1]);
                value.write(w);
            }
        }
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        match r.tag("optional", 2)? {
            0 => Ok(None),
            _ => Ok(Some(T::read(r)?)),
        }
    }
}

/// `void` in `tl::expected<void, E>` (struct_pack writes it as monostate).
impl Pack for () {
    fn literal(out: &mut Vec<u8>) {
        out.push(0xfa);
    }
    fn write(&self, _: &mut Writer) {}
    fn read(_: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(())
    }
}

/// `tl::expected<T, E>`: a value, or an error.
impl<T: Pack, E: Pack> Pack for Result<T, E> {
    fn literal(out: &mut Vec<u8>) {
        out.push(0x87);
        T::literal(out);
        E::literal(out);
    }
    fn max_len(&self) -> usize {
        match self {
            Ok(value) => value.max_len(),
            Err(error) => error.max_len(),
        }
    }
    fn write(&self, w: &mut Writer) {
        match self {
            Ok(value) => {
                w.bytes(&[1]);
                value.write(w);
            }
            Err(error) => {
                w.bytes(&[0]);
                error.write(w);
            }
        }
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        match r.tag("expected", 2)? {
            1 => Ok(Ok(T::read(r)?)),
            _ => Ok(Err(E::read(r)?)),
        }
    }
}

macro_rules! pack_tuple {
    ($($name:ident)+) => {
        impl<$($name: Pack),+> Pack for ($($name,)+) {
            fn literal(out: &mut Vec<u8>) {
                out.push(0xfd);
                $($name::literal(out);)+
                out.push(0xff);
            }
            #[allow(non_snake_case)]
            fn max_len(&self) -> usize {
                let ($($name,)+) = self;
                0 $(.max($name.max_len()))+
            }
            #[allow(non_snake_case)]
            fn write(&self, w: &mut Writer) {
                let ($($name,)+) = self;
                $($name.write(w);)+
            }
            fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
                Ok(($($name::read(r)?,)+))
            }
        }
    };
}

pack_tuple!(A B);
pack_tuple!(A B C);
pack_tuple!(A B C D);
pack_tuple!(A B C D E);

/// A struct whose fields struct_pack writes in declaration order (a reflected or aggregate
/// C++ struct).
macro_rules! packed_struct {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Default)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl $crate::coro_rpc::struct_pack::Pack for $name {
            fn literal(out: &mut Vec<u8>) {
                out.push(0xfd);
                $(<$ty as $crate::coro_rpc::struct_pack::Pack>::literal(out);)*
                out.push(0xff);
            }
            fn max_len(&self) -> usize {
                0 $(.max($crate::coro_rpc::struct_pack::Pack::max_len(&self.$field)))*
            }
            fn write(&self, w: &mut $crate::coro_rpc::struct_pack::Writer) {
                $($crate::coro_rpc::struct_pack::Pack::write(&self.$field, w);)*
            }
            fn read(
                r: &mut $crate::coro_rpc::struct_pack::Reader<'_>,
            ) -> Result<Self, $crate::coro_rpc::struct_pack::DecodeError> {
                Ok(Self {
                    $($field: <$ty as $crate::coro_rpc::struct_pack::Pack>::read(r)?,)*
                })
            }
        }
    };
}
pub(crate) use packed_struct;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn expected_string_matches_the_captured_service_ready_reply() {
        let reply: Result<String, i32> = Ok("2.0.0".to_owned());
        let body = encode(&reply, true);
        assert_eq!(
            body,
            [
                0x35, 0xcc, 0xb3, 0x1c, 0x04, 0x87, 0x80, 0x0c, 0x01, 0x00, 0x01, 0x05, b'2', b'.',
                b'0', b'.', b'0'
            ]
        );
        assert_eq!(
            encode(&reply, false),
            [0x34, 0xcc, 0xb3, 0x1c, 0x01, 0x05, b'2', b'.', b'0', b'.', b'0']
        );
        assert_eq!(decode::<Result<String, i32>>(&body), Ok(reply));
    }

    #[test]
    fn one_long_string_widens_every_length() {
        let value = (vec!["a".repeat(300)], "default".to_owned());
        let body = encode(&value, false);
        // hash | 1, metainfo: 2-byte lengths, no literal.
        assert_eq!(body[4], 0x08);
        assert_eq!(&body[5..9], &[1, 0, 0x2c, 0x01]);
        assert_eq!(&body[body.len() - 9..body.len() - 7], &[7, 0]);
        assert_eq!(decode::<(Vec<String>, String)>(&body), Ok(value));
        let wide = vec![0u8; 70_000];
        assert_eq!(encode(&wide, false)[4], 0x10);
    }

    #[test]
    fn a_hostile_length_is_refused_before_it_sizes_anything() {
        let mut body = encode(&vec![1u64, 2], false);
        body[4] = 0xff;
        assert_eq!(decode::<Vec<u64>>(&body), Err(DecodeError::Truncated));
        let mut body = encode(&(1u64, "x".to_owned()), true);
        let at = body.len() - 2;
        body[at] = 0x80;
        assert_eq!(decode::<(u64, String)>(&body), Err(DecodeError::Truncated));
    }

    #[test]
    fn another_type_or_literal_is_refused() {
        let body = encode(&7u64, true);
        assert!(matches!(
            decode::<i64>(&body),
            Err(DecodeError::TypeMismatch { .. })
        ));
        let mut body = encode(&(7u64, 8u32), true);
        body[7] = 0x03;
        assert_eq!(
            decode::<(u64, u32)>(&body),
            Err(DecodeError::LiteralMismatch)
        );
        let mut body = encode(&7u64, false);
        body.push(0);
        assert_eq!(decode::<u64>(&body), Err(DecodeError::Trailing(1)));
    }

    type Sample = (
        Vec<String>,
        Option<u64>,
        Result<Vec<(bool, u8)>, i32>,
        (i64, u32, String),
    );

    fn sample() -> impl Strategy<Value = Sample> {
        (
            prop::collection::vec(".{0,300}", 0..4),
            prop::option::of(any::<u64>()),
            prop_oneof![
                prop::collection::vec((any::<bool>(), any::<u8>()), 0..300).prop_map(Ok),
                any::<i32>().prop_map(Err),
            ],
            (any::<i64>(), any::<u32>(), ".{0,8}"),
        )
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_the_identity(value in sample(), literal in any::<bool>()) {
            let body = encode(&value, literal);
            prop_assert_eq!(decode::<Sample>(&body), Ok(value));
        }

        #[test]
        fn arbitrary_bytes_never_panic(mut body in prop::collection::vec(any::<u8>(), 0..64)) {
            if body.len() >= 4 {
                body[..4].copy_from_slice(&(hash_of::<Sample>() | 1).to_le_bytes());
            }
            let _ = decode::<Sample>(&body);
        }
    }
}
