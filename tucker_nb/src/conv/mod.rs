//! Convolution layers as plain tensors: a dense [`Conv2d`], a [`TuckerConv`] (1×1 → k×k core →
//! 1×1), a [`TwoLayerConv`] (two layers: an SVD's 1×1 → 1×1, or a Tucker-1 form, k×k → 1×1 or
//! 1×1 → k×k), a [`CpConv`] (1×1 → depthwise kh×1 → depthwise 1×kw → 1×1), and the [`ConvSlot`] a
//! model holds, which is any of them and can be swapped in
//! place. [`Form::macs`] (`form.rs`) is the one cost model: layers, reports and the planner all
//! count multiply-accumulates through it.

mod form;
#[cfg(test)]
mod tests;

pub use form::Form;

use tch::{Kind, Tensor};

use crate::decompose::{mode_products, CpFactors, Tucker2Factors};

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

    /// Output [H, W] for an input of `input` and a kernel of `[kh, kw]`.
    pub fn output(&self, input: [i64; 2], [kh, kw]: [i64; 2]) -> [i64; 2] {
        [
            self.output_size(input[0], kh, 0),
            self.output_size(input[1], kw, 1),
        ]
    }
}

/// What a conv computes, whatever its form: the dense shape C_out × C_in × kh × kw and geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub shape: [i64; 4],
    pub config: ConvConfig,
}

impl ConvGeometry {
    pub fn kernel(&self) -> [i64; 2] {
        [self.shape[2], self.shape[3]]
    }

    pub fn is_pointwise(&self) -> bool {
        self.kernel() == [1, 1]
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
    /// A 1×1, stride-1 conv with this weight (C_out × C_in × 1 × 1) and bias.
    pub fn pointwise(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            config: ConvConfig::default(),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let c = &self.config;
        if self.is_strided_pointwise() && x.device() == tch::Device::Cpu {
            return self.subsampled_pointwise(x);
        }
        x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            c.stride,
            c.padding,
            c.dilation,
            c.groups,
        )
    }

    /// A 1×1 kernel with a stride above 1 (a downsample, or the core of a factorised one).
    fn is_strided_pointwise(&self) -> bool {
        self.kernel() == [1, 1] && self.config.stride != [1, 1]
    }

    /// A strided 1×1 conv as what it computes: the input sampled every `stride` pixels (after
    /// its zero padding), then a stride-1 1×1 conv. On the CPU, libtorch's own strided 1×1
    /// runs oneDNN's `jit_avx512_common_1x1` backward-weights kernel, which writes past its
    /// buffers (heap corruption, then SIGSEGV) for channels-last inputs with 8–13 input
    /// channels, an odd batch of 25 or more and 2+ threads (oneDNN 3.10.2 in PyTorch 2.11:
    /// `scripts/onednn_strided_1x1.py` reproduces it in plain PyTorch). Sampling first never
    /// reaches that kernel; the values are the same sums.
    fn subsampled_pointwise(&self, x: &Tensor) -> Tensor {
        let c = &self.config;
        let [ph, pw] = c.padding;
        let padded = match ph == 0 && pw == 0 {
            true => x.shallow_clone(),
            false => x.constant_pad_nd([pw, pw, ph, ph]),
        };
        let [_, _, h, w] = padded.size()[..] else {
            unreachable!("conv inputs are N×C×H×W")
        };
        let sampled = padded
            .slice(2, 0, h, c.stride[0])
            .slice(3, 0, w, c.stride[1]);
        sampled.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [1, 1],
            [0, 0],
            [1, 1],
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

    pub fn geometry(&self) -> ConvGeometry {
        let [kh, kw] = self.kernel();
        ConvGeometry {
            shape: [self.out_channels(), self.in_channels(), kh, kw],
            config: self.config,
        }
    }

    pub fn num_params(&self) -> i64 {
        self.weight.numel() as i64 + self.bias.as_ref().map_or(0, |b| b.numel() as i64)
    }

    /// `weight` and `bias` as shallow handles: writing through them writes the layer.
    fn tensors(&self) -> Vec<(&'static str, Tensor)> {
        let mut v = vec![("weight", self.weight.shallow_clone())];
        if let Some(b) = &self.bias {
            v.push(("bias", b.shallow_clone()));
        }
        v
    }
}

/// The bias a factorisation's last layer carries: the original conv's, or zeros (never random,
/// unlike the seed's).
fn output_bias(dense: &Conv2d) -> Option<Tensor> {
    Some(match &dense.bias {
        Some(b) => b.detach().copy(),
        None => Tensor::zeros([dense.out_channels()], (Kind::Float, dense.weight.device())),
    })
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
    /// The three layers from their kernels as the model stores them: `first` r_in × C_in × 1 × 1,
    /// `core` r_out × r_in × kh × kw (with `config`), `last` C_out × r_out × 1 × 1.
    pub fn new(
        first: Tensor,
        core: Tensor,
        last: Tensor,
        bias: Option<Tensor>,
        config: ConvConfig,
    ) -> Self {
        Self {
            first: Conv2d::pointwise(first, None),
            core: Conv2d {
                weight: core,
                bias: None,
                config,
            },
            last: Conv2d::pointwise(last, bias),
        }
    }

    /// The layers for fitted factors of `dense`, in `dense`'s dtype and device; the last layer
    /// carries `dense`'s bias (zeros when it has none).
    pub fn from_factors(factors: &Tucker2Factors, dense: &Conv2d) -> Self {
        let to_model = |t: &Tensor| to_layer(t, &dense.weight);
        let first = to_model(&factors.u1.tr().unsqueeze(-1).unsqueeze(-1));
        let last = to_model(&factors.u0.unsqueeze(-1).unsqueeze(-1));
        let core = to_model(&factors.core);
        Self::new(first, core, last, output_bias(dense), dense.config)
    }

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
        mode_products(&self.core.weight, &u0, &u1t.tr())
    }
}

/// A kernel computed in f64 on the CPU, as a layer weight like `like`: its dtype, device and
/// layout (channels-last or contiguous).
fn to_layer(t: &Tensor, like: &Tensor) -> Tensor {
    crate::layout::laid_out_like(&t.to_kind(like.kind()).to_device(like.device()), like)
}

/// A conv as two layers, `nn.Sequential(first, last)`, one mode of the kernel factorised:
///
/// - SVD of a 1×1 conv, W ≈ (U·√Σ)·(√Σ·Vᵀ): `first` = √Σ·Vᵀ (r × C_in × 1 × 1, carrying the
///   stride, no bias), `last` = U·√Σ (C_out × r × 1 × 1); cost (C_in + C_out)·r·H_out·W_out (a
///   strided 1×1 samples first, so both run at the output's resolution);
/// - Tucker-1 on the output mode of a k×k conv, W ≈ U0 ×0 S: `first` = S (r_out × C_in × kh × kw,
///   carrying stride, padding and dilation), `last` = U0 (C_out × r_out × 1 × 1); Tucker-2 with
///   r_in = C_in less its useless full-rank first 1×1 (what the RGB stem wants);
/// - Tucker-1 on the input mode, W ≈ S ×1 U1: `first` = U1ᵀ (r_in × C_in × 1 × 1, stride 1), `last`
///   = S (C_out × r_in × kh × kw, carrying the geometry); Tucker-2 with r_out = C_out less its last
///   C_out × C_out 1×1.
///
/// `last` carries the original conv's bias (zeros when it had none).
#[derive(Debug)]
pub struct TwoLayerConv {
    pub first: Conv2d,
    pub last: Conv2d,
}

impl TwoLayerConv {
    /// A 1×1 conv's SVD layers from their kernels: `first` r × C_in × 1 × 1 (with `config`, the
    /// original stride), `last` C_out × r × 1 × 1.
    pub fn new(first: Tensor, last: Tensor, bias: Option<Tensor>, config: ConvConfig) -> Self {
        Self {
            first: Conv2d {
                weight: first,
                bias: None,
                config,
            },
            last: Conv2d::pointwise(last, bias),
        }
    }

    /// The SVD layers for the factors (first r × C_in, last C_out × r) of the 1×1 conv `dense`.
    pub fn from_factors(first: &Tensor, last: &Tensor, dense: &Conv2d) -> Self {
        let to_model = |t: &Tensor| to_layer(&t.unsqueeze(-1).unsqueeze(-1), &dense.weight);
        let (first, last) = (to_model(first), to_model(last));
        Self::new(first, last, output_bias(dense), dense.config)
    }

    /// Tucker-1 layers in `form` from fitted Tucker-2 `factors` of the k×k conv `dense` whose
    /// other mode is at full rank: [`Form::Tucker1Out`] keeps U0 and folds U1 into the core,
    /// [`Form::Tucker1In`] the reverse.
    ///
    /// # Panics
    /// For any other form (the callers have matched it).
    pub fn tucker1_from_factors(factors: &Tucker2Factors, dense: &Conv2d, form: Form) -> Self {
        let to_model = |t: &Tensor| to_layer(t, &dense.weight);
        let eye = |n: i64| Tensor::eye(n, (factors.core.kind(), factors.core.device()));
        let [r_out, r_in, _, _] = factors.core.size()[..] else {
            unreachable!("core is 4-way")
        };
        let output = match form {
            Form::Tucker1Out { .. } => true,
            Form::Tucker1In { .. } => false,
            other => panic!("{} is not a Tucker-1 form", other.name()),
        };
        if output {
            let core = mode_products(&factors.core, &eye(r_out), &factors.u1);
            Self {
                first: Conv2d {
                    weight: to_model(&core),
                    bias: None,
                    config: dense.config,
                },
                last: Conv2d::pointwise(
                    to_model(&factors.u0.unsqueeze(-1).unsqueeze(-1)),
                    output_bias(dense),
                ),
            }
        } else {
            let core = mode_products(&factors.core, &factors.u0, &eye(r_in));
            Self {
                first: Conv2d::pointwise(
                    to_model(&factors.u1.tr().unsqueeze(-1).unsqueeze(-1)),
                    None,
                ),
                last: Conv2d {
                    weight: to_model(&core),
                    bias: output_bias(dense),
                    config: dense.config,
                },
            }
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.last.forward(&self.first.forward(x))
    }

    /// The channels between the two layers.
    pub fn rank(&self) -> i64 {
        self.first.out_channels()
    }

    /// The layer with the spatial kernel (the first of an SVD's two 1×1s).
    pub fn spatial(&self) -> &Conv2d {
        if self.last.kernel() != [1, 1] {
            &self.last
        } else {
            &self.first
        }
    }

    pub fn form(&self) -> Form {
        let rank = self.rank();
        if self.first.kernel() != [1, 1] {
            Form::Tucker1Out {
                r_out: rank,
                c_in: self.first.in_channels(),
            }
        } else if self.last.kernel() != [1, 1] {
            Form::Tucker1In {
                c_out: self.last.out_channels(),
                r_in: rank,
            }
        } else {
            Form::Svd { rank }
        }
    }

    /// The dense C_out × C_in × kh × kw kernel this layer computes.
    pub fn reconstruct(&self) -> Tensor {
        let (first, last) = (&self.first.weight, &self.last.weight);
        let (c_out, c_in) = (self.last.out_channels(), self.first.in_channels());
        let [kh, kw] = self.spatial().kernel();
        if self.last.kernel() != [1, 1] {
            // W[o, c] = Σ_r S[o, r] · U1ᵀ[r, c]
            let eye = Tensor::eye(c_out, (last.kind(), last.device()));
            mode_products(last, &eye, &first.flatten(1, 3).tr())
        } else {
            last.flatten(1, 3)
                .matmul(&first.reshape([self.rank(), -1]))
                .reshape([c_out, c_in, kh, kw])
        }
    }
}

/// A CP convolution (Lebedev et al., ICLR 2015), W[o, c, i, j] ≈ Σ_r A[o, r]·B[c, r]·K[i, r]·L[j, r],
/// as four layers, `nn.Sequential(first, vertical, horizontal, last)`:
///
/// - `first` = Bᵀ (R × C_in × 1 × 1, stride 1, no bias);
/// - `vertical` = K (R × 1 × kh × 1, depthwise: groups R), with the height's stride, padding and
///   dilation;
/// - `horizontal` = L (R × 1 × 1 × kw, depthwise), with the width's;
/// - `last` = A (C_out × R × 1 × 1), with the original conv's bias (zeros when it had none).
///
/// A separable sum over a zero-padded window equals the two one-dimensional passes with each
/// dimension's padding, so the split is exact for any stride, padding and dilation. Cost per image:
/// C_in·R·H_in·W_in + R·kh·H_out·W_in + R·kw·H_out·W_out + C_out·R·H_out·W_out.
#[derive(Debug)]
pub struct CpConv {
    pub first: Conv2d,
    pub vertical: Conv2d,
    pub horizontal: Conv2d,
    pub last: Conv2d,
}

impl CpConv {
    /// The four layers from their kernels as the model stores them: `first` R × C_in × 1 × 1,
    /// `vertical` R × 1 × kh × 1, `horizontal` R × 1 × 1 × kw, `last` C_out × R × 1 × 1; `config` is
    /// the dense conv's geometry, split between the two depthwise layers.
    pub fn new(
        [first, vertical, horizontal, last]: [Tensor; 4],
        bias: Option<Tensor>,
        config: ConvConfig,
    ) -> Self {
        let rank = first.size()[0];
        let along = |d: usize| ConvConfig {
            stride: only(d, config.stride[d], 1),
            padding: only(d, config.padding[d], 0),
            dilation: only(d, config.dilation[d], 1),
            groups: rank,
        };
        Self {
            first: Conv2d::pointwise(first, None),
            vertical: Conv2d {
                weight: vertical,
                bias: None,
                config: along(0),
            },
            horizontal: Conv2d {
                weight: horizontal,
                bias: None,
                config: along(1),
            },
            last: Conv2d::pointwise(last, bias),
        }
    }

    /// The layers for fitted factors of `dense`, in `dense`'s dtype, device and layout; the last
    /// layer carries `dense`'s bias (zeros when it has none).
    pub fn from_factors(factors: &CpFactors, dense: &Conv2d) -> Self {
        let to_model = |t: Tensor| to_layer(&t, &dense.weight);
        let rank = factors.rank();
        let [kh, kw] = dense.kernel();
        let kernels = [
            to_model(factors.b.tr().reshape([rank, -1, 1, 1])),
            to_model(factors.k.tr().reshape([rank, 1, kh, 1])),
            to_model(factors.l.tr().reshape([rank, 1, 1, kw])),
            to_model(factors.a.reshape([-1, rank, 1, 1])),
        ];
        Self::new(kernels, output_bias(dense), dense.config)
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = self.first.forward(x);
        let x = self.horizontal.forward(&self.vertical.forward(&x));
        self.last.forward(&x)
    }

    pub fn rank(&self) -> i64 {
        self.first.out_channels()
    }

    /// The dense conv's geometry: each depthwise layer's own dimension.
    pub fn config(&self) -> ConvConfig {
        let (v, h) = (&self.vertical.config, &self.horizontal.config);
        ConvConfig {
            stride: [v.stride[0], h.stride[1]],
            padding: [v.padding[0], h.padding[1]],
            dilation: [v.dilation[0], h.dilation[1]],
            groups: 1,
        }
    }

    /// The dense C_out × C_in × kh × kw kernel this layer computes.
    pub fn reconstruct(&self) -> Tensor {
        let rank = self.rank();
        let column = |c: &Conv2d| c.weight.reshape([rank, -1]).tr();
        Tensor::einsum(
            "or,cr,ir,jr->ocij",
            &[
                &self.last.weight.reshape([-1, rank]),
                &column(&self.first),
                &column(&self.vertical),
                &column(&self.horizontal),
            ],
            None::<&[i64]>,
        )
    }
}

/// `value` in dimension `d`, `neutral` in the other.
fn only(d: usize, value: i64, neutral: i64) -> [i64; 2] {
    let mut v = [neutral; 2];
    v[d] = value;
    v
}

/// A conv position in the model: dense, or replaced by a factorisation.
#[derive(Debug)]
pub enum ConvSlot {
    Dense(Conv2d),
    Tucker(TuckerConv),
    TwoLayer(TwoLayerConv),
    Cp(CpConv),
}

impl ConvSlot {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            ConvSlot::Dense(c) => c.forward(x),
            ConvSlot::Tucker(t) => t.forward(x),
            ConvSlot::TwoLayer(s) => s.forward(x),
            ConvSlot::Cp(c) => c.forward(x),
        }
    }

    pub fn is_dense(&self) -> bool {
        matches!(self, ConvSlot::Dense(_))
    }

    pub fn form(&self) -> Form {
        match self {
            ConvSlot::Dense(_) => Form::Dense,
            ConvSlot::Tucker(t) => {
                let (r_out, r_in) = t.ranks();
                Form::Tucker2 { r_out, r_in }
            }
            ConvSlot::TwoLayer(s) => s.form(),
            ConvSlot::Cp(c) => Form::Cp { rank: c.rank() },
        }
    }

    /// The layers the slot runs, in order.
    pub fn parts(&self) -> Vec<&Conv2d> {
        match self {
            ConvSlot::Dense(c) => vec![c],
            ConvSlot::Tucker(t) => vec![&t.first, &t.core, &t.last],
            ConvSlot::TwoLayer(s) => vec![&s.first, &s.last],
            ConvSlot::Cp(c) => vec![&c.first, &c.vertical, &c.horizontal, &c.last],
        }
    }

    /// The layer that produces the slot's output (the one carrying its bias).
    pub fn output_layer_mut(&mut self) -> &mut Conv2d {
        match self {
            ConvSlot::Dense(c) => c,
            ConvSlot::Tucker(t) => &mut t.last,
            ConvSlot::TwoLayer(s) => &mut s.last,
            ConvSlot::Cp(c) => &mut c.last,
        }
    }

    /// The dense shape and geometry of the convolution this slot computes.
    pub fn geometry(&self) -> ConvGeometry {
        match self {
            ConvSlot::Dense(c) => c.geometry(),
            ConvSlot::Tucker(t) => ConvGeometry {
                shape: [
                    t.last.out_channels(),
                    t.first.in_channels(),
                    t.core.kernel()[0],
                    t.core.kernel()[1],
                ],
                config: t.core.config,
            },
            ConvSlot::TwoLayer(s) => {
                let [kh, kw] = s.spatial().kernel();
                ConvGeometry {
                    shape: [s.last.out_channels(), s.first.in_channels(), kh, kw],
                    config: s.spatial().config,
                }
            }
            ConvSlot::Cp(c) => ConvGeometry {
                shape: [
                    c.last.out_channels(),
                    c.first.in_channels(),
                    c.vertical.kernel()[0],
                    c.horizontal.kernel()[1],
                ],
                config: c.config(),
            },
        }
    }

    /// C_out × C_in × kh × kw of the convolution this slot computes.
    pub fn dense_shape(&self) -> [i64; 4] {
        self.geometry().shape
    }

    /// The geometry (stride, padding, dilation) of the spatial convolution.
    pub fn config(&self) -> ConvConfig {
        self.geometry().config
    }

    pub fn num_params(&self) -> i64 {
        self.parts().iter().map(|c| c.num_params()).sum()
    }

    /// (MACs for one image, output [H, W]) for an input of [H, W] ([`Form::macs`]).
    pub fn macs(&self, input: [i64; 2]) -> (i64, [i64; 2]) {
        self.form().macs(&self.geometry(), input)
    }

    /// The dense kernel the slot computes (the weight itself when dense).
    pub fn dense_weight(&self) -> Tensor {
        match self {
            ConvSlot::Dense(c) => c.weight.shallow_clone(),
            ConvSlot::Tucker(t) => t.reconstruct(),
            ConvSlot::TwoLayer(s) => s.reconstruct(),
            ConvSlot::Cp(c) => c.reconstruct(),
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

    /// Shallow handles to the slot's tensors under the seed's state_dict names, relative to the
    /// slot: `weight`/`bias` when dense, `{i}.weight`, `{i}.bias` for the i-th layer of a
    /// factorisation (`nn.Sequential`).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let dense = self.is_dense();
        self.parts()
            .into_iter()
            .enumerate()
            .flat_map(|(i, c)| {
                c.tensors().into_iter().map(move |(n, t)| {
                    let name = if dense {
                        n.to_string()
                    } else {
                        format!("{i}.{n}")
                    };
                    (name, t)
                })
            })
            .collect()
    }
}
