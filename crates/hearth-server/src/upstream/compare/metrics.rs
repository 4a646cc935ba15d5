//! The comparison as Prometheus lines (`/metrics`), labelled by model and side.

use std::fmt::Write;

use super::{Comparison, SideStats, KINDS, SKIPS};
use crate::upstream::route::Route;
use crate::upstream::stats::Window;

impl Comparison {
    /// Prometheus lines, labelled by model and side (routes name only upstreams).
    pub fn render_metrics(&self, out: &mut String) {
        let Ok(models) = self.models.lock() else {
            return;
        };
        if models.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP hearth_compare_predictions_total Predictions of a canary or shadow route that ended, by side and outcome.\n# TYPE hearth_compare_predictions_total counter");
        for (name, m) in models.iter() {
            let model = escape(name);
            for (side, s) in m.sides() {
                let side = side.as_str();
                let mut row = |outcome: &str, n: u64| {
                    let _ = writeln!(out, "hearth_compare_predictions_total{{model=\"{model}\",side=\"{side}\",outcome=\"{outcome}\"}} {n}");
                };
                row("succeeded", s.succeeded);
                row("canceled", s.canceled);
                for k in KINDS {
                    row(&format!("failed_{}", k.as_str()), s.failed[k.index()]);
                }
            }
        }
        for (metric, help, pick) in [
            (
                "hearth_compare_latency_seconds",
                "Create to end of succeeded predictions (last window), by side.",
                (|s: &SideStats| &s.latency) as fn(&SideStats) -> &Window,
            ),
            (
                "hearth_compare_time_to_first_output_seconds",
                "Create to first output of succeeded predictions (last window), by side.",
                |s: &SideStats| &s.first_output,
            ),
            (
                "hearth_compare_output_tokens_per_second",
                "Output tokens per second of succeeded predictions (last window), by side.",
                |s: &SideStats| &s.tokens_per_second,
            ),
        ] {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge");
            for (name, m) in models.iter() {
                let model = escape(name);
                for (side, s) in m.sides() {
                    let w = pick(s);
                    if w.is_empty() {
                        continue;
                    }
                    let qs = [0.5, 0.95, 0.99];
                    let ps = w.percentiles(&[50.0, 95.0, 99.0]);
                    for (q, p) in qs.iter().zip(ps) {
                        if let Some(p) = p {
                            let _ = writeln!(
                                out,
                                "{metric}{{model=\"{model}\",side=\"{}\",quantile=\"{q}\"}} {p}",
                                side.as_str()
                            );
                        }
                    }
                }
            }
        }
        let shadowed: Vec<_> = models
            .iter()
            .filter(|(_, m)| matches!(m.route, Route::Shadow { .. }))
            .collect();
        if shadowed.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP hearth_compare_shadow_copies_total Shadow copies by what became of them (sent to the other side, or skipped and why).\n# TYPE hearth_compare_shadow_copies_total counter");
        for (name, m) in &shadowed {
            let model = escape(name);
            let s = &m.shadow;
            let _ = writeln!(
                out,
                "hearth_compare_shadow_copies_total{{model=\"{model}\",result=\"sent\"}} {}",
                s.started
            );
            for k in SKIPS {
                let _ = writeln!(out, "hearth_compare_shadow_copies_total{{model=\"{model}\",result=\"skipped_{}\"}} {}", k.as_str(), s.skipped[k as usize]);
            }
        }
        let _ = writeln!(out, "# HELP hearth_compare_shadow_in_flight Shadow copies running on the other side now (upstream, or the local engine for shadow-local).\n# TYPE hearth_compare_shadow_in_flight gauge");
        for (name, m) in &shadowed {
            let _ = writeln!(
                out,
                "hearth_compare_shadow_in_flight{{model=\"{}\"}} {}",
                escape(name),
                m.shadow.in_flight
            );
        }
        let _ = writeln!(out, "# HELP hearth_compare_pairs_total Shadowed pairs: ended, compared (both succeeded), exact matches, texts with similarity above 0.9.\n# TYPE hearth_compare_pairs_total counter");
        for (name, m) in &shadowed {
            let model = escape(name);
            let s = &m.shadow;
            for (kind, n) in [
                ("ended", s.pairs),
                ("compared", s.compared),
                ("exact", s.exact),
                ("text_above_0_9", s.text_above),
                ("files_agree", s.file_agree),
            ] {
                let _ = writeln!(
                    out,
                    "hearth_compare_pairs_total{{model=\"{model}\",kind=\"{kind}\"}} {n}"
                );
            }
        }
        let _ = writeln!(out, "# HELP hearth_compare_text_similarity 1 - Levenshtein/longer length of shadowed text pairs (last window): mean and 10th percentile.\n# TYPE hearth_compare_text_similarity gauge");
        for (name, m) in &shadowed {
            let w = &m.shadow.similarity;
            if let (Some(mean), Some(p10)) = (w.mean(), w.percentiles(&[10.0])[0]) {
                let model = escape(name);
                let _ = writeln!(
                    out,
                    "hearth_compare_text_similarity{{model=\"{model}\",stat=\"mean\"}} {mean}"
                );
                let _ = writeln!(
                    out,
                    "hearth_compare_text_similarity{{model=\"{model}\",stat=\"p10\"}} {p10}"
                );
            }
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
