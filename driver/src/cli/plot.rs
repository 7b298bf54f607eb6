//! The charts, drawn with `plotters` (SVG backend only):
//!
//! - `--plot-sensitivity FILE.svg`: the per-weight sensitivities `--target-bits` measured and the
//!   choice. One column per weight, in the order of the `-v` table (graph order); a logarithmic y
//!   axis of the relative output error `e = ||X (W - Q(W))||^2 / ||X W||^2`. Filled blue circles:
//!   `e4`; filled green circles: `e8`; a red ring around the error of the chosen width. A zero
//!   error is drawn at the bottom of the axis.
//! - `nibble compare --methods ... --plot FILE.svg`: the sweep's size versus perplexity. x: bytes
//!   on disk of each model (file and external data), in MB; y: perplexity; both linear. Filled
//!   blue circles: the sweep's rows; filled orange circles: the `--reference` models; each point
//!   labelled with its name (`method bBLOCK` or the reference's label); a dashed grey line at the
//!   float model's perplexity.

use crate::error::{Error, Result};
use crate::plan::budget::BudgetPlan;
use nibble::Bits;
use plotters::prelude::*;
use std::path::Path;

/// Colour of the 4-bit errors.
pub const E4_COLOR: RGBColor = RGBColor(0, 0, 255);
/// Colour of the 8-bit errors.
pub const E8_COLOR: RGBColor = RGBColor(0, 160, 0);
/// Colour of the ring marking the chosen width.
pub const CHOSEN_COLOR: RGBColor = RGBColor(255, 0, 0);

/// Colour of the sweep's points.
pub const SWEEP_COLOR: RGBColor = RGBColor(0, 0, 255);
/// Colour of the reference models' points.
pub const REFERENCE_COLOR: RGBColor = RGBColor(255, 128, 0);
/// Colour of the float model's perplexity line.
pub const FLOAT_COLOR: RGBColor = RGBColor(128, 128, 128);

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// Draws a `width` x `height` SVG with `draw` on a white background and returns its text;
/// plotting errors become [`Error::Runtime`] prefixed with `what` (the option that asked for it).
fn render<F>(what: &str, (width, height): (u32, u32), draw: F) -> Result<String>
where
    F: FnOnce(&Area) -> std::result::Result<(), String>,
{
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| e.to_string())
            .and_then(|_| draw(&root))
            .and_then(|_| root.present().map_err(|e| e.to_string()))
            .map_err(|e| Error::Runtime(format!("{what}: {e}")))?;
    }
    Ok(svg)
}

/// One model of the size-versus-perplexity chart.
#[derive(Clone, Debug)]
pub struct SizePoint {
    /// The label drawn next to it.
    pub label: String,
    /// Bytes on disk (model file and external data).
    pub bytes: u64,
    /// Perplexity.
    pub perplexity: f64,
    /// A reference model (`--reference`) rather than a row of the sweep.
    pub reference: bool,
}

/// A range around `lo..hi` with 8% room on each side (a unit wide when they are equal).
fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let pad = if hi > lo { (hi - lo) * 0.08 } else { 0.5 * lo.abs().max(1.0) };
    (lo - pad)..(hi + pad)
}

/// The sweep's size-versus-perplexity chart (see the module docs) as SVG text; `float` is the
/// float model's perplexity, drawn as a dashed line when it lies in the drawn range or close to it.
///
/// # Errors
/// [`Error::Usage`] without points or with a non-finite perplexity; plotting errors as
/// [`Error::Runtime`].
pub fn size_perplexity_svg(points: &[SizePoint], float: Option<f64>) -> Result<String> {
    if points.is_empty() {
        return Err(Error::Usage("--plot: no model was measured".into()));
    }
    if let Some(p) = points.iter().find(|p| !p.perplexity.is_finite()) {
        return Err(Error::Usage(format!(
            "--plot: the perplexity of {} is {}; the chart needs finite perplexities",
            p.label, p.perplexity
        )));
    }
    let mb = |b: u64| b as f64 / 1e6;
    let fold = |f: fn(f64, f64) -> f64, init: f64, v: &dyn Fn(&SizePoint) -> f64| points.iter().map(v).fold(init, f);
    let x = padded(fold(f64::min, f64::INFINITY, &|p| mb(p.bytes)), fold(f64::max, 0.0, &|p| mb(p.bytes)));
    let mut y_lo = fold(f64::min, f64::INFINITY, &|p| p.perplexity);
    let y_hi = fold(f64::max, f64::NEG_INFINITY, &|p| p.perplexity);
    let float = float.filter(|f| f.is_finite());
    if let Some(f) = float {
        y_lo = y_lo.min(f);
    }
    let y = padded(y_lo, y_hi);
    render("--plot", (800, 560), |root| {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let mut chart = ChartBuilder::on(root)
            .caption("size on disk vs perplexity (blue: sweep, orange: references, dashed: float)", ("sans-serif", 16))
            .margin(14)
            .margin_right(130)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x.clone(), y)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("model file and external data (MB)")
            .y_desc("perplexity")
            .draw()
            .map_err(|x| e(&x))?;
        if let Some(f) = float {
            let style = FLOAT_COLOR.stroke_width(1);
            let dash = (x.end - x.start) / 60.0;
            let dashes = (0..30).map(|i| {
                let a = x.start + dash * 2.0 * i as f64;
                PathElement::new(vec![(a, f), (a + dash, f)], style)
            });
            chart.draw_series(dashes).map_err(|x| e(&x))?;
        }
        let font = ("sans-serif", 12).into_font().color(&BLACK);
        chart
            .draw_series(points.iter().map(|p| {
                let color = if p.reference { REFERENCE_COLOR } else { SWEEP_COLOR };
                EmptyElement::at((mb(p.bytes), p.perplexity))
                    + Circle::new((0, 0), 4, color.filled())
                    + Text::new(p.label.clone(), (6, -14), font.clone())
            }))
            .map_err(|x| e(&x))?;
        Ok(())
    })
}

/// Writes [`size_perplexity_svg`] to `path` atomically.
///
/// # Errors
/// As [`size_perplexity_svg`]; errors naming the path when it cannot be written.
pub fn write_size_perplexity_svg(points: &[SizePoint], float: Option<f64>, path: &Path) -> Result<()> {
    crate::graph::model::write_atomic(path, size_perplexity_svg(points, float)?.as_bytes())
}

/// The sensitivity chart as SVG text.
///
/// # Errors
/// [`Error::Usage`] when the plan has no weights; plotting errors as [`Error::Runtime`].
pub fn sensitivity_svg(plan: &BudgetPlan) -> Result<String> {
    let n = plan.choices.len();
    if n == 0 {
        return Err(Error::Usage("--plot-sensitivity: no weight was measured".into()));
    }
    let values = plan.choices.iter().flat_map(|c| [c.sensitivity.e4, c.sensitivity.e8]);
    let smallest = values.clone().filter(|&v| v > 0.0).fold(f64::INFINITY, f64::min);
    let largest = values.fold(0.0f64, f64::max);
    let (lo, hi) = match smallest.is_finite() {
        true => (smallest / 2.0, largest * 2.0),
        false => (1e-12, 1.0),
    };
    let at = |v: f64| v.max(lo);
    let width = (80 + 24 * n as u32).clamp(640, 4000);
    render("--plot-sensitivity", (width, 480), |root| {
        let fail = |e: &dyn std::fmt::Display| e.to_string();
        let caption = format!(
            "relative output error per weight (blue: 4-bit, green: 8-bit, red ring: chosen); target {:.3}, achieved {:.3} bits/parameter",
            plan.target_bits, plan.achieved_bits
        );
        let mut chart = ChartBuilder::on(root)
            .caption(caption, ("sans-serif", 14))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (lo..hi).log_scale())
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .x_desc("weight (row of the -v table)")
            .y_desc("||X dW||^2 / ||X W||^2")
            .x_label_formatter(&|v| format!("{}", v.round() as i64))
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .draw()
            .map_err(|e| fail(&e))?;
        let points = |f: fn(&crate::plan::budget::Choice) -> f64| {
            plan.choices.iter().enumerate().map(move |(i, c)| (i as f64, at(f(c))))
        };
        chart
            .draw_series(points(|c| c.sensitivity.e4).map(|p| Circle::new(p, 3, E4_COLOR.filled())))
            .map_err(|e| fail(&e))?;
        chart
            .draw_series(points(|c| c.sensitivity.e8).map(|p| Circle::new(p, 3, E8_COLOR.filled())))
            .map_err(|e| fail(&e))?;
        let chosen = |c: &crate::plan::budget::Choice| match c.bits {
            Bits::Four => c.sensitivity.e4,
            Bits::Eight => c.sensitivity.e8,
        };
        chart
            .draw_series(points(chosen).map(|p| Circle::new(p, 7, CHOSEN_COLOR.stroke_width(2))))
            .map_err(|e| fail(&e))?;
        Ok(())
    })
}

/// Refuses a chart path that cannot be written (a folder, or in a missing folder) before any work.
///
/// # Errors
/// [`Error::Output`] naming the path and the fix.
pub fn check_path(path: &Path) -> Result<()> {
    let err = |why: String| Err(Error::Output { path: path.to_path_buf(), why });
    if path.is_dir() {
        return err("is a folder; give a file name such as chart.svg".into());
    }
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => err(format!("folder {} does not exist", dir.display())),
        _ => Ok(()),
    }
}

/// Writes [`sensitivity_svg`] to `path` atomically ([`crate::graph::model::write_atomic`]: no
/// half-written chart is left).
///
/// # Errors
/// Errors naming the path when it cannot be written.
pub fn write_sensitivity_svg(plan: &BudgetPlan, path: &Path) -> Result<()> {
    crate::graph::model::write_atomic(path, sensitivity_svg(plan)?.as_bytes())
}
