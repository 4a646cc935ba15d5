//! `hearth compare --url URL`: prints a server's `GET /v1/hearth/compare` — the two
//! sides of every canary and shadow route — as tables.

use std::fmt::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::Value;

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// The server's base URL.
    #[arg(long, env = "HEARTH_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Its API token (the comparison is for the token holder only).
    #[arg(long, env = "HEARTH_API_TOKEN")]
    pub token: Option<String>,
    /// Print the JSON as the server sent it.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: CompareArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let v = rt.block_on(fetch(&a))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render(&v));
    }
    Ok(())
}

async fn fetch(a: &CompareArgs) -> anyhow::Result<Value> {
    let url = format!("{}/v1/hearth/compare", a.url.trim_end_matches('/'));
    let mut req = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?
        .get(&url);
    if let Some(t) = &a.token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    let body = resp.text().await.with_context(|| format!("GET {url}"))?;
    if status.as_u16() == 401 {
        bail!("GET {url}: 401: give the server's API token with --token or HEARTH_API_TOKEN");
    }
    if !status.is_success() {
        bail!(
            "GET {url}: {status}: {}",
            body.chars().take(500).collect::<String>()
        );
    }
    serde_json::from_str(&body).with_context(|| format!("GET {url}: the answer is not JSON"))
}

fn num(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "-".into(),
    }
}

fn pct(v: &Value) -> String {
    match v.as_f64() {
        Some(x) => format!("{:.1}%", x * 100.0),
        None => "-".into(),
    }
}

/// The comparison as text: a table per model, then its shadow copies and agreement.
pub fn render(v: &Value) -> String {
    let mut out = String::new();
    let models = v["models"].as_array().cloned().unwrap_or_default();
    if models.is_empty() {
        out.push_str("No model has a canary or shadow route.\n");
        return out;
    }
    for m in &models {
        let _ = writeln!(
            out,
            "{}  (route {})",
            m["model"].as_str().unwrap_or("?"),
            m["route"].as_str().unwrap_or("?")
        );
        let _ = writeln!(
            out,
            "  {:<9} {:<13} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>8} {:>8} {:>8} {:>9} {:>8}",
            "side", "role", "count", "ok", "fail", "valid", "tmout", "up5xx", "engine",
            "p50 s", "p95 s", "p99 s", "ttfo p50", "tok/s"
        );
        for side in ["local", "upstream"] {
            let s = &m["sides"][side];
            let l = &s["latency_seconds"];
            let f = &s["failed"];
            let _ = writeln!(
                out,
                "  {:<9} {:<13} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>8} {:>8} {:>8} {:>9} {:>8}",
                side,
                s["role"].as_str().unwrap_or(""),
                s["count"].to_string(),
                s["succeeded"].to_string(),
                pct(&s["failure_rate"]),
                f["validation"].to_string(),
                f["timeout"].to_string(),
                f["upstream_5xx"].to_string(),
                f["engine"].to_string(),
                num(&l["p50"], 3),
                num(&l["p95"], 3),
                num(&l["p99"], 3),
                num(&s["time_to_first_output_seconds"]["p50"], 3),
                num(&s["output_tokens_per_second"]["p50"], 1),
            );
        }
        let sh = &m["shadow"];
        if sh.is_object() {
            let k = &sh["skipped"];
            let _ = writeln!(
                out,
                "  shadow copies: {} eligible = {} sent + {} skipped (concurrency {}, rate {}, circuit {}, throttled {}, draining {}, local engine {}); {} in flight",
                sh["eligible"], sh["copies"], sh["skipped_total"], k["concurrency"], k["rate"],
                k["circuit"], k["throttled"], k["draining"], k["local_engine"], sh["in_flight"]
            );
            let a = &sh["agreement"];
            let t = &a["text"];
            let f = &a["files"];
            let _ = writeln!(
                out,
                "  agreement: {} pairs ended, {} compared, exact {}; text: similarity mean {}, p10 {}, above 0.9 {}; files: {} pairs, {} same type and size, {} unknown",
                a["pairs"], a["compared"], pct(&a["exact_rate"]),
                num(&t["similarity_mean"], 3), num(&t["similarity_p10"], 3), pct(&t["above_0_9_rate"]),
                f["pairs"], f["same_type_size_within_10pct"], f["size_unknown"]
            );
        }
        out.push('\n');
    }
    if let Some(n) = v["note"].as_str() {
        let _ = writeln!(out, "({n})");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_shows_each_side_and_the_shadow_counts() {
        let side = |role: &str, count: u64| {
            json!({"role": role, "count": count, "succeeded": count, "failure_rate": 0.0,
                   "failed": {"validation": 0, "timeout": 0, "upstream_5xx": 0, "engine": 0},
                   "latency_seconds": {"p50": 0.25, "p95": 0.5, "p99": null},
                   "time_to_first_output_seconds": {"p50": 0.01},
                   "output_tokens_per_second": {"p50": 99.0}})
        };
        let v = json!({"models": [{
            "model": "acme/llm", "route": "shadow:up:50",
            "sides": {"local": side("primary", 10), "upstream": side("shadow", 4)},
            "shadow": {"eligible": 5, "copies": 4, "skipped_total": 1, "in_flight": 0,
                       "skipped": {"concurrency": 1, "rate": 0, "circuit": 0, "throttled": 0, "draining": 0},
                       "agreement": {"pairs": 4, "compared": 4, "exact_rate": 0.75,
                                     "text": {"similarity_mean": 0.9, "similarity_p10": 0.5, "above_0_9_rate": 0.75},
                                     "files": {"pairs": 0, "same_type_size_within_10pct": 0, "size_unknown": 0}}}
        }]});
        let t = render(&v);
        assert!(t.contains("acme/llm  (route shadow:up:50)"), "{t}");
        assert!(t.contains("primary") && t.contains("shadow "), "{t}");
        // Columns line up: counts are padded like the headers.
        assert!(t.contains("primary           10     10"), "{t}");
        assert!(t.contains("0.250") && t.contains("99.0"), "{t}");
        assert!(
            t.contains("5 eligible = 4 sent + 1 skipped (concurrency 1"),
            "{t}"
        );
        assert!(t.contains("exact 75.0%"), "{t}");
        assert!(render(&json!({"models": []})).contains("No model"));
    }
}
