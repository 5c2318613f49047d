//! The few parts of a Pod the mutator reads. Parsing only these keeps admission cheap and lets any
//! Pod the API server accepts through, whatever else it carries.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize, Debug, Default)]
pub struct PodView {
    #[serde(default)]
    pub metadata: PodMeta,
    #[serde(default)]
    pub spec: PodSpecView,
}

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodMeta {
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
    /// `None` when the Pod has no annotations map at all (the patch must then add the map).
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub owner_references: Vec<OwnerReference>,
}

/// `null` reads as empty, like Go's nil maps and slices.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub controller: Option<bool>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecView {
    #[serde(default, deserialize_with = "null_as_default")]
    pub containers: Vec<Named>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub init_containers: Vec<Named>,
    /// `None` when the Pod has no volumes list (the patch must then add the list).
    #[serde(default)]
    pub volumes: Option<Vec<Named>>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub security_context: PodSecurityView,
}

/// The Pod-level securityContext, for the user the sidecar inherits.
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodSecurityView {
    #[serde(default)]
    pub run_as_user: Option<i64>,
}

#[derive(Deserialize, Debug, Default)]
pub struct Named {
    #[serde(default)]
    pub name: String,
}

impl PodView {
    /// The owner reference marked as the Pod's controller.
    pub fn controller(&self) -> Option<&OwnerReference> {
        self.metadata.owner_references.iter().find(|o| o.controller == Some(true))
    }

    pub fn has_container(&self, name: &str) -> bool {
        self.spec.containers.iter().chain(&self.spec.init_containers).any(|c| c.name == name)
    }

    /// The Pod asks for uid 0 for every container that does not say otherwise.
    pub(crate) fn runs_as_root(&self) -> bool {
        self.spec.security_context.run_as_user == Some(0)
    }

    pub fn has_volume(&self, name: &str) -> bool {
        self.spec.volumes.iter().flatten().any(|v| v.name == name)
    }
}
