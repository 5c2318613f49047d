//! AdmissionReview (admission.k8s.io/v1) on the wire, reduced to what a Pod mutator reads.
//!
//! The request is read in one pass, straight into the few Pod fields the mutator needs (`PodView`):
//! scanning the object twice (raw, then typed) was half the cost of a review. kube's typed review
//! would parse every field and lose the request `uid` on a malformed object; when the one-pass read
//! fails, [`UidOnly`] recovers the `uid` so that the answer still echoes it.

use super::pod_view::{PodView, Text};
use base64::Engine;
use serde::Deserialize;
use std::sync::Arc;

pub const API_VERSION: &str = "admission.k8s.io/v1";

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ReviewRequestEnvelope<'a> {
    #[serde(borrow)]
    pub api_version: Option<Text<'a>>,
    #[serde(borrow)]
    pub request: Option<ReviewRequest<'a>>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ReviewRequest<'a> {
    pub uid: String,
    #[serde(default, borrow)]
    pub kind: RequestKind<'a>,
    #[serde(default, borrow)]
    pub operation: Text<'a>,
    #[serde(default, borrow)]
    pub namespace: Option<Text<'a>>,
    #[serde(default)]
    pub dry_run: Option<bool>,
    #[serde(default, borrow)]
    pub object: Option<PodView<'a>>,
}

/// The envelope with everything but the `uid` skipped: read when [`ReviewRequestEnvelope`] fails.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct UidOnly {
    pub api_version: Option<String>,
    pub request: Option<UidOnlyRequest>,
}

#[derive(Deserialize, Debug)]
pub struct UidOnlyRequest {
    pub uid: String,
    #[serde(default)]
    pub operation: String,
}

#[derive(Deserialize, Debug, Default, PartialEq, Eq)]
pub struct RequestKind<'a> {
    #[serde(default, borrow)]
    pub group: Text<'a>,
    #[serde(default, borrow)]
    pub version: Text<'a>,
    #[serde(default, borrow)]
    pub kind: Text<'a>,
}

impl RequestKind<'_> {
    pub fn is_core_v1_pod(&self) -> bool {
        self.group.is_empty() && &*self.version == "v1" && &*self.kind == "Pod"
    }
}

/// The answer to one review; [`ReviewResponse::to_json`] is its wire form.
#[derive(Debug, PartialEq)]
pub struct ReviewResponse {
    pub uid: String,
    pub allowed: bool,
    pub patch: Option<Arc<EncodedPatch>>,
    pub warnings: Vec<String>,
}

impl ReviewResponse {
    /// Allow the request unchanged.
    pub fn allow(uid: String) -> Self {
        Self { uid, allowed: true, patch: None, warnings: Vec::new() }
    }

    /// Allow the request with a JSON patch applied.
    pub fn patch(uid: String, patch: Arc<EncodedPatch>) -> Self {
        Self { uid, allowed: true, patch: Some(patch), warnings: Vec::new() }
    }

    pub fn with_warning(mut self, warning: impl Into<String>) -> Self {
        self.warnings.push(warning.into());
        self
    }

    /// The AdmissionReview (admission.k8s.io/v1) carrying this response.
    ///
    /// Written by hand because serde would escape-scan the base64 patch character by character, which
    /// was a tenth of the server's CPU per request; base64 needs no escaping.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        let patch_len = self.patch.as_ref().map_or(0, |p| p.base64.len());
        let mut out = Vec::with_capacity(160 + self.uid.len() + patch_len);
        out.extend_from_slice(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"#);
        serde_json::to_writer(&mut out, &self.uid)?;
        out.extend_from_slice(if self.allowed { br#","allowed":true"# } else { br#","allowed":false"# });
        if let Some(patch) = &self.patch {
            out.extend_from_slice(br#","patchType":"JSONPatch","patch":""#);
            out.extend_from_slice(patch.base64.as_bytes());
            out.push(b'"');
        }
        if !self.warnings.is_empty() {
            out.extend_from_slice(br#","warnings":"#);
            serde_json::to_writer(&mut out, &self.warnings)?;
        }
        out.extend_from_slice(b"}}");
        Ok(out)
    }
}

/// A JSON patch (RFC 6902) and its base64 form, which is what a response carries: encoded once
/// per rendered patch rather than once per response.
#[derive(Debug, PartialEq, Eq)]
pub struct EncodedPatch {
    json: Vec<u8>,
    base64: String,
}

impl EncodedPatch {
    pub fn new(json: Vec<u8>) -> Self {
        let base64 = base64::engine::general_purpose::STANDARD.encode(&json);
        Self { json, base64 }
    }

    pub fn json(&self) -> &[u8] {
        &self.json
    }
}
