//! The overview's chart, drawn by the server as SVG: tries that ended per
//! minute over the last hour, stacked by outcome, and the longest wait
//! before start of each minute as a line (the queue lag as tries saw it).
//! Colours are presentation attributes, not styles, so the CSP holds.

use maud::{html, Markup};

use crate::store::web::MinuteBucket;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 180.0;
const LEFT: f64 = 40.0;
const RIGHT: f64 = 50.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 20.0;

/// Outcomes in stacking order, with their colours.
const OUTCOMES: [(&str, &str); 6] = [
    ("FINISHED", "#3a8f4a"),
    ("FAILED", "#d0453a"),
    ("TIMEOUT", "#e08a2c"),
    ("CRASHED", "#8a3ad0"),
    ("CANCELLED", "#888888"),
    ("other", "#4a78c0"),
];

fn colour_key(result: &str) -> usize {
    OUTCOMES
        .iter()
        .position(|(name, _)| *name == result)
        .unwrap_or(OUTCOMES.len() - 1)
}

pub(crate) fn tries_and_lag(minutes: &[MinuteBucket]) -> Markup {
    // counts[minute][outcome], minute 0 = 59 minutes ago (left) … 59 = now.
    let mut counts = [[0i64; OUTCOMES.len()]; 60];
    let mut lag = [0f64; 60];
    for bucket in minutes.iter().filter(|b| (0..60).contains(&b.minutes_ago)) {
        let column = 59 - bucket.minutes_ago as usize;
        counts[column][colour_key(&bucket.result)] += bucket.count;
        lag[column] = lag[column].max(bucket.max_wait_seconds);
    }
    let max_count = counts
        .iter()
        .map(|c| c.iter().sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let max_lag = lag.iter().cloned().fold(0.0, f64::max).max(1.0);
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let bar = plot_width / 60.0;
    let total: i64 = counts.iter().flatten().sum();
    // (column, outcome, count, count of the outcomes below it in the stack)
    let mut segments = Vec::new();
    for (column, stack) in counts.iter().enumerate() {
        let mut base = 0i64;
        for (outcome, count) in stack.iter().enumerate() {
            if *count > 0 {
                segments.push((column, outcome, *count, base));
                base += count;
            }
        }
    }
    let lag_points: Vec<String> = lag
        .iter()
        .enumerate()
        .map(|(i, l)| {
            format!(
                "{:.1},{:.1}",
                LEFT + bar * (i as f64 + 0.5),
                TOP + plot_height - plot_height * l / max_lag
            )
        })
        .collect();
    html! {
        figure.chart {
            svg xmlns="http://www.w3.org/2000/svg" viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) width=(WIDTH) height=(HEIGHT) role="img" aria-label="tries per minute and lag over the last hour" {
                rect x=(LEFT) y=(TOP) width=(plot_width) height=(plot_height) fill="#fafafa" stroke="#cccccc" {}
                @for (column, outcome, count, base) in &segments {
                    @let y0 = TOP + plot_height - plot_height * (base + count) as f64 / max_count as f64;
                    @let h = plot_height * *count as f64 / max_count as f64;
                    rect x=(format!("{:.1}", LEFT + bar * *column as f64 + 1.0)) y=(format!("{y0:.1}")) width=(format!("{:.1}", bar - 2.0)) height=(format!("{h:.1}")) fill=(OUTCOMES[*outcome].1) {
                        title { (count) " " (OUTCOMES[*outcome].0) ", " (59 - column) " min ago" }
                    }
                }
                polyline points=(lag_points.join(" ")) fill="none" stroke="#222222" stroke-width="1.5" {}
                text x=(LEFT - 4.0) y=(TOP + 10.0) text-anchor="end" font-size="10" { (max_count) }
                text x=(LEFT - 4.0) y=(TOP + plot_height) text-anchor="end" font-size="10" { "0" }
                text x=(WIDTH - RIGHT + 4.0) y=(TOP + 10.0) font-size="10" { (format!("{max_lag:.0} s")) }
                text x=(WIDTH - RIGHT + 4.0) y=(TOP + plot_height) font-size="10" { "0 s" }
                text x=(LEFT) y=(HEIGHT - 5.0) font-size="10" { "60 min ago" }
                text x=(WIDTH - RIGHT) y=(HEIGHT - 5.0) text-anchor="end" font-size="10" { "now" }
            }
            figcaption {
                "Tries ended per minute (" (total) " in the hour; bars, left scale), by outcome: "
                @for (name, colour) in OUTCOMES {
                    span.key { svg width="10" height="10" { rect width="10" height="10" fill=(colour) {} } " " (name) " " }
                }
                "; the line is the longest wait before start in each minute (right scale). A request counts once, for its latest try."
            }
        }
    }
}
