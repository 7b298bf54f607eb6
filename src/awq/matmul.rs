//! `C = A @ B` (and the Gram matrix `X^T X`) for row-major float32 matrices, through
//! `matrixmultiply` (packed, cache-blocked SGEMM with run-time AVX/FMA/AVX-512 detection).

/// `a: [m, k]`, `b: [k, n]`, row-major; returns `[m, n]`.
pub fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(a.len(), m * k, "matmul: a is not [m, k]");
    assert_eq!(b.len(), k * n, "matmul: b is not [k, n]");
    let mut c = vec![0.0f32; m * n];
    if m == 0 || n == 0 {
        return c;
    }
    // SAFETY: the asserts above make a, b and c exactly [m, k], [k, n] and [m, n] row-major, which
    // are the extents sgemm reads and writes with these strides; the slices do not overlap.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
    c
}

/// [`matmul`] split into row blocks of `a` across rayon's threads (for a product that runs alone).
pub fn par_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    assert_eq!(a.len(), m * k, "matmul: a is not [m, k]");
    let rows = m.div_ceil(rayon::current_num_threads().max(1)).max(64);
    if rows >= m || k == 0 {
        return matmul(a, b, m, k, n);
    }
    let blocks: Vec<Vec<f32>> = a.par_chunks(rows * k).map(|block| matmul(block, b, block.len() / k, k, n)).collect();
    blocks.concat()
}

/// The Gram matrix `x^T x` (`[k, k]`) of row-major `x: [t, k]`.
pub fn gram(x: &[f32], t: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), t * k, "gram: x is not [t, k]");
    let mut g = vec![0.0f32; k * k];
    if k == 0 || t == 0 {
        return g;
    }
    // SAFETY: x is exactly [t, k] row-major (asserted), read as its transpose [k, t] with row
    // stride 1 and column stride k, and as itself [t, k]; g is exactly [k, k]; no overlap with g.
    unsafe {
        matrixmultiply::sgemm(
            k,
            t,
            k,
            1.0,
            x.as_ptr(),
            1,
            k as isize,
            x.as_ptr(),
            k as isize,
            1,
            0.0,
            g.as_mut_ptr(),
            k as isize,
            1,
        );
    }
    g
}
