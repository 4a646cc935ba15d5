//! Every route while the models load (see `crate::startup`): the same table and
//! access rules, Cog's answers on Cog's routes (`STARTING`/`SETUP_FAILED` health, 503
//! on `POST /predictions` and `/openapi.json`), and a 503 everywhere else, with
//! `Retry-After` while setup may still succeed.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;
use serde_json::json;

use super::{json_response, route_table, Access};
use crate::error::ApiError;
use crate::startup::Gate;

/// What Cog answers a prediction request before setup has finished.
pub const SETUP_NOT_FINISHED: &str =
    "Setup has not finished yet. Wait until it has finished, or GET /health-check for status.";
/// Seconds a client is told to wait while the models load.
const RETRY_AFTER: u64 = 5;

pub fn router(gate: Arc<Gate>) -> Router {
    let mut r = Router::new();
    for spec in route_table(&gate.cfg) {
        let Ok(filter) = MethodFilter::try_from(spec.method.clone()) else {
            continue;
        };
        let handler = on(filter, answer);
        let handler = match spec.access {
            Access::Token => {
                handler.layer(middleware::from_fn_with_state(gate.clone(), authenticate))
            }
            Access::Public | Access::Capability => handler,
        };
        r = r.route(spec.path, handler);
    }
    let guard = Arc::new(super::browser_guard::BrowserGuard::new(&gate.cfg));
    r.fallback(unknown)
        .layer(middleware::from_fn_with_state(
            guard,
            super::browser_guard::check,
        ))
        .with_state(gate)
}

async fn authenticate(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
    if gate.auth.accepts(req.headers()) {
        next.run(req).await
    } else {
        ApiError::unauthenticated().into_response()
    }
}

async fn unknown(State(gate): State<Arc<Gate>>, req: Request) -> Response {
    if !gate.auth.accepts(req.headers()) {
        return ApiError::unauthenticated().into_response();
    }
    ApiError::not_found("no such route").into_response()
}

async fn answer(State(gate): State<Arc<Gate>>, method: Method, path: MatchedPath) -> Response {
    let failed = gate.has_failed();
    let cog_error =
        |status, msg: &str| json_response(status, &json!({"error": msg, "status": "failed"}));
    match (method, path.as_str()) {
        (_, "/health-check") => {
            let status = if failed { "SETUP_FAILED" } else { "STARTING" };
            json_response(StatusCode::OK, &gate.report().health(status))
        }
        (_, "/openapi.json") => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "OpenAPI schema not available"}),
        ),
        (Method::GET, "/") => super::cog::index().await,
        (Method::POST, "/predictions") | (Method::PUT, "/predictions/{id}") => {
            cog_error(StatusCode::SERVICE_UNAVAILABLE, SETUP_NOT_FINISHED)
        }
        // Nothing runs yet, so there is nothing to cancel.
        (Method::POST, "/predictions/{id}/cancel") => {
            json_response(StatusCode::NOT_FOUND, &json!({}))
        }
        (Method::POST, "/shutdown") => {
            gate.stop.cancel();
            json_response(StatusCode::OK, &json!({}))
        }
        (_, "/v1/chat/completions" | "/v1/completions") => {
            let e = crate::openai::OaiError::unavailable(unavailable_message(failed));
            with_retry(e.into_response(), failed)
        }
        _ => with_retry(
            ApiError::unavailable(unavailable_message(failed)).into_response(),
            failed,
        ),
    }
}

fn unavailable_message(failed: bool) -> &'static str {
    if failed {
        "the server's setup failed and it serves no model; GET /health-check for the setup logs"
    } else {
        "the server is loading its models; retry shortly (GET /health-check says READY when it is up)"
    }
}

/// While setup may still succeed, a client is told when to try again.
fn with_retry(mut r: Response, failed: bool) -> Response {
    if failed {
        r.headers_mut().remove(header::RETRY_AFTER);
    } else {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER));
    }
    r
}
