//! A raw TCP socket pump: the baseline the engine is measured against.
//!
//! One stream between two processes, `block_size` writes cycling through a buffer as large as
//! the engine bench uses (so both sides touch DRAM, not cache), no framing per block. The
//! client sends `op` (0 read: the server streams to the client; 1 write: the client streams to
//! the server) and the block size as two little-endian u64s, then data flows until the client
//! hangs up.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use mooncake_common::{Error, Result};

use super::BenchReport;
use crate::Opcode;

/// A pump server on its own thread; serves one client at a time until the process exits.
pub fn serve(host: &str, port: u16, buffer_size: usize) -> Result<u16> {
    let listener =
        TcpListener::bind((host, port)).map_err(|e| Error::socket("bind raw pump", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::socket("raw pump address", e))?
        .port();
    std::thread::Builder::new()
        .name("raw-pump".into())
        .spawn(move || {
            let mut buffer = vec![0x5au8; buffer_size.max(1)];
            for stream in listener.incoming().flatten() {
                if let Err(e) = serve_one(stream, &mut buffer) {
                    tracing::debug!("raw pump client ended: {e}");
                }
            }
        })
        .map_err(|e| {
            Error::new(
                mooncake_common::ErrorKind::Memory,
                format!("spawn raw pump: {e}"),
            )
        })?;
    Ok(port)
}

fn serve_one(mut stream: TcpStream, buffer: &mut [u8]) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut hello = [0u8; 16];
    stream.read_exact(&mut hello)?;
    let op = u64::from_le_bytes(hello[..8].try_into().expect("8 bytes"));
    let block = (u64::from_le_bytes(hello[8..].try_into().expect("8 bytes")) as usize)
        .clamp(1, buffer.len());
    let slots = buffer.len() / block;
    let mut slot = 0;
    loop {
        let chunk = &mut buffer[slot * block..(slot + 1) * block];
        let result = if op == 0 {
            stream.write_all(chunk)
        } else {
            stream.read_exact(chunk)
        };
        if result.is_err() {
            return Ok(());
        }
        slot = (slot + 1) % slots;
    }
}

/// Pumps for `duration` and reports the client-side throughput.
pub fn run(
    addr: &str,
    op: Opcode,
    block_size: usize,
    buffer_size: usize,
    duration: Duration,
) -> Result<BenchReport> {
    let mut stream = TcpStream::connect(addr)
        .map_err(|e| Error::socket(format!("connect raw pump {addr}"), e))?;
    stream
        .set_nodelay(true)
        .map_err(|e| Error::socket("nodelay", e))?;
    let block = block_size.clamp(1, buffer_size.max(1));
    let mut hello = [0u8; 16];
    hello[..8].copy_from_slice(&u64::from(op == Opcode::Write).to_le_bytes());
    hello[8..].copy_from_slice(&(block as u64).to_le_bytes());
    stream
        .write_all(&hello)
        .map_err(|e| Error::socket("raw pump hello", e))?;
    let mut buffer = vec![0xa5u8; buffer_size.max(block)];
    let slots = buffer.len() / block;
    let (mut slot, mut bytes, mut blocks) = (0, 0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < duration {
        let chunk = &mut buffer[slot * block..(slot + 1) * block];
        let moved = match op {
            Opcode::Read => stream.read_exact(chunk),
            Opcode::Write => stream.write_all(chunk),
        };
        moved.map_err(|e| Error::socket("raw pump", e))?;
        bytes += block as u64;
        blocks += 1;
        slot = (slot + 1) % slots;
    }
    let seconds = start.elapsed().as_secs_f64();
    let _ = stream.shutdown(Shutdown::Both);
    Ok(BenchReport::throughput(bytes, blocks, seconds))
}

/// Single-threaded `memcpy` of `block_size` pieces cycling through two `buffer_size` buffers
/// (DRAM-resident when larger than the caches): the ceiling for same-host copies.
pub fn memcpy(block_size: usize, buffer_size: usize, duration: Duration) -> Result<BenchReport> {
    let block = block_size.clamp(1, buffer_size.max(1));
    let source = vec![0x5au8; buffer_size.max(block)];
    let mut target = vec![0u8; buffer_size.max(block)];
    let slots = source.len() / block;
    let (mut slot, mut bytes, mut blocks) = (0, 0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < duration {
        for _ in 0..16 {
            let range = slot * block..(slot + 1) * block;
            target[range.clone()].copy_from_slice(&source[range]);
            slot = (slot + 1) % slots;
        }
        std::hint::black_box(&mut target);
        bytes += 16 * block as u64;
        blocks += 16;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(BenchReport::throughput(bytes, blocks, seconds))
}
