//! The operations view's hybrid half: for every model whose route uses an upstream
//! (upstream, fallback, canary, shadow), its two sides each second — the predictions
//! the local engine served and those the upstream served, how they ended and their
//! create-to-end latency — and for every upstream, its calls by outcome and its
//! circuit breaker. Read from what the server already counts (`Metrics` and its
//! `upstream_side`, each upstream client's `counts` and breaker); names only, never an
//! upstream's URL or token.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use serde_json::{json, Value};

use crate::metrics::HistogramSnapshot;
use crate::ops_history::{distribution, KEEP};
use crate::AppState;

/// One side's totals at one moment.
#[derive(Clone)]
struct SideTotals {
    e2e: HistogramSnapshot,
    finished: BTreeMap<String, u64>,
}

impl SideTotals {
    fn ended(&self, status: &str) -> u64 {
        self.finished.get(status).copied().unwrap_or(0)
    }

    /// `self` less `other` (both cumulative; `other` a part of `self`).
    fn less(&self, other: &SideTotals) -> SideTotals {
        let mut finished = self.finished.clone();
        for (k, v) in finished.iter_mut() {
            *v = v.saturating_sub(other.ended(k));
        }
        SideTotals {
            e2e: HistogramSnapshot {
                bounds: self.e2e.bounds,
                cumulative: self
                    .e2e
                    .cumulative
                    .iter()
                    .zip(other.e2e.cumulative.iter().chain(std::iter::repeat(&0)))
                    .map(|(a, b)| a.saturating_sub(*b))
                    .collect(),
                sum: (self.e2e.sum - other.e2e.sum).max(0.0),
                count: self.e2e.count.saturating_sub(other.e2e.count),
            },
            finished,
        }
    }
}

struct ModelPoint {
    t: f64,
    local: SideTotals,
    upstream: SideTotals,
}

/// Calls to an upstream so far, in `OUTCOMES` order.
const OUTCOMES: [&str; 6] = [
    "ok",
    "throttled",
    "rejected",
    "server_error",
    "network",
    "ambiguous",
];

struct UpstreamPoint {
    t: f64,
    calls: [u64; 6],
    circuit: &'static str,
    consecutive_failures: u32,
}

/// The last `KEEP` seconds of every routed model's sides and every upstream's calls
/// (both sets fixed at start: the maps cannot grow past them).
#[derive(Default)]
pub struct SideHistory {
    models: Mutex<HashMap<String, VecDeque<ModelPoint>>>,
    upstreams: Mutex<HashMap<String, VecDeque<UpstreamPoint>>>,
}

fn push<T>(q: &mut VecDeque<T>, x: T) {
    q.push_back(x);
    while q.len() > KEEP {
        q.pop_front();
    }
}

impl SideHistory {
    /// Takes one sample at unix time `t`.
    pub fn sample(&self, state: &AppState, t: f64) {
        if let Ok(mut models) = self.models.lock() {
            for (model, route) in state.upstream.routes() {
                if route.upstream().is_none() {
                    continue;
                }
                let m = state.model_metrics(model);
                let total = SideTotals {
                    e2e: m.e2e.snapshot(),
                    finished: m.finished_counts(),
                };
                let upstream = SideTotals {
                    e2e: m.upstream_side.e2e.snapshot(),
                    finished: m.upstream_side.finished_counts(),
                };
                let local = total.less(&upstream);
                push(
                    models.entry(model.clone()).or_default(),
                    ModelPoint { t, local, upstream },
                );
            }
        }
        if let Ok(mut ups) = self.upstreams.lock() {
            for (name, c) in state.upstream.clients() {
                let n = &c.counts;
                let calls = [
                    &n.ok,
                    &n.throttled,
                    &n.rejected,
                    &n.server_error,
                    &n.network,
                    &n.ambiguous,
                ]
                .map(|a| a.load(Ordering::Relaxed));
                push(
                    ups.entry(name.clone()).or_default(),
                    UpstreamPoint {
                        t,
                        calls,
                        circuit: c.breaker.circuit().as_str(),
                        consecutive_failures: c.breaker.consecutive_failures(),
                    },
                );
            }
        }
    }

    /// `{"local": …, "upstream": …}` for a routed model (None for one without an
    /// upstream in its route): each side's per-second samples and its latency
    /// distribution over the window.
    pub fn model_json(&self, model: &str) -> Option<Value> {
        let models = self.models.lock().ok()?;
        let points = models.get(model)?;
        let side = |pick: fn(&ModelPoint) -> &SideTotals| -> Value {
            let samples: Vec<Value> = points
                .iter()
                .zip(points.iter().skip(1))
                .map(|(a, b)| {
                    let (a, bt, b) = (pick(a), b.t, pick(b));
                    let d = |s: &str| b.ended(s).saturating_sub(a.ended(s));
                    let n = b.e2e.count.saturating_sub(a.e2e.count);
                    let mean = (n > 0).then(|| (b.e2e.sum - a.e2e.sum).max(0.0) / n as f64);
                    json!({
                        "t": bt, "succeeded": d("succeeded"), "failed": d("failed"),
                        "canceled": d("canceled"), "latency_mean_s": mean,
                    })
                })
                .collect();
            let (first, last) = match (points.front(), points.back()) {
                (Some(f), Some(l)) => (pick(f), pick(l)),
                _ => return json!({"samples": [], "latency": null}),
            };
            let ended = |s: &str| last.ended(s).saturating_sub(first.ended(s));
            json!({
                "samples": samples,
                "latency": distribution(&last.e2e, &first.e2e),
                "window": {"succeeded": ended("succeeded"), "failed": ended("failed"), "canceled": ended("canceled")},
                "total": {"succeeded": last.ended("succeeded"), "failed": last.ended("failed"), "canceled": last.ended("canceled")},
            })
        };
        Some(json!({
            "local": side(|p| &p.local),
            "upstream": side(|p| &p.upstream),
        }))
    }

    /// Every upstream by name: its circuit now, its calls per second by outcome, and
    /// the window's and all-time totals.
    pub fn upstreams_json(&self) -> Value {
        let Ok(ups) = self.upstreams.lock() else {
            return json!([]);
        };
        let mut names: Vec<&String> = ups.keys().collect();
        names.sort();
        let list: Vec<Value> = names
            .into_iter()
            .filter_map(|name| {
                let points = ups.get(name)?;
                let last = points.back()?;
                let first = points.front()?;
                let counts = |a: &[u64; 6], b: &[u64; 6]| -> serde_json::Map<String, Value> {
                    let mut o = serde_json::Map::new();
                    for (i, k) in OUTCOMES.iter().enumerate() {
                        o.insert((*k).into(), json!(b[i].saturating_sub(a[i])));
                    }
                    let errors: u64 = (1..OUTCOMES.len()).map(|i| b[i].saturating_sub(a[i])).sum();
                    o.insert("errors".into(), json!(errors));
                    o
                };
                let samples: Vec<Value> = points
                    .iter()
                    .zip(points.iter().skip(1))
                    .map(|(a, b)| {
                        let mut o = counts(&a.calls, &b.calls);
                        o.insert("t".into(), json!(b.t));
                        Value::Object(o)
                    })
                    .collect();
                Some(json!({
                    "name": name,
                    "circuit": last.circuit,
                    "consecutive_failures": last.consecutive_failures,
                    "samples": samples,
                    "window": counts(&first.calls, &last.calls),
                    "total": counts(&[0; 6], &last.calls),
                }))
            })
            .collect();
        Value::Array(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(cumulative: Vec<u64>, sum: f64, ok: u64) -> SideTotals {
        SideTotals {
            e2e: HistogramSnapshot {
                bounds: &[0.1, 1.0],
                count: *cumulative.last().unwrap_or(&0),
                cumulative,
                sum,
            },
            finished: BTreeMap::from([("succeeded".to_string(), ok)]),
        }
    }

    #[test]
    fn the_local_side_is_the_totals_less_the_upstream() {
        let all = totals(vec![3, 5], 2.5, 5);
        let up = totals(vec![1, 2], 1.2, 2);
        let local = all.less(&up);
        assert_eq!(local.e2e.cumulative, vec![2, 3]);
        assert_eq!(local.e2e.count, 3);
        assert!((local.e2e.sum - 1.3).abs() < 1e-9);
        assert_eq!(local.ended("succeeded"), 3);
        assert_eq!(local.ended("failed"), 0);
    }
}
