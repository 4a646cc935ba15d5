//! `hearth bench --plot FILE.svg`: each run's output throughput against its
//! concurrency, and its TTFT and TPOT percentiles (p50, p99), as one SVG of three
//! panels that a browser or RESULTS.md shows as it is. Drawn here: a chart is a few
//! lines and points, no plotting crate needed.

use std::fmt::Write;

/// One bench run as the plot needs it.
#[derive(Debug, Clone)]
pub struct Point {
    pub concurrency: usize,
    pub output_throughput: f64,
    pub median_ttft_ms: f64,
    pub p99_ttft_ms: f64,
    pub median_tpot_ms: f64,
    pub p99_tpot_ms: f64,
}

const PANEL_W: f64 = 320.0;
const PANEL_H: f64 = 240.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 14.0;
const TOP: f64 = 48.0;
const BOTTOM: f64 = 40.0;
const COLORS: [&str; 2] = ["#2563eb", "#d97706"];

/// Text for SVG: `&`, `<`, `>` and quotes escaped.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A short label for an axis value.
fn label(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// One panel at `x0`: `series` (name, a value per point) over the points' x labels
/// (concurrencies, or loads), the x axis named `x_axis`.
#[allow(clippy::too_many_arguments)]
fn panel(
    out: &mut String,
    x0: f64,
    title: &str,
    unit: &str,
    x_axis: &str,
    xs: &[String],
    series: &[(&str, Vec<f64>)],
) {
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let top = if max > 0.0 { max * 1.1 } else { 1.0 };
    let (w, h) = (PANEL_W - LEFT - RIGHT, PANEL_H - TOP - BOTTOM);
    // Concurrencies at even steps, labelled: sweeps double them, a log scale by hand.
    let x = |i: usize| {
        x0 + LEFT
            + if xs.len() > 1 {
                i as f64 * w / (xs.len() - 1) as f64
            } else {
                w / 2.0
            }
    };
    let y = |v: f64| TOP + (1.0 - (v / top).clamp(0.0, 1.0)) * h;
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" class="title">{}</text>"#,
        x0 + LEFT,
        TOP - 26.0,
        esc(title)
    );
    for k in 0..=4 {
        let v = top * k as f64 / 4.0;
        let _ = writeln!(
            out,
            r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" class="grid"/><text x="{:.1}" y="{:.1}" class="tick" text-anchor="end">{}</text>"#,
            x0 + LEFT,
            y(v),
            x0 + LEFT + w,
            y(v),
            x0 + LEFT - 4.0,
            y(v) + 3.0,
            esc(&label(v))
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" class="tick" text-anchor="end">{}</text>"#,
        x0 + LEFT - 4.0,
        TOP - 8.0,
        esc(unit)
    );
    for (i, c) in xs.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" class="tick" text-anchor="middle">{}</text>"#,
            x(i),
            TOP + h + 14.0,
            esc(c)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" class="tick" text-anchor="middle">{}</text>"#,
        x0 + LEFT + w / 2.0,
        TOP + h + 30.0,
        esc(x_axis)
    );
    for (s, (name, values)) in series.iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        let pts: Vec<String> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2" class="series" data-series="{}"/>"#,
            pts.join(" "),
            esc(name)
        );
        for (i, v) in values.iter().enumerate().filter(|(_, v)| v.is_finite()) {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"><title>{} at {} {}: {} {}</title></circle>"#,
                x(i),
                y(*v),
                esc(name),
                esc(x_axis),
                esc(&xs[i]),
                esc(&label(*v)),
                esc(unit)
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" class="legend" fill="{color}">{}</text>"#,
            x0 + LEFT + 80.0 * s as f64,
            TOP - 10.0,
            esc(name)
        );
    }
}

/// The SVG for `points` (sorted by concurrency here), under `title`.
pub fn svg(title: &str, points: &[Point]) -> String {
    let mut p = points.to_vec();
    p.sort_by_key(|p| p.concurrency);
    let xs: Vec<String> = p.iter().map(|p| p.concurrency.to_string()).collect();
    let col = |f: fn(&Point) -> f64| p.iter().map(f).collect::<Vec<f64>>();
    let mut out = open(title);
    let c = "concurrency";
    panel(
        &mut out,
        0.0,
        "Output throughput",
        "tok/s",
        c,
        &xs,
        &[("tokens/s", col(|p| p.output_throughput))],
    );
    panel(
        &mut out,
        PANEL_W,
        "Time to first token",
        "ms",
        c,
        &xs,
        &[
            ("p50", col(|p| p.median_ttft_ms)),
            ("p99", col(|p| p.p99_ttft_ms)),
        ],
    );
    panel(
        &mut out,
        PANEL_W * 2.0,
        "Time per output token",
        "ms",
        c,
        &xs,
        &[
            ("p50", col(|p| p.median_tpot_ms)),
            ("p99", col(|p| p.p99_tpot_ms)),
        ],
    );
    close(out)
}

/// The document's head and title; the panels go below it.
fn open(title: &str) -> String {
    let width = PANEL_W * 3.0;
    let height = PANEL_H + 28.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" font-family="system-ui, sans-serif">"#
    );
    out.push_str(
        "<style>.title{font-size:13px;font-weight:600}.tick,.legend{font-size:10px}.tick{fill:#555}\
         .grid{stroke:#ddd;stroke-width:1}</style>\n",
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="8" y="16" class="title">{}</text>"#,
        esc(title)
    );
    out.push_str("<g transform=\"translate(0,22)\">\n");
    out
}

fn close(mut out: String) -> String {
    out.push_str("</g>\n</svg>\n");
    out
}

/// One figure of a comparison (`hearth bench --plot-from`): an engine (`series`) on
/// one load (`x`: a concurrency, or a label such as `c=16 long`), as a script that
/// compares engines computed it (a mean or median over its rounds). One JSON object a
/// line.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Figure {
    pub series: String,
    pub x: serde_json::Value,
    pub output_throughput: f64,
    pub median_ttft_ms: f64,
    pub median_tpot_ms: f64,
}

/// Reads figures, one JSON object a line (blank lines skipped); a bad line is an error
/// naming its number.
pub fn read_figures(text: &str) -> anyhow::Result<Vec<Figure>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Figure = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("line {}: {e} (expected {{\"series\", \"x\", \"output_throughput\", \"median_ttft_ms\", \"median_tpot_ms\"}})", i + 1))?;
        out.push(f);
    }
    if out.is_empty() {
        anyhow::bail!("no figures in it");
    }
    Ok(out)
}

/// The SVG comparing engines: output throughput, TTFT p50 and TPOT p50 over the loads,
/// a line per series; loads and series in the order they first appear, a load an
/// engine has no figure for left out of its line.
pub fn compare_svg(title: &str, x_axis: &str, figures: &[Figure]) -> String {
    let label = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut xs: Vec<String> = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    for f in figures {
        let x = label(&f.x);
        if !xs.contains(&x) {
            xs.push(x);
        }
        if !names.contains(&f.series.as_str()) {
            names.push(&f.series);
        }
    }
    let col = |name: &str, get: fn(&Figure) -> f64| -> Vec<f64> {
        xs.iter()
            .map(|x| {
                figures
                    .iter()
                    .find(|f| f.series == name && label(&f.x) == *x)
                    .map(get)
                    .unwrap_or(f64::NAN)
            })
            .collect()
    };
    let series = |get: fn(&Figure) -> f64| -> Vec<(&str, Vec<f64>)> {
        names.iter().map(|n| (*n, col(n, get))).collect()
    };
    let mut out = open(title);
    panel(
        &mut out,
        0.0,
        "Output throughput",
        "tok/s",
        x_axis,
        &xs,
        &series(|f| f.output_throughput),
    );
    panel(
        &mut out,
        PANEL_W,
        "Time to first token, p50",
        "ms",
        x_axis,
        &xs,
        &series(|f| f.median_ttft_ms),
    );
    panel(
        &mut out,
        PANEL_W * 2.0,
        "Time per output token, p50",
        "ms",
        x_axis,
        &xs,
        &series(|f| f.median_tpot_ms),
    );
    close(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(c: usize, tput: f64, ttft: f64) -> Point {
        Point {
            concurrency: c,
            output_throughput: tput,
            median_ttft_ms: ttft,
            p99_ttft_ms: ttft * 2.0,
            median_tpot_ms: 5.0,
            p99_tpot_ms: 9.0,
        }
    }

    /// The y of each circle, in drawing order (throughput first).
    fn circles_y(svg: &str) -> Vec<f64> {
        svg.split("<circle cx=\"")
            .skip(1)
            .map(|s| {
                let cy = s.split("cy=\"").nth(1).unwrap();
                cy.split('"').next().unwrap().parse().unwrap()
            })
            .collect()
    }

    #[test]
    fn a_point_per_run_and_series_sorted_by_concurrency() {
        let s = svg(
            "demo & <friends>",
            &[
                point(4, 300.0, 20.0),
                point(1, 100.0, 10.0),
                point(2, 200.0, 15.0),
            ],
        );
        // 3 runs: throughput, TTFT p50 and p99, TPOT p50 and p99.
        assert_eq!(s.matches("<circle").count(), 15);
        assert_eq!(s.matches("<polyline").count(), 5);
        assert!(s.contains("demo &amp; &lt;friends&gt;"));
        assert!(!s.contains("<friends>"));
        // Throughput grows with concurrency: each point higher (smaller y) than the last.
        let ys = circles_y(&s);
        assert!(ys[0] > ys[1] && ys[1] > ys[2], "{ys:?}");
        let first = s.find(">1</text>").unwrap();
        let second = s.find(">2</text>").unwrap();
        assert!(first < second, "concurrency labels in order");
        assert!(s.contains("tokens/s at concurrency 4: 300 tok/s"));
    }

    /// What vs-llama-cpp.sh writes for two loads, llama.cpp missing one.
    const FIGURES: &str = r#"{"series": "hearth", "x": "c=1 short", "output_throughput": 50.0, "median_ttft_ms": 30.0, "median_tpot_ms": 20.0}

{"series": "llama.cpp", "x": "c=1 short", "output_throughput": 100.0, "median_ttft_ms": 10.0, "median_tpot_ms": 10.0}
{"series": "hearth", "x": "c=16 <long>", "output_throughput": 200.0, "median_ttft_ms": 900.0, "median_tpot_ms": 40.0}
"#;

    #[test]
    fn a_comparison_draws_a_line_per_engine_over_the_loads() {
        let f = read_figures(FIGURES).unwrap();
        let s = compare_svg("hearth vs llama.cpp", "load", &f);
        // Three panels of two series each: 6 lines; 3 figures, each in 3 panels.
        assert_eq!(s.matches("<polyline").count(), 6);
        assert_eq!(s.matches("<circle").count(), 9);
        assert!(s.contains(r#"data-series="llama.cpp""#));
        assert!(s.contains("c=16 &lt;long&gt;") && !s.contains("<long>"));
        assert!(s.contains("llama.cpp at load c=1 short: 100 tok/s"));
        // hearth's throughput rises from the first load to the second: its second
        // point is higher (smaller y) than its first.
        let ys = circles_y(&s);
        assert!(ys[1] < ys[0], "{ys:?}");
        // Concurrencies as numbers are labels too.
        let f = read_figures(
            r#"{"series": "a", "x": 16, "output_throughput": 1, "median_ttft_ms": 1, "median_tpot_ms": 1}"#,
        )
        .unwrap();
        assert!(compare_svg("t", "concurrency", &f).contains(">16</text>"));
    }

    #[test]
    fn bad_figures_name_the_line() {
        let e = read_figures("\n{\"series\": \"a\"}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("output_throughput"),
            "{e}"
        );
        assert!(read_figures("\n")
            .unwrap_err()
            .to_string()
            .contains("no figures"));
    }

    #[test]
    fn one_run_and_zero_values_still_draw() {
        let s = svg("one", &[point(8, 0.0, f64::NAN)]);
        assert_eq!(
            s.matches("<circle").count(),
            3,
            "the NaN TTFTs are left out"
        );
        assert!(s.ends_with("</svg>\n"));
    }
}
