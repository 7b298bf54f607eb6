//! GPTQ's stages on the layer shapes of a 135M-parameter LM (hidden 576, MLP 1536) with
//! T = 2048 calibration rows (16 samples x 128 tokens):
//! - Hessian accumulation `X^T X` (`[2048, K]` in 16 batches of 128 rows, as waves deliver them);
//! - the factor (dead inputs, dampening, Cholesky, triangular inverse);
//! - `gptq_quantize` on 576 x 1536 (gate/up) and 1536 x 576 (down), block 128, from the factor;
//! - the data-free scale search on the same weights.
//!
//! `cargo bench --bench gptq -- --warm-up-time 1 --measurement-time 5`

mod common;
use common::data;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nibble::gptq::{gptq_quantize_factored, GptqFactor, GptqParams, Hessian, ScaleRule};
use nibble::scale_search::{scale_search_weight, ScaleGrid};
use nibble::{BlockSize, QuantParams, WeightData};
use std::hint::black_box;

fn hessian(x: &[f32], k: usize) -> Hessian {
    let mut h = Hessian::new(k);
    for batch in x.chunks(128 * k) {
        h.add_batch(batch).unwrap();
    }
    h
}

fn gptq(c: &mut Criterion) {
    let t = 2048;
    let mut g = c.benchmark_group("gptq");
    g.sample_size(10);
    for k in [576usize, 1536] {
        let x = data(t * k, k as u64);
        g.throughput(Throughput::Elements((t * k * k) as u64));
        g.bench_function(format!("hessian_K{k}_T{t}"), |b| b.iter(|| hessian(black_box(&x), k)));
        let h = hessian(&x, k);
        g.throughput(Throughput::Elements((k * k) as u64));
        g.bench_function(format!("factor_K{k}"), |b| b.iter(|| GptqFactor::new(black_box(&h), 0.01, false).unwrap()));
        let n = if k == 576 { 1536 } else { 576 };
        let w = data(k * n, 7);
        g.throughput(Throughput::Elements((k * n) as u64));
        for act_order in [false, true] {
            let f = GptqFactor::new(&h, 0.01, act_order).unwrap();
            let p = GptqParams { act_order, ..GptqParams::new(BlockSize::Blocked(128)) };
            g.bench_function(format!("gptq_{k}x{n}_block128{}", if act_order { "_act_order" } else { "" }), |b| {
                b.iter(|| gptq_quantize_factored(WeightData::F32(black_box(&w)), &f, &p).unwrap())
            });
        }
        let f = GptqFactor::new(&h, 0.01, false).unwrap();
        let p = GptqParams {
            scale_rule: ScaleRule::Search { grid: ScaleGrid::default(), hessian_weighted: false },
            ..GptqParams::new(BlockSize::Blocked(128))
        };
        g.bench_function(format!("gptq_{k}x{n}_block128_scale_search"), |b| {
            b.iter(|| gptq_quantize_factored(WeightData::F32(black_box(&w)), &f, &p).unwrap())
        });
        let q = QuantParams::rtn(BlockSize::Blocked(128));
        g.bench_function(format!("scale_search_{k}x{n}_block128"), |b| {
            b.iter(|| {
                scale_search_weight(WeightData::F32(black_box(&w)), [k, n], &q, &ScaleGrid::default(), None).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, gptq);
criterion_main!(benches);
