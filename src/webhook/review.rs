//! AdmissionReview (admission.k8s.io/v1) on the wire, reduced to what a Pod mutator reads.
//!
//! kube's typed review parses the whole object up front and loses the request `uid` when the object is
//! malformed; these lean types keep the `uid` whenever the envelope parses and leave `object` raw until
//! the request is known to be a Pod CREATE.

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub const API_VERSION: &str = "admission.k8s.io/v1";

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ReviewRequestEnvelope<'a> {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    #[serde(borrow)]
    pub request: Option<ReviewRequest<'a>>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ReviewRequest<'a> {
    pub uid: String,
    #[serde(default)]
    pub kind: RequestKind,
    #[serde(default)]
    pub operation: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub dry_run: Option<bool>,
    #[serde(borrow, default)]
    pub object: Option<&'a RawValue>,
}

#[derive(Deserialize, Debug, Default, PartialEq, Eq)]
pub struct RequestKind {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub kind: String,
}

impl RequestKind {
    pub fn is_core_v1_pod(&self) -> bool {
        self.group.is_empty() && self.version == "v1" && self.kind == "Pod"
    }
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ReviewResponseEnvelope {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub response: ReviewResponse,
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReviewResponse {
    pub uid: String,
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<&'static str>,
    /// Base64 of the JSON patch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl ReviewResponse {
    /// Allow the request unchanged.
    pub fn allow(uid: String) -> Self {
        Self { uid, allowed: true, patch_type: None, patch: None, warnings: Vec::new() }
    }

    /// Allow the request with a JSON patch applied.
    pub fn patch(uid: String, patch: &json_patch::Patch) -> Result<Self, serde_json::Error> {
        let json = serde_json::to_vec(patch)?;
        Ok(Self {
            uid,
            allowed: true,
            patch_type: Some("JSONPatch"),
            patch: Some(base64::engine::general_purpose::STANDARD.encode(json)),
            warnings: Vec::new(),
        })
    }

    pub fn with_warning(mut self, warning: impl Into<String>) -> Self {
        self.warnings.push(warning.into());
        self
    }

    pub fn into_review(self) -> ReviewResponseEnvelope {
        ReviewResponseEnvelope { api_version: API_VERSION, kind: "AdmissionReview", response: self }
    }
}
