//! `--plot-sensitivity FILE.svg`: the per-weight sensitivities `--target-bits` measured and the
//! choice, drawn with `plotters` (SVG backend only).
//!
//! One column per weight, in the order of the `-v` table (graph order); a logarithmic y axis of
//! the relative output error `e = ||X (W - Q(W))||^2 / ||X W||^2`. Filled blue circles: `e4`;
//! filled green circles: `e8`; a red ring around the error of the chosen width. A zero error is
//! drawn at the bottom of the axis.

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

/// The chart as SVG text.
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
    let mut svg = String::new();
    let width = (80 + 24 * n as u32).clamp(640, 4000);
    let fail = |e: String| Error::Runtime(format!("--plot-sensitivity: {e}"));
    {
        let root = SVGBackend::with_string(&mut svg, (width, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        let caption = format!(
            "relative output error per weight (blue: 4-bit, green: 8-bit, red ring: chosen); target {:.3}, achieved {:.3} bits/parameter",
            plan.target_bits, plan.achieved_bits
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 14))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (lo..hi).log_scale())
            .map_err(|e| fail(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("weight (row of the -v table)")
            .y_desc("||X dW||^2 / ||X W||^2")
            .x_label_formatter(&|v| format!("{}", v.round() as i64))
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        let points = |f: fn(&crate::plan::budget::Choice) -> f64| {
            plan.choices.iter().enumerate().map(move |(i, c)| (i as f64, at(f(c))))
        };
        chart
            .draw_series(points(|c| c.sensitivity.e4).map(|p| Circle::new(p, 3, E4_COLOR.filled())))
            .map_err(|e| fail(e.to_string()))?;
        chart
            .draw_series(points(|c| c.sensitivity.e8).map(|p| Circle::new(p, 3, E8_COLOR.filled())))
            .map_err(|e| fail(e.to_string()))?;
        let chosen = |c: &crate::plan::budget::Choice| match c.bits {
            Bits::Four => c.sensitivity.e4,
            Bits::Eight => c.sensitivity.e8,
        };
        chart
            .draw_series(points(chosen).map(|p| Circle::new(p, 7, CHOSEN_COLOR.stroke_width(2))))
            .map_err(|e| fail(e.to_string()))?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    Ok(svg)
}

/// Refuses a chart path that cannot be written (a folder, or in a missing folder) before any work.
///
/// # Errors
/// [`Error::Output`] naming the path and the fix.
pub fn check_path(path: &Path) -> Result<()> {
    let err = |why: String| Err(Error::Output { path: path.to_path_buf(), why });
    if path.is_dir() {
        return err("is a folder; give a file name such as sensitivity.svg".into());
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
