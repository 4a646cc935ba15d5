//! Where a model's predictions run: `--route OWNER/NAME=ROUTE`.

use sha2::{Digest, Sha256};

pub use super::compare::Side;

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
    /// Every create runs on the `primary` side (the caller's prediction); `percent`
    /// of them (by the same hash as a canary) are also copied to the other side in
    /// the background, for the comparison only. `shadow:UP:PCT`: the primary is this
    /// server's engine, copies go to the upstream (`shadow`). `shadow-local:UP:PCT`:
    /// the primary is the upstream, copies run on the local engine at background
    /// priority (`shadow_local`).
    Shadow {
        upstream: String,
        percent: u8,
        primary: Side,
    },
}

impl Route {
    /// `local`, `upstream:UP`, `fallback:UP`, `canary:UP:PCT`, `shadow:UP:PCT` or
    /// `shadow-local:UP:PCT`.
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
            // Ambiguous: which side is primary? Each direction has its own word.
            ["shadow", "local", ..] => Err(format!(
                "{s:?}: shadow:UP:PCT serves callers here and copies to upstream UP; to serve \
                 callers from upstream UP and run the copies on the local engine, write \
                 shadow-local:UP:PCT"
            )),
            ["shadow", up, pct] => Ok(Route::Shadow {
                upstream: name(up)?,
                percent: percent(pct)?,
                primary: Side::Local,
            }),
            ["shadow-local", up, pct] => Ok(Route::Shadow {
                upstream: name(up)?,
                percent: percent(pct)?,
                primary: Side::Upstream,
            }),
            _ => Err(format!(
                "{s:?} is not a route: expected local, upstream:UP, fallback:UP, canary:UP:PCT, \
                 shadow:UP:PCT or shadow-local:UP:PCT"
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

    /// Whether the model must also be served here: what it runs here, if so.
    pub fn needs_local_model(&self) -> Option<&'static str> {
        match self {
            Route::Local | Route::Fallback(_) => Some("runs the model here first"),
            Route::Shadow {
                primary: Side::Local,
                ..
            } => Some("serves callers here"),
            Route::Shadow { .. } => Some("runs its shadow copies on the local engine"),
            Route::Upstream(_) | Route::Canary { .. } => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Route::Local => "local".into(),
            Route::Upstream(u) => format!("upstream:{u}"),
            Route::Fallback(u) => format!("fallback:{u}"),
            Route::Canary { upstream, percent } => format!("canary:{upstream}:{percent}"),
            Route::Shadow {
                upstream,
                percent,
                primary: Side::Local,
            } => format!("shadow:{upstream}:{percent}"),
            Route::Shadow {
                upstream, percent, ..
            } => format!("shadow-local:{upstream}:{percent}"),
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
                percent: 10,
                primary: Side::Local,
            }
        );
        let r = Route::parse("shadow-local:h:10").unwrap();
        assert_eq!(
            r,
            Route::Shadow {
                upstream: "h".into(),
                percent: 10,
                primary: Side::Upstream,
            }
        );
        assert_eq!(r.describe(), "shadow-local:h:10");
        assert!(r.needs_local_model().unwrap().contains("copies"));
        assert_eq!(
            Route::parse("shadow:h:10").unwrap().describe(),
            "shadow:h:10"
        );
        let e = Route::parse("shadow:local:10").unwrap_err();
        assert!(e.contains("shadow-local:UP:PCT"), "{e}");
        assert!(Route::parse("shadow-local:h").is_err());
        assert!(Route::parse("shadow-local:h:101").is_err());
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
