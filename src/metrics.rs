//! Prometheus metrics of the operator process, served as text on the admin port's `/metrics`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicI64;

/// Admission latency buckets: answering is pure CPU, so most of the mass sits well under a millisecond.
const ADMISSION_BUCKETS: [f64; 12] =
    [0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 0.5];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub operation: AdmissionOperation,
    pub result: AdmissionResult,
    pub mutated: bool,
}

/// The admission operation, bounded so that odd requests cannot grow the label set.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(clippy::upper_case_acronyms)] // Kubernetes spells them this way
pub enum AdmissionOperation {
    CREATE,
    UPDATE,
    DELETE,
    CONNECT,
    Other,
}

impl AdmissionOperation {
    pub fn parse(operation: &str) -> Self {
        match operation {
            "CREATE" => Self::CREATE,
            "UPDATE" => Self::UPDATE,
            "DELETE" => Self::DELETE,
            "CONNECT" => Self::CONNECT,
            _ => Self::Other,
        }
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum AdmissionResult {
    Allowed,
    BadRequest,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: ReloadResult,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ReloadResult {
    Ok,
    Failed,
}

pub struct WebhookMetrics {
    pub requests: Family<AdmissionLabels, Counter>,
    pub latency: Histogram,
}

pub struct TlsMetrics {
    pub certificate_not_after: Gauge<i64, AtomicI64>,
    pub reloads: Family<ReloadLabels, Counter>,
}

/// Every metric of the process, registered once at start-up.
pub struct Metrics {
    registry: Registry,
    pub webhook: WebhookMetrics,
    pub tls: TlsMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("stash");
        let webhook = WebhookMetrics { requests: Family::default(), latency: Histogram::new(ADMISSION_BUCKETS) };
        registry.register(
            "webhook_requests",
            "Admission requests answered, by operation, result and whether a patch was returned",
            webhook.requests.clone(),
        );
        registry.register(
            "webhook_request_duration_seconds",
            "Time to answer one admission request, from body received to response built",
            webhook.latency.clone(),
        );
        let tls = TlsMetrics { certificate_not_after: Gauge::default(), reloads: Family::default() };
        registry.register(
            "webhook_certificate_not_after_seconds",
            "Expiry (Unix time) of the serving certificate in use",
            tls.certificate_not_after.clone(),
        );
        registry.register(
            "webhook_certificate_reloads",
            "Serving certificate reload attempts, by result",
            tls.reloads.clone(),
        );
        Self { registry, webhook, tls }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
