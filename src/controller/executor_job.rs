//! The Pod of every executor Job (backup, finalize, restore, hook): scratch space and, for those that
//! touch the repository, its Secret as a volume (never inline) and a local repository's volume at
//! its mountPath; optionally the member's PVC and its database-connection Secret.

use crate::api::common::{EmptyDirSettings, RuntimeSettings};
use crate::api::repository::Repository;
use crate::executor_pod::{
    DEFAULT_DATABASE_SECRET_DIR, SECRET_MOUNT_PATH, TMP_MOUNT_PATH, executor_container, pod_metadata, pod_settings,
    secret_volume,
};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    EmptyDirVolumeSource, PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::core::ObjectMeta;
use std::collections::BTreeMap;

/// Executor Jobs run as this per-namespace ServiceAccount, bound to the `stash-sidecar` ClusterRole.
pub const BACKUP_SERVICE_ACCOUNT: &str = "stash-backup";

/// A member's PVC, mounted where the member says.
#[derive(Debug, Clone, PartialEq)]
pub struct DataVolume {
    pub claim: String,
    pub mounts: Vec<VolumeMount>,
    pub read_only: bool,
}

pub struct ExecutorJob<'a> {
    pub name: String,
    pub namespace: String,
    pub owner: Option<OwnerReference>,
    pub labels: BTreeMap<String, String>,
    pub args: Vec<String>,
    pub image: &'a str,
    /// `None` for a Job that never touches the repository (a hook's): no Secret is mounted.
    pub repository: Option<&'a Repository>,
    /// The member's (or the batch's) settings: the container's for the executor, the pod's for its Pod.
    pub runtime: Option<&'a RuntimeSettings>,
    pub temp_dir: Option<&'a EmptyDirSettings>,
    /// One volume per distinct claim, each at its own mountPaths.
    pub data: Vec<DataVolume>,
    pub database_secret: Option<String>,
    pub deadline_seconds: Option<i64>,
}

fn volume(name: &str) -> Volume {
    Volume { name: name.into(), ..Default::default() }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

impl ExecutorJob<'_> {
    pub fn build(self) -> Job {
        let pod = self.runtime.and_then(|r| r.pod.as_ref());
        let container = self.runtime.and_then(|r| r.container.as_ref());
        let mut volumes = vec![Volume {
            empty_dir: Some(EmptyDirVolumeSource {
                medium: self.temp_dir.and_then(|t| t.medium.clone()),
                size_limit: self.temp_dir.and_then(|t| t.size_limit.clone()),
            }),
            ..volume("tmp")
        }];
        let mut mounts = vec![mount("tmp", TMP_MOUNT_PATH, false)];
        if let Some(repository) = self.repository {
            volumes.push(secret_volume("repository-secret", &repository.spec.backend.storage_secret_name));
            mounts.push(mount("repository-secret", SECRET_MOUNT_PATH, true));
            if let Some((volume, mount)) = repository.spec.backend.local.as_ref().map(|l| l.volume("repository")) {
                volumes.push(volume);
                mounts.push(mount);
            }
        }
        for (index, data) in self.data.into_iter().enumerate() {
            // The first keeps the name backup Jobs always had.
            let name = if index == 0 { "target".to_string() } else { format!("target-{index}") };
            volumes.push(Volume {
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: data.claim,
                    read_only: data.read_only.then_some(true),
                }),
                ..volume(&name)
            });
            mounts.extend(data.mounts.into_iter().map(|m| VolumeMount {
                name: name.clone(),
                read_only: data.read_only.then_some(true),
                ..m
            }));
        }
        if let Some(secret) = &self.database_secret {
            volumes.push(secret_volume("database-secret", secret));
            mounts.push(mount("database-secret", DEFAULT_DATABASE_SECRET_DIR, true));
        }
        Job {
            metadata: ObjectMeta {
                name: Some(self.name),
                namespace: Some(self.namespace),
                labels: Some(self.labels.clone()),
                owner_references: self.owner.map(|o| vec![o]),
                ..Default::default()
            },
            spec: Some(JobSpec {
                backoff_limit: Some(1),
                active_deadline_seconds: self.deadline_seconds,
                template: PodTemplateSpec {
                    metadata: Some(pod_metadata(self.labels, pod)),
                    spec: Some(PodSpec {
                        service_account_name: Some(BACKUP_SERVICE_ACCOUNT.into()),
                        restart_policy: Some("Never".into()),
                        containers: vec![executor_container("stash", self.image, self.args, container, mounts)],
                        volumes: Some(volumes),
                        ..pod_settings(pod)
                    }),
                },
                ..Default::default()
            }),
            status: None,
        }
    }
}
