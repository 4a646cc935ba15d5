//! The HTTP surface: which path goes to which handler, and what every request passes
//! through (authentication, JSON errors, request metrics).

pub mod browser_guard;
pub mod cog;
pub mod cog_stream;
pub mod compare;
pub mod console;
pub mod files;
pub mod metrics;
pub mod misc;
pub mod models;
pub mod openai;
pub mod predictions;
pub mod startup;
pub mod stream;
pub mod web;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put, MethodRouter};
use axum::Router;

use crate::error::ApiError;
use crate::{AppState, ServerConfig};

pub type AppResult<T> = Result<T, ApiError>;

/// Who may call a route when API tokens are configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: the health check, Cog's schema, (with `--metrics-public`) metrics.
    Public,
    /// Anyone holding the URL: its last segment is an unguessable token.
    Capability,
    /// `Authorization: Bearer T` (or `Token T`).
    Token,
}

/// One registered route: what the router serves and what the auth test walks.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
}

struct Entry {
    spec: RouteSpec,
    handler: MethodRouter<Arc<AppState>>,
}

fn e(
    method: Method,
    path: &'static str,
    access: Access,
    handler: MethodRouter<Arc<AppState>>,
) -> Entry {
    Entry {
        spec: RouteSpec {
            method,
            path,
            access,
        },
        handler,
    }
}

/// Every route the server registers. The router is built from this table alone, so a
/// route cannot be added without saying who may call it.
fn entries(cfg: &ServerConfig) -> Vec<Entry> {
    use Access::*;
    let file_limit = DefaultBodyLimit::max((cfg.max_file_bytes as usize).saturating_add(1 << 20));
    let mut v = vec![
        e(
            Method::POST,
            "/v1/predictions",
            Token,
            post(predictions::create),
        ),
        e(
            Method::GET,
            "/v1/predictions",
            Token,
            get(predictions::list),
        ),
        e(
            Method::GET,
            "/v1/predictions/{id}",
            Token,
            get(predictions::get_one),
        ),
        e(
            Method::POST,
            "/v1/predictions/{id}/cancel",
            Token,
            post(predictions::cancel),
        ),
        e(Method::GET, "/v1/models", Token, get(models::list)),
        e(
            Method::GET,
            "/v1/models/{owner}/{name}",
            Token,
            get(models::get_one),
        ),
        // OpenAI's: its client sends `owner/name` as one escaped segment.
        e(
            Method::GET,
            "/v1/models/{id}",
            Token,
            get(models::get_by_id),
        ),
        e(
            Method::POST,
            "/v1/chat/completions",
            Token,
            post(openai::chat_completions),
        ),
        e(
            Method::POST,
            "/v1/completions",
            Token,
            post(openai::completions),
        ),
        e(
            Method::POST,
            "/v1/models/{owner}/{name}/predictions",
            Token,
            post(predictions::create_for_model),
        ),
        e(
            Method::GET,
            "/v1/models/{owner}/{name}/versions",
            Token,
            get(models::versions),
        ),
        e(
            Method::GET,
            "/v1/models/{owner}/{name}/versions/{version}",
            Token,
            get(models::version),
        ),
        e(
            Method::POST,
            "/v1/models/{owner}/{name}/versions/{version}/predictions",
            Token,
            post(predictions::create_for_version),
        ),
        e(
            Method::POST,
            "/v1/deployments/{owner}/{name}/predictions",
            Token,
            post(predictions::create_for_deployment),
        ),
        e(Method::GET, "/v1/account", Token, get(misc::account)),
        e(Method::GET, "/v1/hardware", Token, get(misc::hardware)),
        e(
            Method::GET,
            "/v1/webhooks/default/secret",
            Token,
            get(misc::webhook_secret),
        ),
        e(
            Method::POST,
            "/v1/files",
            Token,
            post(files::upload).layer(file_limit),
        ),
        e(Method::GET, "/v1/files", Token, get(files::list)),
        e(Method::GET, "/v1/files/{id}", Token, get(files::get_one)),
        e(
            Method::DELETE,
            "/v1/files/{id}",
            Token,
            delete(files::delete),
        ),
        e(
            Method::GET,
            "/v1/files/{id}/download",
            Token,
            get(files::download),
        ),
        // Capability URLs: the JS client sends no token on streams, browsers none on pages.
        e(
            Method::GET,
            "/streams/{id}/{token}",
            Capability,
            get(stream::sse),
        ),
        e(Method::GET, "/p/{id}/{token}", Capability, get(web::page)),
        e(
            Method::GET,
            "/p/{id}/{token}/json",
            Capability,
            get(web::json),
        ),
        e(Method::GET, "/health-check", Public, get(cog::health)),
        // For load balancers and Kubernetes probes: the status code says it all.
        e(Method::GET, "/health", Public, get(misc::health)),
        e(
            Method::GET,
            "/metrics",
            if cfg.metrics_public { Public } else { Token },
            get(metrics::prometheus),
        ),
    ];
    // The console's files are the same for everyone; its data needs the token.
    for (path, content_type, body) in console::ASSETS {
        v.push(e(
            Method::GET,
            path,
            Public,
            get(move || async move { console::asset(content_type, body) }),
        ));
    }
    v.push(e(Method::GET, "/v1/console/ops", Token, get(console::ops)));
    v.push(e(
        Method::GET,
        "/v1/console/routes",
        Token,
        get(console::routes),
    ));
    v.push(e(
        Method::GET,
        "/v1/hearth/compare",
        Token,
        get(compare::compare),
    ));
    if cfg.cog_api {
        v.extend([
            e(Method::GET, "/", Token, get(cog::index)),
            e(Method::GET, "/openapi.json", Public, get(cog::openapi)),
            e(Method::POST, "/predictions", Token, post(cog::create)),
            e(Method::PUT, "/predictions/{id}", Token, put(cog::put)),
            e(
                Method::POST,
                "/predictions/{id}/cancel",
                Token,
                post(cog::cancel),
            ),
            e(Method::POST, "/shutdown", Token, post(cog::shutdown)),
        ]);
    }
    v
}

/// What `router` registers, for tests and docs.
pub fn route_table(cfg: &ServerConfig) -> Vec<RouteSpec> {
    entries(cfg).into_iter().map(|e| e.spec).collect()
}

pub fn router(state: Arc<AppState>) -> Router {
    let mut r = Router::new();
    for entry in entries(&state.cfg) {
        let handler = match entry.spec.access {
            // `layer`, not `route_layer`: a wrong method on a guarded path is a 401 too,
            // so nothing about the server answers without the token.
            Access::Token => entry
                .handler
                .layer(middleware::from_fn_with_state(state.clone(), authenticate)),
            Access::Public | Access::Capability => entry.handler,
        };
        r = r.route(entry.spec.path, handler);
    }
    let limit = state.cfg.max_body_bytes;
    r.fallback(unknown_route)
        .layer(middleware::from_fn(console::redirect_browsers))
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            Arc::new(browser_guard::BrowserGuard::new(&state.cfg)),
            browser_guard::check,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Unknown paths: 401 without a valid token (when tokens are set), else 404.
async fn unknown_route(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if !state.auth.accepts(&headers) {
        return ApiError::unauthenticated().into_response();
    }
    ApiError::not_found("no such route").into_response()
}

/// `Authorization: Bearer T` or the older `Token T`, when tokens are configured.
async fn authenticate(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.auth.accepts(req.headers()) {
        next.run(req).await
    } else {
        ApiError::unauthenticated().into_response()
    }
}

/// Counts requests by route and status, and turns any error answered by the
/// framework itself (oversize body, wrong method, bad path) into a JSON problem.
async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    // Bounded label sets: a client can send any method or path.
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    let status = resp.status();
    state.http_metrics.http(method, &route, status.as_u16());
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
/// what is wrong, not the framework's text. An empty body is an empty object.
pub fn parse_json_body(body: &[u8]) -> AppResult<serde_json::Value> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(serde_json::Value::Object(Default::default()));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))
}
