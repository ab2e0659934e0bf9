//! A model's figures at one point of a run: accuracy, size, cost and speed. One type serves
//! `summary.json`, the CLI's closing line and the notebook's closing table.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::model::ResNet18;
use crate::timing;
use crate::train::EvalResult;

/// Accuracy and cost of one model as evaluated once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFigures {
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    pub params: i64,
    /// Conv MACs of one image at the run's image size.
    pub conv_macs: i64,
    pub eval_images_per_s: f64,
    /// Median batch-1 forward time in milliseconds, when measured ([`Self::with_latency`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
}

impl ModelFigures {
    /// `model`'s figures as evaluated in `eval`, its MACs counted at `image_size` px.
    pub fn new(model: &ResNet18, eval: &EvalResult, image_size: i64) -> Self {
        Self {
            top1: eval.top1,
            top5: eval.top5,
            loss: eval.loss,
            params: model.num_params(),
            conv_macs: model.conv_macs([image_size, image_size]),
            eval_images_per_s: eval.images_per_s,
            latency_ms: None,
        }
    }

    /// With `model`'s batch-1 latency at `image_size` px measured ([`latency_ms`]).
    pub fn with_latency(self, model: &ResNet18, image_size: i64) -> Self {
        Self {
            latency_ms: Some(latency_ms(model, image_size)),
            ..self
        }
    }
}

/// Median time of a batch-1 forward pass at `size` px, in milliseconds (3 warm-ups, 20 runs).
pub fn latency_ms(model: &ResNet18, size: i64) -> f64 {
    let device = model.device();
    let x = Tensor::randn([1, 3, size, size], (Kind::Float, device));
    let seconds = tch::no_grad(|| {
        timing::median_seconds(device, 3, 20, || {
            let _ = model.forward(&x, false);
        })
    });
    seconds * 1e3
}
