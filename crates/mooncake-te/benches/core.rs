//! Hot pieces of the core: slicing, the two codecs, completion counting, range lookup, rail
//! selection and bulk copies.
//!
//! cargo bench -p mooncake-te

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mooncake_metadata::handshake::frame::{self, MessageType};
use mooncake_transport::copy::copy_bytes;
use mooncake_transport::rail::{RailPolicy, RailSet};
use mooncake_transport::slicing;
use mooncake_transport::tcp::wire::{Header, Op, Status, Version};
use mooncake_transport::{BatchProgress, MemoryRegistry, Region, Task};

fn slicing(c: &mut Criterion) {
    let mut group = c.benchmark_group("slicing");
    group.throughput(Throughput::Elements(1));
    group.bench_function("64 MiB request into 1 MiB slices", |b| {
        b.iter(|| {
            slicing::slices(black_box(64 << 20), black_box(1 << 20), 1 << 18)
                .map(|(_, l)| l)
                .sum::<usize>()
        })
    });
    group.bench_function("slice_count", |b| {
        b.iter(|| slicing::slice_count(black_box(10 << 20 | 12345), black_box(1 << 20), 1 << 18))
    });
    group.finish();
}

fn codecs(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    let header = Header {
        size: 1 << 20,
        addr: 0x7f00_0000_1000,
        op: Op::Write,
        version: Version::V2,
    };
    group.bench_function("tcp header encode+decode", |b| {
        b.iter(|| Header::decode(&black_box(header).encode()).ok())
    });
    group.bench_function("tcp status decode", |b| {
        b.iter(|| Status::decode(black_box(&Status::Ok.encode())))
    });
    let notify = frame::encode(
        MessageType::Notify,
        br#"{"name":"127.0.0.1:15001","notify_msg":"kv-ready"}"#,
    );
    group.bench_function("handshake frame check+parse", |b| {
        b.iter(|| {
            let total = frame::check(black_box(&notify), 1 << 20).ok()?;
            Some(frame::parse(&notify, total))
        })
    });
    group.finish();
}

fn completion(c: &mut Criterion) {
    let mut group = c.benchmark_group("completion");
    group.throughput(Throughput::Elements(128));
    group.bench_function("settle a batch of 128 one-slice tasks", |b| {
        b.iter(|| {
            let progress = BatchProgress::new(128);
            for _ in 0..128 {
                Task::new(1, progress.clone()).slice_done(65536);
            }
            progress.is_settled()
        })
    });
    group.bench_function("poll status of 128 tasks", |b| {
        let progress = BatchProgress::new(128);
        let tasks: Vec<_> = (0..128).map(|_| Task::new(4, progress.clone())).collect();
        b.iter(|| tasks.iter().filter(|t| t.status().is_terminal()).count())
    });
    group.finish();
}

fn registry(c: &mut Criterion) {
    let registry = MemoryRegistry::default();
    for i in 0..1024usize {
        // SAFETY: these regions are only looked up, never read or written.
        let region =
            unsafe { Region::external(0x1000_0000 + i * 0x10_0000, 0x8_0000, "*", Box::new(())) };
        registry.register(region).expect("disjoint");
    }
    c.bench_function("registry lookup among 1024 regions", |b| {
        b.iter(|| {
            registry.find(
                black_box(0x1000_0000 + 517 * 0x10_0000 + 4096),
                black_box(65536),
            )
        })
    });
}

fn rails(c: &mut Criterion) {
    let pairs = |from: usize, to: usize| {
        (from..to)
            .map(|i| (format!("mlx5_{i}"), format!("peer@mlx5_{i}")))
            .collect::<Vec<_>>()
    };
    let mut group = c.benchmark_group("rails");
    group.throughput(Throughput::Elements(1));
    let eight = RailSet::new(RailPolicy::default(), pairs(0, 4), pairs(4, 8));
    group.bench_function("pick and settle a slice among 4+4 rails", |b| {
        b.iter(|| {
            let rail = eight.pick(black_box(65536), None).expect("a usable rail");
            eight.done(rail, 65536);
        })
    });
    let degraded = RailSet::new(RailPolicy::default(), pairs(0, 4), pairs(4, 8));
    (0..4).for_each(|i| degraded.pause(i));
    group.bench_function("pick a slice when every preferred rail is down", |b| {
        b.iter(|| {
            let rail = degraded
                .pick(black_box(65536), None)
                .expect("a usable rail");
            degraded.done(rail, 65536);
        })
    });
    group.finish();
}

/// 1 MiB blocks between two 256 MiB regions, each block somewhere else (cold, as a store's
/// segment and staging are): `memcpy` against the streaming copy.
fn copies(c: &mut Criterion) {
    const REGION: usize = 256 << 20;
    const BLOCK: usize = 1 << 20;
    let src = vec![0x5au8; REGION];
    let mut dst = vec![0xa5u8; REGION];
    let mut group = c.benchmark_group("copy");
    group.throughput(Throughput::Bytes(BLOCK as u64));
    group.sample_size(30);
    let mut next = 0usize;
    let mut block = || {
        next = (next + 7) % (REGION / BLOCK);
        next * BLOCK
    };
    group.bench_function("memcpy 1 MiB, cold", |b| {
        b.iter(|| {
            let (from, to) = (block(), block());
            dst[to..to + BLOCK].copy_from_slice(&src[from..from + BLOCK]);
        })
    });
    group.bench_function("copy_bytes 1 MiB, cold", |b| {
        b.iter(|| {
            let (from, to) = (block(), block());
            // SAFETY: both ranges lie inside their own vectors.
            unsafe { copy_bytes(src[from..].as_ptr(), dst[to..].as_mut_ptr(), BLOCK) };
        })
    });
    group.finish();
    black_box(&dst);
}

criterion_group!(benches, slicing, codecs, completion, registry, rails, copies);
criterion_main!(benches);
