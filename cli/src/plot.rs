//! `dtrain plot --metrics FILE --out FILE.svg`: draw training loss and throughput against the
//! iteration from a metrics JSONL file, as a hand-written SVG (two panels sharing the x axis).
//! Test accuracy (each epoch's end and every `--eval-every` evaluation) is drawn in the loss
//! panel against its own axis on the right, 0-100 %.
//!
//! Input: one JSON object per line. Training lines carry `iteration` and `loss` (and
//! optionally `images_per_s`, `seconds`, `comm_seconds`); evaluation lines carry
//! `test_accuracy` and/or `test_loss` (placed at their `iteration`, else after the preceding
//! training line). Blank lines are skipped.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::Value;

#[derive(Args, Debug, Clone)]
pub struct PlotArgs {
    /// Metrics file written by --metrics (JSON lines)
    #[arg(long, value_name = "FILE")]
    pub metrics: PathBuf,
    /// SVG file to write
    #[arg(long, value_name = "FILE.svg")]
    pub out: PathBuf,
    /// Title [default: the metrics file name]
    #[arg(long)]
    pub title: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no training lines (objects with \"iteration\" and \"loss\"); is it a --metrics file?", path.display())]
    Empty { path: PathBuf },
    #[error("{}: line {line}: {detail}", path.display())]
    Corrupt {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One training iteration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainPoint {
    pub iteration: f64,
    pub loss: f64,
    pub images_per_s: Option<f64>,
}

/// One evaluation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalPoint {
    pub iteration: Option<f64>,
    pub test_accuracy: Option<f64>,
    pub test_loss: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    pub train: Vec<TrainPoint>,
    pub eval: Vec<EvalPoint>,
}

fn number(obj: &serde_json::Map<String, Value>, key: &str) -> Option<f64> {
    obj.get(key)
        .and_then(Value::as_f64)
        .filter(|v| v.is_finite())
}

/// Parse the text of a metrics file (`path` only names it in errors).
pub fn parse_metrics(path: &Path, text: &str) -> Result<Metrics, PlotError> {
    let mut m = Metrics::default();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let corrupt = |detail: String| PlotError::Corrupt {
            path: path.to_path_buf(),
            line: line_no,
            detail,
        };
        let value: Value =
            serde_json::from_str(line).map_err(|e| corrupt(format!("not valid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(corrupt("expected a JSON object".into()));
        };
        let iteration = number(&obj, "iteration");
        if obj.contains_key("test_accuracy") || obj.contains_key("test_loss") {
            m.eval.push(EvalPoint {
                // An evaluation without an iteration happened after the last training line.
                iteration: iteration.or(m.train.last().map(|p| p.iteration)),
                test_accuracy: number(&obj, "test_accuracy"),
                test_loss: number(&obj, "test_loss"),
            });
            continue;
        }
        match (iteration, obj.get("loss")) {
            (Some(iteration), Some(loss)) => {
                // A diverged run may log null/NaN losses: skip the point, keep the rest.
                if let Some(loss) = loss.as_f64().filter(|v| v.is_finite()) {
                    m.train.push(TrainPoint {
                        iteration,
                        loss,
                        images_per_s: number(&obj, "images_per_s"),
                    });
                }
            }
            _ => {
                return Err(corrupt(
                    "expected \"iteration\" and \"loss\" (training) or \"test_accuracy\"/\"test_loss\" (evaluation)"
                        .into(),
                ))
            }
        }
    }
    if m.train.is_empty() {
        return Err(PlotError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(m)
}

pub fn read_metrics(path: &Path) -> Result<Metrics, PlotError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlotError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_metrics(path, &text)
}

/// `dtrain plot`.
pub fn run(args: &PlotArgs) -> Result<(), PlotError> {
    let metrics = read_metrics(&args.metrics)?;
    let title = args.title.clone().unwrap_or_else(|| {
        format!(
            "dtrain: {}",
            args.metrics
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        )
    });
    let svg = render_svg(&metrics, &title);
    std::fs::write(&args.out, svg).map_err(|source| PlotError::Write {
        path: args.out.clone(),
        source,
    })?;
    eprintln!(
        "dtrain plot: {} iterations, {} evaluations → {}",
        metrics.train.len(),
        metrics.eval.len(),
        args.out.display()
    );
    Ok(())
}

/// Tick positions for [lo, hi]: a step of 1, 2 or 5 × 10^k giving about `target` ticks.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, f64) {
    let span = (hi - lo).abs().max(f64::MIN_POSITIVE);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    let mut ticks = Vec::new();
    let mut k = 0;
    loop {
        let t = first + k as f64 * step;
        if t > hi + step * 1e-9 {
            break;
        }
        ticks.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        k += 1;
    }
    (ticks, step)
}

/// A tick label with as many decimals as the step needs.
pub fn tick_label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil().clamp(0.0, 6.0) as usize
    };
    if v.abs() >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v.abs() >= 1e4 && step >= 1000.0 {
        format!("{}k", v / 1e3)
    } else {
        format!("{v:.decimals$}")
    }
}

/// Rounded-out data range with a little headroom; a flat series gets a unit-wide range.
fn padded_range(values: impl Iterator<Item = f64>, include_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if include_zero {
        lo = lo.min(0.0);
    }
    if hi - lo < 1e-12 {
        let pad = if hi.abs() > 0.0 { hi.abs() * 0.1 } else { 1.0 };
        return (lo - pad, hi + pad);
    }
    let pad = (hi - lo) * 0.05;
    (
        if include_zero && lo == 0.0 {
            0.0
        } else {
            lo - pad
        },
        hi + pad,
    )
}

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 660.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 60.0;

struct Panel {
    top: f64,
    height: f64,
    x: (f64, f64),
    y: (f64, f64),
}

impl Panel {
    fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x.0) / (self.x.1 - self.x.0) * (WIDTH - LEFT - RIGHT)
    }
    fn py(&self, y: f64) -> f64 {
        self.top + self.height - (y - self.y.0) / (self.y.1 - self.y.0) * self.height
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn draw_axes(svg: &mut String, p: &Panel, y_label: &str, x_label: &str) {
    let right = WIDTH - RIGHT;
    let bottom = p.top + p.height;
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{}" width="{}" height="{}" fill="#ffffff" stroke="#333333" stroke-width="1"/>"##,
        p.top,
        right - LEFT,
        p.height
    );
    let (xt, xs) = nice_ticks(p.x.0, p.x.1, 8);
    for t in xt {
        let x = p.px(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{bottom}" stroke="#e4e4e4"/><line x1="{x:.1}" y1="{bottom}" x2="{x:.1}" y2="{}" stroke="#333333"/><text x="{x:.1}" y="{}" font-size="12" text-anchor="middle">{}</text>"##,
            p.top,
            bottom + 5.0,
            bottom + 19.0,
            tick_label(t, xs)
        );
    }
    let (yt, ys) = nice_ticks(p.y.0, p.y.1, 5);
    for t in yt {
        let y = p.py(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#e4e4e4"/><line x1="{}" y1="{y:.1}" x2="{LEFT}" y2="{y:.1}" stroke="#333333"/><text x="{}" y="{:.1}" font-size="12" text-anchor="end">{}</text>"##,
            LEFT - 5.0,
            LEFT - 8.0,
            y + 4.0,
            tick_label(t, ys)
        );
    }
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{}" font-size="13" text-anchor="middle">{}</text>"##,
        (LEFT + right) / 2.0,
        bottom + 36.0,
        escape(x_label)
    );
    let cy = p.top + p.height / 2.0;
    let _ = writeln!(
        svg,
        r##"<text x="24" y="{cy:.1}" font-size="13" text-anchor="middle" transform="rotate(-90 24 {cy:.1})">{}</text>"##,
        escape(y_label)
    );
}

fn polyline(svg: &mut String, p: &Panel, pts: &[(f64, f64)], color: &str, width: f64) {
    if pts.is_empty() {
        return;
    }
    let mut d = String::new();
    for (x, y) in pts {
        let _ = write!(d, "{:.2},{:.2} ", p.px(*x), p.py(*y));
    }
    let _ = writeln!(
        svg,
        r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="{width}" stroke-linejoin="round"/>"##,
        d.trim_end()
    );
}

/// Exponential moving average, to show the trend of a noisy per-iteration series.
fn smooth(pts: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let alpha = (2.0 / (pts.len() as f64 / 20.0 + 1.0)).clamp(0.02, 1.0);
    let mut out = Vec::with_capacity(pts.len());
    let mut ema = None;
    for &(x, y) in pts {
        let e = match ema {
            None => y,
            Some(prev) => prev + alpha * (y - prev),
        };
        ema = Some(e);
        out.push((x, e));
    }
    out
}

fn legend(svg: &mut String, x: f64, y: f64, items: &[(&str, &str, bool)]) {
    // A translucent box so the legend stays readable over the data.
    let _ = writeln!(
        svg,
        r##"<rect x="{:.1}" y="{:.1}" width="150" height="{:.1}" fill="#ffffff" fill-opacity="0.85" stroke="#cccccc"/>"##,
        x - 6.0,
        y - 16.0,
        16.0 * items.len() as f64 + 8.0
    );
    let mut yy = y;
    for (label, color, dot) in items {
        if *dot {
            let _ = writeln!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{color}"/>"##,
                x + 10.0,
                yy - 4.0
            );
        } else {
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="2.5"/>"##,
                yy - 4.0,
                x + 20.0,
                yy - 4.0
            );
        }
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{yy:.1}" font-size="12">{}</text>"##,
            x + 26.0,
            escape(label)
        );
        yy += 16.0;
    }
}

const ACCURACY_COLOR: &str = "#31a354";

/// Test accuracy in percent (metrics hold it in [0, 1]; older files may hold percent).
fn percent(acc: f64) -> f64 {
    if acc <= 1.0 {
        acc * 100.0
    } else {
        acc
    }
}

/// Test accuracy over `p`'s x range against a 0-100 % axis on the right edge: a line
/// through the evaluations, a dot at each. Returns whether there was any.
fn draw_accuracy(svg: &mut String, p: &Panel, eval: &[EvalPoint]) -> bool {
    let acc: Vec<(f64, f64)> = eval
        .iter()
        .filter_map(|e| Some((e.iteration?, percent(e.test_accuracy?))))
        .collect();
    if acc.is_empty() {
        return false;
    }
    let axis = Panel {
        top: p.top,
        height: p.height,
        x: p.x,
        y: (0.0, 100.0),
    };
    let right = WIDTH - RIGHT;
    for t in (0..=100).step_by(20) {
        let y = axis.py(t as f64);
        let _ = writeln!(
            svg,
            r##"<line x1="{right}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="{ACCURACY_COLOR}"/><text x="{}" y="{:.1}" font-size="12" fill="{ACCURACY_COLOR}">{t}%</text>"##,
            right + 5.0,
            right + 8.0,
            y + 4.0
        );
    }
    let cy = p.top + p.height / 2.0;
    let lx = WIDTH - 8.0;
    let _ = writeln!(
        svg,
        r##"<text x="{lx}" y="{cy:.1}" font-size="13" fill="{ACCURACY_COLOR}" text-anchor="middle" transform="rotate(90 {lx} {cy:.1})">test accuracy</text>"##
    );
    polyline(svg, &axis, &acc, ACCURACY_COLOR, 2.0);
    for (x, y) in &acc {
        let _ = writeln!(
            svg,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{ACCURACY_COLOR}"/>"##,
            axis.px(*x),
            axis.py(*y)
        );
    }
    true
}

/// The whole picture: title, loss panel (training loss, its moving average, test loss dots),
/// throughput panel (images/s), shared iteration axis.
pub fn render_svg(m: &Metrics, title: &str) -> String {
    let loss: Vec<(f64, f64)> = m.train.iter().map(|p| (p.iteration, p.loss)).collect();
    let ips: Vec<(f64, f64)> = m
        .train
        .iter()
        .filter_map(|p| p.images_per_s.map(|v| (p.iteration, v)))
        .collect();
    let test_loss: Vec<(f64, f64)> = m
        .eval
        .iter()
        .filter_map(|e| Some((e.iteration?, e.test_loss?)))
        .collect();
    let (x_lo, x_hi) = {
        let lo = loss.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
        let hi = loss.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        if hi > lo {
            (lo, hi)
        } else {
            (lo - 0.5, hi + 0.5)
        }
    };
    let loss_panel = Panel {
        top: 70.0,
        height: 230.0,
        x: (x_lo, x_hi),
        y: padded_range(
            loss.iter()
                .map(|p| p.1)
                .chain(test_loss.iter().map(|p| p.1)),
            true,
        ),
    };
    let ips_panel = Panel {
        top: 370.0,
        height: 220.0,
        x: (x_lo, x_hi),
        y: padded_range(ips.iter().map(|p| p.1), true),
    };

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="DejaVu Sans, Arial, sans-serif">"##
    );
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="#fafafa"/>"##
    );
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="32" font-size="18" font-weight="bold" text-anchor="middle">{}</text>"##,
        WIDTH / 2.0,
        escape(title)
    );
    // Summary line under the title.
    let mut summary = format!(
        "{} iterations, final loss {:.4}",
        m.train.len(),
        loss.last().map(|p| p.1).unwrap_or(f64::NAN)
    );
    if !ips.is_empty() {
        let mean = ips.iter().map(|p| p.1).sum::<f64>() / ips.len() as f64;
        let _ = write!(summary, ", mean {mean:.1} images/s");
    }
    if let Some(acc) = m.eval.iter().rev().find_map(|e| e.test_accuracy) {
        let _ = write!(summary, ", last test accuracy {:.2}%", percent(acc));
    }
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="52" font-size="12" fill="#555555" text-anchor="middle">{}</text>"##,
        WIDTH / 2.0,
        escape(&summary)
    );

    draw_axes(&mut svg, &loss_panel, "loss", "iteration");
    polyline(&mut svg, &loss_panel, &loss, "#9ecae1", 1.0);
    polyline(&mut svg, &loss_panel, &smooth(&loss), "#08519c", 2.0);
    for (x, y) in &test_loss {
        let _ = writeln!(
            svg,
            r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="#d94801"/>"##,
            loss_panel.px(*x),
            loss_panel.py(*y)
        );
    }
    let mut items = vec![
        ("training loss", "#9ecae1", false),
        ("moving average", "#08519c", false),
    ];
    if !test_loss.is_empty() {
        items.push(("test loss", "#d94801", true));
    }
    if draw_accuracy(&mut svg, &loss_panel, &m.eval) {
        items.push(("test accuracy (right)", ACCURACY_COLOR, true));
    }
    legend(
        &mut svg,
        WIDTH - RIGHT - 150.0,
        loss_panel.top + 20.0,
        &items,
    );

    draw_axes(&mut svg, &ips_panel, "images/s", "iteration");
    if ips.is_empty() {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" font-size="14" fill="#777777" text-anchor="middle">no images_per_s in the metrics</text>"##,
            (LEFT + WIDTH - RIGHT) / 2.0,
            ips_panel.top + ips_panel.height / 2.0
        );
    } else {
        polyline(&mut svg, &ips_panel, &ips, "#a1d99b", 1.0);
        polyline(&mut svg, &ips_panel, &smooth(&ips), "#006d2c", 2.0);
        legend(
            &mut svg,
            WIDTH - RIGHT - 150.0,
            // Bottom right: throughput is plotted from zero, so its curve runs high.
            ips_panel.top + ips_panel.height - 26.0,
            &[
                ("images/s", "#a1d99b", false),
                ("moving average", "#006d2c", false),
            ],
        );
    }
    let _ = writeln!(svg, "</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let (t, s) = nice_ticks(0.0, 1000.0, 5);
        assert_eq!(s, 200.0);
        assert_eq!(t, vec![0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]);
        let (t, s) = nice_ticks(0.13, 2.41, 5);
        assert_eq!(s, 0.5);
        assert_eq!(t, vec![0.5, 1.0, 1.5, 2.0]);
        assert_eq!(tick_label(0.5, 0.5), "0.5");
        assert_eq!(tick_label(400.0, 200.0), "400");
        assert_eq!(tick_label(0.25, 0.05), "0.25");
    }

    #[test]
    fn parses_training_and_eval_lines() {
        let text = "{\"iteration\":1,\"loss\":2.3,\"seconds\":0.5,\"images_per_s\":128.0,\"comm_seconds\":0.1}\n\
                    \n\
                    {\"iteration\":2,\"loss\":null}\n\
                    {\"iteration\":2,\"test_accuracy\":0.41,\"test_loss\":1.7}\n\
                    {\"epoch\":0,\"test_loss\":1.5}\n";
        let m = parse_metrics(Path::new("m.jsonl"), text).unwrap();
        assert_eq!(
            m.train,
            vec![TrainPoint {
                iteration: 1.0,
                loss: 2.3,
                images_per_s: Some(128.0)
            }]
        );
        assert_eq!(m.eval.len(), 2);
        assert_eq!(m.eval[0].test_accuracy, Some(0.41));
        // No iteration: placed after the last training line (iteration 1).
        assert_eq!(m.eval[1].iteration, Some(1.0));
        assert_eq!(m.eval[1].test_loss, Some(1.5));
    }

    #[test]
    fn bad_files_give_clear_errors() {
        let p = Path::new("m.jsonl");
        let e = parse_metrics(p, "").unwrap_err().to_string();
        assert!(
            e.contains("m.jsonl") && e.contains("no training lines"),
            "{e}"
        );
        let e = parse_metrics(p, "{\"iteration\":1,\"loss\":2}\n{oops\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("not valid JSON"), "{e}");
        let e = parse_metrics(p, "[1,2]").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("JSON object"), "{e}");
        let e = parse_metrics(p, "{\"step\":1}").unwrap_err().to_string();
        assert!(e.contains("\"iteration\""), "{e}");
        let e = read_metrics(Path::new("/nonexistent/dir/m.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read /nonexistent/dir/m.jsonl"), "{e}");
    }

    #[test]
    fn svg_maps_points_into_the_panels() {
        let m = Metrics {
            train: (0..=100)
                .map(|i| TrainPoint {
                    iteration: i as f64,
                    loss: 2.0 - i as f64 * 0.01,
                    images_per_s: Some(100.0 + i as f64),
                })
                .collect(),
            eval: vec![EvalPoint {
                iteration: Some(100.0),
                test_accuracy: Some(0.5),
                test_loss: Some(1.2),
            }],
        };
        let svg = render_svg(&m, "a <title>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &lt;title&gt;"));
        assert!(svg.contains("last test accuracy 50.00%"));
        // Loss, its average, throughput, its average, test accuracy.
        assert_eq!(svg.matches("<polyline").count(), 5);
        // 50 % accuracy at iteration 100: the right edge, half-way down the loss panel.
        let (x, y) = (WIDTH - RIGHT, 70.0 + 230.0 / 2.0);
        let dot = format!(r##"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{ACCURACY_COLOR}"/>"##);
        assert!(svg.contains(&dot), "{svg}");
        assert!(svg.contains("test accuracy (right)"));
        // Iteration 0 sits on the left edge of the plot area, iteration 100 on the right.
        let first_point = svg.split("points=\"").nth(1).unwrap();
        assert!(
            first_point.starts_with(&format!("{LEFT:.2},")),
            "{}",
            &first_point[..20]
        );
        assert!(svg.contains(&format!("{:.2},", WIDTH - RIGHT)));
    }
}
