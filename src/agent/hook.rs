//! `run-hook`: sends a session's global http or tcp hook from a Job of the batch's namespace, as
//! its executor identity (never from the operator). The Pod marks the hook as being sent before it
//! sends anything, and sends nothing when it finds the hook taken or decided (see `crate::hooks`).

use super::{AgentError, Executor};
use crate::api::BackupSession;
use crate::conditions;
use crate::hooks::{self, Hook};
use crate::status_write::update_status;

#[tracing::instrument(skip_all, fields(namespace = executor.namespace(), session = session, hook = hook.label()))]
pub async fn run(executor: &Executor, session: &str, hook: Hook) -> Result<(), AgentError> {
    let sessions = executor.api::<BackupSession>();
    let batch = executor.session(session).await?.spec.invoker.name;
    let pod = executor.identity();
    let mut taken = false;
    update_status(&sessions, session, |current| {
        let status = current.status.get_or_insert_with(Default::default);
        taken = hooks::begin_sending(&mut status.conditions, hook, &pod);
        taken
    })
    .await?;
    if !taken {
        tracing::info!("the hook was taken by another Pod or already decided: not sent again");
        return Ok(());
    }
    // Read after taking it: what the batch says now is sent, or the reason nothing was is recorded.
    let result = match executor.batch(&batch).await {
        Ok(batch) => match hook.handler(batch.spec.hooks.as_deref()) {
            Some(handler) => hooks::send(handler).await,
            None => Err(format!("the batch no longer has a {} hook", hook.label())),
        },
        Err(err) => Err(err.to_string()),
    };
    match &result {
        Ok(()) => tracing::info!("the hook ran"),
        Err(err) => tracing::warn!(error = %err, "the hook failed"),
    }
    let record = hooks::outcome(hook, &result);
    update_status(&sessions, session, |current| {
        let status = current.status.get_or_insert_with(Default::default);
        conditions::set(&mut status.conditions, &record, None);
        true
    })
    .await?;
    Ok(())
}
