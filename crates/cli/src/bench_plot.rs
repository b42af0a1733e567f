//! The picture of a `lanes bench` sweep: p99 event-to-prediction latency and events per
//! batch against the offered rate, one curve per window setting, the latency target
//! and the recommended setting marked.

use std::path::Path;

use anyhow::Context;
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
        let colour = |i: usize| Palette99::pick(i).to_rgba();
        let style = |i: usize| {
            let width = if best.is_some_and(|(b, _)| b == i) {
                4
            } else {
                2
            };
            colour(i).stroke_width(width)
        };
        let label = |i: usize, s: &Setting| match best {
            Some((b, true)) if b == i => format!("{} (recommended)", s.label()),
            Some((b, false)) if b == i => format!("{} (closest)", s.label()),
            _ => s.label(),
        };

        let mut latency = ChartBuilder::on(&left)
            .caption("p99 event -> prediction", ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(x_axis(), 0.0..top_ms)
            .map_err(plot_err)?;
        latency
            .configure_mesh()
            .x_desc("offered rate, events/s")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .y_desc("p99 latency, ms")
            .draw()
            .map_err(plot_err)?;
        latency
            .draw_series(LineSeries::new(
                [(lo, target_ms), (hi, target_ms)],
                BLACK.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label(format!("target {target_ms} ms"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK.stroke_width(2)));
        for (i, s) in settings.iter().enumerate() {
            let line: Vec<(f64, f64)> =
                s.points.iter().map(|p| (p.rate as f64, p.p99_ms)).collect();
            latency
                .draw_series(LineSeries::new(line.clone(), style(i)))
                .map_err(plot_err)?
                .label(label(i, s))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], colour(i).stroke_width(3))
                });
            latency
                .draw_series(
                    line.into_iter()
                        .map(|p| Circle::new(p, 3, colour(i).filled())),
                )
                .map_err(plot_err)?;
        }
        latency
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;

        let mut batch = ChartBuilder::on(&right)
            .caption("events per batch", ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(x_axis(), 0.0..top_batch)
            .map_err(plot_err)?;
        batch
            .configure_mesh()
            .x_desc("offered rate, events/s")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .y_desc("mean events per micro-batch")
            .draw()
            .map_err(plot_err)?;
        for (i, s) in settings.iter().enumerate() {
            let line: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(|p| (p.rate as f64, p.mean_batch))
                .collect();
            batch
                .draw_series(LineSeries::new(line.clone(), style(i)))
                .map_err(plot_err)?;
            batch
                .draw_series(
                    line.into_iter()
                        .map(|p| Circle::new(p, 3, colour(i).filled())),
                )
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e:?}")
}
