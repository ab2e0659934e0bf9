//! Tucker-2 compression of convolutions (the seed's `TuckerCompressor`, without its bugs).
//!
//! A kernel W (C_out × C_in × kh × kw) is approximated on its two channel modes:
//!
//!   W ≈ S ×0 U0 ×1 U1,  U0 = leading r_out left singular vectors of W's mode-0 unfolding,
//!                       U1 = leading r_in left singular vectors of W's mode-1 unfolding,
//!                       S  = W ×0 U0ᵀ ×1 U1ᵀ  (r_out × r_in × kh × kw),
//!
//! which is the HOSVD truncated on modes 0 and 1. The conv becomes 1×1 (U1ᵀ) → kh×kw core (S,
//! with the original stride, padding, dilation) → 1×1 (U0, carrying the original bias, or zeros).

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::conv::{Conv2d, ConvConfig, ConvSlot, Form, SvdConv, TuckerConv};
use crate::error::{Error, Result};
use crate::model::ResNet18;
use crate::report::{CompressionReport, LayerReport};

/// How the (r_out, r_in) of each conv are chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum RankPolicy {
    /// The seed's rule: `max(1, int(C · ratio))` for each mode, every conv compressed. One
    /// deliberate difference: a conv reading ≤ 3 channels (the RGB stem) keeps its full input
    /// rank; the seed squeezes conv1's colour input to rank 1.
    Ratio(f64),
    /// (r_out, r_in) for the named layers; the others stay dense.
    Explicit(BTreeMap<String, (i64, i64)>),
    /// Per mode, the smallest rank keeping this share of the unfolding's squared singular values.
    Energy(f64),
    /// Per mode, the rank EVBMF estimates (Kim et al. 2016); at least 1.
    Vbmf,
    /// One budget for the whole model: this fraction of its conv MACs (at the policy's input size).
    BudgetMacs(f64),
    /// One budget for the whole model: this fraction of its conv parameters.
    BudgetParams(f64),
}

impl RankPolicy {
    /// `ratio` must lie in (0, 1].
    pub fn ratio(ratio: f64) -> Result<Self> {
        Ok(RankPolicy::Ratio(fraction("ratio", ratio)?))
    }

    /// Reads a JSON object `{"layer1.0.conv1": [r_out, r_in], ...}`.
    pub fn from_ranks_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        let ranks: BTreeMap<String, (i64, i64)> = serde_json::from_str(&text).map_err(|e| {
            Error::file(
                path,
                format!("expected {{\"layer\": [r_out, r_in], ...}}: {e}"),
            )
        })?;
        Ok(RankPolicy::Explicit(ranks))
    }

    /// `ratio:0.2`, `energy:0.9`, `vbmf`, `budget-macs:0.33` or `budget-params:0.25`.
    pub fn parse(spec: &str) -> Result<Self> {
        let (kind, value) = spec.split_once(':').unwrap_or((spec, ""));
        let number = |what: &str| {
            value.parse::<f64>().map_err(|_| {
                Error::value(
                    "policy",
                    format!("`{spec}`: {what} needs a number, as {what}:0.5"),
                )
            })
        };
        match kind {
            "ratio" => Ok(RankPolicy::Ratio(fraction("ratio", number("ratio")?)?)),
            "energy" => Ok(RankPolicy::Energy(fraction("energy", number("energy")?)?)),
            "vbmf" if value.is_empty() => Ok(RankPolicy::Vbmf),
            "budget-macs" => Ok(RankPolicy::BudgetMacs(fraction(
                "budget-macs",
                number("budget-macs")?,
            )?)),
            "budget-params" => Ok(RankPolicy::BudgetParams(fraction(
                "budget-params",
                number("budget-params")?,
            )?)),
            _ => Err(Error::value(
                "policy",
                format!(
                    "`{spec}` (expected ratio:R, energy:E, vbmf, budget-macs:F or budget-params:F)"
                ),
            )),
        }
    }

    /// HOSVD for the seed-compatible policies (ratio, explicit ranks), HOOI otherwise.
    pub fn default_method(&self) -> Method {
        match self {
            RankPolicy::Ratio(_) | RankPolicy::Explicit(_) => Method::Hosvd,
            _ => Method::Hooi,
        }
    }

    /// The ranks for a conv of dense shape `shape`, or `None` to leave it dense (the fixed-rule
    /// policies; the data-driven ones are planned from the weights by `plan_layers`).
    fn ranks_for(&self, layer: &str, shape: [i64; 4]) -> Option<(i64, i64)> {
        let [c_out, c_in, _, _] = shape;
        match self {
            RankPolicy::Ratio(ratio) => {
                let rank = |c: i64| ((c as f64 * ratio) as i64).max(1);
                let r_in = if c_in <= RGB { c_in } else { rank(c_in) };
                Some((rank(c_out), r_in))
            }
            RankPolicy::Explicit(ranks) => ranks.get(layer).copied(),
            _ => None,
        }
    }
}

/// The spec [`RankPolicy::parse`] reads (`explicit` for per-layer ranks).
impl std::fmt::Display for RankPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RankPolicy::Ratio(r) => write!(f, "ratio:{r}"),
            RankPolicy::Explicit(_) => write!(f, "explicit"),
            RankPolicy::Energy(e) => write!(f, "energy:{e}"),
            RankPolicy::Vbmf => write!(f, "vbmf"),
            RankPolicy::BudgetMacs(b) => write!(f, "budget-macs:{b}"),
            RankPolicy::BudgetParams(b) => write!(f, "budget-params:{b}"),
        }
    }
}

/// Convs reading at most this many channels (the image) keep their full input rank.
const RGB: i64 = 3;

fn fraction(what: &str, value: f64) -> Result<f64> {
    if value > 0.0 && value <= 1.0 {
        Ok(value)
    } else {
        Err(Error::value(what, format!("{value} (must be in (0, 1])")))
    }
}

/// What to compress and how; defaults mirror the seed (ratio 0.2, costs counted at 224 px).
#[derive(Debug, Clone, PartialEq)]
pub struct CompressionPolicy {
    pub ranks: RankPolicy,
    /// Image size [H, W] at which MACs are counted (and budgets measured).
    pub input_size: [i64; 2],
    /// `None`: the rank policy's default ([`RankPolicy::default_method`]).
    pub method: Option<Method>,
    /// Round automatically chosen ranks up to a multiple of this (8 suits tensor cores).
    pub round_to: Option<i64>,
}

impl Default for CompressionPolicy {
    fn default() -> Self {
        Self {
            ranks: RankPolicy::Ratio(0.2),
            input_size: [224, 224],
            method: None,
            round_to: None,
        }
    }
}

impl CompressionPolicy {
    pub fn new(ranks: RankPolicy) -> Self {
        Self {
            ranks,
            ..Self::default()
        }
    }
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

/// The leading `rank` left singular vectors of `m` (rows × cols); `rank` may exceed cols (a 1×1
/// conv's r_out can exceed C_in), in which case the full basis is computed.
fn leading_left_singular_vectors(m: &Tensor, rank: i64) -> Tensor {
    let [rows, cols] = m.size()[..] else {
        unreachable!("unfolding is a matrix")
    };
    let (u, _, _) = m.svd(rank <= rows.min(cols), true);
    u.narrow(1, 0, rank)
}

/// The Tucker-2 factors (U0, S, U1) of a kernel at ranks (r_out, r_in), computed in f64.
pub fn tucker2(weight: &Tensor, (r_out, r_in): (i64, i64)) -> (Tensor, Tensor, Tensor) {
    let w = weight.detach().to_device(Device::Cpu).to_kind(Kind::Double);
    let [c_out, c_in, _, _] = w.size()[..] else {
        unreachable!("conv kernel is 4-way")
    };
    let u0 = leading_left_singular_vectors(&w.reshape([c_out, -1]), r_out);
    let u1 = leading_left_singular_vectors(&w.transpose(0, 1).reshape([c_in, -1]), r_in);
    let core = mode_products(&w, &u0.tr(), &u1.tr());
    (u0, core, u1)
}

/// How the factors are fitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Truncated HOSVD, the seed's: one SVD per mode.
    Hosvd,
    /// HOOI: alternating least squares from the HOSVD start,
    /// U0 ← leading r_out left singular vectors of (W ×1 U1ᵀ)₍₀₎,
    /// U1 ← leading r_in left singular vectors of (W ×0 U0ᵀ)₍₁₎,
    /// until the fit ‖S‖²/‖W‖² stops improving. Never worse than HOSVD.
    Hooi,
}

impl Method {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "hosvd" => Ok(Method::Hosvd),
            "hooi" => Ok(Method::Hooi),
            other => Err(Error::value(
                "method",
                format!("`{other}` (expected hosvd or hooi)"),
            )),
        }
    }
}

/// HOOI stops when a sweep lowers the relative error ‖W − Ŵ‖/‖W‖ by less than this, or after
/// HOOI_MAX_SWEEPS (flat spectra, as in random kernels, converge slowly and gain little).
const HOOI_TOL: f64 = 1e-8;
const HOOI_MAX_SWEEPS: usize = 500;

/// The leading `rank` eigenvectors of m·mᵀ, i.e. m's leading left singular vectors: one
/// rows×rows symmetric eigenproblem, cheaper than an SVD inside HOOI's loop.
fn leading_gram_eigenvectors(m: &Tensor, rank: i64) -> Tensor {
    let rows = m.size()[0];
    let (_, vectors) = m.matmul(&m.tr()).linalg_eigh("L"); // ascending eigenvalues
    vectors.narrow(1, rows - rank, rank).flip([1])
}

/// The Tucker-2 factors (U0, S, U1) fitted by HOOI, computed in f64.
pub fn tucker2_hooi(weight: &Tensor, ranks: (i64, i64)) -> (Tensor, Tensor, Tensor) {
    let (r_out, r_in) = ranks;
    let w = weight.detach().to_device(Device::Cpu).to_kind(Kind::Double);
    let [c_out, c_in, kh, kw] = w.size()[..] else {
        unreachable!("conv kernel is 4-way")
    };
    let norm2 = w.square().sum(Kind::Double).double_value(&[]);
    let rel_error = |core: &Tensor| {
        (1.0 - core.square().sum(Kind::Double).double_value(&[]) / norm2)
            .max(0.0)
            .sqrt()
    };
    let (mut u0, mut core, mut u1) = tucker2(&w, ranks);
    let mut error = rel_error(&core);
    let by_input = w.transpose(0, 1).reshape([c_in, -1]); // W₍₁₎
    for _ in 0..HOOI_MAX_SWEEPS {
        // W ×1 U1ᵀ, unfolded on mode 0: C_out × (r_in·kh·kw).
        let y0 = u1
            .tr()
            .matmul(&by_input)
            .reshape([r_in, c_out, kh, kw])
            .transpose(0, 1)
            .reshape([c_out, -1]);
        u0 = leading_gram_eigenvectors(&y0, r_out);
        // W ×0 U0ᵀ, unfolded on mode 1: C_in × (r_out·kh·kw).
        let y1 = u0
            .tr()
            .matmul(&w.reshape([c_out, -1]))
            .reshape([r_out, c_in, kh, kw])
            .transpose(0, 1)
            .reshape([c_in, -1]);
        u1 = leading_gram_eigenvectors(&y1, r_in);
        core = mode_products(&w, &u0.tr(), &u1.tr());
        let new_error = rel_error(&core);
        let gained = error - new_error;
        error = new_error;
        if gained <= HOOI_TOL {
            break;
        }
    }
    (u0, core, u1)
}

/// Replaces a dense conv by its Tucker-2 factorisation at ranks (r_out, r_in), fitted by HOSVD.
pub fn compress_conv(layer: &str, conv: &Conv2d, ranks: (i64, i64)) -> Result<TuckerConv> {
    compress_conv_with(layer, conv, ranks, Method::Hosvd)
}

/// [`compress_conv`] with the fitting method of your choice.
pub fn compress_conv_with(
    layer: &str,
    conv: &Conv2d,
    ranks: (i64, i64),
    method: Method,
) -> Result<TuckerConv> {
    if conv.config.groups != 1 {
        return Err(Error::layer(
            layer,
            format!(
                "grouped convolution (groups = {}) cannot be Tucker-2 compressed",
                conv.config.groups
            ),
        ));
    }
    check_ranks(layer, [conv.out_channels(), conv.in_channels()], ranks)?;
    let (u0, core, u1) = match method {
        Method::Hosvd => tucker2(&conv.weight, ranks),
        Method::Hooi => tucker2_hooi(&conv.weight, ranks),
    };
    let device = conv.weight.device();
    let to_model = |t: Tensor| t.to_kind(Kind::Float).to_device(device).contiguous();
    let pointwise = ConvConfig::default();
    let bias = match &conv.bias {
        Some(b) => b.detach().copy(),
        None => Tensor::zeros([conv.out_channels()], (Kind::Float, device)),
    };
    Ok(TuckerConv {
        first: Conv2d {
            weight: to_model(u1.tr().unsqueeze(-1).unsqueeze(-1)),
            bias: None,
            config: pointwise,
        },
        core: Conv2d {
            weight: to_model(core),
            bias: None,
            config: conv.config,
        },
        last: Conv2d {
            weight: to_model(u0.unsqueeze(-1).unsqueeze(-1)),
            bias: Some(bias),
            config: pointwise,
        },
    })
}

fn check_ranks(layer: &str, [c_out, c_in]: [i64; 2], (r_out, r_in): (i64, i64)) -> Result<()> {
    for (mode, rank, dim) in [("r_out", r_out, c_out), ("r_in", r_in, c_in)] {
        if rank < 1 || rank > dim {
            return Err(Error::layer(
                layer,
                format!("{mode} = {rank} is outside 1..={dim} for a {c_out}×{c_in} conv"),
            ));
        }
    }
    Ok(())
}

/// ‖W − Ŵ‖ / ‖W‖.
pub fn relative_error(original: &Tensor, approx: &Tensor) -> f64 {
    let original = original.to_kind(Kind::Double);
    let diff = &original - approx.to_kind(Kind::Double).to_device(original.device());
    diff.norm().double_value(&[]) / original.norm().double_value(&[])
}

/// What the planner decided for one conv.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlan {
    /// The factorisation to apply; `None`: the slot stays as it is (dense, or as factorised by an
    /// earlier stage).
    pub form: Option<Form>,
    /// Why, when the decision is not simply the policy's rule.
    pub note: String,
}

/// What planning needs to know of a conv slot: its shape, where it runs, the spectra of the
/// kernel it computes now, and what it costs now.
struct LayerFacts {
    name: String,
    shape: [i64; 4],
    input: [i64; 2],
    output: [i64; 2],
    /// Singular values of the mode-0 and mode-1 unfoldings.
    s0: Vec<f64>,
    s1: Vec<f64>,
    norm2: f64,
    /// (MACs, params) of the slot as it is (dense, or factorised by an earlier stage).
    current: (i64, i64),
    is_dense: bool,
}

impl LayerFacts {
    /// How the report says a slot was not changed.
    fn unchanged(&self) -> &'static str {
        if self.is_dense {
            "left dense"
        } else {
            "left as it is"
        }
    }

    fn pointwise(&self) -> bool {
        self.shape[2] == 1 && self.shape[3] == 1
    }

    fn dense_macs(&self) -> i64 {
        let [o, i, kh, kw] = self.shape;
        o * i * kh * kw * self.output[0] * self.output[1]
    }

    fn dense_params(&self) -> i64 {
        self.shape.iter().product()
    }

    /// Tucker-2: C_in·r_in·H_in·W_in + (r_out·r_in·kh·kw + C_out·r_out)·H_out·W_out.
    /// SVD: (C_in + C_out)·r·H_out·W_out (a strided 1×1 samples first).
    fn macs(&self, form: Form) -> i64 {
        let [o, i, kh, kw] = self.shape;
        let out = self.output[0] * self.output[1];
        match form {
            Form::Dense => self.dense_macs(),
            Form::Tucker2 { r_out, r_in } => {
                i * r_in * self.input[0] * self.input[1]
                    + (r_out * r_in * kh * kw + o * r_out) * out
            }
            Form::Svd { rank } => (i + o) * rank * out,
        }
    }

    /// The kernels and the last layer's bias.
    fn params(&self, form: Form) -> i64 {
        let [o, i, kh, kw] = self.shape;
        match form {
            Form::Dense => self.dense_params(),
            Form::Tucker2 { r_out, r_in } => i * r_in + r_out * r_in * kh * kw + o * r_out + o,
            Form::Svd { rank } => (i + o) * rank + o,
        }
    }

    /// The relative squared error of a factorisation of the current kernel: HOSVD's bound for
    /// Tucker-2 (the discarded squared singular values of both unfoldings over ‖W‖²; HOOI only
    /// does better), the exact error for the SVD of a 1×1 kernel (whose mode-0 unfolding is W).
    fn error(&self, form: Form) -> f64 {
        let tail = |s: &[f64], r: i64| s.iter().skip(r as usize).map(|v| v * v).sum::<f64>();
        let discarded = match form {
            Form::Dense => 0.0,
            Form::Tucker2 { r_out, r_in } => tail(&self.s0, r_out) + tail(&self.s1, r_in),
            Form::Svd { rank } => tail(&self.s0, rank),
        };
        discarded / self.norm2.max(f64::MIN_POSITIVE)
    }
}

fn round_rank(r: i64, multiple: Option<i64>, dim: i64) -> i64 {
    match multiple {
        Some(m) if m > 1 => ((r + m - 1) / m * m).min(dim),
        _ => r,
    }
    .clamp(1, dim)
}

/// Decides every conv's factorisation. Rule-based policies (ratio, explicit) apply their rule to
/// the dense convs, as Tucker-2 like the seed. Data-driven ones (energy, VBMF, budgets) read the
/// singular values of the kernel each slot computes now, so they also compress an already
/// factorised model further (multi-stage); they factorise 1×1 convs as two-layer SVDs, keep the
/// RGB input of the stem, and leave a slot as it is when factorising would not cut its MACs.
pub fn plan_layers(
    model: &ResNet18,
    policy: &CompressionPolicy,
) -> Result<BTreeMap<String, LayerPlan>> {
    let sizes = model.conv_input_sizes(policy.input_size);
    let names: Vec<String> = model.conv_slots().into_iter().map(|(n, _)| n).collect();
    if let RankPolicy::Explicit(ranks) = &policy.ranks {
        if let Some(unknown) = ranks.keys().find(|k| !names.contains(k)) {
            return Err(Error::layer(
                unknown.clone(),
                "no such conv layer in ResNet18",
            ));
        }
    }
    if let Some(m) = policy.round_to {
        if m < 1 {
            return Err(Error::value("round_to", format!("{m} (must be ≥ 1)")));
        }
    }
    let rule_based = matches!(policy.ranks, RankPolicy::Ratio(_) | RankPolicy::Explicit(_));
    let mut facts = Vec::new();
    let mut plans = BTreeMap::new();
    for (name, slot) in model.conv_slots() {
        if slot.config().groups != 1 {
            return Err(Error::layer(
                &name,
                "grouped convolution cannot be Tucker-2 compressed",
            ));
        }
        let shape = slot.dense_shape();
        if rule_based {
            if !matches!(slot, ConvSlot::Dense(_)) {
                continue; // already factorised: left as it is
            }
            if let Some((r_out, r_in)) = policy.ranks.ranks_for(&name, shape) {
                check_ranks(&name, [shape[0], shape[1]], (r_out, r_in))?;
                let note = if shape[1] <= RGB && matches!(policy.ranks, RankPolicy::Ratio(_)) {
                    "RGB input kept at full rank"
                } else {
                    ""
                };
                plans.insert(
                    name,
                    LayerPlan {
                        form: Some(Form::Tucker2 { r_out, r_in }),
                        note: note.into(),
                    },
                );
            }
            continue;
        }
        let input = sizes[&name];
        let weight = slot.dense_weight().detach();
        let (u0, u1) = crate::ranks::unfoldings(&weight);
        facts.push(LayerFacts {
            output: slot.macs(input).1,
            shape,
            input,
            s0: crate::ranks::singular_values(&u0),
            s1: crate::ranks::singular_values(&u1),
            norm2: weight.square().sum(Kind::Double).double_value(&[]),
            current: (slot.macs(input).0, slot.num_params()),
            is_dense: matches!(slot, ConvSlot::Dense(_)),
            name,
        });
    }
    let round = |r: i64, dim: i64| round_rank(r, policy.round_to, dim);
    match policy.ranks {
        RankPolicy::Energy(_) | RankPolicy::Vbmf => {
            for f in &facts {
                let [c_out, c_in, kh, kw] = f.shape;
                let mut notes = Vec::new();
                let mut pick = |s: &[f64], rows: i64, cols: i64, mode: &str| match policy.ranks {
                    RankPolicy::Energy(share) => crate::ranks::energy_rank(s, share) as i64,
                    _ => {
                        let r = crate::ranks::evbmf_rank(rows as usize, cols as usize, s, f.norm2)
                            as i64;
                        if r == 0 {
                            notes.push(format!("VBMF found no signal in {mode}: kept rank 1"));
                        }
                        r.max(1)
                    }
                };
                let form = if f.pointwise() && c_in > RGB {
                    let rank = round(pick(&f.s0, c_out, c_in, "rank"), c_out.min(c_in));
                    Form::Svd { rank }
                } else {
                    let r_out = round(pick(&f.s0, c_out, c_in * kh * kw, "r_out"), c_out);
                    let r_in = if c_in <= RGB {
                        notes.push("RGB input kept at full rank".into());
                        c_in
                    } else {
                        round(pick(&f.s1, c_in, c_out * kh * kw, "r_in"), c_in)
                    };
                    Form::Tucker2 { r_out, r_in }
                };
                plans.insert(f.name.clone(), unchanged_if_not_cheaper(f, form, notes));
            }
        }
        RankPolicy::BudgetMacs(target) | RankPolicy::BudgetParams(target) => {
            let by_macs = matches!(policy.ranks, RankPolicy::BudgetMacs(_));
            plans.extend(plan_budget(&facts, target, by_macs, policy.round_to));
        }
        RankPolicy::Ratio(_) | RankPolicy::Explicit(_) => {}
    }
    Ok(plans)
}

fn unchanged_if_not_cheaper(f: &LayerFacts, form: Form, mut notes: Vec<String>) -> LayerPlan {
    if f.macs(form) >= f.current.0 {
        let ranks = form.ranks().expect("a factorisation");
        notes.push(format!(
            "{}: {} at {ranks:?} would not cut its MACs",
            f.unchanged(),
            form.name()
        ));
        return LayerPlan {
            form: None,
            note: notes.join("; "),
        };
    }
    LayerPlan {
        form: Some(form),
        note: notes.join("; "),
    }
}

/// One candidate for a layer under a budget: (form, or `None` to keep the slot as it is; cost;
/// relative squared error).
type BudgetOption = (Option<Form>, i64, f64);

/// The rank grid of a mode of size `dim`: every multiple of `round_to`, else about 64 evenly
/// spaced ranks starting at 1.
fn rank_grid(dim: i64, round_to: Option<i64>) -> Vec<i64> {
    let rounded = round_to.filter(|&m| m > 1);
    let step = rounded.unwrap_or((dim / 64).max(1));
    let mut g: Vec<i64> = (1..=dim / step).map(|k| k * step).collect();
    if (step > 1 && rounded.is_none()) || g.is_empty() {
        g.insert(0, 1); // the smallest rank, unless ranks must be multiples
    }
    if g.last() != Some(&dim) && rounded.is_some() {
        g.push(dim);
    }
    g
}

/// One budget for the model: minimise Σ relative squared errors subject to total cost ≤ target ×
/// the dense model's cost, by a Lagrangian search: for a price λ each layer independently takes
/// the option (as it is, or a factorisation on a rank grid) minimising error + λ·cost, and λ is
/// bisected to meet the budget.
///
/// Sensitivity: errors are weighted equally *as relative errors*. Every conv here feeds a BN,
/// which rescales its output per channel, so what the next layer sees is the conv's relative
/// error; their effects on the logits add up roughly independently along the residual stream.
fn plan_budget(
    facts: &[LayerFacts],
    target: f64,
    by_macs: bool,
    round_to: Option<i64>,
) -> BTreeMap<String, LayerPlan> {
    let cost = |f: &LayerFacts, form: Form| {
        if by_macs {
            f.macs(form)
        } else {
            f.params(form)
        }
    };
    let current = |f: &LayerFacts| if by_macs { f.current.0 } else { f.current.1 };
    let total: i64 = facts.iter().map(|f| cost(f, Form::Dense)).sum();
    let options: Vec<Vec<BudgetOption>> = facts
        .iter()
        .map(|f| {
            let [c_out, c_in, _, _] = f.shape;
            let forms: Vec<Form> = if f.pointwise() && c_in > RGB {
                rank_grid(c_out.min(c_in), round_to)
                    .into_iter()
                    .map(|rank| Form::Svd { rank })
                    .collect()
            } else {
                let r_ins = if c_in <= RGB {
                    vec![c_in]
                } else {
                    rank_grid(c_in, round_to)
                };
                rank_grid(c_out, round_to)
                    .into_iter()
                    .flat_map(|r_out| r_ins.iter().map(move |&r_in| Form::Tucker2 { r_out, r_in }))
                    .collect()
            };
            let mut v = vec![(None, current(f), 0.0)];
            v.extend(
                forms
                    .into_iter()
                    .filter(|&form| cost(f, form) < current(f))
                    .map(|form| (Some(form), cost(f, form), f.error(form))),
            );
            v
        })
        .collect();
    let choose = |lambda: f64| -> Vec<usize> {
        options
            .iter()
            .map(|opts| {
                let score = |o: &BudgetOption| o.2 + lambda * o.1 as f64 / total as f64;
                (0..opts.len())
                    .min_by(|&a, &b| score(&opts[a]).total_cmp(&score(&opts[b])))
                    .unwrap()
            })
            .collect()
    };
    let cost_of =
        |choice: &[usize]| -> i64 { choice.iter().zip(&options).map(|(&i, o)| o[i].1).sum() };
    let budget = (target * total as f64) as i64;
    let (mut lo, mut hi) = (1e-9f64.ln(), 1e9f64.ln());
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if cost_of(&choose(mid.exp())) <= budget {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let mut choice = choose(hi.exp());
    fill_budget(&options, &mut choice, budget);
    let achieved = cost_of(&choice) as f64 / total as f64;
    let what = if by_macs { "MACs" } else { "params" };
    facts
        .iter()
        .zip(&options)
        .zip(&choice)
        .map(|((f, opts), &i)| {
            let (form, _, err) = opts[i];
            let mut note =
                format!("budget {what} {target:.3}: model at {achieved:.3}; error bound {err:.4}");
            if form.is_none() {
                note.push_str(&format!("; {}: cheapest under this price", f.unchanged()));
            } else if f.shape[1] <= RGB {
                note.push_str("; RGB input kept at full rank");
            }
            (f.name.clone(), LayerPlan { form, note })
        })
        .collect()
}

/// Spends what the Lagrangian choice leaves of the budget. Its choices are the lower convex hull
/// of each layer's error-vs-cost options, so where errors fall about linearly with cost (flat
/// spectra) it can stop well short of the target. Greedily, take the upgrade (a dearer option
/// of one layer) with the largest error reduction per unit of cost that still fits, until none
/// does.
fn fill_budget(options: &[Vec<BudgetOption>], choice: &mut [usize], budget: i64) {
    let mut spent: i64 = choice.iter().zip(options).map(|(&i, o)| o[i].1).sum();
    // A layer's best upgrade within `room`: (option, error reduction per unit of cost).
    let best_upgrade = |layer: usize, current: usize, room: i64| -> Option<(usize, f64)> {
        let (_, cost, error) = options[layer][current];
        options[layer]
            .iter()
            .enumerate()
            .filter(|(_, &(_, c, e))| c > cost && c - cost <= room && e < error)
            .map(|(i, &(_, c, e))| (i, (error - e) / (c - cost) as f64))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    };
    // Cached per layer; the room only shrinks, so a cached upgrade that still fits is still the
    // layer's best, and one that no longer fits is recomputed.
    let mut cached: Vec<Option<(usize, f64)>> = (0..options.len())
        .map(|l| best_upgrade(l, choice[l], budget - spent))
        .collect();
    loop {
        let Some(layer) = (0..options.len())
            .filter(|&l| cached[l].is_some())
            .max_by(|&a, &b| cached[a].unwrap().1.total_cmp(&cached[b].unwrap().1))
        else {
            break;
        };
        let (i, _) = cached[layer].unwrap();
        let extra = options[layer][i].1 - options[layer][choice[layer]].1;
        if spent + extra > budget {
            cached[layer] = best_upgrade(layer, choice[layer], budget - spent);
            continue;
        }
        spent += extra;
        choice[layer] = i;
        cached[layer] = best_upgrade(layer, i, budget - spent);
    }
}

/// Factorises a dense conv into `form` (Tucker-2 fitted by `method`, or an SVD).
pub fn factorise(layer: &str, conv: &Conv2d, form: Form, method: Method) -> Result<ConvSlot> {
    match form {
        Form::Dense => Ok(ConvSlot::Dense(Conv2d {
            weight: conv.weight.detach().copy(),
            bias: conv.bias.as_ref().map(|b| b.detach().copy()),
            config: conv.config,
        })),
        Form::Tucker2 { r_out, r_in } => {
            compress_conv_with(layer, conv, (r_out, r_in), method).map(ConvSlot::Tucker)
        }
        Form::Svd { rank } => compress_pointwise(layer, conv, rank).map(ConvSlot::Svd),
    }
}

/// Replaces a 1×1 conv by its rank-`rank` truncated SVD, two 1×1 layers (computed in f64).
pub fn compress_pointwise(layer: &str, conv: &Conv2d, rank: i64) -> Result<SvdConv> {
    let [c_out, c_in] = [conv.out_channels(), conv.in_channels()];
    if conv.kernel() != [1, 1] || conv.config.groups != 1 {
        return Err(Error::layer(
            layer,
            format!(
                "an SVD factorisation needs an ungrouped 1×1 conv, not {:?} with groups = {}",
                conv.kernel(),
                conv.config.groups
            ),
        ));
    }
    let max = c_out.min(c_in);
    if rank < 1 || rank > max {
        return Err(Error::layer(
            layer,
            format!("rank = {rank} is outside 1..={max} for a {c_out}×{c_in} 1×1 conv"),
        ));
    }
    let w = conv
        .weight
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Double)
        .reshape([c_out, c_in]);
    let (u, s, v) = w.svd(true, true);
    let root = s.narrow(0, 0, rank).sqrt();
    let last = u.narrow(1, 0, rank) * root.unsqueeze(0); // C_out × r
    let first = v.narrow(1, 0, rank).tr() * root.unsqueeze(1); // r × C_in
    let device = conv.weight.device();
    let to_model = |t: Tensor| {
        t.unsqueeze(-1)
            .unsqueeze(-1)
            .to_kind(Kind::Float)
            .to_device(device)
            .contiguous()
    };
    let bias = match &conv.bias {
        Some(b) => b.detach().copy(),
        None => Tensor::zeros([c_out], (Kind::Float, device)),
    };
    Ok(SvdConv {
        first: Conv2d {
            weight: to_model(first),
            bias: None,
            config: conv.config,
        },
        last: Conv2d {
            weight: to_model(last),
            bias: Some(bias),
            config: ConvConfig::default(),
        },
    })
}

/// Factorises the convs that `policy` selects, in place, and reports every conv (changed or
/// not). A slot already factorised (by an earlier stage) is refactorised from the kernel it
/// computes now, its error measured against that kernel. All ranks are decided and checked
/// before anything changes, so an error leaves the model as it was.
pub fn compress_model(
    model: &mut ResNet18,
    policy: &CompressionPolicy,
) -> Result<CompressionReport> {
    let sizes = model.conv_input_sizes(policy.input_size);
    let plan = plan_layers(model, policy)?;
    let method = policy
        .method
        .unwrap_or_else(|| policy.ranks.default_method());
    let mut layers = Vec::new();
    for (name, slot) in model.conv_slots_mut() {
        let input = sizes[&name];
        let (macs_before, _) = slot.macs(input);
        let params_before = slot.num_params();
        let layer_plan = plan.get(&name);
        let mut rel_error = 0.0;
        if let Some(LayerPlan {
            form: Some(form), ..
        }) = layer_plan
        {
            let original = slot.to_dense();
            let new_slot = factorise(&name, &original, *form, method)?;
            rel_error = relative_error(&original.weight, &new_slot.dense_weight());
            *slot = new_slot;
        }
        let mut line = LayerReport::new(&name, slot, input, params_before, macs_before, rel_error);
        line.note = layer_plan.map(|p| p.note.clone()).unwrap_or_default();
        layers.push(line);
    }
    Ok(CompressionReport {
        layers,
        input_size: policy.input_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(c_out: i64, c_in: i64, k: i64, bias: bool) -> Conv2d {
        tch::manual_seed(0);
        Conv2d {
            weight: Tensor::randn([c_out, c_in, k, k], (Kind::Float, Device::Cpu)),
            bias: bias.then(|| Tensor::randn([c_out], (Kind::Float, Device::Cpu))),
            config: ConvConfig::new(2, k / 2),
        }
    }

    #[test]
    fn full_rank_tucker_layer_computes_the_same_convolution() {
        for (c_out, c_in, k) in [(16, 8, 3), (32, 8, 1), (8, 3, 7)] {
            let dense = conv(c_out, c_in, k, true);
            let tucker = compress_conv("t", &dense, (c_out, c_in)).unwrap();
            let x = Tensor::randn([2, c_in, 11, 11], (Kind::Float, Device::Cpu));
            let err = relative_error(&dense.forward(&x), &tucker.forward(&x));
            assert!(err < 1e-5, "{c_out}x{c_in}x{k}: {err}");
        }
    }

    #[test]
    fn bias_is_the_original_or_zero_never_random() {
        let with = conv(8, 8, 3, true);
        let t = compress_conv("t", &with, (4, 4)).unwrap();
        assert_eq!(t.last.bias.as_ref().unwrap(), with.bias.as_ref().unwrap());
        let without = conv(8, 8, 3, false);
        let t = compress_conv("t", &without, (4, 4)).unwrap();
        assert_eq!(
            t.last
                .bias
                .as_ref()
                .unwrap()
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
    }

    #[test]
    fn truncated_error_matches_the_discarded_energy_bound() {
        // HOSVD error is bounded by the discarded singular values of each unfolding.
        let dense = conv(16, 16, 3, false);
        let t = compress_conv("t", &dense, (8, 8)).unwrap();
        let err = relative_error(&dense.weight, &t.reconstruct());
        let w = dense.weight.to_kind(Kind::Double);
        let tail = |m: Tensor| {
            let (_, s, _) = m.svd(true, false);
            let s2 = &s * &s;
            s2.narrow(0, 8, 8).sum(Kind::Double).double_value(&[])
        };
        let bound = (tail(w.reshape([16, -1])) + tail(w.transpose(0, 1).reshape([16, -1]))).sqrt()
            / w.norm().double_value(&[]);
        assert!(err > 0.0 && err <= bound + 1e-9, "err {err} bound {bound}");
    }

    #[test]
    fn bad_ranks_and_groups_name_the_layer() {
        let dense = conv(8, 4, 3, false);
        for ranks in [(0, 2), (9, 2), (2, 5)] {
            let err = compress_conv("layer9.conv", &dense, ranks)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("layer9.conv") && err.contains("outside"),
                "{err}"
            );
        }
        let mut grouped = conv(8, 4, 3, false);
        grouped.config.groups = 2;
        grouped.weight = Tensor::randn([8, 2, 3, 3], (Kind::Float, Device::Cpu));
        let err = compress_conv("g", &grouped, (2, 2))
            .unwrap_err()
            .to_string();
        assert!(err.contains("layer g") && err.contains("grouped"), "{err}");
        assert!(RankPolicy::ratio(0.0).is_err() && RankPolicy::ratio(1.5).is_err());
        assert!(RankPolicy::ratio(f64::NAN)
            .unwrap_err()
            .to_string()
            .contains("NaN"));
    }

    #[test]
    fn ratio_rule_is_the_seeds_except_for_the_rgb_input() {
        let p = RankPolicy::Ratio(0.2);
        assert_eq!(p.ranks_for("x", [64, 64, 3, 3]), Some((12, 12)));
        assert_eq!(p.ranks_for("x", [128, 64, 3, 3]), Some((25, 12)));
        assert_eq!(p.ranks_for("x", [512, 256, 1, 1]), Some((102, 51)));
        assert_eq!(p.ranks_for("conv1", [64, 3, 7, 7]), Some((12, 3)));
        assert_eq!(
            RankPolicy::Ratio(0.01).ranks_for("x", [64, 64, 3, 3]),
            Some((1, 1))
        );
    }

    #[test]
    fn full_rank_svd_layer_computes_the_same_strided_convolution() {
        let mut dense = conv(12, 8, 1, true);
        dense.config = ConvConfig::new(2, 0);
        let svd = compress_pointwise("d", &dense, 8).unwrap();
        let x = Tensor::randn([2, 8, 9, 9], (Kind::Float, Device::Cpu));
        let err = relative_error(&dense.forward(&x), &svd.forward(&x));
        assert!(err < 1e-5, "{err}");
        // Truncated, its error is exactly the discarded singular values'.
        let svd = compress_pointwise("d", &dense, 3).unwrap();
        let w = dense.weight.reshape([12, 8]).to_kind(Kind::Double);
        let (_, s, _) = w.svd(true, false);
        let s2 = &s * &s;
        let exact = (s2.narrow(0, 3, 5).sum(Kind::Double) / s2.sum(Kind::Double))
            .sqrt()
            .double_value(&[]);
        let err = relative_error(&dense.weight, &svd.reconstruct());
        assert!((err - exact).abs() < 1e-6, "{err} vs {exact}");
        for (bad, rank) in [(conv(8, 8, 3, false), 2), (conv(12, 8, 1, false), 9)] {
            let err = compress_pointwise("layer3.0.downsample.0", &bad, rank)
                .unwrap_err()
                .to_string();
            assert!(err.contains("layer3.0.downsample.0"), "{err}");
        }
    }
}
