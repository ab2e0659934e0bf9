//! Tensors read from a file, consumed key by key as the model is built: each layer takes its own
//! keys (checking shapes and dtypes); whatever is left at the end is an unexpected key.
//!
//! Files tucker_nb writes say each conv's form in their safetensors metadata
//! ([`FORMS_KEY`]); a conv is then read in that form and its tensors must agree. Files without it
//! (torchvision's, tucker_nb's before the metadata, other tools') have each form inferred from
//! the keys present and the kernels' shapes.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::{BatchNorm, Linear, ParamPath};
use crate::conv::{Conv2d, ConvGeometry, ConvSlot, CpConv, Form, TuckerConv, TwoLayerConv};
use crate::error::{Error, Result};

/// The metadata key whose value (JSON) maps each conv slot to its [`FormRecord`].
pub const FORMS_KEY: &str = "tucker_nb.forms";

/// A conv slot's form as the metadata records it: `{"form": "tucker2", "ranks": [r_out, r_in]}`
/// ([`Form::name`], [`Form::ranks`]; no ranks when dense).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FormRecord {
    pub form: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks: Option<(i64, i64)>,
}

/// The metadata that says every slot's form, for `slots` (name, form).
pub fn forms_metadata(slots: impl IntoIterator<Item = (String, Form)>) -> BTreeMap<String, String> {
    let records: BTreeMap<String, FormRecord> = slots
        .into_iter()
        .map(|(name, form)| {
            let record = FormRecord {
                form: form.name().into(),
                ranks: form.ranks(),
            };
            (name, record)
        })
        .collect();
    let json = serde_json::to_string(&records).expect("serialisable");
    BTreeMap::from([(FORMS_KEY.to_string(), json)])
}

/// The forms `metadata` says (none when it has no [`FORMS_KEY`]); an unreadable record is an
/// error naming `path` and the layer.
pub fn forms_from_metadata(
    path: &Path,
    metadata: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, Form>> {
    let Some(json) = metadata.get(FORMS_KEY) else {
        return Ok(BTreeMap::new());
    };
    let records: BTreeMap<String, FormRecord> = serde_json::from_str(json).map_err(|e| {
        Error::file(
            path,
            format!("metadata `{FORMS_KEY}` is not {{layer: {{form, ranks}}}}: {e}"),
        )
    })?;
    records
        .into_iter()
        .map(|(layer, r)| match Form::from_name(&r.form, r.ranks) {
            Some(form) => Ok((layer, form)),
            None => Err(Error::file(
                path,
                format!(
                    "metadata `{FORMS_KEY}` gives layer {layer} the form {:?} with ranks {:?}, \
                     which is none of dense, tucker2, svd, tucker1-out, tucker1-in",
                    r.form, r.ranks
                ),
            )),
        })
        .collect()
}

pub(super) struct StateDict<'a> {
    path: &'a Path,
    device: Device,
    tensors: BTreeMap<String, Tensor>,
    /// The forms the file says; a slot not named here has its form inferred.
    forms: BTreeMap<String, Form>,
}

fn key(layer: &str, tensor: impl std::fmt::Display) -> String {
    ParamPath(layer.to_string()).join(tensor).0
}

impl<'a> StateDict<'a> {
    pub(super) fn new(
        path: &'a Path,
        device: Device,
        tensors: Vec<(String, Tensor)>,
        forms: BTreeMap<String, Form>,
    ) -> Self {
        Self {
            path,
            device,
            tensors: tensors.into_iter().collect(),
            forms,
        }
    }

    fn shape_error(&self, key: &str, t: &Tensor, expected: String) -> Error {
        Error::Shape {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            found: t.size(),
            expected,
        }
    }

    fn missing(&self, key: String) -> Error {
        Error::MissingKey {
            path: self.path.to_path_buf(),
            key,
        }
    }

    /// Removes `key`, checks its shape when given, and moves it to the device as f32.
    fn take(&mut self, key: &str, shape: Option<&[i64]>) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(key)
            .ok_or_else(|| self.missing(key.to_string()))?;
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
        // A NaN or infinity would only surface later, deep inside an SVD or as a NaN loss.
        let finite = t
            .f_isfinite()
            .and_then(|f| f.f_all())
            .map(|a| a.int64_value(&[]) == 1);
        if !finite.map_err(Error::Torch)? {
            return Err(Error::file(
                self.path,
                format!("tensor `{key}` holds NaN or infinite values"),
            ));
        }
        Ok(t.to_kind(Kind::Float).to_device(self.device))
    }

    fn take_optional(&mut self, key: &str, shape: &[i64]) -> Result<Option<Tensor>> {
        if self.tensors.contains_key(key) {
            self.take(key, Some(shape)).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Takes a 4-way kernel whose shape `fits`, else a shape error describing `expected`.
    fn take_kernel(
        &mut self,
        key: &str,
        fits: impl Fn(&[i64]) -> bool,
        expected: String,
    ) -> Result<Tensor> {
        let t = self.take(key, None)?;
        let s = t.size();
        if s.len() != 4 || !fits(&s) {
            return Err(self.shape_error(key, &t, expected));
        }
        Ok(t)
    }

    pub(super) fn batch_norm(&mut self, name: &str, c: i64) -> Result<BatchNorm> {
        let bn = BatchNorm::new(c, self.device);
        for (field, slot) in bn.named_tensors() {
            let key = key(name, field);
            let value = if field == "num_batches_tracked" {
                // Optional, as in PyTorch's own loading of older checkpoints.
                match self.tensors.remove(&key) {
                    Some(t) if t.numel() == 1 && !t.is_floating_point() => {
                        t.to_kind(Kind::Int64).reshape([]).to_device(self.device)
                    }
                    Some(t) => {
                        let expected = "[] (one integer)".to_string();
                        return Err(self.shape_error(&key, &t, expected));
                    }
                    None => continue,
                }
            } else {
                self.take(&key, Some(&[c]))?
            };
            tch::no_grad(|| slot.shallow_clone().copy_(&value));
        }
        Ok(bn)
    }

    /// The classifier; a fresh one for `num_classes` when the file has another count.
    pub(super) fn linear(
        &mut self,
        name: &str,
        features: i64,
        num_classes: Option<i64>,
    ) -> Result<Linear> {
        let weight_key = key(name, "weight");
        let weight = self.take(&weight_key, None)?;
        let file_classes = match weight.size()[..] {
            [n, f] if f == features && n >= 1 => n,
            _ => {
                let expected = format!("[N, {features}]");
                return Err(self.shape_error(&weight_key, &weight, expected));
            }
        };
        let bias = self.take(&key(name, "bias"), Some(&[file_classes]))?;
        match num_classes {
            Some(n) if n < 1 => Err(Error::value("num_classes", format!("{n} (must be ≥ 1)"))),
            Some(n) if n != file_classes => Ok(Linear::new(features, n, self.device)),
            _ => Ok(Linear { weight, bias }),
        }
    }

    /// Fails on the first key no layer took, or a form recorded for no conv of the model.
    pub(super) fn finish(self) -> Result<()> {
        if let Some(layer) = self.forms.into_keys().next() {
            return Err(Error::file(
                self.path,
                format!("metadata `{FORMS_KEY}` names {layer}, which is no conv of a ResNet18"),
            ));
        }
        match self.tensors.into_keys().next() {
            Some(key) => Err(Error::UnexpectedKey {
                path: self.path.to_path_buf(),
                key,
            }),
            None => Ok(()),
        }
    }

    /// A conv slot of `geometry`: dense (`NAME.weight`), Tucker-2 (`NAME.{0,1,2}.weight`), two
    /// layers (`NAME.{0,1}.weight`: a 1×1 conv's SVD or a k×k conv's Tucker-1) or CP
    /// (`NAME.{0,1,2,3}.weight`, the middle two depthwise). Read in the form
    /// the file's metadata says, which its tensors must have; else told apart by the keys present
    /// and their shapes.
    pub(super) fn conv(&mut self, name: &str, geometry: ConvGeometry) -> Result<ConvSlot> {
        let Some(said) = self.forms.remove(name) else {
            return self.inferred_conv(name, geometry);
        };
        let slot = match said {
            Form::Dense => self.dense_conv(name, geometry),
            Form::Tucker2 { .. } => self.tucker_conv(name, geometry),
            Form::Svd { .. } => self.svd_conv(name, geometry),
            Form::Tucker1Out { .. } => self.tucker1_conv(name, geometry, true),
            Form::Tucker1In { .. } => self.tucker1_conv(name, geometry, false),
            Form::Cp { .. } => self.cp_conv(name, geometry),
        }?;
        let found = slot.form();
        if found != said {
            return Err(Error::layer(
                name,
                format!(
                    "{}: the metadata says {} {:?}, the tensors are {} {:?}",
                    self.path.display(),
                    said.name(),
                    said.ranks(),
                    found.name(),
                    found.ranks()
                ),
            ));
        }
        Ok(slot)
    }

    /// A conv slot whose form the keys present and their shapes tell.
    fn inferred_conv(&mut self, name: &str, geometry: ConvGeometry) -> Result<ConvSlot> {
        if self.tensors.contains_key(&key(name, "weight")) {
            return self.dense_conv(name, geometry);
        }
        if !self.tensors.contains_key(&key(name, "1.weight")) {
            return Err(self.missing(key(name, "weight")));
        }
        if !self.tensors.contains_key(&key(name, "2.weight")) {
            return self.two_layer_conv(name, geometry);
        }
        if self.tensors.contains_key(&key(name, "3.weight")) {
            return self.cp_conv(name, geometry);
        }
        self.tucker_conv(name, geometry)
    }

    fn dense_conv(&mut self, name: &str, geometry: ConvGeometry) -> Result<ConvSlot> {
        let [c_out, _, _, _] = geometry.shape;
        let weight = self.take(&key(name, "weight"), Some(&geometry.shape))?;
        let bias = self.take_optional(&key(name, "bias"), &[c_out])?;
        Ok(ConvSlot::Dense(Conv2d {
            weight,
            bias,
            config: geometry.config,
        }))
    }

    /// The layer `NAME.INDEX` that produces a factorisation's output: its C_out × rank × 1 × 1
    /// weight and its bias, if stored.
    fn output_layer(
        &mut self,
        name: &str,
        index: usize,
        c_out: i64,
        rank: i64,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let layer = key(name, index);
        let weight = self.take(&key(&layer, "weight"), Some(&[c_out, rank, 1, 1]))?;
        let bias = self.take_optional(&key(&layer, "bias"), &[c_out])?;
        Ok((weight, bias))
    }

    /// Tucker-2: the ranks come from the core's shape.
    fn tucker_conv(&mut self, name: &str, geometry: ConvGeometry) -> Result<ConvSlot> {
        let [c_out, c_in, kh, kw] = geometry.shape;
        let core = self.take_kernel(
            &key(name, "1.weight"),
            |s| {
                s[2] == kh
                    && s[3] == kw
                    && (1..=c_out).contains(&s[0])
                    && (1..=c_in).contains(&s[1])
            },
            format!("[r_out≤{c_out}, r_in≤{c_in}, {kh}, {kw}]"),
        )?;
        let (r_out, r_in) = (core.size()[0], core.size()[1]);
        let first = self.take(&key(name, "0.weight"), Some(&[r_in, c_in, 1, 1]))?;
        let (last, bias) = self.output_layer(name, 2, c_out, r_out)?;
        let tucker = TuckerConv::new(first, core, last, bias, geometry.config);
        Ok(ConvSlot::Tucker(tucker))
    }

    /// A conv stored as two layers (`.0.weight`, `.1.weight`, `.1.bias`): a 1×1 conv's SVD, or a
    /// k×k conv's Tucker-1, on the output mode when the first layer has the k×k kernel, else on the
    /// input mode; the rank comes from the first layer's shape.
    fn two_layer_conv(&mut self, name: &str, geometry: ConvGeometry) -> Result<ConvSlot> {
        let [_, _, kh, kw] = geometry.shape;
        if geometry.is_pointwise() {
            return self.svd_conv(name, geometry);
        }
        let spatial_first = self
            .tensors
            .get(&key(name, "0.weight"))
            .is_some_and(|t| t.dim() == 4 && t.size()[2..] == [kh, kw]);
        self.tucker1_conv(name, geometry, spatial_first)
    }

    /// A k×k conv's Tucker-1: on the output mode (`spatial_first`: `.0` has the k×k kernel) or
    /// the input mode (`.1` has it).
    fn tucker1_conv(
        &mut self,
        name: &str,
        geometry: ConvGeometry,
        spatial_first: bool,
    ) -> Result<ConvSlot> {
        let [c_out, c_in, kh, kw] = geometry.shape;
        let first_key = key(name, "0.weight");
        let conv = if spatial_first {
            let first = self.take_kernel(
                &first_key,
                |s| (1..=c_out).contains(&s[0]) && s[1] == c_in && s[2..] == [kh, kw],
                format!("[r_out≤{c_out}, {c_in}, {kh}, {kw}]"),
            )?;
            let (last, bias) = self.output_layer(name, 1, c_out, first.size()[0])?;
            TwoLayerConv {
                first: Conv2d {
                    weight: first,
                    bias: None,
                    config: geometry.config,
                },
                last: Conv2d::pointwise(last, bias),
            }
        } else {
            let first = self.take_kernel(
                &first_key,
                |s| (1..=c_in).contains(&s[0]) && s[1] == c_in && s[2..] == [1, 1],
                format!("[r_in≤{c_in}, {c_in}, 1, 1] or [r_out≤{c_out}, {c_in}, {kh}, {kw}]"),
            )?;
            let rank = first.size()[0];
            let last_key = key(name, "1");
            let last = self.take(&key(&last_key, "weight"), Some(&[c_out, rank, kh, kw]))?;
            let bias = self.take_optional(&key(&last_key, "bias"), &[c_out])?;
            TwoLayerConv {
                first: Conv2d::pointwise(first, None),
                last: Conv2d {
                    weight: last,
                    bias,
                    config: geometry.config,
                },
            }
        };
        Ok(ConvSlot::TwoLayer(conv))
    }

    /// A k×k conv's CP: `.0` R × C_in × 1 × 1, `.1` R × 1 × kh × 1 and `.2` R × 1 × 1 × kw (depthwise),
    /// `.3` C_out × R × 1 × 1 with its bias; the rank comes from the first layer's shape.
    fn cp_conv(&mut self, name: &str, geometry: ConvGeometry) -> Result<ConvSlot> {
        let [c_out, c_in, kh, kw] = geometry.shape;
        if geometry.is_pointwise() {
            return Err(Error::layer(
                name,
                format!(
                    "{}: a CP factorisation needs a k×k conv, not 1×1",
                    self.path.display()
                ),
            ));
        }
        let first = self.take_kernel(
            &key(name, "0.weight"),
            |s| s[0] >= 1 && s[1] == c_in && s[2..] == [1, 1],
            format!("[R, {c_in}, 1, 1]"),
        )?;
        let rank = first.size()[0];
        let vertical = self.take(&key(name, "1.weight"), Some(&[rank, 1, kh, 1]))?;
        let horizontal = self.take(&key(name, "2.weight"), Some(&[rank, 1, 1, kw]))?;
        let (last, bias) = self.output_layer(name, 3, c_out, rank)?;
        let kernels = [first, vertical, horizontal, last];
        Ok(ConvSlot::Cp(CpConv::new(kernels, bias, geometry.config)))
    }

    /// A 1×1 conv stored as its two SVD factors (`.0.weight`, `.1.weight`, `.1.bias`); the rank
    /// comes from the first factor's shape.
    fn svd_conv(&mut self, name: &str, geometry: ConvGeometry) -> Result<ConvSlot> {
        let [c_out, c_in, _, _] = geometry.shape;
        let max = c_out.min(c_in);
        let first = self.take_kernel(
            &key(name, "0.weight"),
            |s| (1..=max).contains(&s[0]) && s[1] == c_in && s[2..] == [1, 1],
            format!("[r≤{max}, {c_in}, 1, 1]"),
        )?;
        let (last, bias) = self.output_layer(name, 1, c_out, first.size()[0])?;
        Ok(ConvSlot::TwoLayer(TwoLayerConv::new(
            first,
            last,
            bias,
            geometry.config,
        )))
    }
}
