//! Convolution layers as plain tensors: a dense [`Conv2d`], a [`TuckerConv`] (1×1 → k×k core →
//! 1×1), and the [`ConvSlot`] a model holds, which is either and can be swapped in place.

use tch::Tensor;

/// Geometry of a convolution, as in `torch.nn.Conv2d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvConfig {
    pub stride: [i64; 2],
    pub padding: [i64; 2],
    pub dilation: [i64; 2],
    pub groups: i64,
}

impl Default for ConvConfig {
    fn default() -> Self {
        Self {
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
        }
    }
}

impl ConvConfig {
    pub fn new(stride: i64, padding: i64) -> Self {
        Self {
            stride: [stride, stride],
            padding: [padding, padding],
            ..Self::default()
        }
    }

    /// Output size of one spatial dimension `d` (0 = height, 1 = width) for an input of `size`.
    pub fn output_size(&self, size: i64, kernel: i64, d: usize) -> i64 {
        (size + 2 * self.padding[d] - self.dilation[d] * (kernel - 1) - 1) / self.stride[d] + 1
    }
}

/// A dense 2-D convolution: `weight` is C_out × C_in/groups × kh × kw.
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub config: ConvConfig,
}

impl Conv2d {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let c = &self.config;
        x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            c.stride,
            c.padding,
            c.dilation,
            c.groups,
        )
    }

    pub fn out_channels(&self) -> i64 {
        self.weight.size()[0]
    }

    pub fn in_channels(&self) -> i64 {
        self.weight.size()[1] * self.config.groups
    }

    pub fn kernel(&self) -> [i64; 2] {
        let s = self.weight.size();
        [s[2], s[3]]
    }

    pub fn num_params(&self) -> i64 {
        self.weight.numel() as i64 + self.bias.as_ref().map_or(0, |b| b.numel() as i64)
    }

    /// Multiply-accumulates for one image of `input` = [H, W]; returns (MACs, output [H, W]).
    pub fn macs(&self, input: [i64; 2]) -> (i64, [i64; 2]) {
        let [kh, kw] = self.kernel();
        let out = [
            self.config.output_size(input[0], kh, 0),
            self.config.output_size(input[1], kw, 1),
        ];
        let per_pixel = self.out_channels() * (self.in_channels() / self.config.groups) * kh * kw;
        (per_pixel * out[0] * out[1], out)
    }

    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let mut v = vec![("weight", &self.weight)];
        if let Some(b) = &self.bias {
            v.push(("bias", b));
        }
        v
    }

    fn tensors_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        let mut v = vec![("weight", &mut self.weight)];
        if let Some(b) = &mut self.bias {
            v.push(("bias", b));
        }
        v
    }
}

/// A Tucker-2 convolution, the seed's `nn.Sequential(first, core, last)`:
///
/// Y = U0 · (S ∗ (U1ᵀ · X)), with `first` = U1ᵀ (r_in × C_in × 1 × 1, no bias),
/// `core` = S (r_out × r_in × kh × kw, carrying stride, padding and dilation) and
/// `last` = U0 (C_out × r_out × 1 × 1, with the original conv's bias, zeros when it had none).
///
/// Cost per image: C_in·r_in·H_in·W_in + r_out·r_in·kh·kw·H_out·W_out + C_out·r_out·H_out·W_out
/// multiply-accumulates: the first 1×1 runs at the input's resolution.
#[derive(Debug)]
pub struct TuckerConv {
    pub first: Conv2d,
    pub core: Conv2d,
    pub last: Conv2d,
}

impl TuckerConv {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.last
            .forward(&self.core.forward(&self.first.forward(x)))
    }

    /// (r_out, r_in).
    pub fn ranks(&self) -> (i64, i64) {
        (self.core.out_channels(), self.core.in_channels())
    }

    /// The dense kernel this layer computes: Ŵ = S ×0 U0 ×1 U1.
    pub fn reconstruct(&self) -> Tensor {
        let u0 = self.last.weight.flatten(1, 3); // C_out × r_out
        let u1t = self.first.weight.flatten(1, 3); // r_in × C_in
        crate::compressor::mode_products(&self.core.weight, &u0, &u1t.tr())
    }
}

/// A 1×1 conv as two 1×1 layers, the truncated SVD W ≈ (U·√Σ)·(√Σ·Vᵀ), the seed-style
/// `nn.Sequential(first, last)`: `first` = √Σ·Vᵀ (r × C_in × 1 × 1, carrying the stride, no bias),
/// `last` = U·√Σ (C_out × r × 1 × 1, with the original bias, zeros when it had none). The singular
/// values are split evenly so that both factors train at the same scale.
///
/// Cost per image: (C_in·r + C_out·r)·H_out·W_out multiply-accumulates: a strided 1×1 samples
/// first, so both layers run at the output's resolution. One layer fewer than Tucker-2, whose
/// k×k core is a third 1×1 here.
#[derive(Debug)]
pub struct SvdConv {
    pub first: Conv2d,
    pub last: Conv2d,
}

impl SvdConv {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.last.forward(&self.first.forward(x))
    }

    pub fn rank(&self) -> i64 {
        self.first.out_channels()
    }

    /// The dense C_out × C_in × 1 × 1 kernel this layer computes.
    pub fn reconstruct(&self) -> Tensor {
        self.last
            .weight
            .flatten(1, 3)
            .matmul(&self.first.weight.flatten(1, 3))
            .unsqueeze(-1)
            .unsqueeze(-1)
    }
}

/// How a conv slot is factorised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Form {
    Dense,
    /// 1×1 → k×k core → 1×1, ranks (r_out, r_in).
    Tucker2 {
        r_out: i64,
        r_in: i64,
    },
    /// 1×1 → 1×1 (1×1 convs only), rank r.
    Svd {
        rank: i64,
    },
}

impl Form {
    /// `dense`, `tucker2` or `svd`.
    pub fn name(&self) -> &'static str {
        match self {
            Form::Dense => "dense",
            Form::Tucker2 { .. } => "tucker2",
            Form::Svd { .. } => "svd",
        }
    }

    /// (r_out, r_in); an SVD's single rank is both.
    pub fn ranks(&self) -> Option<(i64, i64)> {
        match *self {
            Form::Dense => None,
            Form::Tucker2 { r_out, r_in } => Some((r_out, r_in)),
            Form::Svd { rank } => Some((rank, rank)),
        }
    }
}

/// A conv position in the model: dense, or replaced by a factorisation.
#[derive(Debug)]
pub enum ConvSlot {
    Dense(Conv2d),
    Tucker(TuckerConv),
    Svd(SvdConv),
}

impl ConvSlot {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            ConvSlot::Dense(c) => c.forward(x),
            ConvSlot::Tucker(t) => t.forward(x),
            ConvSlot::Svd(s) => s.forward(x),
        }
    }

    pub fn form(&self) -> Form {
        match self {
            ConvSlot::Dense(_) => Form::Dense,
            ConvSlot::Tucker(t) => {
                let (r_out, r_in) = t.ranks();
                Form::Tucker2 { r_out, r_in }
            }
            ConvSlot::Svd(s) => Form::Svd { rank: s.rank() },
        }
    }

    /// The layers the slot runs, in order.
    pub fn parts(&self) -> Vec<&Conv2d> {
        match self {
            ConvSlot::Dense(c) => vec![c],
            ConvSlot::Tucker(t) => vec![&t.first, &t.core, &t.last],
            ConvSlot::Svd(s) => vec![&s.first, &s.last],
        }
    }

    fn parts_mut(&mut self) -> Vec<&mut Conv2d> {
        match self {
            ConvSlot::Dense(c) => vec![c],
            ConvSlot::Tucker(t) => vec![&mut t.first, &mut t.core, &mut t.last],
            ConvSlot::Svd(s) => vec![&mut s.first, &mut s.last],
        }
    }

    /// The layer that produces the slot's output (the one carrying its bias).
    pub fn output_layer_mut(&mut self) -> &mut Conv2d {
        self.parts_mut().pop().expect("a slot has a layer")
    }

    /// C_out × C_in × kh × kw of the convolution this slot computes.
    pub fn dense_shape(&self) -> [i64; 4] {
        let parts = self.parts();
        let spatial = match self {
            ConvSlot::Tucker(t) => &t.core,
            _ => parts[0],
        };
        let [kh, kw] = spatial.kernel();
        [
            parts[parts.len() - 1].out_channels(),
            parts[0].in_channels(),
            kh,
            kw,
        ]
    }

    /// The geometry (stride, padding, dilation) of the spatial convolution.
    pub fn config(&self) -> ConvConfig {
        match self {
            ConvSlot::Dense(c) => c.config,
            ConvSlot::Tucker(t) => t.core.config,
            ConvSlot::Svd(s) => s.first.config,
        }
    }

    pub fn num_params(&self) -> i64 {
        self.parts().iter().map(|c| c.num_params()).sum()
    }

    /// (MACs for one image, output [H, W]) for an input of [H, W]: each layer at the
    /// resolution it reads.
    pub fn macs(&self, input: [i64; 2]) -> (i64, [i64; 2]) {
        self.parts().iter().fold((0, input), |(total, size), c| {
            let (macs, out) = c.macs(size);
            (total + macs, out)
        })
    }

    /// The dense kernel the slot computes (the weight itself when dense).
    pub fn dense_weight(&self) -> Tensor {
        match self {
            ConvSlot::Dense(c) => c.weight.shallow_clone(),
            ConvSlot::Tucker(t) => t.reconstruct(),
            ConvSlot::Svd(s) => s.reconstruct(),
        }
    }

    /// The dense conv this slot computes (a copy): kernel, bias and geometry.
    pub fn to_dense(&self) -> Conv2d {
        let parts = self.parts();
        Conv2d {
            weight: self.dense_weight().detach().copy(),
            bias: parts[parts.len() - 1]
                .bias
                .as_ref()
                .map(|b| b.detach().copy()),
            config: self.config(),
        }
    }

    /// Named tensors under the state_dict names of the seed's model: `weight`/`bias` when dense,
    /// `{i}.weight`, `{i}.bias` for the i-th layer of a factorisation (`nn.Sequential`).
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let dense = matches!(self, ConvSlot::Dense(_));
        self.parts()
            .into_iter()
            .enumerate()
            .flat_map(|(i, c)| {
                c.tensors()
                    .into_iter()
                    .map(move |(n, t)| (part_name(dense, i, n), t))
            })
            .collect()
    }

    pub fn named_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let dense = matches!(self, ConvSlot::Dense(_));
        self.parts_mut()
            .into_iter()
            .enumerate()
            .flat_map(|(i, c)| {
                c.tensors_mut()
                    .into_iter()
                    .map(move |(n, t)| (part_name(dense, i, n), t))
            })
            .collect()
    }
}

fn part_name(dense: bool, index: usize, tensor: &str) -> String {
    if dense {
        tensor.to_string()
    } else {
        format!("{index}.{tensor}")
    }
}
