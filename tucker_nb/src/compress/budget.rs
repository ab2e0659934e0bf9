//! One budget for the whole model (`budget-macs:F`, `budget-params:F`, `budget-latency:F`): choose
//! every conv's form and ranks to lose least subject to total cost ≤ F × the dense model's cost
//! (the cost model is a [`Price`], `cost.rs` beside this file; what lies outside the conv slots
//! counts on both sides), by a Lagrangian search:
//! for a price λ each layer independently takes the option (as it is, or a factorisation on a rank
//! grid) minimising loss + λ·cost, and λ is bisected to meet the budget; a greedy fill then spends
//! what the Lagrangian choice leaves.
//!
//! What an option loses: each layer's relative squared error e for its actual rank pair
//! ([`LayerFacts::error`]: the output error on calibration data when the plan has it, else the
//! kernel error), priced as −ln(1 − e), the log of the share of the layer's output energy it
//! keeps. Every conv here feeds a BN, which rescales its output per channel, so what the next
//! layer sees is the conv's relative error, and the shares kept multiply along the network. For
//! small errors −ln(1 − e) ≈ e (errors add); as e → 1 the price grows without bound, which is the
//! guard against starving a layer: a summed e saturates at 1 per layer, so it would sell a whole
//! layer (e ≈ 0.99, the network at chance) for the MACs it frees.

use std::collections::BTreeMap;

use crate::compress::cost::Price;
use crate::compress::plan::{round_rank, LayerFacts, LayerPlan};
use crate::conv::Form;

/// One candidate for a layer under a budget.
#[derive(Debug, Clone, Copy, PartialEq)]
struct BudgetOption {
    /// The factorisation, or `None` to keep the slot as it is.
    form: Option<Form>,
    /// Its price under the budget's cost model.
    cost: f64,
    /// −ln(1 − e) for its relative squared error e.
    loss: f64,
}

/// The loss of an option with relative squared error `e`: −ln of the output energy share it keeps.
fn loss(e: f64) -> f64 {
    -(1.0 - e).max(1e-12).ln()
}

/// The rank grid of a mode of size `dim`: every multiple of `round_to`, else about 64 evenly
/// spaced ranks starting at 1.
fn rank_grid(dim: i64, round_to: Option<i64>) -> Vec<i64> {
    let rounded = round_to.filter(|&m| m > 1);
    let step = rounded.unwrap_or((dim / 64).max(1));
    let mut g: Vec<i64> = (1..=dim / step).map(|k| k * step).collect();
    if (step > 1 && rounded.is_none()) || g.is_empty() {
        g.insert(0, 1); // the smallest rank, unless ranks must be multiples
    }
    if g.last() != Some(&dim) && rounded.is_some() {
        g.push(dim);
    }
    g
}

/// The shares of min(C_in, C_out) at which a budget that allows CP fits it: coarse, because each
/// rank is a fit of its own (ALS), and a CP of rank R costs about R·(C_in + C_out) MACs a pixel, so
/// these span about 30× to 4× fewer than a 3×3 conv's.
const CP_SHARES: [f64; 7] = [1.0 / 16.0, 1.0 / 8.0, 0.25, 0.375, 0.5, 0.75, 1.0];

/// The CP ranks a budget fits for a conv of min(C_in, C_out) = `dim` (rounded up to `round_to`).
pub(crate) fn cp_rank_grid(dim: i64, round_to: Option<i64>) -> Vec<i64> {
    let mut ranks: Vec<i64> = CP_SHARES
        .iter()
        .map(|share| round_rank(((dim as f64 * share).round() as i64).max(1), round_to, dim))
        .collect();
    ranks.dedup();
    ranks
}

impl LayerFacts {
    /// Every factorisation a budget prices on the rank grid: Tucker-2 pairs and both Tucker-1
    /// forms for a k×k conv (and CP at the ranks fitted, [`LayerFacts::fit_cp`]), SVD ranks for a
    /// 1×1 one.
    pub(crate) fn budget_forms(&self, round_to: Option<i64>) -> Vec<Form> {
        let [c_out, c_in, _, _] = self.shape();
        if self.takes_svd() {
            rank_grid(c_out.min(c_in), round_to)
                .into_iter()
                .map(|rank| self.form(rank, 0))
                .collect()
        } else {
            let r_ins = if self.reads_image() {
                vec![c_in]
            } else {
                rank_grid(c_in, round_to)
            };
            let r_outs = rank_grid(c_out, round_to);
            let mut forms: Vec<Form> = r_outs
                .iter()
                .flat_map(|&r_out| r_ins.iter().map(move |&r_in| (r_out, r_in)))
                .map(|(r_out, r_in)| self.form(r_out, r_in))
                .collect();
            // Tucker-1: one mode whole, and no full-rank square 1×1 paid for it.
            forms.extend(r_outs.iter().map(|&r_out| Form::Tucker1Out { r_out, c_in }));
            if !self.reads_image() {
                forms.extend(r_ins.iter().map(|&r_in| Form::Tucker1In { c_out, r_in }));
            }
            forms.extend(self.cp.keys().map(|&rank| Form::Cp { rank }));
            forms
        }
    }

    /// Keeping the slot as it is, then every [`Self::budget_forms`] option that costs less.
    fn budget_options(&self, by: &dyn Price, round_to: Option<i64>) -> Vec<BudgetOption> {
        let current = by.of_current(&self.geometry, self.input, self.current);
        let mut options = vec![BudgetOption {
            form: None,
            cost: current,
            loss: 0.0,
        }];
        options.extend(
            self.budget_forms(round_to)
                .into_iter()
                .map(|form| BudgetOption {
                    form: Some(form),
                    cost: by.of_form(&self.geometry, self.input, form),
                    loss: loss(self.error(form)),
                })
                .filter(|o| o.cost < current),
        );
        options
    }
}

/// For each layer, the option minimising error + λ·cost/total.
fn choose(options: &[Vec<BudgetOption>], lambda: f64, total: f64) -> Vec<usize> {
    options
        .iter()
        .map(|opts| {
            let score = |o: &BudgetOption| o.loss + lambda * o.cost / total;
            (0..opts.len())
                .min_by(|&a, &b| score(&opts[a]).total_cmp(&score(&opts[b])))
                .expect("every layer has the option to stay as it is")
        })
        .collect()
}

fn cost_of(options: &[Vec<BudgetOption>], choice: &[usize]) -> f64 {
    choice.iter().zip(options).map(|(&i, o)| o[i].cost).sum()
}

/// The plan meeting `target` × the dense model's cost, by price search and greedy fill. Priced
/// in time, each layer's plan carries its predicted ms as it was and as chosen.
pub fn plan_budget(
    facts: &[LayerFacts],
    target: f64,
    by: &dyn Price,
    round_to: Option<i64>,
) -> BTreeMap<String, LayerPlan> {
    let fixed = by.fixed();
    let total: f64 = fixed
        + facts
            .iter()
            .map(|f| by.of_form(&f.geometry, f.input, Form::Dense))
            .sum::<f64>();
    let options: Vec<Vec<BudgetOption>> = facts
        .iter()
        .map(|f| f.budget_options(by, round_to))
        .collect();
    let budget = target * total - fixed;
    // Bisect log λ: a higher price buys cheaper layers.
    let (mut lo, mut hi) = (1e-9f64.ln(), 1e9f64.ln());
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if cost_of(&options, &choose(&options, mid.exp(), total)) <= budget {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let mut choice = choose(&options, hi.exp(), total);
    fill_budget(&options, &mut choice, budget);
    let achieved = (fixed + cost_of(&options, &choice)) / total;
    let what = by.label();
    facts
        .iter()
        .zip(&options)
        .zip(&choice)
        .map(|((f, opts), &i)| {
            let BudgetOption { form, loss, cost } = opts[i];
            let error = 1.0 - (-loss).exp();
            let measured = if f.on_data {
                "output error on calibration data"
            } else {
                "kernel error"
            };
            let head = format!(
                "budget {what} {target:.3}: model at {achieved:.3}; {measured} {error:.4} \
                 (relative squared, these ranks; keeps {:.1} % of the energy)",
                100.0 * (1.0 - error)
            );
            let note = f.budget_note(form, head);
            let predicted_ms = by.is_time().then_some([opts[0].cost, cost]);
            let plan = LayerPlan {
                form,
                note,
                predicted_ms,
            };
            (f.name.clone(), plan)
        })
        .collect()
}

/// Spends what the Lagrangian choice leaves of the budget. Its choices are the lower convex hull
/// of each layer's error-vs-cost options, so where errors fall about linearly with cost (flat
/// spectra) it can stop well short of the target. Greedily, take the upgrade (a dearer option
/// of one layer) with the largest error reduction per unit of cost that still fits, until none
/// does.
fn fill_budget(options: &[Vec<BudgetOption>], choice: &mut [usize], budget: f64) {
    /// A dearer option of one layer, and the error reduction it buys per unit of cost.
    #[derive(Clone, Copy)]
    struct Upgrade {
        option: usize,
        gain_per_cost: f64,
    }
    let mut spent = cost_of(options, choice);
    // A layer's best upgrade from its option `current` within `room`.
    let best_upgrade = |layer: usize, current: usize, room: f64| -> Option<Upgrade> {
        let now = options[layer][current];
        options[layer]
            .iter()
            .enumerate()
            .filter(|(_, o)| o.cost > now.cost && o.cost - now.cost <= room && o.loss < now.loss)
            .map(|(option, o)| Upgrade {
                option,
                gain_per_cost: (now.loss - o.loss) / (o.cost - now.cost),
            })
            .max_by(|a, b| a.gain_per_cost.total_cmp(&b.gain_per_cost))
    };
    // Cached per layer; the room only shrinks, so a cached upgrade that still fits is still the
    // layer's best, and one that no longer fits is recomputed.
    let mut cached: Vec<Option<Upgrade>> = (0..options.len())
        .map(|l| best_upgrade(l, choice[l], budget - spent))
        .collect();
    while let Some((layer, upgrade)) = cached
        .iter()
        .enumerate()
        .filter_map(|(l, u)| u.map(|u| (l, u)))
        .max_by(|a, b| a.1.gain_per_cost.total_cmp(&b.1.gain_per_cost))
    {
        let extra = options[layer][upgrade.option].cost - options[layer][choice[layer]].cost;
        if spent + extra > budget {
            cached[layer] = best_upgrade(layer, choice[layer], budget - spent);
            continue;
        }
        spent += extra;
        choice[layer] = upgrade.option;
        cached[layer] = best_upgrade(layer, upgrade.option, budget - spent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_grids_start_at_one_or_the_multiple_and_end_at_the_dimension() {
        assert_eq!(rank_grid(4, None), vec![1, 2, 3, 4]);
        let g = rank_grid(512, None);
        assert_eq!((g[0], *g.last().unwrap(), g.len()), (1, 512, 65));
        assert_eq!(rank_grid(20, Some(8)), vec![8, 16, 20]);
        assert_eq!(rank_grid(3, Some(8)), vec![1, 3]);
        assert_eq!(cp_rank_grid(64, None), vec![4, 8, 16, 24, 32, 48, 64]);
        assert_eq!(cp_rank_grid(64, Some(32)), vec![32, 64]);
        assert_eq!(cp_rank_grid(8, None), vec![1, 2, 3, 4, 6, 8]);
    }

    #[test]
    fn the_greedy_fill_spends_what_fits_by_error_reduction_per_cost() {
        let option = |rank: Option<i64>, cost, loss| BudgetOption {
            form: rank.map(|rank| Form::Svd { rank }),
            cost,
            loss,
        };
        let options = vec![
            vec![option(None, 10.0, 0.0), option(Some(1), 2.0, 0.5)],
            vec![
                option(None, 10.0, 0.0),
                option(Some(1), 2.0, 0.9),
                option(Some(2), 4.0, 0.1),
            ],
        ];
        let mut choice = vec![1, 1];
        fill_budget(&options, &mut choice, 7.0);
        // Layer 1's upgrade (0.8 less error for 2) fits; layer 0's (8 more) does not.
        assert_eq!(choice, vec![1, 2]);
        assert_eq!(cost_of(&options, &choice), 6.0);
    }
}
