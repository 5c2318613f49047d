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
    /// The JSON patch, as JSON bytes (base64-encoded on the wire).
    pub patch: Option<Arc<[u8]>>,
    pub warnings: Vec<String>,
}

impl ReviewResponse {
    /// Allow the request unchanged.
    pub fn allow(uid: String) -> Self {
        Self { uid, allowed: true, patch: None, warnings: Vec::new() }
    }

    /// Allow the request with a JSON patch (its serialized bytes) applied.
    pub fn patch(uid: String, patch_json: Arc<[u8]>) -> Self {
        Self { uid, allowed: true, patch: Some(patch_json), warnings: Vec::new() }
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
        let patch_len = self.patch.as_ref().map_or(0, |p| p.len() * 4 / 3 + 4);
        let mut out = Vec::with_capacity(160 + self.uid.len() + patch_len);
        out.extend_from_slice(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"#);
        serde_json::to_writer(&mut out, &self.uid)?;
        out.extend_from_slice(if self.allowed { br#","allowed":true"# } else { br#","allowed":false"# });
        if let Some(patch) = &self.patch {
            out.extend_from_slice(br#","patchType":"JSONPatch","patch":""#);
            let start = out.len();
            out.resize(start + base64::encoded_len(patch.len(), true).unwrap_or(0), 0);
            let written = base64::engine::general_purpose::STANDARD
                .encode_slice(patch, &mut out[start..])
                .map_err(|err| serde::ser::Error::custom(err.to_string()))?;
            out.truncate(start + written);
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
