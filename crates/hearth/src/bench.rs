//! `hearth bench`: load generation the way `vllm bench serve` does, with its field
//! names, in-process (`--offline`) so the engine's own throughput is measured.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use hearth_runtime::{
    Constraint, EngineHandle, FinishReason, GenerationEvent, GenerationRequest, SamplingParams,
};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::args::{EngineArgs, ModelArgs};
use crate::bench_workload::{workload, Prompt};
use crate::{bench_constrained, bench_http};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Run the engine in this process.
    #[arg(long, conflicts_with = "url")]
    pub offline: bool,
    /// Drive a running server instead, through the API `--backend` names; `--model` is
    /// the model's name there (owner/name).
    #[arg(long)]
    pub url: Option<String>,
    /// API token for --url.
    #[arg(long, env = "REPLICATE_API_TOKEN")]
    pub api_token: Option<String>,
    /// With --url, the API to drive (vLLM's names): `replicate` (predictions + SSE),
    /// `openai` (/v1/completions) or `openai-chat` (/v1/chat/completions), streamed; or
    /// `llama-cpp` (llama.cpp's llama-server through its streaming `/completion`: same
    /// prompts, greedy, EOS ignored).
    #[arg(long, default_value = "replicate", value_parser = ["replicate", "openai", "openai-chat", "llama-cpp"])]
    pub backend: String,
    /// With --url: the local model whose tokenizer turns random token ids into prompt text.
    #[arg(long, default_value = "demo")]
    pub tokenizer: String,
    #[arg(long, default_value_t = 100)]
    pub num_prompts: usize,
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Most requests in flight at once (default: all).
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Requests per second with Poisson arrivals; `inf` sends everything at once.
    #[arg(long, default_value = "inf")]
    pub request_rate: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// ShareGPT-style JSON: each conversation's first human turn is a prompt, the
    /// reply's length in tokens its output length.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Also time a plain single-sequence forward loop of the same model.
    #[arg(long)]
    pub baseline: bool,
    /// Print one JSON object last on stdout (with --sweep, one a line per run).
    #[arg(long)]
    pub json: bool,
    /// Run once per concurrency listed (`1,2,4,8,16`), each with --num-prompts requests.
    #[arg(long, value_delimiter = ',', conflicts_with = "max_concurrency")]
    pub sweep: Vec<usize>,
    /// Write an SVG of output throughput against concurrency and TTFT and TPOT p50/p99
    /// (of the run, or of each --sweep run).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Run nothing: draw figures a script saved (one JSON object a line: `series`, `x`,
    /// `output_throughput`, `median_ttft_ms`, `median_tpot_ms`) as a comparison of the
    /// series over the loads, into --plot (benches/vs-llama-cpp.sh does).
    #[arg(long, value_name = "FIGURES.jsonl", requires = "plot",
          conflicts_with_all = ["offline", "url", "sweep", "json_schema"])]
    pub plot_from: Option<PathBuf>,
    /// With --plot-from: the plot's title.
    #[arg(
        long,
        requires = "plot_from",
        default_value = "hearth bench: a comparison"
    )]
    pub plot_title: String,
    /// With --plot-from: what the x axis is (`load`, `concurrency`).
    #[arg(long, requires = "plot_from", default_value = "load")]
    pub plot_x: String,
    /// Run the workload twice, unconstrained and then with every output constrained to
    /// this JSON Schema, and compare: output tok/s, TTFT, and the time the token masks
    /// took per constrained token (with --offline).
    #[arg(long, requires = "offline", conflicts_with_all = ["sweep", "plot"])]
    pub json_schema: Option<PathBuf>,
}

#[derive(Debug, Default)]
pub(crate) struct RequestResult {
    pub ok: bool,
    pub prompt_len: usize,
    pub output_tokens: usize,
    pub ttft: f64,
    pub e2e: f64,
    pub itls: Vec<f64>,
}

#[derive(Serialize)]
pub(crate) struct Report {
    backend: String,
    model: String,
    num_prompts: usize,
    max_concurrency: usize,
    request_rate: String,
    pub(crate) completed: usize,
    failed: usize,
    total_input_tokens: usize,
    total_output_tokens: usize,
    duration: f64,
    request_throughput: f64,
    pub(crate) output_throughput: f64,
    total_token_throughput: f64,
    mean_ttft_ms: f64,
    pub(crate) median_ttft_ms: f64,
    p99_ttft_ms: f64,
    mean_tpot_ms: f64,
    median_tpot_ms: f64,
    p99_tpot_ms: f64,
    mean_itl_ms: f64,
    median_itl_ms: f64,
    p99_itl_ms: f64,
    /// Create (or request) to the last event, per request.
    mean_e2el_ms: f64,
    median_e2el_ms: f64,
    p99_e2el_ms: f64,
    engine_steps: u64,
    engine_steps_per_s: f64,
    preemptions: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline_steps_per_s: Option<f64>,
    /// Token masks computed in the run, their mean time on the mask workers, and the
    /// engine thread's mean time on constraints per mask (tokens consumed, waits).
    pub(crate) constraint_masks: u64,
    pub(crate) mean_mask_us: f64,
    pub(crate) mean_mask_engine_us: f64,
    /// hearth's own kernel launches per engine step (offline on CUDA; candle's not counted).
    #[serde(skip_serializing_if = "Option::is_none")]
    kernel_launches_per_step: Option<f64>,
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Linear-interpolated percentile, as numpy computes it.
fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = p / 100.0 * (s.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (rank - lo as f64)
}

async fn offline_request(
    engine: EngineHandle,
    prompt: Vec<u32>,
    output_len: usize,
    constraint: Option<Constraint>,
) -> RequestResult {
    let prompt_len = prompt.len();
    // EOS is ignored; a constrained output still ends where its grammar accepts.
    let params = SamplingParams {
        max_tokens: output_len,
        ignore_eos: true,
        constraint,
        ..SamplingParams::default()
    };
    let start = Instant::now();
    let mut r = RequestResult {
        prompt_len,
        ..Default::default()
    };
    let mut stream = match engine.submit(GenerationRequest { prompt, params }) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "request refused");
            return r;
        }
    };
    let mut last = start;
    while let Some(ev) = stream.next().await {
        match ev {
            GenerationEvent::Token { .. } => {
                let now = Instant::now();
                if r.output_tokens == 0 {
                    r.ttft = (now - start).as_secs_f64();
                } else {
                    r.itls.push((now - last).as_secs_f64());
                }
                last = now;
                r.output_tokens += 1;
            }
            GenerationEvent::Finished(c) => {
                r.ok = c.reason == FinishReason::Length || c.reason == FinishReason::Stop;
                break;
            }
            GenerationEvent::Started { .. } => {}
        }
    }
    r.e2e = start.elapsed().as_secs_f64();
    r
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if let (Some(from), Some(path)) = (&a.plot_from, &a.plot) {
        let text = std::fs::read_to_string(from)
            .with_context(|| format!("--plot-from {}", from.display()))?;
        let figures = crate::bench_plot::read_figures(&text)
            .with_context(|| format!("--plot-from {}", from.display()))?;
        std::fs::write(
            path,
            crate::bench_plot::compare_svg(&a.plot_title, &a.plot_x, &figures),
        )
        .with_context(|| format!("--plot {}", path.display()))?;
        eprintln!("plot written to {}", path.display());
        return Ok(());
    }
    if a.sweep.contains(&0) {
        bail!("--sweep: every concurrency must be at least 1");
    }
    let runs: Vec<Option<usize>> = if a.sweep.is_empty() {
        vec![a.max_concurrency]
    } else {
        a.sweep.iter().map(|c| Some(*c)).collect()
    };
    let mut points = Vec::with_capacity(runs.len());
    for max_concurrency in runs {
        let r = run_once(&a, max_concurrency)?;
        points.push(crate::bench_plot::Point {
            concurrency: r.max_concurrency,
            output_throughput: r.output_throughput,
            median_ttft_ms: r.median_ttft_ms,
            p99_ttft_ms: r.p99_ttft_ms,
            median_tpot_ms: r.median_tpot_ms,
            p99_tpot_ms: r.p99_tpot_ms,
        });
    }
    if let Some(path) = &a.plot {
        let title = format!(
            "hearth bench: {} via {}, {} prompts, {} in / {} out tokens",
            a.model.model,
            if a.url.is_some() {
                a.backend.as_str()
            } else {
                "offline"
            },
            a.num_prompts,
            a.input_len,
            a.output_len
        );
        std::fs::write(path, crate::bench_plot::svg(&title, &points))
            .with_context(|| format!("--plot {}", path.display()))?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

/// One run at `max_concurrency` (None: every request at once).
fn run_once(a: &BenchArgs, max_concurrency: Option<usize>) -> anyhow::Result<Report> {
    if !a.offline && a.url.is_none() {
        bail!("choose --offline (the engine in this process) or --url http://HOST:PORT (a running server)");
    }
    if a.num_prompts == 0 {
        bail!("--num-prompts must be at least 1");
    }
    if a.request_rate.is_nan() || a.request_rate <= 0.0 {
        bail!("--request-rate must be > 0 (or inf)");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let spec = a.model.spec();
    let mut baseline_steps_per_s = None;
    let (engine, http, work) = match &a.url {
        None => {
            if a.baseline {
                let (_, model) = hearth_runtime::loader::load_model(&spec)?;
                let steps = a.output_len.max(16);
                let took = hearth_runtime::baseline::single_sequence_decode(
                    &model,
                    a.input_len.max(1),
                    steps,
                )?;
                baseline_steps_per_s = Some(steps as f64 / took.as_secs_f64());
            }
            let loaded =
                hearth_runtime::load(&spec, &a.engine.config()).context("loading the model")?;
            let engine = loaded.engine;
            let vocab = (engine.tokenizer().inner().get_vocab_size(true) as u32)
                .min(engine.limits().vocab_size as u32);
            let work = workload(a, engine.tokenizer(), vocab, false, 0)?;
            (Some(engine), None, work)
        }
        Some(url) => {
            let files = hearth_runtime::loader::resolve(&hearth_runtime::ModelSpec::new(
                a.tokenizer.clone(),
            ))?;
            let tok = files.load_tokenizer()?;
            let vocab = tok.inner().get_vocab_size(true) as u32;
            // Chat prompts go through the model's template on the server: the same
            // number of prompt tokens as the other backends means less text here.
            let reserve = if a.backend == "openai-chat" {
                tok.prompt_tokens(&hearth_runtime::PromptSpec {
                    messages: vec![hearth_runtime::ChatMessage::new("user", "")],
                    ..Default::default()
                })?
                .len()
            } else {
                0
            };
            let work = workload(a, &tok, vocab, true, reserve)?;
            let target = bench_http::HttpTarget {
                api: bench_http::Api::parse(&a.backend),
                // A fresh connection per request: llama-server (cpp-httplib) closes idle
                // keep-alive connections on its own schedule, and a request sent on one
                // it just closed fails with "error sending request" (1-3 of 32 at c=16
                // before). A loopback connect is tens of microseconds, alike for both.
                client: reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .build()?,
                base: url
                    .trim_end_matches('/')
                    .trim_end_matches("/v1")
                    .to_string(),
                model: a.model.model.clone(),
                token: a.api_token.clone(),
            };
            (None, Some(Arc::new(target)), work)
        }
    };
    let Some(schema_path) = &a.json_schema else {
        let report = measure(&rt, a, &engine, &http, work, None, max_concurrency)?;
        return finish(a, report, baseline_steps_per_s, engine.is_some());
    };
    bench_constrained::run(&rt, a, &engine, &http, work, max_concurrency, schema_path)
}

pub(crate) type Work = Vec<(Prompt, usize)>;

/// Runs the workload once and reports it.
pub(crate) fn measure(
    rt: &tokio::runtime::Runtime,
    a: &BenchArgs,
    engine: &Option<EngineHandle>,
    http: &Option<Arc<bench_http::HttpTarget>>,
    work: Work,
    constraint: Option<Constraint>,
    max_concurrency: Option<usize>,
) -> anyhow::Result<Report> {
    let n = work.len();
    let concurrency = max_concurrency.unwrap_or(n).max(1);
    let bar = indicatif::ProgressBar::new(n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} requests {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let before = engine.as_ref().map(|e| e.stats()).unwrap_or_default();
    let started = Instant::now();
    let results: Vec<RequestResult> = rt.block_on(async {
        let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed ^ 0xA11CE);
        let mut arrival = Duration::ZERO;
        let mut tasks = Vec::with_capacity(n);
        for (prompt, out_len) in work {
            if a.request_rate.is_finite() {
                // Exponential gaps: a Poisson process of the given rate.
                let u: f64 = rng.random_range(f64::EPSILON..1.0);
                arrival += Duration::from_secs_f64(-u.ln() / a.request_rate);
            }
            let (engine, http, sem, bar) = (engine.clone(), http.clone(), sem.clone(), bar.clone());
            let constraint = constraint.clone();
            let at = arrival;
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(tokio::time::Instant::from_std(started + at)).await;
                let _permit = sem.acquire_owned().await;
                let len = prompt.len();
                let r = match (prompt, engine, http) {
                    (Prompt::Tokens(p), Some(e), _) => {
                        offline_request(e, p, out_len, constraint).await
                    }
                    (Prompt::Text(p, _), _, Some(h)) => bench_http::request(h, p, out_len)
                        .await
                        .unwrap_or_else(|e| {
                            tracing::warn!(error = %e, "request failed");
                            RequestResult {
                                prompt_len: len,
                                ..Default::default()
                            }
                        }),
                    _ => RequestResult::default(),
                };
                bar.inc(1);
                r
            }));
        }
        let mut out = Vec::with_capacity(n);
        for t in tasks {
            out.push(t.await.unwrap_or_default());
        }
        out
    });
    let duration = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let stats = engine.as_ref().map(|e| e.stats()).unwrap_or_default();
    let ok: Vec<&RequestResult> = results.iter().filter(|r| r.ok).collect();
    let total_input: usize = ok.iter().map(|r| r.prompt_len).sum();
    let total_output: usize = ok.iter().map(|r| r.output_tokens).sum();
    let ttfts: Vec<f64> = ok.iter().map(|r| r.ttft * 1e3).collect();
    let e2els: Vec<f64> = ok.iter().map(|r| r.e2e * 1e3).collect();
    let tpots: Vec<f64> = ok
        .iter()
        .filter(|r| r.output_tokens > 1)
        .map(|r| (r.e2e - r.ttft) / (r.output_tokens - 1) as f64 * 1e3)
        .collect();
    let itls: Vec<f64> = ok
        .iter()
        .flat_map(|r| r.itls.iter().map(|x| x * 1e3))
        .collect();
    let steps = stats.steps.saturating_sub(before.steps);
    let masks = stats
        .constraint_masks
        .saturating_sub(before.constraint_masks);
    let mask_secs = stats.constraint_mask_secs - before.constraint_mask_secs;
    let engine_secs = stats.constraint_engine_secs - before.constraint_engine_secs;
    let per_mask = |secs: f64| {
        if masks > 0 {
            secs / masks as f64 * 1e6
        } else {
            0.0
        }
    };
    let launches = stats.kernel_launches.saturating_sub(before.kernel_launches);
    let report = Report {
        backend: match &a.url {
            None => "offline".into(),
            Some(_) => a.backend.clone(),
        },
        model: a.model.model.clone(),
        num_prompts: n,
        max_concurrency: concurrency,
        request_rate: if a.request_rate.is_finite() {
            a.request_rate.to_string()
        } else {
            "inf".into()
        },
        completed: ok.len(),
        failed: results.len() - ok.len(),
        total_input_tokens: total_input,
        total_output_tokens: total_output,
        duration,
        request_throughput: ok.len() as f64 / duration,
        output_throughput: total_output as f64 / duration,
        total_token_throughput: (total_input + total_output) as f64 / duration,
        mean_ttft_ms: mean(&ttfts),
        median_ttft_ms: percentile(&ttfts, 50.0),
        p99_ttft_ms: percentile(&ttfts, 99.0),
        mean_tpot_ms: mean(&tpots),
        median_tpot_ms: percentile(&tpots, 50.0),
        p99_tpot_ms: percentile(&tpots, 99.0),
        mean_itl_ms: mean(&itls),
        median_itl_ms: percentile(&itls, 50.0),
        p99_itl_ms: percentile(&itls, 99.0),
        mean_e2el_ms: mean(&e2els),
        median_e2el_ms: percentile(&e2els, 50.0),
        p99_e2el_ms: percentile(&e2els, 99.0),
        engine_steps: steps,
        engine_steps_per_s: steps as f64 / duration,
        preemptions: stats.num_preemptions.saturating_sub(before.num_preemptions),
        baseline_steps_per_s: None,
        constraint_masks: masks,
        mean_mask_us: per_mask(mask_secs),
        mean_mask_engine_us: per_mask(engine_secs),
        kernel_launches_per_step: (a.url.is_none() && a.model.device.starts_with("cuda"))
            .then(|| launches as f64 / steps.max(1) as f64),
    };
    Ok(report)
}

pub(crate) fn summary(report: &Report, baseline_steps_per_s: Option<f64>, offline: bool) {
    eprintln!(
        "{} requests ({} failed) in {:.2}s: {:.1} output tok/s, {:.1} req/s, TTFT p50 {:.1} ms, TPOT p50 {:.2} ms{}{}{}",
        report.completed,
        report.failed,
        report.duration,
        report.output_throughput,
        report.request_throughput,
        report.median_ttft_ms,
        report.median_tpot_ms,
        if offline { format!(", {:.1} steps/s", report.engine_steps_per_s) } else { String::new() },
        match report.kernel_launches_per_step {
            Some(l) => format!(", {l:.1} hearth kernel launches/step (candle's not counted)"),
            None => String::new(),
        },
        match baseline_steps_per_s {
            Some(b) => format!(" (plain single-sequence loop: {b:.1} steps/s)"),
            None => String::new(),
        }
    );
}

fn finish(
    a: &BenchArgs,
    mut report: Report,
    baseline_steps_per_s: Option<f64>,
    offline: bool,
) -> anyhow::Result<Report> {
    report.baseline_steps_per_s = baseline_steps_per_s;
    summary(&report, baseline_steps_per_s, offline);
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    if report.completed == 0 {
        bail!("no request completed");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(super::percentile(&v, 50.0), 2.5);
        assert!((super::percentile(&v, 99.0) - 3.97).abs() < 1e-9);
        assert_eq!(super::percentile(&[], 50.0), 0.0);
    }
}
