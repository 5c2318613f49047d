//! `Repository` (stash.appscode.com/v1alpha1): where a restic repository lives and which Secret opens it.

use k8s_openapi::api::core::v1::{
    CSIVolumeSource, EmptyDirVolumeSource, HostPathVolumeSource, NFSVolumeSource, PersistentVolumeClaimVolumeSource,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "stash.appscode.com",
    version = "v1alpha1",
    kind = "Repository",
    plural = "repositories",
    shortname = "repo",
    category = "stash",
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

/// A volume mounted into the backup pods; `mountPath` is the restic repository directory.
///
/// Stash inlines a whole `VolumeSource` here; we accept the volume kinds that make sense for a
/// repository (hostPath, persistentVolumeClaim, nfs, emptyDir, csi). Others are pruned by the API server.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(AT_MOST_ONE_VOLUME).message(AT_MOST_ONE_VOLUME_MESSAGE))]
pub struct LocalSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PersistentVolumeClaimVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfs: Option<NFSVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csi: Option<CSIVolumeSource>,
    #[schemars(length(min = 1))]
    pub mount_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
}

impl LocalSpec {
    /// The repository's volume, named `name`, and its mount at `mountPath` (the repository directory)
    /// for an executor's container.
    pub fn volume(&self, name: &str) -> (Volume, VolumeMount) {
        let volume = Volume {
            name: name.into(),
            host_path: self.host_path.clone(),
            persistent_volume_claim: self.persistent_volume_claim.clone(),
            nfs: self.nfs.clone(),
            empty_dir: self.empty_dir.clone(),
            csi: self.csi.clone(),
            ..Default::default()
        };
        let mount = VolumeMount {
            name: name.into(),
            mount_path: self.mount_path.clone(),
            sub_path: self.sub_path.clone(),
            ..Default::default()
        };
        (volume, mount)
    }
}

const AT_MOST_ONE_VOLUME: &str = "(has(self.hostPath) ? 1 : 0) + (has(self.persistentVolumeClaim) ? 1 : 0) + \
     (has(self.nfs) ? 1 : 0) + (has(self.emptyDir) ? 1 : 0) + (has(self.csi) ? 1 : 0) <= 1";
const AT_MOST_ONE_VOLUME_MESSAGE: &str =
    "spec.backend.local may name at most one of hostPath, persistentVolumeClaim, nfs, emptyDir, csi";

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
}
