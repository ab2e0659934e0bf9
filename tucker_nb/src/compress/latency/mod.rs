//! Time measured on the device as a budget's cost (`budget-latency:F`): a table of what each conv
//! slot runs (its factor convs, then its BN unless folded) in each candidate form, timed at the
//! plan's batch, image size, dtype, layout and thread count, plus what lies outside the slots
//! (stem pooling, ReLUs, adds, fc), so the table predicts the whole model's eval forward time.
//!
//! **Grid and interpolation.** Timing every rank pair of a 512-channel conv would take minutes, so
//! each varying rank is measured on a hardware-natural grid: multiples of the step (8 on the CPU,
//! 32 on CUDA, or `round_to`) at about 1.5× apart (s, 2s, 3s, 4s, 6s, 8s, 12s, …) and the full
//! dimension. A form between grid points is priced by multilinear interpolation of its
//! neighbours (bilinear in (r_out, r_in) for Tucker-2, linear for the one-rank forms); below the
//! first point it costs what the first point does. The planner's ranks are multiples of the step.
//!
//! **Outside the slots.** The model as it is is timed whole once; what its slots' entries do not
//! account for is the outside time (clamped at 0). A plan's predicted time is that plus the sum of
//! its slots' entries, and the dense model's is the model's own measured time.
//!
//! **Cache.** A table is a JSON file named by a hash of its [`TimingKey`] (device, libtorch, threads,
//! batch, dtype, layout, cuDNN benchmark mode, BN folding), in `TUCKER_NB_LATENCY_CACHE`, else
//! `$XDG_CACHE_HOME/tucker_nb/latency`, else `~/.cache/tucker_nb/latency`. Entries are keyed by
//! conv geometry, input size and form, so a second plan with the same key measures nothing, and
//! a new model or size measures only what it adds. The file is locked while entries are added;
//! a bad entry (NaN, zero, negative) is refused, naming the layer that needs it. A table whose
//! measurement was disturbed (the model's time moved during it, or on the CPU other processes
//! crowded its threads: `load`) is used for this plan but not cached.

mod grid;
mod key;
mod load;
mod measure;
mod table;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::Device;

use crate::error::Result;

pub use grid::{entry_key, measured_ranks};
#[cfg(test)]
pub(crate) use key::test_key;
pub use key::TimingKey;
pub use measure::{check_forecast, measure_side_by_side, model_ms, MeasuredSpeed};
pub use table::{table_for, LatencyTable, SlotForms};

/// The settings a latency budget is measured at, besides the device and layout the model has.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimingSettings {
    /// Images per timed forward pass.
    pub batch_size: i64,
    /// Under bf16 autocast (CUDA only; fp32 elsewhere, as the run computes).
    pub bf16: bool,
    /// The BN after a factorised conv is folded into it (`--fold-bn`): that slot runs no BN.
    pub fold_bn: bool,
    /// Where tables are cached; `None`: [`default_cache_dir`].
    #[serde(skip)]
    pub cache: Option<PathBuf>,
}

impl Default for TimingSettings {
    fn default() -> Self {
        Self {
            batch_size: 64,
            bf16: false,
            fold_bn: false,
            cache: None,
        }
    }
}

impl TimingSettings {
    pub fn is_default(&self) -> bool {
        self == &Self::default()
    }

    pub fn validate(&self) -> Result<()> {
        crate::error::check(
            self.batch_size >= 1,
            "batch size",
            self.batch_size,
            "must be ≥ 1",
        )
    }

    /// The cache folder in force.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache.clone().unwrap_or_else(default_cache_dir)
    }
}

/// `TUCKER_NB_LATENCY_CACHE`, else `$XDG_CACHE_HOME/tucker_nb/latency`, else
/// `~/.cache/tucker_nb/latency` (`.cache/tucker_nb/latency` here without a home).
pub fn default_cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = env("TUCKER_NB_LATENCY_CACHE") {
        return dir;
    }
    let base = env("XDG_CACHE_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("tucker_nb").join("latency")
}

/// The rank step of a latency plan's grid on `device`: 8 on the CPU (its SIMD width in floats),
/// 32 on CUDA (tensor-core friendly channel groups).
pub fn default_step(device: Device) -> i64 {
    if device.is_cuda() {
        32
    } else {
        8
    }
}

/// A latency plan's forecast for the whole model, and, once checked, its measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyForecast {
    /// The model before compression, predicted (its own measured time: outside + its slots).
    pub before_ms: f64,
    /// The compressed model, predicted: outside + the chosen slots' entries.
    pub predicted_ms: f64,
    /// The plan timed whole with random factors before fitting, side by side with the model
    /// before (the check the planner re-aims by), and its speedup.
    #[serde(default)]
    pub planned: Option<MeasuredSpeed>,
    #[serde(default)]
    pub planned_speedup: Option<f64>,
    /// The fraction of the dense time the table's sum was held to, so that the plan timed whole
    /// met the budget (the budget itself when it did at once).
    pub aim: f64,
    pub outside_ms: f64,
    /// What the times were measured at.
    pub key: TimingKey,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<MeasuredSpeed>,
    /// The table's before / predicted time, and, once measured, the measured before / after.
    pub predicted_speedup: f64,
    #[serde(default)]
    pub measured_speedup: Option<f64>,
}

impl LatencyForecast {
    /// Records a side-by-side measurement of the compressed model against the model before.
    pub fn set_measured(&mut self, measured: MeasuredSpeed) {
        self.measured = Some(measured);
        self.measured_speedup = Some(measured.speedup());
    }

    /// How far the table's predicted speedup is from the measured one (predicted / measured − 1;
    /// positive: the table promised more), once measured. Speedups, not times, are compared:
    /// both sides of each are timed at the same moments, so the machine's drift between the
    /// table's building and the check cancels.
    pub fn prediction_error(&self) -> Option<f64> {
        Some(self.predicted_speedup / self.measured_speedup? - 1.0)
    }

    /// The same for the plan timed whole with random factors.
    pub fn planned_error(&self) -> Option<f64> {
        Some(self.planned_speedup? / self.measured_speedup? - 1.0)
    }

    /// One line for a terminal.
    pub fn summary(&self) -> String {
        let layout = if self.key.channels_last {
            "channels-last"
        } else {
            "NCHW"
        };
        let mut line = format!(
            "latency at batch {} ({}, {layout}): table predicts {:.2} ms → {:.2} ms ({:.2}× faster)",
            self.key.batch,
            self.key.dtype,
            self.before_ms,
            self.predicted_ms,
            self.predicted_speedup
        );
        if let Some(p) = self.planned {
            line += &format!(
                "; the plan timed whole {:.2} ms → {:.2} ms ({:.2}×, aimed at {:.3})",
                p.before_ms,
                p.after_ms,
                p.speedup(),
                self.aim
            );
        }
        if let Some(m) = self.measured {
            line += &format!(
                "; measured side by side {:.2} ms → {:.2} ms ({:.2}× faster; the table's speedup off by {:+.1} %",
                m.before_ms,
                m.after_ms,
                m.speedup(),
                100.0 * self.prediction_error().unwrap()
            );
            if let Some(e) = self.planned_error() {
                line += &format!(", the whole plan's by {:+.1} %", 100.0 * e);
            }
            line += ")";
        }
        line
    }
}
