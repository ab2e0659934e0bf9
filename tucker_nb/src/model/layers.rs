//! The model's non-conv layers: batch normalisation and the classifier.

use tch::{Device, Kind, Tensor};

use crate::conv::Conv2d;

/// Batch normalisation with its running statistics, as `torch.nn.BatchNorm2d`.
#[derive(Debug)]
pub struct BatchNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: Tensor,
    pub eps: f64,
    pub momentum: f64,
    /// Folded into the preceding conv: an identity in eval mode, skipped there.
    pub folded: bool,
}

impl BatchNorm {
    /// PyTorch's initial state: γ = 1, β = 0, μ = 0, σ² = 1.
    pub fn new(channels: i64, device: Device) -> Self {
        let opts = (Kind::Float, device);
        Self {
            weight: Tensor::ones([channels], opts),
            bias: Tensor::zeros([channels], opts),
            running_mean: Tensor::zeros([channels], opts),
            running_var: Tensor::ones([channels], opts),
            num_batches_tracked: Tensor::zeros([], (Kind::Int64, device)),
            eps: 1e-5,
            momentum: 0.1,
            folded: false,
        }
    }

    /// Whether this BN is exactly what [`Self::fold_into`] leaves (γ = 1, β = 0, μ = 0,
    /// σ² = 1 − ε in f32): the identity in eval mode.
    pub fn is_folded_identity(&self) -> bool {
        let all =
            |t: &Tensor, v: f64| t.eq_tensor(&Tensor::full_like(t, v)).all().int64_value(&[]) == 1;
        all(&self.weight, 1.0)
            && all(&self.bias, 0.0)
            && all(&self.running_mean, 0.0)
            && all(&self.running_var, 1.0 - self.eps)
    }

    pub fn channels(&self) -> i64 {
        self.weight.size()[0]
    }

    /// Folds this BN's eval-mode affine map y = γ·(x − μ)/√(σ² + ε) + β into `conv`, whose
    /// output it normalises (per output channel: W ← s·W, b ← s·(b − μ) + β, s = γ/√(σ² + ε)),
    /// computed in f64, and becomes the identity: γ = 1, β = 0, μ = 0, σ² = 1 − ε. Its keys and
    /// shapes stay, so the file still loads into the unfolded structure and computes the same.
    pub(crate) fn fold_into(&mut self, conv: &mut Conv2d) {
        tch::no_grad(|| {
            let f64 = |t: &Tensor| t.detach().to_kind(Kind::Double);
            let scale = f64(&self.weight) / (f64(&self.running_var) + self.eps).sqrt();
            let c_out = conv.out_channels();
            let bias = match &conv.bias {
                Some(b) => f64(b),
                None => Tensor::zeros([c_out], (Kind::Double, conv.weight.device())),
            };
            let weight = f64(&conv.weight) * scale.reshape([c_out, 1, 1, 1]);
            let bias = (bias - f64(&self.running_mean)) * &scale + f64(&self.bias);
            conv.weight = weight.to_kind(Kind::Float);
            conv.bias = Some(bias.to_kind(Kind::Float));
            let _ = self.weight.fill_(1.0);
            let _ = self.bias.fill_(0.0);
            let _ = self.running_mean.fill_(0.0);
            let _ = self.running_var.fill_(1.0 - self.eps);
        });
        self.folded = true;
    }

    /// In training mode, normalises with batch statistics and updates the running ones in place.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        if self.folded && !train {
            return x.shallow_clone();
        }
        if train {
            tch::no_grad(|| {
                let _ = self.num_batches_tracked.shallow_clone().f_add_scalar_(1);
            });
        }
        x.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            self.momentum,
            self.eps,
            true,
        )
    }

    /// Shallow handles to the tensors under their state_dict names (relative to the layer).
    pub fn named_tensors(&self) -> [(&'static str, Tensor); 5] {
        [
            ("weight", self.weight.shallow_clone()),
            ("bias", self.bias.shallow_clone()),
            ("running_mean", self.running_mean.shallow_clone()),
            ("running_var", self.running_var.shallow_clone()),
            (
                "num_batches_tracked",
                self.num_batches_tracked.shallow_clone(),
            ),
        ]
    }
}

/// Whether a state_dict name is a BN buffer rather than a parameter.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
}

/// The classifier, as `torch.nn.Linear`.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    /// PyTorch's default init: weight and bias uniform in ±1/√in_features.
    pub fn new(in_features: i64, out_features: i64, device: Device) -> Self {
        let bound = 1.0 / (in_features as f64).sqrt();
        let opts = (Kind::Float, device);
        Self {
            weight: Tensor::empty([out_features, in_features], opts).uniform_(-bound, bound),
            bias: Tensor::empty([out_features], opts).uniform_(-bound, bound),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}
