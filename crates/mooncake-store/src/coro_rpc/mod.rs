//! Mooncake's own master protocol: coro_rpc framing with struct_pack bodies, as Mooncake's
//! C++ `MasterClient` (inside its Python `MooncakeDistributedStore`) and `mooncake_master`
//! speak it. Sans-IO: [`frame`] reads and writes headers, [`struct_pack`] bodies, and
//! [`messages`] names the functions and their types.

pub mod frame;
pub mod messages;
pub mod struct_pack;

/// Reads a frame's `length` body bytes, then drops its `attach_length` attachment bytes (the
/// master's calls carry none). The body grows as bytes arrive: a header alone never reserves
/// memory.
pub(crate) async fn read_body<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    length: u32,
    attach_length: u32,
) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut body = Vec::new();
    (&mut *reader)
        .take(u64::from(length))
        .read_to_end(&mut body)
        .await?;
    if body.len() != length as usize {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let mut attachment = (&mut *reader).take(u64::from(attach_length));
    tokio::io::copy(&mut attachment, &mut tokio::io::sink()).await?;
    Ok(body)
}
