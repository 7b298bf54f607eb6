//! The layer Hessian of GPTQ: `H = 2 X^T X / T` for the inputs `X: [T, K]` of a weight `W: [K, N]`
//! (`y = x @ W`), accumulated over any number of row batches (calibration samples, capture waves),
//! so the activations are never held all at once.
//!
//! ```text
//! gram += X_b^T X_b        for each batch X_b: [t_b, K]      (lower-triangular tiles, mirrored)
//! T    += t_b
//! H     = 2 gram / T
//! ```
//!
//! Precision: each batch is split into chunks of at most [`CHUNK_ROWS`] rows; a chunk's Gram matrix
//! is one float32 GEMM (`matrixmultiply::sgemm`: packed, cache-blocked, run-time AVX/FMA detection,
//! tiles of the lower triangle in parallel with rayon), and the chunk sums are added into a float64
//! accumulator. The activations arrive as float32, so their products are exact in float64 only if
//! summed in float64; summing a chunk in float32 costs a relative error of about
//! `CHUNK_ROWS * 2^-24` of the sum of absolute products (bounded, it does not grow with the number
//! of samples or waves) at half the cost of a float64 GEMM on the 2 x 128 x T x K^2 flops that
//! dominate GPTQ's time. The Cholesky factorization that follows runs in float64.
//!
//! Weights fed by one activation (q/k/v, gate/up projections) share one `Hessian`.

use crate::kernels::check_len;
use crate::{Error, Result};
use rayon::prelude::*;

/// Rows per float32 GEMM chunk (the float32 partial sums are at most this long).
pub const CHUNK_ROWS: usize = 512;

/// Edge of the square tiles of the lower triangle computed in parallel.
const TILE: usize = 128;

/// The accumulated Gram matrix `X^T X` of a weight's inputs and the row count `T`.
#[derive(Clone, Debug, PartialEq)]
pub struct Hessian {
    k: usize,
    rows: u64,
    /// `X^T X`, `[K, K]` row-major, symmetric (both triangles kept).
    gram: Vec<f64>,
}

impl Hessian {
    /// An empty accumulator for `k` input channels (the weight's K).
    pub fn new(k: usize) -> Hessian {
        Hessian { k, rows: 0, gram: vec![0.0; k * k] }
    }

    /// From a Gram matrix `X^T X` (`[K, K]` row-major, symmetric) of `rows` rows, e.g. one computed
    /// elsewhere or transformed (see [`Hessian::scale_inputs`]).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] if `gram` is not `k * k` long.
    pub fn from_gram(k: usize, rows: u64, gram: Vec<f64>) -> Result<Hessian> {
        check_len("Hessian Gram matrix", k * k, gram.len())?;
        Ok(Hessian { k, rows, gram })
    }

    /// Adds the rows of `x: [t, K]` (row-major float32, `t = x.len() / K`): `gram += x^T x`,
    /// `T += t`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] if `x.len()` is not a multiple of K. Activations are not checked
    /// for NaN here: a non-finite Hessian is reported by [`gptq_quantize`](super::gptq_quantize).
    pub fn add_batch(&mut self, x: &[f32]) -> Result<()> {
        let k = self.k;
        let t = crate::kernels::slab_rows("Hessian batch (activations [T, K])", x.len(), k)?;
        if k == 0 || t == 0 {
            self.rows += t as u64;
            return Ok(());
        }
        for chunk in x.chunks(CHUNK_ROWS * k) {
            let part = gram_lower_f32(chunk, chunk.len() / k, k);
            for i in 0..k {
                for j in 0..=i {
                    self.gram[i * k + j] += part[i * k + j] as f64;
                }
            }
        }
        for i in 0..k {
            for j in 0..i {
                self.gram[j * k + i] = self.gram[i * k + j];
            }
        }
        self.rows += t as u64;
        Ok(())
    }

    /// Adds another accumulator of the same K (batches accumulated in parallel).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] if the K differ.
    pub fn merge(&mut self, other: &Hessian) -> Result<()> {
        check_len("Hessian merge (K * K)", self.gram.len(), other.gram.len())?;
        self.gram.iter_mut().zip(&other.gram).for_each(|(a, b)| *a += b);
        self.rows += other.rows;
        Ok(())
    }

    /// The number of input channels K.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The number of rows T accumulated.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// `X^T X`, `[K, K]` row-major float64.
    pub fn gram(&self) -> &[f64] {
        &self.gram
    }

    /// `H = 2 X^T X / T` (`[K, K]` row-major float64; zeros when T = 0).
    pub fn matrix(&self) -> Vec<f64> {
        let f = if self.rows == 0 { 0.0 } else { 2.0 / self.rows as f64 };
        self.gram.iter().map(|&g| g * f).collect()
    }

    /// The diagonal of `H = 2 X^T X / T` (the per-input-channel mean of `2 x^2`).
    pub fn diagonal(&self) -> Vec<f64> {
        let f = if self.rows == 0 { 0.0 } else { 2.0 / self.rows as f64 };
        (0..self.k).map(|i| self.gram[i * self.k + i] * f).collect()
    }

    /// The Hessian of the inputs divided per channel, `X' = X / s` (AWQ's pre-quant scale `s[K]`,
    /// with the weight quantized as `W' = s[:, None] * W`): `gram'[i, j] = gram[i, j] / (s_i s_j)`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] if `s` is not K long; [`Error::BadInputScale`] if some `s_i` is not
    /// finite and non-zero.
    pub fn scale_inputs(&self, s: &[f64]) -> Result<Hessian> {
        check_len("Hessian input scale", self.k, s.len())?;
        if let Some(i) = s.iter().position(|v| !v.is_finite() || *v == 0.0) {
            return Err(Error::BadInputScale { index: i });
        }
        let k = self.k;
        let gram = (0..k * k).map(|e| self.gram[e] / (s[e / k] * s[e % k])).collect();
        Ok(Hessian { k, rows: self.rows, gram })
    }
}

/// The lower triangle (diagonal included; the upper part is left unspecified) of `x^T x` for
/// `x: [t, k]`, in float32: square tiles of the lower triangle, one `sgemm` each, in parallel.
pub fn gram_lower_f32(x: &[f32], t: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), t * k, "gram: x is not [t, k]");
    let mut g = vec![0.0f32; k * k];
    if k == 0 || t == 0 {
        return g;
    }
    let nt = k.div_ceil(TILE);
    let pairs: Vec<(usize, usize)> = (0..nt).flat_map(|i| (0..=i).map(move |j| (i, j))).collect();
    let tiles: Vec<((usize, usize), Vec<f32>)> = pairs
        .par_iter()
        .map(|&(bi, bj)| {
            let (i0, j0) = (bi * TILE, bj * TILE);
            let (m, n) = (TILE.min(k - i0), TILE.min(k - j0));
            let mut c = vec![0.0f32; m * n];
            // SAFETY: A = x[:, i0..i0 + m]^T read with row stride 1 and column stride k: element
            // (r, c) at x[c * k + i0 + r] with c < t, r < m, inside x (len t * k, asserted);
            // B = x[:, j0..j0 + n] with row stride k: element (r, c) at x[r * k + j0 + c], inside x;
            // C is exactly [m, n]; C does not overlap x.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    t,
                    n,
                    1.0,
                    x.as_ptr().add(i0),
                    1,
                    k as isize,
                    x.as_ptr().add(j0),
                    k as isize,
                    1,
                    0.0,
                    c.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
            ((i0, j0), c)
        })
        .collect();
    for ((i0, j0), c) in tiles {
        let n = TILE.min(k - j0);
        for (r, row) in c.chunks_exact(n).enumerate() {
            g[(i0 + r) * k + j0..(i0 + r) * k + j0 + n].copy_from_slice(row);
        }
    }
    g
}
