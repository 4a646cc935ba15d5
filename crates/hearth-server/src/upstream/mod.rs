//! Hybrid serving: one Replicate-compatible endpoint in front of hearth's engine and
//! any Replicate-compatible upstream (the hosted API, another hearth) or a plain Cog
//! container (`cog`, `cog_runner`). Each model has
//! a route (`route`): local, upstream, fallback, canary or shadow (`shadow`: copies
//! to an upstream; `shadow_local`: copies of an upstream's traffic on the local
//! engine at background priority). A prediction that runs
//! upstream is hearth's like any other — its id, record, stream, webhooks — and its
//! link to the upstream's id is in the store before its result is awaited, so a
//! restart resumes it (`runner`). Upstreams get careful treatment: throttles are
//! honoured, a create whose answer was lost is resolved from the upstream's list and
//! never resent blindly, and a circuit breaker per upstream keeps `fallback` routes
//! local while it is down (`breaker`).

pub mod attempts;
pub mod breaker;
pub mod budget;
pub mod card;
pub mod chat_shape;
pub mod client;
pub mod cog;
pub mod cog_runner;
pub mod compare;
pub mod create;
pub mod files;
pub mod follow;
pub mod input_check;
pub mod intake;
pub mod levenshtein;
pub mod models;
pub mod normalize;
pub mod poller;
pub mod route;
pub mod runner;
pub mod shadow;
pub mod shadow_copy;
pub mod shadow_local;
pub mod sse_reader;
pub mod stats;
pub mod stream_follower;
pub mod stream_origin;

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Value};

pub use breaker::BreakerConfig;
pub use client::UpstreamClient;
pub use route::{ModelRoute, Route};

/// A token that never prints: not in logs, `Debug`, errors or metrics.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

/// One `--upstream NAME=URL` (or `NAME=cog+URL`), with its token.
#[derive(Debug, Clone)]
pub struct UpstreamSpec {
    pub name: String,
    /// A Replicate-compatible API's base (`https://api.replicate.com`, another hearth).
    pub url: String,
    pub token: Option<Secret>,
    /// `cog+URL`: a plain Cog container's `/predictions` API (`cog`).
    pub cog: bool,
    /// `--mirror-upstream-files`: copy its file outputs into hearth's store.
    pub mirror: Option<files::Mirror>,
    /// What one prediction may bring back from it.
    pub intake: intake::IntakeLimits,
    /// Other origins its `urls.stream` may be on (`--upstream-stream-origin`).
    pub stream_origins: Vec<url::Origin>,
    /// `--webhook-allow-private`: a sibling host's stream may be at a private address.
    pub allow_private_streams: bool,
}

/// Upstream names: what routes, env variables and metrics labels use.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "upstream name {name:?}: 1 to 32 letters, digits, - or _"
        ))
    }
}

impl UpstreamSpec {
    /// `NAME=URL` or `NAME=cog+URL`; the token comes separately.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (name, url) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected NAME=URL"))?;
        check_name(name)?;
        let (cog, url) = match url.strip_prefix("cog+") {
            Some(rest) => (true, rest),
            None => (false, url),
        };
        let u = url::Url::parse(url)
            .map_err(|e| format!("upstream {name}: {url:?} is not a URL: {e}"))?;
        if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
            return Err(format!(
                "upstream {name}: {url:?} must be an http(s) URL with a host"
            ));
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err(format!(
                "upstream {name}: put the token in --upstream-token-file or \
                 HEARTH_UPSTREAM_TOKEN_{}, not in the URL",
                env_suffix(name)
            ));
        }
        Ok(UpstreamSpec {
            name: name.to_string(),
            url: url.trim_end_matches('/').to_string(),
            token: None,
            cog,
            mirror: None,
            intake: intake::IntakeLimits::default(),
            stream_origins: Vec::new(),
            allow_private_streams: false,
        })
    }
}

/// `HEARTH_UPSTREAM_TOKEN_<this>` for an upstream's name.
pub fn env_suffix(name: &str) -> String {
    name.to_ascii_uppercase().replace('-', "_")
}

/// The upstreams and routes a server has.
pub struct Hybrid {
    upstreams: HashMap<String, Arc<UpstreamClient>>,
    routes: HashMap<String, Route>,
    pub models: models::ModelCache,
    /// The two sides of canary and shadow routes (`GET /v1/hearth/compare`).
    pub compare: compare::Comparison,
    /// Shadow routes' bounds on copies.
    pub shadows: shadow::Shadows,
}

impl Hybrid {
    /// `budget`: the bytes all upstream answers being read may hold, one for all.
    pub fn new(
        specs: &[UpstreamSpec],
        routes: &[ModelRoute],
        breaker: BreakerConfig,
        budget: budget::ByteBudget,
    ) -> Result<Self, String> {
        let mut upstreams = HashMap::new();
        for s in specs {
            let c = UpstreamClient::new(
                s.name.clone(),
                &s.url,
                s.token.clone(),
                breaker::Breaker::new(breaker),
            )?
            .with_cog(s.cog)
            .with_mirror(s.mirror.clone())
            .with_intake(s.intake)
            .with_budget(budget.clone())
            .with_stream_origins(s.stream_origins.clone(), s.allow_private_streams);
            if upstreams.insert(s.name.clone(), Arc::new(c)).is_some() {
                return Err(format!("--upstream: two upstreams are called {}", s.name));
            }
        }
        let mut by_model = HashMap::new();
        for r in routes {
            if let Some(up) = r.route.upstream() {
                if !upstreams.contains_key(up) {
                    return Err(format!(
                        "--route {}={}: no --upstream called {up}",
                        r.model,
                        r.route.describe()
                    ));
                }
            }
            if by_model.insert(r.model.clone(), r.route.clone()).is_some() {
                return Err(format!("--route: {} has two routes", r.model));
            }
        }
        Ok(Self {
            upstreams,
            compare: compare::Comparison::new(by_model.iter()),
            shadows: shadow::Shadows::new(by_model.iter(), shadow::ShadowLimits::default()),
            routes: by_model,
            models: models::ModelCache::default(),
        })
    }

    /// `--shadow-max-concurrent` and `--shadow-max-per-minute`.
    pub fn with_shadow_limits(mut self, limits: shadow::ShadowLimits) -> Self {
        self.shadows = shadow::Shadows::new(self.routes.iter(), limits);
        self
    }

    /// The route of `owner/name` when it is not plain local.
    pub fn route(&self, model: &str) -> Option<&Route> {
        self.routes.get(model).filter(|r| **r != Route::Local)
    }

    pub fn routes(&self) -> impl Iterator<Item = (&String, &Route)> {
        self.routes.iter()
    }

    pub fn upstream(&self, name: &str) -> Option<&Arc<UpstreamClient>> {
        self.upstreams.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// Every upstream by name.
    pub fn clients(&self) -> impl Iterator<Item = (&String, &Arc<UpstreamClient>)> {
        self.upstreams.iter()
    }

    fn sorted(&self) -> Vec<&Arc<UpstreamClient>> {
        let mut v: Vec<_> = self.upstreams.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// `/health`'s detail: each upstream's circuit (never its URL or token).
    pub fn health(&self) -> Value {
        let mut o = serde_json::Map::new();
        for c in self.sorted() {
            o.insert(
                c.name.clone(),
                json!({
                    "circuit": c.breaker.circuit().as_str(),
                    "consecutive_failures": c.breaker.consecutive_failures(),
                }),
            );
        }
        Value::Object(o)
    }

    /// Prometheus lines: circuit state, times opened, calls by outcome.
    pub fn render_metrics(&self, out: &mut String) {
        if self.upstreams.is_empty() {
            return;
        }
        let ups = self.sorted();
        let _ = writeln!(out, "# HELP hearth_upstream_circuit_open 1 while the upstream's circuit breaker is open or half-open (new creates held back).\n# TYPE hearth_upstream_circuit_open gauge");
        for c in &ups {
            let open = u8::from(!c.breaker.is_closed());
            let _ = writeln!(
                out,
                "hearth_upstream_circuit_open{{upstream=\"{}\"}} {open}",
                c.name
            );
        }
        let _ = writeln!(out, "# HELP hearth_upstream_circuit_opened_total Times the upstream's circuit breaker opened.\n# TYPE hearth_upstream_circuit_opened_total counter");
        for c in &ups {
            let _ = writeln!(
                out,
                "hearth_upstream_circuit_opened_total{{upstream=\"{}\"}} {}",
                c.name,
                c.breaker.opened_total()
            );
        }
        let _ = writeln!(out, "# HELP hearth_upstream_calls_total Calls to the upstream by outcome.\n# TYPE hearth_upstream_calls_total counter");
        for c in &ups {
            let n = &c.counts;
            for (outcome, v) in [
                ("ok", &n.ok),
                ("throttled", &n.throttled),
                ("rejected", &n.rejected),
                ("server_error", &n.server_error),
                ("network", &n.network),
                ("ambiguous", &n.ambiguous),
            ] {
                let _ = writeln!(
                    out,
                    "hearth_upstream_calls_total{{upstream=\"{}\",outcome=\"{outcome}\"}} {}",
                    c.name,
                    v.load(Ordering::Relaxed)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_specs_parse_and_never_print_their_token() {
        let mut s = UpstreamSpec::parse("hosted=https://api.replicate.com/").unwrap();
        assert_eq!(s.url, "https://api.replicate.com");
        s.token = Some(Secret::new("r8_supersecret"));
        assert!(!format!("{s:?}").contains("supersecret"));
        let c = UpstreamSpec::parse("x=cog+http://h:5000/").unwrap();
        assert!(c.cog && c.url == "http://h:5000", "{c:?}");
        assert!(!s.cog);
        assert!(UpstreamSpec::parse("x=cog+ftp://h").is_err());
        assert!(UpstreamSpec::parse("x=ftp://h").is_err());
        assert!(UpstreamSpec::parse("bad name=http://h").is_err());
        assert!(UpstreamSpec::parse("x=http://u:p@h")
            .unwrap_err()
            .contains("HEARTH_UPSTREAM_TOKEN_X"));
        assert_eq!(env_suffix("my-up"), "MY_UP");
    }

    #[test]
    fn routes_must_name_a_known_upstream() {
        let ups = vec![UpstreamSpec::parse("h=http://127.0.0.1:1").unwrap()];
        let r = |s| ModelRoute::parse(s).unwrap();
        let b = budget::ByteBudget::default;
        assert!(Hybrid::new(&ups, &[r("a/b=upstream:h")], BreakerConfig::default(), b()).is_ok());
        let e = Hybrid::new(
            &ups,
            &[r("a/b=upstream:nope")],
            BreakerConfig::default(),
            b(),
        )
        .err()
        .unwrap();
        assert!(e.contains("no --upstream called nope"), "{e}");
        let e = Hybrid::new(
            &ups,
            &[r("a/b=upstream:h"), r("a/b=local")],
            BreakerConfig::default(),
            b(),
        )
        .err()
        .unwrap();
        assert!(e.contains("two routes"), "{e}");
    }
}
