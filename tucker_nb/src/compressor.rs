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

use crate::conv::{Conv2d, ConvConfig, ConvSlot, TuckerConv};
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
}

impl RankPolicy {
    /// `ratio` must lie in (0, 1].
    pub fn ratio(ratio: f64) -> Result<Self> {
        if !(ratio > 0.0 && ratio <= 1.0) {
            return Err(Error::value(
                "ratio",
                format!("{ratio} (must be in (0, 1])"),
            ));
        }
        Ok(RankPolicy::Ratio(ratio))
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

    /// The ranks for a conv of dense shape `shape`, or `None` to leave it dense.
    fn ranks_for(&self, layer: &str, shape: [i64; 4]) -> Option<(i64, i64)> {
        let [c_out, c_in, _, _] = shape;
        match self {
            RankPolicy::Ratio(ratio) => {
                let rank = |c: i64| ((c as f64 * ratio) as i64).max(1);
                let r_in = if c_in <= 3 { c_in } else { rank(c_in) };
                Some((rank(c_out), r_in))
            }
            RankPolicy::Explicit(ranks) => ranks.get(layer).copied(),
        }
    }
}

/// What to compress and how; defaults mirror the seed (ratio 0.2, costs counted at 224 px).
#[derive(Debug, Clone, PartialEq)]
pub struct CompressionPolicy {
    pub ranks: RankPolicy,
    /// Image size [H, W] at which MACs are counted in the report.
    pub input_size: [i64; 2],
}

impl Default for CompressionPolicy {
    fn default() -> Self {
        Self {
            ranks: RankPolicy::Ratio(0.2),
            input_size: [224, 224],
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

/// Replaces a dense conv by its Tucker-2 factorisation at ranks (r_out, r_in).
pub fn compress_conv(layer: &str, conv: &Conv2d, ranks: (i64, i64)) -> Result<TuckerConv> {
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
    let (u0, core, u1) = tucker2(&conv.weight, ranks);
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

/// Swaps the dense convs that `policy` selects for Tucker-2 layers, in place, and reports every
/// conv (compressed or not). All ranks are checked before anything changes, so an error leaves
/// the model as it was.
pub fn compress_model(
    model: &mut ResNet18,
    policy: &CompressionPolicy,
) -> Result<CompressionReport> {
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
    let mut plan = Vec::new();
    for (name, slot) in model.conv_slots() {
        let shape = slot.dense_shape();
        if let (ConvSlot::Dense(conv), Some(ranks)) = (slot, policy.ranks.ranks_for(&name, shape)) {
            if conv.config.groups != 1 {
                return Err(Error::layer(
                    &name,
                    "grouped convolution cannot be Tucker-2 compressed",
                ));
            }
            check_ranks(&name, [shape[0], shape[1]], ranks)?;
            plan.push((name, ranks));
        }
    }
    let plan: BTreeMap<String, (i64, i64)> = plan.into_iter().collect();

    let mut layers = Vec::new();
    for (name, slot) in model.conv_slots_mut() {
        let input = sizes[&name];
        let (macs_before, _) = slot.macs(input);
        let params_before = slot.num_params();
        let original = slot.dense_weight();
        if let (Some(&ranks), ConvSlot::Dense(conv)) = (plan.get(&name), &*slot) {
            *slot = ConvSlot::Tucker(compress_conv(&name, conv, ranks)?);
        }
        let rel_error = match &*slot {
            ConvSlot::Tucker(t) if plan.contains_key(&name) => {
                relative_error(&original, &t.reconstruct())
            }
            _ => 0.0,
        };
        layers.push(LayerReport::new(
            &name,
            slot,
            input,
            params_before,
            macs_before,
            rel_error,
        ));
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
}
