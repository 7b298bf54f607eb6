//! The inverse-Hessian factor GPTQ's error feedback uses, prepared once per Hessian.
//!
//! ```text
//! H = 2 X^T X / T
//! dead = { i : H[i,i] == 0 }        H[i,i] = 1, W[i,:] = 0 for i in dead      (the paper's choice)
//! perm = argsort(-diag(H))          with act order (stable: ties keep the channel order), else identity
//! H    = H[perm][:, perm] + percdamp * mean(diag(H)) * I
//! U    = upper Cholesky factor of H^-1        (H^-1 = U^T U, U upper triangular, U[i,i] > 0)
//! ```
//!
//! `U` is obtained without forming `H^-1`: with `J` the reversal permutation, let
//! `J H J = L L^T` (lower Cholesky, float64, faer); then `H = V V^T` with `V = J L J` upper, so
//! `H^-1 = V^-T V^-1 = U^T U` with `U = V^-1 = J L^-1 J`. One Cholesky and one triangular
//! inverse (`2/3 K^3` flops) instead of Cholesky, inverse and a second Cholesky (`2 K^3`).

use super::Hessian;
use crate::{Error, Result};
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch, LltError};
use faer::{Mat, Par};

/// A Hessian prepared for GPTQ: dead inputs, order, dampening and the inverse factor.
#[derive(Clone, Debug)]
pub struct GptqFactor {
    /// K.
    pub k: usize,
    /// `dead[i]`: input channel `i` (original order) never sees a non-zero activation.
    pub dead: Vec<bool>,
    /// `perm[p]`: the original input channel processed at step `p`.
    pub perm: Vec<usize>,
    /// `U`, `[K, K]` row-major in the processing order: row `p` holds the feedback
    /// coefficients of step `p` onto the later steps; `U[p, p]` its divisor.
    pub u: Vec<f64>,
    /// `diag(H)` in the original order, after the dead-input fix and before dampening (for a
    /// Hessian-weighted scale search).
    pub diagonal: Vec<f64>,
    /// Whether `perm` is the act order.
    pub act_order: bool,
    /// The dampening used.
    pub percdamp: f64,
}

impl GptqFactor {
    /// Prepares `hessian` with dampening `percdamp` (a fraction of the mean diagonal; the paper's
    /// and GPTQ's default is 0.01) and, if `act_order`, the descending-diagonal order.
    ///
    /// # Errors
    /// [`Error::HessianNotFinite`] for NaN/Inf entries, [`Error::BadGptqParam`] for a negative or
    /// non-finite `percdamp`, [`Error::NotPositiveDefinite`] if the dampened Hessian has no
    /// Cholesky factorization (raise `percdamp`).
    pub fn new(hessian: &Hessian, percdamp: f64, act_order: bool) -> Result<GptqFactor> {
        GptqFactor::from_hessian(hessian.clone(), percdamp, act_order)
    }

    /// [`GptqFactor::new`] consuming the Hessian, with at most two `K x K` float64 buffers alive
    /// at once (the accumulated Hessian, then the Cholesky factor computed in place, then its
    /// inverse, then `U`): `2 K^2 x 8` bytes of working memory (1.9 GB at K = 11008) instead of
    /// the six to eight copies of a Hessian-to-`U` chain of fresh matrices. The same floats in
    /// the same order as [`GptqFactor::new`]: `U` is bit for bit the same.
    ///
    /// # Errors
    /// As [`GptqFactor::new`].
    pub fn from_hessian(hessian: Hessian, percdamp: f64, act_order: bool) -> Result<GptqFactor> {
        if !(percdamp.is_finite() && percdamp >= 0.0) {
            return Err(Error::BadGptqParam { what: "percdamp", why: "must be a finite fraction >= 0 (default 0.01)" });
        }
        let k = hessian.k();
        let f = if hessian.rows() == 0 { 0.0 } else { 2.0 / hessian.rows() as f64 };
        // H = 2 X^T X / T in place, upper triangle only (H is symmetric: H[i, j] = H[min, max]).
        let mut h = hessian.into_upper();
        for (i, row) in h.chunks_exact_mut(k.max(1)).enumerate() {
            row[i..].iter_mut().for_each(|g| *g *= f);
        }
        // The first row of the full matrix holding a non-finite entry is the first such row of
        // the upper triangle (an entry (a, b), a <= b, appears in rows a and b).
        if let Some(e) = h.iter().position(|v| !v.is_finite()) {
            return Err(Error::HessianNotFinite { index: e / k.max(1) });
        }
        let mut dead = vec![false; k];
        for i in 0..k {
            if h[i * k + i] == 0.0 {
                dead[i] = true;
                h[i * k + i] = 1.0;
            }
        }
        let diagonal: Vec<f64> = (0..k).map(|i| h[i * k + i]).collect();
        let mut perm: Vec<usize> = (0..k).collect();
        if act_order {
            perm.sort_by(|&a, &b| diagonal[b].total_cmp(&diagonal[a]));
        }
        let damp = percdamp * diagonal.iter().sum::<f64>() / k.max(1) as f64;
        // L: the lower triangle of J H[perm][:, perm] J + damp I (upper zero), then its lower
        // Cholesky factor in place: what `Mat::llt` computes on a copy (same scratch, same
        // parallelism, faer's global setting).
        let rev = |i: usize| perm[k - 1 - i];
        let at = |a: usize, b: usize| if a <= b { h[a * k + b] } else { h[b * k + a] };
        let mut l = Mat::<f64>::zeros(k, k);
        for j in 0..k {
            for i in j..k {
                l[(i, j)] = at(rev(i), rev(j)) + if i == j { damp } else { 0.0 };
            }
        }
        drop(h);
        let par = faer::get_global_parallelism();
        let mut mem = MemBuffer::new(cholesky_in_place_scratch::<f64>(k, par, Default::default()));
        cholesky_in_place(l.as_mut(), Default::default(), par, MemStack::new(&mut mem), Default::default()).map_err(
            |e| match e {
                LltError::NonPositivePivot { index } => {
                    Error::NotPositiveDefinite { index: perm[k - 1 - index.min(k - 1)] }
                }
            },
        )?;
        drop(mem);
        for j in 0..k {
            for i in 0..j {
                l[(i, j)] = 0.0;
            }
        }
        let mut li = Mat::<f64>::zeros(k, k);
        faer::linalg::triangular_inverse::invert_lower_triangular(li.as_mut(), l.as_ref(), Par::rayon(0));
        drop(l);
        let mut u = vec![0.0f64; k * k];
        for i in 0..k {
            for j in i..k {
                u[i * k + j] = li[(k - 1 - i, k - 1 - j)];
            }
        }
        Ok(GptqFactor { k, dead, perm, u, diagonal, act_order, percdamp })
    }
}
