//! Upstreams and routes in model cards (`--models DIR`): a card may give its model a
//! `route` and declare `[upstream.NAME]` tables, so a folder of cards is a whole
//! configuration. Tokens never go in a card (cards are committed, shown and logged):
//! a card names a `token_file`, or the token comes from `HEARTH_UPSTREAM_TOKEN_<NAME>`.
//! A flag wins over a card: `--upstream NAME=...` over a card's upstream of that name,
//! `--route MODEL=...` over that model's card `route`, `--upstream-token-file` over a
//! card's `token_file`; a card's `stream_origins` go with its upstream (dropped when
//! a flag overrides it), and `--upstream-stream-origin` adds to either.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ModelRoute, Route, UpstreamSpec};
use crate::models::ModelCard;

/// `[upstream.NAME]` in a card.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CardUpstream {
    /// As `--upstream NAME=URL` takes it: a Replicate-compatible base, or `cog+URL`.
    pub url: String,
    /// The file holding the token, relative to the card's folder.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Other origins its `urls.stream` may be on, as `--upstream-stream-origin`
    /// takes them (`super::stream_origin`).
    #[serde(default)]
    pub stream_origins: Vec<String>,
}

/// An upstream a card declares, with where its token may come from.
#[derive(Debug, Clone)]
pub struct CardUpstreamSpec {
    pub spec: UpstreamSpec,
    pub token_file: Option<PathBuf>,
    /// The card that declared it, for messages.
    pub card: PathBuf,
}

/// What a folder of cards says about upstreams and routes.
#[derive(Debug, Default, Clone)]
pub struct CardConfig {
    pub upstreams: Vec<CardUpstreamSpec>,
    pub routes: Vec<ModelRoute>,
}

/// Refuses a `token` anywhere under `[upstream.*]` before the card is read further,
/// with a message that does not quote it.
pub fn refuse_tokens(table: &toml::Table) -> Result<(), String> {
    if let Some(toml::Value::Table(ups)) = table.get("upstream") {
        for (name, up) in ups {
            if up.as_table().is_some_and(|t| t.contains_key("token")) {
                return Err(format!(
                    "upstream.{name}.token: a token does not go in a model card (cards are \
                     committed and logged); name a token_file, or set \
                     HEARTH_UPSTREAM_TOKEN_{}",
                    super::env_suffix(name)
                ));
            }
        }
    }
    Ok(())
}

/// A card's `route`, checked; a card without `model` must route upstream only.
pub fn check_card(card: &ModelCard) -> Result<Option<Route>, String> {
    let route = card
        .route
        .as_deref()
        .map(Route::parse)
        .transpose()
        .map_err(|e| format!("route: {e}"))?;
    if card.model.is_empty() && !matches!(route, Some(Route::Upstream(_))) {
        return Err(
            "model: required, unless the card's route is upstream:UP (then no weights are loaded here)"
                .into(),
        );
    }
    for name in card.upstream.keys() {
        super::check_name(name).map_err(|e| format!("upstream.{name}: {e}"))?;
    }
    Ok(route)
}

/// The upstreams and routes of `cards` (each with its path).
pub fn from_cards(cards: &[(PathBuf, ModelCard)]) -> Result<CardConfig, String> {
    let mut out = CardConfig::default();
    for (path, card) in cards {
        let at = |e: String| format!("{}: {e}", path.display());
        if let Some(route) = check_card(card).map_err(at)? {
            out.routes.push(ModelRoute {
                model: card.name.clone(),
                route,
            });
        }
        for (name, up) in &card.upstream {
            let mut spec = UpstreamSpec::parse(&format!("{name}={}", up.url)).map_err(at)?;
            for o in &up.stream_origins {
                let origin = super::stream_origin::parse_origin(o)
                    .map_err(|e| at(format!("upstream.{name}.stream_origins: {e}")))?;
                spec.stream_origins.push(origin);
            }
            if let Some(other) = out.upstreams.iter().find(|u| u.spec.name == *name) {
                return Err(at(format!(
                    "upstream.{name}: also declared in {}; declare each upstream once",
                    other.card.display()
                )));
            }
            let dir = path.parent().unwrap_or(Path::new("."));
            out.upstreams.push(CardUpstreamSpec {
                spec,
                token_file: up.token_file.as_ref().map(|f| dir.join(f)),
                card: path.clone(),
            });
        }
    }
    Ok(out)
}
