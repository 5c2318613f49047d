//! `POST /mutate-pods`: timing, metrics and the HTTP shape around the mutator.

use super::mutate::{Mutator, Verdict};
use crate::metrics::{AdmissionLabels, AdmissionOperation, AdmissionResult, Metrics};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use std::sync::Arc;
use std::time::Instant;
use tower_http::limit::RequestBodyLimitLayer;

pub const MUTATE_PODS_PATH: &str = "/mutate-pods";

#[derive(Clone)]
struct WebhookState {
    mutator: Arc<Mutator>,
    metrics: Arc<Metrics>,
}

/// The webhook's routes; bodies over `max_body_bytes` are refused with 413.
pub fn router(mutator: Arc<Mutator>, metrics: Arc<Metrics>, max_body_bytes: usize) -> Router {
    Router::new()
        .route(MUTATE_PODS_PATH, post(mutate_pods))
        .layer(RequestBodyLimitLayer::new(max_body_bytes))
        .with_state(WebhookState { mutator, metrics })
}

async fn mutate_pods(State(state): State<WebhookState>, body: Bytes) -> Response {
    let started = Instant::now();
    let (labels, response) = match state.mutator.review(&body) {
        Ok(reviewed) => {
            let mutated = reviewed.verdict == Verdict::Mutated;
            let labels = AdmissionLabels { operation: reviewed.operation, result: AdmissionResult::Allowed, mutated };
            match reviewed.review.to_json() {
                Ok(json) => (labels, ([(header::CONTENT_TYPE, "application/json")], json).into_response()),
                Err(err) => (labels, (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response()),
            }
        }
        Err(bad) => {
            tracing::debug!(error = %bad, "bad admission request");
            let labels = AdmissionLabels {
                operation: AdmissionOperation::Other,
                result: AdmissionResult::BadRequest,
                mutated: false,
            };
            (labels, (StatusCode::BAD_REQUEST, bad.to_string()).into_response())
        }
    };
    state.metrics.webhook.latency.observe(started.elapsed().as_secs_f64());
    state.metrics.webhook.requests.get_or_create(&labels).inc();
    response
}
