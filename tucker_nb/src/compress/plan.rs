//! Per-layer planning: what the planner knows of each conv ([`LayerFacts`]: shape, where it runs,
//! the spectra of the kernel it computes now, what it costs now), the rules every policy shares
//! (the RGB stem keeps its input; 1×1 convs become SVDs under data-driven policies; a layer is left
//! as it is when factorising would not cut its MACs), and the choices of the rule-based (ratio,
//! explicit) and spectral (energy, VBMF) policies. Budgets live in `budget.rs`, which builds on this.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::compress::cost::SlotCost;
use crate::compress::policy::{CompressionPolicy, RankPolicy};
use crate::compress::spectra::{energy_rank, evbmf_rank};
use crate::conv::{ConvGeometry, ConvSlot, Form};
use crate::decompose::{
    cp_als, relative_error, relative_output_error, ActivationMoments, CpFactors, CpOptions,
    KernelSpectra, RankPairEnergy,
};
use crate::error::{Error, Result};

/// Convs reading at most this many channels (the image) keep their full input rank.
const RGB: i64 = 3;
const RGB_NOTE: &str = "RGB input kept at full rank";

/// What the planner decided for one conv.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlan {
    /// The factorisation to apply; `None`: the slot stays as it is (dense, or as factorised by an
    /// earlier stage).
    pub form: Option<Form>,
    /// Why, when the decision is not simply the policy's rule.
    pub note: String,
    /// Under a latency budget, the slot's predicted ms as it was and as planned.
    pub predicted_ms: Option<[f64; 2]>,
}

/// A conv slot as the planner sees it: its name, the slot, and its input resolution.
pub type SlotAt<'a> = (String, &'a ConvSlot, [i64; 2]);

/// The RGB-stem rule: whether a conv of dense shape `shape` reads the image.
fn reads_image(shape: [i64; 4]) -> bool {
    shape[1] <= RGB
}

/// The seed's ratio rule, `max(1, int(C · ratio))` per mode, except the RGB-stem rule.
pub fn ratio_ranks(ratio: f64, shape: [i64; 4]) -> (i64, i64) {
    let [c_out, c_in, _, _] = shape;
    let rank = |c: i64| ((c as f64 * ratio) as i64).max(1);
    let r_in = if reads_image(shape) { c_in } else { rank(c_in) };
    (rank(c_out), r_in)
}

/// Checks explicit or computed ranks against a conv's channels; the error names the layer.
pub fn check_ranks(layer: &str, [c_out, c_in]: [i64; 2], (r_out, r_in): (i64, i64)) -> Result<()> {
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

/// The rule-based policies (ratio, explicit ranks): Tucker-2 on the dense convs, like the seed;
/// CP (`cp:R`): CP on the k×k ones, SVD on the 1×1s, the RGB stem dense unless asked. Already
/// factorised slots are left as they are. `round_to` rounds the ratio and CP rules' ranks up
/// (explicit ranks are taken as given).
pub fn plan_rule_based(
    slots: &[SlotAt],
    policy: &RankPolicy,
    round_to: Option<i64>,
) -> Result<BTreeMap<String, LayerPlan>> {
    if let RankPolicy::Explicit(ranks) = policy {
        if let Some(unknown) = ranks.keys().find(|k| !slots.iter().any(|s| &s.0 == *k)) {
            return Err(Error::layer(
                unknown.clone(),
                "no such conv layer in ResNet18",
            ));
        }
    }
    let mut plans = BTreeMap::new();
    for (name, slot, _) in slots.iter().filter(|s| s.1.is_dense()) {
        let shape = slot.dense_shape();
        if let RankPolicy::Cp { fraction, stem } = policy {
            plans.insert(
                name.clone(),
                cp_rule(shape, fraction.get(), *stem, round_to),
            );
            continue;
        }
        let (ranks, note) = match policy {
            RankPolicy::Ratio(ratio) => {
                let note = if reads_image(shape) { RGB_NOTE } else { "" };
                let (r_out, r_in) = ratio_ranks(ratio.get(), shape);
                let ranks = (
                    round_rank(r_out, round_to, shape[0]),
                    round_rank(r_in, round_to, shape[1]),
                );
                (ranks, note)
            }
            RankPolicy::Explicit(ranks) => match ranks.get(name) {
                Some(&r) => (r, ""),
                None => continue,
            },
            _ => unreachable!("only rule-based policies are planned here"),
        };
        check_ranks(name, [shape[0], shape[1]], ranks)?;
        let (r_out, r_in) = ranks;
        let plan = LayerPlan {
            form: Some(Form::Tucker2 { r_out, r_in }),
            note: note.into(),
            predicted_ms: None,
        };
        plans.insert(name.clone(), plan);
    }
    Ok(plans)
}

/// The `cp:R` rule for a dense conv of `shape`: rank max(1, ⌊R · min(C_in, C_out)⌋) (rounded up to
/// `round_to`), CP for a k×k conv, SVD for a 1×1 one (dense where the SVD would cost more: above
/// about 2/3 of min(C_in, C_out)); the RGB stem stays dense unless `stem`.
fn cp_rule(shape: [i64; 4], fraction: f64, stem: bool, round_to: Option<i64>) -> LayerPlan {
    let [c_out, c_in, kh, kw] = shape;
    let max = c_out.min(c_in);
    let rank = round_rank(((max as f64 * fraction) as i64).max(1), round_to, max);
    let (form, note) = if [kh, kw] == [1, 1] {
        match (c_in + c_out) * rank < c_in * c_out {
            true => (
                Some(Form::Svd { rank }),
                "1×1: its SVD at the CP rule's rank",
            ),
            false => (
                None,
                "left dense: its SVD at the CP rule's rank would not cut its MACs",
            ),
        }
    } else if reads_image(shape) && !stem {
        (None, "RGB stem left dense (cp:R+stem includes it)")
    } else {
        (Some(Form::Cp { rank }), "")
    };
    LayerPlan {
        form,
        note: note.into(),
        predicted_ms: None,
    }
}

/// What planning needs to know of a conv slot: its shape, where it runs, the spectra of the
/// kernel it computes now, what each factorisation of it would lose, and what it costs now.
pub struct LayerFacts {
    pub name: String,
    pub geometry: ConvGeometry,
    pub input: [i64; 2],
    /// The kernel's spectra and bases, for the rank policies and for fitting the chosen form.
    pub spectra: KernelSpectra,
    norm2: f64,
    /// The exact error of every rank pair, on calibration data when the plan has it.
    energy: RankPairEnergy,
    /// Whether `energy` measures the output error on calibration data (else the kernel error).
    pub on_data: bool,
    /// What the slot costs as it is (dense, or factorised by an earlier stage).
    pub current: SlotCost,
    is_dense: bool,
    /// The kernel the slot computes now.
    weight: Tensor,
    /// CP fits of the kernel by rank, when the policy prices CP ([`Self::fit_cp`]).
    pub cp: BTreeMap<i64, CpFit>,
}

/// The ALS sweeps a budget's CP fit of each grid rank runs before it is priced: a quarter of a
/// full fit (most of the error falls in the first sweeps); the fit of the rank chosen is continued
/// to the full count when the model is compressed, so a CP layer ends no worse than priced.
pub const CP_PLAN_SWEEPS: usize = 25;

/// A CP fit of a layer at one rank, and what it loses.
#[derive(Debug)]
pub struct CpFit {
    pub factors: CpFactors,
    /// The relative squared error: the output error on calibration data when the facts have
    /// it, else the kernel error.
    pub error: f64,
}

impl LayerFacts {
    /// The facts of a slot; `moments` (its activations on calibration data) make the errors
    /// output errors.
    pub fn new((name, slot, input): &SlotAt, moments: Option<&ActivationMoments>) -> Self {
        let weight = slot.dense_weight().detach();
        let spectra = KernelSpectra::of(&weight);
        Self {
            name: name.clone(),
            geometry: slot.geometry(),
            input: *input,
            norm2: weight.square().sum(Kind::Double).double_value(&[]),
            energy: spectra.rank_pair_energy(&weight, moments),
            spectra,
            on_data: moments.is_some(),
            current: SlotCost {
                form: slot.form(),
                macs: slot.macs(*input).0,
                params: slot.num_params(),
            },
            is_dense: slot.is_dense(),
            weight,
            cp: BTreeMap::new(),
        }
    }

    /// Fits CP at each of `ranks` by ALS ([`cp_als`], [`CP_PLAN_SWEEPS`] sweeps: compression
    /// continues the chosen rank's fit), and measures each fit's error like the other forms' (on
    /// the calibration data's `moments` when given).
    pub fn fit_cp(&mut self, ranks: &[i64], moments: Option<&ActivationMoments>) {
        let options = CpOptions {
            max_iterations: CP_PLAN_SWEEPS,
            ..CpOptions::default()
        };
        for &rank in ranks {
            let factors = cp_als(&self.weight, rank, options);
            let approx = factors.reconstruct();
            let error = match moments {
                Some(m) => relative_output_error(&self.weight, &approx, &m.input),
                None => relative_error(&self.weight, &approx),
            };
            let error = error * error;
            self.cp.insert(rank, CpFit { factors, error });
        }
    }

    /// Whether CP can replace this conv: a k×k kernel not reading the image.
    pub fn takes_cp(&self) -> bool {
        !self.geometry.is_pointwise() && !self.reads_image()
    }

    pub fn shape(&self) -> [i64; 4] {
        self.geometry.shape
    }

    /// How the report says a slot was not changed.
    pub fn unchanged(&self) -> &'static str {
        if self.is_dense {
            "left dense"
        } else {
            "left as it is"
        }
    }

    /// Whether the RGB-stem rule keeps this conv's input rank.
    pub fn reads_image(&self) -> bool {
        reads_image(self.shape())
    }

    /// Data-driven policies factorise 1×1 convs (except one reading the image) as two-layer SVDs.
    pub fn takes_svd(&self) -> bool {
        self.geometry.is_pointwise() && !self.reads_image()
    }

    /// The form for ranks a policy wants: an SVD of rank `r_out` when [`Self::takes_svd`], else
    /// Tucker-2 with the RGB-stem rule applied to `r_in`.
    pub fn form(&self, r_out: i64, r_in: i64) -> Form {
        if self.takes_svd() {
            Form::Svd { rank: r_out }
        } else if self.reads_image() {
            Form::Tucker2 {
                r_out,
                r_in: self.shape()[1],
            }
        } else {
            Form::Tucker2 { r_out, r_in }
        }
    }

    pub fn macs(&self, form: Form) -> i64 {
        form.macs(&self.geometry, self.input).0
    }

    pub fn params(&self, form: Form) -> i64 {
        form.params(self.shape())
    }

    /// The relative squared error of a factorisation of the current kernel, exact for the pair of
    /// ranks ([`RankPairEnergy`]): the output error on calibration data for the data fit, else
    /// the kernel error of HOSVD (HOOI only does better); a CP's is its fit's ([`Self::fit_cp`]).
    ///
    /// # Panics
    /// For a CP rank that was not fitted (the budget only prices fitted ranks).
    pub fn error(&self, form: Form) -> f64 {
        match form {
            Form::Dense => 0.0,
            Form::Tucker2 { r_out, r_in } => self.energy.tucker2_error(r_out, r_in),
            Form::Svd { rank } => self.energy.svd_error(rank),
            Form::Tucker1Out { r_out, c_in } => self.energy.tucker2_error(r_out, c_in),
            Form::Tucker1In { c_out, r_in } => self.energy.tucker2_error(c_out, r_in),
            Form::Cp { rank } => match self.cp.get(&rank) {
                Some(fit) => fit.error,
                None => panic!("{}: CP at rank {rank} was priced but not fitted", self.name),
            },
        }
    }

    /// `form`, or the slot as it is (with a note saying why) when `form` would not cut its MACs.
    pub fn unless_not_cheaper(&self, form: Form, mut notes: Vec<String>) -> LayerPlan {
        if self.macs(form) >= self.current.macs {
            let ranks = form.ranks().expect("a factorisation");
            notes.push(format!(
                "{}: {} at {ranks:?} would not cut its MACs",
                self.unchanged(),
                form.name()
            ));
            return LayerPlan {
                form: None,
                note: notes.join("; "),
                predicted_ms: None,
            };
        }
        if self.reads_image() && !self.takes_svd() {
            notes.push(RGB_NOTE.into());
        }
        LayerPlan {
            form: Some(form),
            note: notes.join("; "),
            predicted_ms: None,
        }
    }

    /// The note of a budget choice: the price's outcome, and the RGB rule where it applied.
    pub fn budget_note(&self, form: Option<Form>, head: String) -> String {
        match form {
            None => format!("{head}; {}: cheapest under this price", self.unchanged()),
            Some(Form::Tucker1Out { .. }) => {
                format!("{head}; Tucker-1 on the output mode: the input kept whole, no 1×1 on it")
            }
            Some(Form::Tucker1In { .. }) => {
                format!("{head}; Tucker-1 on the input mode: the output kept whole, no 1×1 after")
            }
            Some(Form::Cp { .. }) => {
                format!("{head}; CP: its fitted error costs less here than any Tucker option's")
            }
            Some(_) if self.reads_image() => format!("{head}; {RGB_NOTE}"),
            Some(_) => head,
        }
    }
}

/// `r` rounded up to a multiple of `multiple` (when given), within 1..=dim.
pub fn round_rank(r: i64, multiple: Option<i64>, dim: i64) -> i64 {
    match multiple {
        Some(m) if m > 1 => ((r + m - 1) / m * m).min(dim),
        _ => r,
    }
    .clamp(1, dim)
}

/// The spectral policies (energy, VBMF): each mode's rank from its own singular values.
pub fn plan_spectral(
    facts: &[LayerFacts],
    policy: &CompressionPolicy,
) -> BTreeMap<String, LayerPlan> {
    let round = |r: i64, dim: i64| round_rank(r, policy.round_to, dim);
    let mut plans = BTreeMap::new();
    for f in facts {
        let [c_out, c_in, kh, kw] = f.shape();
        let mut notes = Vec::new();
        let mut pick = |s: &[f64], rows: i64, cols: i64, mode: &str| match policy.ranks {
            RankPolicy::Energy(share) => energy_rank(s, share.get()) as i64,
            _ => {
                let r = evbmf_rank(rows as usize, cols as usize, s, f.norm2) as i64;
                if r == 0 {
                    notes.push(format!("VBMF found no signal in {mode}: kept rank 1"));
                }
                r.max(1)
            }
        };
        let form = if f.takes_svd() {
            f.form(
                round(pick(&f.spectra.s0, c_out, c_in, "rank"), c_out.min(c_in)),
                0,
            )
        } else {
            let r_out = round(pick(&f.spectra.s0, c_out, c_in * kh * kw, "r_out"), c_out);
            let r_in = if f.reads_image() {
                c_in
            } else {
                round(pick(&f.spectra.s1, c_in, c_out * kh * kw, "r_in"), c_in)
            };
            f.form(r_out, r_in)
        };
        plans.insert(f.name.clone(), f.unless_not_cheaper(form, notes));
    }
    plans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_rule_is_the_seeds_except_for_the_rgb_input() {
        assert_eq!(ratio_ranks(0.2, [64, 64, 3, 3]), (12, 12));
        assert_eq!(ratio_ranks(0.2, [128, 64, 3, 3]), (25, 12));
        assert_eq!(ratio_ranks(0.2, [512, 256, 1, 1]), (102, 51));
        assert_eq!(ratio_ranks(0.2, [64, 3, 7, 7]), (12, 3));
        assert_eq!(ratio_ranks(0.01, [64, 64, 3, 3]), (1, 1));
        assert_eq!(round_rank(12, Some(8), 64), 16);
        assert_eq!(round_rank(102, Some(8), 512), 104);
        assert_eq!(round_rank(3, Some(8), 3), 3, "the RGB input stays whole");
        assert_eq!(round_rank(12, None, 64), 12);
    }

    #[test]
    fn bad_ranks_name_the_layer() {
        for ranks in [(0, 2), (9, 2), (2, 5)] {
            let err = check_ranks("layer9.conv", [8, 4], ranks)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("layer9.conv") && err.contains("outside"),
                "{err}"
            );
        }
    }
}
