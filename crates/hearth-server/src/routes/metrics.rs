//! `GET /metrics` in Prometheus text format.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

use crate::AppState;

pub async fn prometheus(State(state): State<Arc<AppState>>) -> Response {
    let mut out = String::new();
    for m in state.models.all() {
        if let Some(metrics) = state.metrics.get(&m.full_name()) {
            metrics.render(&mut out, &m.engine.stats());
        }
    }
    state.http_metrics.render_http(&mut out);
    state.upstream.render_metrics(&mut out);
    state.upstream.compare.render_metrics(&mut out);
    let mut r = out.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}
