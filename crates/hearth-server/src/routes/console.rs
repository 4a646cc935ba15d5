//! The web console at `/ui`: one HTML shell and its scripts and styles, all embedded
//! in the binary and the same bytes for everyone, so they answer without a token. The
//! page asks for the token once, keeps it in `sessionStorage` and sends it as an
//! `Authorization` header on every API call; everything it shows comes from the
//! token-guarded API. `GET /` sends a browser (one that prefers HTML) here; API
//! clients keep Cog's JSON index.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::json_response;
use crate::AppState;

/// Only the console's own files, from this origin: no inline script or style, nothing
/// from a third party, no framing, no form posted anywhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// Path, content type, body: every file the console is made of.
pub const ASSETS: &[(&str, &str, &str)] = &[
    (
        "/ui",
        "text/html; charset=utf-8",
        include_str!("../../assets/console/index.html"),
    ),
    (
        "/ui/console.css",
        "text/css; charset=utf-8",
        include_str!("../../assets/console/console.css"),
    ),
    (
        "/ui/app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/console/app.js"),
    ),
    (
        "/ui/api.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/console/api.js"),
    ),
    (
        "/ui/json.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/console/json.js"),
    ),
    (
        "/ui/form.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/console/form.js"),
    ),
    (
        "/ui/playground.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/console/playground.js"),
    ),
    (
        "/ui/chat.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/console/chat.js"),
    ),
    (
        "/ui/predictions.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/console/predictions.js"),
    ),
    (
        "/ui/ops.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/console/ops.js"),
    ),
    (
        "/ui/ops_upstream.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/console/ops_upstream.js"),
    ),
    (
        "/ui/chart.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/console/chart.js"),
    ),
    (
        "/ui/compare.js",
        "text/javascript; charset=utf-8",
        include_str!("../../assets/console/compare.js"),
    ),
];

/// One embedded file with the console's headers.
pub fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Revalidated each load: a new binary serves new files at the same paths.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

/// `GET /v1/console/ops`: the operations view's history (ops_history.rs).
pub async fn ops(State(state): State<Arc<AppState>>) -> Response {
    json_response(StatusCode::OK, &state.ops.to_json(&state))
}

/// `GET /v1/console/routes`: the models whose predictions do not simply run here, each
/// with its route and whether it is served here too; the console lists those that run
/// upstream only beside the local ones (`/v1/models` lists what this server serves, as
/// the API clients expect).
pub async fn routes(State(state): State<Arc<AppState>>) -> Response {
    let mut routes: Vec<serde_json::Value> = state
        .upstream
        .routes()
        .filter(|(_, r)| r.upstream().is_some())
        .map(|(model, r)| {
            let served_here = crate::models::split_name(model)
                .ok()
                .is_some_and(|(o, n)| state.models.by_name(&o, &n).is_some());
            serde_json::json!({"model": model, "route": r.describe(), "served_here": served_here})
        })
        .collect();
    routes.sort_by(|a, b| a["model"].as_str().cmp(&b["model"].as_str()));
    json_response(StatusCode::OK, &serde_json::json!({ "routes": routes }))
}

/// `GET /` from a browser goes to the console before any token is asked for (the
/// console asks for it itself); every other request to `/` passes on unchanged.
pub async fn redirect_browsers(req: Request, next: Next) -> Response {
    if req.uri().path() == "/"
        && matches!(*req.method(), Method::GET | Method::HEAD)
        && prefers_html(req.headers())
    {
        let mut r = StatusCode::SEE_OTHER.into_response();
        r.headers_mut()
            .insert(header::LOCATION, HeaderValue::from_static("/ui"));
        r.headers_mut()
            .insert(header::VARY, HeaderValue::from_static("Accept"));
        return r;
    }
    next.run(req).await
}

/// Whether `Accept` ranks HTML above JSON: a browser's navigation does
/// (`text/html,…,*/*;q=0.8`); `*/*` alone (curl), no header or `application/json`
/// (the API clients) does not.
pub fn prefers_html(headers: &HeaderMap) -> bool {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let ranges: Vec<(String, f32)> = accept
        .split(',')
        .filter_map(|part| {
            let mut it = part.split(';');
            let range = it.next()?.trim().to_ascii_lowercase();
            let q = it
                .filter_map(|p| p.trim().strip_prefix("q=").map(str::trim))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            (!range.is_empty()).then_some((range, q.clamp(0.0, 1.0)))
        })
        .collect();
    // The most specific range that matches a type gives its quality (RFC 9110 12.5.1).
    let quality = |ty: &str| -> f32 {
        let major = ty.split('/').next().unwrap_or("");
        let wildcard = format!("{major}/*");
        for want in [ty, wildcard.as_str(), "*/*"] {
            if let Some((_, q)) = ranges.iter().find(|(r, _)| r == want) {
                return *q;
            }
        }
        0.0
    };
    let html = quality("text/html").max(quality("application/xhtml+xml"));
    html > 0.0 && html > quality("application/json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn browsers_prefer_html_and_api_clients_do_not() {
        let chromium = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7";
        let firefox = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
        assert!(prefers_html(&accept(chromium)));
        assert!(prefers_html(&accept(firefox)));
        for v in [
            "*/*",
            "application/json",
            "application/json, text/html",
            "text/html;q=0.5, application/json",
            "text/html;q=0",
            "",
        ] {
            assert!(!prefers_html(&accept(v)), "{v:?}");
        }
        assert!(!prefers_html(&HeaderMap::new()));
        assert!(prefers_html(&accept("text/*")));
    }
}
