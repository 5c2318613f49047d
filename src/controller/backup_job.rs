//! The Job that backs up one job-model member (a PVC) for one session.

use crate::api::backup_batch::BackupMember;
use crate::api::{BackupBatch, BackupSession};
use crate::session::invoker_labels;
use crate::webhook::sidecar::{SECRET_MOUNT_PATH, TMP_MOUNT_PATH, executor_container};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    EmptyDirVolumeSource, PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, SecretVolumeSource, Volume,
    VolumeMount,
};
use kube::core::ObjectMeta;
use kube::{Resource, ResourceExt};

/// Backup Jobs run as this per-namespace ServiceAccount, bound to the `stash-sidecar` ClusterRole.
pub const BACKUP_SERVICE_ACCOUNT: &str = "stash-backup";
pub const SESSION_LABEL: &str = "stash.appscode.com/backup-session";
/// Where a PVC is mounted when the member names no volumeMounts.
pub const DEFAULT_DATA_PATH: &str = "/stash-data";

/// `<session>-<member index>`, kept within the 63 characters a Job name (and its Pods' label) allows.
pub fn job_name(session: &str, member: usize) -> String {
    let suffix = format!("-{member}");
    let room = 63 - suffix.len();
    if session.len() <= room {
        return format!("{session}{suffix}");
    }
    let digest =
        session.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let keep = room - 9;
    format!("{}-{:08x}{suffix}", &session[..keep], digest as u32)
}

/// The Job for member `index` of `batch` in `session`. The PVC is mounted read-only, credentials come
/// from the repository Secret as a mounted volume (never inline), and the Job belongs to the session.
pub fn backup_job(
    batch: &BackupBatch,
    session: &BackupSession,
    index: usize,
    member: &BackupMember,
    secret_name: &str,
    image: &str,
    deadline_seconds: Option<i64>,
) -> Job {
    let target = &member.target.reference;
    let mut mounts: Vec<VolumeMount> = if member.target.volume_mounts.is_empty() {
        vec![VolumeMount { name: "target".into(), mount_path: DEFAULT_DATA_PATH.into(), ..Default::default() }]
    } else {
        member.target.volume_mounts.iter().map(|m| VolumeMount { name: "target".into(), ..m.clone() }).collect()
    };
    for mount in &mut mounts {
        mount.read_only = Some(true);
    }
    mounts.push(VolumeMount { name: "tmp".into(), mount_path: TMP_MOUNT_PATH.into(), ..Default::default() });
    mounts.push(VolumeMount {
        name: "repository-secret".into(),
        mount_path: SECRET_MOUNT_PATH.into(),
        read_only: Some(true),
        ..Default::default()
    });
    let runtime = member.runtime_settings.as_ref().and_then(|r| r.container.as_ref());
    let args = vec![
        "backup-job".into(),
        "--invoker-kind=BackupBatch".into(),
        format!("--invoker-name={}", batch.name_any()),
        format!("--session={}", session.name_any()),
        format!("--target-kind={}", target.kind),
        format!("--target-name={}", target.name),
    ];
    let mut labels = invoker_labels(&batch.name_any());
    labels.insert(SESSION_LABEL.into(), session.name_any());
    let temp = member.temp_dir.as_ref();
    Job {
        metadata: ObjectMeta {
            name: Some(job_name(&session.name_any(), index)),
            namespace: session.namespace(),
            labels: Some(labels.clone()),
            owner_references: session.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(1),
            active_deadline_seconds: deadline_seconds,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..Default::default() }),
                spec: Some(PodSpec {
                    service_account_name: Some(BACKUP_SERVICE_ACCOUNT.into()),
                    restart_policy: Some("Never".into()),
                    containers: vec![executor_container("backup", image, args, runtime, mounts)],
                    volumes: Some(vec![
                        Volume {
                            name: "target".into(),
                            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                                claim_name: target.name.clone(),
                                read_only: Some(true),
                            }),
                            ..Default::default()
                        },
                        Volume {
                            name: "tmp".into(),
                            empty_dir: Some(EmptyDirVolumeSource {
                                medium: temp.and_then(|t| t.medium.clone()),
                                size_limit: temp.and_then(|t| t.size_limit.clone()),
                            }),
                            ..Default::default()
                        },
                        Volume {
                            name: "repository-secret".into(),
                            secret: Some(SecretVolumeSource {
                                secret_name: Some(secret_name.into()),
                                default_mode: Some(0o400),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                    ]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::job_name;

    #[test]
    fn job_names_fit_in_63_characters() {
        assert_eq!(job_name("app-backup-1764043200", 2), "app-backup-1764043200-2");
        let long = format!("{}-1764043200", "a".repeat(80));
        let name = job_name(&long, 12);
        assert!(name.len() <= 63, "{name}");
        assert_ne!(name, job_name(&format!("{}-1764043201", "a".repeat(80)), 12), "distinct sessions stay distinct");
    }
}
