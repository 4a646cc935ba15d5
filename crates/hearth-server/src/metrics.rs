//! Prometheus metrics with vLLM's names (what dashboards already expect), labelled
//! with the model name; engine gauges are read at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub struct Histogram {
    buckets: &'static [f64],
    state: Mutex<(Vec<u64>, f64, u64)>,
}

/// vLLM's buckets for request latencies, in seconds.
const LATENCY: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];

impl Histogram {
    fn new(buckets: &'static [f64]) -> Self {
        Self {
            buckets,
            state: Mutex::new((vec![0; buckets.len()], 0.0, 0)),
        }
    }

    pub fn observe(&self, v: f64) {
        if let Ok(mut s) = self.state.lock() {
            for (i, b) in self.buckets.iter().enumerate() {
                if v <= *b {
                    s.0[i] += 1;
                }
            }
            s.1 += v;
            s.2 += 1;
        }
    }

    /// The upper bounds and the count at or below each (cumulative), the sum and the
    /// count: what the console's history diffs between samples.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let (cumulative, sum, count) = self
            .state
            .lock()
            .map(|s| (s.0.clone(), s.1, s.2))
            .unwrap_or_else(|_| (vec![0; self.buckets.len()], 0.0, 0));
        HistogramSnapshot {
            bounds: self.buckets,
            cumulative,
            sum,
            count,
        }
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let Ok(s) = self.state.lock() else { return };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in self.buckets.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {}", s.0[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", s.2);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", s.1);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", s.2);
    }
}

#[derive(Debug, Clone)]
pub struct HistogramSnapshot {
    pub bounds: &'static [f64],
    pub cumulative: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

/// The predictions of a routed model that its upstream served: how they ended and
/// their create-to-end latency. Each is also in the model's totals, so the local
/// engine's side is the totals less these (the console's side-by-side view).
pub struct UpstreamSide {
    pub e2e: Histogram,
    finished: Mutex<BTreeMap<String, u64>>,
}

impl UpstreamSide {
    fn new() -> Self {
        Self {
            e2e: Histogram::new(LATENCY),
            finished: Mutex::new(BTreeMap::new()),
        }
    }

    /// Ended upstream predictions so far, by status.
    pub fn finished_counts(&self) -> BTreeMap<String, u64> {
        self.finished.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

pub struct Metrics {
    pub model_name: String,
    pub upstream_side: UpstreamSide,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue_time: Histogram,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    finished: Mutex<BTreeMap<String, u64>>,
    http: Mutex<BTreeMap<(&'static str, String, u16), u64>>,
}

/// One request's timings into a model's metrics, the same for every API: created at
/// `new`, then `started`, each `token`, and `finished`.
pub struct RequestTimer {
    metrics: std::sync::Arc<Metrics>,
    pub created: std::time::Instant,
    pub started: Option<std::time::Instant>,
    pub first_token: Option<std::time::Instant>,
    last_token: Option<std::time::Instant>,
}

impl RequestTimer {
    pub fn new(metrics: std::sync::Arc<Metrics>) -> Self {
        Self {
            metrics,
            created: std::time::Instant::now(),
            started: None,
            first_token: None,
            last_token: None,
        }
    }

    pub fn started(&mut self) {
        self.started = Some(std::time::Instant::now());
        self.metrics
            .queue_time
            .observe(self.created.elapsed().as_secs_f64());
    }

    pub fn token(&mut self) {
        let now = std::time::Instant::now();
        match self.last_token {
            None => self
                .metrics
                .ttft
                .observe((now - self.created).as_secs_f64()),
            Some(prev) => self.metrics.itl.observe((now - prev).as_secs_f64()),
        }
        self.first_token.get_or_insert(now);
        self.last_token = Some(now);
        self.metrics.generation_tokens.inc();
    }

    /// `status` as Replicate names it: succeeded, failed, canceled.
    pub fn finished(&self, status: &str, prompt_tokens: usize) {
        self.metrics.prompt_tokens.add(prompt_tokens as u64);
        self.metrics
            .e2e
            .observe(self.created.elapsed().as_secs_f64());
        self.metrics.finished(status);
    }
}

impl Metrics {
    pub fn new(model_name: String) -> Self {
        Self {
            model_name,
            upstream_side: UpstreamSide::new(),
            ttft: Histogram::new(LATENCY),
            itl: Histogram::new(LATENCY),
            e2e: Histogram::new(LATENCY),
            queue_time: Histogram::new(LATENCY),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            finished: Mutex::new(BTreeMap::new()),
            http: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn finished(&self, status: &str) {
        if let Ok(mut m) = self.finished.lock() {
            *m.entry(status.to_string()).or_default() += 1;
        }
    }

    /// A prediction the upstream served ended: in the totals and the upstream side.
    pub fn upstream_finished(&self, status: &str, e2e_seconds: f64) {
        self.finished(status);
        self.e2e.observe(e2e_seconds);
        if let Ok(mut m) = self.upstream_side.finished.lock() {
            *m.entry(status.to_string()).or_default() += 1;
        }
        self.upstream_side.e2e.observe(e2e_seconds);
    }

    /// Finished predictions so far, by status.
    pub fn finished_counts(&self) -> BTreeMap<String, u64> {
        self.finished.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// `method` from a fixed set and `route` a registered pattern: bounded labels.
    pub fn http(&self, method: &'static str, route: &str, status: u16) {
        if let Ok(mut m) = self.http.lock() {
            *m.entry((method, route.to_string(), status)).or_default() += 1;
        }
    }

    pub fn render(&self, out: &mut String, stats: &hearth_runtime::EngineStats) {
        let l = format!("model_name=\"{}\"", self.model_name.replace('"', ""));
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{l}}} {v}"
            );
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{l}}} {v}"
            );
        };
        gauge(
            out,
            "vllm:num_requests_running",
            "Sequences in the running batch.",
            stats.num_running as f64,
        );
        gauge(
            out,
            "vllm:num_requests_waiting",
            "Requests waiting to start.",
            stats.num_waiting as f64,
        );
        gauge(
            out,
            "hearth:num_requests_running_background",
            "Background sequences (shadow copies) in the running batch.",
            stats.num_running_background as f64,
        );
        gauge(
            out,
            "hearth:num_requests_waiting_background",
            "Background requests (shadow copies) waiting to start, behind every caller's.",
            stats.num_waiting_background as f64,
        );
        let used = stats.kv_blocks_total.saturating_sub(stats.kv_blocks_free);
        let usage = if stats.kv_blocks_total > 0 {
            used as f64 / stats.kv_blocks_total as f64
        } else {
            0.0
        };
        gauge(
            out,
            "vllm:kv_cache_usage_perc",
            "Fraction of KV cache blocks in use.",
            usage,
        );
        // The older name, which inference gateways (and their docs) still read.
        gauge(
            out,
            "vllm:gpu_cache_usage_perc",
            "Fraction of KV cache blocks in use (vllm:kv_cache_usage_perc).",
            usage,
        );
        gauge(
            out,
            "hearth:kv_blocks_used",
            "KV cache blocks in use.",
            used as f64,
        );
        gauge(
            out,
            "hearth:kv_blocks_free",
            "KV cache blocks free (cached prefixes included).",
            stats.kv_blocks_free as f64,
        );
        counter(
            out,
            "vllm:prefix_cache_queries",
            "Blocks looked up in the prefix cache.",
            stats.prefix_cache_queries,
        );
        counter(
            out,
            "vllm:prefix_cache_hits",
            "Blocks found in the prefix cache.",
            stats.prefix_cache_hits,
        );
        gauge(
            out,
            "hearth:prefix_cache_hit_rate",
            "Prefix cache hits / queries.",
            if stats.prefix_cache_queries > 0 {
                stats.prefix_cache_hits as f64 / stats.prefix_cache_queries as f64
            } else {
                0.0
            },
        );
        counter(
            out,
            "vllm:num_preemptions",
            "Sequences preempted for recompute.",
            stats.num_preemptions,
        );
        counter(
            out,
            "vllm:prompt_tokens",
            "Prompt tokens of finished predictions.",
            self.prompt_tokens.get(),
        );
        counter(
            out,
            "vllm:generation_tokens",
            "Tokens generated.",
            self.generation_tokens.get(),
        );
        self.ttft.render(
            out,
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            &l,
        );
        self.itl.render(
            out,
            "vllm:inter_token_latency_seconds",
            "Time between tokens.",
            &l,
        );
        self.e2e.render(
            out,
            "vllm:e2e_request_latency_seconds",
            "Creation to completion.",
            &l,
        );
        self.queue_time.render(
            out,
            "vllm:request_queue_time_seconds",
            "Creation to first step.",
            &l,
        );
        if let Ok(m) = self.finished.lock() {
            let _ = writeln!(out, "# HELP hearth:predictions_finished Finished predictions by status.\n# TYPE hearth:predictions_finished counter");
            for (status, n) in m.iter() {
                let _ = writeln!(
                    out,
                    "hearth:predictions_finished{{{l},status=\"{status}\"}} {n}"
                );
            }
        }
    }

    pub fn render_http(&self, out: &mut String) {
        let Ok(m) = self.http.lock() else { return };
        let _ = writeln!(out, "# HELP hearth:http_requests HTTP requests by route and status.\n# TYPE hearth:http_requests counter");
        for ((method, route, status), n) in m.iter() {
            let _ = writeln!(out, "hearth:http_requests{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}");
        }
    }
}
