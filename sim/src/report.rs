//! Human-readable output: the comparison table, the benchmark sweep and its plot.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::SimError;
use crate::metrics::{Report, UploadPcts};

/// Picks the plotted value out of a report.
type Metric = fn(&Report) -> f64;

/// One row of a comparison: a label and the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// What the row ran (scenario and peers).
    pub label: String,
    /// The result.
    pub report: Report,
}

/// The markdown table of `rows`.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(
        "| scenario | mode | p2p_ratio | origin_egress_ratio | block_delay p50/p95/p99 ms | continuity | dup_ratio | control_overhead | corrupt played | upload×bitrate p50/p99 | hostile kicked | events | wall s | threads | max RSS MiB |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let m = &r.report;
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.2} | {:.0}/{:.0}/{:.0} | {:.4} | {:.3} | {:.4} | {} | {} | {}/{} | {} | {:.1} | {} | {:.0} |",
            r.label,
            m.mode,
            m.p2p_ratio,
            m.origin_egress_ratio,
            m.block_delay_ms.p50,
            m.block_delay_ms.p95,
            m.block_delay_ms.p99,
            m.continuity,
            m.dup_ratio,
            m.control_overhead,
            m.corrupt_blocks_played,
            upload(&m.upload_x_bitrate),
            m.hostile_kicked,
            m.hostile_viewers,
            m.events,
            m.wall_seconds,
            m.threads,
            m.max_rss_mib,
        );
    }
    s
}

/// Upload p50/p99 for the table: n/a when no viewer was present long enough
/// to be measured.
fn upload(u: &UploadPcts) -> String {
    if u.viewers == 0 {
        "n/a".to_owned()
    } else {
        format!("{:.2}/{:.2}", u.p50, u.p99)
    }
}

/// An SVG with two log-log panels: origin_egress_ratio and block_delay p95
/// against the number of peers, one line per mode.
pub fn svg(rows: &[Row], modes: &[&str]) -> String {
    let colors = ["#1b9e77", "#d95f02", "#7570b3"];
    let (w, h, pad) = (420.0, 300.0, 50.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        2.0 * w,
        h + 30.0
    );
    let panels: [(&str, Metric); 2] = [
        ("origin_egress_ratio (× bitrate)", |r| {
            r.origin_egress_ratio
        }),
        ("block_delay_ms p95", |r| r.block_delay_ms.p95),
    ];
    let peers = |r: &Row| {
        r.report
            .config
            .get("peers")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(1.0)
    };
    let pts: Vec<&Row> = rows
        .iter()
        .filter(|r| r.label.starts_with("steady"))
        .collect();
    let (xmin, xmax) = pts
        .iter()
        .map(|r| peers(r))
        .fold((f64::MAX, 1.0f64), |(a, b), x| (a.min(x), b.max(x)));
    for (pi, (title, f)) in panels.iter().enumerate() {
        let ox = pi as f64 * w;
        let vals: Vec<f64> = pts.iter().map(|r| f(&r.report).max(0.1)).collect();
        let ymin = vals.iter().copied().fold(f64::MAX, f64::min).min(1.0);
        let ymax = vals.iter().copied().fold(1.0, f64::max) * 1.5;
        let lx = |x: f64| {
            ox + pad + (x.ln() - xmin.ln()) / (xmax.ln() - xmin.ln()).max(1e-9) * (w - 2.0 * pad)
        };
        let ly = |y: f64| {
            h - pad + 10.0
                - (y.ln() - ymin.ln()) / (ymax.ln() - ymin.ln()).max(1e-9) * (h - 2.0 * pad)
        };
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"16\" font-weight=\"bold\">{title} vs peers (log-log)</text>",
            ox + pad
        );
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>",
            ox + pad,
            pad - 10.0 + 10.0,
            w - 2.0 * pad,
            h - 2.0 * pad
        );
        for x in pts
            .iter()
            .map(|r| peers(r) as u64)
            .collect::<std::collections::BTreeSet<u64>>()
        {
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{x}</text>",
                lx(x as f64),
                h - pad + 25.0
            );
        }
        for y in [ymin, (ymin * ymax).sqrt(), ymax / 1.5] {
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{y:.1}</text>",
                ox + pad - 4.0,
                ly(y) + 4.0
            );
        }
        for (mi, mode) in modes.iter().enumerate() {
            let line: Vec<(f64, f64)> = pts
                .iter()
                .filter(|r| r.report.mode == *mode)
                .map(|r| (lx(peers(r)), ly(f(&r.report).max(0.1))))
                .collect();
            let d: Vec<String> = line.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let c = colors[mi % colors.len()];
            let _ = writeln!(
                s,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"/>",
                d.join(" ")
            );
            for (x, y) in &line {
                let _ = writeln!(
                    s,
                    "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{c}\"/>"
                );
            }
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{c}\">{mode}</text>",
                ox + pad + 8.0,
                pad + 14.0 + 14.0 * mi as f64
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// Writes `text` to `dir/name`.
pub fn write(dir: &Path, name: &str, text: &str) -> Result<(), SimError> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), text)?;
    Ok(())
}
