//! The canvas every chart is drawn on: an in-memory bitmap (plotters-bitmap) with correct text,
//! and one frame ([`render`]): a title, the plot area with its mesh and axis descriptions, and the
//! legend in a panel of its own right of the plot area, so it never covers data.
//!
//! Text is drawn from an embedded DejaVu Sans by [`TextBackend`], which places each glyph at its own
//! left side bearing: plotters 0.3.7's `ab_glyph` text drops it, opening stray gaps inside words,
//! as in "con v MACs".

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

use crate::error::{Error, Result};
use crate::io;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
pub(super) const FAMILY: &str = "sans-serif";
pub(super) const SIZE: (u32, u32) = (800, 480);
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
        println!("{}", crate::display::evcxr_content("image/png", &data));
    }
}

/// [`BitMapBackend`] with text drawn glyph by glyph at the right places: each glyph's outline is
/// rasterised at its pen position plus its own bounds, with kerning, anchored and rotated as
/// plotters asks. Everything else is the bitmap backend's.
pub(super) struct TextBackend<'a>(BitMapBackend<'a, RGBPixel>);

type DrawResult = std::result::Result<(), DrawingErrorKind<BitMapBackendError>>;

/// The glyphs of `text` at `size` px with their pen positions (advances and kerning), and the
/// pen's end: the text's width.
fn layout(size: f64, text: &str) -> (Vec<(ab_glyph::GlyphId, f32)>, f32) {
    let font = font().as_scaled(PxScale::from(size as f32));
    let mut glyphs = Vec::new();
    let mut pen = 0.0;
    let mut prev = None;
    for c in text.chars() {
        let id = font.glyph_id(c);
        if let Some(p) = prev {
            pen += font.kern(p, id);
        }
        glyphs.push((id, pen));
        pen += font.h_advance(id);
        prev = Some(id);
    }
    (glyphs, pen)
}

impl TextBackend<'_> {
    /// Width of `text` (advances and kerning) and the font's line height, in pixels.
    pub(super) fn measure(size: f64, text: &str) -> (i32, i32) {
        let font = font().as_scaled(PxScale::from(size as f32));
        let (_, width) = layout(size, text);
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
        for (id, pen) in layout(style.size(), text).0 {
            let glyph =
                id.with_scale_and_position(font.scale(), ab_glyph::point(pen, font.ascent()));
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

/// How a legend entry's sample is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mark {
    Line,
    Dashed,
    Point,
    /// A hollow ring: a marker drawn around another series' point.
    Ring,
    /// No sample: a note (what the chart was measured at) across the panel's width.
    Note,
}

/// Radius in pixels of a [`Mark::Ring`], around a series' 4 px dot.
pub(super) const RING_RADIUS: i32 = 9;

/// One line of the legend.
pub(super) struct LegendEntry {
    pub label: String,
    pub color: RGBColor,
    pub mark: Mark,
}

/// How an axis label is written.
pub(super) type LabelFormat = dyn Fn(&f64) -> String;

/// The axes of a chart's frame.
pub(super) struct Axes<'a> {
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    pub x: std::ops::Range<f64>,
    pub y: std::ops::Range<f64>,
    /// (number of x labels, their text) when not plotters' defaults.
    pub x_labels: Option<(usize, &'a LabelFormat)>,
    /// The y tick labels' text, for a value on the y axis (a log axis plots log10 of its values
    /// and writes them back as values).
    pub y_format: &'a LabelFormat,
}

/// How many tick labels plotters is asked for on a y axis (and on a linear x axis, [`TICKS`]).
const Y_LABELS: usize = 10;
pub(super) const TICKS: usize = Y_LABELS;
/// Font sizes of tick labels and axis descriptions.
const TICK_FONT: f64 = 16.0;
const DESC_FONT: f64 = 18.0;

/// The y tick values plotters draws for an axis over `range` (its key points for [`Y_LABELS`]).
pub(super) fn y_ticks(range: std::ops::Range<f64>) -> Vec<f64> {
    use plotters::coord::ranged1d::Ranged;
    RangedCoordf64::from(range).key_points(Y_LABELS)
}

/// The width of the y label area: the widest tick label, the tick mark and gaps, and the rotated
/// axis description's line, so the description never reaches a tick label whatever their width.
pub(super) fn y_label_area_width(axes: &Axes) -> u32 {
    let widest = y_ticks(axes.y.clone())
        .iter()
        .map(|v| TextBackend::measure(TICK_FONT, &(axes.y_format)(v)).0)
        .max()
        .unwrap_or(0);
    let (_, desc_height) = TextBackend::measure(DESC_FONT, axes.y_desc);
    (widest + desc_height + 5 + 2 * 8) as u32
}

/// A tick label for a linear axis over `range` with [`Y_LABELS`] ticks: as many decimals as its
/// tick step needs.
pub(super) fn linear_label(range: &std::ops::Range<f64>) -> impl Fn(&f64) -> String {
    let ticks = y_ticks(range.clone());
    let step = ticks
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(f64::INFINITY, f64::min);
    let decimals = if step.is_finite() && step > 0.0 {
        (-step.log10().floor()).clamp(0.0, 6.0) as usize
    } else {
        2
    };
    move |v: &f64| format!("{v:.decimals$}")
}

pub(super) type Plot<'a, 'b> =
    ChartContext<'a, TextBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

pub(super) fn chart_error(title: &str) -> impl Fn(&dyn std::fmt::Display) -> Error + '_ {
    move |e| Error::value("chart", format!("{title}: {e}"))
}

/// The one frame every chart uses: title, plot area with mesh and axis descriptions, the legend
/// panel right of the plot area, then `draw` fills the plot area.
pub(super) fn render(
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
            .y_label_area_size(y_label_area_width(&axes))
            .build_cartesian_2d(axes.x, axes.y.clone())
            .map_err(|e| err(&e))?;
        let mut mesh = chart.configure_mesh();
        mesh.x_desc(axes.x_desc)
            .y_desc(axes.y_desc)
            .label_style((FAMILY, TICK_FONT))
            .axis_desc_style((FAMILY, DESC_FONT))
            .y_labels(Y_LABELS)
            .y_label_formatter(axes.y_format);
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

/// Font size of the legend's labels.
const LEGEND_FONT: f64 = 15.0;
/// Where a legend label starts in its panel, right of the entry's sample.
const LEGEND_TEXT_X: i32 = 38;
/// Room for a legend label's line: the panel less the sample and a 2 px right margin.
pub(super) const LEGEND_TEXT_WIDTH: i32 = LEGEND_WIDTH as i32 - LEGEND_TEXT_X - 2;
/// A legend entry's first line, and the step from one entry to the next.
const LEGEND_TOP: i32 = 40;
const LEGEND_STEP: i32 = 26;
/// The step from a label's line to its next one, when it wraps.
const LEGEND_LINE: i32 = 18;

/// `label` in lines that each fit `width` pixels at the legend's font: broken after a ": " where
/// one does (a phase's name, then what is drawn), else at spaces, and a word wider than `width` on
/// its own broken between characters.
pub(super) fn legend_lines(label: &str, width: i32) -> Vec<String> {
    wrap(label, width, &[": ", " "])
}

fn wrap(text: &str, width: i32, separators: &[&str]) -> Vec<String> {
    let fits = |text: &str| TextBackend::measure(LEGEND_FONT, text).0 <= width;
    if fits(text) {
        return vec![text.to_string()];
    }
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    let Some((separator, finer)) = separators.split_first() else {
        for c in text.chars() {
            line.push(c);
            if !fits(&line) && line.chars().count() > 1 {
                line.pop();
                lines.push(std::mem::replace(&mut line, c.to_string()));
            }
        }
        lines.push(line);
        return lines;
    };
    for piece in text.split_inclusive(separator) {
        let joined = format!("{line}{piece}");
        if fits(joined.trim_end()) {
            line = joined;
            continue;
        }
        if !line.trim_end().is_empty() {
            lines.push(line.trim_end().to_string());
        }
        let (body, trail) = piece.split_at(piece.trim_end().len());
        let mut pieces = wrap(body, width, finer);
        line = pieces.pop().unwrap_or_default() + trail;
        lines.extend(pieces);
    }
    if !line.trim_end().is_empty() || lines.is_empty() {
        lines.push(line.trim_end().to_string());
    }
    lines
}

/// The legend as a list down the panel: a sample of each series' mark, then its label, wrapped
/// to the panel's width.
fn draw_legend(
    area: &DrawingArea<TextBackend, plotters::coord::Shift>,
    entries: &[LegendEntry],
) -> std::result::Result<(), DrawingAreaErrorKind<BitMapBackendError>> {
    let text = TextStyle::from((FAMILY, LEGEND_FONT)).pos(Pos::new(HPos::Left, VPos::Center));
    let mut y = LEGEND_TOP;
    for entry in entries {
        let style = entry.color.stroke_width(3);
        let (text_x, width) = match entry.mark {
            Mark::Note => (4, LEGEND_WIDTH as i32 - 6),
            _ => (LEGEND_TEXT_X, LEGEND_TEXT_WIDTH),
        };
        match entry.mark {
            Mark::Line => area.draw(&PathElement::new(vec![(4, y), (30, y)], style))?,
            Mark::Dashed => {
                area.draw(&PathElement::new(vec![(4, y), (13, y)], style))?;
                area.draw(&PathElement::new(vec![(20, y), (30, y)], style))?;
            }
            Mark::Point => area.draw(&Circle::new((17, y), 5, entry.color.filled()))?,
            Mark::Ring => area.draw(&Circle::new((17, y), RING_RADIUS, style))?,
            Mark::Note => {}
        }
        let lines = legend_lines(&entry.label, width);
        for (i, line) in lines.iter().enumerate() {
            let at = (text_x, y + LEGEND_LINE * i as i32);
            area.draw(&Text::new(line.clone(), at, text.clone()))?;
        }
        y += LEGEND_STEP + LEGEND_LINE * (lines.len() as i32 - 1);
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
