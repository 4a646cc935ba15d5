//! The HTTP surface: which path goes to which handler, and what every request passes
//! through (authentication, JSON errors, request metrics).

pub mod cog;
pub mod files;
pub mod metrics;
pub mod misc;
pub mod models;
pub mod predictions;
pub mod stream;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::error::ApiError;
use crate::AppState;

pub type AppResult<T> = Result<T, ApiError>;

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route(
            "/predictions",
            post(predictions::create).get(predictions::list),
        )
        .route("/predictions/{id}", get(predictions::get_one))
        .route("/predictions/{id}/cancel", post(predictions::cancel))
        .route("/models", get(models::list))
        .route("/models/{owner}/{name}", get(models::get_one))
        .route(
            "/models/{owner}/{name}/predictions",
            post(predictions::create_for_model),
        )
        .route("/models/{owner}/{name}/versions", get(models::versions))
        .route(
            "/models/{owner}/{name}/versions/{version}",
            get(models::version),
        )
        .route(
            "/models/{owner}/{name}/versions/{version}/predictions",
            post(predictions::create_for_version),
        )
        .route(
            "/deployments/{owner}/{name}/predictions",
            post(predictions::create_for_deployment),
        )
        .route("/account", get(misc::account))
        .route("/hardware", get(misc::hardware))
        .route("/webhooks/default/secret", get(misc::webhook_secret))
        .route("/files", post(files::upload).get(files::list))
        .route("/files/{id}", get(files::get_one).delete(files::delete))
        .route("/files/{id}/download", get(files::download))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let limit = state.cfg.max_body_bytes;
    Router::new()
        .nest("/v1", v1)
        // Unguessable URLs, usable without a token (JS sends none on streams).
        .route("/streams/{id}/{token}", get(stream::sse))
        .route("/", get(cog::index))
        .route("/health-check", get(cog::health))
        .route("/openapi.json", get(cog::openapi))
        .route("/predictions", post(cog::create))
        .route("/predictions/{id}", axum::routing::put(cog::put))
        .route("/predictions/{id}/cancel", post(cog::cancel))
        .route("/shutdown", post(cog::shutdown))
        .route("/metrics", get(metrics::prometheus))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// `Authorization: Bearer T` or the older `Token T`, when tokens are configured.
async fn authenticate(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.cfg.api_tokens.is_empty() {
        return next.run(req).await;
    }
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("Token "))
        })
        .is_some_and(|t| state.cfg.api_tokens.iter().any(|k| k == t.trim()));
    if ok {
        next.run(req).await
    } else {
        ApiError::unauthenticated().into_response()
    }
}

/// Counts requests by route and status, and turns any error answered by the
/// framework itself (oversize body, wrong method, bad path) into a JSON problem.
async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    let status = resp.status();
    state.http_metrics.http(&method, &route, status.as_u16());
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.contains("json"));
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        let (parts, body) = resp.into_parts();
        let text = axum::body::to_bytes(body, 64 * 1024)
            .await
            .unwrap_or_default();
        let detail = String::from_utf8_lossy(&text).trim().to_string();
        let detail = if detail.is_empty() {
            parts
                .status
                .canonical_reason()
                .unwrap_or("error")
                .to_string()
        } else {
            detail
        };
        let title = match parts.status {
            StatusCode::PAYLOAD_TOO_LARGE => "Request body too large",
            StatusCode::METHOD_NOT_ALLOWED => "Method not allowed",
            StatusCode::NOT_FOUND => "Not found",
            _ => "Bad request",
        };
        let mut out = ApiError::new(parts.status, title, detail).into_response();
        for (k, v) in parts.headers.iter() {
            if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
                out.headers_mut().insert(k.clone(), v.clone());
            }
        }
        return out;
    }
    resp
}

/// Base of absolute URLs: the configured public URL, else `http://{Host}`.
pub fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(u) = &state.cfg.public_url {
        return u.trim_end_matches('/').to_string();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| state.cfg.addr.to_string());
    let proto = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .filter(|p| *p == "https")
        .unwrap_or("http");
    format!("{proto}://{host}")
}

pub fn json_response(status: StatusCode, v: &serde_json::Value) -> Response {
    let mut r = Response::new(Body::from(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Parses a JSON body ourselves so malformed JSON gets a problem document that says
/// what is wrong, not the framework's text.
pub fn parse_json_body(body: &[u8]) -> AppResult<serde_json::Value> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(serde_json::Value::Object(Default::default()));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))
}
