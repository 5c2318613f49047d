//! Leader election on a coordination.k8s.io Lease: exactly one operator replica runs the controllers;
//! every replica serves the webhook. Losing (or failing to renew) the Lease stops the controllers.
//!
//! Stepping down is bounded: the controllers get half a renew interval to return after their token
//! is cancelled, then their task is aborted, which drops every in-flight reconcile (kube-runtime
//! polls them inside that task). The Lease's renew deadline leaves a whole renew interval before
//! anyone else may take over, so the controllers are gone by then. The process is not exited
//! instead because every replica also serves the webhook, which would go away with it.

use crate::lease::{LeaseConfig, LeaseLock};
use crate::metrics::Metrics;
use kube::Client;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Why this replica stopped leading.
enum StepDown {
    /// Lost or not renewed in time: contend again at once, the Lease may still be ours.
    Lost,
    /// The controllers ended by themselves (a panic): hand the Lease over, then contend again.
    ControllersEnded,
    /// `cancel` fired: hand the Lease over and return.
    Shutdown,
}

/// Runs `lead` while this replica holds the Lease, until `cancel` fires. `lead` gets a token that is
/// cancelled when leadership is lost; it should return soon after, and is aborted if it does not.
pub async fn run_while_leader<F, Fut>(
    client: Client,
    config: LeaseConfig,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    lead: F,
) where
    F: Fn(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let span = tracing::info_span!("leader_election", lease = %config.name, identity = %config.identity);
    let elector = LeaseLock::new(client, config);
    async {
        loop {
            let held_until = tokio::select! {
                _ = cancel.cancelled() => return,
                held_until = contend(&elector) => held_until,
            };
            tracing::info!("acquired the controller Lease; starting controllers");
            metrics.controller.leader.set(1);
            let token = cancel.child_token();
            let mut controllers = tokio::spawn(lead(token.clone()));
            let step_down = tokio::select! {
                lost = elector.keep(held_until) => {
                    tracing::warn!(error = %lost, "lost the controller Lease; stopping controllers");
                    StepDown::Lost
                }
                ended = &mut controllers => {
                    tracing::error!(panicked = ended.is_err(), "the controllers ended by themselves; releasing the Lease");
                    StepDown::ControllersEnded
                }
                _ = cancel.cancelled() => StepDown::Shutdown,
            };
            stop(token, controllers, elector.config().renew_every / 2).await;
            metrics.controller.leader.set(0);
            // Per-object series come from the leader only: the next leader exports them from status.
            metrics.controller.clear_objects();
            match step_down {
                StepDown::Lost => {}
                StepDown::ControllersEnded => {
                    elector.release().await;
                    // Give the other replicas the first chance at the Lease.
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(elector.config().renew_every) => {}
                    }
                }
                StepDown::Shutdown => {
                    elector.release().await;
                    return;
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// Tries for the Lease every renew interval until it is ours; returns until when it is held.
async fn contend(elector: &LeaseLock) -> tokio::time::Instant {
    loop {
        match elector.try_acquire().await {
            Ok(Some(held_until)) => return held_until,
            Ok(None) => {}
            Err(err) => tracing::warn!(error = %err, "trying for the controller Lease failed"),
        }
        tokio::time::sleep(elector.config().renew_every).await;
    }
}

/// Cancels the controllers and waits up to `grace` for them to return, then aborts them.
async fn stop(token: CancellationToken, mut controllers: JoinHandle<()>, grace: Duration) {
    token.cancel();
    if controllers.is_finished() {
        return;
    }
    if tokio::time::timeout(grace, &mut controllers).await.is_err() {
        tracing::warn!(?grace, "the controllers did not stop in time; aborting them");
        controllers.abort();
        let _ = controllers.await;
    }
}
