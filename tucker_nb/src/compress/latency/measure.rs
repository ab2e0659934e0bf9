//! Timing what a slot or a model runs on the device: warm-ups, timed calls, one sync each, the
//! median.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::{LatencyTable, TimingKey, TimingSettings};
use crate::compress::policy::CompressionPolicy;
use crate::conv::{Conv2d, ConvGeometry, ConvSlot, CpConv, Form, TuckerConv, TwoLayerConv};
use crate::layout::laid_out;
use crate::model::{BatchNorm, ResNet18};
use crate::report::CompressionReport;
use crate::runtime::autocast_bf16;
use crate::timing::{median, median_seconds, timed};

/// Untimed calls before each measurement, and timed ones whose median is taken.
const WARMUPS: usize = 3;
const RUNS: usize = 11;

/// A random tensor of `shape` on `device`, laid out as the key says.
fn random(shape: &[i64], key: &TimingKey, device: Device) -> Tensor {
    let t = Tensor::randn(shape, (Kind::Float, device)) * 0.05;
    if t.dim() == 4 {
        laid_out(&t, key.channels_last)
    } else {
        t
    }
}

/// The slot `form` of a conv of `geometry` with random weights, as compression makes it (the
/// last layer of a factorised slot carries a bias).
fn random_slot(geometry: &ConvGeometry, form: Form, key: &TimingKey, device: Device) -> ConvSlot {
    let [c_out, c_in, kh, kw] = geometry.shape;
    let config = geometry.config;
    let w = |shape: [i64; 4]| random(&shape, key, device);
    let bias = || Some(Tensor::zeros([c_out], (Kind::Float, device)));
    let conv = |weight, bias| Conv2d {
        weight,
        bias,
        config,
    };
    match form {
        Form::Dense => ConvSlot::Dense(conv(w([c_out, c_in, kh, kw]), None)),
        Form::Tucker2 { r_out, r_in } => ConvSlot::Tucker(TuckerConv::new(
            w([r_in, c_in, 1, 1]),
            w([r_out, r_in, kh, kw]),
            w([c_out, r_out, 1, 1]),
            bias(),
            config,
        )),
        Form::Svd { rank } => ConvSlot::TwoLayer(TwoLayerConv::new(
            w([rank, c_in, 1, 1]),
            w([c_out, rank, 1, 1]),
            bias(),
            config,
        )),
        Form::Tucker1Out { r_out, .. } => ConvSlot::TwoLayer(TwoLayerConv {
            first: conv(w([r_out, c_in, kh, kw]), None),
            last: Conv2d::pointwise(w([c_out, r_out, 1, 1]), bias()),
        }),
        Form::Tucker1In { r_in, .. } => ConvSlot::TwoLayer(TwoLayerConv {
            first: Conv2d::pointwise(w([r_in, c_in, 1, 1]), None),
            last: conv(w([c_out, r_in, kh, kw]), bias()),
        }),
        Form::Cp { rank } => ConvSlot::Cp(CpConv::new(
            [
                w([rank, c_in, 1, 1]),
                w([rank, 1, kh, 1]),
                w([rank, 1, 1, kw]),
                w([c_out, rank, 1, 1]),
            ],
            bias(),
            config,
        )),
    }
}

/// The median ms of what a slot in `form` runs in eval mode: its convs, then its BN unless the
/// BN is folded into a factorised slot.
pub(super) fn measure_slot(
    geometry: &ConvGeometry,
    input: [i64; 2],
    form: Form,
    key: &TimingKey,
    device: Device,
) -> f64 {
    let slot = random_slot(geometry, form, key, device);
    let bn =
        (form == Form::Dense || !key.fold_bn).then(|| BatchNorm::new(geometry.shape[0], device));
    let x = random(
        &[key.batch, geometry.shape[1], input[0], input[1]],
        key,
        device,
    );
    let seconds = tch::no_grad(|| {
        median_seconds(device, WARMUPS, RUNS, || {
            let _ = autocast_bf16(key.is_bf16(), || {
                let y = slot.forward(&x);
                match &bn {
                    Some(bn) => bn.forward(&y, false),
                    None => y,
                }
            });
        })
    });
    seconds * 1e3
}

/// The median ms of `model`'s eval forward pass at the key's batch and dtype, at `image` px.
pub fn model_ms(model: &ResNet18, image: [i64; 2], key: &TimingKey) -> f64 {
    let device = model.device();
    let x = random(&[key.batch, 3, image[0], image[1]], key, device);
    let seconds = tch::no_grad(|| {
        median_seconds(device, WARMUPS, RUNS, || {
            let _ = autocast_bf16(key.is_bf16(), || model.forward(&x, false));
        })
    });
    seconds * 1e3
}

/// `model` with each slot named in `forms` in that form with random factors (the last layer's
/// bias zero), its BNs folded when the key folds them: the plan's structure, to time it whole.
pub(super) fn plan_model(
    model: &ResNet18,
    forms: &BTreeMap<String, Form>,
    key: &TimingKey,
) -> ResNet18 {
    let device = model.device();
    let mut plan = model.deep_copy();
    for unit in plan.units_mut() {
        if let Some(&form) = forms.get(&unit.conv_name).filter(|f| **f != Form::Dense) {
            *unit.conv = random_slot(&unit.conv.geometry(), form, key, device);
        }
    }
    if key.fold_bn {
        plan.fold_batch_norms();
    }
    plan
}

/// What `measured_ms`, the model's measured time, leaves after its slots' entries (at least 0).
pub(super) fn outside_ms(
    model: &ResNet18,
    table: &LatencyTable,
    image: [i64; 2],
    measured_ms: f64,
) -> f64 {
    let sizes = model.conv_input_sizes(image);
    let slots: f64 = model
        .conv_slots()
        .iter()
        .map(|(name, slot)| table.slot_ms(&slot.geometry(), sizes[name], slot.form()))
        .sum();
    (measured_ms - slots).max(0.0)
}

/// The measured eval forward times of two models, side by side: one timed call of each in turn
/// after warm-ups, so both see the same moments of a noisy machine; medians in ms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeasuredSpeed {
    pub before_ms: f64,
    pub after_ms: f64,
}

impl MeasuredSpeed {
    pub fn speedup(&self) -> f64 {
        self.before_ms / self.after_ms
    }
}

/// Times `before` and `after` in turns ([`MeasuredSpeed`]) at `image` px with `settings` (on
/// `after`'s device and layout); `turns` timed calls of each.
pub fn measure_side_by_side(
    before: &ResNet18,
    after: &ResNet18,
    image: [i64; 2],
    settings: &TimingSettings,
    turns: usize,
) -> MeasuredSpeed {
    let key = TimingKey::current(settings, after.device(), after.is_channels_last());
    side_by_side(before, after, image, &key, turns)
}

/// [`measure_side_by_side`] at a key's batch and dtype.
pub(super) fn side_by_side(
    before: &ResNet18,
    after: &ResNet18,
    image: [i64; 2],
    key: &TimingKey,
    turns: usize,
) -> MeasuredSpeed {
    let device = after.device();
    let x = random(&[key.batch, 3, image[0], image[1]], key, device);
    let run = |m: &ResNet18| {
        timed(device, || {
            let _ = autocast_bf16(key.is_bf16(), || m.forward(&x, false));
        })
        .1
    };
    tch::no_grad(|| {
        for _ in 0..WARMUPS {
            run(before);
            run(after);
        }
        let (mut b, mut a) = (Vec::new(), Vec::new());
        for _ in 0..turns.max(1) {
            b.push(run(before));
            a.push(run(after));
        }
        MeasuredSpeed {
            before_ms: median(b) * 1e3,
            after_ms: median(a) * 1e3,
        }
    })
}

/// Times the compressed model `after` against `before` (the model as it was, in the same
/// layout and folding) side by side and records it beside the forecast in `report`; nothing when
/// the report has no forecast (not a latency budget).
pub fn check_forecast(
    report: &mut CompressionReport,
    before: &ResNet18,
    after: &ResNet18,
    policy: &CompressionPolicy,
) {
    if let Some(forecast) = &mut report.latency {
        let measured = measure_side_by_side(before, after, policy.input_size, &policy.timing, 15);
        forecast.set_measured(measured);
    }
}
