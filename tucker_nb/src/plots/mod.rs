//! Charts of a run's metrics and of a budget sweep, as PNG bytes ([`Chart`]): shown inline in a
//! notebook, exported with one call. All share one frame and a text-correct canvas
//! (`canvas.rs`).

mod canvas;

use plotters::prelude::*;
use polars::prelude::DataFrame;

use crate::error::Result;
use crate::frame::{f64_column, str_column};
pub use canvas::Chart;
use canvas::{
    chart_error, render, Axes, LegendEntry, Mark, Plot, TextBackend, FAMILY, RING_RADIUS,
};

/// A phase's name and its (epoch, value) points.
type PhaseSeries = (String, Vec<(f64, f64)>);

const PALETTE: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// One series of a line chart.
struct Series {
    entry: LegendEntry,
    points: Vec<(f64, f64)>,
}

/// A hollow ring around a chart's point (x, value), with its legend entry; `at` is `None` for an
/// entry with nothing to ring (a fine-tune that kept the model it started from).
struct Ring {
    entry: LegendEntry,
    at: Option<(f64, f64)>,
}

/// Per phase (in first-seen order), its (epoch, value) points of `column`.
fn per_phase(metrics: &DataFrame, column: &str) -> Result<Vec<PhaseSeries>> {
    let phases = str_column(metrics, "phase", "metrics")?;
    let epochs = f64_column(metrics, "epoch", "metrics")?;
    let values = f64_column(metrics, column, "metrics")?;
    let mut series: Vec<PhaseSeries> = Vec::new();
    for ((phase, epoch), value) in phases.into_iter().zip(epochs.iter()).zip(values.iter()) {
        let (Some(phase), Some(epoch), Some(value)) = (phase, epoch, value) else {
            continue;
        };
        match series.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, points)) => points.push((epoch, value)),
            None => series.push((phase, vec![(epoch, value)])),
        }
    }
    Ok(series)
}

/// The colour of the `p`-th phase (in first-seen order).
fn phase_color(p: usize) -> RGBColor {
    PALETTE[p % PALETTE.len()]
}

/// A series per phase and column: (column, label, mark), colours by phase.
fn series_of(metrics: &DataFrame, columns: &[(&str, &str, Mark)]) -> Result<Vec<Series>> {
    let mut series = Vec::new();
    for &(column, label, mark) in columns {
        for (p, (phase, points)) in per_phase(metrics, column)?.into_iter().enumerate() {
            let entry = LegendEntry {
                label: format!("{phase}: {label}"),
                color: phase_color(p),
                mark,
            };
            series.push(Series { entry, points });
        }
    }
    Ok(series)
}

/// The model a fine-tune that chose on held-out images returned (`train::select`).
#[derive(Debug, Clone, PartialEq)]
struct Chosen {
    phase: String,
    /// 0: the model it started from.
    epoch: u32,
    /// That epoch's validation top-1 (none for epoch 0, which the metrics do not hold).
    val_top1: Option<f64>,
}

/// Per phase that chose its epoch on held-out images (its rows carry a held-out loss), in
/// first-seen order, the epoch its last row says it returned. Metrics from before the selection,
/// without those columns, have none.
fn chosen_epochs(metrics: &DataFrame) -> Result<Vec<Chosen>> {
    let has = |name: &str| {
        metrics
            .get_column_names()
            .iter()
            .any(|n| n.as_str() == name)
    };
    if !has("chosen_epoch") || !has("held_out_loss") {
        return Ok(Vec::new());
    }
    let phases = str_column(metrics, "phase", "metrics")?;
    let held_out = f64_column(metrics, "held_out_loss", "metrics")?;
    let chosen = f64_column(metrics, "chosen_epoch", "metrics")?;
    let mut found: Vec<Chosen> = Vec::new();
    for (i, phase) in phases.iter().enumerate() {
        let (Some(phase), Some(_), Some(epoch)) = (phase, held_out.get(i), chosen.get(i)) else {
            continue;
        };
        let row = Chosen {
            phase: phase.clone(),
            epoch: epoch as u32,
            val_top1: None,
        };
        match found.iter_mut().find(|c| c.phase == *phase) {
            Some(c) => *c = row,
            None => found.push(row),
        }
    }
    let top1 = per_phase(metrics, "val_top1")?;
    for c in &mut found {
        let points = top1.iter().find(|(phase, _)| *phase == c.phase);
        c.val_top1 = points.and_then(|(_, points)| {
            let at = points
                .iter()
                .find(|(epoch, _)| *epoch == f64::from(c.epoch));
            at.map(|&(_, value)| value)
        });
    }
    Ok(found)
}

/// Half the width, in epochs, of the stroke drawn through a one-epoch phase's point.
const SINGLE_EPOCH_HALF_WIDTH: f64 = 0.2;

/// Positive values spanning more than this ratio get a log y axis (two decades).
const LOG_SPAN: f64 = 100.0;

/// A line chart's y axis: linear, or log10 when its values span more than [`LOG_SPAN`], where one
/// outlier (a diverged validation loss of 5 300 beside losses near 2) would flatten every other
/// line to the floor. A log axis plots log10 of each value and labels its ticks with values.
#[derive(Debug, Clone, PartialEq)]
struct YAxis {
    log: bool,
    range: std::ops::Range<f64>,
}

impl YAxis {
    /// The axis for `values`: `fixed` when given (linear), else fitted to them with a margin.
    fn fit(values: &[f64], fixed: Option<(f64, f64)>) -> Self {
        if let Some((lo, hi)) = fixed {
            return Self {
                log: false,
                range: lo..hi,
            };
        }
        let finite = || values.iter().copied().filter(|v| v.is_finite());
        let lo = finite().fold(f64::INFINITY, f64::min);
        let hi = finite().fold(f64::NEG_INFINITY, f64::max);
        if !lo.is_finite() {
            return Self {
                log: false,
                range: 0.0..1.0,
            };
        }
        if lo > 0.0 && hi / lo > LOG_SPAN {
            let (lo, hi) = (lo.log10(), hi.log10());
            let pad = (hi - lo) * 0.05;
            return Self {
                log: true,
                range: lo - pad..hi + pad,
            };
        }
        let pad = ((hi - lo) * 0.1).max(1e-3);
        Self {
            log: false,
            range: (lo - pad).max(0.0)..hi + pad,
        }
    }

    /// Where `value` is plotted.
    fn at(&self, value: f64) -> f64 {
        if self.log {
            value.max(f64::MIN_POSITIVE).log10()
        } else {
            value
        }
    }

    /// The axis description, saying when the scale is logarithmic.
    fn desc(&self, words: &str) -> String {
        if self.log {
            format!("{words} (log scale)")
        } else {
            words.to_string()
        }
    }

    /// The tick labels' text; a log axis labels only its ticks at 1, 2 and 5 × 10^k (its other
    /// ticks, such as 10^0.5 = 3.16, stay blank).
    fn label(&self) -> Box<dyn Fn(&f64) -> String> {
        if self.log {
            Box::new(|v: &f64| {
                let mantissa = 10f64.powf(v - v.floor());
                let round = [1.0, 2.0, 5.0, 10.0]
                    .iter()
                    .any(|m| (mantissa / m - 1.0).abs() < 0.01);
                if round {
                    significant(10f64.powf(*v))
                } else {
                    String::new()
                }
            })
        } else {
            Box::new(canvas::linear_label(&self.range))
        }
    }
}

/// `x` with two significant digits (whole numbers from 10 up).
fn significant(x: f64) -> String {
    let decimals = (1.0 - x.abs().log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{x:.decimals$}")
}

/// Values per epoch, one line per series, in the shared frame, and `rings` around some points
/// (their legend entries after the series'); the y axis `fixed`, or fitted to the values
/// ([`YAxis::fit`]: log10 when they span more than two decades).
fn line_chart(
    title: &str,
    y_desc: &str,
    series: Vec<Series>,
    rings: Vec<Ring>,
    fixed: Option<(f64, f64)>,
) -> Result<Chart> {
    let values: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .collect();
    let y = YAxis::fit(&values, fixed);
    let max_x = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let whole_epochs = |x: &f64| {
        if x.fract().abs() < 1e-9 && *x >= 1.0 {
            format!("{x:.0}")
        } else {
            String::new()
        }
    };
    let desc = y.desc(y_desc);
    let y_format = y.label();
    let axes = Axes {
        x_desc: "epoch",
        y_desc: &desc,
        x: 0.5..max_x + 0.5,
        y: y.range.clone(),
        x_labels: Some((max_x as usize + 1, &whole_epochs)),
        y_format: &*y_format,
    };
    let (mut entries, points): (Vec<LegendEntry>, Vec<Vec<(f64, f64)>>) = series
        .into_iter()
        .map(|s| {
            let points = s.points.iter().map(|&(x, v)| (x, y.at(v))).collect();
            (s.entry, points)
        })
        .unzip();
    let ringed: Vec<(RGBColor, (f64, f64))> = rings
        .iter()
        .filter_map(|r| r.at.map(|(x, v)| (r.entry.color, (x, y.at(v)))))
        .collect();
    entries.extend(rings.into_iter().map(|r| r.entry));
    render(title, axes, &entries, |chart| {
        let err = chart_error(title);
        for (entry, points) in entries.iter().zip(points) {
            let style = ShapeStyle::from(&entry.color).stroke_width(3);
            let dots = points
                .iter()
                .map(|&p| Circle::new(p, 4, entry.color.filled()));
            chart.draw_series(dots).map_err(|e| err(&e))?;
            // A one-epoch phase has no line to draw: a short level stroke through its point, in
            // the series' style, says which series it is instead of a loose dot.
            let points = match points[..] {
                [(x, y)] => vec![
                    (x - SINGLE_EPOCH_HALF_WIDTH, y),
                    (x + SINGLE_EPOCH_HALF_WIDTH, y),
                ],
                _ => points,
            };
            let drawn = if entry.mark == Mark::Dashed {
                chart.draw_series(DashedLineSeries::new(points, 10, 6, style))
            } else {
                chart.draw_series(LineSeries::new(points, style))
            };
            drawn.map_err(|e| err(&e))?;
        }
        let rings = ringed
            .iter()
            .map(|&(color, p)| Circle::new(p, RING_RADIUS, color.stroke_width(2)));
        chart.draw_series(rings).map_err(|e| err(&e))?;
        Ok(())
    })
}

/// Validation top-1 and top-5 accuracy (%) per epoch, every fine-tune on one chart. A fine-tune
/// that chose its epoch on held-out images has a ring, in its colour, around the top-1 of the
/// epoch it returned ("chosen"), or a legend entry "start kept" when it returned the model it
/// started from.
pub fn accuracy_chart(metrics: &DataFrame) -> Result<Chart> {
    let mut series = series_of(
        metrics,
        &[
            ("val_top1", "val top-1", Mark::Line),
            ("val_top5", "val top-5", Mark::Dashed),
        ],
    )?;
    for s in &mut series {
        s.points.iter_mut().for_each(|p| p.1 *= 100.0);
    }
    let phases: Vec<String> = per_phase(metrics, "val_top1")?
        .into_iter()
        .map(|(phase, _)| phase)
        .collect();
    let rings = chosen_epochs(metrics)?
        .into_iter()
        .map(|c| {
            let p = phases.iter().position(|q| *q == c.phase).unwrap_or(0);
            let (label, at) = match (c.epoch, c.val_top1) {
                (0, _) => (format!("{}: start kept", c.phase), None),
                (e, Some(v)) => (
                    format!("{}: chosen", c.phase),
                    Some((f64::from(e), v * 100.0)),
                ),
                (e, None) => (format!("{}: chosen {e}", c.phase), None),
            };
            let entry = LegendEntry {
                label,
                color: phase_color(p),
                mark: Mark::Ring,
            };
            Ring { entry, at }
        })
        .collect();
    line_chart(
        "Validation accuracy per epoch",
        "accuracy (%)",
        series,
        rings,
        Some((0.0, 100.0)),
    )
}

/// Training and validation loss per epoch, every fine-tune on one chart.
pub fn loss_chart(metrics: &DataFrame) -> Result<Chart> {
    let series = series_of(
        metrics,
        &[
            ("train_loss", "train loss", Mark::Line),
            ("val_loss", "val loss", Mark::Dashed),
        ],
    )?;
    line_chart("Loss per epoch", "cross-entropy", series, Vec::new(), None)
}

/// Font size of the sweep's point labels.
const POINT_LABEL: f64 = 15.0;

/// Where each point's label goes, relative to the point (see [`place_labels`]).
fn label_offsets(
    chart: &Plot,
    points: &[(String, f64, f64, bool)],
    line: &[(f64, f64)],
) -> Vec<(i32, i32)> {
    let (x, y) = chart.plotting_area().get_pixel_range();
    // The line as pixels, each segment sampled every few pixels.
    let line: Vec<(i32, i32)> = line
        .windows(2)
        .flat_map(|w| {
            let (a, b) = (chart.backend_coord(&w[0]), chart.backend_coord(&w[1]));
            let steps = ((b.0 - a.0).abs().max((b.1 - a.1).abs()) / 3).max(1);
            (0..=steps).map(move |k| {
                let t = k as f64 / steps as f64;
                (
                    a.0 + ((b.0 - a.0) as f64 * t) as i32,
                    a.1 + ((b.1 - a.1) as f64 * t) as i32,
                )
            })
        })
        .collect();
    let labels: Vec<PixelLabel> = points
        .iter()
        .map(|(label, x, y, _)| {
            let at = chart.backend_coord(&(*x, *y));
            (at, TextBackend::measure(POINT_LABEL, label))
        })
        .collect();
    place_labels(&labels, &line, [x.start, y.start, x.end, y.end])
}

/// A point label's anchor in pixels and its size (width, height).
type PixelLabel = ((i32, i32), (i32, i32));

/// Offsets for labels of size (w, h) at pixel points, in order: right and above the point unless
/// that would leave the `area` ([x0, y0, x1, y1]) or cover an earlier label or a `line` pixel, then
/// below, then on the left, then a line further away; where every place inside covers something,
/// the one covering the fewest pixels of other labels, then of the line.
fn place_labels(labels: &[PixelLabel], line: &[(i32, i32)], area: [i32; 4]) -> Vec<(i32, i32)> {
    let mut placed: Vec<[i32; 4]> = Vec::new();
    let mut offsets = Vec::new();
    for &((px, py), (w, h)) in labels {
        let candidates = [
            (8, -h - 4),
            (8, 4),
            (-w - 8, -h - 4),
            (-w - 8, 4),
            (8, -2 * h - 6),
            (8, h + 6),
            (-w - 8, -2 * h - 6),
            (-w - 8, h + 6),
            (-w / 2, -2 * h - 10),
            (-w / 2, h + 10),
        ];
        let covered = |&(dx, dy): &(i32, i32)| {
            let b = [px + dx, py + dy, px + dx + w, py + dy + h];
            let overlap = |p: &[i32; 4]| {
                let x = (b[2].min(p[2]) - b[0].max(p[0])).max(0);
                let y = (b[3].min(p[3]) - b[1].max(p[1])).max(0);
                x * y
            };
            let labels: i32 = placed.iter().map(overlap).sum();
            let line_px = line
                .iter()
                .filter(|&&(x, y)| x >= b[0] - 2 && x <= b[2] + 2 && y >= b[1] - 2 && y <= b[3] + 2)
                .count();
            let outside = b[0] < area[0] || b[1] < area[1] || b[2] > area[2] || b[3] > area[3];
            (outside, labels, line_px)
        };
        let (dx, dy) = candidates
            .iter()
            .copied()
            .min_by_key(covered)
            .expect("candidates");
        placed.push([px + dx, py + dy, px + dx + w, py + dy + h]);
        offsets.push((dx, dy));
    }
    offsets
}

/// Accuracy against conv MACs of a budget sweep ([`crate::sweep::sweep`]'s DataFrame): every
/// policy as a labelled point, top-1 after its short fine-tune; the Pareto front as a line.
pub fn pareto_chart(sweep: &DataFrame) -> Result<Chart> {
    let axis = FrontAxis {
        title: "Accuracy vs conv MACs",
        column: "conv_macs",
        scale: 1e-9,
        desc: "conv MACs per image (G)".into(),
        front: "pareto",
        note: None,
    };
    front_chart(sweep, &axis)
}

/// Accuracy against measured eval throughput of a budget sweep: as [`pareto_chart`], the x axis
/// images/s (timed beside the dense model, at the settings the sweep's `speed_at` names, written
/// under the legend) and the front of higher throughput and top-1.
pub fn pareto_speed_chart(sweep: &DataFrame) -> Result<Chart> {
    let at = str_column(sweep, "speed_at", "sweep")?;
    let at = at
        .into_iter()
        .flatten()
        .next()
        .unwrap_or_default()
        .to_string();
    let axis = FrontAxis {
        title: "Accuracy vs measured speed",
        column: "images_per_s",
        scale: 1.0,
        desc: "eval images/s".into(),
        front: "pareto_speed",
        note: (!at.is_empty()).then(|| format!("timed on {at}")),
    };
    front_chart(sweep, &axis)
}

/// The x axis of a front chart: its title, the sweep's column (times `scale`), its words, the
/// column saying which points are on the front, and a note for the legend's panel (the settings
/// a speed was timed at: too long for an axis).
struct FrontAxis {
    title: &'static str,
    column: &'static str,
    scale: f64,
    desc: String,
    front: &'static str,
    note: Option<String>,
}

/// The top-1 axis of a front chart (%): the points' range with room for their labels, on round
/// values within 0–100, so points a few tenths apart do not sit on one line at the top.
fn top1_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return 0.0..100.0;
    }
    let pad = ((hi - lo) * 0.25).max(1.0);
    let step = match hi - lo + 2.0 * pad {
        s if s <= 6.0 => 1.0,
        s if s <= 15.0 => 2.0,
        s if s <= 40.0 => 5.0,
        _ => 10.0,
    };
    let lo = ((lo - pad) / step).floor() * step;
    let hi = ((hi + pad) / step).ceil() * step;
    lo.max(0.0)..hi.min(100.0)
}

fn front_chart(sweep: &DataFrame, axis: &FrontAxis) -> Result<Chart> {
    let title = axis.title;
    let policies = str_column(sweep, "policy", "sweep")?;
    let xs = f64_column(sweep, axis.column, "sweep")?;
    let top1 = f64_column(sweep, "top1", "sweep")?;
    let front = f64_column(sweep, axis.front, "sweep")?;
    let points: Vec<(String, f64, f64, bool)> = policies
        .into_iter()
        .zip(xs.iter())
        .zip(top1.iter())
        .zip(front.iter())
        .filter_map(|(((p, x), t), on)| Some((p?, x? * axis.scale, t? * 100.0, on == Some(1.0))))
        .collect();
    if points.is_empty() {
        return Err(chart_error(title)(&"the sweep has no points"));
    }
    let (front_color, other_color) = (PALETTE[1], PALETTE[0]);
    let mut line: Vec<(f64, f64)> = points.iter().filter(|p| p.3).map(|p| (p.1, p.2)).collect();
    line.sort_by(|a, b| a.0.total_cmp(&b.0));
    let max_x = points.iter().map(|p| p.1).fold(0.0, f64::max) * 1.15 + 1e-3;
    let y = top1_range(points.iter().map(|p| p.2));
    let y_format = canvas::linear_label(&y);
    // As many decimals as the x ticks' step needs ("200", not "200.0"; "0.02").
    let x_format = canvas::linear_label(&(0.0..max_x));
    let axes = Axes {
        x_desc: &axis.desc,
        y_desc: "top-1 after fine-tuning (%)",
        x: 0.0..max_x,
        y,
        x_labels: Some((canvas::TICKS, &x_format)),
        y_format: &y_format,
    };
    let mut legend = vec![LegendEntry {
        label: "Pareto front".into(),
        color: front_color,
        mark: Mark::Line,
    }];
    if points.iter().any(|p| !p.3) {
        legend.push(LegendEntry {
            label: "dominated".into(),
            color: other_color,
            mark: Mark::Point,
        });
    }
    if let Some(note) = &axis.note {
        legend.push(LegendEntry {
            label: note.clone(),
            color: BLACK,
            mark: Mark::Note,
        });
    }
    render(title, axes, &legend, |chart| {
        let err = chart_error(title);
        chart
            .draw_series(LineSeries::new(line.clone(), front_color.stroke_width(2)))
            .map_err(|e| err(&e))?;
        let offsets = label_offsets(chart, &points, &line);
        let labelled = points
            .iter()
            .zip(offsets)
            .map(|((label, x, y, on), offset)| {
                let color = if *on { front_color } else { other_color };
                EmptyElement::at((*x, *y))
                    + Circle::new((0, 0), 5, color.filled())
                    + Text::new(label.clone(), offset, (FAMILY, POINT_LABEL))
            });
        chart.draw_series(labelled).map_err(|e| err(&e))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::canvas::{legend_lines, LEGEND_TEXT_WIDTH, SIZE};
    use super::*;
    use crate::train::{metrics_frame, EpochMetrics};

    fn rows() -> Vec<EpochMetrics> {
        let row = |phase: &str, epoch: u32, acc: f64| EpochMetrics {
            phase: phase.into(),
            epoch,
            lr: 0.01,
            train_loss: 2.0 / epoch as f64,
            train_acc: acc,
            val_top1: acc,
            val_top5: (acc + 0.3).min(1.0),
            val_loss: 2.5 / epoch as f64,
            seconds: 1.0,
            images_per_s: 100.0,
            warmup_seconds: 0.1,
            val_images_per_s: 300.0,
            held_out_top1: None,
            held_out_loss: None,
            chosen_epoch: epoch,
        };
        vec![
            row("original", 1, 0.44),
            row("original", 2, 0.48),
            row("compressed", 1, 0.24),
            row("compressed", 2, 0.35),
        ]
    }

    /// Dark pixels in a region: text and lines drawn there.
    fn ink(img: &image::RgbImage, x: std::ops::Range<u32>, y: std::ops::Range<u32>) -> usize {
        y.flat_map(|y| x.clone().map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100))
            .count()
    }

    #[test]
    fn charts_are_valid_pngs_with_text_drawn_by_the_embedded_font() {
        let frame = metrics_frame(&rows());
        for chart in [accuracy_chart(&frame).unwrap(), loss_chart(&frame).unwrap()] {
            let img = image::load_from_memory(&chart.png).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), SIZE);
            let title = &chart.title;
            assert!(ink(&img, 150..600, 0..40) > 200, "{title}: no title text");
            assert!(ink(&img, 0..40, 100..400) > 50, "{title}: no y-axis label");
            assert!(
                ink(&img, 250..450, 440..480) > 30,
                "{title}: no x-axis label"
            );
            assert!(
                ink(&img, 580..800, 40..160) > 100,
                "{title}: no legend text"
            );
            assert!(chart.to_html().starts_with("<img alt=\""));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accuracy.png");
        accuracy_chart(&frame).unwrap().save_png(&path).unwrap();
        assert!(image::open(&path).is_ok());
    }

    /// `rows()` with every loss times `scale`, and the compressed model's first validation loss
    /// `outlier` when given (the smoke run's diverged 5 300).
    fn losses(scale: f64, outlier: Option<f64>) -> DataFrame {
        let mut rows = rows();
        for r in &mut rows {
            r.train_loss *= scale;
            r.val_loss *= scale;
        }
        if let Some(v) = outlier {
            rows[2].val_loss = v;
        }
        metrics_frame(&rows)
    }

    #[test]
    fn one_outlier_gives_a_log_axis_and_flattens_no_line() {
        let frame = losses(1.0, Some(5300.0));
        let series = series_of(
            &frame,
            &[
                ("train_loss", "", Mark::Line),
                ("val_loss", "", Mark::Dashed),
            ],
        )
        .unwrap();
        let values: Vec<f64> = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .collect();
        // Each line's rise as a share of the axis height; the lines here halve from epoch 1 to 2,
        // so each must rise visibly (≥ 5 % of the axis, ~18 px), not lie flat on the floor.
        let rises = |axis: &YAxis| -> Vec<f64> {
            let height = axis.range.end - axis.range.start;
            series
                .iter()
                .filter(|s| s.points.iter().all(|p| p.1 < 100.0))
                .map(|s| (axis.at(s.points[0].1) - axis.at(s.points[1].1)).abs() / height)
                .collect()
        };
        let log = YAxis::fit(&values, None);
        assert!(log.log, "{log:?}");
        assert!(rises(&log).iter().all(|&r| r >= 0.05), "{:?}", rises(&log));
        // The linear axis it replaces flattens them (the test would catch it).
        let linear = YAxis {
            log: false,
            range: 0.0..5300.0,
        };
        assert!(rises(&linear).iter().all(|&r| r < 0.001));
        assert_eq!(log.desc("cross-entropy"), "cross-entropy (log scale)");
        assert_eq!(log.label()(&2f64.log10()), "2.0");
        assert_eq!(log.label()(&1000f64.log10()), "1000");
        assert_eq!(log.label()(&0.5f64.log10()), "0.50");
        assert_eq!(log.label()(&0.5), "", "10^0.5 is not a round value");
        // Losses within two decades keep a linear axis.
        let plain: Vec<f64> = vec![0.05, 2.5, 1.0];
        assert!(!YAxis::fit(&plain, None).log);
    }

    /// The column ranges with ink left of the y axis, over the plot area's rows: the axis
    /// description, then the tick labels, as separate runs of columns when they do not touch.
    fn ink_runs_left_of_the_axis(img: &image::RgbImage) -> Vec<std::ops::Range<u32>> {
        let rows = 70..400;
        let dark = |x: u32, y: u32| img.get_pixel(x, y).0.iter().all(|&c| c < 100);
        // The axis: the first column dark over most of the plot's rows.
        let axis = (0..SIZE.0 / 2)
            .find(|&x| rows.clone().filter(|&y| dark(x, y)).count() > 300)
            .expect("a y axis line");
        let inked: Vec<bool> = (0..axis.saturating_sub(6))
            .map(|x| rows.clone().any(|y| dark(x, y)))
            .collect();
        let mut runs = Vec::new();
        let mut start = None;
        for (x, &on) in inked.iter().chain([&false]).enumerate() {
            match (on, start) {
                (true, None) => start = Some(x as u32),
                (false, Some(s)) => {
                    runs.push(s..x as u32);
                    start = None;
                }
                _ => {}
            }
        }
        runs
    }

    #[test]
    fn the_y_axis_description_never_touches_a_tick_label() {
        // Tick labels from "0.0001" to "5300000", and a log axis.
        let cases = [
            (1e-4, None),
            (1.0, None),
            (123.456, None),
            (2.0e6, None),
            (1.0, Some(5300.0)),
        ];
        for (scale, outlier) in cases {
            let chart = loss_chart(&losses(scale, outlier)).unwrap();
            let img = image::load_from_memory(&chart.png).unwrap().to_rgb8();
            let runs = ink_runs_left_of_the_axis(&img);
            // The rotated description alone (no wider than its line), then a gap of at least
            // 3 px, then the tick labels.
            let (_, line) = TextBackend::measure(18.0, "cross-entropy");
            let case = format!("scale {scale}, outlier {outlier:?}: {runs:?}");
            assert!(runs.len() >= 2, "{case}");
            assert!(runs[0].len() as i32 <= line, "{case}");
            assert!(runs[1].start >= runs[0].end + 3, "{case}");
        }
    }

    #[test]
    fn a_one_epoch_phase_is_drawn_as_a_stroke_not_a_loose_dot() {
        let mut rows = rows();
        rows.truncate(3); // "compressed" keeps its epoch 1 only
        let chart = accuracy_chart(&metrics_frame(&rows)).unwrap();
        let img = image::load_from_memory(&chart.png).unwrap().to_rgb8();
        let red = PALETTE[1];
        let red_columns: Vec<u32> = (0..SIZE.0 - 240)
            .filter(|&x| {
                (60..400).any(|y| {
                    let p = img.get_pixel(x, y).0;
                    p == [red.0, red.1, red.2]
                })
            })
            .collect();
        // A dot alone is 9 px wide; the stroke spans 0.4 epoch of a 2-epoch axis (~70 px).
        let span = red_columns.last().unwrap() - red_columns.first().unwrap();
        assert!(span > 40, "red spans {span} px");
    }

    #[test]
    fn a_chosen_epoch_is_ringed_and_a_kept_start_is_named_in_the_legend() {
        // "original" chose on held-out images and returned its epoch 1 (of 2); "compressed" kept
        // the model it started from.
        let mut selected = rows();
        for (r, chosen) in selected.iter_mut().zip([1, 1, 0, 0]) {
            r.held_out_loss = Some(0.5);
            r.chosen_epoch = chosen;
        }
        let frame = metrics_frame(&selected);
        let chosen = |phase: &str, epoch, val_top1| Chosen {
            phase: phase.into(),
            epoch,
            val_top1,
        };
        assert_eq!(
            chosen_epochs(&frame).unwrap(),
            [
                chosen("original", 1, Some(0.44)),
                chosen("compressed", 0, None)
            ]
        );
        // The seed's recipe (no held-out loss) and metrics from before the selection: nothing.
        let plain = metrics_frame(&rows());
        assert!(chosen_epochs(&plain).unwrap().is_empty());
        let old = plain.drop("chosen_epoch").unwrap();
        assert!(chosen_epochs(&old).unwrap().is_empty());
        assert!(accuracy_chart(&old).is_ok());

        let png = |frame: &DataFrame| {
            let chart = accuracy_chart(frame).unwrap();
            image::load_from_memory(&chart.png).unwrap().to_rgb8()
        };
        let (ringed, unringed) = (png(&frame), png(&plain));
        // Blue (the first phase's colour) in the plot area: the ring adds its circumference.
        let blue = PALETTE[0];
        let blue_in_plot = |img: &image::RgbImage| {
            (0..SIZE.0 - 240)
                .flat_map(|x| (0..SIZE.1).map(move |y| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0 == [blue.0, blue.1, blue.2])
                .count()
        };
        let added = blue_in_plot(&ringed) - blue_in_plot(&unringed);
        assert!(added > 40, "the ring added {added} blue pixels");
        // Two legend lines more, below the four series' (which end above y = 165), each label
        // within the panel.
        let below_the_series = |img: &image::RgbImage| ink(img, 600..800, 165..230);
        assert!(below_the_series(&ringed) > 100 && below_the_series(&unringed) == 0);
        for label in ["budget-macs:0.106: chosen", "budget-macs:0.33: start kept"] {
            assert_eq!(legend_lines(label, LEGEND_TEXT_WIDTH).len(), 1, "{label}");
        }
    }

    #[test]
    fn a_long_phase_name_wraps_in_the_legend_and_stays_inside_the_panel() {
        let long = "budget-latency:0.33+cp";
        for label in [
            format!("{long}: val top-1"),
            format!("{long}: start kept"),
            "x".repeat(60),
        ] {
            let lines = legend_lines(&label, LEGEND_TEXT_WIDTH);
            assert!(lines.len() > 1, "{label}: {lines:?}");
            for line in &lines {
                assert!(
                    TextBackend::measure(15.0, line).0 <= LEGEND_TEXT_WIDTH,
                    "{line}"
                );
            }
            // Every character kept, in order; only the spaces at the breaks go.
            assert_eq!(lines.concat().replace(' ', ""), label.replace(' ', ""));
        }
        assert_eq!(
            legend_lines("original: val top-1", LEGEND_TEXT_WIDTH).len(),
            1
        );
        // The break comes after the phase's name, not inside what is drawn.
        assert_eq!(
            legend_lines(&format!("{long}: val top-1"), LEGEND_TEXT_WIDTH),
            [format!("{long}:"), "val top-1".to_string()]
        );

        let mut named = rows();
        for r in named.iter_mut().filter(|r| r.phase == "original") {
            r.phase = long.into();
        }
        let chart = accuracy_chart(&metrics_frame(&named)).unwrap();
        let img = image::load_from_memory(&chart.png).unwrap().to_rgb8();
        // Nothing reaches the image's right edge, and the wrapped lines push the last entries
        // below where four one-line entries end (y = 165).
        assert_eq!(ink(&img, SIZE.0 - 4..SIZE.0, 0..SIZE.1), 0);
        assert!(ink(&img, 600..800, 165..230) > 50);
    }

    fn count_in(img: &image::RgbImage, c: [u8; 3]) -> usize {
        img.pixels().filter(|p| p.0 == c).count()
    }

    /// A sweep's point for the front charts (the columns they read; the rest plausible).
    fn sweep_point(
        policy: &str,
        conv_macs: i64,
        top1: f64,
        images_per_s: f64,
        speed_at: &str,
    ) -> crate::sweep::SweepPoint {
        crate::sweep::SweepPoint {
            policy: policy.into(),
            conv_macs,
            macs_ratio: conv_macs as f64 / 1.8e9,
            params: 11_000_000,
            params_ratio: 1.0,
            mean_rel_error: 0.1,
            worst_rel_error: 0.2,
            top1_compressed: top1 / 2.0,
            top1_recalibrated: top1 / 1.5,
            top1,
            top5: top1,
            chosen_epoch: 1,
            images_per_s,
            speedup: images_per_s / 1000.0,
            predicted_speedup: None,
            speed_at: speed_at.into(),
        }
    }

    #[test]
    fn pareto_chart_draws_points_labels_and_the_front() {
        use crate::sweep::sweep_frame;
        let point = |policy: &str, macs: i64, top1: f64| {
            let at = "cpu test fp32 channels-last, batch 8, 2 threads";
            sweep_point(policy, macs, top1, 1.8e12 / macs as f64, at)
        };
        let frame = sweep_frame(&[
            point("dense", 1_800_000_000, 0.7),
            point("budget-macs:0.5", 900_000_000, 0.68),
            point("budget-macs:0.33", 600_000_000, 0.69),
        ]);
        let chart = pareto_chart(&frame).unwrap();
        let img = image::load_from_memory(&chart.png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), SIZE);
        assert!(ink(&img, 150..600, 0..40) > 200, "no title");
        // Front points in red, the dominated one (0.5 budget) in blue.
        let count = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
        assert!(count([214, 39, 40]) > 100 && count([31, 119, 180]) > 30);
        assert!(pareto_chart(&DataFrame::empty()).is_err());
        // The same front by measured speed (here proportional to 1 / MACs).
        let chart = pareto_speed_chart(&frame).unwrap();
        let img = image::load_from_memory(&chart.png).unwrap().to_rgb8();
        assert!(count_in(&img, [214, 39, 40]) > 100 && count_in(&img, [31, 119, 180]) > 30);
    }

    #[test]
    fn the_top1_axis_fits_its_points_on_round_values() {
        // A sweep whose points lie within 1 point of each other (the digits, 3 epochs).
        let r = top1_range([98.9, 98.63, 98.63, 98.08, 98.63].into_iter());
        assert_eq!(r, 97.0..100.0);
        let r = top1_range([31.0, 48.5, 86.0].into_iter());
        assert_eq!(r, 10.0..100.0);
        assert_eq!(top1_range([100.0].into_iter()), 99.0..100.0);
        assert_eq!(top1_range([0.5].into_iter()), 0.0..2.0);
        assert_eq!(top1_range(std::iter::empty()), 0.0..100.0);
    }

    #[test]
    fn labels_of_close_points_do_not_cover_each_other_or_the_area_edge() {
        // Five labels 110 x 18 px around points a few pixels apart, the last at the area's top
        // right corner; a line through the first two.
        let area = [60, 40, 560, 420];
        let points = [(300, 200), (306, 203), (310, 200), (303, 197), (555, 45)];
        let labels: Vec<_> = points.iter().map(|&p| (p, (110, 18))).collect();
        let line: Vec<(i32, i32)> = (300..=306).map(|x| (x, 200 + (x - 300) / 2)).collect();
        let offsets = place_labels(&labels, &line, area);
        let boxes: Vec<[i32; 4]> = labels
            .iter()
            .zip(&offsets)
            .map(|(&((x, y), (w, h)), &(dx, dy))| [x + dx, y + dy, x + dx + w, y + dy + h])
            .collect();
        for (i, a) in boxes.iter().enumerate() {
            assert!(
                a[0] >= area[0] && a[1] >= area[1] && a[2] <= area[2] && a[3] <= area[3],
                "label {i} leaves the area: {a:?}"
            );
            for b in &boxes[..i] {
                let apart = a[2] <= b[0] || b[2] <= a[0] || a[3] <= b[1] || b[3] <= a[1];
                assert!(apart, "labels {a:?} and {b:?} overlap");
            }
        }
        // The first label goes where it always did: right of and above its point.
        assert_eq!(offsets[0], (8, -22));
    }

    #[test]
    fn the_speed_chart_names_its_settings_in_the_panel_not_on_the_axis() {
        use crate::sweep::sweep_frame;
        let point = |policy: &str, top1: f64, images_per_s: f64| {
            let at = "cpu Intel(R) Xeon(R) Processor fp32 channels-last, batch 32, 2 threads";
            sweep_point(policy, 1, top1, images_per_s, at)
        };
        let frame = sweep_frame(&[
            point("dense", 0.986, 444.0),
            point("budget-latency:0.5", 0.989, 876.0),
            point("budget-latency:0.33", 0.981, 1357.0),
        ]);
        let chart = pareto_speed_chart(&frame).unwrap();
        let img = image::load_from_memory(&chart.png).unwrap().to_rgb8();
        // The note's three lines below the legend's entries (which end above y = 115), and
        // nothing at the image's left edge, where a long axis description ran off.
        assert!(ink(&img, 570..800, 115..175) > 200);
        assert_eq!(ink(&img, 0..4, 0..SIZE.1), 0);
        let note =
            "timed on cpu Intel(R) Xeon(R) Processor fp32 channels-last, batch 32, 2 threads";
        assert!(legend_lines(note, 224).len() > 1);
        // Its x ticks (and the MACs chart's) with the decimals their step needs.
        assert_eq!(canvas::linear_label(&(0.0..1560.0))(&200.0), "200");
        assert_eq!(canvas::linear_label(&(0.0..0.17))(&0.02), "0.02");
    }

    #[test]
    fn a_frame_without_the_metrics_columns_is_an_error() {
        let frame = DataFrame::empty();
        assert!(accuracy_chart(&frame)
            .unwrap_err()
            .to_string()
            .contains("metrics"));
    }
}
