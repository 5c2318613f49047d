//! The few parts of a Pod the mutator reads. Parsing only these keeps admission cheap and lets any
//! Pod the API server accepts through, whatever else it carries.

use serde::Deserialize;
use std::borrow::{Borrow, Cow};
use std::collections::BTreeMap;
use std::ops::Deref;

/// A string of the request, borrowed from its bytes unless it had escapes to undo: a Pod's
/// labels, names and owners would otherwise be a few dozen allocations per review.
#[derive(Deserialize, Debug, Default, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Text<'a>(#[serde(borrow)] pub Cow<'a, str>);

impl Deref for Text<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Text<'_> {
    fn borrow(&self) -> &str {
        &self.0
    }
}

#[derive(Deserialize, Debug, Default)]
pub struct PodView<'a> {
    #[serde(default, borrow)]
    pub metadata: PodMeta<'a>,
    #[serde(default, borrow)]
    pub spec: PodSpecView<'a>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodMeta<'a> {
    #[serde(default, borrow, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<Text<'a>, Text<'a>>,
    /// `None` when the Pod has no annotations map at all (the patch must then add the map).
    #[serde(default, borrow)]
    pub annotations: Option<BTreeMap<Text<'a>, Text<'a>>>,
    #[serde(default, borrow, deserialize_with = "null_as_default")]
    pub owner_references: Vec<OwnerReference<'a>>,
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
pub struct OwnerReference<'a> {
    #[serde(default, borrow)]
    pub api_version: Text<'a>,
    #[serde(default, borrow)]
    pub kind: Text<'a>,
    #[serde(default, borrow)]
    pub name: Text<'a>,
    #[serde(default)]
    pub controller: Option<bool>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecView<'a> {
    #[serde(default, borrow, deserialize_with = "null_as_default")]
    pub containers: Vec<Named<'a>>,
    #[serde(default, borrow, deserialize_with = "null_as_default")]
    pub init_containers: Vec<Named<'a>>,
    /// `None` when the Pod has no volumes list (the patch must then add the list).
    #[serde(default, borrow)]
    pub volumes: Option<Vec<Named<'a>>>,
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
pub struct Named<'a> {
    #[serde(default, borrow)]
    pub name: Text<'a>,
}

impl PodView<'_> {
    /// The owner reference marked as the Pod's controller.
    pub fn controller(&self) -> Option<&OwnerReference<'_>> {
        self.metadata.owner_references.iter().find(|o| o.controller == Some(true))
    }

    pub fn has_container(&self, name: &str) -> bool {
        self.spec.containers.iter().chain(&self.spec.init_containers).any(|c| &*c.name == name)
    }

    /// The Pod asks for uid 0 for every container that does not say otherwise.
    pub(crate) fn runs_as_root(&self) -> bool {
        self.spec.security_context.run_as_user == Some(0)
    }

    pub fn has_volume(&self, name: &str) -> bool {
        self.spec.volumes.iter().flatten().any(|v| &*v.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_borrowed_from_the_request_unless_they_had_escapes() {
        let json = br#"{"metadata": {"labels": {"app": "web", "tier": "front\u0026back"},
                        "ownerReferences": [{"kind": "Replica\u0053et", "name": "web-7d9c5", "controller": true}]},
                        "spec": {"containers": [{"name": "web"}]}}"#;
        let pod: PodView = serde_json::from_slice(json).expect("a Pod");
        let labels: Vec<(&Text, &Text)> = pod.metadata.labels.iter().collect();
        assert!(matches!(labels[0].1.0, Cow::Borrowed("web")), "{labels:?}");
        assert_eq!(pod.metadata.labels.get("tier").map(|t| &**t), Some("front&back"));
        let owner = pod.controller().expect("the controller");
        assert_eq!((&*owner.kind, &*owner.name), ("ReplicaSet", "web-7d9c5"));
        assert!(matches!(owner.name.0, Cow::Borrowed(_)));
        assert!(pod.has_container("web"));
    }
}
