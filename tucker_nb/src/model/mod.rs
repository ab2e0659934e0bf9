//! ResNet18 with torchvision's architecture and parameter names, as a plain struct tree whose
//! conv slots can be replaced in place (tch's own `vision::resnet` is a closure and cannot be).
//!
//! The tree is walked in one place, [`ResNet18::units`] (and its `_mut` form, the same walk): every
//! conv slot with the BN after it, named by a [`ParamPath`]. Names, state_dict order, loading,
//! saving, folding and compression all go through it. Files: torchvision's `resnet18-*.pth` (the
//! zip `torch.save` writes) and safetensors, dense or compressed (the seed's
//! `nn.Sequential(first, core, last)` key layout; ranks are read from the shapes); saved as
//! safetensors with exactly the seed's state_dict keys.

mod layers;
mod state_dict;

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::conv::{Conv2d, ConvConfig, ConvSlot};
use crate::error::Result;
use crate::io;
use crate::layout::{is_channels_last, laid_out, laid_out_like};
use crate::tensor_file;
pub use layers::{is_buffer, BatchNorm, Linear};

/// A module's place in the tree, as tch's `nn::Path`: every state_dict name is made by joining
/// parts onto one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParamPath(String);

impl ParamPath {
    pub fn root() -> Self {
        Self::default()
    }

    /// `self.part` (or `part` at the root).
    pub fn join(&self, part: impl Display) -> Self {
        if self.0.is_empty() {
            Self(part.to_string())
        } else {
            Self(format!("{}.{part}", self.0))
        }
    }

    pub fn name(&self) -> &str {
        &self.0
    }
}

impl Display for ParamPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
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

/// A dense conv slot with uninitialised weights, to be filled by an initialiser or a file.
fn empty_conv(shape: [i64; 4], stride: i64, padding: i64, device: Device) -> ConvSlot {
    ConvSlot::Dense(Conv2d {
        weight: Tensor::empty(shape, (Kind::Float, device)),
        bias: None,
        config: ConvConfig::new(stride, padding),
    })
}

impl BasicBlock {
    /// The block's layers, weights not yet initialised; a projection shortcut when the shape
    /// changes.
    fn empty(c_in: i64, c_out: i64, stride: i64, device: Device) -> Self {
        let bn = || BatchNorm::new(c_out, device);
        Self {
            conv1: empty_conv([c_out, c_in, 3, 3], stride, 1, device),
            bn1: bn(),
            conv2: empty_conv([c_out, c_out, 3, 3], 1, 1, device),
            bn2: bn(),
            downsample: (stride != 1 || c_in != c_out).then(|| Downsample {
                conv: empty_conv([c_out, c_in, 1, 1], stride, 0, device),
                bn: bn(),
            }),
        }
    }

    /// The block's output; `conv` runs each conv slot (in `units` order: conv1, conv2, the
    /// shortcut), so that an observer can see its input and output.
    fn forward(&self, x: &Tensor, train: bool, conv: &mut ConvRunner) -> Tensor {
        let out = self.bn1.forward(&conv(&self.conv1, x), train).relu();
        let out = self.bn2.forward(&conv(&self.conv2, &out), train);
        let identity = match &self.downsample {
            Some(d) => d.bn.forward(&conv(&d.conv, x), train),
            None => x.shallow_clone(),
        };
        (out + identity).relu()
    }
}

/// Runs a conv slot on an input during a forward pass.
type ConvRunner<'a> = dyn FnMut(&ConvSlot, &Tensor) -> Tensor + 'a;

/// Channels and first stride of ResNet18's four stages.
const STAGES: [(i64, i64); 4] = [(64, 1), (128, 2), (256, 2), (512, 2)];
const FEATURES: i64 = 512;
/// The stem's max pool: 3×3, stride 2, padding 1.
const MAX_POOL: ConvConfig = ConvConfig {
    stride: [2, 2],
    padding: [1, 1],
    dilation: [1, 1],
    groups: 1,
};

/// ResNet18 with torchvision's names: `conv1`, `bn1`, `layer1`…`layer4` (two blocks each), `fc`.
#[derive(Debug)]
pub struct ResNet18 {
    pub conv1: ConvSlot,
    pub bn1: BatchNorm,
    pub layers: [Vec<BasicBlock>; 4],
    pub fc: Linear,
}

/// A conv slot and the BN that normalises its output, under their state_dict names.
#[derive(Debug)]
pub struct Unit<C, B> {
    pub conv_name: String,
    pub conv: C,
    pub bn_name: String,
    pub bn: B,
    /// The resolution [H, W] the conv reads, for the image size the walk was given.
    pub input: [i64; 2],
}

/// The one walk of the tree, written once for shared and for mutable borrows: the stem, then per
/// block conv1/bn1, conv2/bn2 and the projection shortcut, in torchvision's state_dict order.
/// The one walk of the tree, written once for shared and for mutable borrows: the stem, then per
/// block conv1/bn1, conv2/bn2 and the projection shortcut, in torchvision's state_dict order,
/// following the data from an image of `image` = [H, W] to give each conv its input size.
macro_rules! walk_units {
    ($method:ident $(, $mut:tt)?) => {
        /// Every conv slot with the BN after it, under their state_dict names, in state_dict
        /// order, and the resolution each conv reads for an image of `image` = [H, W] (the one
        /// walk of the architecture).
        pub fn $method(
            &$($mut)? self,
            image: [i64; 2],
        ) -> Vec<Unit<&$($mut)? ConvSlot, &$($mut)? BatchNorm>> {
            let unit = |path: &ParamPath, conv: &str, bn: &str| (path.join(conv), path.join(bn));
            let root = ParamPath::root();
            let (c, b) = unit(&root, "conv1", "bn1");
            let mut x = MAX_POOL.output(self.conv1.macs(image).1, [3, 3]);
            let mut units = vec![Unit {
                conv_name: c.0,
                conv: &$($mut)? self.conv1,
                bn_name: b.0,
                bn: &$($mut)? self.bn1,
                input: image,
            }];
            for (stage, blocks) in (&$($mut)? self.layers).into_iter().enumerate() {
                let layer = root.join(format!("layer{}", stage + 1));
                for (index, block) in blocks.into_iter().enumerate() {
                    let path = layer.join(index);
                    let mid = block.conv1.macs(x).1;
                    let out = block.conv2.macs(mid).1;
                    for (conv, bn, c, b, input) in [
                        (&$($mut)? block.conv1, &$($mut)? block.bn1, "conv1", "bn1", x),
                        (&$($mut)? block.conv2, &$($mut)? block.bn2, "conv2", "bn2", mid),
                    ] {
                        let (c, b) = unit(&path, c, b);
                        units.push(Unit { conv_name: c.0, conv, bn_name: b.0, bn, input });
                    }
                    if let Some(d) = &$($mut)? block.downsample {
                        let (c, b) = unit(&path.join("downsample"), "0", "1");
                        units.push(Unit {
                            conv_name: c.0,
                            conv: &$($mut)? d.conv,
                            bn_name: b.0,
                            bn: &$($mut)? d.bn,
                            input: x,
                        });
                    }
                    x = out;
                }
            }
            units
        }
    };
}

/// The image size the plain walks ([`ResNet18::units`]) report input sizes for: the seed's.
const WALK_IMAGE: [i64; 2] = [224, 224];

impl ResNet18 {
    walk_units!(units_for);
    walk_units!(units_for_mut, mut);

    /// [`Self::units_for`] the seed's 224 px images.
    pub fn units(&self) -> Vec<Unit<&ConvSlot, &BatchNorm>> {
        self.units_for(WALK_IMAGE)
    }

    /// [`Self::units_for_mut`] the seed's 224 px images.
    pub fn units_mut(&mut self) -> Vec<Unit<&mut ConvSlot, &mut BatchNorm>> {
        self.units_for_mut(WALK_IMAGE)
    }

    /// The layers with uninitialised convs and classifier, BNs at PyTorch's initial state.
    fn empty(num_classes: i64, device: Device) -> Self {
        let mut c_in = 64;
        let layers = STAGES.map(|(c, first_stride)| {
            let first = BasicBlock::empty(c_in, c, first_stride, device);
            c_in = c;
            vec![first, BasicBlock::empty(c, c, 1, device)]
        });
        let opts = (Kind::Float, device);
        Self {
            conv1: empty_conv([64, 3, 7, 7], 2, 3, device),
            bn1: BatchNorm::new(64, device),
            layers,
            fc: Linear {
                weight: Tensor::empty([num_classes, FEATURES], opts),
                bias: Tensor::empty([num_classes], opts),
            },
        }
    }

    /// A randomly initialised model, as torchvision's `resnet18(num_classes=...)`: convs
    /// Kaiming-normal (fan_out, ReLU), BN weight 1 and bias 0, fc PyTorch's default.
    pub fn new(num_classes: i64, device: Device) -> Self {
        let mut model = Self::empty(num_classes, device);
        tch::no_grad(|| {
            for unit in model.units() {
                let [c_out, _, kh, kw] = unit.conv.dense_shape();
                let std = (2.0 / (c_out * kh * kw) as f64).sqrt();
                let weight = &unit.conv.parts()[0].weight;
                let _ = weight.shallow_clone().normal_(0.0, std);
            }
        });
        model.fc = Linear::new(FEATURES, num_classes, device);
        model
    }

    /// Logits for a batch N × 3 × H × W (normalised images). `train` selects batch statistics
    /// in BN and updates the running ones.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_with(x, train, &mut |slot, x| slot.forward(x))
    }

    /// [`Self::forward`], calling `observe(index, input, output)` for every conv slot, `index`
    /// being its place in [`Self::units`].
    pub fn forward_observed(
        &self,
        x: &Tensor,
        train: bool,
        observe: &mut dyn FnMut(usize, &Tensor, &Tensor),
    ) -> Tensor {
        let mut index = 0;
        self.forward_with(x, train, &mut |slot, x| {
            let y = slot.forward(x);
            observe(index, x, &y);
            index += 1;
            y
        })
    }

    fn forward_with(&self, x: &Tensor, train: bool, conv: &mut ConvRunner) -> Tensor {
        let mut x = self.bn1.forward(&conv(&self.conv1, x), train).relu();
        x = x.max_pool2d([3, 3], MAX_POOL.stride, MAX_POOL.padding, [1, 1], false);
        for block in self.layers.iter().flatten() {
            x = block.forward(&x, train, conv);
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
        self.units()
            .into_iter()
            .map(|u| (u.conv_name, u.conv))
            .collect()
    }

    /// The input resolution [H, W] each conv sees for an image of `image` = [H, W], by name.
    pub fn conv_input_sizes(&self, image: [i64; 2]) -> BTreeMap<String, [i64; 2]> {
        self.units_for(image)
            .into_iter()
            .map(|u| (u.conv_name, u.input))
            .collect()
    }

    /// Multiply-accumulates of all convs for one image of `image` = [H, W] (factorised layers at
    /// their true cost, the first 1×1 at its input's resolution).
    pub fn conv_macs(&self, image: [i64; 2]) -> i64 {
        let sizes = self.conv_input_sizes(image);
        self.conv_slots()
            .iter()
            .map(|(n, s)| s.macs(sizes[n]).0)
            .sum()
    }

    /// Shallow handles to every tensor under its state_dict name, in torchvision's order: writing
    /// through a handle (`copy_`, `set_requires_grad`) writes the model.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        for unit in self.units() {
            let conv = ParamPath(unit.conv_name);
            let bn = ParamPath(unit.bn_name);
            v.extend(
                unit.conv
                    .named_tensors()
                    .into_iter()
                    .map(|(n, t)| (conv.join(n).0, t)),
            );
            v.extend(unit.bn.named_tensors().map(|(n, t)| (bn.join(n).0, t)));
        }
        let fc = ParamPath::root().join("fc");
        v.push((fc.join("weight").0, self.fc.weight.shallow_clone()));
        v.push((fc.join("bias").0, self.fc.bias.shallow_clone()));
        v
    }

    /// Lays every conv weight out channels-last (NHWC strides, same shape and values) or back to
    /// contiguous NCHW. libtorch runs a conv channels-last when its weight is, and the BNs, ReLUs
    /// and adds after it keep that layout, so the whole network runs NHWC (oneDNN's and cuDNN's
    /// faster path: 1.04–1.7× on 2 CPU threads at 64 px, most for the compressed model).
    /// Layers that compression makes take the layout of the conv they replace.
    pub fn set_channels_last(&mut self, channels_last: bool) {
        tch::no_grad(|| {
            for (_, mut t) in self.named_tensors() {
                if t.dim() == 4 {
                    t.set_data(&laid_out(&t, channels_last));
                }
            }
        });
    }

    /// Whether the conv weights are laid out channels-last (the stem's says; see
    /// [`Self::set_channels_last`]).
    pub fn is_channels_last(&self) -> bool {
        self.conv1
            .parts()
            .iter()
            .all(|c| is_channels_last(&c.weight))
    }

    /// Folds each BN that follows a factorised conv into that conv's last 1×1 (for inference:
    /// eval-mode outputs stay the same, one BN pass less per factorised conv). Dense convs and
    /// their BNs are left alone: folding there would add a bias the seed's structure has no key
    /// for. Returns the folded BNs' names.
    pub fn fold_batch_norms(&mut self) -> Vec<String> {
        let mut folded = Vec::new();
        for unit in self.units_mut() {
            if !unit.conv.is_dense() && !unit.bn.folded {
                unit.bn.fold_into(unit.conv.output_layer_mut());
                folded.push(unit.bn_name);
            }
        }
        folded
    }

    /// Whether any BN is folded into its conv (the model is for inference: it does not train).
    pub fn has_folded_bn(&self) -> bool {
        self.units().iter().any(|u| u.bn.folded)
    }

    /// Resets the running statistics of every BN that is not folded (μ = 0, σ² = 1, no batches
    /// tracked), as `reset_running_stats()`; returns how many were reset.
    pub fn reset_bn_statistics(&self) -> usize {
        let bns: Vec<&BatchNorm> = self.units().into_iter().map(|u| u.bn).collect();
        let live: Vec<&&BatchNorm> = bns.iter().filter(|bn| !bn.folded).collect();
        tch::no_grad(|| {
            for bn in &live {
                let _ = bn.running_mean.shallow_clone().fill_(0.0);
                let _ = bn.running_var.shallow_clone().fill_(1.0);
                let _ = bn.num_batches_tracked.shallow_clone().fill_(0);
            }
        });
        live.len()
    }

    /// Sets every BN's momentum (the weight of a new batch in its running statistics).
    pub fn set_bn_momentum(&mut self, momentum: f64) {
        for unit in self.units_mut() {
            unit.bn.momentum = momentum;
        }
    }

    /// Total parameter count (BN running statistics excluded, as `model.parameters()`).
    pub fn num_params(&self) -> i64 {
        self.named_tensors()
            .iter()
            .filter(|(n, _)| !is_buffer(n))
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
        let mut copy = Self::build(
            Path::new("<in memory>"),
            tensors,
            self.forms(),
            None,
            self.device(),
        )
        .expect("a model's own tensors form a valid state_dict");
        for (mine, theirs) in self.units().iter().zip(copy.units_mut()) {
            theirs.bn.folded = mine.bn.folded;
        }
        tch::no_grad(|| {
            for ((_, mine), (_, mut theirs)) in
                self.named_tensors().into_iter().zip(copy.named_tensors())
            {
                if mine.dim() == 4 {
                    theirs.set_data(&laid_out_like(&theirs, &mine));
                }
            }
        });
        copy
    }

    /// Loads a state_dict file: torchvision's `.pth`/`.pt` (a `torch.save` zip) or
    /// `.safetensors`, dense or compressed. When `num_classes` differs from the file's
    /// classifier, `fc` is replaced by a freshly initialised one (as the seed does).
    pub fn load(path: impl AsRef<Path>, num_classes: Option<i64>, device: Device) -> Result<Self> {
        let path = path.as_ref();
        let tensors = io::read_state_dict(path)?;
        let forms = match path.extension().is_some_and(|e| e == "safetensors") {
            true => state_dict::forms_from_metadata(path, &tensor_file::read_metadata(path))?,
            false => BTreeMap::new(),
        };
        Self::build(path, tensors, forms, num_classes, device)
    }

    /// Builds the model from named tensors, each conv's form inferred from its keys and shapes;
    /// `path` only names the source in errors.
    pub fn from_state_dict(
        path: &Path,
        tensors: Vec<(String, Tensor)>,
        num_classes: Option<i64>,
        device: Device,
    ) -> Result<Self> {
        Self::build(path, tensors, BTreeMap::new(), num_classes, device)
    }

    /// Builds the model from named tensors, the convs named in `forms` in those forms.
    fn build(
        path: &Path,
        tensors: Vec<(String, Tensor)>,
        forms: BTreeMap<String, crate::conv::Form>,
        num_classes: Option<i64>,
        device: Device,
    ) -> Result<Self> {
        let mut dict = state_dict::StateDict::new(path, device, tensors, forms);
        let mut model = Self::empty(0, device);
        for unit in model.units_mut() {
            *unit.conv = dict.conv(&unit.conv_name, unit.conv.geometry())?;
        }
        for unit in model.units_mut() {
            *unit.bn = dict.batch_norm(&unit.bn_name, unit.bn.channels())?;
            // A folded file keeps each folded BN as the identity; it stays skipped in eval.
            unit.bn.folded = !unit.conv.is_dense() && unit.bn.is_folded_identity();
        }
        model.fc = dict.linear("fc", FEATURES, num_classes)?;
        dict.finish()?;
        Ok(model)
    }

    /// Saves every tensor as safetensors under the seed's state_dict names, atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .named_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.to_device(Device::Cpu).contiguous()))
            .collect();
        let metadata = state_dict::forms_metadata(self.forms());
        io::write_safetensors_with(path.as_ref(), &tensors, &metadata)
    }

    /// Every conv slot's form, by name.
    pub fn forms(&self) -> BTreeMap<String, crate::conv::Form> {
        self.conv_slots()
            .into_iter()
            .map(|(name, slot)| (name, slot.form()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_torchvisions_state_dict_order() {
        let model = ResNet18::new(10, Device::Cpu);
        let names: Vec<String> = model.named_tensors().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 122);
        assert_eq!(
            &names[..7],
            [
                "conv1.weight",
                "bn1.weight",
                "bn1.bias",
                "bn1.running_mean",
                "bn1.running_var",
                "bn1.num_batches_tracked",
                "layer1.0.conv1.weight"
            ]
        );
        assert!(names.contains(&"layer2.0.downsample.0.weight".to_string()));
        assert!(names.contains(&"layer2.0.downsample.1.running_var".to_string()));
        assert_eq!(names[names.len() - 2..], ["fc.weight", "fc.bias"]);
        let sizes = model.conv_input_sizes([224, 224]);
        assert_eq!(sizes["conv1"], [224, 224]);
        assert_eq!(sizes["layer1.0.conv1"], [56, 56]);
        assert_eq!(sizes["layer2.0.conv2"], [28, 28]);
        assert_eq!(sizes["layer4.0.downsample.0"], [14, 14]);
        assert_eq!(model.conv_macs([224, 224]), 1_813_561_344);
    }

    #[test]
    fn channels_last_changes_the_layout_not_the_model() {
        let mut model = ResNet18::new(10, Device::Cpu);
        let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let logits = |m: &ResNet18| tch::no_grad(|| m.forward(&x, false));
        let close = |a: &Tensor, b: &Tensor| {
            let err = crate::decompose::relative_error(a, b);
            assert!(err < 1e-5, "rel. error {err}");
        };
        let reference = logits(&model);
        model.set_channels_last(true);
        assert!(model.is_channels_last());
        close(&reference, &logits(&model));
        // Every conv's output is NHWC too: the whole network runs channels-last.
        let _ = tch::no_grad(|| {
            model.forward_observed(&x, false, &mut |i, _, y| {
                assert!(
                    is_channels_last(y),
                    "conv {i}'s output is not channels-last"
                );
            })
        });

        // Compression lays its layers out as the convs they replace; copies keep the layout.
        let policy = crate::CompressionPolicy::new(crate::RankPolicy::ratio(0.5).unwrap());
        crate::compress_model(&mut model, &policy).unwrap();
        let compressed = logits(&model);
        let copy = model.deep_copy();
        for m in [&model, &copy] {
            for (name, t) in m.named_tensors() {
                let spatial = t.dim() == 4 && t.size()[2..] != [1, 1];
                assert!(
                    !spatial || is_channels_last(&t),
                    "{name} is not channels-last"
                );
            }
        }
        close(&compressed, &logits(&copy));
        model.set_channels_last(false);
        assert!(!model.is_channels_last());
        assert!(model.named_tensors().iter().all(|(_, t)| t.is_contiguous()));
        close(&compressed, &logits(&model));
    }

    #[test]
    fn handles_write_through_to_the_model() {
        let model = ResNet18::new(10, Device::Cpu);
        let (name, fc_bias) = model.named_tensors().pop().unwrap();
        assert_eq!(name, "fc.bias");
        let _ = fc_bias.shallow_clone().fill_(3.0);
        assert_eq!(model.fc.bias.double_value(&[0]), 3.0);
    }
}
