//! The decompositions themselves, on plain tensors (a leaf: no layer or model types here).
//!
//! Tucker-2 approximates a kernel W (C_out × C_in × kh × kw) on its two channel modes:
//!
//!   W ≈ S ×0 U0 ×1 U1,  U0 = leading r_out left singular vectors of W's mode-0 unfolding,
//!                       U1 = leading r_in left singular vectors of W's mode-1 unfolding,
//!                       S  = W ×0 U0ᵀ ×1 U1ᵀ  (r_out × r_in × kh × kw),
//!
//! which is the HOSVD truncated on modes 0 and 1; HOOI refines U0, U1 by alternating updates. A 1×1
//! kernel can instead be split by its truncated SVD into two factors. Everything is computed in f64
//! on the CPU.

use tch::{Device, Kind, Tensor};

/// How Tucker-2 factors are fitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
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

/// Singular values of `m` (rows × cols), descending, in f64.
pub fn singular_values(m: &Tensor) -> Vec<f64> {
    let (_, s, _) = as_f64(m).svd(true, false);
    Vec::<f64>::try_from(s).expect("1-D")
}

fn as_f64(t: &Tensor) -> Tensor {
    t.detach().to_device(Device::Cpu).to_kind(Kind::Double)
}

/// The leading `rank` left singular vectors of `m` (rows × cols); `rank` may exceed cols (a 1×1
/// conv's r_out can exceed C_in), in which case the full basis is computed.
fn leading_left_singular_vectors(m: &Tensor, rank: i64) -> Tensor {
    let [rows, cols] = m.size()[..] else {
        unreachable!("unfolding is a matrix")
    };
    let (u, _, _) = m.svd(rank <= rows.min(cols), true);
    u.narrow(1, 0, rank)
}

/// The leading `rank` eigenvectors of m·mᵀ, i.e. m's leading left singular vectors: one
/// rows×rows symmetric eigenproblem, cheaper than an SVD inside HOOI's loop.
fn leading_gram_eigenvectors(m: &Tensor, rank: i64) -> Tensor {
    let rows = m.size()[0];
    let (_, vectors) = m.matmul(&m.tr()).linalg_eigh("L"); // ascending eigenvalues
    vectors.narrow(1, rows - rank, rank).flip([1])
}

/// The truncated-HOSVD Tucker-2 factors of a kernel at ranks (r_out, r_in).
pub fn tucker2(weight: &Tensor, (r_out, r_in): (i64, i64)) -> Tucker2Factors {
    let w = as_f64(weight);
    let (by_output, by_input) = unfoldings(&w);
    let u0 = leading_left_singular_vectors(&by_output, r_out);
    let u1 = leading_left_singular_vectors(&by_input, r_in);
    let core = mode_products(&w, &u0.tr(), &u1.tr());
    Tucker2Factors { u0, core, u1 }
}

/// HOOI stops when a sweep lowers the relative error ‖W − Ŵ‖/‖W‖ by less than this, or after
/// HOOI_MAX_SWEEPS (flat spectra, as in random kernels, converge slowly and gain little).
const HOOI_TOL: f64 = 1e-8;
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
    let (r_out, r_in) = ranks;
    let w = as_f64(weight);
    let [c_out, c_in, kh, kw] = w.size()[..] else {
        unreachable!("conv kernel is 4-way")
    };
    let norm2 = w.square().sum(Kind::Double).double_value(&[]);
    let rel_error = |core: &Tensor| {
        (1.0 - core.square().sum(Kind::Double).double_value(&[]) / norm2)
            .max(0.0)
            .sqrt()
    };
    let mut factors = tucker2(&w, ranks);
    let mut error = rel_error(&factors.core);
    let (by_output, by_input) = unfoldings(&w);
    for _ in 0..HOOI_MAX_SWEEPS {
        // W ×1 U1ᵀ unfolded on mode 0, then W ×0 U0ᵀ unfolded on mode 1.
        let y0 = project_and_unfold(&factors.u1, &by_input, [c_out, kh, kw]);
        let u0 = leading_gram_eigenvectors(&y0, r_out);
        let y1 = project_and_unfold(&u0, &by_output, [c_in, kh, kw]);
        let u1 = leading_gram_eigenvectors(&y1, r_in);
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

/// Tucker-2 factors by `method`.
pub fn fit_tucker2(weight: &Tensor, ranks: (i64, i64), method: Method) -> Tucker2Factors {
    match method {
        Method::Hosvd => tucker2(weight, ranks),
        Method::Hooi => tucker2_hooi(weight, ranks),
    }
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
