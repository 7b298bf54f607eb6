//! Every kernel on every available tier, beside a plain memory-read baseline, with
//! `Throughput::Bytes` of the weight bytes read, so results read as a fraction of bandwidth.
//! `cargo bench --bench kernels -- --warm-up-time 1 --measurement-time 3`

mod common;
use common::data;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nibble::kernels::*;
use nibble::quantize_weight::quantize_weight_with;
use nibble::{BlockSize, FloatFormat, QuantParams, Tier, WeightData};
use std::hint::black_box;

fn kernels(c: &mut Criterion) {
    // One block slab: 128 rows x 4096 columns of f32 (2 MiB, as a 4096-wide layer's block).
    let (rows, cols) = (128usize, 4096usize);
    let w = data(rows * cols, common::SLAB_SEED);
    let bytes = (w.len() * 4) as u64;
    let mut g = c.benchmark_group("slab_128x4096_f32");
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("memory_read_baseline", |b| b.iter(|| black_box(w.iter().fold(0u32, |a, x| a ^ x.to_bits()))));
    for tier in Tier::available() {
        let mut amax = vec![0.0f32; cols];
        block_absmax_with(tier, &w, cols, &mut amax).unwrap();
        let mut scale = vec![0.0f32; cols];
        scales_symmetric_with(tier, FloatFormat::F32, nibble::Bits::Four, &amax, 1.0, &mut scale).unwrap();
        let mut codes = vec![0u8; w.len()];
        let mut packed = vec![0u8; w.len() / 2];
        let mut out = vec![0.0f32; w.len()];
        g.bench_with_input(BenchmarkId::new("block_absmax", tier.name()), &tier, |b, &t| {
            b.iter(|| block_absmax_with(t, black_box(&w), cols, &mut amax).unwrap())
        });
        let (mut lo, mut hi) = (vec![0.0f32; cols], vec![0.0f32; cols]);
        g.bench_with_input(BenchmarkId::new("block_minmax", tier.name()), &tier, |b, &t| {
            b.iter(|| block_minmax_with(t, black_box(&w), cols, false, &mut lo, &mut hi).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("quantize", tier.name()), &tier, |b, &t| {
            b.iter(|| {
                quantize_with(t, FloatFormat::F32, nibble::Bits::Four, black_box(&w), cols, &scale, None, &mut codes)
                    .unwrap()
            })
        });
        g.bench_with_input(BenchmarkId::new("quantize_handwritten", tier.name()), &tier, |b, &t| {
            b.iter(|| {
                nibble::kernels::quantize::quantize_handwritten_with(
                    t,
                    FloatFormat::F32,
                    nibble::Bits::Four,
                    black_box(&w),
                    cols,
                    &scale,
                    None,
                    &mut codes,
                )
                .unwrap()
            })
        });
        g.bench_with_input(BenchmarkId::new("quantize_f16_rounding", tier.name()), &tier, |b, &t| {
            b.iter(|| {
                quantize_with(t, FloatFormat::F16, nibble::Bits::Four, black_box(&w), cols, &scale, None, &mut codes)
                    .unwrap()
            })
        });
        g.bench_with_input(BenchmarkId::new("quantize_packed", tier.name()), &tier, |b, &t| {
            b.iter(|| {
                quantize_packed_with(t, FloatFormat::F32, black_box(&w), cols, &scale, None, &mut packed).unwrap()
            })
        });
        g.bench_with_input(BenchmarkId::new("quantize_packed_handwritten", tier.name()), &tier, |b, &t| {
            b.iter(|| {
                nibble::kernels::quantize_packed::quantize_packed_handwritten_with(
                    t,
                    FloatFormat::F32,
                    black_box(&w),
                    cols,
                    &scale,
                    None,
                    &mut packed,
                )
                .unwrap()
            })
        });
        g.bench_with_input(BenchmarkId::new("pack_nibbles", tier.name()), &tier, |b, &t| {
            b.iter(|| pack_nibbles_with(t, black_box(&codes), &mut packed).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("dequantize", tier.name()), &tier, |b, &t| {
            b.iter(|| dequantize_with(t, FloatFormat::F32, black_box(&codes), cols, &scale, None, &mut out).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("qdq_error", tier.name()), &tier, |b, &t| {
            b.iter(|| {
                qdq_error_with(
                    t,
                    FloatFormat::F32,
                    nibble::Bits::Four,
                    black_box(&w),
                    cols,
                    &scale,
                    None,
                    QdqOutput::Error,
                    &mut out,
                )
                .unwrap()
            })
        });
        let w16: Vec<half::f16> = w.iter().map(|&x| half::f16::from_f32(x)).collect();
        g.throughput(Throughput::Bytes((w16.len() * 2) as u64));
        g.bench_with_input(BenchmarkId::new("widen_f16", tier.name()), &tier, |b, &t| {
            b.iter(|| widen_f16_with(t, black_box(&w16), &mut out).unwrap())
        });
        g.throughput(Throughput::Bytes(bytes));
    }
    g.finish();
}

fn block_dot_macs(c: &mut Criterion) {
    // AWQ-clip's exact products: 64 tokens x one 128-row block of a 1024-column weight, per call.
    let (t, rows, cols) = (64usize, 128usize, 1024usize);
    let x = data(t * rows, common::SLAB_SEED);
    let w = data(rows * cols, common::SLAB_SEED);
    let mut out = vec![0.0f32; t * cols];
    let mut g = c.benchmark_group("block_dot_64x128x1024");
    g.throughput(Throughput::Elements((t * rows * cols) as u64));
    for tier in Tier::available() {
        for format in [FloatFormat::F32, FloatFormat::F16] {
            let id = BenchmarkId::new(format!("{format:?}"), tier.name());
            g.bench_with_input(id, &tier, |b, &tr| {
                b.iter(|| block_dot_with(tr, format, black_box(&x), &w, [rows, cols], &mut out).unwrap())
            });
        }
    }
    g.finish();
}

fn whole_weight(c: &mut Criterion) {
    // A 4096 x 4096 weight (64 MiB f32, 32 MiB f16), block 128, all cores.
    let (k, n) = (4096usize, 4096usize);
    let w = data(k * n, common::SLAB_SEED);
    let w16: Vec<half::f16> = w.iter().map(|&x| half::f16::from_f32(x)).collect();
    let params = QuantParams::rtn(BlockSize::Blocked(128));
    let mut g = c.benchmark_group("quantize_weight_4096x4096");
    g.sample_size(10);
    g.throughput(Throughput::Bytes((w.len() * 4) as u64));
    g.bench_function("memory_read_baseline_f32", |b| b.iter(|| black_box(w.iter().fold(0u32, |a, x| a ^ x.to_bits()))));
    for tier in Tier::available() {
        g.bench_with_input(BenchmarkId::new("f32", tier.name()), &tier, |b, &t| {
            b.iter(|| quantize_weight_with(t, WeightData::F32(black_box(&w)), [k, n], &params).unwrap())
        });
    }
    g.throughput(Throughput::Bytes((w16.len() * 2) as u64));
    for tier in Tier::available() {
        g.bench_with_input(BenchmarkId::new("f16", tier.name()), &tier, |b, &t| {
            b.iter(|| quantize_weight_with(t, WeightData::F16(black_box(&w16)), [k, n], &params).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, kernels, block_dot_macs, whole_weight);
criterion_main!(benches);
