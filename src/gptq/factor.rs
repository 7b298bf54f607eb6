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
use faer::{Mat, Par, Side};

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
        if !(percdamp.is_finite() && percdamp >= 0.0) {
            return Err(Error::BadGptqParam { what: "percdamp", why: "must be a finite fraction >= 0 (default 0.01)" });
        }
        let k = hessian.k();
        let mut h = hessian.matrix();
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
        // J H[perm][:, perm] J + damp I, as a faer matrix.
        let rev = |i: usize| perm[k - 1 - i];
        let hr = Mat::<f64>::from_fn(k, k, |i, j| h[rev(i) * k + rev(j)] + if i == j { damp } else { 0.0 });
        let llt = hr.llt(Side::Lower).map_err(|e| match e {
            faer::linalg::cholesky::llt::factor::LltError::NonPositivePivot { index } => {
                Error::NotPositiveDefinite { index: perm[k - 1 - index.min(k - 1)] }
            }
        })?;
        let mut li = Mat::<f64>::zeros(k, k);
        faer::linalg::triangular_inverse::invert_lower_triangular(li.as_mut(), llt.L(), Par::rayon(0));
        let mut u = vec![0.0f64; k * k];
        for i in 0..k {
            for j in i..k {
                u[i * k + j] = li[(k - 1 - i, k - 1 - j)];
            }
        }
        Ok(GptqFactor { k, dead, perm, u, diagonal, act_order, percdamp })
    }
}
