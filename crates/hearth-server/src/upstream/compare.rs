//! The comparison of the two sides of every model with a `canary` or `shadow` route:
//! per side, how many predictions ended and how (failures by kind), latency from
//! create to end, time to first output and output tokens/s; for shadowed pairs, how
//! alike the two outputs were. Kept in memory since the server started: counts are
//! totals, the figures behind percentiles are each side's last `stats::WINDOW`
//! succeeded predictions, and the last `RECENT_PAIRS` pairs are listed. Served at
//! `GET /v1/hearth/compare`, in `/metrics` and on the console.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde_json::{json, Value};

use super::route::Route;
use super::stats::{self, Agreement, Window};
use crate::record::{Record, Status};

mod metrics;

/// Shadowed pairs listed in the comparison (newest last).
pub const RECENT_PAIRS: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Local,
    Upstream,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Local => "local",
            Side::Upstream => "upstream",
        }
    }
}

/// Why a prediction failed, as the comparison counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// The input was refused (a 4xx on create, here or upstream).
    Validation,
    /// Its deadline passed (`Cancel-After`, or a shadow copy's time limit).
    Timeout,
    /// The upstream answered 5xx or could not be reached.
    Upstream5xx,
    /// The model itself failed (the engine here, or the prediction upstream).
    Engine,
}

pub const KINDS: [FailKind; 4] = [
    FailKind::Validation,
    FailKind::Timeout,
    FailKind::Upstream5xx,
    FailKind::Engine,
];

impl FailKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailKind::Validation => "validation",
            FailKind::Timeout => "timeout",
            FailKind::Upstream5xx => "upstream_5xx",
            FailKind::Engine => "engine",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Canceled,
    Failed(FailKind),
}

/// One ended prediction, as the comparison sees it. Times in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub outcome: Outcome,
    pub latency: Option<f64>,
    pub first_output: Option<f64>,
    pub tokens_per_second: Option<f64>,
}

fn seconds_between(a: &str, b: &str) -> Option<f64> {
    let a = chrono::DateTime::parse_from_rfc3339(a).ok()?;
    let b = chrono::DateTime::parse_from_rfc3339(b).ok()?;
    Some((b - a).num_microseconds()?.max(0) as f64 / 1e6)
}

/// How an upstream error (as the runner words it) is counted.
fn upstream_error_kind(error: &str) -> FailKind {
    if error.contains("refused the input") {
        FailKind::Validation
    } else if [
        "answered the create with",
        "is unreachable",
        "lost contact with",
        "answer to this prediction's create",
        "circuit breaker",
    ]
    .iter()
    .any(|s| error.contains(s))
    {
        FailKind::Upstream5xx
    } else {
        FailKind::Engine
    }
}

impl Observation {
    /// A create refused before any prediction existed.
    pub fn refused(kind: FailKind) -> Self {
        Observation {
            outcome: Outcome::Failed(kind),
            latency: None,
            first_output: None,
            tokens_per_second: None,
        }
    }

    /// From an ended record: each side's own clock (its metrics, else its
    /// timestamps); `observed` (create to end, and to the first output seen here)
    /// only where the record has neither.
    pub fn from_record(r: &Record, side: Side, observed: f64, first_seen: Option<f64>) -> Self {
        let p = &r.prediction;
        Self::from_parts(
            Ended {
                status: p.status,
                error: p.error.as_deref(),
                logs: &p.logs,
                created_at: &p.created_at,
                completed_at: p.completed_at.as_deref(),
                metrics: p.metrics.as_ref(),
            },
            side,
            observed,
            first_seen,
        )
    }

    pub fn from_parts(e: Ended<'_>, side: Side, observed: f64, first_seen: Option<f64>) -> Self {
        let num = |k: &str| {
            e.metrics
                .and_then(|m| m[k].as_f64())
                .filter(|x| x.is_finite())
        };
        let outcome = match e.status {
            Status::Succeeded => Outcome::Succeeded,
            Status::Canceled if e.logs.contains("Deadline passed") => {
                Outcome::Failed(FailKind::Timeout)
            }
            Status::Failed => Outcome::Failed(match (side, e.error) {
                (Side::Upstream, Some(err)) => upstream_error_kind(err),
                _ => FailKind::Engine,
            }),
            _ => Outcome::Canceled,
        };
        let latency = num("total_time")
            .or_else(|| {
                e.completed_at
                    .and_then(|c| seconds_between(e.created_at, c))
            })
            .or(Some(observed));
        let tokens_per_second = num("tokens_per_second").filter(|x| *x > 0.0).or_else(|| {
            match (num("output_token_count"), num("predict_time")) {
                (Some(n), Some(t)) if t > 0.0 => Some(n / t),
                _ => None,
            }
        });
        Observation {
            outcome,
            latency,
            first_output: num("time_to_first_token").or(first_seen),
            tokens_per_second,
        }
    }
}

/// What an ended prediction says about itself, here or upstream.
pub struct Ended<'a> {
    pub status: Status,
    pub error: Option<&'a str>,
    pub logs: &'a str,
    pub created_at: &'a str,
    pub completed_at: Option<&'a str>,
    pub metrics: Option<&'a Value>,
}

#[derive(Debug, Default)]
struct SideStats {
    count: u64,
    succeeded: u64,
    canceled: u64,
    failed: [u64; 4],
    latency: Window,
    first_output: Window,
    tokens_per_second: Window,
}

impl SideStats {
    fn add(&mut self, o: &Observation) {
        self.count += 1;
        match o.outcome {
            Outcome::Succeeded => {
                self.succeeded += 1;
                // Figures of succeeded predictions only: a refusal's instant "latency"
                // would flatter the side that fails.
                for (w, x) in [
                    (&mut self.latency, o.latency),
                    (&mut self.first_output, o.first_output),
                    (&mut self.tokens_per_second, o.tokens_per_second),
                ] {
                    if let Some(x) = x {
                        w.push(x);
                    }
                }
            }
            Outcome::Canceled => self.canceled += 1,
            Outcome::Failed(k) => self.failed[k.index()] += 1,
        }
    }

    fn json(&self, role: &str) -> Value {
        let rate = |n: u64| {
            if self.count == 0 {
                0.0
            } else {
                n as f64 / self.count as f64
            }
        };
        let mut failed = serde_json::Map::new();
        let mut rates = serde_json::Map::new();
        for k in KINDS {
            failed.insert(k.as_str().into(), json!(self.failed[k.index()]));
            rates.insert(k.as_str().into(), json!(rate(self.failed[k.index()])));
        }
        json!({
            "role": role,
            "count": self.count,
            "succeeded": self.succeeded,
            "canceled": self.canceled,
            "failed": failed,
            "failure_rate": rate(self.failed.iter().sum()),
            "failure_rate_by_kind": rates,
            "latency_seconds": self.latency.summary(),
            "time_to_first_output_seconds": self.first_output.summary(),
            "output_tokens_per_second": self.tokens_per_second.summary(),
        })
    }
}

/// Why a shadow copy was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The route's concurrent copies were at `--shadow-max-concurrent`.
    Concurrency,
    /// The route's copies in the last minute were at `--shadow-max-per-minute`.
    Rate,
    /// The upstream's circuit breaker was open.
    Circuit,
    /// The upstream answered the copy's create with 429 (it never ran there).
    Throttled,
    /// The server was shutting down.
    Draining,
    /// The local engine could not take a copy (`shadow-local`): not running, or its
    /// background queue was full.
    LocalEngine,
}

const SKIPS: [Skip; 6] = [
    Skip::Concurrency,
    Skip::Rate,
    Skip::Circuit,
    Skip::Throttled,
    Skip::Draining,
    Skip::LocalEngine,
];

impl Skip {
    fn as_str(self) -> &'static str {
        match self {
            Skip::Concurrency => "concurrency",
            Skip::Rate => "rate",
            Skip::Circuit => "circuit",
            Skip::Throttled => "throttled",
            Skip::Draining => "draining",
            Skip::LocalEngine => "local_engine",
        }
    }
}

/// One shadowed pair once both sides ended.
#[derive(Debug, Clone)]
pub struct Pair {
    /// The caller's prediction (hearth's id), whichever side served it.
    pub id: String,
    /// The upstream's id of its side of the pair.
    pub upstream_id: Option<String>,
    /// How each side ended (`processing`: a primary still running when its watch
    /// gave up).
    pub local: Status,
    pub upstream: Status,
    /// When the copy started to run on its side (RFC 3339), when known.
    pub copy_started_at: Option<String>,
    /// When both succeeded.
    pub agreement: Option<Agreement>,
}

impl Outcome {
    /// The status a record with this outcome has.
    pub fn status(self) -> Status {
        match self {
            Outcome::Succeeded => Status::Succeeded,
            Outcome::Canceled => Status::Canceled,
            Outcome::Failed(_) => Status::Failed,
        }
    }
}

#[derive(Debug, Default)]
struct Shadowing {
    /// Creates whose id fell in the shadowed share.
    eligible: u64,
    /// Copies sent upstream (or about to be).
    started: u64,
    in_flight: u64,
    skipped: [u64; 6],
    /// Pairs both of whose sides ended.
    pairs: u64,
    /// Pairs both of whose sides succeeded, compared.
    compared: u64,
    exact: u64,
    text_pairs: u64,
    text_above: u64,
    similarity: Window,
    file_pairs: u64,
    file_agree: u64,
    file_unknown: u64,
    recent: VecDeque<Pair>,
}

impl Shadowing {
    fn json(&self) -> Value {
        let mut skipped = serde_json::Map::new();
        for s in SKIPS {
            skipped.insert(s.as_str().into(), json!(self.skipped[s as usize]));
        }
        let rate = |n: u64, d: u64| (d > 0).then(|| n as f64 / d as f64);
        let p10 = self.similarity.percentiles(&[10.0])[0];
        let recent: Vec<Value> = self
            .recent
            .iter()
            .map(|p| {
                let (exact, similarity) = match &p.agreement {
                    Some(Agreement::Text { exact, similarity }) => {
                        (Some(*exact), Some(*similarity))
                    }
                    Some(a) => (Some(a.exact()), None),
                    None => (None, None),
                };
                json!({
                    "id": p.id,
                    "upstream_id": p.upstream_id,
                    "local": p.local.as_str(),
                    "upstream": p.upstream.as_str(),
                    "copy_started_at": p.copy_started_at,
                    "exact": exact,
                    "similarity": similarity,
                })
            })
            .collect();
        json!({
            "eligible": self.eligible,
            "copies": self.started,
            "in_flight": self.in_flight,
            "skipped": skipped,
            "skipped_total": self.skipped.iter().sum::<u64>(),
            "agreement": {
                "pairs": self.pairs,
                "compared": self.compared,
                "exact": self.exact,
                "exact_rate": rate(self.exact, self.compared),
                "text": {
                    "pairs": self.text_pairs,
                    "similarity_mean": self.similarity.mean(),
                    "similarity_p10": p10,
                    "above_0_9": self.text_above,
                    "above_0_9_rate": rate(self.text_above, self.text_pairs),
                },
                "files": {
                    "pairs": self.file_pairs,
                    "same_type_size_within_10pct": self.file_agree,
                    "size_unknown": self.file_unknown,
                },
            },
            "recent_pairs": recent,
        })
    }
}

#[derive(Debug)]
struct ModelCompare {
    route: Route,
    local: SideStats,
    upstream: SideStats,
    shadow: Shadowing,
}

impl ModelCompare {
    fn sides(&self) -> [(Side, &SideStats); 2] {
        [(Side::Local, &self.local), (Side::Upstream, &self.upstream)]
    }

    fn side(&mut self, s: Side) -> &mut SideStats {
        match s {
            Side::Local => &mut self.local,
            Side::Upstream => &mut self.upstream,
        }
    }
}

/// Every compared model's figures (only models with a canary or shadow route: the
/// map's keys are fixed at start, so it cannot grow).
#[derive(Debug, Default)]
pub struct Comparison {
    models: Mutex<BTreeMap<String, ModelCompare>>,
}

impl Comparison {
    pub fn new<'a>(routes: impl Iterator<Item = (&'a String, &'a Route)>) -> Self {
        let models = routes
            .filter(|(_, r)| matches!(r, Route::Canary { .. } | Route::Shadow { .. }))
            .map(|(m, r)| {
                (
                    m.clone(),
                    ModelCompare {
                        route: r.clone(),
                        local: SideStats::default(),
                        upstream: SideStats::default(),
                        shadow: Shadowing::default(),
                    },
                )
            })
            .collect();
        Comparison {
            models: Mutex::new(models),
        }
    }

    fn with<R>(&self, model: &str, f: impl FnOnce(&mut ModelCompare) -> R) -> Option<R> {
        let mut m = self.models.lock().ok()?;
        m.get_mut(model).map(f)
    }

    pub fn is_compared(&self, model: &str) -> bool {
        self.with(model, |_| ()).is_some()
    }

    pub fn observe(&self, model: &str, side: Side, o: &Observation) {
        self.with(model, |m| m.side(side).add(o));
    }

    /// A create fell in the shadowed share.
    pub fn eligible(&self, model: &str) {
        self.with(model, |m| m.shadow.eligible += 1);
    }

    pub fn skipped(&self, model: &str, why: Skip) {
        self.with(model, |m| m.shadow.skipped[why as usize] += 1);
    }

    /// A copy is on its way to the other side.
    pub fn copy_started(&self, model: &str) {
        self.with(model, |m| {
            m.shadow.started += 1;
            m.shadow.in_flight += 1;
        });
    }

    /// A copy was refused on its side before it ran (the upstream throttled its
    /// create, the local engine's background queue was full): it counts as skipped.
    pub fn copy_refused(&self, model: &str, why: Skip) {
        self.with(model, |m| {
            m.shadow.started -= 1;
            m.shadow.in_flight -= 1;
            m.shadow.skipped[why as usize] += 1;
        });
    }

    /// Both sides of a pair ended: the copy's observation (on side `copy_side`) and
    /// how the outputs agree.
    pub fn pair(&self, model: &str, copy_side: Side, copy: &Observation, pair: Pair) {
        self.with(model, |m| {
            m.side(copy_side).add(copy);
            let s = &mut m.shadow;
            s.in_flight -= 1;
            s.pairs += 1;
            if let Some(a) = &pair.agreement {
                s.compared += 1;
                s.exact += u64::from(a.exact());
                match a {
                    Agreement::Text { similarity, .. } => {
                        s.text_pairs += 1;
                        s.text_above += u64::from(*similarity > stats::AGREE_ABOVE);
                        s.similarity.push(*similarity);
                    }
                    Agreement::Files { agree, .. } => {
                        s.file_pairs += 1;
                        s.file_agree += u64::from(*agree);
                    }
                    Agreement::FilesUnknown { .. } => {
                        s.file_pairs += 1;
                        s.file_unknown += 1;
                    }
                }
            }
            if s.recent.len() == RECENT_PAIRS {
                s.recent.pop_front();
            }
            s.recent.push_back(pair);
        });
    }

    /// `GET /v1/hearth/compare`'s body.
    pub fn snapshot(&self) -> Value {
        let Ok(models) = self.models.lock() else {
            return json!({"models": []});
        };
        let list: Vec<Value> = models
            .iter()
            .map(|(name, m)| {
                let (local_role, up_role) = match m.route {
                    Route::Shadow {
                        primary: Side::Local,
                        ..
                    } => ("primary", "shadow"),
                    Route::Shadow { .. } => ("shadow", "primary"),
                    _ => ("canary_stays", "canary"),
                };
                let mut v = json!({
                    "model": name,
                    "route": m.route.describe(),
                    "sides": {
                        "local": m.local.json(local_role),
                        "upstream": m.upstream.json(up_role),
                    },
                });
                if matches!(m.route, Route::Shadow { .. }) {
                    v["shadow"] = m.shadow.json();
                }
                v
            })
            .collect();
        json!({
            "models": list,
            "window": stats::WINDOW,
            "note": format!(
                "counts since the server started; latency, time to first output and tokens/s over each side's last {} succeeded predictions; similarity over the last {} compared text pairs",
                stats::WINDOW, stats::WINDOW
            ),
        })
    }
}

#[cfg(test)]
#[path = "compare_tests.rs"]
mod tests;
