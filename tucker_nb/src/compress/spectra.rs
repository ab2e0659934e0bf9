//! Rank selection from a kernel's channel unfoldings: energy (a share of the squared singular
//! values) and EVBMF (Nakajima et al.'s analytic empirical variational Bayesian matrix
//! factorisation, as Kim et al. 2016 use for Tucker-2 ranks).

/// The smallest rank whose leading squared singular values hold `fraction` of the total.
pub fn energy_rank(singular: &[f64], fraction: f64) -> usize {
    let total: f64 = singular.iter().map(|s| s * s).sum();
    if total == 0.0 {
        return 1;
    }
    let mut kept = 0.0;
    for (i, s) in singular.iter().enumerate() {
        kept += s * s;
        if kept >= fraction * total - 1e-12 * total {
            return i + 1;
        }
    }
    singular.len()
}

/// τ(x) of EVBMF: the positive root of the shrinkage equation.
fn tau(x: f64, alpha: f64) -> f64 {
    0.5 * (x - (1.0 + alpha) + ((x - (1.0 + alpha)).powi(2) - 4.0 * alpha).max(0.0).sqrt())
}

/// EVBMF's objective for the noise variance σ² (Nakajima et al. 2013, eq. for the free energy).
fn evb_objective(sigma2: f64, l: f64, m: f64, s: &[f64], residual: f64, xubar: f64) -> f64 {
    let h = s.len() as f64;
    let alpha = l / m;
    let mut obj = residual / (m * sigma2) + (l - h) * sigma2.ln();
    for &sv in s {
        let x = sv * sv / (m * sigma2);
        if x > xubar {
            let t = tau(x, alpha);
            obj += x - t + ((t + 1.0) / x).ln() + alpha * (t / alpha + 1.0).ln();
        } else {
            obj += x - x.ln();
        }
    }
    obj
}

/// Minimises `f` on [lo, hi] by golden-section search (f is unimodal enough here; 200 steps reach
/// machine precision on the bracket).
fn minimize_bounded(f: impl Fn(f64) -> f64, mut lo: f64, mut hi: f64) -> f64 {
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let (mut c, mut d) = (hi - g * (hi - lo), lo + g * (hi - lo));
    let (mut fc, mut fd) = (f(c), f(d));
    for _ in 0..200 {
        if fc < fd {
            hi = d;
            d = c;
            fd = fc;
            c = hi - g * (hi - lo);
            fc = f(c);
        } else {
            lo = c;
            c = d;
            fc = fd;
            d = lo + g * (hi - lo);
            fd = f(d);
        }
        if (hi - lo).abs() <= 1e-15 * hi.abs() {
            break;
        }
    }
    (lo + hi) / 2.0
}

/// The rank EVBMF estimates for a matrix of shape (rows, cols) with these singular values
/// (descending), the noise variance estimated too. May be 0 (all noise): callers keep a minimum.
pub fn evbmf_rank(rows: usize, cols: usize, singular: &[f64], frobenius2: f64) -> usize {
    // EVBMF is stated for L ≤ M.
    let (l, m) = if rows <= cols {
        (rows as f64, cols as f64)
    } else {
        (cols as f64, rows as f64)
    };
    let h = singular.len().min(l as usize);
    let s = &singular[..h];
    let alpha = l / m;
    let tauubar = 2.5129 * alpha.sqrt();
    let xubar = (1.0 + tauubar) * (1.0 + alpha / tauubar);
    let kept: f64 = s.iter().map(|v| v * v).sum();
    let residual = if (h as f64) < l {
        (frobenius2 - kept).max(0.0)
    } else {
        0.0
    };
    let e_h_ub = ((l / (1.0 + alpha)).ceil() as usize)
        .saturating_sub(1)
        .min(h)
        .saturating_sub(1);
    let upper = (kept + residual) / (l * m);
    let tail = &s[(e_h_ub + 1).min(h)..];
    let lower = if tail.is_empty() {
        upper * 1e-6
    } else {
        let first = tail[0] * tail[0] / (m * xubar);
        let mean = tail.iter().map(|v| v * v).sum::<f64>() / tail.len() as f64 / m;
        first.max(mean)
    };
    if upper.is_nan() || upper <= 0.0 {
        return 0;
    }
    let lower = lower.min(upper * 0.999_999).max(upper * 1e-12);
    let sigma2 = minimize_bounded(|v| evb_objective(v, l, m, s, residual, xubar), lower, upper);
    let threshold = (m * sigma2 * (1.0 + tauubar) * (1.0 + alpha / tauubar)).sqrt();
    s.iter().filter(|&&v| v > threshold).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decompose::singular_values;
    use tch::{Device, Kind, Tensor};

    fn planted(rows: i64, cols: i64, rank: i64, noise: f64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        let opts = (Kind::Double, Device::Cpu);
        let low = Tensor::randn([rows, rank], opts).matmul(&Tensor::randn([rank, cols], opts));
        low + Tensor::randn([rows, cols], opts) * noise
    }

    #[test]
    fn evbmf_recovers_a_planted_rank() {
        for (rows, cols, rank) in [(64, 576, 9), (128, 64, 12), (100, 900, 30), (256, 2304, 40)] {
            let m = planted(rows, cols, rank, 0.5, rank);
            let s = singular_values(&m);
            let f2 = m.square().sum(Kind::Double).double_value(&[]);
            assert_eq!(
                evbmf_rank(rows as usize, cols as usize, &s, f2),
                rank as usize,
                "{rows}×{cols} rank {rank}"
            );
        }
    }

    #[test]
    fn evbmf_finds_nothing_in_pure_noise() {
        tch::manual_seed(3);
        let m = Tensor::randn([64, 576], (Kind::Double, Device::Cpu));
        let s = singular_values(&m);
        let f2 = m.square().sum(Kind::Double).double_value(&[]);
        assert_eq!(evbmf_rank(64, 576, &s, f2), 0);
    }

    #[test]
    fn energy_rank_keeps_the_asked_share() {
        let s = [3.0, 2.0, 1.0, 0.0];
        // squares 9, 4, 1: total 14
        assert_eq!(energy_rank(&s, 0.5), 1);
        assert_eq!(energy_rank(&s, 9.0 / 14.0), 1);
        assert_eq!(energy_rank(&s, 0.9), 2);
        assert_eq!(energy_rank(&s, 1.0), 3);
    }
}
