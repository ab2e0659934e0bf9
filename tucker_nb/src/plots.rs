//! Charts of a run's metrics, drawn with plotters into an in-memory bitmap (plotters-bitmap) and
//! kept as PNG bytes: shown inline in a notebook, exported with one call. Text uses an embedded
//! DejaVu Sans through plotters' `ab_glyph` backend, so charts render on machines without fonts.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use base64::Engine;
use plotters::prelude::*;
use plotters::style::FontStyle;
use plotters_bitmap::BitMapBackend;
use polars::prelude::DataFrame;

use crate::error::{Error, Result};
use crate::io;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

fn register_font() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
            .unwrap_or_else(|_| panic!("embedded DejaVu Sans is a valid font"));
    });
}

/// A rendered chart: PNG bytes plus its title.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub png: Vec<u8>,
}

impl Chart {
    /// Writes the PNG atomically.
    pub fn save_png(&self, path: impl AsRef<Path>) -> Result<()> {
        io::write_atomic(path.as_ref(), &self.png)
    }

    /// An `<img>` tag with the PNG inline.
    pub fn to_html(&self) -> String {
        let data = base64::engine::general_purpose::STANDARD.encode(&self.png);
        format!(
            "<img alt=\"{}\" src=\"data:image/png;base64,{data}\"/>",
            self.title
        )
    }

    /// evcxr's display hook: the chart as an inline PNG.
    pub fn evcxr_display(&self) {
        let data = base64::engine::general_purpose::STANDARD.encode(&self.png);
        println!("EVCXR_BEGIN_CONTENT image/png\n{data}\nEVCXR_END_CONTENT");
    }
}

/// One series of a line chart.
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    color: RGBColor,
    dashed: bool,
}

const PALETTE: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Per phase (in first-seen order), the (epoch, value) points of `column`.
/// (phase, its (epoch, value) points).
type PhaseSeries = (String, Vec<(f64, f64)>);

fn per_phase(metrics: &DataFrame, column: &str) -> Result<Vec<PhaseSeries>> {
    let err = |e: polars::error::PolarsError| Error::value("metrics", e);
    let phases = metrics.column("phase").map_err(err)?.str().map_err(err)?;
    let epochs = metrics
        .column("epoch")
        .map_err(err)?
        .cast(&polars::prelude::DataType::Float64)
        .map_err(err)?;
    let epochs = epochs.f64().map_err(err)?;
    let values = metrics.column(column).map_err(err)?.f64().map_err(err)?;
    let mut order: Vec<String> = Vec::new();
    let mut points: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for ((phase, epoch), value) in phases.iter().zip(epochs.iter()).zip(values.iter()) {
        if let (Some(p), Some(e), Some(v)) = (phase, epoch, value) {
            if !order.iter().any(|o| o == p) {
                order.push(p.to_string());
            }
            points.entry(p.to_string()).or_default().push((e, v));
        }
    }
    Ok(order
        .into_iter()
        .map(|p| {
            let pts = points.remove(&p).unwrap_or_default();
            (p, pts)
        })
        .collect())
}

fn line_chart(
    title: &str,
    y_label: &str,
    series: &[Series],
    y_range: Option<(f64, f64)>,
    legend: SeriesLabelPosition,
) -> Result<Chart> {
    register_font();
    let (w, h) = (800u32, 480u32);
    let mut buffer = vec![255u8; (w * h * 3) as usize];
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    let max_x = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = y_range.unwrap_or_else(|| {
        let lo = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = all.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        if lo.is_finite() && hi.is_finite() {
            let pad = ((hi - lo) * 0.1).max(1e-3);
            ((lo - pad).max(0.0), hi + pad)
        } else {
            (0.0, 1.0)
        }
    });
    let draw_err = |e: String| Error::value("chart", format!("{title}: {e}"));
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, 26))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(0.5f64..max_x + 0.5, lo..hi)
            .map_err(|e| draw_err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc(y_label)
            .x_labels(max_x as usize + 1)
            .x_label_formatter(&|x| {
                if x.fract().abs() < 1e-9 && *x >= 1.0 {
                    format!("{x:.0}")
                } else {
                    String::new()
                }
            })
            .label_style((FAMILY, 16))
            .axis_desc_style((FAMILY, 18))
            .draw()
            .map_err(|e| draw_err(e.to_string()))?;
        for s in series {
            let color = s.color;
            let style = ShapeStyle::from(&color).stroke_width(3);
            if s.dashed {
                chart
                    .draw_series(DashedLineSeries::new(s.points.clone(), 10, 6, style))
                    .map_err(|e| draw_err(e.to_string()))?
                    .label(&s.label)
                    .legend(move |(x, y)| {
                        EmptyElement::at((x, y))
                            + PathElement::new(vec![(0, 0), (9, 0)], color.stroke_width(3))
                            + PathElement::new(vec![(15, 0), (24, 0)], color.stroke_width(3))
                    });
            } else {
                chart
                    .draw_series(LineSeries::new(s.points.clone(), style))
                    .map_err(|e| draw_err(e.to_string()))?
                    .label(&s.label)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                    });
            }
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| draw_err(e.to_string()))?;
        }
        chart
            .configure_series_labels()
            .label_font((FAMILY, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(legend)
            .margin(12)
            .draw()
            .map_err(|e| draw_err(e.to_string()))?;
        root.present().map_err(|e| draw_err(e.to_string()))?;
    }
    encode_png(title, w, h, buffer)
}

fn series_of(metrics: &DataFrame, columns: &[(&str, &str, bool)]) -> Result<Vec<Series>> {
    let mut series = Vec::new();
    for (column, label, dashed) in columns {
        for (p, (phase, points)) in per_phase(metrics, column)?.into_iter().enumerate() {
            series.push(Series {
                label: format!("{phase}: {label}"),
                points,
                color: PALETTE[p % PALETTE.len()],
                dashed: *dashed,
            });
        }
    }
    Ok(series)
}

/// Validation top-1 and top-5 accuracy (%) per epoch, both fine-tunes on one chart.
pub fn accuracy_chart(metrics: &DataFrame) -> Result<Chart> {
    let mut series = series_of(
        metrics,
        &[
            ("val_top1", "val top-1", false),
            ("val_top5", "val top-5", true),
        ],
    )?;
    for s in &mut series {
        s.points.iter_mut().for_each(|p| p.1 *= 100.0);
    }
    line_chart(
        "Validation accuracy per epoch",
        "accuracy (%)",
        &series,
        Some((0.0, 100.0)),
        SeriesLabelPosition::LowerRight,
    )
}

/// Training and validation loss per epoch, both fine-tunes on one chart.
pub fn loss_chart(metrics: &DataFrame) -> Result<Chart> {
    let series = series_of(
        metrics,
        &[
            ("train_loss", "train loss", false),
            ("val_loss", "val loss", true),
        ],
    )?;
    line_chart(
        "Loss per epoch",
        "cross-entropy",
        &series,
        None,
        SeriesLabelPosition::UpperRight,
    )
}

/// Accuracy against conv MACs of a budget sweep ([`crate::sweep::sweep`]'s DataFrame): every
/// policy as a labelled point, top-1 after its short fine-tune; the Pareto front as a line.
pub fn pareto_chart(sweep: &DataFrame) -> Result<Chart> {
    register_font();
    let err = |e: polars::error::PolarsError| Error::value("sweep", e);
    let policies = sweep.column("policy").map_err(err)?.str().map_err(err)?;
    let macs = sweep
        .column("conv_macs")
        .map_err(err)?
        .cast(&polars::prelude::DataType::Float64)
        .map_err(err)?;
    let macs = macs.f64().map_err(err)?;
    let top1 = sweep.column("top1").map_err(err)?.f64().map_err(err)?;
    let front = sweep.column("pareto").map_err(err)?.bool().map_err(err)?;
    let mut points: Vec<(String, f64, f64, bool)> = Vec::new();
    for (((p, m), t), on) in policies
        .iter()
        .zip(macs.iter())
        .zip(top1.iter())
        .zip(front.iter())
    {
        if let (Some(p), Some(m), Some(t)) = (p, m, t) {
            points.push((p.to_string(), m / 1e9, t * 100.0, on.unwrap_or(false)));
        }
    }
    let title = "Accuracy vs conv MACs";
    let draw_err = |e: String| Error::value("chart", format!("{title}: {e}"));
    if points.is_empty() {
        return Err(draw_err("the sweep has no points".into()));
    }
    let (w, h) = (800u32, 480u32);
    let mut buffer = vec![255u8; (w * h * 3) as usize];
    let max_x = points.iter().map(|p| p.1).fold(0.0, f64::max) * 1.15 + 1e-3;
    let mut line: Vec<(f64, f64)> = points.iter().filter(|p| p.3).map(|p| (p.1, p.2)).collect();
    line.sort_by(|a, b| a.0.total_cmp(&b.0));
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, 26))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..max_x, 0f64..100f64)
            .map_err(|e| draw_err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("conv MACs per image (G)")
            .y_desc("top-1 after fine-tuning (%)")
            .label_style((FAMILY, 16))
            .axis_desc_style((FAMILY, 18))
            .draw()
            .map_err(|e| draw_err(e.to_string()))?;
        let front_color = PALETTE[1];
        chart
            .draw_series(LineSeries::new(line, front_color.stroke_width(2)))
            .map_err(|e| draw_err(e.to_string()))?
            .label("Pareto front")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], front_color));
        for (label, x, y, on) in &points {
            let color = if *on { front_color } else { PALETTE[0] };
            chart
                .draw_series(std::iter::once(
                    EmptyElement::at((*x, *y))
                        + Circle::new((0, 0), 5, color.filled())
                        + Text::new(label.clone(), (8, -18), (FAMILY, 15)),
                ))
                .map_err(|e| draw_err(e.to_string()))?;
        }
        chart
            .configure_series_labels()
            .label_font((FAMILY, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .margin(12)
            .draw()
            .map_err(|e| draw_err(e.to_string()))?;
        root.present().map_err(|e| draw_err(e.to_string()))?;
    }
    encode_png(title, w, h, buffer)
}

fn encode_png(title: &str, w: u32, h: u32, buffer: Vec<u8>) -> Result<Chart> {
    let image = image::RgbImage::from_raw(w, h, buffer).expect("buffer of the drawn size");
    let mut png = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| Error::value("chart", format!("{title}: {e}")))?;
    Ok(Chart {
        title: title.to_string(),
        png: png.into_inner(),
    })
}

#[cfg(test)]
mod tests {
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
            assert_eq!(img.dimensions(), (800, 480));
            assert!(
                ink(&img, 200..600, 0..40) > 200,
                "{}: no title text",
                chart.title
            );
            assert!(
                ink(&img, 0..40, 100..400) > 50,
                "{}: no y-axis label",
                chart.title
            );
            assert!(
                ink(&img, 300..500, 440..480) > 30,
                "{}: no x-axis label",
                chart.title
            );
            assert!(chart.to_html().starts_with("<img alt=\""));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accuracy.png");
        accuracy_chart(&frame).unwrap().save_png(&path).unwrap();
        assert!(image::open(&path).is_ok());
    }

    #[test]
    fn pareto_chart_draws_points_labels_and_the_front() {
        use crate::sweep::{sweep_frame, SweepPoint};
        let point = |policy: &str, macs: i64, top1: f64| SweepPoint {
            policy: policy.into(),
            conv_macs: macs,
            macs_ratio: macs as f64 / 1.8e9,
            params: 11_000_000,
            params_ratio: 1.0,
            mean_rel_error: 0.1,
            worst_rel_error: 0.2,
            top1_compressed: top1 / 2.0,
            top1,
            top5: top1,
        };
        let frame = sweep_frame(&[
            point("dense", 1_800_000_000, 0.7),
            point("budget-macs:0.5", 900_000_000, 0.68),
            point("budget-macs:0.33", 600_000_000, 0.69),
        ]);
        let chart = pareto_chart(&frame).unwrap();
        let img = image::load_from_memory(&chart.png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (800, 480));
        assert!(ink(&img, 200..600, 0..40) > 200, "no title");
        // Front points in red, the dominated one (0.5 budget) in blue.
        let count = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
        assert!(count([214, 39, 40]) > 100 && count([31, 119, 180]) > 30);
        assert!(pareto_chart(&DataFrame::empty()).is_err());
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
