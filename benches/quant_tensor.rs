//! `quant_tensor`'s block step, fused against unfused, in one run: on one 128 x 4096 float32 block
//! slab (2 MiB), `block_absmax` + `scales_symmetric` + `quantize` over the whole slab (two passes
//! over it) against `quantize_block` (one pass over column tiles) at several tile widths, on the
//! dispatched tier, one thread; then `tensor::quant_tensor` and `tensor::dq_tensor` on a whole
//! 4096 x 4096 float32 weight (block 128 along axis 0, all cores).
//! `cargo bench --bench quant_tensor -- --warm-up-time 1 --measurement-time 3`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nibble::kernels::*;
use nibble::tensor::{self, Blocking, Dequantized};
use nibble::{Bits, BlockSize, FloatFormat, Tier, WeightData};
use std::hint::black_box;

fn data(n: usize) -> Vec<f32> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect()
}

fn slab(c: &mut Criterion) {
    let (rows, cols) = (128usize, 4096usize);
    let (format, bits, tier) = (FloatFormat::F32, Bits::Four, Tier::best());
    // Slabs cycled through so that each call reads its slab from memory, as quant_tensor does
    // (one 2 MiB slab alone would stay in the L2 and L3 between calls): 32 slabs, 64 MiB.
    let slabs: Vec<Vec<f32>> = (0..32).map(|i| data(rows * cols + i)[i..].to_vec()).collect();
    let mut next = 0usize;
    let mut pick = || {
        next = (next + 1) % slabs.len();
        &slabs[next]
    };
    let mut g = c.benchmark_group("quant_tensor_block_128x4096_f32");
    g.throughput(Throughput::Bytes((rows * cols * 4) as u64));
    let mut amax = vec![0.0f32; cols];
    let mut scale = vec![0.0f32; cols];
    let mut codes = vec![0u8; rows * cols];
    g.bench_function("unfused", |b| {
        b.iter(|| {
            let w = black_box(pick());
            block_absmax_with(tier, w, cols, &mut amax).unwrap();
            scales_symmetric_with(tier, format, bits, &amax, 1.0, &mut scale).unwrap();
            quantize_with(tier, format, bits, w, cols, &scale, None, &mut codes).unwrap();
        })
    });
    for tile in [64usize, 256, 1024, 4096] {
        g.bench_with_input(BenchmarkId::new("fused_tile", tile), &tile, |b, &tile| {
            b.iter(|| {
                let w = black_box(pick());
                quantize_block_tiled_with(tier, format, bits, w, cols, tile, 1.0, false, &mut scale, None, &mut codes)
                    .unwrap()
            })
        });
    }
    g.bench_function(BenchmarkId::new("fused_default", tile_columns(rows)), |b| {
        b.iter(|| {
            let w = black_box(pick());
            quantize_block_with(tier, format, bits, w, cols, 1.0, false, &mut scale, None, &mut codes).unwrap()
        })
    });
    g.finish();
}

fn whole(c: &mut Criterion) {
    let n = 4096usize;
    let w = data(n * n);
    let b = Blocking::new(&[n, n], 0, BlockSize::Blocked(128)).unwrap();
    let mut codes = vec![0u8; n * n];
    let mut out = vec![0.0f32; n * n];
    let mut g = c.benchmark_group("tensor_4096x4096_f32_b128");
    g.sample_size(10);
    g.throughput(Throughput::Bytes((n * n * 4) as u64));
    for zp in [false, true] {
        g.bench_with_input(BenchmarkId::new("quant_tensor", zp), &zp, |bn, &zp| {
            bn.iter(|| tensor::quant_tensor(WeightData::F32(black_box(&w)), b, 1.0, zp, Bits::Four, &mut codes).unwrap())
        });
        let s = tensor::quant_tensor(WeightData::F32(&w), b, 1.0, zp, Bits::Four, &mut codes).unwrap();
        g.bench_with_input(BenchmarkId::new("dq_tensor", zp), &zp, |bn, &zp| {
            bn.iter(|| {
                let out = Dequantized::F32(&mut out);
                tensor::dq_tensor(black_box(&codes), !zp, b, &s.scale, s.zero_point.as_deref(), out).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, slab, whole);
criterion_main!(benches);
