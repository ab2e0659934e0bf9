//! `summary.json`: a run's figures at each point of the seed's flow. In memory a [`Summary`]
//! holds one record per compression stage; the file keeps its original layout (the first stage
//! apart from the further ones, their recalibrations in a parallel list), so files written
//! before and after read alike.

use serde::{Deserialize, Serialize};

use crate::compress::latency::LatencyForecast;
use crate::figures::ModelFigures;
use crate::train::Recipe;

/// One compression stage's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct StageFigures {
    /// Right after the compression (the first stage's: the seed's "compressed, before
    /// fine-tuning").
    pub compressed: ModelFigures,
    /// After that, with the BN statistics recalibrated (when the run recalibrates).
    pub recalibrated: Option<ModelFigures>,
    /// Under a latency budget: the predicted and the measured speedup.
    pub latency: Option<LatencyForecast>,
}

/// A run's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "SummaryFile", try_from = "SummaryFile")]
pub struct Summary {
    pub original: ModelFigures,
    /// Each compression stage, in order (at least one).
    pub stages: Vec<StageFigures>,
    pub fine_tuned: ModelFigures,
    /// How the compressed model was fine-tuned, and the epoch it returned (0: the model it
    /// started from); `None` in files written before recipes.
    pub recipe: Option<Recipe>,
    pub chosen_epoch: Option<u32>,
    pub image_size: i64,
    pub device: String,
    pub train_images: usize,
    pub val_images: usize,
}

impl Summary {
    /// The first compression stage (the seed's single one).
    pub fn first_stage(&self) -> &StageFigures {
        self.stages.first().expect("at least one stage")
    }
}

/// The file's layout.
#[derive(Serialize, Deserialize)]
struct SummaryFile {
    original: ModelFigures,
    compressed: ModelFigures,
    recalibrated: Option<ModelFigures>,
    /// The stages after the first, right after their compression, and recalibrated.
    stages: Vec<ModelFigures>,
    stages_recalibrated: Vec<ModelFigures>,
    /// Each stage's latency forecast and measurement (null for a stage without a latency
    /// budget); absent when no stage had one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    latency: Vec<Option<LatencyForecast>>,
    fine_tuned: ModelFigures,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    recipe: Option<Recipe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chosen_epoch: Option<u32>,
    image_size: i64,
    device: String,
    train_images: usize,
    val_images: usize,
}

impl From<Summary> for SummaryFile {
    fn from(s: Summary) -> Self {
        let latency: Vec<Option<LatencyForecast>> =
            match s.stages.iter().any(|st| st.latency.is_some()) {
                true => s.stages.iter().map(|st| st.latency.clone()).collect(),
                false => Vec::new(),
            };
        let mut stages = s.stages.into_iter();
        let first = stages.next().expect("at least one stage");
        let (further, recalibrated): (Vec<_>, Vec<_>) =
            stages.map(|st| (st.compressed, st.recalibrated)).unzip();
        SummaryFile {
            original: s.original,
            compressed: first.compressed,
            recalibrated: first.recalibrated,
            stages: further,
            stages_recalibrated: recalibrated.into_iter().flatten().collect(),
            latency,
            fine_tuned: s.fine_tuned,
            recipe: s.recipe,
            chosen_epoch: s.chosen_epoch,
            image_size: s.image_size,
            device: s.device,
            train_images: s.train_images,
            val_images: s.val_images,
        }
    }
}

impl TryFrom<SummaryFile> for Summary {
    type Error = String;

    fn try_from(f: SummaryFile) -> Result<Self, String> {
        let further = f.stages.len();
        let recalibrations = f.stages_recalibrated.len();
        if recalibrations != 0 && recalibrations != further {
            return Err(format!(
                "stages_recalibrated has {recalibrations} entries for {further} further stages"
            ));
        }
        if !f.latency.is_empty() && f.latency.len() != further + 1 {
            return Err(format!(
                "latency has {} entries for {} stages",
                f.latency.len(),
                further + 1
            ));
        }
        let mut recalibrated = f.stages_recalibrated.into_iter();
        let mut latency = f.latency.into_iter();
        let first = StageFigures {
            compressed: f.compressed,
            recalibrated: f.recalibrated,
            latency: latency.next().flatten(),
        };
        let stages = std::iter::once(first)
            .chain(f.stages.into_iter().map(|compressed| StageFigures {
                compressed,
                recalibrated: recalibrated.next(),
                latency: latency.next().flatten(),
            }))
            .collect();
        Ok(Summary {
            original: f.original,
            stages,
            fine_tuned: f.fine_tuned,
            recipe: f.recipe,
            chosen_epoch: f.chosen_epoch,
            image_size: f.image_size,
            device: f.device,
            train_images: f.train_images,
            val_images: f.val_images,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-stage run's `summary.json` as the release before stage records wrote it.
    const OLD_FORMAT: &str = r#"{
  "original": {"top1": 0.5, "top5": 0.9, "loss": 1.5, "params": 11000000, "conv_macs": 1800000000, "eval_images_per_s": 100.0},
  "compressed": {"top1": 0.1, "top5": 0.4, "loss": 3.0, "params": 2000000, "conv_macs": 400000000, "eval_images_per_s": 150.0},
  "recalibrated": {"top1": 0.3, "top5": 0.7, "loss": 2.0, "params": 2000000, "conv_macs": 400000000, "eval_images_per_s": 150.0},
  "stages": [{"top1": 0.2, "top5": 0.6, "loss": 2.5, "params": 1000000, "conv_macs": 200000000, "eval_images_per_s": 160.0}],
  "stages_recalibrated": [{"top1": 0.25, "top5": 0.65, "loss": 2.2, "params": 1000000, "conv_macs": 200000000, "eval_images_per_s": 160.0}],
  "fine_tuned": {"top1": 0.45, "top5": 0.85, "loss": 1.7, "params": 1000000, "conv_macs": 200000000, "eval_images_per_s": 160.0},
  "image_size": 32,
  "device": "Cpu",
  "train_images": 64,
  "val_images": 16
}"#;

    #[test]
    fn an_old_summary_reads_as_stage_records_and_writes_back_the_same() {
        let summary: Summary = serde_json::from_str(OLD_FORMAT).unwrap();
        assert_eq!(summary.stages.len(), 2);
        assert_eq!(summary.first_stage().compressed.top1, 0.1);
        assert_eq!(
            summary.first_stage().recalibrated.as_ref().unwrap().top1,
            0.3
        );
        assert_eq!(summary.stages[1].compressed.top1, 0.2);
        assert_eq!(summary.stages[1].recalibrated.as_ref().unwrap().top1, 0.25);
        let written: serde_json::Value = serde_json::to_value(&summary).unwrap();
        let old: serde_json::Value = serde_json::from_str(OLD_FORMAT).unwrap();
        assert_eq!(written, old);
    }

    #[test]
    fn a_summary_without_recalibration_keeps_its_lists_empty() {
        let mut old: serde_json::Value = serde_json::from_str(OLD_FORMAT).unwrap();
        old["recalibrated"] = serde_json::Value::Null;
        old["stages_recalibrated"] = serde_json::json!([]);
        let summary: Summary = serde_json::from_value(old.clone()).unwrap();
        assert!(summary.stages.iter().all(|s| s.recalibrated.is_none()));
        assert_eq!(serde_json::to_value(&summary).unwrap(), old);
    }

    #[test]
    fn the_recipe_and_chosen_epoch_round_trip_and_old_files_have_none() {
        let mut summary: Summary = serde_json::from_str(OLD_FORMAT).unwrap();
        assert_eq!((summary.recipe, summary.chosen_epoch), (None, None));
        summary.recipe = Some(Recipe::Distill);
        summary.chosen_epoch = Some(0);
        let written = serde_json::to_value(&summary).unwrap();
        assert_eq!(written["recipe"], "distill");
        assert_eq!(written["chosen_epoch"], 0);
        let back: Summary = serde_json::from_value(written).unwrap();
        assert_eq!(back, summary);
    }

    #[test]
    fn recalibrations_that_do_not_match_the_stages_are_refused() {
        let mut old: serde_json::Value = serde_json::from_str(OLD_FORMAT).unwrap();
        old["stages"] = serde_json::json!([]);
        let err = serde_json::from_value::<Summary>(old)
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 entries for 0 further stages"), "{err}");
    }

    #[test]
    fn a_latency_stage_keeps_its_predicted_and_measured_speedup() {
        use crate::compress::latency::{test_key, MeasuredSpeed};
        let mut summary: Summary = serde_json::from_str(OLD_FORMAT).unwrap();
        let key = test_key();
        let mut forecast = LatencyForecast {
            before_ms: 50.0,
            predicted_ms: 25.0,
            predicted_speedup: 2.0,
            measured_speedup: None,
            planned: Some(MeasuredSpeed {
                before_ms: 49.0,
                after_ms: 24.5,
            }),
            planned_speedup: Some(2.0),
            aim: 0.48,
            outside_ms: 3.0,
            key,
            measured: None,
        };
        forecast.set_measured(MeasuredSpeed {
            before_ms: 48.0,
            after_ms: 24.0,
        });
        summary.stages[1].latency = Some(forecast.clone());
        let written = serde_json::to_value(&summary).unwrap();
        assert_eq!(written["latency"][0], serde_json::Value::Null);
        assert_eq!(written["latency"][1]["predicted_speedup"], 2.0);
        assert_eq!(written["latency"][1]["measured_speedup"], 2.0);
        let back: Summary = serde_json::from_value(written).unwrap();
        assert_eq!(back.stages[1].latency, Some(forecast));
        assert_eq!(back.stages[0].latency, None);
    }
}
