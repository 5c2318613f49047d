//! Prometheus metrics of the operator process, served as text on the admin port's `/metrics`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64};

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
    /// 1 while a new serving certificate waits for the caBundle to trust its CA (`--ca-bundle-secret`).
    pub certificate_held: Gauge<i64, AtomicI64>,
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

/// One kind of request the operator sent to the API server (`api_requests`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiRequestLabels {
    pub verb: ApiVerb,
    /// As the audit log names it: `cronjobs`, `backupbatches/status`; `other` outside the resource API.
    pub resource: String,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the audit log's spelling
pub enum ApiVerb {
    get,
    list,
    watch,
    create,
    update,
    patch,
    delete,
    deletecollection,
    other,
}

impl ApiVerb {
    /// `named`: the path names one object; `watch`: the query asks for a watch.
    pub(crate) fn from_method(method: &http::Method, named: bool, watch: bool) -> Self {
        match *method {
            http::Method::GET if watch => Self::watch,
            http::Method::GET if named => Self::get,
            http::Method::GET => Self::list,
            http::Method::POST => Self::create,
            http::Method::PUT => Self::update,
            http::Method::PATCH => Self::patch,
            http::Method::DELETE if named => Self::delete,
            http::Method::DELETE => Self::deletecollection,
            _ => Self::other,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

/// The labels of a series computed from API objects, as name-value pairs in the order exported:
/// one shape for every state gauge, so that one function can compute them all (`controller::observed`).
pub(crate) type SeriesLabels = Vec<(&'static str, String)>;

/// A gauge whose value is read from API objects (batch, session, Repository and RestoreBatch
/// status), so any leader exports the same value, after a restart too.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum StateGauge {
    LastSuccess,
    LastSessionSuccess,
    ExpectedInterval,
    Paused,
    Created,
    LastSessionAddedBytes,
    Condition,
    Restores,
    UnfinalizedSessions,
    UnfinalizedSince,
    // Stash's own names and labels (`invoker_kind`, `invoker_name`, `namespace`, `driver`, `repository`).
    StashSessionSuccess,
    StashSessionDuration,
    StashTargetCount,
    StashLastSuccess,
    StashRepositoryIntegrity,
    StashRepositorySize,
    StashRepositorySnapshots,
    StashRepositorySnapshotsCleaned,
    StashRestoreSuccess,
    StashRestoreDuration,
}

impl StateGauge {
    const ALL: [StateGauge; 20] = [
        Self::LastSuccess,
        Self::LastSessionSuccess,
        Self::ExpectedInterval,
        Self::Paused,
        Self::Created,
        Self::LastSessionAddedBytes,
        Self::Condition,
        Self::Restores,
        Self::UnfinalizedSessions,
        Self::UnfinalizedSince,
        Self::StashSessionSuccess,
        Self::StashSessionDuration,
        Self::StashTargetCount,
        Self::StashLastSuccess,
        Self::StashRepositoryIntegrity,
        Self::StashRepositorySize,
        Self::StashRepositorySnapshots,
        Self::StashRepositorySnapshotsCleaned,
        Self::StashRestoreSuccess,
        Self::StashRestoreDuration,
    ];

    /// The name under the `stash_` prefix, and the help text.
    fn describe(self) -> (&'static str, &'static str) {
        match self {
            Self::LastSuccess => (
                "backup_last_success_timestamp_seconds",
                "When the batch's last successful session finished (Unix time), from status.lastSuccessfulSession",
            ),
            Self::LastSessionSuccess => {
                ("backupbatch_last_session_success", "1 if the batch's last finished session Succeeded, 0 if it Failed")
            }
            Self::ExpectedInterval => (
                "backupbatch_expected_interval_seconds",
                "Seconds between the next two runs of the batch's spec.schedule (absent without a schedule)",
            ),
            Self::Paused => ("backupbatch_paused", "1 while the batch's spec.paused is set"),
            Self::Created => ("backupbatch_created_timestamp_seconds", "When the batch was created (Unix time)"),
            Self::LastSessionAddedBytes => (
                "backupbatch_last_session_added_bytes",
                "Bytes the batch's last finished session added to the repository, summed over its hosts",
            ),
            Self::Condition => (
                "backupbatch_condition",
                "1 for each condition of a batch (target empty) or of one of its members, by type and status",
            ),
            Self::Restores => ("restorebatches", "RestoreBatches, by namespace and phase"),
            Self::UnfinalizedSessions => (
                "backupbatch_unfinalized_sessions",
                "Finished sessions of the batch whose finalize (manifest, retention) has not completed",
            ),
            Self::UnfinalizedSince => (
                "backupbatch_unfinalized_since_timestamp_seconds",
                "When the oldest finished session of the batch not yet finalized finished (Unix time)",
            ),
            Self::StashSessionSuccess => {
                ("backup_session_success", "Stash's name: whether the last backup session succeeded (1) or not (0)")
            }
            Self::StashSessionDuration => {
                ("backup_session_duration_seconds", "Stash's name: how long the last backup session took")
            }
            Self::StashTargetCount => ("backup_target_count_total", "Stash's name: targets of the last backup session"),
            Self::StashLastSuccess => (
                "backup_last_success_time_seconds",
                "Stash's name: when the last successful backup session finished (Unix time)",
            ),
            Self::StashRepositoryIntegrity => {
                ("repository_integrity", "Stash's name: result of the repository's last integrity check (1 passed)")
            }
            Self::StashRepositorySize => ("repository_size_bytes", "Stash's name: size of the repository"),
            Self::StashRepositorySnapshots => {
                ("repository_snapshot_count", "Stash's name: snapshots stored in the repository")
            }
            Self::StashRepositorySnapshotsCleaned => (
                "repository_snapshot_cleaned",
                "Stash's name: snapshots removed by the retention policy on the last cleanup",
            ),
            Self::StashRestoreSuccess => {
                ("restore_session_success", "Stash's name: whether a finished restore succeeded (1) or not (0)")
            }
            Self::StashRestoreDuration => {
                ("restore_session_duration_seconds", "Stash's name: how long a finished restore took")
            }
        }
    }
}

/// One series to export: which gauge, its labels and its value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Sample {
    pub gauge: StateGauge,
    pub labels: SeriesLabels,
    pub value: f64,
}

type StateFamily = Family<SeriesLabels, Gauge<f64, AtomicU64>>;

/// The state gauges, and which series each owner (a batch, the RestoreBatches) exported last, so
/// that a series its objects no longer yield is removed instead of lingering.
pub struct StateMetrics {
    families: HashMap<StateGauge, StateFamily>,
    exported: Mutex<HashMap<String, HashSet<(StateGauge, SeriesLabels)>>>,
}

impl StateMetrics {
    fn register(registry: &mut Registry) -> Self {
        let families: HashMap<StateGauge, StateFamily> =
            StateGauge::ALL.iter().map(|gauge| (*gauge, StateFamily::default())).collect();
        for gauge in StateGauge::ALL {
            let (name, help) = gauge.describe();
            if let Some(family) = families.get(&gauge) {
                registry.register(name, help, family.clone());
            }
        }
        Self { families, exported: Mutex::default() }
    }

    /// Makes `owner`'s series exactly `samples`: sets them and removes the ones it exported before
    /// that are not among them (a condition changed status, a schedule was removed).
    pub(crate) fn export(&self, owner: &str, samples: Vec<Sample>) {
        let mut exported = self.exported.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now: HashSet<(StateGauge, SeriesLabels)> = samples.iter().map(|s| (s.gauge, s.labels.clone())).collect();
        for (gauge, labels) in exported.get(owner).into_iter().flatten().filter(|series| !now.contains(series)) {
            if let Some(family) = self.families.get(gauge) {
                family.remove(labels);
            }
        }
        for sample in samples {
            if let Some(family) = self.families.get(&sample.gauge) {
                family.get_or_create(&sample.labels).set(sample.value);
            }
        }
        exported.insert(owner.to_string(), now);
    }

    /// Removes every series `owner` exported (its object is gone).
    pub(crate) fn remove(&self, owner: &str) {
        self.export(owner, Vec::new());
        let mut exported = self.exported.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        exported.remove(owner);
    }

    /// Removes every series: this replica stopped leading, and only the leader exports them.
    pub(crate) fn clear(&self) {
        let mut exported = self.exported.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.families.values().for_each(Family::clear);
        exported.clear();
    }
}

/// Session duration buckets: from a quick manual trigger to the default 6-hour deadline.
const SESSION_BUCKETS: [f64; 12] =
    [5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 21600.0];

pub struct ControllerMetrics {
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    /// Finished sessions by batch and phase, counted where the leader writes the final phase.
    pub(crate) sessions: Family<SeriesLabels, Counter>,
    /// Durations of Succeeded and Failed sessions by batch, observed with `sessions`.
    pub(crate) session_duration: Family<SeriesLabels, Histogram>,
    pub state: StateMetrics,
    pub managed_batches: Gauge<i64, AtomicI64>,
    pub leader: Gauge<i64, AtomicI64>,
}

impl ControllerMetrics {
    /// Drops every per-object series and the count of batches; counters and histograms start again
    /// from zero, which Prometheus reads as a reset.
    pub(crate) fn clear_objects(&self) {
        self.managed_batches.set(0);
        self.state.clear();
        self.sessions.clear();
        self.session_duration.clear();
    }
}

/// Every metric of the process, registered once at start-up.
pub struct Metrics {
    registry: Registry,
    pub webhook: WebhookMetrics,
    pub tls: TlsMetrics,
    pub controller: ControllerMetrics,
    /// The operator's own API requests, by verb and resource (see `api_requests`).
    pub api_requests: Family<ApiRequestLabels, Counter>,
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
            certificate_held: Gauge::default(),
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
            "webhook_certificate_held",
            "1 while a new serving certificate waits until the caBundle trusts its CA (--ca-bundle-secret)",
            tls.certificate_held.clone(),
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
            sessions: Family::default(),
            session_duration: Family::new_with_constructor(|| Histogram::new(SESSION_BUCKETS)),
            state: StateMetrics::register(&mut registry),
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
            "backupbatch_sessions",
            "BackupSessions that reached a final phase, by batch and phase (DeadlineExceeded: Failed at its deadline)",
            controller.sessions.clone(),
        );
        registry.register(
            "backupbatch_session_duration_seconds",
            "How long Succeeded and Failed BackupSessions took, by batch",
            controller.session_duration.clone(),
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
        let api_requests = Family::default();
        registry.register(
            "api_requests",
            "Requests this process sent to the Kubernetes API server, by verb and resource (watches counted when opened)",
            Family::clone(&api_requests),
        );
        Self { registry, webhook, tls, controller, api_requests }
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
