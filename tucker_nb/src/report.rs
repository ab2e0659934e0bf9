//! The per-layer compression report: shapes, ranks, parameters and MACs before and after, and the
//! relative reconstruction error, with totals and CSV output.

use std::fmt::Write as _;
use std::path::Path;

use crate::compress::latency::LatencyForecast;
use crate::conv::{ConvSlot, Form};
use crate::error::Result;
use crate::io;

/// One conv layer's line in the report.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerReport {
    pub layer: String,
    /// C_out × C_in × kh × kw of the dense conv.
    pub shape: [i64; 4],
    pub stride: i64,
    /// Dense, Tucker-2, SVD or a Tucker-1 form, with the ranks.
    pub form: Form,
    /// (r_out, r_in) when factorised (an SVD's rank is both; Tucker-1 keeps one mode whole),
    /// `None` when dense.
    pub ranks: Option<(i64, i64)>,
    /// Input resolution [H, W] at which MACs are counted.
    pub input: [i64; 2],
    pub params_before: i64,
    pub params_after: i64,
    pub macs_before: i64,
    pub macs_after: i64,
    /// ‖W − Ŵ‖ / ‖W‖, W the kernel the slot computed before this compression (the dense one, or
    /// an earlier stage's), Ŵ the new factorisation's; when fitted to data, the relative output
    /// error on the calibration data instead; 0 for a layer left as it was.
    pub rel_error: f64,
    /// Under a latency budget, the slot's predicted ms (at the plan's batch) as it was and as
    /// planned.
    pub ms_before: Option<f64>,
    pub ms_after: Option<f64>,
    /// Why the planner chose this (stem kept, left dense, VBMF fallback, budget), if anything.
    pub note: String,
}

impl LayerReport {
    pub(crate) fn new(
        layer: &str,
        slot: &ConvSlot,
        input: [i64; 2],
        params_before: i64,
        macs_before: i64,
        rel_error: f64,
    ) -> Self {
        let form = slot.form();
        Self {
            layer: layer.to_string(),
            shape: slot.dense_shape(),
            stride: slot.config().stride[0],
            form,
            ranks: form.ranks(),
            input,
            params_before,
            params_after: slot.num_params(),
            macs_before,
            macs_after: slot.macs(input).0,
            rel_error,
            ms_before: None,
            ms_after: None,
            note: String::new(),
        }
    }
}

/// The report of one `compress_model` call.
#[derive(Debug, Clone, PartialEq)]
pub struct CompressionReport {
    pub layers: Vec<LayerReport>,
    pub input_size: [i64; 2],
    /// A latency budget's forecast of the whole model, and its measurement once checked.
    pub latency: Option<LatencyForecast>,
}

/// CSV header of [`CompressionReport::to_csv`].
pub const CSV_HEADER: &str = "layer,c_out,c_in,kh,kw,stride,form,r_out,r_in,input_h,input_w,\
params_before,params_after,macs_before,macs_after,rel_error,ms_before,ms_after,note";

impl CompressionReport {
    pub fn conv_params(&self) -> (i64, i64) {
        let before = self.layers.iter().map(|l| l.params_before).sum();
        (before, self.layers.iter().map(|l| l.params_after).sum())
    }

    pub fn conv_macs(&self) -> (i64, i64) {
        let before = self.layers.iter().map(|l| l.macs_before).sum();
        (before, self.layers.iter().map(|l| l.macs_after).sum())
    }

    /// The share of the conv MACs the compressed model keeps (after / before).
    pub fn macs_kept(&self) -> f64 {
        let (before, after) = self.conv_macs();
        after as f64 / before as f64
    }

    /// One line per layer; empty rank cells for dense layers.
    pub fn to_csv(&self) -> String {
        let mut s = format!("{CSV_HEADER}\n");
        for l in &self.layers {
            let [c_out, c_in, kh, kw] = l.shape;
            let (r_out, r_in) = l.ranks.map_or((String::new(), String::new()), |(a, b)| {
                (a.to_string(), b.to_string())
            });
            let ms = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
            let _ = writeln!(
                s,
                "{},{c_out},{c_in},{kh},{kw},{},{},{r_out},{r_in},{},{},{},{},{},{},{:.6e},{},{},{}",
                l.layer,
                l.stride,
                l.form.name(),
                l.input[0],
                l.input[1],
                l.params_before,
                l.params_after,
                l.macs_before,
                l.macs_after,
                l.rel_error,
                ms(l.ms_before),
                ms(l.ms_after),
                io::csv_field(&l.note)
            );
        }
        s
    }

    /// Writes [`Self::to_csv`] atomically.
    pub fn write_csv(&self, path: &Path) -> Result<()> {
        io::write_atomic(path, self.to_csv().as_bytes())
    }

    /// A few lines for a terminal: totals and ratios.
    pub fn summary(&self) -> String {
        let (pb, pa) = self.conv_params();
        let (mb, ma) = self.conv_macs();
        let compressed = self.layers.iter().filter(|l| l.ranks.is_some()).count();
        let worst = self.layers.iter().map(|l| l.rel_error).fold(0.0, f64::max);
        let line = format!(
            "{compressed}/{} convs compressed; conv params {pb} → {pa} ({:.2}×); conv MACs at {}×{} {:.3} G → {:.3} G ({:.2}×); worst rel. error {worst:.4}",
            self.layers.len(),
            pb as f64 / pa as f64,
            self.input_size[0],
            self.input_size[1],
            mb as f64 / 1e9,
            ma as f64 / 1e9,
            mb as f64 / ma as f64,
        );
        match &self.latency {
            Some(l) => format!("{line}\n{}", l.summary()),
            None => line,
        }
    }
}
