//! Leader election on a coordination.k8s.io Lease: exactly one operator replica runs the controllers;
//! every replica serves the webhook. Losing (or failing to renew) the Lease stops the controllers.

use crate::metrics::Metrics;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use kube::core::ObjectMeta;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's name in `holderIdentity` (its Pod name).
    pub identity: String,
    /// How long a Lease stays valid without renewal: the longest a crashed leader blocks a takeover.
    pub duration: Duration,
    /// How often the holder renews (and others try to take over).
    pub renew_every: Duration,
}

enum Attempt {
    Leading,
    Following,
}

struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
}

impl Elector {
    fn fresh_spec(&self, now: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.config.duration.as_secs()).unwrap_or(i32::MAX)),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Renews our Lease, or takes it over when it is free or expired. Writes carry the resourceVersion
    /// read, so two replicas never both win.
    async fn try_lead(&self) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.config.name.clone()), ..Default::default() },
                spec: Some(self.fresh_spec(now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Following),
                Err(err) => Err(err),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder == self.config.identity {
            let mut renewed = spec;
            renewed.renew_time = Some(MicroTime(now));
            lease.spec = Some(renewed);
        } else {
            let valid_for = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
            let expires = spec.renew_time.as_ref().map(|t| t.0).and_then(|t| t.checked_add(valid_for).ok());
            if !holder.is_empty() && expires.is_some_and(|e| e > now) {
                return Ok(Attempt::Following);
            }
            lease.spec = Some(self.fresh_spec(now, spec.lease_transitions.unwrap_or(0) + 1));
        }
        match self.api.replace(&self.config.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(Attempt::Leading),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Following),
            Err(err) => Err(err),
        }
    }

    /// Hands the Lease back on a clean shutdown so that another replica takes over at once.
    async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.config.identity.as_str())
        {
            spec.holder_identity = None;
            let _ = self.api.replace(&self.config.name, &PostParams::default(), &lease).await;
        }
    }
}

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
    let elector = Elector { api: Api::namespaced(client, &config.namespace), config };
    let mut leading: Option<(CancellationToken, tokio::task::JoinHandle<()>)> = None;
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        let attempt = elector.try_lead().await;
        match attempt {
            Ok(Attempt::Leading) => {
                last_renewal = tokio::time::Instant::now();
                if leading.is_none() {
                    tracing::info!(identity = %elector.config.identity, "acquired the controller Lease; starting controllers");
                    metrics.controller.leader.set(1);
                    let token = cancel.child_token();
                    leading = Some((token.clone(), tokio::spawn(lead(token))));
                }
            }
            Ok(Attempt::Following) => {
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
                    && last_renewal.elapsed() + elector.config.renew_every >= elector.config.duration
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
            _ = tokio::time::sleep(elector.config.renew_every) => {}
        }
    }
    if let Some((token, task)) = leading.take() {
        token.cancel();
        let _ = task.await;
        elector.release().await;
        metrics.controller.leader.set(0);
    }
}
