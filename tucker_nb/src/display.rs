//! Rich output for notebooks: HTML tables of DataFrames, the layer report and evaluation results,
//! shown through evcxr's display protocol (a type with an `evcxr_display` method prints
//! `EVCXR_BEGIN_CONTENT <mime>` … `EVCXR_END_CONTENT`). evcxr keeps one item per MIME type per cell,
//! so several charts and tables go into one HTML block ([`Html::concat`]).

use polars::prelude::{AnyValue, Column, DataFrame};

use crate::conv::Form;
use crate::plots::Chart;
use crate::report::CompressionReport;
use crate::train::EvalResult;

/// `content` framed as evcxr's display protocol expects it on stdout, as `mime`.
pub(crate) fn evcxr_content(mime: &str, content: &str) -> String {
    format!("EVCXR_BEGIN_CONTENT {mime}\n{content}\nEVCXR_END_CONTENT")
}

/// Shows any `Debug` value in one build of its cell.
///
/// evcxr shows a cell's final expression by compiling `(expr).evcxr_display();`; when the type has
/// no such method that build fails, and evcxr compiles the cell a second time, printing the value
/// with `{:?}`. With this trait in scope (the kernel's prelude in `notebooks/evcxr.toml` brings it
/// in) every `Debug` value has the method, so the first build succeeds and prints the same text: a
/// cell such as `1 + 1` costs one build, not two. Types with their own `evcxr_display` ([`Html`],
/// [`Chart`], [`CompressionReport`]) keep theirs: an inherent method wins over a trait's. evcxr's
/// `:fmt` and `:types` settings no longer change how such values print.
pub trait ShowDebug {
    fn evcxr_display(&self);
}

impl<T: std::fmt::Debug + ?Sized> ShowDebug for T {
    fn evcxr_display(&self) {
        println!("{}", evcxr_content("text/plain", &format!("{self:?}")));
    }
}

/// A block of HTML that displays itself in evcxr.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Html(pub String);

impl Html {
    pub fn evcxr_display(&self) {
        println!("{}", evcxr_content("text/html", &self.0));
    }

    /// Several blocks as one, in order.
    pub fn concat(parts: impl IntoIterator<Item = Html>) -> Html {
        Html(
            parts
                .into_iter()
                .map(|h| h.0)
                .collect::<Vec<_>>()
                .join("\n"),
        )
    }

    /// Writes the block as a standalone HTML page, atomically.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> crate::error::Result<()> {
        let page = format!("<!DOCTYPE html><html><head><meta charset=\"utf-8\"></head><body>\n{}\n</body></html>\n", self.0);
        crate::io::write_atomic(path.as_ref(), page.as_bytes())
    }

    pub fn heading(text: &str) -> Html {
        Html(format!("<h4>{}</h4>", escape(text)))
    }

    pub fn paragraph(text: &str) -> Html {
        Html(format!("<p>{}</p>", escape(text)))
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn table(header: &[String], rows: &[Vec<String>]) -> Html {
    let mut s = String::from("<table class=\"tucker-nb\"><thead><tr>");
    for h in header {
        s.push_str(&format!(
            "<th style=\"white-space:nowrap\">{}</th>",
            escape(h)
        ));
    }
    s.push_str("</tr></thead><tbody>");
    for row in rows {
        s.push_str("<tr>");
        for cell in row {
            s.push_str(&format!(
                "<td style=\"white-space:nowrap\">{}</td>",
                escape(cell)
            ));
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>");
    Html(s)
}

/// Floats with 4 significant decimals, everything else as polars prints it.
fn cell(v: AnyValue) -> String {
    match v {
        AnyValue::Float64(x) => format_float(x),
        AnyValue::Float32(x) => format_float(x as f64),
        AnyValue::String(s) => s.to_string(),
        AnyValue::Null => String::new(),
        other => other.to_string(),
    }
}

fn format_float(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e5) {
        format!("{x:.3e}")
    } else {
        format!("{x:.4}")
    }
}

/// A DataFrame as an HTML table.
pub fn frame_table(frame: &DataFrame) -> Html {
    let names: Vec<String> = frame
        .get_column_names()
        .iter()
        .map(|c| c.to_string())
        .collect();
    let columns: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), n.as_str())).collect();
    frame_columns(frame, &columns)
}

/// The columns of `frame` named in `columns` (column, heading), in that order, as an HTML table;
/// a column the frame lacks is left out. The full frame is [`frame_table`].
pub fn frame_columns(frame: &DataFrame, columns: &[(&str, &str)]) -> Html {
    let present: Vec<(&Column, &str)> = columns
        .iter()
        .filter_map(|&(name, heading)| frame.column(name).ok().map(|c| (c, heading)))
        .collect();
    let header: Vec<String> = present.iter().map(|(_, h)| h.to_string()).collect();
    let rows = (0..frame.height())
        .map(|i| {
            present
                .iter()
                .map(|(c, _)| c.get(i).map(cell).unwrap_or_default())
                .collect()
        })
        .collect::<Vec<Vec<String>>>();
    table(&header, &rows)
}

/// A fine-tune's `metrics.csv` frame, the columns a reader follows epoch by epoch (validation
/// first, then the held-out selection and the speed); [`frame_table`] has every column.
pub fn metrics_table(frame: &DataFrame) -> Html {
    frame_columns(
        frame,
        &[
            ("phase", "phase"),
            ("epoch", "epoch"),
            ("val_top1", "val top-1"),
            ("val_top5", "val top-5"),
            ("val_loss", "val loss"),
            ("train_loss", "train loss"),
            ("held_out_top1", "held-out top-1"),
            ("chosen_epoch", "chosen epoch"),
            ("images_per_s", "train images/s"),
            ("seconds", "seconds"),
        ],
    )
}

/// A sweep's frame ([`crate::sweep::sweep`]), its key columns first: each policy's top-1 after
/// the fine-tune, whether it is on the MACs front, what it costs and how fast it runs, then the
/// top-1 right after compression and after recalibration; [`frame_table`] has every column.
pub fn sweep_table(frame: &DataFrame) -> Html {
    frame_columns(
        frame,
        &[
            ("policy", "policy"),
            ("top1", "top-1"),
            ("top5", "top-5"),
            ("pareto", "on the front"),
            ("macs_ratio", "MACs (× dense)"),
            ("speedup", "speedup"),
            ("top1_compressed", "top-1 compressed"),
            ("top1_recalibrated", "top-1 recalibrated"),
            ("chosen_epoch", "chosen epoch"),
        ],
    )
}

/// The per-layer report as an HTML table with a totals line.
pub fn report_table(report: &CompressionReport) -> Html {
    let header = [
        "layer",
        "shape",
        "stride",
        "ranks",
        "params",
        "params after",
        "MACs",
        "MACs after",
        "rel. error",
    ]
    .map(String::from)
    .to_vec();
    let timed = report.latency.is_some();
    let mut header = header;
    if timed {
        header.extend(["ms predicted", "ms after"].map(String::from));
    }
    let ms = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
    let mut rows: Vec<Vec<String>> = report
        .layers
        .iter()
        .map(|l| {
            let [o, i, kh, kw] = l.shape;
            vec![
                l.layer.clone(),
                format!("{o}×{i}×{kh}×{kw}"),
                l.stride.to_string(),
                match l.form {
                    Form::Dense => "dense".into(),
                    Form::Tucker2 { r_out, r_in } => format!("({r_out}, {r_in})"),
                    Form::Svd { rank } => format!("SVD {rank}"),
                    Form::Tucker1Out { r_out, .. } => format!("({r_out}, whole)"),
                    Form::Tucker1In { r_in, .. } => format!("(whole, {r_in})"),
                    Form::Cp { rank } => format!("CP {rank}"),
                },
                l.params_before.to_string(),
                l.params_after.to_string(),
                format!("{:.2} M", l.macs_before as f64 / 1e6),
                format!("{:.2} M", l.macs_after as f64 / 1e6),
                format!("{:.4}", l.rel_error),
            ]
            .into_iter()
            .chain(
                timed
                    .then(|| [ms(l.ms_before), ms(l.ms_after)])
                    .into_iter()
                    .flatten(),
            )
            .collect()
        })
        .collect();
    let (pb, pa) = report.conv_params();
    let (mb, ma) = report.conv_macs();
    rows.push(vec![
        "total".into(),
        String::new(),
        String::new(),
        String::new(),
        pb.to_string(),
        format!("{pa} ({:.2}× fewer)", pb as f64 / pa as f64),
        format!("{:.1} M", mb as f64 / 1e6),
        format!(
            "{:.1} M ({:.2}× fewer)",
            ma as f64 / 1e6,
            mb as f64 / ma as f64
        ),
        String::new(),
    ]);
    if let Some(forecast) = &report.latency {
        let total = rows.last_mut().expect("the total row");
        total.extend([
            ms(Some(forecast.before_ms)),
            ms(Some(forecast.predicted_ms)),
        ]);
    }
    let mut parts = vec![
        Html::heading(&format!(
            "Conv layers at {}×{} px",
            report.input_size[0], report.input_size[1]
        )),
        table(&header, &rows),
    ];
    if let Some(forecast) = &report.latency {
        parts.push(Html::paragraph(&format!(
            "Whole model (totals include {:.3} ms outside the conv slots): {}",
            forecast.outside_ms,
            forecast.summary()
        )));
    }
    Html::concat(parts)
}

/// One evaluation as a one-row table.
pub fn eval_table(label: &str, e: &EvalResult) -> Html {
    let header = ["model", "top-1", "top-5", "loss", "images", "images/s"].map(String::from);
    table(
        &header,
        &[vec![
            label.to_string(),
            format!("{:.2} %", e.top1 * 100.0),
            format!("{:.2} %", e.top5 * 100.0),
            format!("{:.4}", e.loss),
            e.images.to_string(),
            format!("{:.1}", e.images_per_s),
        ]],
    )
}

/// Several charts in one HTML block.
pub fn charts<'a>(charts: impl IntoIterator<Item = &'a Chart>) -> Html {
    // Borrowed, not moved: a notebook's charts stay in its variables after being shown.
    Html(
        charts
            .into_iter()
            .map(Chart::to_html)
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

impl CompressionReport {
    /// evcxr's display hook: the report as an HTML table.
    pub fn evcxr_display(&self) {
        report_table(self).evcxr_display();
    }
}

/// A table of named rows and named columns (strings), for summaries.
pub fn grid(header: &[&str], rows: &[Vec<String>]) -> Html {
    table(
        &header.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        rows,
    )
}
