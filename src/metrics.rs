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
    /// Set from `--ca-bundle-file` only.
    pub ca_bundle_not_after: Gauge<i64, AtomicI64>,
    pub ca_bundle_publishes: Family<ReloadLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub controller: &'static str,
    pub result: ReconcileResult,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ReconcileResult {
    Ok,
    Error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BatchLabels {
    pub namespace: String,
    pub batch: String,
}

pub struct ControllerMetrics {
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    pub sessions_finished: Family<SessionLabels, Counter>,
    pub last_success: Family<BatchLabels, Gauge<i64, AtomicI64>>,
    pub managed_batches: Gauge<i64, AtomicI64>,
    pub leader: Gauge<i64, AtomicI64>,
}

/// Every metric of the process, registered once at start-up.
pub struct Metrics {
    registry: Registry,
    pub webhook: WebhookMetrics,
    pub tls: TlsMetrics,
    pub controller: ControllerMetrics,
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
        let tls = TlsMetrics {
            certificate_not_after: Gauge::default(),
            reloads: Family::default(),
            ca_bundle_not_after: Gauge::default(),
            ca_bundle_publishes: Family::default(),
        };
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
        registry.register(
            "webhook_ca_bundle_not_after_seconds",
            "Earliest expiry (Unix time) among the CAs of the caBundle published from --ca-bundle-file",
            tls.ca_bundle_not_after.clone(),
        );
        registry.register(
            "webhook_ca_bundle_publishes",
            "Attempts to publish a changed --ca-bundle-file as the webhook caBundle, by result",
            tls.ca_bundle_publishes.clone(),
        );
        let controller = ControllerMetrics {
            reconciles: Family::default(),
            reconcile_duration: Family::new_with_constructor(|| {
                Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0])
            }),
            sessions_finished: Family::default(),
            last_success: Family::default(),
            managed_batches: Gauge::default(),
            leader: Gauge::default(),
        };
        registry.register("reconciles", "Reconciles, by controller and result", controller.reconciles.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took, by controller",
            controller.reconcile_duration.clone(),
        );
        registry.register(
            "backup_sessions_finished",
            "BackupSessions that reached a final phase, by phase",
            controller.sessions_finished.clone(),
        );
        registry.register(
            "backup_last_success_timestamp_seconds",
            "When the last successful session of a batch finished (Unix time)",
            controller.last_success.clone(),
        );
        registry.register(
            "managed_backup_batches",
            "BackupBatches the controller manages",
            controller.managed_batches.clone(),
        );
        registry.register(
            "controller_leader",
            "1 while this replica holds the controller Lease",
            controller.leader.clone(),
        );
        Self { registry, webhook, tls, controller }
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
