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

/// A conv position in the model: dense, or replaced by its Tucker-2 factorisation.
#[derive(Debug)]
pub enum ConvSlot {
    Dense(Conv2d),
    Tucker(TuckerConv),
}

impl ConvSlot {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            ConvSlot::Dense(c) => c.forward(x),
            ConvSlot::Tucker(t) => t.forward(x),
        }
    }

    /// C_out × C_in × kh × kw of the convolution this slot computes.
    pub fn dense_shape(&self) -> [i64; 4] {
        let outer = match self {
            ConvSlot::Dense(c) => c,
            ConvSlot::Tucker(t) => &t.core,
        };
        let [kh, kw] = outer.kernel();
        match self {
            ConvSlot::Dense(c) => [c.out_channels(), c.in_channels(), kh, kw],
            ConvSlot::Tucker(t) => [t.last.out_channels(), t.first.in_channels(), kh, kw],
        }
    }

    /// The geometry (stride, padding, dilation) of the spatial convolution.
    pub fn config(&self) -> ConvConfig {
        match self {
            ConvSlot::Dense(c) => c.config,
            ConvSlot::Tucker(t) => t.core.config,
        }
    }

    pub fn num_params(&self) -> i64 {
        match self {
            ConvSlot::Dense(c) => c.num_params(),
            ConvSlot::Tucker(t) => t.first.num_params() + t.core.num_params() + t.last.num_params(),
        }
    }

    /// (MACs for one image, output [H, W]) for an input of [H, W].
    pub fn macs(&self, input: [i64; 2]) -> (i64, [i64; 2]) {
        match self {
            ConvSlot::Dense(c) => c.macs(input),
            ConvSlot::Tucker(t) => {
                let (first, _) = t.first.macs(input);
                let (core, out) = t.core.macs(input);
                let (last, _) = t.last.macs(out);
                (first + core + last, out)
            }
        }
    }

    /// The dense kernel the slot computes (the weight itself when dense).
    pub fn dense_weight(&self) -> Tensor {
        match self {
            ConvSlot::Dense(c) => c.weight.shallow_clone(),
            ConvSlot::Tucker(t) => t.reconstruct(),
        }
    }

    /// Named tensors under the state_dict names of the seed's model: `weight`/`bias` when dense,
    /// `0.weight`, `1.weight`, `2.weight`, `2.bias` when Tucker.
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        match self {
            ConvSlot::Dense(c) => c
                .tensors()
                .into_iter()
                .map(|(n, t)| (n.to_string(), t))
                .collect(),
            ConvSlot::Tucker(t) => [(0, &t.first), (1, &t.core), (2, &t.last)]
                .into_iter()
                .flat_map(|(i, c)| {
                    c.tensors()
                        .into_iter()
                        .map(move |(n, t)| (format!("{i}.{n}"), t))
                })
                .collect(),
        }
    }

    pub fn named_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        match self {
            ConvSlot::Dense(c) => c
                .tensors_mut()
                .into_iter()
                .map(|(n, t)| (n.to_string(), t))
                .collect(),
            ConvSlot::Tucker(t) => [(0, &mut t.first), (1, &mut t.core), (2, &mut t.last)]
                .into_iter()
                .flat_map(|(i, c)| {
                    c.tensors_mut()
                        .into_iter()
                        .map(move |(n, t)| (format!("{i}.{n}"), t))
                })
                .collect(),
        }
    }
}
