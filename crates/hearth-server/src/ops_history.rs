//! The console's operations view: once a second, each model's engine gauges and what
//! its counters and latency histograms gained since the last look, kept for the last
//! few minutes in memory and read as JSON (`GET /v1/console/ops`). `/metrics` holds
//! only totals; a rate or a recent distribution needs two points in time, and the page
//! may be opened at any moment, so the server keeps the points.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::metrics::HistogramSnapshot;
use crate::AppState;

/// How often a sample is taken.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Samples kept per model: five minutes.
pub const KEEP: usize = 300;

/// One model at one moment; counts are what happened since the previous sample.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Unix time, seconds.
    pub t: f64,
    pub state: &'static str,
    pub running: usize,
    pub waiting: usize,
    pub kv_used: usize,
    pub kv_total: usize,
    pub tokens_per_s: f64,
    /// Mean time to first token of the requests whose first token came in the interval.
    pub ttft_mean_s: Option<f64>,
    /// Mean time per output token (between tokens) in the interval.
    pub tpot_mean_s: Option<f64>,
    pub succeeded: u64,
    pub failed: u64,
    pub canceled: u64,
}

/// The cumulative values a sample is the difference of.
#[derive(Clone)]
struct Totals {
    at: Instant,
    tokens: u64,
    ttft: HistogramSnapshot,
    itl: HistogramSnapshot,
    finished: std::collections::BTreeMap<String, u64>,
}

#[derive(Default)]
struct ModelHistory {
    /// Each sample with the totals it was taken at (the window's distributions are
    /// the newest totals less the oldest).
    samples: VecDeque<(Sample, Totals)>,
    last: Option<Totals>,
}

#[derive(Default)]
pub struct OpsHistory {
    models: Mutex<HashMap<String, ModelHistory>>,
    /// Routed models' local and upstream sides, and the upstreams' calls.
    sides: crate::ops_sides::SideHistory,
}

fn engine_state(state: &AppState, alive: bool) -> &'static str {
    if !alive {
        "DEFUNCT"
    } else if state.is_draining() {
        "DRAINING"
    } else {
        "READY"
    }
}

fn mean(now: &HistogramSnapshot, before: Option<&HistogramSnapshot>) -> Option<f64> {
    let (sum0, n0) = before.map(|b| (b.sum, b.count)).unwrap_or((0.0, 0));
    let n = now.count.saturating_sub(n0);
    (n > 0).then(|| (now.sum - sum0).max(0.0) / n as f64)
}

fn finished_delta(now: &Totals, before: Option<&Totals>, status: &str) -> u64 {
    let get = |t: &Totals| t.finished.get(status).copied().unwrap_or(0);
    get(now).saturating_sub(before.map(get).unwrap_or(0))
}

impl OpsHistory {
    /// Takes one sample of every model.
    pub fn sample(&self, state: &AppState) {
        let t = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
        self.sides.sample(state, t);
        let Ok(mut models) = self.models.lock() else {
            return;
        };
        for m in state.models.all() {
            let name = m.full_name();
            let metrics = state.model_metrics(&name);
            let stats = m.engine.stats();
            let now = Totals {
                at: Instant::now(),
                tokens: metrics.generation_tokens.get(),
                ttft: metrics.ttft.snapshot(),
                itl: metrics.itl.snapshot(),
                finished: metrics.finished_counts(),
            };
            let h = models.entry(name).or_default();
            let before = h.last.as_ref();
            let tokens_per_s = match before {
                Some(b) => {
                    let secs = now.at.duration_since(b.at).as_secs_f64();
                    let n = now.tokens.saturating_sub(b.tokens) as f64;
                    if secs > 0.0 {
                        n / secs
                    } else {
                        0.0
                    }
                }
                None => 0.0,
            };
            let sample = Sample {
                t,
                state: engine_state(state, m.engine.is_alive()),
                running: stats.num_running,
                waiting: stats.num_waiting,
                kv_used: stats.kv_blocks_total.saturating_sub(stats.kv_blocks_free),
                kv_total: stats.kv_blocks_total,
                tokens_per_s,
                ttft_mean_s: mean(&now.ttft, before.map(|b| &b.ttft)),
                tpot_mean_s: mean(&now.itl, before.map(|b| &b.itl)),
                succeeded: finished_delta(&now, before, "succeeded"),
                failed: finished_delta(&now, before, "failed"),
                canceled: finished_delta(&now, before, "canceled"),
            };
            h.samples.push_back((sample, now.clone()));
            while h.samples.len() > KEEP {
                h.samples.pop_front();
            }
            h.last = Some(now);
        }
    }

    /// Every model's samples, oldest first, and its TTFT and TPOT distributions over
    /// the samples' window.
    pub fn to_json(&self, state: &AppState) -> Value {
        let Ok(models) = self.models.lock() else {
            return json!({"error": "history unavailable"});
        };
        let mut list: Vec<Value> = state
            .models
            .all()
            .iter()
            .map(|m| {
                let name = m.full_name();
                let h = models.get(&name);
                let samples: Vec<&Sample> = h
                    .map(|h| h.samples.iter().map(|(s, _)| s).collect())
                    .unwrap_or_default();
                let window = h.and_then(|h| Some((&h.samples.front()?.1, &h.samples.back()?.1)));
                let (ttft, tpot) = match window {
                    Some((old, new)) => (
                        distribution(&new.ttft, &old.ttft),
                        distribution(&new.itl, &old.itl),
                    ),
                    None => (Value::Null, Value::Null),
                };
                let mut v = json!({
                    "model": name,
                    "engine": true,
                    "state": samples.last().map(|s| s.state).unwrap_or("STARTING"),
                    "samples": samples,
                    "ttft": ttft,
                    "tpot": tpot,
                });
                self.add_route(state, &name, &mut v);
                v
            })
            .collect();
        // Models that run upstream only: their sides, no engine here.
        let mut remote: Vec<&String> = state
            .upstream
            .routes()
            .filter(|(m, r)| {
                r.upstream().is_some()
                    && crate::models::split_name(m)
                        .map(|(o, n)| state.models.by_name(&o, &n).is_none())
                        .unwrap_or(true)
            })
            .map(|(m, _)| m)
            .collect();
        remote.sort();
        for name in remote {
            let mut v = json!({"model": name, "engine": false, "state": "UPSTREAM", "samples": []});
            self.add_route(state, name, &mut v);
            list.push(v);
        }
        json!({
            "interval_s": INTERVAL.as_secs_f64(), "keep": KEEP, "models": list,
            "upstreams": self.sides.upstreams_json(),
        })
    }

    /// A routed model's route and its local and upstream sides.
    fn add_route(&self, state: &AppState, name: &str, v: &mut Value) {
        if let Some(route) = state.upstream.route(name) {
            v["route"] = json!(route.describe());
            if let Some(sides) = self.sides.model_json(name) {
                v["sides"] = sides;
            }
        }
    }
}

/// The observations between two snapshots of one histogram: the count in each
/// bucket (not cumulative) and the bucket bounds holding the 50th, 90th and 99th
/// percentiles (null past the last bound).
pub(crate) fn distribution(new: &HistogramSnapshot, old: &HistogramSnapshot) -> Value {
    let cumulative: Vec<u64> = new
        .cumulative
        .iter()
        .zip(old.cumulative.iter().chain(std::iter::repeat(&0)))
        .map(|(n, o)| n.saturating_sub(*o))
        .collect();
    let total = new.count.saturating_sub(old.count);
    let counts: Vec<u64> = cumulative
        .iter()
        .enumerate()
        .map(|(i, c)| c.saturating_sub(if i == 0 { 0 } else { cumulative[i - 1] }))
        .collect();
    let pct = |p: f64| -> Value {
        if total == 0 {
            return Value::Null;
        }
        let want = (p * total as f64).ceil() as u64;
        cumulative
            .iter()
            .position(|c| *c >= want)
            .map(|i| json!(new.bounds[i]))
            .unwrap_or(Value::Null)
    };
    json!({
        "bounds": new.bounds, "counts": counts,
        "over": total.saturating_sub(cumulative.last().copied().unwrap_or(0)),
        "count": total, "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
    })
}

/// Samples every `INTERVAL` until the server stops.
pub async fn run(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => state.ops.sample(&state),
            _ = state.stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(cumulative: Vec<u64>, sum: f64) -> HistogramSnapshot {
        let count = *cumulative.last().unwrap();
        HistogramSnapshot {
            bounds: &[0.1, 0.5, 1.0],
            cumulative,
            sum,
            count,
        }
    }

    #[test]
    fn distribution_is_the_difference_with_percentile_bounds() {
        let old = snap(vec![1, 1, 1], 0.05);
        let new = snap(vec![6, 10, 11], 3.0);
        let d = distribution(&new, &old);
        assert_eq!(d["counts"], json!([5, 4, 1]));
        assert_eq!(d["count"], 10);
        assert_eq!(d["p50"], json!(0.1));
        assert_eq!(d["p90"], json!(0.5));
        assert_eq!(d["p99"], json!(1.0));
        let empty = distribution(&old, &old);
        assert_eq!(empty["p50"], Value::Null);
    }

    #[test]
    fn mean_is_over_the_interval_only() {
        let old = snap(vec![2, 2, 2], 1.0);
        let new = snap(vec![2, 4, 4], 2.0);
        assert_eq!(mean(&new, Some(&old)), Some(0.5));
        assert_eq!(mean(&old, Some(&old)), None);
    }
}
