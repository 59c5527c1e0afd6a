//! Hot pieces of the core: slicing, the two codecs, completion counting and range lookup.
//!
//! cargo bench -p mooncake-te

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mooncake_metadata::handshake::frame::{self, MessageType};
use mooncake_te::slicing;
use mooncake_transport::tcp::wire::{Header, Op, Status, Version};
use mooncake_transport::{BatchProgress, MemoryRegistry, Region, Task};

fn slicing(c: &mut Criterion) {
    let mut group = c.benchmark_group("slicing");
    group.throughput(Throughput::Elements(1));
    group.bench_function("64 MiB request into 1 MiB slices", |b| {
        b.iter(|| {
            slicing::slices(black_box(64 << 20), black_box(1 << 20))
                .map(|(_, l)| l)
                .sum::<usize>()
        })
    });
    group.bench_function("slice_count", |b| {
        b.iter(|| slicing::slice_count(black_box(10 << 20 | 12345), black_box(1 << 20)))
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

criterion_group!(benches, slicing, codecs, completion, registry);
criterion_main!(benches);
