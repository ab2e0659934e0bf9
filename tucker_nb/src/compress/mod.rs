//! Compression of a model's convolutions (the seed's `TuckerCompressor`, without its bugs):
//!
//! - [`decompose`] (`crate::decompose`, which the conv layers share): the math on plain tensors
//!   (HOSVD, HOOI, SVD, mode products, errors);
//! - [`policy`]: rank policies, parsed and validated once;
//! - [`plan`]: per-layer facts and choices of the rule-based and spectral policies;
//! - [`budget`]: one budget for the whole model, priced by a [`cost`] model;
//! - this module: [`plan_layers`] and [`compress_model`], which applies a plan in place.
//!
//! The conv becomes 1×1 (U1ᵀ) → kh×kw core (S, with the original stride, padding, dilation) → 1×1
//! (U0, carrying the original bias, or zeros), or, for a 1×1 conv under a data-driven policy, two
//! 1×1 layers (a truncated SVD).

pub mod budget;
pub mod calibrate;
pub mod cost;
pub mod latency;
pub mod plan;
pub mod policy;
pub(crate) mod spectra;

pub use crate::decompose;

use std::collections::BTreeMap;

use crate::compress::budget::plan_budget;
use crate::compress::calibrate::Moments;
use crate::compress::latency::{LatencyForecast, LatencyTable, MeasuredSpeed, SlotForms};
use crate::compress::plan::{
    check_ranks, plan_rule_based, plan_spectral, LayerFacts, LayerPlan, SlotAt,
};
use crate::compress::policy::{CompressionPolicy, Fit, RankPolicy};
use crate::conv::{Conv2d, ConvConfig, ConvSlot, CpConv, Form, TuckerConv, TwoLayerConv};
use crate::decompose::{
    cp_als, cp_als_from, fit_tucker2, relative_error, relative_output_error, svd_factors,
    svd_factors_whitened, tucker2_whitened, ActivationMoments, CpFactors, CpOptions, KernelSpectra,
    Method,
};
use crate::error::{Error, Result};
use crate::model::ResNet18;
use crate::progress::Progress;
use crate::report::{CompressionReport, LayerReport};

/// Decides every conv's factorisation. Rule-based policies (ratio, explicit) apply their rule to
/// the dense convs, as Tucker-2 like the seed. Data-driven ones (energy, VBMF, budgets) read the
/// singular values of the kernel each slot computes now, so they also compress an already
/// factorised model further (multi-stage); they factorise 1×1 convs as two-layer SVDs, keep the
/// RGB input of the stem, and leave a slot as it is when factorising would not cut its MACs.
///
/// With `moments` (each conv's activations on calibration data) the budgets weigh each option by
/// its output error on that data; without, by its kernel error.
pub fn plan_layers(
    model: &ResNet18,
    policy: &CompressionPolicy,
    moments: Option<&Moments>,
) -> Result<Plan> {
    policy.validate()?;
    let slots = slots_at(model, policy.input_size);
    for (name, slot, _) in &slots {
        check_ungrouped(name, &slot.config(), "Tucker-2, CP or SVD")?;
    }
    if policy.ranks.is_rule_based() {
        let layers = plan_rule_based(&slots, &policy.ranks, policy.round_to)?;
        return Ok(Plan::of(layers, Vec::new()));
    }
    let facts: Vec<LayerFacts> = slots
        .iter()
        .map(|slot| LayerFacts::new(slot, moments.and_then(|m| m.get(&slot.0))))
        .collect();
    let RankPolicy::Budget { cost, fraction, cp } = &policy.ranks else {
        return Ok(Plan::of(plan_spectral(&facts, policy), facts));
    };
    let mut facts = facts;
    if *cp {
        fit_cp_grid(&mut facts, policy.round_to, moments);
    }
    if let Some(counted) = cost.counted() {
        let layers = plan_budget(&facts, fraction.get(), &counted, policy.round_to);
        return Ok(Plan::of(layers, facts));
    }
    // Time: ranks on the device's natural grid, priced by a table measured on it.
    let step = policy
        .round_to
        .unwrap_or_else(|| latency::default_step(model.device()));
    let wanted = latency_slots(&facts, step);
    let start = std::time::Instant::now();
    let mut table = latency::table_for(model, &policy.timing, step, policy.input_size, &wanted)?;
    // Slots timed alone miss what they do to each other in the model (caches, allocations, the
    // per-call overhead of a lone conv), so the plan is also timed whole, with random factors,
    // side by side with the model as it is, and re-aimed (tighter when it misses the budget,
    // looser when it undershoots by more than the slack); the plan returned is the one timed
    // closest to the budget among those within it. Each whole plan's time is cached.
    let target = fraction.get();
    let mut aim = target;
    let mut layers = plan_budget(&facts, aim, &table, Some(step));
    let mut best: Option<(f64, f64, MeasuredSpeed)> = None; // (achieved, aim, speed) so far
    let mut best_layers = None;
    let mut last = None;
    let (mut below, mut above): (Option<f64>, Option<f64>) = (None, None);
    for round in 0..=REAIM_ROUNDS {
        let forms = layers
            .iter()
            .map(|(name, p)| (name.clone(), p.form.unwrap_or(Form::Dense)))
            .collect();
        let speed = table.plan_speed(model, &forms, policy.input_size)?;
        let achieved = 1.0 / speed.speedup();
        last = Some(speed);
        let within = achieved <= target * (1.0 + REAIM_OVER);
        if within && best.is_none_or(|(a, _, _)| achieved > a) {
            best = Some((achieved, aim, speed));
            best_layers = Some(layers.clone());
        }
        let close = achieved >= target * (1.0 - REAIM_UNDER);
        if (within && close) || round == REAIM_ROUNDS {
            break;
        }
        // The aim's bracket so far: plans within the budget below, plans over it above; the next
        // aim scales by what this one missed by until both sides are known, then bisects.
        if within {
            below = Some(aim);
        } else {
            above = Some(aim);
        }
        aim = match (below, above) {
            (Some(lo), Some(hi)) => (lo + hi) / 2.0,
            _ => (aim * target / achieved).min(1.0),
        };
        layers = plan_budget(&facts, aim, &table, Some(step));
    }
    // None within the budget: the last (tightest) plan.
    let planned = best.map(|(_, _, speed)| speed).or(last);
    if let (Some((_, best_aim, _)), Some(best)) = (best, best_layers) {
        (aim, layers) = (best_aim, best);
    }
    eprintln!(
        "latency plan in {:.2} s: {} ({} measured now), aimed at {aim:.3} of the dense time",
        start.elapsed().as_secs_f64(),
        match table.measured {
            0 => "everything from the cache",
            _ => "table and whole plans",
        },
        table.measured
    );
    Ok(Plan {
        timing: Some(PlanTiming {
            table,
            planned,
            aim,
        }),
        ..Plan::of(layers, facts)
    })
}

/// The `cp:R` policy whose plan for `model` keeps the share of its conv MACs (at `input_size`)
/// closest to `macs_kept` (for example a Tucker-2 report's, for a comparison at equal MACs): R by
/// bisection, planning only (nothing is fitted). An `R` of 1 keeps the most a CP can.
pub fn cp_policy_at_macs(
    model: &ResNet18,
    macs_kept: f64,
    input_size: [i64; 2],
) -> Result<RankPolicy> {
    let slots = slots_at(model, input_size);
    let dense: i64 = slots.iter().map(|(_, s, input)| s.macs(*input).0).sum();
    let kept = |r: f64| -> Result<f64> {
        let policy = RankPolicy::Cp {
            fraction: policy::Fraction::new("cp", r)?,
            stem: false,
        };
        let plans = plan_rule_based(&slots, &policy, None)?;
        let macs: i64 = slots
            .iter()
            .map(
                |(name, slot, input)| match plans.get(name).and_then(|p| p.form) {
                    Some(form) => form.macs(&slot.geometry(), *input).0,
                    None => slot.macs(*input).0,
                },
            )
            .sum();
        Ok(macs as f64 / dense as f64)
    };
    let (mut lo, mut hi) = (0.0, 1.0);
    for _ in 0..40 {
        let mid = (lo + hi) / 2.0;
        if kept(mid)? < macs_kept {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    // The ranks are whole, so the two ends may differ; take the one nearer the target.
    let r = match (kept(hi)? - macs_kept).abs() <= (macs_kept - kept(lo.max(1e-9))?).abs() {
        true => hi,
        false => lo.max(1e-9),
    };
    let r = (r * 1e4).round() / 1e4; // a spec a reader can retype
    Ok(RankPolicy::Cp {
        fraction: policy::Fraction::new("cp", r.max(1e-4))?,
        stem: false,
    })
}

/// Fits CP on [`budget::cp_rank_grid`] to every k×k conv that can take it, showing progress.
fn fit_cp_grid(facts: &mut [LayerFacts], round_to: Option<i64>, moments: Option<&Moments>) {
    let cp_layers: Vec<&mut LayerFacts> = facts.iter_mut().filter(|f| f.takes_cp()).collect();
    let bar = Progress::new(cp_layers.len(), "CP fits on the rank grid");
    let mut fits = 0;
    for f in cp_layers {
        let [c_out, c_in, _, _] = f.shape();
        let ranks = budget::cp_rank_grid(c_out.min(c_in), round_to);
        let data = moments.and_then(|m| m.get(&f.name));
        f.fit_cp(&ranks, data);
        fits += ranks.len();
        bar.inc(1);
    }
    bar.finish(format!("{fits} ranks"));
}

/// How many times a latency plan is re-aimed after it is timed whole; by how much its time may
/// exceed the budget (timing noise), and undershoot it (compression given away) before it is.
const REAIM_ROUNDS: usize = 4;
const REAIM_OVER: f64 = 0.01;
const REAIM_UNDER: f64 = 0.03;

/// How a latency plan was priced: its table, the plan's own time measured whole, and the
/// fraction of the table's dense time the planner aimed at to meet the budget.
#[derive(Debug)]
pub struct PlanTiming {
    pub table: LatencyTable,
    pub planned: Option<MeasuredSpeed>,
    pub aim: f64,
}

/// Every conv slot with its name and the input size it reads at `image` px.
fn slots_at(model: &ResNet18, image: [i64; 2]) -> Vec<SlotAt<'_>> {
    let sizes = model.conv_input_sizes(image);
    model
        .conv_slots()
        .into_iter()
        .map(|(name, slot)| {
            let input = sizes[&name];
            (name, slot, input)
        })
        .collect()
}

/// What a latency plan prices on each slot: dense, its current form, and every budget form on
/// the grid of `step`.
fn latency_slots(facts: &[LayerFacts], step: i64) -> Vec<SlotForms> {
    facts
        .iter()
        .map(|f| {
            let mut forms = vec![Form::Dense, f.current.form];
            forms.extend(f.budget_forms(Some(step)));
            SlotForms {
                name: f.name.clone(),
                geometry: f.geometry,
                input: f.input,
                forms,
            }
        })
        .collect()
}

/// Every conv's planned form, and the latency table that priced them under a latency budget.
#[derive(Debug)]
pub struct Plan {
    pub layers: BTreeMap<String, LayerPlan>,
    pub timing: Option<PlanTiming>,
    /// Each conv's kernel spectra where the policy computed them (all but the rule-based ones),
    /// which the weight fit reuses.
    pub spectra: BTreeMap<String, KernelSpectra>,
    /// Each conv's CP fits by rank where a budget priced CP, which compression reuses.
    pub cp: BTreeMap<String, BTreeMap<i64, CpFactors>>,
}

impl Plan {
    fn of(layers: BTreeMap<String, LayerPlan>, facts: Vec<LayerFacts>) -> Self {
        let mut spectra = BTreeMap::new();
        let mut cp = BTreeMap::new();
        for f in facts {
            let fits = f.cp.into_iter().map(|(rank, fit)| (rank, fit.factors));
            cp.insert(f.name.clone(), fits.collect());
            spectra.insert(f.name, f.spectra);
        }
        Self {
            layers,
            timing: None,
            spectra,
            cp,
        }
    }

    /// What the fit of layer `name` can reuse: its spectra, and its CP fit at `form`'s rank.
    fn prefit(&self, name: &str, form: Form) -> Prefit<'_> {
        let cp = match form {
            Form::Cp { rank } => self.cp.get(name).and_then(|fits| fits.get(&rank)),
            _ => None,
        };
        Prefit {
            spectra: self.spectra.get(name),
            cp,
        }
    }
}

/// Grouped convolutions have no factorisation here; the error names `layer`, and `what` was asked.
fn check_ungrouped(layer: &str, config: &ConvConfig, what: &str) -> Result<()> {
    match config.groups {
        1 => Ok(()),
        groups => Err(Error::layer(
            layer,
            format!("grouped convolution (groups = {groups}) cannot be factorised as {what}"),
        )),
    }
}

/// Factorises the dense conv `conv` into `form`: Tucker-2 fitted by `method`, or the truncated SVD
/// of a 1×1 conv. The error names `layer` when the form does not fit the conv.
pub fn factorise(layer: &str, conv: &Conv2d, form: Form, method: Method) -> Result<ConvSlot> {
    factorise_fitted(layer, conv, form, method, None)
}

/// Replaces the convs named in `forms` by [`factorise`]d ones (the others stay as they are): a
/// model in chosen forms. Every name is checked before anything changes.
pub fn factorise_layers(
    model: &mut ResNet18,
    forms: &[(&str, Form)],
    method: Method,
) -> Result<()> {
    let names: Vec<String> = model.conv_slots().into_iter().map(|(n, _)| n).collect();
    if let Some((unknown, _)) = forms.iter().find(|(n, _)| !names.iter().any(|m| m == n)) {
        return Err(Error::layer(*unknown, "no such conv layer in ResNet18"));
    }
    for unit in model.units_mut() {
        if let Some(&(_, form)) = forms.iter().find(|(n, _)| *n == unit.conv_name) {
            let dense = unit.conv.to_dense();
            *unit.conv = factorise(&unit.conv_name, &dense, form, method)?;
        }
    }
    Ok(())
}

/// [`factorise`], fitted to the layer's activation `moments` when given (output error instead of
/// kernel error: `tucker2_whitened`, `svd_factors_whitened`; `method` is then not used).
pub fn factorise_fitted(
    layer: &str,
    conv: &Conv2d,
    form: Form,
    method: Method,
    moments: Option<&ActivationMoments>,
) -> Result<ConvSlot> {
    let fit = moments.map_or(FitTo::Weights, FitTo::Data);
    factorise_by(layer, conv, form, method, fit, Prefit::default())
}

/// What a factorisation is fitted to: the weights, or the layer's activation moments on
/// calibration data (a CP is always fitted to the weights).
#[derive(Clone, Copy)]
enum FitTo<'a> {
    Weights,
    Data(&'a ActivationMoments),
}

/// What the planner computed that a fit of the same kernel reuses: its spectra (for Tucker), its
/// CP fit at the rank chosen.
#[derive(Clone, Copy, Default)]
struct Prefit<'a> {
    spectra: Option<&'a KernelSpectra>,
    cp: Option<&'a CpFactors>,
}

/// [`factorise_fitted`] with what the fit reuses.
fn factorise_by(
    layer: &str,
    conv: &Conv2d,
    form: Form,
    method: Method,
    fit: FitTo,
    prefit: Prefit,
) -> Result<ConvSlot> {
    let [c_out, c_in, kh, kw] = conv.geometry().shape;
    check_ungrouped(layer, &conv.config, form.name())?;
    match form {
        Form::Dense => Ok(ConvSlot::Dense(Conv2d {
            weight: conv.weight.detach().copy(),
            bias: conv.bias.as_ref().map(|b| b.detach().copy()),
            config: conv.config,
        })),
        Form::Tucker2 { r_out, r_in } => {
            check_ranks(layer, [c_out, c_in], (r_out, r_in))?;
            let factors = match fit {
                FitTo::Data(m) => tucker2_whitened(&conv.weight, (r_out, r_in), m),
                FitTo::Weights => fit_tucker2(&conv.weight, (r_out, r_in), method, prefit.spectra),
            };
            Ok(ConvSlot::Tucker(TuckerConv::from_factors(&factors, conv)))
        }
        Form::Tucker1Out {
            r_out: rank,
            c_in: whole,
        }
        | Form::Tucker1In {
            c_out: whole,
            r_in: rank,
        } => {
            let output = matches!(form, Form::Tucker1Out { .. });
            let ranks = if output { (rank, c_in) } else { (c_out, rank) };
            let kept = if output { c_in } else { c_out };
            if whole != kept || [kh, kw] == [1, 1] {
                return Err(Error::layer(
                    layer,
                    format!(
                        "{} keeps a whole mode of {kept} channels of a k×k conv, not {whole} of a \
                         {c_out}×{c_in}×{kh}×{kw} one",
                        form.name()
                    ),
                ));
            }
            check_ranks(layer, [c_out, c_in], ranks)?;
            let factors = match fit {
                FitTo::Data(m) => tucker2_whitened(&conv.weight, ranks, m),
                FitTo::Weights => fit_tucker2(&conv.weight, ranks, method, prefit.spectra),
            };
            Ok(ConvSlot::TwoLayer(TwoLayerConv::tucker1_from_factors(
                &factors, conv, form,
            )))
        }
        Form::Svd { rank } => {
            if [kh, kw] != [1, 1] {
                return Err(Error::layer(
                    layer,
                    format!("an SVD factorisation needs a 1×1 conv, not {kh}×{kw}"),
                ));
            }
            let max = c_out.min(c_in);
            if rank < 1 || rank > max {
                return Err(Error::layer(
                    layer,
                    format!("rank = {rank} is outside 1..={max} for a {c_out}×{c_in} 1×1 conv"),
                ));
            }
            let matrix = conv.weight.reshape([c_out, c_in]);
            let (first, last) = match fit {
                FitTo::Data(m) => svd_factors_whitened(&matrix, rank, m),
                FitTo::Weights => svd_factors(&matrix, rank),
            };
            Ok(ConvSlot::TwoLayer(TwoLayerConv::from_factors(
                &first, &last, conv,
            )))
        }
        Form::Cp { rank } => {
            if [kh, kw] == [1, 1] {
                return Err(Error::layer(
                    layer,
                    "a CP factorisation needs a k×k conv, not 1×1 (its SVD is the 1×1 form)",
                ));
            }
            let max = c_out.min(c_in);
            if rank < 1 || rank > max {
                return Err(Error::layer(
                    layer,
                    format!("CP rank = {rank} is outside 1..={max} for a {c_out}×{c_in} conv"),
                ));
            }
            let factors = match prefit.cp.filter(|f| f.rank() == rank) {
                Some(start) => cp_als_from(&conv.weight, start, CpOptions::default()),
                None => cp_als(&conv.weight, rank, CpOptions::default()),
            };
            Ok(ConvSlot::Cp(CpConv::from_factors(&factors, conv)))
        }
    }
}

/// Factorises the convs that `policy` selects, in place, and reports every conv (changed or
/// not). A slot already factorised (by an earlier stage) is refactorised from the kernel it
/// computes now, its error measured against that kernel. All ranks are decided and checked
/// before anything changes, so an error leaves the model as it was.
pub fn compress_model(
    model: &mut ResNet18,
    policy: &CompressionPolicy,
) -> Result<CompressionReport> {
    compress_model_fitted(model, policy, None)
}

/// [`compress_model`] with each conv's activation `moments` on calibration data (from
/// [`calibrate::activation_moments`] on this model). When the policy fits to data
/// ([`CompressionPolicy::fit`]) the factors minimise each layer's output error, and the report's
/// error is the relative output error on the calibration data; otherwise the moments are unused.
pub fn compress_model_fitted(
    model: &mut ResNet18,
    policy: &CompressionPolicy,
    moments: Option<&Moments>,
) -> Result<CompressionReport> {
    let moments = match (policy.fit(), moments) {
        (Fit::Data, Some(m)) => Some(m),
        (Fit::Data, None) if policy.fit == Some(Fit::Data) => return Err(Error::value(
            "fit",
            "data: fitting to data needs calibration data (--calib-data, or a run's training set)",
        )),
        _ => None,
    };
    let sizes = model.conv_input_sizes(policy.input_size);
    let mut plan = plan_layers(model, policy, moments)?;
    let timing = plan.timing.take();
    let method = policy.method();
    let mut layers = Vec::new();
    for unit in model.units_mut() {
        let (name, slot) = (unit.conv_name, unit.conv);
        let input = sizes[&name];
        let (macs_before, _) = slot.macs(input);
        let params_before = slot.num_params();
        let layer_plan = plan.layers.remove(&name);
        let mut rel_error = 0.0;
        if let Some(form) = layer_plan.as_ref().and_then(|p| p.form) {
            let original = slot.to_dense();
            let data = moments.map(|m| &m[&name]);
            let fit = data.map_or(FitTo::Weights, FitTo::Data);
            let prefit = plan.prefit(&name, form);
            let new_slot = factorise_by(&name, &original, form, method, fit, prefit)?;
            let approx = new_slot.dense_weight();
            rel_error = match data {
                Some(m) => relative_output_error(&original.weight, &approx, &m.input),
                None => relative_error(&original.weight, &approx),
            };
            *slot = new_slot;
        }
        let mut line = LayerReport::new(&name, slot, input, params_before, macs_before, rel_error);
        if let Some(p) = layer_plan {
            [line.ms_before, line.ms_after] = p.predicted_ms.map_or([None; 2], |m| m.map(Some));
            line.note = p.note;
        }
        layers.push(line);
    }
    let latency = timing.map(
        |PlanTiming {
             table,
             planned,
             aim,
         }| {
            let sum =
                |ms: fn(&LayerReport) -> Option<f64>| layers.iter().filter_map(ms).sum::<f64>();
            let before_ms = table.predicted_ms([sum(|l| l.ms_before)]);
            let predicted_ms = table.predicted_ms([sum(|l| l.ms_after)]);
            LatencyForecast {
                before_ms,
                predicted_ms,
                predicted_speedup: before_ms / predicted_ms,
                measured_speedup: None,
                planned,
                planned_speedup: planned.map(|p| p.speedup()),
                aim,
                outside_ms: table.outside_ms,
                key: table.key.clone(),
                measured: None,
            }
        },
    );
    Ok(CompressionReport {
        layers,
        input_size: policy.input_size,
        latency,
    })
}

#[cfg(test)]
mod cp_tests;
#[cfg(test)]
mod tests;
