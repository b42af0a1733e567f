//! The picture of a `lanes bench` sweep: p99 event-to-prediction latency and events per
//! batch against the offered rate, one curve per window setting, the latency target
//! and the recommended setting marked.

use std::path::Path;

use anyhow::Context;
use plotters::coord::Shift;
use plotters::coord::combinators::{LogCoord, WithKeyPoints};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::bench::Setting;

const SIZE: (u32, u32) = (1200, 520);

/// Draws `settings` to an SVG file at `path`; `best` is the recommended setting and
/// whether it meets `target_ms`.
pub fn draw(
    path: &Path,
    title: &str,
    settings: &[Setting],
    target_ms: f64,
    best: Option<(usize, bool)>,
) -> anyhow::Result<()> {
    let svg = render(title, settings, target_ms, best)?;
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

/// The SVG text of the picture.
pub fn render(
    title: &str,
    settings: &[Setting],
    target_ms: f64,
    best: Option<(usize, bool)>,
) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let root = root.titled(title, ("sans-serif", 20)).map_err(plot_err)?;
        let (left, right) = root.split_horizontally(SIZE.0 / 2);
        let points = || settings.iter().flat_map(|s| s.points.iter());
        let (lo, hi) = points().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
            (lo.min(p.rate as f64), hi.max(p.rate as f64))
        });
        let (lo, hi) = if lo > hi {
            (1.0, 10.0)
        } else {
            (lo / 1.5, hi * 1.5)
        };
        // Ticks at the measured rates only: a log axis's own ticks crowd together.
        let mut rates: Vec<f64> = points().map(|p| p.rate as f64).collect();
        rates.sort_by(f64::total_cmp);
        rates.dedup();
        let x_axis = || (lo..hi).log_scale().with_key_points(rates.clone());
        let top_ms = points().map(|p| p.p99_ms).fold(target_ms, f64::max) * 1.15;
        let top_batch = points().map(|p| p.mean_batch).fold(1.0, f64::max) * 1.15;
        let mut latency = panel(
            &left,
            "p99 event -> prediction",
            "p99 latency, ms",
            x_axis(),
            top_ms,
        )?;
        latency
            .draw_series(LineSeries::new(
                [(lo, target_ms), (hi, target_ms)],
                BLACK.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label(format!("target {target_ms} ms"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK.stroke_width(2)));
        curves(&mut latency, settings, best, |p| p.p99_ms)?;
        latency
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;

        let mut batch = panel(
            &right,
            "events per batch",
            "mean events per micro-batch",
            x_axis(),
            top_batch,
        )?;
        curves(&mut batch, settings, best, |p| p.mean_batch)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

type Panel<'a, DB> =
    ChartContext<'a, DB, Cartesian2d<WithKeyPoints<LogCoord<f64>>, RangedCoordf64>>;

/// One panel over the rate axis `x`, from 0 to `top`, its mesh drawn.
fn panel<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    caption: &str,
    y_desc: &str,
    x: WithKeyPoints<LogCoord<f64>>,
    top: f64,
) -> anyhow::Result<Panel<'a, DB>> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x, 0.0..top)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("offered rate, events/s")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_desc(y_desc)
        .draw()
        .map_err(plot_err)?;
    Ok(chart)
}

/// One curve per setting of `value` against the rate, labelled for the legend; the
/// recommended (or closest) setting `best` drawn thicker.
fn curves<DB: DrawingBackend>(
    chart: &mut Panel<'_, DB>,
    settings: &[Setting],
    best: Option<(usize, bool)>,
    value: fn(&crate::bench::Point) -> f64,
) -> anyhow::Result<()> {
    let colour = |i: usize| Palette99::pick(i).to_rgba();
    for (i, s) in settings.iter().enumerate() {
        let width = if best.is_some_and(|(b, _)| b == i) {
            4
        } else {
            2
        };
        let label = match best {
            Some((b, true)) if b == i => format!("{} (recommended)", s.label()),
            Some((b, false)) if b == i => format!("{} (closest)", s.label()),
            _ => s.label(),
        };
        let line: Vec<(f64, f64)> = s.points.iter().map(|p| (p.rate as f64, value(p))).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), colour(i).stroke_width(width)))
            .map_err(plot_err)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 16, y)], colour(i).stroke_width(3))
            });
        chart
            .draw_series(
                line.into_iter()
                    .map(|p| Circle::new(p, 3, colour(i).filled())),
            )
            .map_err(plot_err)?;
    }
    Ok(())
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e:?}")
}
