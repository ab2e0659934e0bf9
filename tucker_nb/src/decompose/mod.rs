//! The decompositions themselves, on plain tensors (a leaf: no layer or model types here).
//!
//! Tucker-2 approximates a kernel W (C_out × C_in × kh × kw) on its two channel modes:
//!
//!   W ≈ S ×0 U0 ×1 U1,  U0 = leading r_out left singular vectors of W's mode-0 unfolding,
//!                       U1 = leading r_in left singular vectors of W's mode-1 unfolding,
//!                       S  = W ×0 U0ᵀ ×1 U1ᵀ  (r_out × r_in × kh × kw),
//!
//! which is the HOSVD truncated on modes 0 and 1; HOOI refines U0, U1 by alternating updates. A 1×1
//! kernel can instead be split by its truncated SVD into two factors, and any kernel approximated by
//! a sum of R rank-one terms (CP, `cp.rs` beside this file). Everything is computed in f64 on the
//! CPU.

mod cp;

pub use cp::{cp_als, cp_als_from, random_cp_kernel, CpFactors, CpOptions};

use tch::{Device, Kind, Tensor};

/// How Tucker-2 factors are fitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Truncated HOSVD, the seed's: one SVD per mode.
    Hosvd,
    /// HOOI: alternating least squares from the HOSVD start,
    /// U0 ← leading r_out left singular vectors of (W ×1 U1ᵀ)₍₀₎,
    /// U1 ← leading r_in left singular vectors of (W ×0 U0ᵀ)₍₁₎,
    /// until the fit ‖S‖²/‖W‖² stops improving. Never worse than HOSVD.
    Hooi,
}

/// Tucker-2 factors of a kernel: W ≈ core ×0 u0 ×1 u1 (all f64, on the CPU).
#[derive(Debug)]
pub struct Tucker2Factors {
    /// C_out × r_out.
    pub u0: Tensor,
    /// r_out × r_in × kh × kw.
    pub core: Tensor,
    /// C_in × r_in.
    pub u1: Tensor,
}

/// t ×0 a ×1 b for a 4-way tensor t (n0 × n1 × kh × kw), a (m0 × n0), b (m1 × n1).
pub fn mode_products(t: &Tensor, a: &Tensor, b: &Tensor) -> Tensor {
    let [n0, n1, kh, kw] = t.size()[..] else {
        unreachable!("conv kernel is 4-way")
    };
    let (m0, m1) = (a.size()[0], b.size()[0]);
    // Two matrix products on unfoldings; one einsum over all three would form a ⊗ b first.
    let t0 = a.matmul(&t.reshape([n0, -1])).reshape([m0, n1, kh, kw]);
    let t1 = b.matmul(&t0.transpose(0, 1).reshape([n1, -1]));
    t1.reshape([m1, m0, kh, kw]).transpose(0, 1).contiguous()
}

/// The (mode-0, mode-1) unfoldings of a conv kernel C_out × C_in × kh × kw.
pub fn unfoldings(weight: &Tensor) -> (Tensor, Tensor) {
    let s = weight.size();
    (
        weight.reshape([s[0], -1]),
        weight.transpose(0, 1).reshape([s[1], -1]),
    )
}

/// Singular values of `m` (rows × cols), min(rows, cols) of them, descending, in f64: the square
/// roots of the eigenvalues of the smaller Gram matrix (m·mᵀ or mᵀ·m), several times faster than
/// an SVD's bidiagonalisation of a C × 9C unfolding. A value is exact to about 1e-8 of the largest
/// (the Gram squares them), far below what the rank policies tell apart.
pub fn singular_values(m: &Tensor) -> Vec<f64> {
    let m = as_f64(m);
    let [rows, cols] = m.size()[..] else {
        unreachable!("singular values of a matrix")
    };
    let gram = if rows <= cols {
        m.matmul(&m.tr())
    } else {
        m.tr().matmul(&m)
    };
    let ascending = gram.linalg_eigvalsh("L").clamp_min(0.0).sqrt();
    Vec::<f64>::try_from(ascending.flip([0])).expect("1-D")
}

fn as_f64(t: &Tensor) -> Tensor {
    t.detach().to_device(Device::Cpu).to_kind(Kind::Double)
}

/// The leading `rank` left singular vectors of `m` (rows × cols), as the leading eigenvectors of
/// the rows × rows Gram matrix m·mᵀ: one symmetric eigenproblem instead of an SVD of the whole
/// unfolding (a conv's is C × 9C), several times faster and the same subspace up to each vector's
/// sign. `rank` may exceed cols (a 1×1 conv's r_out can exceed C_in): the basis is always full.
fn leading_left_singular_vectors(m: &Tensor, rank: i64) -> Tensor {
    gram_eigen_descending(m).1.narrow(1, 0, rank)
}

/// The eigenvalues and eigenvectors of the Gram matrix m·mᵀ, by descending eigenvalue.
fn gram_eigen_descending(m: &Tensor) -> (Tensor, Tensor) {
    let (values, vectors) = m.matmul(&m.tr()).linalg_eigh("L"); // ascending eigenvalues
    (values.flip([0]), vectors.flip([1]))
}

/// `m`'s singular values (min(rows, cols) of them, as [`singular_values`]) and all its left
/// singular vectors (rows × rows: a full orthonormal basis, those of singular value 0 last), both
/// descending, from one eigenproblem of the Gram matrix m·mᵀ.
fn left_singular_pairs(m: &Tensor) -> (Vec<f64>, Tensor) {
    let [rows, cols] = m.size()[..] else {
        unreachable!("singular vectors of a matrix")
    };
    let (values, vectors) = gram_eigen_descending(m);
    let singular = values.narrow(0, 0, rows.min(cols)).clamp_min(0.0).sqrt();
    (Vec::<f64>::try_from(singular).expect("1-D"), vectors)
}

/// Both channel modes' spectra and full left singular bases of a kernel, from one Gram
/// eigenproblem per mode: what the planner prices with ([`Self::rank_pair_energy`], the rank
/// policies' spectra) and what HOSVD, and HOOI's start, narrow to their ranks
/// ([`Self::tucker2`]), so that planning and fitting a layer form each Gram once.
#[derive(Debug)]
pub struct KernelSpectra {
    /// Singular values of the mode-0 and mode-1 unfoldings, descending.
    pub s0: Vec<f64>,
    pub s1: Vec<f64>,
    /// The unfoldings' full left singular bases (C_out × C_out, C_in × C_in).
    u0: Tensor,
    u1: Tensor,
}

impl KernelSpectra {
    pub fn of(weight: &Tensor) -> Self {
        let (by_output, by_input) = unfoldings(&as_f64(weight));
        let (s0, u0) = left_singular_pairs(&by_output);
        let (s1, u1) = left_singular_pairs(&by_input);
        Self { s0, s1, u0, u1 }
    }

    /// The truncated-HOSVD factors of `weight` (the kernel these spectra are of) at ranks
    /// (r_out, r_in): [`tucker2`] without its eigenproblems.
    pub fn tucker2(&self, weight: &Tensor, (r_out, r_in): (i64, i64)) -> Tucker2Factors {
        let (u0, u1) = (self.u0.narrow(1, 0, r_out), self.u1.narrow(1, 0, r_in));
        let core = mode_products(&as_f64(weight), &u0.tr(), &u1.tr());
        Tucker2Factors { u0, core, u1 }
    }
}

/// The truncated-HOSVD Tucker-2 factors of a kernel at ranks (r_out, r_in).
pub fn tucker2(weight: &Tensor, ranks: (i64, i64)) -> Tucker2Factors {
    KernelSpectra::of(weight).tucker2(weight, ranks)
}

/// HOOI stops when a sweep lowers the relative error ‖W − Ŵ‖/‖W‖ by less than this, or after
/// HOOI_MAX_SWEEPS. Flat spectra (random kernels, and most of a trained ResNet18's 3×3 kernels at
/// the ranks budgets choose) converge slowly and gain little: at 1e-8 the digits model's 512-channel
/// layers ran all 500 sweeps, where 1e-6 stops them after 57–112 within 1e-4 of sweep 500's error.
const HOOI_TOL: f64 = 1e-6;
const HOOI_MAX_SWEEPS: usize = 500;

/// W ×k Uᵀ unfolded on the other channel mode: `by_mode` is W's mode-k unfolding (C_k × rest),
/// `u` its C_k × r basis; the result is C_other × (r·kh·kw).
fn project_and_unfold(u: &Tensor, by_mode: &Tensor, [c_other, kh, kw]: [i64; 3]) -> Tensor {
    let r = u.size()[1];
    u.tr()
        .matmul(by_mode)
        .reshape([r, c_other, kh, kw])
        .transpose(0, 1)
        .reshape([c_other, -1])
}

/// The Tucker-2 factors fitted by HOOI from the HOSVD start.
pub fn tucker2_hooi(weight: &Tensor, ranks: (i64, i64)) -> Tucker2Factors {
    tucker2_hooi_from(weight, tucker2(weight, ranks))
}

/// HOOI from the HOSVD factors `start` of `weight` (at the ranks to fit).
fn tucker2_hooi_from(weight: &Tensor, start: Tucker2Factors) -> Tucker2Factors {
    let (r_out, r_in) = (start.u0.size()[1], start.u1.size()[1]);
    let w = as_f64(weight);
    let [c_out, c_in, kh, kw] = w.size()[..] else {
        unreachable!("conv kernel is 4-way")
    };
    if r_out == c_out || r_in == c_in {
        // One mode kept whole: the HOSVD projection of the other is the truncated SVD of its
        // unfolding, optimal by Eckart–Young, so no sweep can improve it (Tucker-1 forms).
        return start;
    }
    let norm2 = w.square().sum(Kind::Double).double_value(&[]);
    let rel_error = |core: &Tensor| {
        (1.0 - core.square().sum(Kind::Double).double_value(&[]) / norm2)
            .max(0.0)
            .sqrt()
    };
    let mut factors = start;
    let mut error = rel_error(&factors.core);
    let (by_output, by_input) = unfoldings(&w);
    for _ in 0..HOOI_MAX_SWEEPS {
        // W ×1 U1ᵀ unfolded on mode 0, then W ×0 U0ᵀ unfolded on mode 1.
        let y0 = project_and_unfold(&factors.u1, &by_input, [c_out, kh, kw]);
        let u0 = leading_left_singular_vectors(&y0, r_out);
        let y1 = project_and_unfold(&u0, &by_output, [c_in, kh, kw]);
        let u1 = leading_left_singular_vectors(&y1, r_in);
        let core = mode_products(&w, &u0.tr(), &u1.tr());
        let new_error = rel_error(&core);
        let gained = error - new_error;
        error = new_error;
        factors = Tucker2Factors { u0, core, u1 };
        if gained <= HOOI_TOL {
            break;
        }
    }
    factors
}

/// Tucker-2 factors by `method`; with the kernel's `spectra` (when the planner has them), HOSVD
/// takes its bases from them.
pub fn fit_tucker2(
    weight: &Tensor,
    ranks: (i64, i64),
    method: Method,
    spectra: Option<&KernelSpectra>,
) -> Tucker2Factors {
    let hosvd = match spectra {
        Some(spectra) => spectra.tucker2(weight, ranks),
        None => tucker2(weight, ranks),
    };
    match method {
        Method::Hosvd => hosvd,
        Method::Hooi => tucker2_hooi_from(weight, hosvd),
    }
}

/// Second moments of a conv's activations on calibration data, in f64: what output-error fitting
/// needs. Per pixel: `input` = E[x xᵀ] over the C_in input channels, `output` = E[y yᵀ] over the
/// C_out output channels (bias excluded); `samples`: the pixels they were averaged over.
#[derive(Debug)]
pub struct ActivationMoments {
    pub input: Tensor,
    pub output: Tensor,
    pub samples: i64,
}

impl ActivationMoments {
    /// The input moment shrunk toward its mean eigenvalue, Σ' = (1 − λ)·Σ + λ·(tr Σ / n)·I with
    /// λ = max(n / (n + samples), 10⁻³): few samples per channel (deep layers at small images) give
    /// a rank-deficient Σ whose inverse square root would amplify the directions calibration never
    /// saw; with plenty of samples Σ is used nearly as measured.
    pub fn shrunk_input(&self) -> Tensor {
        let input = as_f64(&self.input);
        let n = input.size()[0];
        let lambda = (n as f64 / (n + self.samples.max(0)) as f64).max(1e-3);
        let mean = input.trace().double_value(&[]) / n as f64;
        input * (1.0 - lambda) + Tensor::eye(n, (Kind::Double, Device::Cpu)) * (lambda * mean)
    }
}

/// What a Tucker-2 projection of one kernel keeps, for every rank pair at once.
///
/// With orthonormal bases U (output mode) and V (input mode) in the metric the fit uses, and
/// B = W ×0 Uᵀ ×1 (Vᵀ·R) (R = Σ^{1/2} for data, I for weights), the projection onto the leading
/// r_out and r_in directions keeps exactly Σ_{o<r_out, i<r_in, taps} B², because the bases are
/// orthonormal (Pythagoras). One 2-D cumulative sum of B² gives the error of every (r_out, r_in)
/// pair: the error of the pair itself, not a sum of per-mode bounds. Exact for the fits we make:
/// HOSVD on weights (HOOI only does better) and the whitened fit on data ([`tucker2_whitened`]).
#[derive(Debug, Clone)]
pub struct RankPairEnergy {
    /// kept[(r_out − 1)·n1 + (r_in − 1)], r_out ≤ n0, r_in ≤ n1.
    kept: Vec<f64>,
    n0: usize,
    n1: usize,
    /// Squared singular values of the (whitened) kernel when it is 1×1: the SVD forms' errors.
    svd: Vec<f64>,
    total: f64,
}

impl RankPairEnergy {
    /// Relative squared error of Tucker-2 at (r_out, r_in); ranks beyond the kernel's own rank
    /// lose nothing more.
    pub fn tucker2_error(&self, r_out: i64, r_in: i64) -> f64 {
        let o = (r_out.max(1) as usize).min(self.n0) - 1;
        let i = (r_in.max(1) as usize).min(self.n1) - 1;
        (1.0 - self.kept[o * self.n1 + i] / self.total).max(0.0)
    }

    /// Relative squared error of a 1×1 kernel's rank-`rank` SVD.
    pub fn svd_error(&self, rank: i64) -> f64 {
        let tail: f64 = self.svd.iter().skip(rank.max(0) as usize).sum();
        tail / self.total
    }
}

/// [`RankPairEnergy`] of `weight`, in the output-error metric of `moments` when given (the bases
/// [`tucker2_whitened`] and [`svd_factors_whitened`] use), else in the kernel's (HOSVD's bases).
pub fn rank_pair_energy(weight: &Tensor, moments: Option<&ActivationMoments>) -> RankPairEnergy {
    KernelSpectra::of(weight).rank_pair_energy(weight, moments)
}

impl KernelSpectra {
    /// [`rank_pair_energy`] of `weight`, the kernel these spectra are of: on the weights its
    /// bases are these spectra's.
    pub fn rank_pair_energy(
        &self,
        weight: &Tensor,
        moments: Option<&ActivationMoments>,
    ) -> RankPairEnergy {
        let w = as_f64(weight);
        let [c_out, c_in, kh, kw] = w.size()[..] else {
            unreachable!("conv kernel is 4-way")
        };
        let (u, v, root) = match moments {
            Some(m) => {
                let (_, vectors) = as_f64(&m.output).linalg_eigh("L"); // ascending
                let root = sqrt_and_inverse(&m.shrunk_input()).0;
                let v = left_singular_pairs(&root.matmul(&unfoldings(&w).1)).1;
                (vectors.flip([1]), v, root)
            }
            None => (
                self.u0.shallow_clone(),
                self.u1.shallow_clone(),
                Tensor::eye(c_in, (Kind::Double, Device::Cpu)),
            ),
        };
        let b = mode_products(&w, &u.tr(), &v.tr().matmul(&root));
        let energy = b
            .square()
            .sum_dim_intlist([2, 3].as_slice(), false, Kind::Double);
        let total = energy
            .sum(Kind::Double)
            .double_value(&[])
            .max(f64::MIN_POSITIVE);
        let kept = energy.cumsum(0, Kind::Double).cumsum(1, Kind::Double);
        let (n0, n1) = (kept.size()[0] as usize, kept.size()[1] as usize);
        let svd = match (moments, [kh, kw]) {
            (_, [k, l]) if [k, l] != [1, 1] => Vec::new(),
            (Some(_), _) => singular_values(&w.reshape([c_out, c_in]).matmul(&root)),
            (None, _) => self.s0.clone(), // the 1×1 kernel is its own mode-0 unfolding
        };
        RankPairEnergy {
            kept: Vec::<f64>::try_from(kept.reshape([-1])).expect("1-D"),
            n0,
            n1,
            svd: svd.into_iter().map(|s| s * s).collect(),
            total,
        }
    }
}

/// The symmetric square root of a PSD matrix and its inverse, with eigenvalues floored at
/// `1e-9·tr(m)/n` so that a singular matrix stays invertible.
fn sqrt_and_inverse(m: &Tensor) -> (Tensor, Tensor) {
    let n = m.size()[0];
    let floor = 1e-9 * m.trace().double_value(&[]).max(f64::MIN_POSITIVE) / n as f64;
    let (values, vectors) = m.linalg_eigh("L");
    let values = values.clamp_min(floor);
    let scale = |p: f64| {
        vectors
            .matmul(&values.pow_tensor_scalar(p).diag_embed(0, -2, -1))
            .matmul(&vectors.tr())
    };
    (scale(0.5), scale(-0.5))
}

/// Tucker-2 factors that minimise the layer's output error on data with these `moments` rather
/// than the kernel error:
///
/// - U0: the leading r_out eigenvectors of E[y yᵀ] (the outputs' principal directions);
/// - input mode in the metric of Σ = E[x xᵀ] ([`ActivationMoments::shrunk_input`]): V = leading
///   r_in left singular vectors of
///   Σ^{1/2}·W₍₁₎, first layer Vᵀ·Σ^{-1/2}, core S = W ×0 U0ᵀ ×1 (Vᵀ·Σ^{1/2}),
///
/// so Ŵ = W ×0 U0U0ᵀ ×1 (Σ^{-1/2}VVᵀΣ^{1/2})ᵀ: exact at full rank, and plain HOSVD when both
/// moments are those of white inputs (Σ = I, E[y yᵀ] ∝ W₍₀₎W₍₀₎ᵀ). For a k×k conv Σ is per pixel,
/// which ignores the correlation between neighbouring pixels. Returned as [`Tucker2Factors`] whose
/// `u1` is Σ^{-1/2}V (no longer orthonormal), so that `u1ᵀ` is the first layer.
pub fn tucker2_whitened(
    weight: &Tensor,
    (r_out, r_in): (i64, i64),
    moments: &ActivationMoments,
) -> Tucker2Factors {
    let w = as_f64(weight);
    let (output, input) = (as_f64(&moments.output), moments.shrunk_input());
    let (_, vectors) = output.linalg_eigh("L"); // ascending eigenvalues
    let c_out = output.size()[0];
    let u0 = vectors.narrow(1, c_out - r_out, r_out).flip([1]);
    let (root, inverse_root) = sqrt_and_inverse(&input);
    let (_, by_input) = unfoldings(&w);
    let v = leading_left_singular_vectors(&root.matmul(&by_input), r_in);
    let core = mode_products(&w, &u0.tr(), &v.tr().matmul(&root));
    Tucker2Factors {
        u0,
        core,
        u1: inverse_root.matmul(&v),
    }
}

/// The relative output error √(E‖(W − Ŵ)x‖² / E‖Wx‖²) of a 1×1 kernel approximation for inputs
/// with second moment Σ = E[x xᵀ] (per pixel; for a k×k kernel, summed over its taps, which
/// ignores the correlation between neighbouring pixels).
pub fn relative_output_error(original: &Tensor, approx: &Tensor, input_moment: &Tensor) -> f64 {
    let w = as_f64(original);
    let (c_out, c_in) = (w.size()[0], w.size()[1]);
    let taps = |t: &Tensor| t.reshape([c_out, c_in, -1]).permute([2, 0, 1]); // taps × C_out × C_in
    let sigma = as_f64(input_moment);
    let energy = |a: &Tensor| {
        let a = taps(a);
        (a.matmul(&sigma) * &a).sum(Kind::Double).double_value(&[])
    };
    let diff = &w - as_f64(approx);
    (energy(&diff) / energy(&w).max(f64::MIN_POSITIVE)).sqrt()
}

/// The rank-`rank` truncated SVD of a C_out × C_in matrix as two factors, W ≈ last · first, with
/// the singular values split evenly (last = U·√Σ, C_out × r; first = √Σ·Vᵀ, r × C_in) so that both
/// train at the same scale.
pub fn svd_factors(matrix: &Tensor, rank: i64) -> (Tensor, Tensor) {
    let (u, s, v) = as_f64(matrix).svd(true, true);
    let root = s.narrow(0, 0, rank).sqrt();
    let last = u.narrow(1, 0, rank) * root.unsqueeze(0);
    let first = v.narrow(1, 0, rank).tr() * root.unsqueeze(1);
    (first, last)
}

/// The rank-`rank` SVD of a C_out × C_in matrix A that minimises the output error for inputs with
/// second moment Σ (`moments.shrunk_input()`): A·Σ^{1/2} ≈ U·S·Vᵀ, so Â = (U·√S)·(√S·Vᵀ·Σ^{-1/2});
/// returned as (first, last) like [`svd_factors`], which it equals when Σ = I.
pub fn svd_factors_whitened(
    matrix: &Tensor,
    rank: i64,
    moments: &ActivationMoments,
) -> (Tensor, Tensor) {
    let (root, inverse_root) = sqrt_and_inverse(&moments.shrunk_input());
    let (first, last) = svd_factors(&as_f64(matrix).matmul(&root), rank);
    (first.matmul(&inverse_root), last)
}

/// ‖W − Ŵ‖ / ‖W‖, in f64.
pub fn relative_error(original: &Tensor, approx: &Tensor) -> f64 {
    let original = original.to_kind(Kind::Double);
    let diff = &original - approx.to_kind(Kind::Double).to_device(original.device());
    diff.norm().double_value(&[]) / original.norm().double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_error_matches_the_discarded_energy_bound() {
        // HOSVD error is bounded by the discarded singular values of each unfolding.
        tch::manual_seed(0);
        let w = Tensor::randn([16, 16, 3, 3], (Kind::Double, Device::Cpu));
        let f = tucker2(&w, (8, 8));
        let err = relative_error(&w, &mode_products(&f.core, &f.u0, &f.u1));
        let tail = |m: Tensor| {
            let (_, s, _) = m.svd(true, false);
            let s2 = &s * &s;
            s2.narrow(0, 8, 8).sum(Kind::Double).double_value(&[])
        };
        let (by_output, by_input) = unfoldings(&w);
        let bound = (tail(by_output) + tail(by_input)).sqrt() / w.norm().double_value(&[]);
        assert!(err > 0.0 && err <= bound + 1e-9, "err {err} bound {bound}");
        let hooi = tucker2_hooi(&w, (8, 8));
        let hooi_err = relative_error(&w, &mode_products(&hooi.core, &hooi.u0, &hooi.u1));
        assert!(hooi_err <= err + 1e-12, "HOOI {hooi_err} > HOSVD {err}");
    }

    /// Moments of `n` inputs with channel scales `scales` (anisotropic when they differ) through a
    /// 1×1 kernel `w`: (E[x xᵀ], E[y yᵀ]) and the inputs themselves (C_in × n).
    fn moments_of(w: &Tensor, scales: &Tensor, n: i64) -> (ActivationMoments, Tensor) {
        let x =
            Tensor::randn([scales.size()[0], n], (Kind::Double, Device::Cpu)) * scales.unsqueeze(1);
        let a = w.flatten(1, 3);
        let y = a.matmul(&x);
        let moments = ActivationMoments {
            input: x.matmul(&x.tr()) / n as f64,
            output: y.matmul(&y.tr()) / n as f64,
            samples: n,
        };
        (moments, x)
    }

    fn reconstruct(f: &Tucker2Factors) -> Tensor {
        mode_products(&f.core, &f.u0, &f.u1)
    }

    #[test]
    fn whitened_fitting_lowers_the_output_error_on_anisotropic_inputs() {
        tch::manual_seed(3);
        let opts = (Kind::Double, Device::Cpu);
        let w = Tensor::randn([32, 24, 1, 1], opts);
        // Input channels whose scales span two orders of magnitude.
        let scales = Tensor::logspace(-1.0, 1.0, 24, 10.0, opts);
        let (moments, x) = moments_of(&w, &scales, 4000);
        let measured = |approx: &Tensor| {
            let (a, b) = (w.flatten(1, 3), approx.flatten(1, 3));
            let err = (a.matmul(&x) - b.matmul(&x)).norm().double_value(&[]);
            err / a.matmul(&x).norm().double_value(&[])
        };
        for ranks in [(8, 6), (16, 12), (24, 4)] {
            let plain = measured(&reconstruct(&tucker2(&w, ranks)));
            let whitened_fit = reconstruct(&tucker2_whitened(&w, ranks, &moments));
            let whitened = measured(&whitened_fit);
            assert!(
                whitened < 0.9 * plain,
                "{ranks:?}: whitened {whitened} vs plain {plain}"
            );
            // The moment formula agrees with the error measured on the samples themselves.
            let formula = relative_output_error(&w, &whitened_fit, &moments.input);
            assert!((formula - whitened).abs() < 1e-9, "{formula} vs {whitened}");
        }
        // Exact at full rank.
        let full = reconstruct(&tucker2_whitened(&w, (32, 24), &moments));
        assert!(relative_error(&w, &full) < 1e-9);
    }

    #[test]
    fn few_calibration_samples_do_not_amplify_unseen_directions() {
        // 8 samples of 24 channels: a rank-8 covariance. Unshrunk, its inverse square root would
        // blow up the other 16 directions on fresh inputs; shrunk, the fit stays near HOSVD's.
        tch::manual_seed(7);
        let opts = (Kind::Double, Device::Cpu);
        let w = Tensor::randn([32, 24, 1, 1], opts);
        let scales = Tensor::logspace(-1.0, 1.0, 24, 10.0, opts);
        let (moments, _) = moments_of(&w, &scales, 8);
        let (_, fresh) = moments_of(&w, &scales, 4000);
        let a = w.flatten(1, 3);
        let measured = |approx: &Tensor| {
            let b = approx.flatten(1, 3);
            let err = (a.matmul(&fresh) - b.matmul(&fresh))
                .norm()
                .double_value(&[]);
            err / a.matmul(&fresh).norm().double_value(&[])
        };
        let plain = measured(&reconstruct(&tucker2(&w, (16, 12))));
        let whitened = measured(&reconstruct(&tucker2_whitened(&w, (16, 12), &moments)));
        assert!(
            whitened < 1.25 * plain,
            "whitened {whitened} vs plain {plain}"
        );
        let spread = |m: &ActivationMoments| {
            let (_, s, _) = tucker2_whitened(&w, (16, 12), m).u1.svd(true, false);
            let s = Vec::<f64>::try_from(s).unwrap();
            s[0] / s[s.len() - 1]
        };
        // The first layer stays well conditioned (unshrunk: a spread of ~3000, which float32
        // layers and SGD do not survive; the measured anisotropy alone gives ~9).
        let (well_measured, _) = moments_of(&w, &scales, 4000);
        assert!(spread(&moments) < 20.0, "spread {}", spread(&moments));
        assert!(
            spread(&well_measured) < 20.0,
            "spread {}",
            spread(&well_measured)
        );
        let (first, last) = svd_factors_whitened(&a, 12, &moments);
        let svd = measured(&last.matmul(&first).unsqueeze(-1).unsqueeze(-1));
        assert!(svd.is_finite() && svd < 1.0, "{svd}");
    }

    #[test]
    fn whitened_fitting_is_hosvd_for_white_inputs() {
        tch::manual_seed(4);
        let opts = (Kind::Double, Device::Cpu);
        let w = Tensor::randn([16, 12, 3, 3], opts);
        let (by_output, _) = unfoldings(&w);
        let white = ActivationMoments {
            input: Tensor::eye(12, opts),
            output: by_output.matmul(&by_output.tr()),
            samples: 1000,
        };
        for ranks in [(4, 3), (10, 7), (16, 12)] {
            let plain = reconstruct(&tucker2(&w, ranks));
            let whitened = reconstruct(&tucker2_whitened(&w, ranks, &white));
            assert!(relative_error(&plain, &whitened) < 1e-6, "{ranks:?}");
        }
        // A dead input channel (singular covariance) still fits, exactly at full rank.
        let input = Tensor::eye(12, opts);
        let _ = input.get(5).fill_(0.0);
        let dead = ActivationMoments {
            input,
            output: white.output.shallow_clone(),
            samples: 1_000_000,
        };
        let full = reconstruct(&tucker2_whitened(&w, (16, 12), &dead));
        assert!(relative_error(&w, &full) < 1e-6);
        assert!(
            reconstruct(&tucker2_whitened(&w, (8, 6), &dead))
                .isfinite()
                .all()
                .int64_value(&[])
                == 1
        );
    }

    #[test]
    fn rank_pair_energy_gives_each_pairs_exact_error() {
        tch::manual_seed(6);
        let opts = (Kind::Double, Device::Cpu);
        let w = Tensor::randn([10, 6, 3, 3], opts);
        let mix = Tensor::randn([6, 6], opts);
        let out = Tensor::randn([10, 10], opts);
        let moments = ActivationMoments {
            input: mix.matmul(&mix.tr()),
            output: out.matmul(&out.tr()),
            samples: 50,
        };
        let on_weights = rank_pair_energy(&w, None);
        let on_data = rank_pair_energy(&w, Some(&moments));
        let metric = moments.shrunk_input();
        for ranks in [(1, 1), (3, 2), (10, 1), (4, 6), (10, 6)] {
            let hosvd = relative_error(&w, &reconstruct(&tucker2(&w, ranks))).powi(2);
            let ours = on_weights.tucker2_error(ranks.0, ranks.1);
            assert!((hosvd - ours).abs() < 1e-9, "{ranks:?}: {hosvd} vs {ours}");
            let fit = reconstruct(&tucker2_whitened(&w, ranks, &moments));
            let data = relative_output_error(&w, &fit, &metric).powi(2);
            let ours = on_data.tucker2_error(ranks.0, ranks.1);
            assert!((data - ours).abs() < 1e-9, "{ranks:?}: {data} vs {ours}");
        }
        // A 1×1 kernel: the SVD forms' errors, in both metrics.
        let pointwise = Tensor::randn([10, 6, 1, 1], opts);
        let (first, last) = svd_factors_whitened(&pointwise.reshape([10, 6]), 2, &moments);
        let fit = last.matmul(&first).reshape([10, 6, 1, 1]);
        let data = relative_output_error(&pointwise, &fit, &metric).powi(2);
        let ours = rank_pair_energy(&pointwise, Some(&moments)).svd_error(2);
        assert!((data - ours).abs() < 1e-9, "{data} vs {ours}");
        assert!(rank_pair_energy(&pointwise, None).svd_error(6) < 1e-12);
    }

    #[test]
    fn singular_values_from_the_gram_equal_the_svds_for_wide_and_tall_matrices() {
        tch::manual_seed(4);
        for [rows, cols] in [[64, 576], [128, 64], [9, 9]] {
            let m = Tensor::randn([rows, cols], (Kind::Double, Device::Cpu));
            let ours = singular_values(&m);
            let (_, svd, _) = m.svd(true, false);
            let svd = Vec::<f64>::try_from(svd).unwrap();
            assert_eq!(ours.len(), svd.len(), "{rows}×{cols}");
            for (a, b) in ours.iter().zip(&svd) {
                assert!((a - b).abs() < 1e-8 * svd[0], "{rows}×{cols}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn svd_factors_keep_exactly_the_leading_singular_values() {
        tch::manual_seed(1);
        let w = Tensor::randn([12, 8], (Kind::Double, Device::Cpu));
        let (first, last) = svd_factors(&w, 8);
        assert!(relative_error(&w, &last.matmul(&first)) < 1e-12);
        let (first, last) = svd_factors(&w, 3);
        let s = singular_values(&w);
        let exact = (s[3..].iter().map(|v| v * v).sum::<f64>()
            / s.iter().map(|v| v * v).sum::<f64>())
        .sqrt();
        let err = relative_error(&w, &last.matmul(&first));
        assert!((err - exact).abs() < 1e-9, "{err} vs {exact}");
    }
}
