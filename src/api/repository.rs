//! `Repository` (stash.appscode.com/v1alpha1): where a restic repository lives and which Secret opens it.

use k8s_openapi::api::core::v1::{Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::borrow::Cow;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "stash.appscode.com",
    version = "v1alpha1",
    kind = "Repository",
    plural = "repositories",
    shortname = "repo",
    category = "stash",
    category = "appscode",
    namespaced,
    status = "RepositoryStatus",
    printcolumn = r#"{"name":"Integrity","type":"boolean","jsonPath":".status.integrity"}"#,
    printcolumn = r#"{"name":"Size","type":"string","jsonPath":".status.totalSize"}"#,
    printcolumn = r#"{"name":"Snapshot-Count","type":"integer","jsonPath":".status.snapshotCount"}"#,
    printcolumn = r#"{"name":"Last-Successful-Backup","type":"date","jsonPath":".status.lastBackupTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RepositorySpec {
    pub backend: Backend,
    /// Delete the backend data when the Repository is deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wipe_out: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_policy: Option<UsagePolicy>,
}

/// Exactly one backend kind, plus the Secret holding `RESTIC_PASSWORD` and its credentials.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(EXACTLY_ONE_BACKEND).message(EXACTLY_ONE_BACKEND_MESSAGE))]
pub struct Backend {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub storage_secret_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Spec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcs: Option<GcsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swift: Option<SwiftSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b2: Option<B2Spec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rest: Option<RestServerSpec>,
}

const EXACTLY_ONE_BACKEND: &str = "(has(self.local) ? 1 : 0) + (has(self.s3) ? 1 : 0) + \
     (has(self.gcs) ? 1 : 0) + (has(self.azure) ? 1 : 0) + (has(self.swift) ? 1 : 0) + \
     (has(self.b2) ? 1 : 0) + (has(self.rest) ? 1 : 0) == 1";
const EXACTLY_ONE_BACKEND_MESSAGE: &str = "spec.backend must set exactly one of local, s3, gcs, azure, swift, b2, rest";

/// A volume mounted into the backup pods, of any kind a Pod volume may be (`kubectl explain
/// pod.spec.volumes`); `mountPath` is the restic repository directory.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalSpec {
    #[serde(flatten)]
    pub volume_source: VolumeSource,
    #[schemars(length(min = 1))]
    pub mount_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
}

impl LocalSpec {
    /// Whether a volume kind is set (the schema demands one; objects stored before may lack it).
    pub fn has_volume(&self) -> bool {
        Volume { name: String::new(), ..self.volume_source.0.clone() } != Volume::default()
    }

    /// The repository's volume, named `name`, and its mount at `mountPath` (the repository directory)
    /// for an executor's container.
    pub fn volume(&self, name: &str) -> (Volume, VolumeMount) {
        let volume = Volume { name: name.into(), ..self.volume_source.0.clone() };
        let mount = VolumeMount {
            name: name.into(),
            mount_path: self.mount_path.clone(),
            sub_path: self.sub_path.clone(),
            ..Default::default()
        };
        (volume, mount)
    }
}

/// Any kind of core `VolumeSource`, as Stash inlines one in `local`: a Pod `Volume` without its name.
///
/// The whole core schema is carried rather than a subset: a kind the schema did not list would be
/// pruned by the API server, and the Pod volume left without a source becomes an `emptyDir` —
/// backups that "succeed" into storage that goes with the Pod. For the same reason exactly one kind
/// is required (Stash would mount an `emptyDir` for none).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VolumeSource(pub Volume);

impl Serialize for VolumeSource {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let Value::Object(mut fields) = serde_json::to_value(&self.0).map_err(S::Error::custom)? else {
            return Err(S::Error::custom("a Volume serializes as an object"));
        };
        fields.remove("name");
        fields.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for VolumeSource {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut fields = serde_json::Map::deserialize(deserializer)?;
        // The Pod names the volume; `name` here would be no VolumeSource field.
        fields.insert("name".into(), Value::String(String::new()));
        Volume::deserialize(Value::Object(fields)).map(VolumeSource).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for VolumeSource {
    fn schema_name() -> Cow<'static, str> {
        "VolumeSource".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let mut schema = Volume::json_schema(generator);
        let object = schema.ensure_object();
        object.remove("required"); // only `name` is
        let kinds: Vec<String> = match object.get_mut("properties") {
            Some(Value::Object(properties)) => {
                properties.remove("name");
                // The core types' descriptions would make this CRD eight times larger, and each of
                // its writes costs the API server; `kubectl explain pod.spec.volumes` has them.
                properties.values_mut().for_each(strip_descriptions);
                properties.keys().cloned().collect()
            }
            _ => Vec::new(),
        };
        // Arithmetic over `has()`, as for the backends: cheap enough for the API server's CEL budget.
        let count: Vec<String> = kinds.iter().map(|kind| format!("(has(self.{kind}) ? 1 : 0)")).collect();
        let rule = json!({
            "rule": format!("{} == 1", count.join(" + ")),
            "message": "spec.backend.local must name exactly one volume (hostPath, persistentVolumeClaim, nfs, \
                        gcePersistentDisk...): without one Kubernetes mounts an emptyDir, lost with the Pod",
        });
        object.insert("x-kubernetes-validations".into(), json!([rule]));
        schema
    }
}

fn strip_descriptions(schema: &mut Value) {
    match schema {
        Value::Object(fields) => {
            // A string: a schema's description, not a property named `description`.
            if fields.get("description").is_some_and(Value::is_string) {
                fields.remove("description");
            }
            fields.values_mut().for_each(strip_descriptions);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_descriptions),
        _ => {}
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Spec {
    #[schemars(length(min = 1))]
    pub endpoint: String,
    #[schemars(length(min = 1))]
    pub bucket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Skip TLS verification of the endpoint (test setups only).
    #[serde(default, rename = "insecureTLS", skip_serializing_if = "std::ops::Not::not")]
    pub insecure_tls: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GcsSpec {
    #[schemars(length(min = 1))]
    pub bucket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureSpec {
    #[schemars(length(min = 1))]
    pub container: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct SwiftSpec {
    #[schemars(length(min = 1))]
    pub container: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct B2Spec {
    #[schemars(length(min = 1))]
    pub bucket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct RestServerSpec {
    #[schemars(length(min = 1))]
    pub url: String,
}

/// Which namespaces may use this Repository.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsagePolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_namespaces: Option<AllowedNamespaces>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct AllowedNamespaces {
    #[serde(default)]
    pub from: FromNamespaces,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FromNamespaces {
    All,
    Selector,
    #[default]
    Same,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_backup_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup_time: Option<Time>,
    /// Result of the last `restic check`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity: Option<bool>,
    /// When the last `restic check` ran (it runs once per check interval, not on every finalize).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_integrity_check_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots_removed_on_last_cleanup: Option<i64>,
    /// The objects that use this Repository, as Stash writes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<TypedObjectReference>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TypedObjectReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12: every kind a Pod volume may be is a kind `local` accepts, and the rule counts each.
    #[test]
    fn local_accepts_every_kind_of_pod_volume_and_demands_one() {
        let mut generator = SchemaGenerator::default();
        let kinds = |schema: &Schema| -> Vec<String> {
            schema.get("properties").and_then(Value::as_object).map(|p| p.keys().cloned().collect()).unwrap_or_default()
        };
        let mut pod_volume = kinds(&Volume::json_schema(&mut generator));
        pod_volume.retain(|kind| kind != "name");
        let local = VolumeSource::json_schema(&mut generator);
        assert_eq!(kinds(&local), pod_volume);
        let rule =
            local.get("x-kubernetes-validations").and_then(|rules| rules[0]["rule"].as_str()).unwrap_or_default();
        for kind in &pod_volume {
            assert!(rule.contains(&format!("has(self.{kind})")), "{kind} is not counted by {rule}");
        }
        assert!(rule.ends_with("== 1"), "{rule}");
    }

    #[test]
    fn a_volume_kind_outside_the_old_subset_reaches_the_pod_volume() {
        let local: LocalSpec = serde_json::from_value(json!({
            "mountPath": "/safe/data", "azureDisk": {"diskName": "stash", "diskURI": "/disks/stash"}
        }))
        .expect("a local backend");
        let (volume, _) = local.volume("repository");
        assert_eq!(volume.azure_disk.map(|disk| disk.disk_name), Some("stash".to_string()));
        let written = serde_json::to_value(&local).expect("serializes");
        assert_eq!(
            written,
            json!({"mountPath": "/safe/data", "azureDisk": {"diskName": "stash", "diskURI": "/disks/stash"}})
        );
    }
}
