//! `urls.web`: a small page showing one prediction (status, input, output as it
//! streams, metrics, logs), served from the binary. It is a capability URL like the
//! stream URL, with the same token, so a browser needs no API token; the page reads
//! the prediction through `/p/{id}/{token}/json` and the stream URL and nothing else.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{json_response, AppResult};
use crate::error::ApiError;
use crate::record::{new_token, secret_eq, Record};
use crate::service::lookup;
use crate::AppState;

const PAGE: &str = include_str!("../../assets/prediction.html");

async fn authorized(state: &AppState, id: &str, token: &str) -> AppResult<Record> {
    let r = lookup(state, id).await?;
    if !secret_eq(&r.stream_token, token) {
        return Err(ApiError::not_found(format!("prediction {id} not found")));
    }
    Ok(r)
}

pub async fn page(
    State(state): State<Arc<AppState>>,
    Path((id, token)): Path<(String, String)>,
) -> AppResult<Response> {
    authorized(&state, &id, &token).await?;
    // A fresh nonce per response: only the page's own script and style run.
    let nonce = new_token();
    let mut r = PAGE.replace("{{NONCE}}", &nonce).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(csp) = HeaderValue::from_str(&format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; \
         connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )) {
        h.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    secure(h);
    Ok(r)
}

pub async fn json(
    State(state): State<Arc<AppState>>,
    Path((id, token)): Path<(String, String)>,
) -> AppResult<Response> {
    let r = authorized(&state, &id, &token).await?;
    let mut resp = json_response(StatusCode::OK, &r.to_json());
    secure(resp.headers_mut());
    Ok(resp)
}

/// The token is in the URL: keep it out of Referer headers and caches.
fn secure(h: &mut axum::http::HeaderMap) {
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}
