//! Charts of a run's metrics and of a budget sweep, drawn with plotters into an in-memory bitmap
//! (plotters-bitmap) and kept as PNG bytes: shown inline in a notebook, exported with one call.
//!
//! Every chart shares one frame ([`render`]): a title, the plot area with its mesh and axis
//! descriptions, and the legend in a panel of its own right of the plot area, so it never covers
//! data. Text is drawn from an embedded DejaVu Sans by [`TextBackend`], which places each glyph at
//! its own left bearing (plotters 0.3.7's `ab_glyph` text drops it, opening stray gaps inside
//! words, as in "con v MACs").

use std::path::Path;
use std::sync::OnceLock;

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use base64::Engine;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::FontStyle;
use plotters_backend::text_anchor::{HPos, Pos, VPos};
use plotters_backend::{BackendColor, BackendCoord, BackendTextStyle, DrawingErrorKind};
use plotters_bitmap::bitmap_pixel::RGBPixel;
use plotters_bitmap::{BitMapBackend, BitMapBackendError};
use polars::prelude::DataFrame;

use crate::error::{Error, Result};
use crate::frame::{f64_column, str_column};
use crate::io;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (800, 480);
/// Width of the legend panel right of the plot area.
const LEGEND_WIDTH: u32 = 230;

fn font() -> &'static FontRef<'static> {
    static FONT_REF: OnceLock<FontRef<'static>> = OnceLock::new();
    FONT_REF.get_or_init(|| {
        // plotters measures text with the font registered under FAMILY; we draw it ourselves.
        plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
            .unwrap_or_else(|_| panic!("embedded DejaVu Sans is a valid font"));
        FontRef::try_from_slice(FONT).expect("embedded DejaVu Sans is a valid font")
    })
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

/// [`BitMapBackend`] with text drawn glyph by glyph at the right places: each glyph's outline is
/// rasterised at its pen position plus its own bounds, with kerning, anchored and rotated as
/// plotters asks. Everything else is the bitmap backend's.
struct TextBackend<'a>(BitMapBackend<'a, RGBPixel>);

type DrawResult = std::result::Result<(), DrawingErrorKind<BitMapBackendError>>;

impl TextBackend<'_> {
    /// Width of `text` (advances and kerning) and the font's line height, in pixels.
    fn measure(size: f64, text: &str) -> (i32, i32) {
        let font = font().as_scaled(PxScale::from(size as f32));
        let mut width = 0.0;
        let mut prev = None;
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = prev {
                width += font.kern(p, id);
            }
            width += font.h_advance(id);
            prev = Some(id);
        }
        (
            width.ceil() as i32,
            (font.ascent() - font.descent()).ceil() as i32,
        )
    }
}

impl DrawingBackend for TextBackend<'_> {
    type ErrorType = BitMapBackendError;

    fn get_size(&self) -> (u32, u32) {
        self.0.get_size()
    }

    fn ensure_prepared(&mut self) -> DrawResult {
        self.0.ensure_prepared()
    }

    fn present(&mut self) -> DrawResult {
        self.0.present()
    }

    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> DrawResult {
        self.0.draw_pixel(point, color)
    }

    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> DrawResult {
        self.0.draw_line(from, to, style)
    }

    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> DrawResult {
        self.0.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn blit_bitmap(&mut self, pos: BackendCoord, (w, h): (u32, u32), src: &[u8]) -> DrawResult {
        self.0.blit_bitmap(pos, (w, h), src)
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> std::result::Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        let (w, h) = Self::measure(style.size(), text);
        Ok((w as u32, h as u32))
    }

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> DrawResult {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let (width, height) = Self::measure(style.size(), text);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Right => -width,
            HPos::Center => -width / 2,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let font = font().as_scaled(PxScale::from(style.size() as f32));
        let transform = style.transform();
        let (w, h) = self.get_size();
        let mut pen = 0.0;
        let mut prev = None;
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = prev {
                pen += font.kern(p, id);
            }
            prev = Some(id);
            let glyph =
                id.with_scale_and_position(font.scale(), ab_glyph::point(pen, font.ascent()));
            pen += font.h_advance(id);
            let Some(outline) = font.outline_glyph(glyph) else {
                continue; // a space
            };
            let bounds = outline.px_bounds();
            let mut pixels = Vec::new();
            outline.draw(|x, y, coverage| pixels.push((x, y, coverage)));
            for (x, y, coverage) in pixels {
                let (x, y) = transform.transform(
                    bounds.min.x as i32 + x as i32 + dx,
                    bounds.min.y as i32 + y as i32 + dy,
                );
                let (x, y) = (pos.0 + x, pos.1 + y);
                if x >= 0 && y >= 0 && (x as u32) < w && (y as u32) < h {
                    let alpha = color.alpha * coverage.min(1.0) as f64;
                    self.0.draw_pixel((x, y), BackendColor { alpha, ..color })?;
                }
            }
        }
        Ok(())
    }
}

const PALETTE: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// How a legend entry's sample is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Line,
    Dashed,
    Point,
}

/// One line of the legend.
struct LegendEntry {
    label: String,
    color: RGBColor,
    mark: Mark,
}

/// How an axis label is written.
type LabelFormat = dyn Fn(&f64) -> String;

/// A phase's name and its (epoch, value) points.
type PhaseSeries = (String, Vec<(f64, f64)>);

/// The axes of a chart's frame.
struct Axes<'a> {
    x_desc: &'a str,
    y_desc: &'a str,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    /// (number of x labels, their text) when not plotters' defaults.
    x_labels: Option<(usize, &'a LabelFormat)>,
}

type Plot<'a, 'b> = ChartContext<'a, TextBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn chart_error(title: &str) -> impl Fn(&dyn std::fmt::Display) -> Error + '_ {
    move |e| Error::value("chart", format!("{title}: {e}"))
}

/// The one frame every chart uses: title, plot area with mesh and axis descriptions, the legend
/// panel right of the plot area, then `draw` fills the plot area.
fn render(
    title: &str,
    axes: Axes,
    legend: &[LegendEntry],
    draw: impl FnOnce(&mut Plot) -> Result<()>,
) -> Result<Chart> {
    let err = chart_error(title);
    let mut buffer = vec![255u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let backend = TextBackend(BitMapBackend::with_buffer(&mut buffer, SIZE));
        let root = backend.into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let root = root.titled(title, (FAMILY, 26)).map_err(|e| err(&e))?;
        let (plot_area, legend_area) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
        let mut chart = ChartBuilder::on(&plot_area)
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(axes.x, axes.y)
            .map_err(|e| err(&e))?;
        let mut mesh = chart.configure_mesh();
        mesh.x_desc(axes.x_desc)
            .y_desc(axes.y_desc)
            .label_style((FAMILY, 16))
            .axis_desc_style((FAMILY, 18));
        if let Some((count, format)) = axes.x_labels {
            mesh.x_labels(count).x_label_formatter(format);
        }
        mesh.draw().map_err(|e| err(&e))?;
        draw(&mut chart)?;
        draw_legend(&legend_area, legend).map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    encode_png(title, buffer)
}

/// The legend as a list down the panel: a sample of each series' mark, then its label.
fn draw_legend(
    area: &DrawingArea<TextBackend, plotters::coord::Shift>,
    entries: &[LegendEntry],
) -> std::result::Result<(), DrawingAreaErrorKind<BitMapBackendError>> {
    let text = TextStyle::from((FAMILY, 15)).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, entry) in entries.iter().enumerate() {
        let y = 40 + 26 * i as i32;
        let style = entry.color.stroke_width(3);
        match entry.mark {
            Mark::Line => area.draw(&PathElement::new(vec![(4, y), (30, y)], style))?,
            Mark::Dashed => {
                area.draw(&PathElement::new(vec![(4, y), (13, y)], style))?;
                area.draw(&PathElement::new(vec![(20, y), (30, y)], style))?;
            }
            Mark::Point => area.draw(&Circle::new((17, y), 5, entry.color.filled()))?,
        }
        area.draw(&Text::new(entry.label.clone(), (38, y), text.clone()))?;
    }
    Ok(())
}

fn encode_png(title: &str, buffer: Vec<u8>) -> Result<Chart> {
    let image =
        image::RgbImage::from_raw(SIZE.0, SIZE.1, buffer).expect("buffer of the drawn size");
    let mut png = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| chart_error(title)(&e))?;
    Ok(Chart {
        title: title.to_string(),
        png: png.into_inner(),
    })
}

/// One series of a line chart.
struct Series {
    entry: LegendEntry,
    points: Vec<(f64, f64)>,
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

/// A series per phase and column: (column, label, mark), colours by phase.
fn series_of(metrics: &DataFrame, columns: &[(&str, &str, Mark)]) -> Result<Vec<Series>> {
    let mut series = Vec::new();
    for &(column, label, mark) in columns {
        for (p, (phase, points)) in per_phase(metrics, column)?.into_iter().enumerate() {
            let entry = LegendEntry {
                label: format!("{phase}: {label}"),
                color: PALETTE[p % PALETTE.len()],
                mark,
            };
            series.push(Series { entry, points });
        }
    }
    Ok(series)
}

/// Values per epoch, one line per series, in the shared frame.
fn line_chart(
    title: &str,
    y_desc: &str,
    series: Vec<Series>,
    y: Option<(f64, f64)>,
) -> Result<Chart> {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let max_x = all().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = y.unwrap_or_else(|| {
        let lo = all().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = all().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        if lo.is_finite() && hi.is_finite() {
            let pad = ((hi - lo) * 0.1).max(1e-3);
            ((lo - pad).max(0.0), hi + pad)
        } else {
            (0.0, 1.0)
        }
    });
    let whole_epochs = |x: &f64| {
        if x.fract().abs() < 1e-9 && *x >= 1.0 {
            format!("{x:.0}")
        } else {
            String::new()
        }
    };
    let axes = Axes {
        x_desc: "epoch",
        y_desc,
        x: 0.5..max_x + 0.5,
        y: lo..hi,
        x_labels: Some((max_x as usize + 1, &whole_epochs)),
    };
    let (entries, points): (Vec<LegendEntry>, Vec<Vec<(f64, f64)>>) =
        series.into_iter().map(|s| (s.entry, s.points)).unzip();
    render(title, axes, &entries, |chart| {
        let err = chart_error(title);
        for (entry, points) in entries.iter().zip(points) {
            let style = ShapeStyle::from(&entry.color).stroke_width(3);
            let dots = points
                .iter()
                .map(|&p| Circle::new(p, 4, entry.color.filled()));
            chart.draw_series(dots).map_err(|e| err(&e))?;
            let drawn = if entry.mark == Mark::Dashed {
                chart.draw_series(DashedLineSeries::new(points, 10, 6, style))
            } else {
                chart.draw_series(LineSeries::new(points, style))
            };
            drawn.map_err(|e| err(&e))?;
        }
        Ok(())
    })
}

/// Validation top-1 and top-5 accuracy (%) per epoch, every fine-tune on one chart.
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
    line_chart(
        "Validation accuracy per epoch",
        "accuracy (%)",
        series,
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
    line_chart("Loss per epoch", "cross-entropy", series, None)
}

/// Font size of the sweep's point labels.
const POINT_LABEL: f64 = 15.0;

/// Where each point's label goes, relative to the point: right and above it unless that would
/// cover an earlier label or leave the plot area, then below, then on the left.
fn label_offsets(chart: &Plot, points: &[(String, f64, f64, bool)]) -> Vec<(i32, i32)> {
    let area = chart.plotting_area().get_pixel_range();
    let mut placed: Vec<[i32; 4]> = Vec::new();
    let mut offsets = Vec::new();
    for (label, x, y, _) in points {
        let (px, py) = chart.backend_coord(&(*x, *y));
        let (w, h) = TextBackend::measure(POINT_LABEL, label);
        let candidates = [(8, -h - 4), (8, 4), (-w - 8, -h - 4), (-w - 8, 4)];
        let fits = |&(dx, dy): &(i32, i32)| {
            let b = [px + dx, py + dy, px + dx + w, py + dy + h];
            let inside = area.0.contains(&b[0]) && area.0.contains(&b[2]);
            let free = placed
                .iter()
                .all(|p| b[2] < p[0] || p[2] < b[0] || b[3] < p[1] || p[3] < b[1]);
            inside && free
        };
        let (dx, dy) = candidates
            .iter()
            .copied()
            .find(fits)
            .unwrap_or(candidates[0]);
        placed.push([px + dx, py + dy, px + dx + w, py + dy + h]);
        offsets.push((dx, dy));
    }
    offsets
}

/// Accuracy against conv MACs of a budget sweep ([`crate::sweep::sweep`]'s DataFrame): every
/// policy as a labelled point, top-1 after its short fine-tune; the Pareto front as a line.
pub fn pareto_chart(sweep: &DataFrame) -> Result<Chart> {
    let title = "Accuracy vs conv MACs";
    let policies = str_column(sweep, "policy", "sweep")?;
    let macs = f64_column(sweep, "conv_macs", "sweep")?;
    let top1 = f64_column(sweep, "top1", "sweep")?;
    let front = f64_column(sweep, "pareto", "sweep")?;
    let points: Vec<(String, f64, f64, bool)> = policies
        .into_iter()
        .zip(macs.iter())
        .zip(top1.iter())
        .zip(front.iter())
        .filter_map(|(((p, m), t), on)| Some((p?, m? / 1e9, t? * 100.0, on == Some(1.0))))
        .collect();
    if points.is_empty() {
        return Err(chart_error(title)(&"the sweep has no points"));
    }
    let (front_color, other_color) = (PALETTE[1], PALETTE[0]);
    let mut line: Vec<(f64, f64)> = points.iter().filter(|p| p.3).map(|p| (p.1, p.2)).collect();
    line.sort_by(|a, b| a.0.total_cmp(&b.0));
    let max_x = points.iter().map(|p| p.1).fold(0.0, f64::max) * 1.15 + 1e-3;
    let axes = Axes {
        x_desc: "conv MACs per image (G)",
        y_desc: "top-1 after fine-tuning (%)",
        x: 0.0..max_x,
        y: 0.0..100.0,
        x_labels: None,
    };
    let legend = [
        LegendEntry {
            label: "Pareto front".into(),
            color: front_color,
            mark: Mark::Line,
        },
        LegendEntry {
            label: "dominated".into(),
            color: other_color,
            mark: Mark::Point,
        },
    ];
    render(title, axes, &legend, |chart| {
        let err = chart_error(title);
        chart
            .draw_series(LineSeries::new(line, front_color.stroke_width(2)))
            .map_err(|e| err(&e))?;
        let offsets = label_offsets(chart, &points);
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

    /// The first inked column of `text` drawn at x = 10 by `backend`'s text path.
    fn first_ink(text: &str, fixed: bool) -> i32 {
        let (w, h) = (160u32, 100u32);
        let mut buffer = vec![255u8; (w * h * 3) as usize];
        {
            let bitmap = BitMapBackend::with_buffer(&mut buffer, (w, h));
            let style = (FAMILY, 72).into_text_style(&(w, h));
            let text = Text::new(text.to_string(), (10, 8), style);
            font();
            if fixed {
                TextBackend(bitmap).into_drawing_area().draw(&text).unwrap();
            } else {
                bitmap.into_drawing_area().draw(&text).unwrap();
            }
        }
        let img = image::RgbImage::from_raw(w, h, buffer).unwrap();
        (0..w)
            .find(|&x| (0..h).any(|y| img.get_pixel(x, y).0[0] < 160))
            .expect("ink") as i32
    }

    #[test]
    fn glyphs_sit_at_their_side_bearings() {
        // Each glyph's ink starts at the pen plus the font's left side bearing. plotters 0.3.7's
        // own text path drops the bearing, which opens stray gaps inside words ("con v MACs").
        let scaled = font().as_scaled(PxScale::from(72.0));
        let mut plain_misplaced = 0;
        for c in ['n', 'M', 'l', 'h', 'v'] {
            let bearing = scaled.h_side_bearing(scaled.glyph_id(c)).floor() as i32;
            let ours = first_ink(&c.to_string(), true);
            assert!(
                (ours - (10 + bearing)).abs() <= 1,
                "{c}: ink at {ours}, bearing {bearing}"
            );
            if (first_ink(&c.to_string(), false) - (10 + bearing)).abs() > 1 {
                plain_misplaced += 1;
            }
        }
        // The test would catch the bug it guards against.
        assert!(
            plain_misplaced >= 3,
            "plotters' own text placed {plain_misplaced} glyphs wrong"
        );
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
        assert_eq!(img.dimensions(), SIZE);
        assert!(ink(&img, 150..600, 0..40) > 200, "no title");
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
