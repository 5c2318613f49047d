//! AdmissionReview in, AdmissionReview out: the pure decision path of `POST /mutate-pods`.

use super::decision::{Catalog, Decision};
use super::review::{ReviewRequestEnvelope, ReviewResponse, UidOnly};
use super::sidecar::PatchCache;
use crate::executor_pod::SIDECAR_NAME;
use crate::metrics::AdmissionOperation;
use kube::ResourceExt;

/// A request the webhook cannot read at all: answered with HTTP 400.
#[derive(Debug, thiserror::Error)]
pub enum BadReview {
    #[error("malformed AdmissionReview: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("AdmissionReview has no request")]
    NoRequest,
    #[error("unsupported AdmissionReview version {0:?}; only admission.k8s.io/v1 is served")]
    Version(String),
}

/// How a review was answered, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Mutated,
    AllowedUnchanged,
}

pub struct Reviewed {
    pub operation: AdmissionOperation,
    pub verdict: Verdict,
    pub review: ReviewResponse,
}

pub struct Mutator {
    catalog: Catalog,
    sidecar_image: String,
    patches: PatchCache,
}

impl Mutator {
    pub fn new(catalog: Catalog, sidecar_image: String) -> Self {
        Self { catalog, sidecar_image, patches: PatchCache::default() }
    }

    pub fn review(&self, body: &[u8]) -> Result<Reviewed, BadReview> {
        let envelope: ReviewRequestEnvelope = match serde_json::from_slice(body) {
            Ok(envelope) => envelope,
            Err(err) => return Self::unreadable(body, err),
        };
        check_version(envelope.api_version.as_deref())?;
        let request = envelope.request.ok_or(BadReview::NoRequest)?;
        let operation = AdmissionOperation::parse(&request.operation);
        let unchanged =
            |response: ReviewResponse| Reviewed { operation, verdict: Verdict::AllowedUnchanged, review: response };
        let namespace = request.namespace.as_deref().unwrap_or_default();
        let pod = match request.object {
            Some(pod) if request.kind.is_core_v1_pod() && &*request.operation == "CREATE" && !namespace.is_empty() => {
                pod
            }
            _ => return Ok(unchanged(ReviewResponse::allow(request.uid))),
        };
        match self.catalog.decide(&pod, namespace, SIDECAR_NAME) {
            Decision::Inject(injection) => match self.patches.patch(&pod, &injection, &self.sidecar_image) {
                Ok(patch) => Ok(Reviewed {
                    operation,
                    verdict: Verdict::Mutated,
                    review: ReviewResponse::patch(request.uid, patch),
                }),
                // Admitted unchanged rather than invalid: the controller counts the Pod as one
                // without the sidecar, and whoever created it sees why.
                Err(reason) => {
                    let batch = injection.batch.name_any();
                    tracing::warn!(%namespace, %batch, %reason, "Pod targeted but not injected");
                    let warning = format!("stash: sidecar of BackupBatch {batch} not injected: {reason}");
                    Ok(unchanged(ReviewResponse::allow(request.uid).with_warning(warning)))
                }
            },
            Decision::RepositoryUnknown { batch } => {
                tracing::warn!(%namespace, %batch, "Pod targeted but its Repository is unknown or not usable here; not injected");
                let warning = format!(
                    "stash: sidecar of BackupBatch {batch} not injected: its Repository is unknown or not usable from this namespace"
                );
                Ok(unchanged(ReviewResponse::allow(request.uid).with_warning(warning)))
            }
            Decision::NotTargeted | Decision::AlreadyInjected => Ok(unchanged(ReviewResponse::allow(request.uid))),
        }
    }

    /// The envelope parses but its object does not: allow, unchanged, echoing the uid.
    fn unreadable(body: &[u8], err: serde_json::Error) -> Result<Reviewed, BadReview> {
        let Ok(envelope) = serde_json::from_slice::<UidOnly>(body) else {
            return Err(BadReview::Malformed(err));
        };
        check_version(envelope.api_version.as_deref())?;
        let request = envelope.request.ok_or(BadReview::NoRequest)?;
        let warning = format!("stash: Pod not mutated, its object could not be read: {err}");
        Ok(Reviewed {
            operation: AdmissionOperation::parse(&request.operation),
            verdict: Verdict::AllowedUnchanged,
            review: ReviewResponse::allow(request.uid).with_warning(warning),
        })
    }
}

fn check_version(api_version: Option<&str>) -> Result<(), BadReview> {
    match api_version {
        Some(version) if version != super::review::API_VERSION => Err(BadReview::Version(version.to_string())),
        _ => Ok(()),
    }
}
