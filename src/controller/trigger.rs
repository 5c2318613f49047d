//! The trigger CronJob `stash-trigger-<batch>` and the identity it runs as.

use crate::api::BackupBatch;
use crate::executor_pod::{field_env, pod_metadata, pod_settings, restricted};
use crate::session::{invoker_labels, owned_by};
use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::core::ObjectMeta;
use std::str::FromStr;

/// The ServiceAccount trigger Jobs run as, one per namespace.
pub const TRIGGER_SERVICE_ACCOUNT: &str = "stash-trigger";
/// The ClusterRole (deploy/base/rbac.yaml) it is bound to: create BackupSessions, read BackupBatches.
pub const TRIGGER_CLUSTER_ROLE: &str = "stash-trigger";
/// The ClusterRole of backup Jobs and sidecars: read their batch, write their own session entries.
pub const BACKUP_CLUSTER_ROLE: &str = "stash-sidecar";

/// The longest CronJob name: its Jobs append 11 characters and must stay within 63.
pub const CRONJOB_NAME_MAX: usize = 52;

/// `stash-trigger-<batch>`, cut and hashed when the batch's name is longer than 38 characters.
pub fn cronjob_name(batch: &str) -> String {
    crate::names::bounded(&format!("stash-trigger-{batch}"), CRONJOB_NAME_MAX)
}

/// The first run of `cron` after `now`, in UTC (as the trigger CronJob reads it).
pub(crate) fn next_run(cron: &str, now: Timestamp) -> Option<Timestamp> {
    let parsed = croner::Cron::from_str(cron).ok()?;
    let next = parsed.find_next_occurrence(&now.to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC), false).ok()?;
    Some(next.timestamp())
}

/// The CronJob that creates a BackupSession at every slot of the batch's schedule.
pub fn trigger_cronjob(batch: &BackupBatch, schedule: &str, image: &str) -> CronJob {
    let name = batch.name_any();
    let runtime = batch.spec.runtime_settings.as_deref();
    let pod = runtime.and_then(|r| r.pod.as_ref());
    let container = runtime.and_then(|r| r.container.as_ref());
    let mut env = vec![field_env("POD_NAMESPACE", "metadata.namespace")];
    env.extend(container.map(|c| c.env.clone()).unwrap_or_default());
    let pod_spec = PodSpec {
        service_account_name: Some(
            pod.and_then(|p| p.service_account_name.clone()).unwrap_or_else(|| TRIGGER_SERVICE_ACCOUNT.into()),
        ),
        restart_policy: Some("OnFailure".into()),
        containers: vec![Container {
            name: "trigger".into(),
            image: Some(image.into()),
            args: Some(vec![
                "create-backupsession".into(),
                "--invoker-kind=BackupBatch".into(),
                format!("--invoker-name={name}"),
            ]),
            env: Some(env),
            env_from: container.map(|c| c.env_from.clone()).filter(|e| !e.is_empty()),
            resources: container.and_then(|c| c.resources.clone()),
            security_context: Some(container.and_then(|c| c.security_context.clone()).unwrap_or_else(restricted)),
            ..Default::default()
        }],
        ..pod_settings(pod)
    };
    CronJob {
        metadata: ObjectMeta {
            name: Some(cronjob_name(&name)),
            namespace: batch.namespace(),
            labels: Some(invoker_labels(&name)),
            owner_references: owned_by(batch).map(|owner| vec![owner]),
            ..Default::default()
        },
        spec: Some(CronJobSpec {
            schedule: schedule.to_string(),
            suspend: Some(batch.spec.paused),
            concurrency_policy: Some("Forbid".into()),
            successful_jobs_history_limit: Some(1),
            failed_jobs_history_limit: Some(1),
            job_template: JobTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(invoker_labels(&name)), ..Default::default() }),
                spec: Some(JobSpec {
                    backoff_limit: Some(3),
                    ttl_seconds_after_finished: Some(3600),
                    template: PodTemplateSpec {
                        metadata: Some(pod_metadata(invoker_labels(&name), pod)),
                        spec: Some(pod_spec),
                    },
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}
