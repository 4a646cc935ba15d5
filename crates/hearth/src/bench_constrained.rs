//! `hearth bench --json-schema`: the same workload unconstrained, then held to a JSON
//! Schema, in one process after a warm-up pass, and the two compared (issue 21's figure).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use hearth_runtime::{ConstraintSpec, EngineHandle};

use crate::bench::{measure, summary, BenchArgs, Report, Work};
use crate::bench_http;

pub(crate) fn run(
    rt: &tokio::runtime::Runtime,
    a: &BenchArgs,
    engine: &Option<EngineHandle>,
    http: &Option<Arc<bench_http::HttpTarget>>,
    work: Work,
    max_concurrency: Option<usize>,
    schema_path: &Path,
) -> anyhow::Result<Report> {
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(schema_path)
            .with_context(|| format!("reading {}", schema_path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", schema_path.display()))?;
    let Some(engine_ref) = engine.as_ref() else {
        bail!("--json-schema needs --offline");
    };
    let spec = ConstraintSpec::JsonSchema(schema);
    let compiler = engine_ref.constraints();
    let t = Instant::now();
    let constraint = compiler.compile(&spec, "json_schema")?;
    let first_compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    compiler.compile(&spec, "json_schema")?;
    let cached_compile_ms = t.elapsed().as_secs_f64() * 1e3;
    // A first pass over the whole workload warms the engine (allocations, caches) and
    // leaves every prompt's prefix cached, so the two measured runs start from the same
    // state: warming only the first batch left the run measured second with prefix hits
    // the first did not have (at c=1, a TTFT 40 ms lower for that alone).
    measure(rt, a, engine, http, work.clone(), None, max_concurrency)?;
    let plain = measure(rt, a, engine, http, work.clone(), None, max_concurrency)?;
    eprint!("unconstrained: ");
    summary(&plain, None, true);
    let constrained = measure(rt, a, engine, http, work, Some(constraint), max_concurrency)?;
    eprint!("constrained:   ");
    summary(&constrained, None, true);
    let ratio = constrained.output_throughput / plain.output_throughput.max(f64::MIN_POSITIVE);
    eprintln!(
        "constrained/unconstrained output tok/s: {ratio:.3}; TTFT p50 {:+.1} ms; mask {:.1} µs per constrained token on the mask workers, {:.1} µs per mask on the engine thread ({} masks); schema compile {first_compile_ms:.1} ms first (vocabulary trie included), {cached_compile_ms:.3} ms cached",
        constrained.median_ttft_ms - plain.median_ttft_ms,
        constrained.mean_mask_us,
        constrained.mean_mask_engine_us,
        constrained.constraint_masks,
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "unconstrained": plain, "constrained": constrained,
                "output_throughput_ratio": ratio,
                "first_compile_ms": first_compile_ms, "cached_compile_ms": cached_compile_ms,
            })
        );
    }
    if plain.completed == 0 || constrained.completed == 0 {
        bail!("no request completed");
    }
    Ok(constrained)
}
