//! The float32 products of AWQ-lite's loss on one core, through each GEMM the crate can use:
//! `matrixmultiply`, `faer` (its own kernels; what nibble uses) and the `gemm` crate, on the shapes of a
//! 768-wide model with 1024 calibration tokens (`[M, K] @ [K, N]`, MACs per second), plus the
//! Gram form's triangular product (`tril(G) @ E`, counted as the full product it replaces).
//! `cargo bench --bench awq_gemm -- --warm-up-time 1 --measurement-time 3`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn products(c: &mut Criterion) {
    let mut g = c.benchmark_group("awq_lite_products");
    g.sample_size(10);
    // (name, m, k, n): the Gram form G @ E for a square and an MLP-up weight, the direct form
    // (x / s) @ dq for the MLP-down weight (T = 1024 < K = 4096).
    for (name, m, k, n) in [
        ("gram_768x768x768", 768usize, 768usize, 768usize),
        ("gram_768x768x4096", 768, 768, 4096),
        ("direct_1024x4096x768", 1024, 4096, 768),
    ] {
        let a = data(m * k, 1);
        let b = data(k * n, 2);
        let mut out = vec![0.0f32; m * n];
        g.throughput(Throughput::Elements((m * k * n) as u64));
        g.bench_function(BenchmarkId::new("matrixmultiply", name), |bch| {
            bch.iter(|| {
                // SAFETY: a, b, out are exactly [m, k], [k, n], [m, n] row-major, the extents sgemm
                // reads and writes with these strides; out does not overlap them.
                unsafe {
                    matrixmultiply::sgemm(
                        m,
                        k,
                        n,
                        1.0,
                        black_box(&a).as_ptr(),
                        k as isize,
                        1,
                        b.as_ptr(),
                        n as isize,
                        1,
                        0.0,
                        out.as_mut_ptr(),
                        n as isize,
                        1,
                    )
                }
            })
        });
        // nibble's own product (faer, one thread).
        g.bench_function(BenchmarkId::new("faer", name), |bch| {
            bch.iter(|| black_box(nibble::awq::matmul::matmul(black_box(&a), &b, m, k, n)))
        });
        g.bench_function(BenchmarkId::new("gemm", name), |bch| {
            bch.iter(|| {
                // SAFETY: a, b, out are exactly [m, k], [k, n], [m, n] row-major (column stride 1,
                // row stride the width), the extents gemm reads and writes; out does not overlap them.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        out.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        black_box(&a).as_ptr(),
                        1,
                        k as isize,
                        b.as_ptr(),
                        1,
                        n as isize,
                        0.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            })
        });
        if name.starts_with("gram") {
            // nibble's Gram-form product `tril(M) @ E` (faer, one thread).
            g.bench_function(BenchmarkId::new("faer_lower_triangular", name), |bch| {
                bch.iter(|| black_box(nibble::awq::matmul::lower_triangular_matmul(black_box(&a), &b, k, n)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, products);
criterion_main!(benches);
