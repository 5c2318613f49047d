//! The Pod of every executor Job (backup, finalize, restore, hook): scratch space and, for those that
//! touch the repository, its Secret as a volume (never inline) and a local repository's volume at
//! its mountPath; optionally the member's PVC and its database-connection Secret.

use super::app_binding::Endpoint;
use crate::api::common::{EmptyDirSettings, RuntimeSettings};
use crate::api::repository::Repository;
use crate::executor_pod::{
    DEFAULT_DATABASE_SECRET_DIR, SECRET_MOUNT_PATH, TMP_MOUNT_PATH, executor_container, pod_metadata, pod_settings,
    secret_volume,
};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    DownwardAPIProjection, DownwardAPIVolumeFile, EmptyDirVolumeSource, KeyToPath, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, ProjectedVolumeSource, SecretProjection, Volume,
    VolumeMount, VolumeProjection,
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

/// Where a database member's Job finds its connection: the files of `DEFAULT_DATABASE_SECRET_DIR`.
#[derive(Debug, Clone, PartialEq)]
pub enum DatabaseSource {
    /// A Secret member: its Secret holds every key.
    Secret(String),
    /// An AppBinding member: `username` and `password` of its Secret, by reference, beside `host`,
    /// `port` and `database` files that the downward API makes from the Pod's annotations — the
    /// same files a Secret member's Secret gives, and no Secret value copied anywhere.
    AppBinding { secret: String, endpoint: Endpoint },
}

/// The Pod annotation holding an AppBinding member's endpoint value `key` (`host`, `port`, `database`).
fn endpoint_annotation(key: &str) -> String {
    format!("stash.appscode.com/database-{key}")
}

impl DatabaseSource {
    fn volume(&self, name: &str) -> Volume {
        let (secret, endpoint) = match self {
            DatabaseSource::Secret(secret) => return secret_volume(name, secret),
            DatabaseSource::AppBinding { secret, endpoint } => (secret, endpoint),
        };
        let credentials =
            ["username", "password"].map(|key| KeyToPath { key: key.into(), path: key.into(), mode: None });
        let files = endpoint_values(endpoint).into_iter().map(|(key, _)| DownwardAPIVolumeFile {
            path: key.into(),
            field_ref: Some(ObjectFieldSelector {
                field_path: format!("metadata.annotations['{}']", endpoint_annotation(key)),
                ..Default::default()
            }),
            ..Default::default()
        });
        Volume {
            name: name.into(),
            projected: Some(ProjectedVolumeSource {
                // World-readable inside the container, as `secret_volume` says why.
                default_mode: Some(0o444),
                sources: Some(vec![
                    VolumeProjection {
                        secret: Some(SecretProjection {
                            name: secret.clone(),
                            items: Some(credentials.to_vec()),
                            optional: None,
                        }),
                        ..Default::default()
                    },
                    VolumeProjection {
                        downward_api: Some(DownwardAPIProjection { items: Some(files.collect()) }),
                        ..Default::default()
                    },
                ]),
            }),
            ..Default::default()
        }
    }

    /// The Pod annotations the volume's endpoint files come from.
    fn annotations(&self) -> BTreeMap<String, String> {
        match self {
            DatabaseSource::Secret(_) => BTreeMap::new(),
            DatabaseSource::AppBinding { endpoint, .. } => {
                endpoint_values(endpoint).into_iter().map(|(key, value)| (endpoint_annotation(key), value)).collect()
            }
        }
    }
}

/// The endpoint as the keys of a Secret member's Secret: a port or database left out is left unset.
fn endpoint_values(endpoint: &Endpoint) -> Vec<(&'static str, String)> {
    let mut values = vec![("host", endpoint.host.clone())];
    values.extend(endpoint.port.map(|port| ("port", port.to_string())));
    values.extend(endpoint.database.clone().map(|database| ("database", database)));
    values
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
    pub database: Option<DatabaseSource>,
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

impl<'a> ExecutorJob<'a> {
    /// A Job on a repository as a whole (a session's finalize, a `kubectl stash` command): the
    /// batch-level `runtime`, the repository's Secret, no member data; labels, args, owner and
    /// deadline are the caller's.
    pub fn on_repository(
        name: String,
        namespace: String,
        repository: &'a Repository,
        runtime: Option<&'a RuntimeSettings>,
        image: &'a str,
    ) -> Self {
        ExecutorJob {
            name,
            namespace,
            owner: None,
            labels: BTreeMap::new(),
            args: Vec::new(),
            image,
            repository: Some(repository),
            runtime,
            temp_dir: None,
            data: Vec::new(),
            database: None,
            deadline_seconds: None,
        }
    }

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
        if let Some(database) = &self.database {
            volumes.push(database.volume("database-secret"));
            mounts.push(mount("database-secret", DEFAULT_DATABASE_SECRET_DIR, true));
        }
        let mut metadata = pod_metadata(self.labels.clone(), pod);
        // The endpoint's annotations win over the member's podAnnotations: the Job reads its database from them.
        if let Some(endpoint) = self.database.as_ref().map(DatabaseSource::annotations).filter(|a| !a.is_empty()) {
            metadata.annotations.get_or_insert_with(Default::default).extend(endpoint);
        }
        Job {
            metadata: ObjectMeta {
                name: Some(self.name),
                namespace: Some(self.namespace),
                labels: Some(self.labels),
                owner_references: self.owner.map(|o| vec![o]),
                ..Default::default()
            },
            spec: Some(JobSpec {
                backoff_limit: Some(1),
                active_deadline_seconds: self.deadline_seconds,
                template: PodTemplateSpec {
                    metadata: Some(metadata),
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
