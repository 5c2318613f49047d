//! The plain-HTTP admin port: `/livez`, `/readyz` and `/metrics`.

use crate::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What must hold before the process takes traffic.
#[derive(Debug, Default)]
pub struct Readiness {
    pub certificate_loaded: AtomicBool,
    pub caches_synced: AtomicBool,
    /// Every CRD we serve is ours, not another installation's (`install`).
    pub crds_ours: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.certificate_loaded.load(Ordering::Acquire)
            && self.caches_synced.load(Ordering::Acquire)
            && self.crds_ours.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct AdminState {
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
}

pub fn router(readiness: Arc<Readiness>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AdminState { readiness, metrics })
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let readiness = &state.readiness;
    if readiness.is_ready() {
        return "ok".into_response();
    }
    let mut waiting = Vec::new();
    if !readiness.certificate_loaded.load(Ordering::Acquire) {
        waiting.push("certificate not loaded");
    }
    if !readiness.caches_synced.load(Ordering::Acquire) {
        waiting.push("caches not synced");
    }
    if !readiness.crds_ours.load(Ordering::Acquire) {
        waiting.push("CRDs missing or another installation's (see the log)");
    }
    (StatusCode::SERVICE_UNAVAILABLE, waiting.join(", ")).into_response()
}

async fn metrics_text(State(state): State<AdminState>) -> Response {
    match state.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
