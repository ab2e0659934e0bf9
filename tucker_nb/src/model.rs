//! ResNet18 with torchvision's architecture and parameter names, as a plain struct tree whose
//! conv slots can be replaced in place (tch's own `vision::resnet` is a closure and cannot be).
//!
//! Loads torchvision's `resnet18-*.pth` (the zip `torch.save` writes) and safetensors files,
//! dense or Tucker-2 compressed (the seed's `nn.Sequential(first, core, last)` key layout: the
//! ranks are read from the shapes), and saves safetensors with exactly the seed's state_dict keys.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::conv::{Conv2d, ConvConfig, ConvSlot, SvdConv, TuckerConv};
use crate::error::{Error, Result};
use crate::io;

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
    fn new(channels: i64, device: Device) -> Self {
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

    /// Folds this BN's eval-mode affine map y = γ·(x − μ)/√(σ² + ε) + β into `conv`, whose
    /// output it normalises (per output channel: W ← s·W, b ← s·(b − μ) + β, s = γ/√(σ² + ε)),
    /// computed in f64, and becomes the identity: γ = 1, β = 0, μ = 0, σ² = 1 − ε. Its keys and
    /// shapes stay, so the file still loads into the unfolded structure and computes the same.
    fn fold_into(&mut self, conv: &mut Conv2d) {
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

    fn tensors(&self) -> [(&'static str, &Tensor); 5] {
        [
            ("weight", &self.weight),
            ("bias", &self.bias),
            ("running_mean", &self.running_mean),
            ("running_var", &self.running_var),
            ("num_batches_tracked", &self.num_batches_tracked),
        ]
    }

    fn tensors_mut(&mut self) -> [(&'static str, &mut Tensor); 5] {
        [
            ("weight", &mut self.weight),
            ("bias", &mut self.bias),
            ("running_mean", &mut self.running_mean),
            ("running_var", &mut self.running_var),
            ("num_batches_tracked", &mut self.num_batches_tracked),
        ]
    }
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

/// The projection shortcut of a block whose shape changes: 1×1 conv + BN.
#[derive(Debug)]
pub struct Downsample {
    pub conv: ConvSlot,
    pub bn: BatchNorm,
}

/// torchvision's `BasicBlock`.
#[derive(Debug)]
pub struct BasicBlock {
    pub conv1: ConvSlot,
    pub bn1: BatchNorm,
    pub conv2: ConvSlot,
    pub bn2: BatchNorm,
    pub downsample: Option<Downsample>,
}

impl BasicBlock {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let out = self.bn1.forward(&self.conv1.forward(x), train).relu();
        let out = self.bn2.forward(&self.conv2.forward(&out), train);
        let identity = match &self.downsample {
            Some(d) => d.bn.forward(&d.conv.forward(x), train),
            None => x.shallow_clone(),
        };
        (out + identity).relu()
    }
}

/// Channels and first stride of ResNet18's four stages.
const STAGES: [(i64, i64); 4] = [(64, 1), (128, 2), (256, 2), (512, 2)];
const FEATURES: i64 = 512;

/// ResNet18 with torchvision's names: `conv1`, `bn1`, `layer1`…`layer4` (two blocks each), `fc`.
#[derive(Debug)]
pub struct ResNet18 {
    pub conv1: ConvSlot,
    pub bn1: BatchNorm,
    pub layers: [Vec<BasicBlock>; 4],
    pub fc: Linear,
}

/// What a conv slot must look like: its name, dense shape and geometry.
#[derive(Debug, Clone)]
pub struct ConvSpec {
    pub name: String,
    pub shape: [i64; 4],
    pub config: ConvConfig,
}

/// The conv layers of ResNet18, in state_dict order.
pub fn conv_specs() -> Vec<ConvSpec> {
    let spec = |name: String, c_out, c_in, k, stride, padding| ConvSpec {
        name,
        shape: [c_out, c_in, k, k],
        config: ConvConfig::new(stride, padding),
    };
    let mut specs = vec![spec("conv1".into(), 64, 3, 7, 2, 3)];
    let mut c_in = 64;
    for (stage, &(c, first_stride)) in STAGES.iter().enumerate() {
        for block in 0..2 {
            let (stride, block_in) = if block == 0 {
                (first_stride, c_in)
            } else {
                (1, c)
            };
            let prefix = format!("layer{}.{block}", stage + 1);
            specs.push(spec(format!("{prefix}.conv1"), c, block_in, 3, stride, 1));
            specs.push(spec(format!("{prefix}.conv2"), c, c, 3, 1, 1));
            if block == 0 && (stride != 1 || block_in != c) {
                specs.push(spec(
                    format!("{prefix}.downsample.0"),
                    c,
                    block_in,
                    1,
                    stride,
                    0,
                ));
            }
        }
        c_in = c;
    }
    specs
}

impl ResNet18 {
    /// A randomly initialised model, as torchvision's `resnet18(num_classes=...)`: convs
    /// Kaiming-normal (fan_out, ReLU), BN weight 1 and bias 0, fc PyTorch's default.
    pub fn new(num_classes: i64, device: Device) -> Self {
        let mut convs: BTreeMap<String, ConvSlot> = conv_specs()
            .into_iter()
            .map(|s| {
                let [c_out, _, kh, kw] = s.shape;
                let std = (2.0 / (c_out * kh * kw) as f64).sqrt();
                let weight = Tensor::randn(s.shape, (Kind::Float, device)) * std;
                let conv = Conv2d {
                    weight,
                    bias: None,
                    config: s.config,
                };
                (s.name, ConvSlot::Dense(conv))
            })
            .collect();
        Self::assemble(
            |name| convs.remove(name).expect("conv spec"),
            |c| BatchNorm::new(c, device),
            Linear::new(FEATURES, num_classes, device),
        )
    }

    /// Builds the tree from per-layer constructors, in torchvision's order.
    fn assemble(
        mut conv: impl FnMut(&str) -> ConvSlot,
        mut bn: impl FnMut(i64) -> BatchNorm,
        fc: Linear,
    ) -> Self {
        let conv1 = conv("conv1");
        let bn1 = bn(64);
        let mut c_in = 64;
        let layers = STAGES.map(|(c, first_stride)| {
            let stage = (c as f64).log2() as i64 - 5; // 64 → 1, …, 512 → 4
            let blocks = (0..2)
                .map(|block| {
                    let prefix = format!("layer{stage}.{block}");
                    let needs_projection = block == 0 && (first_stride != 1 || c_in != c);
                    BasicBlock {
                        conv1: conv(&format!("{prefix}.conv1")),
                        bn1: bn(c),
                        conv2: conv(&format!("{prefix}.conv2")),
                        bn2: bn(c),
                        downsample: needs_projection.then(|| Downsample {
                            conv: conv(&format!("{prefix}.downsample.0")),
                            bn: bn(c),
                        }),
                    }
                })
                .collect();
            c_in = c;
            blocks
        });
        Self {
            conv1,
            bn1,
            layers,
            fc,
        }
    }

    /// Logits for a batch N × 3 × H × W (normalised images). `train` selects batch statistics
    /// in BN and updates the running ones.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut x = self.bn1.forward(&self.conv1.forward(x), train).relu();
        x = x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        for block in self.layers.iter().flatten() {
            x = block.forward(&x, train);
        }
        let x = x.adaptive_avg_pool2d([1, 1]).flatten(1, -1);
        self.fc.forward(&x)
    }

    pub fn num_classes(&self) -> i64 {
        self.fc.weight.size()[0]
    }

    pub fn device(&self) -> Device {
        self.fc.weight.device()
    }

    /// The conv slots with their torchvision names, in state_dict order.
    pub fn conv_slots(&self) -> Vec<(String, &ConvSlot)> {
        let mut v = vec![("conv1".to_string(), &self.conv1)];
        for (stage, blocks) in self.layers.iter().enumerate() {
            for (b, block) in blocks.iter().enumerate() {
                let prefix = format!("layer{}.{b}", stage + 1);
                v.push((format!("{prefix}.conv1"), &block.conv1));
                v.push((format!("{prefix}.conv2"), &block.conv2));
                if let Some(d) = &block.downsample {
                    v.push((format!("{prefix}.downsample.0"), &d.conv));
                }
            }
        }
        v
    }

    /// Mutable conv slots, same names and order as [`Self::conv_slots`].
    pub fn conv_slots_mut(&mut self) -> Vec<(String, &mut ConvSlot)> {
        let mut v = vec![("conv1".to_string(), &mut self.conv1)];
        for (stage, blocks) in self.layers.iter_mut().enumerate() {
            for (b, block) in blocks.iter_mut().enumerate() {
                let prefix = format!("layer{}.{b}", stage + 1);
                v.push((format!("{prefix}.conv1"), &mut block.conv1));
                v.push((format!("{prefix}.conv2"), &mut block.conv2));
                if let Some(d) = &mut block.downsample {
                    v.push((format!("{prefix}.downsample.0"), &mut d.conv));
                }
            }
        }
        v
    }

    /// The input resolution [H, W] each conv sees for an image of `image` = [H, W], by name.
    pub fn conv_input_sizes(&self, image: [i64; 2]) -> BTreeMap<String, [i64; 2]> {
        let mut sizes = BTreeMap::new();
        sizes.insert("conv1".to_string(), image);
        let (_, stem) = self.conv1.macs(image);
        let pool = ConvConfig::new(2, 1);
        let mut x = [
            pool.output_size(stem[0], 3, 0),
            pool.output_size(stem[1], 3, 1),
        ];
        for (stage, blocks) in self.layers.iter().enumerate() {
            for (b, block) in blocks.iter().enumerate() {
                let prefix = format!("layer{}.{b}", stage + 1);
                sizes.insert(format!("{prefix}.conv1"), x);
                if block.downsample.is_some() {
                    sizes.insert(format!("{prefix}.downsample.0"), x);
                }
                let (_, mid) = block.conv1.macs(x);
                sizes.insert(format!("{prefix}.conv2"), mid);
                x = block.conv2.macs(mid).1;
            }
        }
        sizes
    }

    /// Multiply-accumulates of all convs for one image of `image` = [H, W] (Tucker layers at
    /// their true cost, the first 1×1 at its input's resolution).
    pub fn conv_macs(&self, image: [i64; 2]) -> i64 {
        let sizes = self.conv_input_sizes(image);
        self.conv_slots()
            .iter()
            .map(|(n, s)| s.macs(sizes[n]).0)
            .sum()
    }

    /// Every tensor under its state_dict name, in torchvision's order.
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        fn push_bn<'a>(v: &mut Vec<(String, &'a Tensor)>, name: &str, bn: &'a BatchNorm) {
            for (n, t) in bn.tensors() {
                v.push((format!("{name}.{n}"), t));
            }
        }
        fn push_conv<'a>(v: &mut Vec<(String, &'a Tensor)>, name: &str, s: &'a ConvSlot) {
            for (n, t) in s.named_tensors() {
                v.push((format!("{name}.{n}"), t));
            }
        }
        let mut v = Vec::new();
        push_conv(&mut v, "conv1", &self.conv1);
        push_bn(&mut v, "bn1", &self.bn1);
        for (stage, blocks) in self.layers.iter().enumerate() {
            for (b, block) in blocks.iter().enumerate() {
                let p = format!("layer{}.{b}", stage + 1);
                push_conv(&mut v, &format!("{p}.conv1"), &block.conv1);
                push_bn(&mut v, &format!("{p}.bn1"), &block.bn1);
                push_conv(&mut v, &format!("{p}.conv2"), &block.conv2);
                push_bn(&mut v, &format!("{p}.bn2"), &block.bn2);
                if let Some(d) = &block.downsample {
                    push_conv(&mut v, &format!("{p}.downsample.0"), &d.conv);
                    push_bn(&mut v, &format!("{p}.downsample.1"), &d.bn);
                }
            }
        }
        v.push(("fc.weight".into(), &self.fc.weight));
        v.push(("fc.bias".into(), &self.fc.bias));
        v
    }

    /// Mutable tensors, same names and order as [`Self::named_tensors`].
    pub fn named_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        fn push_bn<'a>(v: &mut Vec<(String, &'a mut Tensor)>, name: &str, bn: &'a mut BatchNorm) {
            for (n, t) in bn.tensors_mut() {
                v.push((format!("{name}.{n}"), t));
            }
        }
        fn push_conv<'a>(v: &mut Vec<(String, &'a mut Tensor)>, name: &str, s: &'a mut ConvSlot) {
            for (n, t) in s.named_tensors_mut() {
                v.push((format!("{name}.{n}"), t));
            }
        }
        let mut v = Vec::new();
        push_conv(&mut v, "conv1", &mut self.conv1);
        push_bn(&mut v, "bn1", &mut self.bn1);
        for (stage, blocks) in self.layers.iter_mut().enumerate() {
            for (b, block) in blocks.iter_mut().enumerate() {
                let p = format!("layer{}.{b}", stage + 1);
                push_conv(&mut v, &format!("{p}.conv1"), &mut block.conv1);
                push_bn(&mut v, &format!("{p}.bn1"), &mut block.bn1);
                push_conv(&mut v, &format!("{p}.conv2"), &mut block.conv2);
                push_bn(&mut v, &format!("{p}.bn2"), &mut block.bn2);
                if let Some(d) = &mut block.downsample {
                    push_conv(&mut v, &format!("{p}.downsample.0"), &mut d.conv);
                    push_bn(&mut v, &format!("{p}.downsample.1"), &mut d.bn);
                }
            }
        }
        v.push(("fc.weight".into(), &mut self.fc.weight));
        v.push(("fc.bias".into(), &mut self.fc.bias));
        v
    }

    /// Folds each BN that follows a factorised conv into that conv's last 1×1 (for inference:
    /// eval-mode outputs stay the same, one BN pass less per factorised conv). Dense convs and
    /// their BNs are left alone: folding there would add a bias the seed's structure has no key
    /// for. Returns the folded BNs' names.
    pub fn fold_batch_norms(&mut self) -> Vec<String> {
        fn fold(slot: &mut ConvSlot, bn: &mut BatchNorm, name: String, folded: &mut Vec<String>) {
            if !matches!(slot, ConvSlot::Dense(_)) && !bn.folded {
                bn.fold_into(slot.output_layer_mut());
                folded.push(name);
            }
        }
        let mut folded = Vec::new();
        fold(&mut self.conv1, &mut self.bn1, "bn1".into(), &mut folded);
        for (stage, blocks) in self.layers.iter_mut().enumerate() {
            for (b, block) in blocks.iter_mut().enumerate() {
                let p = format!("layer{}.{b}", stage + 1);
                fold(
                    &mut block.conv1,
                    &mut block.bn1,
                    format!("{p}.bn1"),
                    &mut folded,
                );
                fold(
                    &mut block.conv2,
                    &mut block.bn2,
                    format!("{p}.bn2"),
                    &mut folded,
                );
                if let Some(d) = &mut block.downsample {
                    fold(
                        &mut d.conv,
                        &mut d.bn,
                        format!("{p}.downsample.1"),
                        &mut folded,
                    );
                }
            }
        }
        folded
    }

    /// Moves every tensor to `device`.
    pub fn to_device(&mut self, device: Device) {
        for (_, t) in self.named_tensors_mut() {
            *t = t.to_device(device);
        }
    }

    /// Total parameter count (BN running statistics excluded, as `model.parameters()`).
    pub fn num_params(&self) -> i64 {
        self.named_tensors()
            .iter()
            .filter(|(n, _)| {
                !(n.ends_with("running_mean")
                    || n.ends_with("running_var")
                    || n.ends_with("num_batches_tracked"))
            })
            .map(|(_, t)| t.numel() as i64)
            .sum()
    }

    /// An independent copy (the seed's `copy.deepcopy` before compressing).
    pub fn deep_copy(&self) -> Self {
        let tensors = self
            .named_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.detach().copy()))
            .collect();
        Self::from_state_dict(Path::new("<in memory>"), tensors, None, self.device())
            .expect("a model's own tensors form a valid state_dict")
    }

    /// Loads a state_dict file: torchvision's `.pth`/`.pt` (a `torch.save` zip) or
    /// `.safetensors`, dense or Tucker-compressed. When `num_classes` differs from the file's
    /// classifier, `fc` is replaced by a freshly initialised one (as the seed does).
    pub fn load(path: impl AsRef<Path>, num_classes: Option<i64>, device: Device) -> Result<Self> {
        let path = path.as_ref();
        let tensors = io::read_state_dict(path)?;
        Self::from_state_dict(path, tensors, num_classes, device)
    }

    /// Builds the model from named tensors; `path` only names the source in errors.
    pub fn from_state_dict(
        path: &Path,
        tensors: Vec<(String, Tensor)>,
        num_classes: Option<i64>,
        device: Device,
    ) -> Result<Self> {
        let mut dict = StateDict {
            path,
            device,
            tensors: tensors.into_iter().collect(),
        };
        let mut convs = BTreeMap::new();
        for spec in conv_specs() {
            let slot = dict.conv(&spec)?;
            convs.insert(spec.name, slot);
        }
        let mut bns = Vec::new();
        for name in Self::bn_names() {
            bns.push(dict.batch_norm(&name.0, name.1)?);
        }
        let fc_weight = dict.take("fc.weight", None)?;
        let file_classes = fc_weight.size()[0];
        if fc_weight.size() != [file_classes, FEATURES] {
            return Err(dict.shape_error("fc.weight", &fc_weight, format!("[N, {FEATURES}]")));
        }
        let fc_bias = dict.take("fc.bias", Some(&[file_classes]))?;
        let fc = match num_classes {
            Some(n) if n < 1 => {
                return Err(Error::value("num_classes", format!("{n} (must be ≥ 1)")))
            }
            Some(n) if n != file_classes => Linear::new(FEATURES, n, device),
            _ => Linear {
                weight: fc_weight,
                bias: fc_bias,
            },
        };
        if let Some(key) = dict.tensors.keys().next() {
            return Err(Error::UnexpectedKey {
                path: path.to_path_buf(),
                key: key.clone(),
            });
        }
        let mut bns = bns.into_iter();
        Ok(Self::assemble(
            |name| convs.remove(name).expect("conv spec"),
            |_| bns.next().expect("bn names"),
            fc,
        ))
    }

    /// BN layer names and channel counts, in the order [`Self::assemble`] asks for them.
    fn bn_names() -> Vec<(String, i64)> {
        let mut v = vec![("bn1".to_string(), 64)];
        for spec in conv_specs().iter().skip(1) {
            let bn = if let Some(p) = spec.name.strip_suffix(".downsample.0") {
                format!("{p}.downsample.1")
            } else {
                spec.name.replace(".conv", ".bn")
            };
            v.push((bn, spec.shape[0]));
        }
        // assemble() asks per block: bn1, bn2, then the downsample BN, which is the order above.
        v
    }

    /// Saves every tensor as safetensors under the seed's state_dict names, atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .named_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.to_device(Device::Cpu).contiguous()))
            .collect();
        io::write_safetensors(path.as_ref(), &tensors)
    }
}

/// Tensors read from a file, consumed key by key as the model is built.
struct StateDict<'a> {
    path: &'a Path,
    device: Device,
    tensors: BTreeMap<String, Tensor>,
}

impl StateDict<'_> {
    fn shape_error(&self, key: &str, t: &Tensor, expected: String) -> Error {
        Error::Shape {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            found: t.size(),
            expected,
        }
    }

    /// Removes `key`, checks its shape when given, and moves it to the device as f32.
    fn take(&mut self, key: &str, shape: Option<&[i64]>) -> Result<Tensor> {
        let t = self.tensors.remove(key).ok_or_else(|| Error::MissingKey {
            path: self.path.to_path_buf(),
            key: key.to_string(),
        })?;
        if let Some(shape) = shape {
            if t.size() != shape {
                return Err(self.shape_error(key, &t, format!("{shape:?}")));
            }
        }
        if !t.is_floating_point() {
            return Err(Error::file(
                self.path,
                format!("tensor `{key}` is {:?}, expected floating point", t.kind()),
            ));
        }
        Ok(t.to_kind(Kind::Float).to_device(self.device))
    }

    fn batch_norm(&mut self, name: &str, c: i64) -> Result<BatchNorm> {
        let mut bn = BatchNorm::new(c, self.device);
        for (field, slot) in bn.tensors_mut() {
            let key = format!("{name}.{field}");
            if field == "num_batches_tracked" {
                // Optional, as in PyTorch's own loading of older checkpoints.
                if let Some(t) = self.tensors.remove(&key) {
                    *slot = t.to_kind(Kind::Int64).reshape([]).to_device(self.device);
                }
            } else {
                *slot = self.take(&key, Some(&[c]))?;
            }
        }
        Ok(bn)
    }

    fn conv(&mut self, spec: &ConvSpec) -> Result<ConvSlot> {
        let name = &spec.name;
        let [c_out, c_in, kh, kw] = spec.shape;
        if self.tensors.contains_key(&format!("{name}.weight")) {
            let weight = self.take(&format!("{name}.weight"), Some(&spec.shape))?;
            let bias = self.take_optional(&format!("{name}.bias"), &[c_out])?;
            return Ok(ConvSlot::Dense(Conv2d {
                weight,
                bias,
                config: spec.config,
            }));
        }
        if !self.tensors.contains_key(&format!("{name}.1.weight")) {
            return Err(Error::MissingKey {
                path: self.path.to_path_buf(),
                key: format!("{name}.weight"),
            });
        }
        if !self.tensors.contains_key(&format!("{name}.2.weight")) {
            return self.svd_conv(spec);
        }
        // Tucker-2: ranks come from the core's shape.
        let core_key = format!("{name}.1.weight");
        let core = self.take(&core_key, None)?;
        let s = core.size();
        if s.len() != 4
            || s[2] != kh
            || s[3] != kw
            || s[0] < 1
            || s[1] < 1
            || s[0] > c_out
            || s[1] > c_in
        {
            return Err(self.shape_error(
                &core_key,
                &core,
                format!("[r_out≤{c_out}, r_in≤{c_in}, {kh}, {kw}]"),
            ));
        }
        let (r_out, r_in) = (s[0], s[1]);
        let first = self.take(&format!("{name}.0.weight"), Some(&[r_in, c_in, 1, 1]))?;
        let last = self.take(&format!("{name}.2.weight"), Some(&[c_out, r_out, 1, 1]))?;
        let last_bias = self.take_optional(&format!("{name}.2.bias"), &[c_out])?;
        let pointwise = ConvConfig::default();
        Ok(ConvSlot::Tucker(TuckerConv {
            first: Conv2d {
                weight: first,
                bias: None,
                config: pointwise,
            },
            core: Conv2d {
                weight: core,
                bias: None,
                config: spec.config,
            },
            last: Conv2d {
                weight: last,
                bias: last_bias,
                config: pointwise,
            },
        }))
    }

    /// A 1×1 conv stored as its two SVD factors (`.0.weight`, `.1.weight`, `.1.bias`); the rank
    /// comes from the first factor's shape.
    fn svd_conv(&mut self, spec: &ConvSpec) -> Result<ConvSlot> {
        let name = &spec.name;
        let [c_out, c_in, kh, kw] = spec.shape;
        if kh != 1 || kw != 1 {
            // Only 1×1 convs have a two-layer form: a k×k one is Tucker-2 or dense.
            return Err(Error::MissingKey {
                path: self.path.to_path_buf(),
                key: format!("{name}.2.weight"),
            });
        }
        let first_key = format!("{name}.0.weight");
        let first = self.take(&first_key, None)?;
        let s = first.size();
        if s.len() != 4 || s[0] < 1 || s[0] > c_out.min(c_in) || s[1] != c_in || s[2..] != [1, 1] {
            return Err(self.shape_error(
                &first_key,
                &first,
                format!("[r≤{}, {c_in}, 1, 1]", c_out.min(c_in)),
            ));
        }
        let rank = s[0];
        let last = self.take(&format!("{name}.1.weight"), Some(&[c_out, rank, 1, 1]))?;
        let last_bias = self.take_optional(&format!("{name}.1.bias"), &[c_out])?;
        Ok(ConvSlot::Svd(SvdConv {
            first: Conv2d {
                weight: first,
                bias: None,
                config: spec.config,
            },
            last: Conv2d {
                weight: last,
                bias: last_bias,
                config: ConvConfig::default(),
            },
        }))
    }

    fn take_optional(&mut self, key: &str, shape: &[i64]) -> Result<Option<Tensor>> {
        if self.tensors.contains_key(key) {
            self.take(key, Some(shape)).map(Some)
        } else {
            Ok(None)
        }
    }
}
