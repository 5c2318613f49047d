//! Leader election on a coordination.k8s.io Lease: exactly one operator replica runs the controllers;
//! every replica serves the webhook. Losing (or failing to renew) the Lease stops the controllers.

use crate::lease::LeaseConfig;
use crate::lease::LeaseLock;
use crate::metrics::Metrics;
use kube::Client;
use std::future::Future;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Runs `lead` while this replica holds the Lease, until `cancel` fires. `lead` gets a token that is
/// cancelled when leadership is lost; it must return soon after.
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
    let elector = LeaseLock::new(client, config);
    let mut leading: Option<(CancellationToken, tokio::task::JoinHandle<()>)> = None;
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        match elector.try_acquire().await {
            Ok(Some(_)) => {
                last_renewal = tokio::time::Instant::now();
                if leading.is_none() {
                    tracing::info!(identity = %elector.config().identity, "acquired the controller Lease; starting controllers");
                    metrics.controller.leader.set(1);
                    let token = cancel.child_token();
                    leading = Some((token.clone(), tokio::spawn(lead(token))));
                }
            }
            Ok(None) => {
                if let Some((token, task)) = leading.take() {
                    tracing::warn!("lost the controller Lease; stopping controllers");
                    token.cancel();
                    let _ = task.await;
                    metrics.controller.leader.set(0);
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "renewing the controller Lease failed");
                // Step down before the Lease could expire and another replica take over.
                if leading.is_some()
                    && last_renewal.elapsed() + elector.config().renew_every >= elector.config().duration
                    && let Some((token, task)) = leading.take()
                {
                    token.cancel();
                    let _ = task.await;
                    metrics.controller.leader.set(0);
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(elector.config().renew_every) => {}
        }
    }
    if let Some((token, task)) = leading.take() {
        token.cancel();
        let _ = task.await;
        elector.release().await;
        metrics.controller.leader.set(0);
    }
}
