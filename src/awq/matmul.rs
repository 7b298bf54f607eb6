//! `C = A @ B` for row-major float32 matrices, through `matrixmultiply` (packed, cache-blocked
//! SGEMM with run-time AVX/FMA detection).

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
