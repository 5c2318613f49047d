//! A coordination.k8s.io Lease as a lock: the operator's leader election, one backup host at a time
//! per target, and one retention run at a time per repository.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use kube::core::ObjectMeta;
use std::future::Future;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// The holder's name in `holderIdentity` (its Pod name).
    pub identity: String,
    /// How long a Lease stays valid without renewal: the longest a crashed holder blocks a takeover.
    pub duration: Duration,
    /// How often the holder renews (and others try to take over).
    pub renew_every: Duration,
}

pub struct LeaseLock {
    api: Api<Lease>,
    config: LeaseConfig,
}

impl LeaseLock {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        LeaseLock { api: Api::namespaced(client, &config.namespace), config }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

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

    /// Renews our Lease, or takes it over when it is free or expired; true when we hold it. Writes
    /// carry the resourceVersion read, so two contenders never both win.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.config.name.clone()), ..Default::default() },
                spec: Some(self.fresh_spec(now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
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
                return Ok(false);
            }
            lease.spec = Some(self.fresh_spec(now, spec.lease_transitions.unwrap_or(0) + 1));
        }
        match self.api.replace(&self.config.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Hands the Lease back so that another contender takes over at once.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.config.identity.as_str())
        {
            spec.holder_identity = None;
            let _ = self.api.replace(&self.config.name, &PostParams::default(), &lease).await;
        }
    }

    /// Waits for the Lease, runs `work` while renewing it, then releases it. Holding is best effort
    /// for mutual exclusion of work that is itself safe to repeat (a backup, a retention run).
    pub async fn hold_while<F: Future>(&self, work: F) -> Result<F::Output, kube::Error> {
        while !self.try_acquire().await? {
            tokio::time::sleep(self.config.renew_every).await;
        }
        let mut work = std::pin::pin!(work);
        let output = loop {
            tokio::select! {
                output = &mut work => break output,
                _ = tokio::time::sleep(self.config.renew_every) => {
                    match self.try_acquire().await {
                        Ok(true) => {}
                        Ok(false) => tracing::warn!(lease = %self.config.name, "lost the Lease while working"),
                        Err(err) => tracing::warn!(lease = %self.config.name, error = %err, "renewing the Lease failed"),
                    }
                }
            }
        };
        self.release().await;
        Ok(output)
    }
}
