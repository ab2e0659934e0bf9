//! Calibration statistics: one pass of a calibration set through the model (eval mode, no
//! gradients), accumulating for every conv slot the second moments of its input and output
//! channels over pixels and images, in f64 on the model's device, batch by batch.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::decompose::ActivationMoments;
use crate::error::{Error, Result};
use crate::loader::Loader;
use crate::model::ResNet18;

/// Each conv slot's activation moments, by name.
pub type Moments = BTreeMap<String, ActivationMoments>;

/// Running sums of x·xᵀ over the channel vectors of every pixel, and their count.
struct MomentSum {
    sum: Option<Tensor>,
    pixels: i64,
}

impl MomentSum {
    fn add(&mut self, activations: &Tensor) {
        let channels = activations.size()[1];
        let m = activations
            .detach()
            .to_kind(Kind::Double)
            .transpose(0, 1)
            .reshape([channels, -1]);
        self.pixels += m.size()[1];
        let outer = m.matmul(&m.tr());
        self.sum = Some(match self.sum.take() {
            Some(sum) => sum + outer,
            None => outer,
        });
    }

    fn mean(self, layer: &str) -> Result<Tensor> {
        let sum = self
            .sum
            .ok_or_else(|| Error::layer(layer, "saw no calibration image"))?;
        let mean = (sum / self.pixels as f64).to_device(tch::Device::Cpu);
        if mean.isfinite().logical_not().any().int64_value(&[]) != 0 {
            return Err(Error::layer(
                layer,
                "non-finite activations on the calibration set (NaN or infinite weights upstream?)",
            ));
        }
        Ok(mean)
    }
}

/// E[x xᵀ] of every conv slot's input and E[y yᵀ] of its output (bias excluded) on `calibration`.
pub fn activation_moments(model: &ResNet18, calibration: &Loader) -> Result<Moments> {
    if calibration.is_empty() {
        return Err(Error::value("calibration set", "no images"));
    }
    let units = model.units();
    let biases: Vec<Option<Tensor>> = units
        .iter()
        .map(|u| {
            let parts = u.conv.parts();
            let last = parts[parts.len() - 1];
            last.bias
                .as_ref()
                .map(|b| b.detach().reshape([1, -1, 1, 1]))
        })
        .collect();
    let empty = || MomentSum {
        sum: None,
        pixels: 0,
    };
    let mut inputs: Vec<MomentSum> = units.iter().map(|_| empty()).collect();
    let mut outputs: Vec<MomentSum> = units.iter().map(|_| empty()).collect();
    tch::no_grad(|| {
        for batch in calibration.epoch(0) {
            let _ = model.forward_observed(&batch.images, false, &mut |i, x, y| {
                inputs[i].add(x);
                match &biases[i] {
                    Some(b) => outputs[i].add(&(y - b)),
                    None => outputs[i].add(y),
                }
            });
        }
    });
    let mut moments = Moments::new();
    for ((unit, input), output) in units.into_iter().zip(inputs).zip(outputs) {
        let name = unit.conv_name;
        let samples = input.pixels;
        let input = input.mean(&name)?;
        let output = output.mean(&name)?;
        let layer = ActivationMoments {
            input,
            output,
            samples,
        };
        moments.insert(name, layer);
    }
    Ok(moments)
}
