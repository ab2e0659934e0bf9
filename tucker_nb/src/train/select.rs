//! Epoch selection on held-out images, and the divergence guard. A fine-tune given held-out
//! training images ([`super::FineTune::held_out`]) scores the model it starts from and the model
//! after every epoch on them, and returns the best one: the one with the lowest held-out
//! cross-entropy, a tie going to the later epoch. The starting model counts, so it never returns
//! a model with a higher held-out loss than the one it was given. Cross-entropy against the
//! labels decides, not top-1 and not the distillation loss (README, "The fine-tune recipe"): on
//! the quality benchmark's 70 held-out digits top-1 moves in steps of 1.4 points, and choosing on
//! it returned middle epochs 3.3 to 4.7 points below the last one on the validation set, which
//! the held-out loss ranked first each time; the distillation loss measures closeness to the
//! model before compression, which the starting model has most of, and chose the start on all 5
//! seeds of `budget-macs:0.33`, whose last epochs scored −0.3 to +0.8 points against it on the
//! validation set (+0.3 on the mean). The validation set is never used for the choice.
//!
//! The guard stops a phase early, with the best model so far, when a training or held-out loss
//! is not finite, or when the held-out loss exceeds max(10 × the starting held-out loss, the
//! starting loss + 5 nats) after two epochs in a row: a model that far off for that long has
//! diverged. One epoch above the limit is forgiven: a compressed model's first epoch at the
//! seed's learning rate often spikes its held-out loss and wins it back in the next (on the
//! digits, 0.22 → 8.6 → 0.088 nats), and the selection, not the guard, keeps such an epoch from
//! being returned.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::evaluate::{evaluate_with, EvalOptions};
use crate::error::Result;
use crate::loader::Loader;
use crate::model::ResNet18;

/// The guard's factor on the starting held-out loss.
pub const DIVERGED_FACTOR: f64 = 10.0;
/// The guard's least margin over the starting held-out loss, in nats.
pub const DIVERGED_MARGIN: f64 = 5.0;

/// A model's score on the held-out images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeldOutScore {
    pub top1: f64,
    /// Cross-entropy against the labels, averaged over the images.
    pub loss: f64,
}

impl HeldOutScore {
    /// `model` (eval mode) on `held_out`: [`evaluate_with`]'s top-1 and cross-entropy.
    pub fn of(model: &ResNet18, held_out: &Loader, bf16: bool) -> Result<Self> {
        let options = EvalOptions {
            bf16,
            label: Some(format!("score {} held-out images", held_out.len())),
            ..EvalOptions::default()
        };
        let result = evaluate_with(model, held_out, options)?;
        Ok(Self {
            top1: result.top1,
            loss: result.loss,
        })
    }

    /// Whether a later epoch scoring this replaces `best`, the best so far: a held-out loss at
    /// most as high (a tie goes to the later epoch); a non-finite loss never replaces.
    pub fn replaces(&self, best: &Self) -> bool {
        self.loss.is_finite() && self.loss <= best.loss
    }

    /// Whether this score is past the guard's limit for a model that started at `start`: a
    /// non-finite loss, or one above max([`DIVERGED_FACTOR`] × the start's,
    /// the start's + [`DIVERGED_MARGIN`]).
    pub fn past_limit(&self, start: &Self) -> bool {
        let limit = (DIVERGED_FACTOR * start.loss).max(start.loss + DIVERGED_MARGIN);
        !self.loss.is_finite() || self.loss > limit
    }
}

/// What the selection has seen so far; checkpointed with each epoch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SelectionState {
    /// The starting model's score.
    pub start: HeldOutScore,
    /// The best epoch so far (0: the starting model) and its score.
    pub best_epoch: u32,
    pub best: HeldOutScore,
    /// Whether the last epoch's held-out loss was past the guard's limit (one such epoch is
    /// forgiven, two in a row stop the phase); absent in checkpoints written before the rule.
    #[serde(default)]
    pub past_limit: bool,
}

/// The best model so far: its score and a copy of every tensor of it.
pub(super) struct Selection {
    pub state: SelectionState,
    weights: Vec<Tensor>,
}

/// Copies of every tensor of `model` (parameters and BN buffers), in `named_tensors` order.
fn snapshot(model: &ResNet18) -> Vec<Tensor> {
    tch::no_grad(|| {
        model
            .named_tensors()
            .into_iter()
            .map(|(_, t)| t.detach().copy())
            .collect()
    })
}

impl Selection {
    /// Starts from `model`, which scores `score`.
    pub fn start(model: &ResNet18, score: HeldOutScore) -> Self {
        Self {
            state: SelectionState {
                start: score,
                best_epoch: 0,
                best: score,
                past_limit: false,
            },
            weights: snapshot(model),
        }
    }

    /// A selection read back from a checkpoint: its state and the best model's tensors.
    pub fn resumed(state: SelectionState, weights: Vec<Tensor>) -> Self {
        Self { state, weights }
    }

    /// After `epoch`, whose model scored `score`: the reason to stop when it diverged (the
    /// guard), else `None`, `model` kept as the best when it replaces the best so far
    /// ([`HeldOutScore::replaces`]).
    pub fn after_epoch(
        &mut self,
        model: &ResNet18,
        epoch: u32,
        score: HeldOutScore,
    ) -> Option<String> {
        let start = self.state.start;
        let past_limit = score.past_limit(&start);
        let twice = std::mem::replace(&mut self.state.past_limit, past_limit) && past_limit;
        if !score.loss.is_finite() || twice {
            let again = if twice { " again" } else { "" };
            return Some(format!(
                "held-out loss {:.4} after epoch {epoch} is{again} above max({DIVERGED_FACTOR} × \
                 {:.4}, {:.4} + {DIVERGED_MARGIN})",
                score.loss, start.loss, start.loss
            ));
        }
        if score.replaces(&self.state.best) {
            self.state.best_epoch = epoch;
            self.state.best = score;
            self.weights = snapshot(model);
        }
        None
    }

    /// Writes the best model's tensors back into `model`, bit for bit.
    pub fn restore(&self, model: &ResNet18) {
        tch::no_grad(|| {
            for ((_, mut t), saved) in model.named_tensors().into_iter().zip(&self.weights) {
                t.copy_(saved);
            }
        });
    }

    /// The best model's tensors by name (for a checkpoint).
    pub fn named_weights(&self, model: &ResNet18) -> Vec<(String, Tensor)> {
        model
            .named_tensors()
            .into_iter()
            .zip(&self.weights)
            .map(|((name, _), t)| (name, t.shallow_clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(top1: f64, loss: f64) -> HeldOutScore {
        HeldOutScore { top1, loss }
    }

    #[test]
    fn a_later_epoch_replaces_the_best_on_a_held_out_loss_at_most_as_low() {
        assert!(
            score(0.8, 0.1).replaces(&score(0.9, 0.2)),
            "the loss decides"
        );
        assert!(
            score(0.8, 0.2).replaces(&score(0.9, 0.2)),
            "a tie goes to the later epoch, whatever its top-1"
        );
        assert!(!score(1.0, 0.3).replaces(&score(0.8, 0.2)));
        assert!(!score(1.0, f64::NAN).replaces(&score(0.1, 3.0)));
        assert!(!score(1.0, f64::INFINITY).replaces(&score(0.1, 3.0)));
    }

    #[test]
    fn the_limit_allows_drift() {
        let start = score(0.9, 0.05);
        // max(10 × 0.05, 0.05 + 5) = 5.05.
        assert!(!score(0.8, 2.0).past_limit(&start));
        assert!(!score(0.8, 5.04).past_limit(&start));
        assert!(score(0.1, 5.06).past_limit(&start));
        assert!(score(0.9, f64::INFINITY).past_limit(&start));
        assert!(score(0.9, f64::NAN).past_limit(&start));
        // From a poor start (loss 2.3), 10× is the limit: 23.
        let poor = score(0.1, 2.3);
        assert!(!score(0.1, 22.9).past_limit(&poor));
        assert!(score(0.1, 71.0).past_limit(&poor));
    }

    #[test]
    fn the_guard_forgives_one_epoch_past_the_limit_and_stops_at_two_or_a_non_finite_loss() {
        tch::manual_seed(0);
        let model = ResNet18::new(2, tch::Device::Cpu);
        let start = score(0.9, 0.3);
        let spike = score(0.7, 9.6);
        let recovered = score(0.95, 0.2);
        let mut selection = Selection::start(&model, start);
        assert_eq!(selection.after_epoch(&model, 1, spike), None, "forgiven");
        assert_eq!(selection.after_epoch(&model, 2, recovered), None);
        assert_eq!(selection.state.best_epoch, 2);
        assert_eq!(
            selection.after_epoch(&model, 3, spike),
            None,
            "not in a row"
        );
        let why = selection
            .after_epoch(&model, 4, spike)
            .expect("two in a row");
        assert!(why.contains("after epoch 4 is again above"), "{why}");
        assert_eq!(selection.state.best_epoch, 2);

        let mut selection = Selection::start(&model, start);
        let why = selection.after_epoch(&model, 1, score(0.9, f64::NAN));
        assert!(why.is_some(), "a non-finite loss stops at once");
        assert_eq!(selection.state.best_epoch, 0);
    }
}
