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
    first_after(&croner::Cron::from_str(croner_form(cron)).ok()?, now)
}

fn first_after(cron: &croner::Cron, now: Timestamp) -> Option<Timestamp> {
    let next = cron.find_next_occurrence(&now.to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC), false).ok()?;
    Some(next.timestamp())
}

/// croner knows every macro Kubernetes does but `@midnight`.
fn croner_form(cron: &str) -> &str {
    if cron.trim() == "@midnight" { "@daily" } else { cron }
}

/// The macros a CronJob's schedule may be (`@every` aside, which croner cannot follow).
const MACROS: [&str; 7] = ["@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"];
const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// Why the trigger CronJob cannot run `schedule`, if it cannot. Kubernetes reads five fields
/// (numbers, `*`, `?`, ranges, steps, lists, and names of months and weekdays) or a macro; croner,
/// which finds the next run here, also reads seconds, `L`, `W` and `#`, which Kubernetes refuses
/// with the CronJob. A date that never comes (`0 0 30 2 *`) is no schedule either.
pub(crate) fn schedule_problem(schedule: &str, now: Timestamp) -> Option<String> {
    let schedule = schedule.trim();
    if schedule.starts_with('@') && !MACROS.contains(&schedule) {
        return Some(format!("a CronJob's macros are {}", MACROS.join(", ")));
    }
    if !schedule.starts_with('@') {
        let fields: Vec<&str> = schedule.split_whitespace().collect();
        if fields.len() != 5 {
            return Some(format!(
                "{} fields; a CronJob's schedule has five: minute, hour, day of month, month, day of week",
                fields.len()
            ));
        }
        let names: [&[&str]; 5] = [&[], &[], &[], &MONTHS, &DAYS];
        for (field, names) in fields.iter().zip(names) {
            let known = |token: &str| {
                token == "*"
                    || token == "?"
                    || (!token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()))
                    || names.contains(&token.to_ascii_lowercase().as_str())
            };
            if let Some(token) = field.split([',', '-', '/']).find(|token| !known(token)) {
                return Some(format!("{token:?} in {field:?} is not a number, a name, * or ? a CronJob reads"));
            }
        }
    }
    match croner::Cron::from_str(croner_form(schedule)) {
        Err(err) => Some(err.to_string()),
        Ok(cron) => first_after(&cron, now).is_none().then(|| "it never fires".to_string()),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Schedules croner reads and Kubernetes refuses with the CronJob, or that never fire, are
    /// problems; what a CronJob runs is not.
    #[test]
    fn a_schedule_is_what_a_cronjob_runs() {
        let now = Timestamp::from_second(1_795_000_000).expect("time");
        let good =
            ["0 2 * * *", "*/15 * * * MON-FRI", "0 0 1 JAN,jul *", "0 0 ? * 0", "@daily", "@midnight", "@weekly"];
        for schedule in good {
            assert_eq!(schedule_problem(schedule, now), None, "{schedule}");
        }
        let bad = ["0 0 2 * * *", "0 0 L * *", "0 0 * * 5#3", "0 0 1W * *", "0 0 30 2 *", "@every 1h", "every tuesday"];
        for schedule in bad.into_iter().chain(["0 0 1- * *", ""]) {
            assert!(schedule_problem(schedule, now).is_some(), "{schedule}");
        }
    }
}
