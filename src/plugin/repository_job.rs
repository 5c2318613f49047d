//! The CLI side of `kubectl stash snapshots|check|unlock`: a Job in the batch's namespace, built by
//! the operator's own executor Job builder (the executor identity, the repository Secret as a
//! volume, the restricted securityContext), waited for, read back and deleted.
//!
//! The Job hands its result back in a ConfigMap named after it rather than in its log: the result
//! is then one structured object the user's own RBAC reads (namespace `edit` and `view` can), it
//! does not depend on a kubelet still holding the log, it cannot mix with restic's messages on the
//! same stream, and the CLI can tell "no result yet" from "the Job died" without parsing text.

use super::PluginError;
use super::report::{JobOutcome, RepositoryReport, RepositoryTask};
use crate::agent::repository_task::RESULT_KEY;
use crate::api::BackupBatch;
use crate::api::repository::Repository;
use crate::controller::backup_job::job_name;
use crate::controller::backup_session::job_failed;
use crate::controller::executor_job::ExecutorJob;
use crate::controller::trigger::cronjob_name;
use crate::session::invoker_labels;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, PostParams, PropagationPolicy};
use kube::{Client, ResourceExt};
use std::time::{Duration, Instant};

/// Marks the Jobs of `kubectl stash`, with the task as value.
pub const TASK_LABEL: &str = "stash.appscode.com/repository-task";
/// A Job the CLI could not delete (interrupted, or kept after a failure) goes after this long.
const JOB_TTL_SECONDS: i32 = 3600;
const POLL: Duration = Duration::from_millis(500);

/// Where the Job is and what it runs.
pub struct TaskRequest {
    pub namespace: String,
    pub batch: String,
    pub task: RepositoryTask,
    /// The Job's image; default: the one the operator runs this batch's trigger with.
    pub image: Option<String>,
    pub timeout: Duration,
}

/// The Job running `task` for `batch` as `name`, its result to ConfigMap `name`.
pub(crate) fn task_job(
    batch: &BackupBatch,
    repository: &Repository,
    task: RepositoryTask,
    image: &str,
    name: &str,
    timeout: Duration,
) -> Job {
    let mut labels = invoker_labels(&batch.name_any());
    labels.insert(TASK_LABEL.into(), task.label().into());
    let namespace = batch.namespace().unwrap_or_default();
    let runtime = batch.spec.runtime_settings.as_deref();
    let mut job = ExecutorJob {
        labels,
        args: vec![
            "repository-task".into(),
            format!("--batch={}", batch.name_any()),
            format!("--task={}", task.label()),
            format!("--result={name}"),
        ],
        deadline_seconds: Some(i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX)),
        ..ExecutorJob::on_repository(name.into(), namespace, repository, runtime, image)
    }
    .build();
    if let Some(spec) = job.spec.as_mut() {
        // A second try would find the first one's result and fail to write its own.
        spec.backoff_limit = Some(0);
        spec.ttl_seconds_after_finished = Some(JOB_TTL_SECONDS);
    }
    job
}

/// Where a Job stands, from what the API shows of it and of its result.
#[derive(Debug, PartialEq)]
pub(crate) enum Progress {
    Waiting,
    Done(JobOutcome),
    Failed(String),
}

pub(crate) fn progress(name: &str, job: Option<&Job>, result: Option<&ConfigMap>) -> Progress {
    if let Some(text) = result.and_then(|c| c.data.as_ref()).and_then(|d| d.get(RESULT_KEY)) {
        return match serde_json::from_str(text) {
            Ok(outcome) => Progress::Done(outcome),
            Err(err) => Progress::Failed(format!("the result of Job {name} is unreadable: {err}")),
        };
    }
    match job {
        None => Progress::Failed(format!("Job {name} was deleted before it reported")),
        Some(job) if job_failed(job) => {
            Progress::Failed(format!("Job {name} failed without a result; see `kubectl logs job/{name}`"))
        }
        Some(_) => Progress::Waiting,
    }
}

/// The image for the Job: asked for, else the trigger CronJob's (the operator's job image), else
/// this CLI's own version of the image.
async fn job_image(client: &Client, request: &TaskRequest) -> String {
    if let Some(image) = &request.image {
        return image.clone();
    }
    let cronjobs: Api<CronJob> = Api::namespaced(client.clone(), &request.namespace);
    let trigger = cronjobs.get_opt(&cronjob_name(&request.batch)).await.ok().flatten();
    let image = trigger
        .and_then(|c| c.spec)
        .and_then(|s| s.job_template.spec)
        .and_then(|s| s.template.spec)
        .and_then(|p| p.containers.into_iter().next())
        .and_then(|c| c.image);
    image.unwrap_or_else(|| concat!("stash:", env!("CARGO_PKG_VERSION")).to_string())
}

/// Creates the Job, waits for its result, deletes it, and returns the report. A Job that failed or
/// ran out of time is kept for its log (and goes after an hour).
pub async fn run(client: Client, request: TaskRequest) -> Result<RepositoryReport, PluginError> {
    let batch = super::batch(&client, &request.namespace, &request.batch).await?;
    let namespace = request.namespace.as_str();
    let repository = match crate::tenancy::fetch_repository(&client, namespace, &batch.spec.repository).await? {
        Ok(repository) => repository,
        Err(refusal) => return Err(PluginError::Repository(refusal)),
    };
    let image = job_image(&client, &request).await;
    let suffix = format!("{}-{}", request.task.label(), Timestamp::now().as_millisecond());
    let name = job_name(&request.batch, &suffix);
    let job = task_job(&batch, &repository, request.task, &image, &name, request.timeout);
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let results: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    jobs.create(&PostParams::default(), &job).await?;
    let deadline = Instant::now() + request.timeout;
    let outcome = loop {
        let current = jobs.get_opt(&name).await?;
        match progress(&name, current.as_ref(), results.get_opt(&name).await?.as_ref()) {
            Progress::Done(outcome) => break outcome,
            Progress::Failed(message) => return Err(PluginError::Job(message)),
            Progress::Waiting if Instant::now() >= deadline => {
                return Err(PluginError::Job(format!(
                    "Job {name} did not report within {}s; it is kept for `kubectl logs job/{name}`",
                    request.timeout.as_secs()
                )));
            }
            Progress::Waiting => tokio::time::sleep(POLL).await,
        }
    };
    let background = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
    delete_if_present(jobs.delete(&name, &background).await.map(drop))?;
    // Owned by the Job's Pod: the garbage collector may be first.
    delete_if_present(results.delete(&name, &DeleteParams::default()).await.map(drop))?;
    match outcome {
        JobOutcome::Report(report) => Ok(report),
        JobOutcome::Error(message) => Err(PluginError::Job(format!("Job {name}: {message}"))),
    }
}

/// A delete whose object is already gone succeeded.
fn delete_if_present(result: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match result {
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn batch() -> BackupBatch {
        serde_json::from_value(serde_json::json!({"apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupBatch",
            "metadata": {"name": "app", "namespace": "shop", "uid": "u"},
            "spec": {"repository": {"name": "repo"}, "members": []}}))
        .expect("a batch")
    }

    fn repository() -> Repository {
        serde_json::from_value(serde_json::json!({"apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
            "metadata": {"name": "repo"}, "spec": {"backend": {"storageSecretName": "repo-secret",
            "s3": {"endpoint": "e", "bucket": "b"}}}}))
        .expect("a repository")
    }

    #[test]
    fn the_job_is_an_executor_job_with_the_repository_secret() {
        let job = task_job(
            &batch(),
            &repository(),
            RepositoryTask::Unlock,
            "stash:1",
            "app-unlock-1",
            Duration::from_secs(60),
        );
        let spec = job.spec.expect("a spec");
        assert_eq!((spec.backoff_limit, spec.active_deadline_seconds), (Some(0), Some(60)));
        let pod = spec.template.spec.expect("a pod");
        assert_eq!(pod.service_account_name.as_deref(), Some("stash-backup"));
        let volumes = pod.volumes.unwrap_or_default();
        let secret = volumes.iter().find_map(|v| v.secret.as_ref()).and_then(|s| s.secret_name.as_deref());
        assert_eq!(secret, Some("repo-secret"));
        let container = &pod.containers[0];
        assert_eq!(
            container.args.clone().unwrap_or_default(),
            ["repository-task", "--batch=app", "--task=unlock", "--result=app-unlock-1"]
        );
        crate::executor_pod::tests::assert_restricted(container.security_context.as_ref());
        let labels = job.metadata.labels.unwrap_or_default();
        assert_eq!(labels.get(TASK_LABEL).map(String::as_str), Some("unlock"));
    }

    #[test]
    fn a_result_ends_the_wait_and_a_failed_job_without_one_is_an_error() {
        let running = Job::default();
        assert_eq!(progress("j", Some(&running), None), Progress::Waiting);
        let outcome = JobOutcome::Error("boom".into());
        let data = BTreeMap::from([(RESULT_KEY.to_string(), serde_json::to_string(&outcome).expect("JSON"))]);
        let result = ConfigMap { data: Some(data), ..Default::default() };
        assert_eq!(progress("j", Some(&running), Some(&result)), Progress::Done(outcome));
        let failed: Job = serde_json::from_value(serde_json::json!({"status": {"conditions": [
            {"type": "Failed", "status": "True"}]}}))
        .expect("a Job");
        assert!(matches!(progress("j", Some(&failed), None), Progress::Failed(m) if m.contains("kubectl logs job/j")));
        assert!(matches!(progress("j", None, None), Progress::Failed(_)));
    }
}
