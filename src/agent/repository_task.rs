//! `stash repository-task`: the Job behind `kubectl stash snapshots|check|unlock`. It runs in the
//! batch's namespace as the executor identity with the repository's Secret mounted, so the user's
//! machine needs neither restic nor credentials, and writes its outcome into a ConfigMap that the
//! CLI reads back and deletes (see `plugin::repository_job` for why a ConfigMap).

use super::executor::{AgentError, Executor};
use super::locks;
use crate::plugin::report::{JobOutcome, LockRow, RepositoryReport, RepositoryTask, snapshot_rows};
use crate::tenancy::LeaseFor;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::ResourceExt;
use kube::api::PostParams;
use kube::core::ObjectMeta;
use std::collections::BTreeMap;
use std::time::Duration;

/// The ConfigMap key holding the outcome as JSON.
pub(crate) const RESULT_KEY: &str = "result.json";
/// How long a check waits for backups to release the repository (restic's own retry).
const CHECK_LOCK_WAIT: Duration = Duration::from_secs(300);

/// Runs `task` for `batch` and records the outcome in ConfigMap `result`, an error included, so the
/// CLI can say what went wrong; the Job fails too on error.
pub async fn run(executor: &Executor, batch: &str, task: RepositoryTask, result: &str) -> Result<(), AgentError> {
    let outcome = report(executor, batch, task).await;
    let written = match &outcome {
        Ok(report) => JobOutcome::Report(report.clone()),
        Err(err) => JobOutcome::Error(err.to_string()),
    };
    write_outcome(executor, result, &written).await?;
    outcome.map(drop)
}

async fn report(executor: &Executor, batch: &str, task: RepositoryTask) -> Result<RepositoryReport, AgentError> {
    let batch_object = executor.batch(batch).await?;
    // The same authorisation as every executor's: the batch's namespace must be allowed to use it.
    let repository = executor.repository(&batch_object.spec.repository).await?;
    let name = repository.name_any();
    Ok(match task {
        RepositoryTask::Snapshots => {
            let restic = executor.restic(&repository).await?;
            let listed = restic.snapshots(&[format!("batch={batch}")]).await?;
            RepositoryReport::Snapshots {
                repository: name,
                snapshots: snapshot_rows(&listed, executor.namespace(), batch),
            }
        }
        RepositoryTask::Check => {
            let restic = executor.restic(&repository).await?.waiting_for_locks(CHECK_LOCK_WAIT);
            // Under the repository's Lease, as the finalize's own check: never beside retention.
            let healthy =
                executor.repository_lease(&repository, LeaseFor::Maintenance).hold_while(restic.check()).await??;
            RepositoryReport::Check { repository: name, healthy }
        }
        RepositoryTask::Unlock => {
            let restic = executor.restic(&repository).await?;
            // The operator's own rule, with its Events on the batch: only provably stale locks go.
            let verdicts = locks::heal(executor, &restic, &batch_object).await?;
            RepositoryReport::Unlock { repository: name, locks: verdicts.into_iter().map(LockRow::from).collect() }
        }
    })
}

/// Creates ConfigMap `name` with the outcome, owned by this Pod (when it is one) so that it goes
/// with the Job if the CLI is gone before it reads it.
async fn write_outcome(executor: &Executor, name: &str, outcome: &JobOutcome) -> Result<(), AgentError> {
    let json = serde_json::to_string(outcome).map_err(|e| AgentError::Invalid(format!("encoding the result: {e}")))?;
    let pod = match executor.settings.pod_name.as_deref() {
        Some(pod) => executor.api::<Pod>().get_opt(pod).await?,
        None => None,
    };
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(crate::api::PART_OF.0.into(), crate::api::PART_OF.1.into())])),
            owner_references: pod.as_ref().and_then(super::plain_owner).map(|o| vec![o]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(RESULT_KEY.to_string(), json)])),
        ..Default::default()
    };
    executor.api::<ConfigMap>().create(&PostParams::default(), &config_map).await?;
    Ok(())
}
