//! A coordination.k8s.io Lease as a lock: the operator's leader election, one backup host at a time
//! per target, and one retention run at a time per repository.
//!
//! The rules are client-go's leaderelection: a contender judges expiry from when *it* last saw the
//! record change, by its own monotonic clock, because the holder's `renewTime` comes from another
//! clock; every request has a deadline, because kube's client has no read timeout; and a holder
//! counts itself as holding only until `renew_deadline` after its last successful renewal started,
//! which is before anyone else may take over.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use kube::core::ObjectMeta;
use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

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

impl LeaseConfig {
    /// The longest one request may take, and how long after a renewal started the holder may act
    /// as holder without another: one renew interval short of the duration, so that it stops
    /// before a contender's own observation of its last renewal runs out.
    pub(crate) fn renew_deadline(&self) -> Duration {
        self.duration.checked_sub(self.renew_every).filter(|d| !d.is_zero()).unwrap_or(self.duration / 2)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("Lease {name}: {source}")]
    Kube { name: String, source: kube::Error },
    #[error("Lease {name}: no answer from the API server within {after:?}")]
    Timeout { name: String, after: Duration },
    #[error("Lease {name} was taken over by another holder")]
    TakenOver { name: String },
    #[error("Lease {name} was not renewed within {deadline:?}; another holder may take it over")]
    NotRenewed { name: String, deadline: Duration },
}

/// The parts of a Lease that every write changes: what a contender watches for signs of life.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct LeaseRecord {
    /// `None` when free (no or an empty `holderIdentity`).
    pub(crate) holder: Option<String>,
    pub(crate) duration: Duration,
    pub(crate) acquire_time: Option<Timestamp>,
    /// The holder's clock: compared for change only, never with ours.
    pub(crate) renew_time: Option<Timestamp>,
    pub(crate) transitions: i32,
}

impl LeaseRecord {
    fn of(spec: Option<&LeaseSpec>) -> Self {
        let Some(spec) = spec else { return LeaseRecord::default() };
        LeaseRecord {
            holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
            duration: Duration::from_secs(spec.lease_duration_seconds.and_then(|s| u64::try_from(s).ok()).unwrap_or(0)),
            acquire_time: spec.acquire_time.as_ref().map(|t| t.0),
            renew_time: spec.renew_time.as_ref().map(|t| t.0),
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }
}

/// A record as we saw it, and since when (our clock) it has been unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Observed {
    pub(crate) record: LeaseRecord,
    pub(crate) since: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LeaseDecision {
    /// It is ours: renew it.
    Renew,
    /// Free, or unchanged for a whole leaseDuration of our own observation: take it over.
    Acquire,
    /// Another holder's and alive as far as we know; the record unchanged since `since`.
    Wait { since: Instant },
}

/// Decides what to do with `record`, read at `now`, given what we `observed` before.
pub(crate) fn judge(now: Instant, observed: Option<&Observed>, record: &LeaseRecord, me: &str) -> LeaseDecision {
    let Some(holder) = record.holder.as_deref() else { return LeaseDecision::Acquire };
    if holder == me {
        return LeaseDecision::Renew;
    }
    // Only a change we saw ourselves proves the holder alive; its renewTime is another clock's.
    let since = observed.filter(|o| o.record == *record).map_or(now, |o| o.since);
    if now.duration_since(since) >= record.duration { LeaseDecision::Acquire } else { LeaseDecision::Wait { since } }
}

pub struct LeaseLock {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The record last read or written; a std Mutex because it is never held across an await.
    observed: Mutex<Option<Observed>>,
    /// Set on the Lease when this lock creates it, so that it goes with what it serialises.
    owner: Option<OwnerReference>,
}

impl LeaseLock {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        LeaseLock { api: Api::namespaced(client, &config.namespace), config, observed: Mutex::new(None), owner: None }
    }

    /// The Lease, when this lock creates it, is owned by `owner` (garbage-collected with it).
    pub fn owned_by(mut self, owner: Option<OwnerReference>) -> Self {
        self.owner = owner;
        self
    }

    pub(crate) fn config(&self) -> &LeaseConfig {
        &self.config
    }

    fn kube_error(&self, source: kube::Error) -> LeaseError {
        LeaseError::Kube { name: self.config.name.clone(), source }
    }

    fn observe(&self, observed: Observed) {
        *self.observed.lock().unwrap_or_else(PoisonError::into_inner) = Some(observed);
    }

    fn spec(&self, record: &LeaseRecord, acquire_time: Option<Timestamp>, now: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.config.duration.as_secs()).unwrap_or(i32::MAX)),
            acquire_time: Some(MicroTime(acquire_time.unwrap_or(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(record.transitions),
            ..Default::default()
        }
    }

    /// One attempt to renew the Lease or take it over, bounded by the renew deadline. `Some(until)`
    /// when we hold it: we may act as its holder until `until` unless renewed again.
    pub(crate) async fn try_acquire(&self) -> Result<Option<Instant>, LeaseError> {
        let started = Instant::now();
        let deadline = self.config.renew_deadline();
        match tokio::time::timeout(deadline, self.attempt()).await {
            Ok(held) => Ok(held?.then_some(started + deadline)),
            Err(_) => Err(LeaseError::Timeout { name: self.config.name.clone(), after: deadline }),
        }
    }

    /// Reads, judges and writes once. Writes carry the resourceVersion read, so two contenders
    /// never both win.
    async fn attempt(&self) -> Result<bool, LeaseError> {
        let name = &self.config.name;
        let Some(mut lease) = self.api.get_opt(name).await.map_err(|e| self.kube_error(e))? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    owner_references: self.owner.clone().map(|o| vec![o]),
                    ..Default::default()
                },
                spec: Some(self.spec(&LeaseRecord::default(), None, Timestamp::now())),
            };
            return self.write(self.api.create(&PostParams::default(), &lease).await);
        };
        let record = LeaseRecord::of(lease.spec.as_ref());
        let observed = self.observed.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let now = Timestamp::now();
        lease.spec = Some(match judge(Instant::now(), observed.as_ref(), &record, &self.config.identity) {
            LeaseDecision::Renew => self.spec(&record, record.acquire_time, now),
            LeaseDecision::Acquire => {
                let transitions = LeaseRecord { transitions: record.transitions + 1, ..record };
                self.spec(&transitions, None, now)
            }
            LeaseDecision::Wait { since } => {
                self.observe(Observed { record, since });
                return Ok(false);
            }
        });
        self.write(self.api.replace(name, &PostParams::default(), &lease).await)
    }

    fn write(&self, written: Result<Lease, kube::Error>) -> Result<bool, LeaseError> {
        match written {
            Ok(lease) => {
                self.observe(Observed { record: LeaseRecord::of(lease.spec.as_ref()), since: Instant::now() });
                Ok(true)
            }
            // Someone else wrote first; the next read shows who.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(err) => Err(self.kube_error(err)),
        }
    }

    /// Waits for the Lease: `Ok(until)` once held (see `try_acquire`). Errors end the wait.
    async fn acquire(&self) -> Result<Instant, LeaseError> {
        loop {
            if let Some(until) = self.try_acquire().await? {
                return Ok(until);
            }
            tokio::time::sleep(self.config.renew_every).await;
        }
    }

    /// Renews the Lease, held until `held_until`, every renew interval; returns only once it is
    /// lost: another holder wrote it, or no renewal succeeded before `held_until`.
    pub(crate) async fn keep(&self, mut held_until: Instant) -> LeaseError {
        loop {
            tokio::time::sleep_until((Instant::now() + self.config.renew_every).min(held_until)).await;
            if Instant::now() >= held_until {
                let deadline = self.config.renew_deadline();
                return LeaseError::NotRenewed { name: self.config.name.clone(), deadline };
            }
            match tokio::time::timeout_at(held_until, self.try_acquire()).await {
                Ok(Ok(Some(until))) => held_until = until,
                Ok(Ok(None)) => return LeaseError::TakenOver { name: self.config.name.clone() },
                Ok(Err(err)) => tracing::warn!(error = %err, "renewing the Lease failed; retrying"),
                // Checked at the top of the loop.
                Err(_) => {}
            }
        }
    }

    /// Hands the Lease back so that another contender takes over at once. Bounded by the renew
    /// deadline; a failure only delays the takeover until the Lease expires.
    pub(crate) async fn release(&self) {
        let name = &self.config.name;
        let released = tokio::time::timeout(self.config.renew_deadline(), async {
            if let Some(mut lease) = self.api.get_opt(name).await?
                && let Some(spec) = lease.spec.as_mut()
                && spec.holder_identity.as_deref() == Some(self.config.identity.as_str())
            {
                spec.holder_identity = None;
                self.api.replace(name, &PostParams::default(), &lease).await?;
            }
            Ok::<(), kube::Error>(())
        })
        .await;
        match released {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(lease = %name, error = %err, "releasing the Lease failed"),
            Err(_) => tracing::warn!(lease = %name, "releasing the Lease timed out"),
        }
    }

    /// Waits for the Lease, runs `work` while renewing it, then releases it. When the Lease is lost
    /// `work` is dropped (restic children are killed on drop) and the loss returned: carrying on
    /// would break the exclusion the Lease exists for.
    pub async fn hold_while<F: Future>(&self, work: F) -> Result<F::Output, LeaseError> {
        let span = tracing::info_span!("lease", lease = %self.config.name, identity = %self.config.identity);
        async {
            let held_until = self.acquire().await?;
            let outcome = tokio::select! {
                output = work => Ok(output),
                lost = self.keep(held_until) => {
                    tracing::warn!(error = %lost, "lost the Lease; stopping the work it guards");
                    Err(lost)
                }
            };
            self.release().await;
            outcome
        }
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DURATION: Duration = Duration::from_secs(15);

    fn held_by(holder: &str, renew_time: Timestamp) -> LeaseRecord {
        LeaseRecord {
            holder: Some(holder.into()),
            duration: DURATION,
            acquire_time: Some(renew_time),
            renew_time: Some(renew_time),
            transitions: 3,
        }
    }

    fn wall(skew_secs: i64) -> Timestamp {
        Timestamp::now().checked_add(k8s_openapi::jiff::SignedDuration::from_secs(skew_secs)).expect("in range")
    }

    #[test]
    fn the_holders_clock_never_decides() {
        let t0 = Instant::now();
        for skew in [-3600, -60, 0, 60, 3600] {
            let record = held_by("other", wall(skew));
            let seen = Observed { record: record.clone(), since: t0 };
            // Just seen: alive, wherever its clock is.
            assert_eq!(judge(t0, None, &record, "me"), LeaseDecision::Wait { since: t0 }, "skew {skew}s");
            // Unchanged for less than its duration by our clock: still alive.
            let soon = t0 + DURATION - Duration::from_secs(1);
            assert_eq!(judge(soon, Some(&seen), &record, "me"), LeaseDecision::Wait { since: t0 }, "skew {skew}s");
            // Unchanged for its whole duration by our clock: expired, even if stamped in the future.
            assert_eq!(judge(t0 + DURATION, Some(&seen), &record, "me"), LeaseDecision::Acquire, "skew {skew}s");
        }
    }

    #[test]
    fn a_changed_record_restarts_the_observation() {
        let t0 = Instant::now();
        let seen = Observed { record: held_by("other", wall(-60)), since: t0 };
        let later = t0 + DURATION * 2;
        let renewed = held_by("other", wall(-59));
        assert_eq!(judge(later, Some(&seen), &renewed, "me"), LeaseDecision::Wait { since: later });
        let handed_over = LeaseRecord { holder: Some("third".into()), ..seen.record.clone() };
        assert_eq!(judge(later, Some(&seen), &handed_over, "me"), LeaseDecision::Wait { since: later });
    }

    #[test]
    fn our_own_record_is_renewed_and_a_free_one_taken() {
        let t0 = Instant::now();
        let ours = held_by("me", wall(-3600));
        let seen = Observed { record: ours.clone(), since: t0 };
        assert_eq!(judge(t0 + DURATION * 10, Some(&seen), &ours, "me"), LeaseDecision::Renew);
        let free = LeaseRecord { holder: None, ..held_by("x", wall(0)) };
        assert_eq!(judge(t0, None, &free, "me"), LeaseDecision::Acquire);
        let spec = LeaseSpec { holder_identity: Some(String::new()), ..Default::default() };
        assert_eq!(judge(t0, None, &LeaseRecord::of(Some(&spec)), "me"), LeaseDecision::Acquire);
    }

    #[test]
    fn the_renew_deadline_leaves_a_renew_interval_before_expiry() {
        let config = |duration, renew_every| LeaseConfig {
            namespace: "ns".into(),
            name: "l".into(),
            identity: "me".into(),
            duration: Duration::from_secs(duration),
            renew_every: Duration::from_secs(renew_every),
        };
        assert_eq!(config(15, 5).renew_deadline(), Duration::from_secs(10));
        assert_eq!(config(4, 1).renew_deadline(), Duration::from_secs(3));
        // A renew interval as long as the Lease would leave no time at all.
        assert_eq!(config(4, 4).renew_deadline(), Duration::from_secs(2));
    }
}
