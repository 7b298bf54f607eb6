//! The float32 matrix products of the AWQ-lite losses, through faer's GEMM kernels: `C = A @ B`,
//! and the Gram form's lower triangular `M = tril(G) + tril(G, -1)` and product `M @ E`.
//!
//! faer was measured against `matrixmultiply` (cache-blocked SGEMM, AVX-512 kernel) and the `gemm`
//! crate on AWQ-lite's shapes, one core each (`cargo bench --bench awq_gemm`, BENCHMARKS.md):
//! faer's full product was the fastest of the three on every shape, and its triangular product
//! does half the multiply-adds of the full one.

use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, MatMut, MatRef, Par};

/// `a: [m, k]`, `b: [k, n]`, row-major; returns `[m, n]`. One float32 GEMM on the calling thread
/// (the AWQ-lite alphas run in parallel, one product each).
///
/// # Panics
/// If `a` is not `m * k` or `b` not `k * n` long.
pub fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = Vec::new();
    product(a, b, m, k, n, Par::Seq, &mut c);
    c
}

/// [`matmul`] into `c` (resized to `m * n`; its allocation is reused).
///
/// # Panics
/// As [`matmul`].
pub fn matmul_into(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, c: &mut Vec<f32>) {
    product(a, b, m, k, n, Par::Seq, c);
}

/// [`matmul`] over rayon's threads (for a product that runs alone).
///
/// # Panics
/// As [`matmul`].
pub fn par_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = Vec::new();
    product(a, b, m, k, n, Par::rayon(0), &mut c);
    c
}

/// Sizes `c` to `len` values, keeping its allocation and its values: the products overwrite every
/// value (`Accum::Replace` does not read the destination), so it is not cleared first.
fn sized(c: &mut Vec<f32>, len: usize) {
    c.resize(len, 0.0);
}

fn product(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, par: Par, c: &mut Vec<f32>) {
    assert_eq!(a.len(), m * k, "matmul: a is not [m, k]");
    assert_eq!(b.len(), k * n, "matmul: b is not [k, n]");
    sized(c, m * n);
    if m == 0 || n == 0 {
        return;
    }
    faer::linalg::matmul::matmul(
        MatMut::from_row_major_slice_mut(c, m, n),
        Accum::Replace,
        MatRef::from_row_major_slice(a, m, k),
        MatRef::from_row_major_slice(b, k, n),
        1.0f32,
        par,
    );
}

/// `M = tril(G) + tril(G, -1)` of the Gram matrix `G = x^T x` of row-major `x: [t, k]`: `[k, k]`
/// row-major, the diagonal of G, twice its strictly lower triangle, zeros above the diagonal. For
/// any `E: [k, n]`, `sum(E * (M @ E)) = sum(E * (G @ E))` (G is symmetric; see
/// [`lite`](super::lite)). The lower triangle is one float32 triangular GEMM (faer, rayon's threads).
pub fn gram_lower_doubled(x: &[f32], t: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), t * k, "gram: x is not [t, k]");
    let mut m = vec![0.0f32; k * k];
    if k == 0 || t == 0 {
        return m;
    }
    let xr = MatRef::from_row_major_slice(x, t, k);
    triangular::matmul(
        MatMut::from_row_major_slice_mut(&mut m, k, k),
        BlockStructure::TriangularLower,
        Accum::Replace,
        xr.transpose(),
        BlockStructure::Rectangular,
        xr,
        BlockStructure::Rectangular,
        1.0f32,
        Par::rayon(0),
    );
    for (i, row) in m.chunks_exact_mut(k).enumerate() {
        row[..i].iter_mut().for_each(|v| *v *= 2.0);
    }
    m
}

/// `L @ B` for a lower triangular `l: [k, k]` (row-major; only `j <= i` is read) and `b: [k, n]`,
/// row-major; returns `[k, n]`. One float32 triangular GEMM on the calling thread (faer), half the
/// multiply-adds of the full product.
pub fn lower_triangular_matmul(l: &[f32], b: &[f32], k: usize, n: usize) -> Vec<f32> {
    let mut c = Vec::new();
    lower_triangular_matmul_into(l, b, k, n, &mut c);
    c
}

/// [`lower_triangular_matmul`] into `c` (resized to `k * n`; its allocation is reused).
pub fn lower_triangular_matmul_into(l: &[f32], b: &[f32], k: usize, n: usize, c: &mut Vec<f32>) {
    assert_eq!(l.len(), k * k, "lower_triangular_matmul: l is not [k, k]");
    assert_eq!(b.len(), k * n, "lower_triangular_matmul: b is not [k, n]");
    sized(c, k * n);
    if k == 0 || n == 0 {
        return;
    }
    triangular::matmul(
        MatMut::from_row_major_slice_mut(c, k, n),
        BlockStructure::Rectangular,
        Accum::Replace,
        MatRef::from_row_major_slice(l, k, k),
        BlockStructure::TriangularLower,
        MatRef::from_row_major_slice(b, k, n),
        BlockStructure::Rectangular,
        1.0f32,
        Par::Seq,
    );
}
