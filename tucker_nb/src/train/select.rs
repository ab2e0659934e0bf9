//! Epoch selection on held-out images, and the divergence guard. A fine-tune given held-out
//! training images ([`super::FineTune::held_out`]) scores the model it starts from and the model
//! after every epoch on them, and returns the best one: the starting model counts, so it never
//! returns a model with a lower held-out top-1 than the one it was given. The score is top-1; on
//! equal top-1 (common on a small held-out set of an easy task) the later, longer-trained epoch
//! wins. The loss does not break ties: on the digits' saturated held-out slice, cross-entropy and
//! the distillation loss both preferred the starting model where the validation set preferred the
//! fine-tuned one (README, "The fine-tune recipe"). The validation set is never used for the
//! choice.
//!
//! The guard stops a phase early, with the best model so far, when a training loss is not finite
//! or the held-out loss exceeds max(10 × the starting held-out loss, the starting loss + 5 nats):
//! a model that far off has diverged. The limit is loose on purpose: under the seed's learning
//! rate and augmentation the first epoch often costs a compressed model some held-out loss that
//! the later epochs win back (on the digits, 0.05 → 2.0), and the selection, not the guard, keeps
//! such an epoch from being returned.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{distillation_loss, Distillation};
use crate::error::Result;
use crate::loader::Loader;
use crate::model::ResNet18;
use crate::runtime::autocast_bf16;

/// The guard's factor on the starting held-out loss.
pub const DIVERGED_FACTOR: f64 = 10.0;
/// The guard's least margin over the starting held-out loss, in nats.
pub const DIVERGED_MARGIN: f64 = 5.0;

/// A model's score on the held-out images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeldOutScore {
    pub top1: f64,
    /// The fine-tune's loss, averaged over the images: cross-entropy, or the distillation loss
    /// against the teacher's logits on the same (eval-transform) images.
    pub loss: f64,
}

impl HeldOutScore {
    /// `model` (eval mode) on `held_out`; with a `teacher`, the loss is the distillation loss
    /// against its logits.
    pub fn of(
        model: &ResNet18,
        held_out: &Loader,
        bf16: bool,
        teacher: Option<(&ResNet18, Distillation)>,
    ) -> Result<Self> {
        let device = held_out.device;
        let mut loss_sum = Tensor::zeros([], (tch::Kind::Double, device));
        let mut correct = Tensor::zeros([], (tch::Kind::Int64, device));
        tch::no_grad(|| {
            let logits_of = |m: &ResNet18, x: &Tensor| {
                autocast_bf16(bf16, || m.forward(x, false)).to_kind(tch::Kind::Float)
            };
            for batch in held_out.epoch(0) {
                let n = batch.labels.size()[0] as f64;
                let logits = logits_of(model, &batch.images);
                let loss = match teacher {
                    Some((teacher, how)) => {
                        let taught = logits_of(teacher, &batch.images);
                        distillation_loss(&logits, &taught, &batch.labels, how)
                    }
                    None => logits.cross_entropy_for_logits(&batch.labels),
                };
                loss_sum += loss.to_kind(tch::Kind::Double) * n;
                correct += logits
                    .argmax(1, false)
                    .eq_tensor(&batch.labels)
                    .sum(tch::Kind::Int64);
            }
        });
        let n = held_out.len().max(1) as f64;
        Ok(Self {
            top1: correct.int64_value(&[]) as f64 / n,
            loss: loss_sum.double_value(&[]) / n,
        })
    }

    /// Whether a later epoch scoring this replaces `best`, the best so far: a top-1 at least as
    /// high (a tie goes to the later epoch); a non-finite loss never replaces.
    pub fn replaces(&self, best: &Self) -> bool {
        self.loss.is_finite() && self.top1 >= best.top1
    }

    /// Whether a model scoring this, after starting at `start`, has diverged (the guard's rule).
    pub fn diverged_from(&self, start: &Self) -> bool {
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
            },
            weights: snapshot(model),
        }
    }

    /// A selection read back from a checkpoint: its state and the best model's tensors.
    pub fn resumed(state: SelectionState, weights: Vec<Tensor>) -> Self {
        Self { state, weights }
    }

    /// After `epoch`, whose model scored `score`: the reason to stop when it diverged (the
    /// guard), else `None`, `model` kept as the best when it replaces the best so far ([`HeldOutScore::replaces`]).
    pub fn after_epoch(
        &mut self,
        model: &ResNet18,
        epoch: u32,
        score: HeldOutScore,
    ) -> Option<String> {
        let start = self.state.start;
        if score.diverged_from(&start) {
            return Some(format!(
                "held-out loss {:.4} after epoch {epoch} is above max({DIVERGED_FACTOR} × {:.4}, \
                 {:.4} + {DIVERGED_MARGIN})",
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
    fn a_later_epoch_replaces_the_best_on_a_top1_at_least_as_high() {
        assert!(score(0.9, 2.0).replaces(&score(0.8, 0.1)));
        assert!(
            score(0.8, 0.3).replaces(&score(0.8, 0.2)),
            "a tie goes to the later epoch, whatever its loss"
        );
        assert!(!score(0.7, 0.1).replaces(&score(0.8, 0.3)));
        assert!(!score(1.0, f64::NAN).replaces(&score(0.1, 3.0)));
        assert!(!score(1.0, f64::INFINITY).replaces(&score(0.1, 3.0)));
    }

    #[test]
    fn the_guard_allows_drift_and_stops_divergence() {
        let start = score(0.9, 0.05);
        // max(10 × 0.05, 0.05 + 5) = 5.05: the digits' first-epoch dip to 2.0 goes on.
        assert!(!score(0.8, 2.0).diverged_from(&start));
        assert!(!score(0.8, 5.04).diverged_from(&start));
        assert!(score(0.1, 5.06).diverged_from(&start));
        assert!(score(0.9, f64::INFINITY).diverged_from(&start));
        assert!(score(0.9, f64::NAN).diverged_from(&start));
        // From a poor start (loss 2.3), 10× is the limit: 23.
        let poor = score(0.1, 2.3);
        assert!(!score(0.1, 22.9).diverged_from(&poor));
        assert!(score(0.1, 71.0).diverged_from(&poor));
    }
}
