//! Where a model's predictions run: `--route OWNER/NAME=ROUTE`.

use sha2::{Digest, Sha256};

/// A model's route. `Local` is what a model without one gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Local,
    /// Only upstream: needs no local weights.
    Upstream(String),
    /// Local first; upstream when the local engine is not running, its queue is full,
    /// or the local create fails server-side (before any output).
    Fallback(String),
    /// `percent` of creates (by a hash of the prediction id) go upstream.
    Canary {
        upstream: String,
        percent: u8,
    },
    /// Every create runs here (the caller's prediction); `percent` of them (by the
    /// same hash as a canary) are also copied to the upstream in the background, for
    /// the comparison only (`shadow`).
    Shadow {
        upstream: String,
        percent: u8,
    },
}

impl Route {
    /// `local`, `upstream:UP`, `fallback:UP` or `canary:UP:PCT`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let name =
            |n: &str| -> Result<String, String> { super::check_name(n).map(|_| n.to_string()) };
        let percent = |p: &str| -> Result<u8, String> {
            match p.trim_end_matches('%').parse::<u8>() {
                Ok(n) if n <= 100 => Ok(n),
                _ => Err(format!("{p:?} is not a percentage from 0 to 100")),
            }
        };
        match parts.as_slice() {
            ["local"] => Ok(Route::Local),
            ["upstream", up] => Ok(Route::Upstream(name(up)?)),
            ["fallback", up] => Ok(Route::Fallback(name(up)?)),
            ["canary", up, pct] => Ok(Route::Canary {
                upstream: name(up)?,
                percent: percent(pct)?,
            }),
            // The other direction (an upstream serving callers, copies run here) is not
            // offered: the local engine would need a lower priority class for copies
            // so they never delay local callers, and a copy here would bill nobody
            // but still take the GPU from the models that are local.
            ["shadow", "local", ..] => Err(format!(
                "{s:?}: a shadow route's primary side is always this server's engine and its \
                 copies go to an upstream: write shadow:UP:PCT with UP an --upstream name \
                 (copying an upstream's traffic to the local engine is not supported)"
            )),
            ["shadow", up, pct] => Ok(Route::Shadow {
                upstream: name(up)?,
                percent: percent(pct)?,
            }),
            _ => Err(format!(
                "{s:?} is not a route: expected local, upstream:UP, fallback:UP, canary:UP:PCT \
                 or shadow:UP:PCT"
            )),
        }
    }

    /// The upstream the route may use.
    pub fn upstream(&self) -> Option<&str> {
        match self {
            Route::Local => None,
            Route::Upstream(u) | Route::Fallback(u) => Some(u),
            Route::Canary { upstream, .. } | Route::Shadow { upstream, .. } => Some(upstream),
        }
    }

    /// Whether the model must also be served here.
    pub fn needs_local_model(&self) -> bool {
        matches!(
            self,
            Route::Local | Route::Fallback(_) | Route::Shadow { .. }
        )
    }

    pub fn describe(&self) -> String {
        match self {
            Route::Local => "local".into(),
            Route::Upstream(u) => format!("upstream:{u}"),
            Route::Fallback(u) => format!("fallback:{u}"),
            Route::Canary { upstream, percent } => format!("canary:{upstream}:{percent}"),
            Route::Shadow { upstream, percent } => format!("shadow:{upstream}:{percent}"),
        }
    }
}

/// One `--route`: a model and its route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRoute {
    /// `owner/name`, as clients call it (and as the upstream knows it).
    pub model: String,
    pub route: Route,
}

impl ModelRoute {
    /// `OWNER/NAME=ROUTE`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (model, route) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected OWNER/NAME=ROUTE"))?;
        crate::models::split_name(model)?;
        Ok(ModelRoute {
            model: model.to_string(),
            route: Route::parse(route)?,
        })
    }
}

/// A canary's (or a shadow's) choice for one prediction: the same id always goes the same way, and
/// over many ids `percent` of them go upstream.
pub fn canary_goes_upstream(prediction_id: &str, percent: u8) -> bool {
    let d = Sha256::digest(prediction_id.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b) % 100 < u64::from(percent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_and_bad_ones_say_why() {
        assert_eq!(Route::parse("local").unwrap(), Route::Local);
        assert_eq!(
            Route::parse("upstream:hosted").unwrap(),
            Route::Upstream("hosted".into())
        );
        assert_eq!(
            Route::parse("canary:h:25").unwrap(),
            Route::Canary {
                upstream: "h".into(),
                percent: 25
            }
        );
        assert_eq!(
            Route::parse("shadow:h:10").unwrap(),
            Route::Shadow {
                upstream: "h".into(),
                percent: 10
            }
        );
        let e = Route::parse("shadow:local:10").unwrap_err();
        assert!(e.contains("not supported"), "{e}");
        assert!(Route::parse("shadow:h").is_err());
        assert!(Route::parse("shadow:h:200")
            .unwrap_err()
            .contains("percentage"));
        assert!(Route::parse("canary:h:101")
            .unwrap_err()
            .contains("percentage"));
        assert!(Route::parse("upstream:").is_err());
        assert!(Route::parse("elsewhere")
            .unwrap_err()
            .contains("not a route"));
        let m = ModelRoute::parse("acme/llm=fallback:h").unwrap();
        assert_eq!(m.model, "acme/llm");
        assert!(ModelRoute::parse("acme=local").is_err());
    }

    #[test]
    fn canary_is_deterministic_and_near_its_share() {
        let ids: Vec<String> = (0..4000).map(|i| format!("id{i}")).collect();
        let up = ids.iter().filter(|i| canary_goes_upstream(i, 25)).count();
        assert!((800..1200).contains(&up), "{up}");
        assert!(ids
            .iter()
            .all(|i| canary_goes_upstream(i, 25) == canary_goes_upstream(i, 25)));
        assert!(ids.iter().all(|i| !canary_goes_upstream(i, 0)));
        assert!(ids.iter().all(|i| canary_goes_upstream(i, 100)));
    }
}
