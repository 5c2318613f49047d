//! AdmissionReview in, AdmissionReview out: the pure decision path of `POST /mutate-pods`.

use super::decision::{Catalog, Decision};
use super::pod_view::PodView;
use super::review::{ReviewRequestEnvelope, ReviewResponse, ReviewResponseEnvelope};
use super::sidecar::{SIDECAR_NAME, injection_patch};

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
    pub operation: String,
    pub verdict: Verdict,
    pub review: ReviewResponseEnvelope,
}

pub struct Mutator {
    pub catalog: Catalog,
    pub sidecar_image: String,
}

impl Mutator {
    pub fn review(&self, body: &[u8]) -> Result<Reviewed, BadReview> {
        let envelope: ReviewRequestEnvelope = serde_json::from_slice(body)?;
        if let Some(version) = envelope.api_version.filter(|v| v != super::review::API_VERSION) {
            return Err(BadReview::Version(version));
        }
        let request = envelope.request.ok_or(BadReview::NoRequest)?;
        let operation = request.operation.clone();
        let unchanged = |response: ReviewResponse| Reviewed {
            operation: operation.clone(),
            verdict: Verdict::AllowedUnchanged,
            review: response.into_review(),
        };
        if !(request.kind.is_core_v1_pod() && request.operation == "CREATE") {
            return Ok(unchanged(ReviewResponse::allow(request.uid)));
        }
        let namespace = request.namespace.as_deref().unwrap_or_default();
        let pod = match request.object.map(|raw| serde_json::from_str::<PodView>(raw.get())) {
            Some(Ok(pod)) if !namespace.is_empty() => pod,
            Some(Err(err)) => {
                let warning = format!("stash: Pod not mutated, its object could not be read: {err}");
                return Ok(unchanged(ReviewResponse::allow(request.uid).with_warning(warning)));
            }
            _ => return Ok(unchanged(ReviewResponse::allow(request.uid))),
        };
        match self.catalog.decide(&pod, namespace, SIDECAR_NAME) {
            Decision::Inject(injection) => match injection_patch(&pod, &injection, &self.sidecar_image) {
                Ok(patch) => Ok(Reviewed {
                    operation,
                    verdict: Verdict::Mutated,
                    review: ReviewResponse::patch(request.uid, &patch)?.into_review(),
                }),
                Err(err) => Err(BadReview::Malformed(err)),
            },
            Decision::RepositoryUnknown { batch } => {
                tracing::warn!(%namespace, %batch, "Pod targeted but its Repository is not known yet; not injected");
                Ok(unchanged(ReviewResponse::allow(request.uid)))
            }
            Decision::NotTargeted | Decision::AlreadyInjected => Ok(unchanged(ReviewResponse::allow(request.uid))),
        }
    }
}
