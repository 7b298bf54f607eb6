//! The layer Hessian of GPTQ: `H = 2 X^T X / T` for the inputs `X: [T, K]` of a weight `W: [K, N]`
//! (`y = x @ W`), accumulated over any number of row batches (calibration samples, capture waves),
//! so the activations are never held all at once.
//!
//! ```text
//! gram += X_b^T X_b        for each batch X_b: [t_b, K]      (one triangle only: it is symmetric)
//! T    += t_b
//! H     = 2 gram / T
//! ```
//!
//! Precision: rows are summed in float32 over at most [`CHUNK_ROWS`] consecutive rows (batches
//! are split, and consecutive small batches share a chunk); each batch's product is one float32
//! triangular GEMM (faer's `matmul::triangular::matmul`, lower triangle only,
//! parallel over rayon's threads; measured 3.5x faster than cache-blocked `matrixmultiply`
//! tiles of the triangle at K = 1536), and each chunk's sums are added into a float64 accumulator. The activations arrive as float32, so their products are exact in float64 only if
//! summed in float64; summing a chunk in float32 costs a relative error of about
//! `CHUNK_ROWS * 2^-24` of the sum of absolute products (bounded, it does not grow with the number
//! of samples or waves) at half the cost of a float64 GEMM on the 2 x 128 x T x K^2 flops that
//! dominate GPTQ's time. The Cholesky factorization that follows runs in float64.
//!
//! Weights fed by one activation (q/k/v, gate/up projections) share one `Hessian`.

use crate::kernels::check_len;
use crate::{Error, Result};
use faer::linalg::matmul::triangular::{matmul, BlockStructure};
use faer::{Accum, Mat, MatRef, Par};

/// Rows per float32 GEMM chunk (the float32 partial sums are at most this long).
pub const CHUNK_ROWS: usize = 512;

/// The accumulated Gram matrix `X^T X` of a weight's inputs and the row count `T`.
#[derive(Clone, Debug)]
pub struct Hessian {
    k: usize,
    rows: u64,
    /// The float32 sums of the last rows (at most [`CHUNK_ROWS`]), lower triangle, not yet
    /// added to `upper`; `0 x 0` until the first batch (a Hessian made by [`Hessian::from_gram`]
    /// or [`Hessian::scale_inputs`] holds no `K^2` float32 buffer it does not use).
    pending: Mat<f32>,
    pending_rows: usize,
    /// `X^T X`, `[K, K]` row-major: the upper triangle (`j >= i`) holds the sums, the strictly
    /// lower one is zero.
    upper: Vec<f64>,
}

impl Hessian {
    /// An empty accumulator for `k` input channels (the weight's K).
    pub fn new(k: usize) -> Hessian {
        Hessian { k, rows: 0, pending: Mat::zeros(0, 0), pending_rows: 0, upper: vec![0.0; k * k] }
    }

    /// From a Gram matrix `X^T X` (`[K, K]` row-major, symmetric) of `rows` rows, e.g. one computed
    /// elsewhere or transformed (see [`Hessian::scale_inputs`]).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] if `gram` is not `k * k` long.
    pub fn from_gram(k: usize, rows: u64, gram: Vec<f64>) -> Result<Hessian> {
        check_len("Hessian Gram matrix", k * k, gram.len())?;
        let mut upper = gram;
        for i in 0..k {
            upper[i * k..i * k + i].fill(0.0);
        }
        Ok(Hessian { k, rows, pending: Mat::zeros(0, 0), pending_rows: 0, upper })
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
        if self.pending.nrows() != k {
            self.pending = Mat::zeros(k, k);
        }
        for chunk in x.chunks(CHUNK_ROWS * k) {
            let rows = chunk.len() / k;
            if self.pending_rows + rows > CHUNK_ROWS {
                self.flush();
            }
            let xr = MatRef::from_row_major_slice(chunk, rows, k);
            matmul(
                self.pending.as_mut(),
                BlockStructure::TriangularLower,
                Accum::Add,
                xr.transpose(),
                BlockStructure::Rectangular,
                xr,
                BlockStructure::Rectangular,
                1.0f32,
                Par::rayon(0),
            );
            self.pending_rows += rows;
        }
        self.rows += t as u64;
        Ok(())
    }

    /// Adds the float32 partial sums into the float64 accumulator.
    fn flush(&mut self) {
        let k = self.k;
        if self.pending_rows == 0 {
            return;
        }
        for (j, row) in self.upper.chunks_exact_mut(k).enumerate() {
            let col = &self.pending.col(j).try_as_col_major().expect("contiguous column").as_slice()[j..];
            for (a, &v) in row[j..].iter_mut().zip(col) {
                *a += v as f64;
            }
        }
        self.pending.fill(0.0);
        self.pending_rows = 0;
    }

    /// `X^T X` as one upper triangle (row-major `[K, K]` float64, strictly lower part zero),
    /// pending sums included, without a copy: the float32 buffer of pending sums is freed. The
    /// same values as [`Hessian::gram`]'s upper triangle.
    pub fn into_upper(mut self) -> Vec<f64> {
        self.flush();
        self.upper
    }

    /// `X^T X` as one upper triangle (row-major `[K, K]`, lower part zero), pending sums included.
    fn upper_total(&self) -> std::borrow::Cow<'_, [f64]> {
        if self.pending_rows == 0 {
            return std::borrow::Cow::Borrowed(&self.upper);
        }
        let mut h = self.clone();
        h.flush();
        std::borrow::Cow::Owned(h.upper)
    }

    /// Adds another accumulator of the same K (batches accumulated in parallel).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] if the K differ.
    pub fn merge(&mut self, other: &Hessian) -> Result<()> {
        check_len("Hessian merge (K * K)", self.upper.len(), other.upper.len())?;
        self.flush();
        self.upper.iter_mut().zip(other.upper_total().iter()).for_each(|(a, b)| *a += b);
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

    /// `X^T X`, `[K, K]` row-major float64, symmetric.
    pub fn gram(&self) -> Vec<f64> {
        let k = self.k;
        let mut g = self.upper_total().into_owned();
        for i in 0..k {
            for j in 0..i {
                g[i * k + j] = g[j * k + i];
            }
        }
        g
    }

    /// `||X M||_F^2 = sum_n M[:, n]^T (X^T X) M[:, n]` for `m: [K, N]` row-major float32: the summed
    /// squared outputs of the accumulated inputs `X` through `M` (a weight `W`, or its quantization
    /// error `W - Q(W)`: HAWQ-V3's and GPTQ's second-order output error). Float64, one GEMM
    /// `(X^T X) M` per chunk of 256 columns (faer, rayon's threads).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] if `m.len()` is not a multiple of K.
    pub fn output_energy(&self, m: &[f32]) -> Result<f64> {
        let k = self.k;
        if k == 0 {
            return Ok(0.0);
        }
        let n = crate::kernels::slab_rows("output energy (matrix [K, N])", m.len(), k)?;
        let g = self.gram();
        let gm = MatRef::from_row_major_slice(&g, k, k);
        let mut total = 0.0f64;
        const COLS: usize = 256;
        for c0 in (0..n).step_by(COLS) {
            let c = COLS.min(n - c0);
            let part = Mat::<f64>::from_fn(k, c, |i, j| m[i * n + c0 + j] as f64);
            let mut prod = Mat::<f64>::zeros(k, c);
            faer::linalg::matmul::matmul(prod.as_mut(), Accum::Replace, gm, part.as_ref(), 1.0f64, Par::rayon(0));
            for j in 0..c {
                for i in 0..k {
                    total += part[(i, j)] * prod[(i, j)];
                }
            }
        }
        Ok(total)
    }

    /// `H = 2 X^T X / T` (`[K, K]` row-major float64; zeros when T = 0).
    pub fn matrix(&self) -> Vec<f64> {
        let f = if self.rows == 0 { 0.0 } else { 2.0 / self.rows as f64 };
        self.gram().iter().map(|&g| g * f).collect()
    }

    /// The diagonal of `H = 2 X^T X / T` (the per-input-channel mean of `2 x^2`).
    pub fn diagonal(&self) -> Vec<f64> {
        let f = if self.rows == 0 { 0.0 } else { 2.0 / self.rows as f64 };
        let upper = self.upper_total();
        (0..self.k).map(|i| upper[i * self.k + i] * f).collect()
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
        let total = self.upper_total();
        let upper = (0..k * k).map(|e| total[e] / (s[e / k] * s[e % k])).collect();
        Ok(Hessian { k, rows: self.rows, pending: Mat::zeros(0, 0), pending_rows: 0, upper })
    }

    /// [`Hessian::scale_inputs`] in place (no second `K^2` buffer): the same values.
    ///
    /// # Errors
    /// As [`Hessian::scale_inputs`].
    pub fn into_scaled_inputs(self, s: &[f64]) -> Result<Hessian> {
        check_len("Hessian input scale", self.k, s.len())?;
        if let Some(i) = s.iter().position(|v| !v.is_finite() || *v == 0.0) {
            return Err(Error::BadInputScale { index: i });
        }
        let (k, rows) = (self.k, self.rows);
        let mut upper = self.into_upper();
        for (e, v) in upper.iter_mut().enumerate() {
            *v /= s[e / k] * s[e % k];
        }
        Ok(Hessian { k, rows, pending: Mat::zeros(0, 0), pending_rows: 0, upper })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `output_energy` is `||X M||^2` computed directly, across batches and column chunks.
    #[test]
    fn output_energy_is_squared_output_norm() {
        let (t, k, n) = (37, 5, 300);
        let x: Vec<f32> = (0..t * k).map(|i| ((i * 7919 % 101) as f32 / 50.0) - 1.0).collect();
        let m: Vec<f32> = (0..k * n).map(|i| ((i * 104729 % 97) as f32 / 48.0) - 1.0).collect();
        let mut h = Hessian::new(k);
        h.add_batch(&x[..10 * k]).unwrap();
        h.add_batch(&x[10 * k..]).unwrap();
        let mut direct = 0.0f64;
        for r in 0..t {
            for c in 0..n {
                let y: f64 = (0..k).map(|i| x[r * k + i] as f64 * m[i * n + c] as f64).sum();
                direct += y * y;
            }
        }
        let got = h.output_energy(&m).unwrap();
        assert!((got - direct).abs() <= 1e-5 * direct, "{got} vs {direct}");
        assert!(h.output_energy(&m[..k * n - 1]).is_err());
    }
}
