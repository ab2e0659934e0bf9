//! CP (CANDECOMP/PARAFAC) of a conv kernel, fitted by alternating least squares (Lebedev et al.,
//! ICLR 2015; the algorithm of tensorly's `parafac`):
//!
//!   W[o, c, i, j] ≈ Σ_r A[o, r] · B[c, r] · K[i, r] · L[j, r],
//!
//! with A (C_out × R), B (C_in × R), K (kh × R) and L (kw × R). It starts from each unfolding's
//! leading left singular vectors (tensorly's `init='svd'`: a mode with fewer than R of them is
//! filled with seeded uniform values) and updates one factor at a time, each the exact least-squares
//! solution given the others, until the relative error changes by less than the tolerance or the
//! iteration cap is reached. Everything is computed in f64 on the CPU.
//!
//! Each sweep contracts the kernel with the two channel factors once per channel mode (the costly
//! part, 2·C_out·C_in·kh·kw·R multiply-adds a sweep); both spatial updates reuse the second
//! contraction, so a sweep of a 512×512×3×3 kernel at R = 256 takes about 0.1 s on two cores.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

use super::{as_f64, gram_eigen_descending};

/// The four CP factors of a kernel, f64 on the CPU, their columns balanced: the r-th column of
/// each has the same norm, the fourth root of the component's weight.
#[derive(Debug)]
pub struct CpFactors {
    /// C_out × R.
    pub a: Tensor,
    /// C_in × R.
    pub b: Tensor,
    /// kh × R.
    pub k: Tensor,
    /// kw × R.
    pub l: Tensor,
    /// ‖W − Ŵ‖ / ‖W‖ of the fit.
    pub relative_error: f64,
    /// ALS sweeps run.
    pub iterations: usize,
}

impl CpFactors {
    pub fn rank(&self) -> i64 {
        self.a.size()[1]
    }

    /// The kernel C_out × C_in × kh × kw these factors compute.
    pub fn reconstruct(&self) -> Tensor {
        Tensor::einsum(
            "or,cr,ir,jr->ocij",
            &[&self.a, &self.b, &self.k, &self.l],
            None::<&[i64]>,
        )
    }
}

/// How long a CP fit runs, and the seed of its start's filler columns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpOptions {
    pub max_iterations: usize,
    /// Stop when the relative error changes by less than this between sweeps (tensorly's `tol`).
    pub tolerance: f64,
    pub seed: u64,
}

impl Default for CpOptions {
    /// tensorly's defaults (100 sweeps, tolerance 1e-8), seed 0.
    fn default() -> Self {
        Self {
            max_iterations: 100,
            tolerance: 1e-8,
            seed: 0,
        }
    }
}

/// The rank-`rank` CP of a 4-way kernel by ALS from an SVD start; deterministic for
/// `options.seed`.
///
/// # Panics
/// If `weight` is not 4-way or `rank` < 1 (the callers check ranks and name the layer).
pub fn cp_als(weight: &Tensor, rank: i64, options: CpOptions) -> CpFactors {
    assert!(rank >= 1, "CP rank must be at least 1, not {rank}");
    let w = as_f64(weight);
    let [o, c, kh, kw] = w.size()[..] else {
        panic!("CP of a conv kernel needs 4 modes, not {:?}", w.size())
    };
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut start = |mode: i64, dim: i64| {
        let unfolding = w.movedim(&[mode][..], &[0][..]).reshape([dim, -1]);
        svd_start(&unfolding, rank, &mut rng)
    };
    let factors = [start(0, o), start(1, c), start(2, kh), start(3, kw)];
    sweep(&w, factors, 0, f64::INFINITY, options)
}

/// A fit continued from `start` (a fit of the same kernel that stopped early, at its cap) until
/// `options.max_iterations` sweeps in all or the tolerance: the same factors as one longer fit.
pub fn cp_als_from(weight: &Tensor, start: &CpFactors, options: CpOptions) -> CpFactors {
    let factors = [&start.a, &start.b, &start.k, &start.l].map(|f| f.shallow_clone());
    sweep(
        &as_f64(weight),
        factors,
        start.iterations,
        start.relative_error,
        options,
    )
}

/// ALS sweeps on the f64 kernel `w` from `[a, b, k, l]`, `done` sweeps already run (ending at
/// `error`).
fn sweep(
    w: &Tensor,
    [mut a, mut b, mut k, mut l]: [Tensor; 4],
    done: usize,
    mut error: f64,
    options: CpOptions,
) -> CpFactors {
    let [o, c, kh, kw] = w.size()[..] else {
        panic!("CP of a conv kernel needs 4 modes, not {:?}", w.size())
    };
    let rank = a.size()[1];
    let norm2 = w.square().sum(Kind::Double).double_value(&[]);
    // The kernel as taps × C_out × C_in, for the two channel contractions.
    let taps = w.reshape([o, c, kh * kw]).permute([2, 0, 1]).contiguous();
    let gram = |f: &Tensor| f.tr().matmul(f);
    let mut iterations = done;
    while iterations < options.max_iterations {
        iterations += 1;
        let s = khatri_rao(&k, &l); // taps × R
        let spatial_gram = gram(&k) * gram(&l);
        // A from Σ_taps (T·B) ⊙ S.
        let mttkrp_a = (taps.matmul(&b) * s.unsqueeze(1)).sum_dim_intlist(0, false, Kind::Double);
        a = solve(&mttkrp_a, &(gram(&b) * &spatial_gram));
        // B from Σ_taps (Tᵀ·A) ⊙ S, keeping Tᵀ·A for the spatial modes.
        let by_a = taps.transpose(1, 2).matmul(&a); // taps × C_in × R
        let mttkrp_b = (&by_a * s.unsqueeze(1)).sum_dim_intlist(0, false, Kind::Double);
        b = solve(&mttkrp_b, &(gram(&a) * &spatial_gram));
        // Q[i, j, r] = Σ_{o,c} W[o, c, i, j]·A[o, r]·B[c, r], shared by both spatial updates.
        let q = (by_a * b.unsqueeze(0))
            .sum_dim_intlist(1, false, Kind::Double)
            .reshape([kh, kw, rank]);
        let channel_gram = gram(&a) * gram(&b);
        let mttkrp_k = (&q * l.unsqueeze(0)).sum_dim_intlist(1, false, Kind::Double);
        k = solve(&mttkrp_k, &(&channel_gram * gram(&l)));
        let mttkrp_l = (&q * k.unsqueeze(1)).sum_dim_intlist(0, false, Kind::Double);
        let gram_l = &channel_gram * gram(&k);
        l = solve(&mttkrp_l, &gram_l);
        // ‖W − Ŵ‖² = ‖W‖² − 2⟨W, Ŵ⟩ + ‖Ŵ‖², all from the last update's terms.
        let inner = (&mttkrp_l * &l).sum(Kind::Double).double_value(&[]);
        let fitted = (&gram_l * gram(&l)).sum(Kind::Double).double_value(&[]);
        let previous = error;
        error = ((norm2 - 2.0 * inner + fitted).max(0.0) / norm2.max(f64::MIN_POSITIVE)).sqrt();
        if (previous - error).abs() < options.tolerance {
            break;
        }
    }
    let [a, b, k, l] = balanced([a, b, k, l]);
    CpFactors {
        a,
        b,
        k,
        l,
        relative_error: error,
        iterations,
    }
}

/// The start of one factor: the unfolding's leading left singular vectors, `rank` of them, or all
/// of them followed by uniform filler columns in [0, 1) (tensorly's `init='svd'`) when the mode
/// has fewer.
fn svd_start(unfolding: &Tensor, rank: i64, rng: &mut StdRng) -> Tensor {
    let dim = unfolding.size()[0];
    let vectors = gram_eigen_descending(unfolding).1;
    if rank <= dim {
        return vectors.narrow(1, 0, rank);
    }
    let filler: Vec<f64> = (0..dim * (rank - dim)).map(|_| rng.random()).collect();
    let filler = Tensor::from_slice(&filler).reshape([dim, rank - dim]);
    Tensor::cat(&[vectors, filler], 1)
}

/// The column-wise Kronecker product of K (kh × R) and L (kw × R): (kh·kw) × R, row i·kw + j
/// holding K[i, ·] ⊙ L[j, ·] (the order of a kernel's taps).
fn khatri_rao(k: &Tensor, l: &Tensor) -> Tensor {
    let rank = k.size()[1];
    (k.unsqueeze(1) * l.unsqueeze(0)).reshape([-1, rank])
}

/// The least-squares factor F = M·G⁺ for the MTTKRP M (dim × R) and the Hadamard product of the
/// other factors' Grams G (R × R, symmetric positive semi-definite): G's pseudo-inverse from its
/// eigenvalues, those below 1e-12 of the largest dropped, so a rank-deficient G (a rank above the
/// kernel's) stays finite.
fn solve(mttkrp: &Tensor, gram: &Tensor) -> Tensor {
    let (values, vectors) = gram.linalg_eigh("L");
    let largest = values.max().double_value(&[]).max(f64::MIN_POSITIVE);
    let kept = values.gt(largest * 1e-12);
    let inverse = values.reciprocal().where_self(&kept, &values.zeros_like());
    mttkrp.matmul(&(&vectors * inverse.unsqueeze(0)).matmul(&vectors.tr()))
}

/// The factors rescaled so that each component's four columns have equal norms (their product,
/// the component's weight, unchanged): factors that fine-tune at one scale. A zero column stays
/// zero.
fn balanced(factors: [Tensor; 4]) -> [Tensor; 4] {
    let norms: Vec<Tensor> = factors
        .iter()
        .map(|f| f.square().sum_dim_intlist(0, true, Kind::Double).sqrt())
        .collect();
    let weight = norms.iter().skip(1).fold(norms[0].copy(), |p, n| p * n);
    let target = weight.pow_tensor_scalar(0.25);
    factors.map(|f| {
        let norm = f.square().sum_dim_intlist(0, true, Kind::Double).sqrt();
        let scale = (&target / norm.clamp_min(f64::MIN_POSITIVE))
            .where_self(&norm.gt(0.0), &norm.zeros_like());
        f * scale
    })
}

/// A random kernel C_out × C_in × kh × kw of CP rank `rank` (f64, from tch's global generator):
/// what a CP fit at that rank must reproduce exactly.
pub fn random_cp_kernel(shape: [i64; 4], rank: i64) -> Tensor {
    let [o, c, kh, kw] = shape;
    let f = |n: i64| Tensor::randn([n, rank], (Kind::Double, Device::Cpu));
    CpFactors {
        a: f(o),
        b: f(c),
        k: f(kh),
        l: f(kw),
        relative_error: 0.0,
        iterations: 0,
    }
    .reconstruct()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decompose::relative_error;

    #[test]
    fn a_kernel_of_cp_rank_r_is_fitted_exactly_at_rank_r() {
        tch::manual_seed(1);
        for (shape, rank) in [([16, 12, 3, 3], 5), ([8, 8, 3, 3], 2), ([6, 4, 3, 3], 4)] {
            let w = random_cp_kernel(shape, rank);
            let options = CpOptions {
                max_iterations: 2000,
                tolerance: 1e-14,
                ..CpOptions::default()
            };
            let fit = cp_als(&w, rank, options);
            let err = relative_error(&w, &fit.reconstruct());
            assert!(err < 1e-5, "{shape:?} rank {rank}: error {err}");
            assert!((err - fit.relative_error).abs() < 1e-6, "tracked error");
        }
    }

    #[test]
    fn the_fit_is_deterministic_and_balanced_and_never_worse_with_more_rank() {
        tch::manual_seed(2);
        let w = Tensor::randn([12, 10, 3, 3], (Kind::Double, Device::Cpu));
        let one = cp_als(&w, 14, CpOptions::default());
        let two = cp_als(&w, 14, CpOptions::default());
        assert_eq!(one.a, two.a);
        assert_eq!(one.l, two.l);
        let norms: Vec<Tensor> = [&one.a, &one.b, &one.k, &one.l]
            .iter()
            .map(|f| f.square().sum_dim_intlist(0, false, Kind::Double).sqrt())
            .collect();
        for n in &norms[1..] {
            assert!((n - &norms[0]).abs().max().double_value(&[]) < 1e-9);
        }
        // A fit continued from one stopped early is the longer fit.
        let sweeps = |n| CpOptions {
            max_iterations: n,
            tolerance: 0.0,
            ..CpOptions::default()
        };
        let long = cp_als(&w, 6, sweeps(40));
        let continued = cp_als_from(&w, &cp_als(&w, 6, sweeps(15)), sweeps(40));
        assert_eq!(continued.iterations, 40);
        let gap = relative_error(&long.reconstruct(), &continued.reconstruct());
        assert!(gap < 1e-8, "continued fit differs by {gap}");
        let small = cp_als(&w, 4, CpOptions::default());
        assert!(small.relative_error > one.relative_error);
        let reconstructed = relative_error(&w, &one.reconstruct());
        assert!((reconstructed - one.relative_error).abs() < 1e-6);
    }
}
